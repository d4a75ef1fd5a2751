"""Checkpoints in the Hugging Face layout: config.json, model.safetensors or shards with
model.safetensors.index.json, generation_config.json and tokenizer files.

Loading is memory-mapped (tensors are read one at a time into a model built on the meta device, so peak
memory is about one model). Saving writes the whole folder under a temporary name and renames it into
place, so an interrupted save never leaves a half checkpoint where a checkpoint is expected.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cpm4.devices import check_fits

from .config import DTYPE_NAMES, MiniCPM4Config, check_dtype_name, write_text_atomic
from .modeling import MiniCPM4ForCausalLM
from .rope import RotaryEmbedding

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Stored by some older HF exports; derived from the config, so skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_NAMES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match its config; the message names the tensor/file."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    return DTYPES[check_dtype_name(name)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_shapes(config: MiniCPM4Config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, exactly the checkpoint's tensors (no lm_head when tied)."""
    with torch.device("meta"):
        model = MiniCPM4ForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def weight_bytes(config: MiniCPM4Config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype` (a tied head counted once, as stored)."""
    numel = sum(math.prod(shape) for shape in expected_shapes(config).values())
    return numel * torch.empty((), dtype=dtype).element_size()


def _safe_open(file: Path, device: str = "cpu") -> Any:
    """safe_open, with a CheckpointError naming the file when it is truncated (an interrupted download) or is
    not safetensors at all."""
    try:
        return safe_open(str(file), framework="pt", device=device)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f.name}: shard listed in {INDEX_FILE} is missing from {path}")
        return files
    if single.is_file():
        with _safe_open(single) as f:
            return {name: single for name in f.keys()}
    hint = ""
    if any(path.glob("pytorch_model*.bin")):  # pickles: not loaded (they can run code); safetensors can be made
        hint = (" (it holds pytorch_model.bin weights, which cpm4 does not unpickle: save them as safetensors, e.g. "
                "transformers' save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_state_dict(path: str | os.PathLike, config: MiniCPM4Config, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read and check every tensor against the config; missing, extra or misshapen tensors are named."""
    path = Path(path)
    files = _weight_files(path)
    expected = expected_shapes(config)
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    tied_head = config.tie_word_embeddings and "lm_head.weight" in names
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    if missing:
        hint = " (config has tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise CheckpointError(f"missing tensor {missing[0]}{hint}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]}"
                              + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                              + " (does the config match this checkpoint?)")
    by_file: dict[Path, list[str]] = {}
    for n in sorted(expected) + (["lm_head.weight"] if tied_head else []):
        by_file.setdefault(files[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    dev = str(device)
    for file, tensor_names in by_file.items():
        with _safe_open(file, dev) as f:
            present = set(f.keys())
            for n in tensor_names:
                if n not in present:
                    raise CheckpointError(f"missing tensor {n}: {INDEX_FILE} lists it in {file.name}, "
                                          "which does not hold it")
                t = f.get_tensor(n)
                want = expected.get(n, expected["model.embed_tokens.weight"])
                if tuple(t.shape) != want:
                    raise CheckpointError(f"tensor {n}: shape {tuple(t.shape)} in {file.name}, config implies "
                                          f"{want}")
                if not t.is_floating_point():
                    raise CheckpointError(f"tensor {n}: dtype {t.dtype} is not floating point")
                out[n] = t.to(dtype) if dtype is not None else t
    if tied_head:
        head = out.pop("lm_head.weight")
        if not torch.equal(head.to(out["model.embed_tokens.weight"].dtype), out["model.embed_tokens.weight"]):
            raise CheckpointError("tensor lm_head.weight differs from model.embed_tokens.weight but the config "
                                  "has tie_word_embeddings=true")
    return out


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> MiniCPM4ForCausalLM:
    """Load a MiniCPM4 checkpoint folder. dtype None keeps the stored dtype (bit-identical reload)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    config = MiniCPM4Config.from_json(path / "config.json")
    if torch.device(device).type == "cuda":  # (on the CPU the files are mapped, not copied)
        target = parse_dtype(dtype)
        nbytes = weight_bytes(config, target) if target is not None else \
            sum(f.stat().st_size for f in set(_weight_files(path).values()))
        check_fits(nbytes, device, f"the model's weights ({path.name})")
    state = read_state_dict(path, config, parse_dtype(dtype), device)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # mixed storage: settle on the config's dtype
        target = parse_dtype(config.torch_dtype) or torch.float32
        state = {k: v.to(target) for k, v in state.items()}
    with torch.device("meta"):
        model = MiniCPM4ForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers were built on meta: make them for real on the target device.
    model.rotary = RotaryEmbedding(config).to(device)
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write over a non-empty folder (or a file) without overwrite. `save_checkpoint` checks it too;
    exports call it first so that the refusal comes before a long load."""
    out = Path(out).absolute()  # "." has no name to build the temporary and old names from
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    return out


def _mkdir(path: Path, out: Path, parents: bool = False) -> None:
    """mkdir, with an error that names the folder asked for (not the temporary one) and what is in its way."""
    try:
        path.mkdir(parents=parents, exist_ok=parents)
    except OSError as e:
        blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror or str(e)
        raise OSError(f"cannot create {out}: {why}") from None


def save_checkpoint(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module,
                    config: MiniCPM4Config, out_dir: str | os.PathLike, tokenizer: Any = None,
                    dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
                    generation_config: dict[str, Any] | None = None, overwrite: bool = False,
                    config_json: dict[str, Any] | None = None, extra_files: Iterable[Path] = ()) -> Path:
    """Write a checkpoint folder atomically. `weights` may be a module, a state dict, or an iterable of
    (name, tensor) produced lazily (so a large random model never has to exist in memory at once).
    `config_json` replaces the written config.json (exports to other architectures with the same tensors);
    the tensors are still checked against `config`. `extra_files` are copied in beside them (a licence, a
    SentencePiece model)."""
    _clean_stale(Path(out_dir).absolute())  # first: a previous copy put back is protected by the overwrite check
    out = check_output_dir(out_dir, overwrite)
    dtype = parse_dtype(dtype)
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    items = weights.items() if isinstance(weights, Mapping) else weights
    limit = _parse_size(max_shard_size)
    _mkdir(out.parent, out, parents=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    _mkdir(tmp, out)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        shard_files: list[str] = []
        weight_map: dict[str, str] = {}
        stored_dtype = None
        total = 0
        expected = expected_shapes(config)

        def flush() -> None:
            name = f"shard-{len(shard_files):05d}.safetensors"
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            shard_files.append(name)
            for n in shards[-1]:
                weight_map[n] = name
            shards[-1], sizes[-1] = {}, 0

        for name, t in items:
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name} for this config")
            if name in weight_map or name in shards[-1]:
                raise CheckpointError(f"duplicate tensor {name} in the weights to save")
            if tuple(t.shape) != expected[name]:
                raise CheckpointError(f"tensor {name}: shape {tuple(t.shape)}, config implies {expected[name]}")
            t = t.detach().to("cpu", dtype or t.dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger tensor (fused projections): safetensors wants its own storage
            stored_dtype = t.dtype
            nbytes = t.numel() * t.element_size()
            if shards[-1] and sizes[-1] + nbytes > limit:
                flush()
            shards[-1][name] = t
            sizes[-1] += nbytes
            total += nbytes
        missing = sorted(set(expected) - {n for s in shards for n in s} - set(weight_map))
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]} in the weights to save")
        if shards[-1]:
            flush()
        n = len(shard_files)
        if n == 1:
            os.replace(tmp / shard_files[0], tmp / SINGLE_FILE)
        else:
            final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(shard_files)}
            for f, g in final.items():
                os.replace(tmp / f, tmp / g)
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted((k, final[v]) for k, v in weight_map.items()))}
            write_text_atomic(tmp / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        if stored_dtype is not None:
            config = copy.deepcopy(config)  # the caller's config is left as it was
            config.torch_dtype = dtype_name(stored_dtype)
        if config_json is None:
            config.save_json(tmp / "config.json")
        else:
            write_text_atomic(tmp / "config.json", json.dumps({**config_json, "torch_dtype": config.torch_dtype},
                                                              indent=2) + "\n")
        gen = generation_config or {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        write_text_atomic(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (this one counts: a save running in another thread)."""
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) is no probe: it sends CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale(out: Path) -> None:
    """Deal with what saves to `out` killed midway left (their PID no longer a process): a `.NAME.partial-PID`
    folder is removed; a `.NAME.old-PID` one is the previous copy an overwrite moved aside before it was killed
    between its two renames, so it is put back as `out` when `out` is missing, else removed."""
    if not out.name:  # "." or "/": no name to match leftovers by
        return
    prefix = f".{out.name}."
    try:
        leftovers = sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
    except OSError:  # no parent folder yet, or unreadable: the save itself says what is wrong
        return
    for p in leftovers:
        kind, _, pid = p.name[len(prefix):].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not os.path.lexists(out):
            os.replace(p, out)
        else:
            _remove(p)


def _fsync_dir(path: Path) -> None:
    """Flush every file to disk and give them ordinary permissions (safetensors creates them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in path.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to its name; an existing folder is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_parent(out)  # the renames themselves reach the disk (a crash could otherwise undo them)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # overwrite=True over a plain file
            old.unlink(missing_ok=True)


def _fsync_parent(path: Path) -> None:
    """fsync the folder holding `path`, where the OS allows it (not on Windows, nor on some file systems)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

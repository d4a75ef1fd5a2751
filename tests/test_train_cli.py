"""`cpm4 data tokenize`, `cpm4 pretrain`, `cpm4 sft` end to end in subprocesses: a real (tiny) run with
InfLLM v2 and MTP, kill + resume with the identical loss curve, FSDP2 under torchrun, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cpm4(*args, env=None, check=True, timeout=300):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "cpm4.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    cpm4("init", "--config", "tiny", "--out", d / "base")
    import random
    rng = random.Random(0)
    words = "the model attention block sparse token kernel data train python function returns value".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 400))) + "." for _ in range(60)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cpm4("data", "tokenize", "-i", d / "docs.jsonl", "-o", d / "shards", "-t", d / "base", "-q")
    (d / "run.toml").write_text(f"""
[model]
init_from = "{d / 'base'}"
overrides = {{ num_mtp_layers = 1 }}
[data]
path = "{d / 'shards'}"
valid_path = "{d / 'shards'}"
seq_len = 320
[train]
steps = 6
batch_size = 2
grad_accum = 2
lr = 0.01
[schedule]
warmup_steps = 1
decay_steps = 2
[checkpoint]
every = 3
[log]
every = 1
eval_batches = 1
progress = false
tensorboard = false
""")
    return d


@pytest.mark.slow
def test_pretrain_resume_and_generate(setup):
    d = setup
    full = d / "full"
    p = cpm4("pretrain", "-c", d / "run.toml", "--set", f'checkpoint.dir="{full}"')
    assert "[cpm4] step 6/6  loss" in p.stdout  # one log line per logged step on stdout
    curve = losses(full)
    assert sorted(curve) == list(range(1, 7))
    assert curve[6] < curve[1] - 0.3  # it learns
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["mtp_loss"] > 0 and "valid_loss" in recs[-1]
    # Killed right after step 5 (the last checkpoint is step 3), then restarted: same curve, bit for bit.
    run = d / "killed"
    p = cpm4("pretrain", "-c", d / "run.toml", "--set", f'checkpoint.dir="{run}"',
             env={"CPM4_TRAIN_CRASH_AFTER_STEP": "5"}, check=False)
    assert p.returncode == 137
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    # A half-written checkpoint (no train_state.pt) is never resumed from.
    (run / "checkpoints" / "step-0000005").mkdir()
    p = cpm4("pretrain", "-c", d / "run.toml", "--set", f'checkpoint.dir="{run}"')
    assert "resumed" in p.stderr and "step 3" in p.stderr
    assert losses(run) == curve
    # The exported model is an ordinary checkpoint with the MTP head.
    cfg = json.loads((full / "model" / "config.json").read_text())
    assert cfg["num_mtp_layers"] == 1 and cfg["torch_dtype"] == "bfloat16"
    g = cpm4("generate", "--model", full / "model", "--max-tokens", "8", "--temperature", "0", "--no-stream",
             "the model")
    assert g.stdout.strip()


@pytest.mark.slow  # (≈ 40 s beside another worker: collected first, see conftest)
def test_sft_from_pretrained(setup):
    d = setup
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
             for a in range(6) for b in range(6)]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = d / "sft"
    cpm4("sft", "--set", f'model.init_from="{d / "base"}"', "--set", f'data.path="{d / "chat.jsonl"}"',
         "--set", "data.seq_len=128", "--set", "train.steps=8", "--set", "train.batch_size=4",
         "--set", "schedule.warmup_steps=1", "--set", "train.lr=0.01", "--set", f'checkpoint.dir="{run}"',
         "--set", "log.every=1", "--set", "log.progress=false", "--set", "log.tensorboard=false")
    curve = losses(run)
    assert curve[8] < curve[1]
    assert (run / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(setup):
    d = setup
    one, two = d / "one", d / "two"
    common = ["-c", d / "run.toml", "--set", "checkpoint.every=0", "--set", "train.steps=3",
              "--set", "log.eval_every=0", "--set", 'train.device="cpu"']
    cpm4("pretrain", *common, "--set", f'checkpoint.dir="{one}"', "--set", "train.batch_size=2")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "cpm4.cli", "pretrain", *map(str, common),
                        "--set", f'checkpoint.dir="{two}"', "--set", "train.batch_size=1"],
                       capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])


def test_train_cli_errors(setup, tmp_path):
    d = setup
    p = cpm4("pretrain", "-c", d / "run.toml", "--set", "train.lr=-1", check=False)
    assert p.returncode == 2 and "train.lr" in p.stderr
    p = cpm4("pretrain", "-c", d / "run.toml", "--set", f'data.path="{tmp_path}"', check=False)
    assert p.returncode == 2 and "index.json missing" in p.stderr
    p = cpm4("pretrain", "-c", tmp_path / "missing.toml", check=False)
    assert p.returncode == 2 and "missing.toml" in p.stderr
    p = cpm4("pretrain", "-c", d / "run.toml", "--print-config")
    assert json.loads(p.stdout)["model"]["overrides"] == {"num_mtp_layers": 1}
    p = cpm4("data", "tokenize", "-i", tmp_path / "none.txt", "-o", tmp_path / "o", "-t", d / "base", check=False)
    assert p.returncode == 2 and "none.txt" in p.stderr

"""Sizes said before allocating: a model whose weights cannot fit where they go (a mistyped width, the 8B on a
small GPU) is refused with both sizes instead of torch's allocation error (or, on the CPU, an allocation that
succeeds and is killed later)."""

import pytest
import torch

import cpm4.devices as devices
from cpm4.devices import InsufficientMemoryError, check_fits, free_bytes
from cpm4.model.checkpoint import load_checkpoint, weight_bytes
from cpm4.model.config import preset
from cpm4.model.init import create_checkpoint, init_model, random_model, random_weights
from cpm4.model.modeling import MiniCPM4ForCausalLM

HUGE = {"vocab_size": 2**36}  # tiny's width: 2**36 x 64 embeddings, 16 TiB in float32


@pytest.mark.parametrize("tie", [True, False])
def test_weight_bytes_counts_the_models_own_tensors(tie):
    config = preset("tiny", tie_word_embeddings=tie)
    model = MiniCPM4ForCausalLM(config)
    numel = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    assert weight_bytes(config, torch.float32) == 4 * numel
    assert weight_bytes(config, torch.bfloat16) == 2 * numel


def test_free_bytes_of_the_host():
    free = free_bytes("cpu")
    assert free is not None and 0 < free < 2**50
    assert free_bytes("cuda:0") is None or torch.cuda.is_available()
    check_fits(1, "cpu", "a byte")
    with pytest.raises(InsufficientMemoryError, match=r"needs 16384\.0 GiB but cpu has [\d.]+ GiB free"):
        check_fits(2**44, "cpu", "the thing")


def test_huge_model_refused_before_allocating(tmp_path):
    config = preset("tiny", **HUGE)
    with pytest.raises(InsufficientMemoryError, match="the model's weights needs .* GiB but cpu has"):
        random_model(config, "cpu", torch.float32)
    out = tmp_path / "ckpt"
    with pytest.raises(InsufficientMemoryError, match="the checkpoint needs .* GiB but the disk holding"):
        create_checkpoint(config, out)
    assert not out.exists()  # nothing written


def test_trainer_refuses_a_model_the_host_cannot_hold():
    from cpm4.train.trainer import _fresh_model

    with pytest.raises(InsufficientMemoryError, match="float32 weights needs"):
        _fresh_model(preset("tiny", **HUGE), 0)


def test_gpu_load_checks_free_memory_first(tiny_checkpoint, monkeypatch):
    """Checked against the GPU's free memory before a tensor is read (a stand-in free count here: the check runs
    before CUDA is touched, so this runs on the CPU too)."""
    monkeypatch.setattr(devices, "free_bytes", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match=r"the model's weights \(tiny\) needs .* but cuda has"):
        load_checkpoint(tiny_checkpoint, device="cuda", dtype="bfloat16")
    with pytest.raises(InsufficientMemoryError, match="cuda:0 has"):
        load_checkpoint(tiny_checkpoint, device="cuda:0")  # stored dtype: the files' sizes
    assert load_checkpoint(tiny_checkpoint, device="cpu") is not None  # the CPU maps the files: not checked


def test_init_model_fills_the_models_tensors_with_random_weights():
    config = preset("tiny")
    model = init_model(MiniCPM4ForCausalLM(config), seed=5)
    want = dict(random_weights(config, 5))
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.gpu
def test_gpu_free_memory_and_refusal(tiny_checkpoint):
    free, _ = torch.cuda.mem_get_info(0)
    assert abs(free_bytes("cuda:0") - free) < 2**30 and free_bytes("cuda") == free_bytes("cuda:0")
    before = torch.cuda.memory_allocated()
    with pytest.raises(InsufficientMemoryError, match="cuda has"):
        random_model(preset("tiny", vocab_size=2**40), "cuda", torch.bfloat16)  # 8 TiB of embeddings
    assert torch.cuda.memory_allocated() == before  # nothing allocated
    model = random_model(preset("tiny"), "cuda", torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    loaded = load_checkpoint(tiny_checkpoint, device="cuda", dtype="bfloat16")
    assert next(loaded.parameters()).is_cuda


"""Training on CUDA: InfLLM v2 gradients through the Triton kernels at the demo model's block shape, and a
short bf16 run of the trainer with sparse attention, document packing and MTP."""

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_sparse_gradients_demo_blocks(dtype):
    from test_infllm_v2_triton import check_pipeline

    from cpm4.model.config import SparseConfig

    cfg = SparseConfig(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=32, window_size=128, topk=6,
                       dense_len=512, variant="gen-b")
    check_pipeline(cfg, 1024, 1024, 6, 2, 64, dtype, "cuda", 2e-2, grad=True, ref_dtype=torch.float32)


def test_gpu_trainer_sparse_packed_mtp(tmp_path):
    from cpm4.model.tokenizer import build_tokenizer
    from cpm4.train.config import load_train_config
    from cpm4.train.data import tokenize_to_shards
    from cpm4.train.trainer import Trainer

    tok = build_tokenizer(1024)
    tok.save(tmp_path / "tok")
    import random
    rng = random.Random(0)
    words = "alpha beta gamma delta sparse block kernel token".split()
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 900)))}) + "\n"
        for _ in range(80)))
    tokenize_to_shards([tmp_path / "d.jsonl"], tok, tmp_path / "shards", progress=False)
    cfg = load_train_config(None, [
        'model.preset="tiny"', f'model.tokenizer="{tmp_path / "tok"}"', "model.overrides.num_mtp_layers=1",
        f'data.path="{tmp_path / "shards"}"', "data.seq_len=1024", "train.steps=12", "train.batch_size=4",
        "train.lr=0.01", "schedule.warmup_steps=2", f'checkpoint.dir="{tmp_path / "run"}"', "log.every=1",
        "log.progress=false", "log.tensorboard=false"])
    tr = Trainer(cfg)
    assert tr.device.type == "cuda" and tr.bf16
    hist = [r for r in tr.fit() if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    assert (tmp_path / "run" / "model" / "config.json").is_file()

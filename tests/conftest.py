import gc
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on the CPU; must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        sys.path.insert(0, os.path.dirname(__file__))
        import interpreter_speed

        interpreter_speed.install()

if os.environ.get("CPM4_POISON_EMPTY") == "1":  # reads of never-written memory show (tests/poison_empty.py)
    sys.path.insert(0, os.path.dirname(__file__))
    import poison_empty

    poison_empty.install()

# Keep CPU runs predictable on the 2-core CI machine: under pytest-xdist (`make test` runs 2 workers) a thread
# each, so the workers do not contend for the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    # The slowest tests (marked `slow`: 30-130 s each on the 2-core CI machine) first: under `make test`'s two
    # workers the run then ends on short tests, not on one worker finishing a two-minute test while the other waits.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unfreeze_after_test():
    """An engine's warm_up freezes the garbage collector's objects (as a server should); a test session keeps
    collecting them after each test so one test's models cannot outlive it in a frozen cycle."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(autouse=True)
def _eager_attention_after_test():
    """A test that compiles a model makes the paged attention an opaque custom op, and the sparse attention a
    dynamo-disabled call, for the rest of the process. Eager interpreter runs of later tests then took twice as
    long (the paged decode test: 22 s after a compiling test, 10 s alone), so each test restores the eager ones."""
    yield
    paged = sys.modules.get("cpm4.engine.paged")
    if paged is not None:
        paged.paged_attention = paged._paged_attention
    sparse = sys.modules.get("cpm4.kernels.infllm_v2")
    if sparse is not None and getattr(sparse.sparse_attention, "_cpm4_opaque", False):
        sparse.sparse_attention = sparse.sparse_attention.__wrapped__


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random `tiny` checkpoint folder (with tokenizer) shared by the tests that only read it."""
    from cpm4.model.init import create_checkpoint

    path = tmp_path_factory.mktemp("shared") / "tiny"
    create_checkpoint("tiny", path)
    return path


def random_model(name: str = "tiny", dtype=torch.float64, seed: int = 0, **overrides):
    """A preset model with µP random weights (norm weights perturbed so they matter), in `dtype`."""
    from cpm4.model import MiniCPM4ForCausalLM, preset
    from cpm4.model.init import init_model

    cfg = preset(name, **overrides)
    model = MiniCPM4ForCausalLM(cfg).to(dtype)
    init_model(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model.eval()


def alone_then_together(eng, prompts: list[list[int]], params) -> dict[str, list[int]]:
    """The engine's tokens for each prompt run alone (batch-1 decode steps: the paths one row takes), then for all
    of them together (ids a<i> and b<i>)."""
    res = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, params)
        res.update(eng.run_to_completion())
    for i, p in enumerate(prompts):
        eng.add_request(f"b{i}", p, params)
    res.update(eng.run_to_completion())
    return {k: v[1] for k, v in res.items()}

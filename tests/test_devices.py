"""Device names: what cpm4 accepts (cpu and CUDA, as torch spells them) and the errors for the rest."""

import pytest
import torch

from cpm4.devices import check_device_name, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cpu:0", "cuda", "cuda:0", "cuda:12"])
def test_names_accepted(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "xpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:0 ",
                                  "", None, 0, True])
def test_names_refused(name):
    with pytest.raises(ValueError, match=f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_resolve_device_without_and_with_cuda(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'mps'"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):  # a torch.device of a type cpm4 cannot run
        resolve_device(torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:1 requested but CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"cuda:2 requested but this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device(torch.device("cuda", 2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA device \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:1")


def test_llm_and_verify_refuse_a_bad_device_before_loading(tmp_path, monkeypatch):
    from cpm4 import LLM
    from cpm4.data.verify import VerifyConfig
    from cpm4.model import checkpoint

    def never(*a, **kw):
        raise AssertionError("weights read for a device that was refused")

    monkeypatch.setattr(checkpoint, "load_checkpoint", never)
    monkeypatch.setattr("cpm4.llm.load_checkpoint", never)
    from cpm4.cli import DEFAULT_MODEL

    with pytest.raises(ValueError, match="unknown device 'mps'"):
        LLM(DEFAULT_MODEL, device="mps")
    cfg = VerifyConfig(checkpoint=str(tmp_path), base=str(tmp_path), candidates={"c": str(tmp_path)},
                       eval_sets={"e": str(tmp_path)}, out=str(tmp_path / "o"), device="tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        cfg.validate()

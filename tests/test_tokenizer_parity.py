"""ONNX Runtime GenAI's tokenizer must give the transformers ids for the embedded model.

The embedded SmolLM2 tokenizer is converted from GGUF and corrected (engine.models:
no <|im_start|> prepended, eos <|im_end|>, no byte fallback). Here its files, copied
verbatim next to a tiny ONNX model (og.Tokenizer needs a model), are loaded by both
libraries and compared on ASCII, Unicode and chat-template text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

ASCII = ["Hello, world!", "  two  spaces,\ttab\nnew line\n\n", "x = [1, 2, 3]  # list\nprint(x[-1])", "a" * 300]
UNICODE = [
    "Ünïcödé: naïve café, Straße",
    "Ελληνικά, русский, العربية",
    "日本語のテキスト、中文，한국어",
    "emoji 🙂🚀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "zero\u200bwidth and nbsp\u00a0here",
]
CHAT = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. 🙂"},
        {"role": "user", "content": "Café?\nYes."},
    ],
]


@pytest.fixture(scope="module")
def og_dir(tiny_model_dir, embedded_dir, tmp_path_factory) -> Path:
    """A tiny ONNX model with the embedded model's tokenizer files, copied verbatim."""
    onnx_dir = export.build_onnx(tiny_model_dir, tmp_path_factory.mktemp("tok") / "onnx", "fp32")
    for name in TOKENIZER_FILES:
        (onnx_dir / name).unlink(missing_ok=True)
        if (embedded_dir / name).is_file():
            shutil.copy2(embedded_dir / name, onnx_dir / name)
    return onnx_dir


@pytest.fixture(scope="module")
def hf(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def og_tok(og_dir):
    import onnxruntime_genai as og

    return og.Tokenizer(og.Model(str(og_dir)))


def _hf_ids(hf, text):
    return list(hf(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "text", ASCII + UNICODE, ids=[f"ascii{i}" for i in range(len(ASCII))] + [f"unicode{i}" for i in range(len(UNICODE))]
)
def test_same_ids_on_ascii_and_unicode(text, hf, og_tok):
    ids = _hf_ids(hf, text)
    assert og_tok.encode(text).tolist() == ids
    assert -1 not in ids
    assert og_tok.decode(np.asarray(ids, dtype=np.int32)) == text == hf.decode(ids)


@pytest.mark.parametrize("messages", CHAT, ids=["one-turn", "multi-turn-system"])
def test_same_ids_and_text_on_chat_templates(messages, hf, og_tok, og_dir):
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert og_tok.encode(rendered).tolist() == _hf_ids(hf, rendered)
    template = (og_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert (
        og_tok.apply_chat_template(json.dumps(messages), template_str=template, add_generation_prompt=True) == rendered
    )


def test_embedded_tokenizer_is_the_corrected_one(hf, og_tok):
    im_start, im_end = hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("<|im_end|>")
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == im_end == 2
    assert hf.pad_token_id == im_end and hf.bos_token is None
    for ids in (_hf_ids(hf, "Hi"), list(hf("Hi")["input_ids"]), og_tok.encode("Hi").tolist()):
        assert im_start not in ids  # nothing prepended
    rendered = hf.apply_chat_template(CHAT[0], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert rendered[0] == im_start and rendered[1] != im_start  # a single start token, not a doubled one
    assert og_tok.encode("<|im_end|>").tolist() == [im_end] and 2 in og_tok.eos_token_ids


def test_parity_check_passes_and_catches_a_broken_tokenizer(og_dir, embedded_dir, tmp_path):
    result = export.check_tokenizer_parity(og_dir, embedded_dir)
    assert result["identical"] and result["texts"] >= len(export.TOKENIZER_TEXTS) and not result["mismatches"]

    broken = tmp_path / "broken"
    shutil.copytree(og_dir, broken)
    tokenizer = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    vocab["Hello"], vocab["ĠHello"] = vocab["ĠHello"], vocab["Hello"]  # swap two ids
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    result = export.check_tokenizer_parity(broken, embedded_dir)
    assert not result["identical"]
    first = result["mismatches"][0]
    assert first["text"].startswith("Hello") and first["position"] == 0

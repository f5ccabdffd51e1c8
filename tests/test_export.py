"""Export: merge an adapter, build ONNX with onnxruntime-genai, and the parity report.

All on the tiny model (2 layers, hidden 64, the embedded tokenizer): a LoRA run whose
adapter has random weights, and a full fine-tune run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import CHATS, chat_base, make_adapter_run, make_full_run, shared_adapter_run

from engine import export
from engine.inference import (
    GenerationSettings,
    OnnxChatModel,
    Target,
    build_chat_model,
    normalize_messages,
)

PROMPTS = [
    [{"role": "user", "content": CHATS[0][0]}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": CHATS[1][0]}],
    [{"role": "user", "content": "Tell me something about the sea, please."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Naïve café — 日本語 🙂?"},
    ],
]


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory) -> Path:
    return shared_adapter_run(tmp_path_factory.getbasetemp(), base_dir)


@pytest.fixture(scope="module")
def onnx_fp32(lora_run) -> Path:
    return export.export_onnx(lora_run, "fp32")


def _tuned(run: Path):
    cfg_base = export.run_source(run)["base"]
    return build_chat_model(Target("tuned", "adapter", model_dir=cfg_base, adapter_dir=run / "adapter"))


def _plain(model_dir: Path):
    return build_chat_model(Target("base", "plain", model_dir=model_dir))


def _ids(model, messages) -> list[int]:
    return model.encode_prompt(normalize_messages(messages))


def test_merged_logits_match_unmerged_adapter(lora_run, base_dir):
    merged_dir = export.merge(lora_run)
    tuned, merged, base = _tuned(lora_run), _plain(merged_dir), _plain(base_dir)
    assert not hasattr(merged.model, "peft_config")
    for messages in PROMPTS:
        ids = _ids(tuned, messages) + [tuned.tokenizer.convert_tokens_to_ids("Hello")]
        a, b = tuned.logits(ids), merged.logits(ids)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        # the adapter is not a no-op, so the comparison above means something
        assert (base.logits(ids) - a).abs().max() > 1e-2


def test_merged_dir_is_a_standard_transformers_directory(lora_run):
    merged_dir = export.merge(lora_run)
    names = {p.name for p in merged_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    } <= names
    assert "adapter_config.json" not in names
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    # the adapter's training template, without its {% generation %} markers, renders as before
    template = (merged_dir / "chat_template.jinja").read_text()
    assert "{% generation" not in template and "{%- generation" not in template
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoTokenizer.from_pretrained(export.run_source(lora_run)["base"])
    for messages in PROMPTS:  # the merged model renders chats as its base model does
        assert tokenizer.apply_chat_template(messages, tokenize=False) == base.apply_chat_template(
            messages, tokenize=False
        )
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert 2 in (eos if isinstance(eos, list) else [eos])  # <|im_end|>


def test_merge_is_reused_until_the_adapter_changes(lora_run):
    first = export.merge(lora_run)
    stamp = (first / export.STAMP).read_text()
    assert (export.merge(lora_run) / export.STAMP).read_text() == stamp
    messages = []
    export.merge(lora_run, force=True, progress=messages.append)
    assert any("Merging" in m for m in messages)


def test_onnx_fp32_greedy_equals_pytorch_greedy(lora_run, onnx_fp32):
    tuned = _tuned(lora_run)
    onnx = OnnxChatModel(onnx_fp32)
    settings = GenerationSettings(greedy=True, max_new_tokens=24)
    outputs = set()
    for messages in PROMPTS:
        assert onnx.encode_prompt(normalize_messages(messages)) == _ids(tuned, messages)
        text_pt, stats_pt = tuned.complete(messages, settings)
        text_ox, stats_ox = onnx.complete(messages, settings)
        assert stats_ox.token_ids == stats_pt.token_ids
        assert text_ox == text_pt
        assert stats_ox.finish_reason == stats_pt.finish_reason
        outputs.add(tuple(stats_pt.token_ids))
    assert len(outputs) > 1  # different prompts, different answers: not a degenerate model


def test_onnx_export_is_self_contained(onnx_fp32):
    names = {p.name for p in onnx_fp32.iterdir()}
    assert {
        "model.onnx",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    config = json.loads((onnx_fp32 / "genai_config.json").read_text())
    eos = config["model"]["eos_token_id"]
    assert 2 in (eos if isinstance(eos, list) else [eos])
    stamp = json.loads((onnx_fp32 / export.STAMP).read_text())
    assert stamp["precision"] == "fp32" and stamp["execution_provider"] == "cpu"
    assert not list(onnx_fp32.parent.glob("*.tmp-*")), "temporary build directories are cleaned up"


def test_int4_export_and_parity_report(lora_run, onnx_fp32):
    messages = []
    int4 = export.export_onnx(lora_run, "int4", progress=messages.append)
    assert any("Building ONNX int4" in m for m in messages)
    assert any("GroupQueryAttention" in m or "Reading" in m for m in messages), "builder output is streamed"
    report = export.write_parity_report(lora_run, new_tokens=16, speed_tokens=8)
    assert report["merge"]["passed"] and report["merge"]["max_abs_logit_diff"] < 1e-4
    assert report["onnx"]["fp32"]["greedy_all_identical"]
    assert report["onnx"]["fp32"]["token_agreement"] == 1.0
    assert (
        abs(report["onnx"]["fp32"]["perplexity"]["difference"]) < 1e-2 * report["onnx"]["fp32"]["perplexity"]["pytorch"]
    )
    assert 0.0 <= report["onnx"]["int4"]["token_agreement"] <= 1.0
    assert report["tokenizer"]["int4"]["identical"] and report["tokenizer"]["fp32"]["identical"]
    sizes = report["sizes_bytes"]
    assert sizes["onnx-int4"] < sizes["onnx-fp32"]
    for name in ("pytorch_adapter", "pytorch_merged", "onnx_fp32", "onnx_int4"):
        assert report["speed"][name]["decode_tokens_per_s"] > 0
    saved = json.loads((lora_run / "export" / "parity.json").read_text())
    assert saved["onnx"].keys() == report["onnx"].keys()
    markdown = (lora_run / "export" / "parity.md").read_text()
    assert "onnx-int4" in markdown and "onnx-fp32" in markdown and "max |logit diff|" in markdown
    assert OnnxChatModel(int4).complete(PROMPTS[0], GenerationSettings(greedy=True, max_new_tokens=8))[1].new_tokens > 0


def test_qlora_and_dora_adapters_merge_into_full_precision_weights(base_dir, tmp_path):
    for method in ("qlora", "dora"):
        run = make_adapter_run(tmp_path, base_dir, name=f"{method}-run", method=method, seed=1)
        merged_dir = export.merge(run)
        tuned, merged = _tuned(run), _plain(merged_dir)
        assert all(p.dtype == torch.float32 for p in merged.model.parameters())
        assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
        ids = _ids(tuned, PROMPTS[2])
        torch.testing.assert_close(merged.logits(ids), tuned.logits(ids), atol=1e-4, rtol=1e-4)
        assert json.loads((merged_dir / export.STAMP).read_text())["method"] == method


def test_full_finetune_run_is_resaved_and_reported(base_dir, tmp_path):
    run = make_full_run(tmp_path, base_dir, base_dir)
    merged_dir = export.merge(run)
    ids = list(range(10, 40))
    torch.testing.assert_close(_plain(merged_dir).logits(ids), _plain(run / "model").logits(ids))
    report = export.write_parity_report(run, new_tokens=8, speed_tokens=4)
    assert "note" in report["merge"] and "pytorch_adapter" not in report["speed"]
    assert report["onnx"] == {} and report["speed"]["pytorch_merged"]["tokens"] == 4


def test_run_without_weights_is_refused_with_a_clear_message(base_dir, tmp_path):
    run = make_full_run(tmp_path, base_dir, base_dir, name="empty")
    import shutil

    shutil.rmtree(run / "model")
    with pytest.raises(export.ExportError, match="no adapter/adapter_config.json nor model/config.json"):
        export.merge(run)
    with pytest.raises(export.ExportError, match="not a run directory"):
        export.merge(tmp_path / "nowhere")


def _fake_builder(script: str):
    """A stand-in for the builder's command line: a short Python script (fast to start)."""
    import sys

    return lambda *args, **kwargs: [sys.executable, "-c", script]


def test_builder_failure_raises_with_the_log_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(
        export,
        "builder_command",
        _fake_builder("import sys; print('Reading layer 0'); sys.exit('KeyError: no such architecture')"),
    )
    lines = []
    with pytest.raises(export.ExportError, match="model builder .onnxruntime-genai [0-9.]+. could not export") as info:
        export.build_onnx(tmp_path, tmp_path / "out", "fp32", progress=lines.append)
    assert "KeyError: no such architecture" in str(info.value) and str(tmp_path / "out.log") in str(info.value)
    assert "Reading layer 0" in lines
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert "no such architecture" in (tmp_path / "out.log").read_text()


def test_stopping_an_export_ends_the_builder(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(
        export, "builder_command", _fake_builder("import time\nprint('started', flush=True)\ntime.sleep(60)")
    )
    stop = threading.Event()

    def progress(line):
        if line == "started":
            stop.set()

    with pytest.raises(export.ExportError, match="export stopped"):
        export.build_onnx(tmp_path, tmp_path / "out", "int4", progress=progress, stop=stop)
    assert not (tmp_path / "out").exists()


def _cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tunelab export")
    export.add_cli_arguments(parser)
    return export.run_cli(parser.parse_args(argv))


def test_export_cli(lora_run, capsys):
    assert _cli([str(lora_run), "--format", "merged", "--no-report", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(lora_run / "export" / "merged")
    assert _cli([str(lora_run / "missing"), "--format", "merged"]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_perplexity_uses_the_validation_split_when_the_run_has_one(base_dir, tmp_path):
    from engine.config import RunConfig

    data = tmp_path / "chats.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(8):
            question, answer = CHATS[i % len(CHATS)]
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{question} ({i})"},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    run = make_adapter_run(tmp_path, base_dir, name="with-data", seed=2)
    cfg = RunConfig.load(run / "config.yaml").with_overrides([f"data.path={data}", "data.validation_split=0.5"])
    cfg.save(run / "config.yaml")
    export.merge(run)
    report = export.write_parity_report(run, new_tokens=4, speed_tokens=2)
    assert report["perplexity"]["source"] == "validation split (4 chats)"
    assert report["perplexity"]["pytorch_merged"] > 1.0 and report["perplexity"]["answer_tokens"] > 10

    (run / "config.yaml").write_text(
        RunConfig.load(run / "config.yaml").with_overrides(["data.validation_split=0"]).to_yaml()
    )
    report = export.write_parity_report(run, new_tokens=4, speed_tokens=2)
    assert report["perplexity"]["source"].startswith("probe prompts")

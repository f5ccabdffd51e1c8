"""Other architectures end to end: a tiny model of each family (built from a config, with
the embedded tokenizer plus the family's own markers as single tokens, and the family's
real chat template) trains a LoRA adapter on the right modules, merges, exports to ONNX
with onnxruntime-genai's builder, and answers: PyTorch greedy equals ``generate()``, ONNX
fp32 greedy equals the merged PyTorch model for 16 tokens, and int4 builds and decodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine import export, runs, templates, train
from engine.config import RunConfig
from engine.inference import GenerationSettings, OnnxChatModel, Target, build_chat_model, normalize_messages

TRL_TEMPLATES = Path(__import__("trl").__file__).resolve().parent / "chat_templates"
# Mistral's template is not among TRL's: this is the [INST] form of Mistral 7B Instruct v0.3
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# family -> (config class name, template (a TRL file name or the text), bos, LoRA targets)
FAMILIES = {
    "llama": ("LlamaConfig", "llama3_2", "<|begin_of_text|>", ATTENTION_MLP),
    "qwen2": ("Qwen2Config", "qwen2_5", None, ATTENTION_MLP),
    "qwen3": ("Qwen3Config", "qwen3", None, ATTENTION_MLP),
    "phi3": ("Phi3Config", "phi3", None, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused
    "gemma3": ("Gemma3TextConfig", "gemma3", "<bos>", ATTENTION_MLP),
    "mistral": ("MistralConfig", MISTRAL, "<s>", ATTENTION_MLP),
}
# Families the installed ONNX builder cannot export, and the error it gives (the export must
# say so in a sentence; when a new onnxruntime-genai exports one, this test fails: drop it here)
ONNX_REFUSES = {
    # onnxruntime-genai 0.18 reads rope_parameters["rope_type"]; transformers 5 keeps Gemma 3's
    # rope parameters per layer type (full and sliding attention)
    "gemma3": "KeyError: 'rope_type'",
}
CHATS = [
    [{"role": "user", "content": f"Say a colour ({i})."}, {"role": "assistant", "content": "Teal, always teal."}]
    for i in range(8)
]
PROMPT = [{"role": "user", "content": "Name a colour."}]
_MARKER = re.compile(r"<[^<>\s'\"{}()]{2,40}>|\[/?INST\]")


def _family_model(name: str, root: Path, embedded_dir: Path) -> Path:
    """A tiny random model of the family, its tokenizer and its template, saved in ``root``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_name, template, bos, _ = FAMILIES[name]
    template = template if "{" in template else (TRL_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    markers = sorted(set(_MARKER.findall(template)) | ({"</s>"} if name == "mistral" else set()))
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    tokenizer.chat_template = template
    end = templates.turn_end_marker(tokenizer, template) or tokenizer.eos_token
    tokenizer.add_special_tokens({"eos_token": end, "pad_token": end})
    eos_id = tokenizer.convert_tokens_to_ids(end)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    extra = {
        "Phi3Config": {"original_max_position_embeddings": 256},
        "Gemma3TextConfig": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
        "Qwen3Config": {"head_dim": 16},
    }.get(config_name, {})
    config = getattr(transformers, config_name)(**sizes, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory, embedded_dir):
    """(family, its trained LoRA run directory)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"family-{name}")
    model_dir = _family_model(name, root, embedded_dir)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS), encoding="utf-8")
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data), "max_length": 64, "validation_split": 0.0},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "max_steps": 4,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "logging_steps": 1,
                "save_steps": 1000,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
                "precision": "fp32",
            },
            "output": {"runs_dir": str(root / "runs")},
        }
    )
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    assert summary["state"] == "completed", summary
    return name, run_dir


def _greedy_ids(chat, tokens: int = 16) -> list[int]:
    settings = GenerationSettings(greedy=True, max_new_tokens=tokens, min_new_tokens=tokens)
    return chat.complete(PROMPT, settings)[1].token_ids


def test_a_family_trains_merges_exports_and_answers_alike(family_run):
    name, run_dir = family_run
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == FAMILIES[name][3], name
    source = export.run_source(run_dir)
    tuned = build_chat_model(Target("tuned", "adapter", model_dir=source["base"], adapter_dir=run_dir / "adapter"))
    # PyTorch greedy (the chat loop: speculative where the architecture allows) equals generate()
    prompt = tuned.encode_prompt(normalize_messages(PROMPT))
    with torch.inference_mode():
        out = tuned.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            eos_token_id=sorted(tuned.stop_ids),
            pad_token_id=min(tuned.stop_ids),
        )
    assert _greedy_ids(tuned) == out[0, len(prompt) :].tolist(), name
    merged = build_chat_model(Target("tuned", "merged", model_dir=export.merge(run_dir)))
    reference = _greedy_ids(merged)
    assert reference == _greedy_ids(tuned), name
    if name in ONNX_REFUSES:
        with pytest.raises(export.ExportError) as refused:
            export.export_onnx(run_dir, "fp32")
        message = str(refused.value)
        assert "could not export Gemma3ForCausalLM" in message and ONNX_REFUSES[name] in message, message
        assert "Traceback" not in message and "PyTorch columns" in message
        return
    fp32 = OnnxChatModel(export.export_onnx(run_dir, "fp32"))
    assert fp32.encode_prompt(normalize_messages(PROMPT)) == prompt, name
    assert _greedy_ids(fp32) == reference, name
    int4 = OnnxChatModel(export.export_onnx(run_dir, "int4"))
    assert len(_greedy_ids(int4)) == 16, name


def test_the_export_names_an_architecture_the_builder_does_not_take(tmp_path):
    """A family onnxruntime-genai's builder has no recipe for gets a sentence, not a traceback."""
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(export.ExportError, match="GPT2LMHeadModel.*not one the ONNX model builder.*LlamaForCausalLM"):
        export.build_onnx(model_dir, tmp_path / "out", "fp32")
    assert "LlamaForCausalLM" in export.builder_architectures() and "Phi3ForCausalLM" in export.builder_architectures()


def test_each_family_renders_its_own_template(tmp_path, embedded_dir):
    """The family tokenizers hold their markers as single tokens (so each end-of-turn is one)."""
    for name in FAMILIES:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_family_model(name, tmp_path, embedded_dir))
        end = tokenizer.eos_token
        assert len(tokenizer(end, add_special_tokens=False)["input_ids"]) == 1, name
        ids, mask = templates.training_example(CHATS[0], tokenizer, tokenizer.chat_template)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert trained.endswith(end) and "Teal, always teal." in trained, (name, trained)

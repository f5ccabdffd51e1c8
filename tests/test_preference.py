"""Preference stages (DPO, KTO, ORPO/SimPO) on the tiny model, in this process: DPO raises the
reward margin and the chosen-over-rejected log-probability gap, KTO and ORPO write their
metrics, an SFT run's adapter is continued (and the wrong ones refused with a sentence)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import hub, runs, templates, train
from engine.config import ConfigError, RunConfig

PAIRS = [{"prompt": f"Word {i}?", "chosen": "Zebra.", "rejected": "Lion, perhaps."} for i in range(12)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pref_config(model_dir: Path, data_path: Path, runs_dir: Path, **sections) -> RunConfig:
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_path), "max_length": 48, "validation_split": 0.25},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "stage": "dpo",
            "max_steps": 2,
            "batch_size": 3,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 50,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "precision": "fp32",
        },
        "output": {"runs_dir": str(runs_dir)},
    }
    for section, values in sections.items():
        base[section].update(values)
    return RunConfig.from_dict(base)


def answer_logps(model, pairs, tokenizer) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) of each pair, summed over the answer tokens."""
    import torch

    template = templates.inference_template(templates.model_template(tokenizer)[0])
    out = []
    with torch.no_grad():
        for pair in pairs:
            scores = []
            for side in ("chosen", "rejected"):
                prompt = [{"role": "user", "content": pair["prompt"]}]
                answer = [{"role": "assistant", "content": pair[side]}]
                p, a = templates.preference_example(prompt, answer, tokenizer, template)
                ids = torch.tensor([p + a])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                targets = ids[0, 1:]
                token_logps = logp.gather(-1, targets[:, None])[:, 0][len(p) - 1 :]
                scores.append(float(token_logps.sum()))
            out.append(tuple(scores))
    return out


def test_dpo_raises_the_margin_and_the_chosen_over_rejected_gap(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pref_config(tiny_model_dir, data, tmp_path / "runs", training={"max_steps": 6})
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    assert summary["state"] == "completed" and summary["stage"] == "dpo"
    assert summary["reference"] == "the base model with the adapter switched off"
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["rewards_margins"] > rows[0]["rewards_margins"]
    assert rows[-1]["tokens"] > 0 and rows[-1]["tokens_per_second"] > 0
    evaluation = json.loads((run_dir / runs.EVAL_FILE).read_text())
    assert evaluation["stage"] == "dpo" and evaluation["loss_type"] == "sigmoid"
    assert evaluation["tuned"]["rewards_margins"] > 0  # held out: the 3 validation pairs
    assert runs.read_json(run_dir / runs.DATA_FILE)["stage"] == "dpo"
    assert not (run_dir / "adapter" / "ref").exists()  # the reference copy is not saved
    card = hub.model_card(run_dir)
    assert "- stage: DPO (TRL), loss sigmoid, beta 0.1; reference: the base model with the adapter" in card
    assert "| stage | DPO on preference data (prompt, chosen and rejected answers) |" in card
    assert "| rewards_margins |" in card and "- dpo\n" in card  # a tag

    # On its pairs (9 trained on, 3 held out), the tuned model prefers chosen over rejected by more than the base does.
    model = summary["trainer"].accelerator.unwrap_model(summary["trainer"].model).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    tuned = answer_logps(model, PAIRS, tokenizer)
    with model.disable_adapter():
        base = answer_logps(model, PAIRS, tokenizer)
    gap = lambda scores: sum(c - r for c, r in scores) / len(scores)  # noqa: E731
    assert gap(tuned) > gap(base) + 0.1
    assert sum(c for c, _ in tuned) > sum(c for c, _ in base)  # sigmoid DPO also lifted the chosen answers here


@pytest.mark.parametrize(
    ("stage", "loss", "keys"),
    [
        ("kto", "auto", ("rewards_chosen", "rewards_rejected", "kl")),
        ("orpo", "auto", ("rewards_margins", "rewards_accuracies", "log_odds_ratio", "nll_loss")),
        ("orpo", "simpo", ("rewards_margins", "rewards_accuracies")),
    ],
)
def test_kto_and_orpo_complete_and_write_their_metrics(stage, loss, keys, tiny_model_dir, tmp_path):
    if stage == "kto":  # unpaired records: one answer each, desirable or not
        rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS[:6]]
        rows += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in PAIRS[6:]]
        data = write_jsonl(tmp_path / "kto.jsonl", rows)
    else:
        data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pref_config(tiny_model_dir, data, tmp_path / "runs", training={"stage": stage, "loss_type": loss})
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    assert summary["state"] == "completed"
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in keys:
        assert isinstance(rows[-1][key], float), key
    assert rows[-1]["tokens"] > 0
    evaluation = json.loads((run_dir / runs.EVAL_FILE).read_text())
    assert evaluation["stage"] == stage and evaluation["loss_type"] == config.loss_type
    # held out (KTO logs the reward of a side only when the batch holds an answer of it)
    assert isinstance(evaluation["tuned"]["loss"], float) and isinstance(evaluation["tuned"][keys[-1]], float)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_label_positions_head_equals_trls_fused_head(tiny_model_dir):
    """The CPU head projects only the labelled positions; values and gradients are TRL's."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(theirs, outputs=outputs)
    add_fused_lm_head(ours, outputs=outputs)
    assert train.use_label_positions_head(ours)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 20))
    attention = torch.ones_like(ids)
    attention[2:, 15:] = 0  # padded rows
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :8] = -100  # the prompts
    results = []
    for model in (theirs, ours):
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() * 0.5).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    for name in ("loss", "log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-4), name
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


def _completed(run_dir: Path, state: str = "completed") -> Path:
    runs.update_status(run_dir, state=state)
    return run_dir


class FirstWeights(train.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_dpo_continues_an_sft_adapter_and_refuses_the_wrong_ones(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from tiny_runs import make_adapter_run, make_full_run

    runs_dir = tmp_path / "runs"
    sft = _completed(make_adapter_run(runs_dir, tiny_model_dir, name="sft-run", scale=0.05))
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pref_config(
        tiny_model_dir,
        data,
        runs_dir,
        model={"adapter": "sft-run"},
        training={"max_steps": 1},
        data={"validation_split": 0},
    )
    seen = FirstWeights()
    summary = train.train(config, runs.create_run(config), callbacks=[seen])
    assert summary["start_adapter"] == str(sft / "adapter")
    assert summary["reference"].startswith("the adapter of sft-run")
    saved = load_file(sft / "adapter" / "adapter_model.safetensors")
    start = {n.replace(".default", ""): w for n, w in seen.weights.items() if ".default." in n}
    assert saved and set(saved) == set(start)
    for name, weight in saved.items():
        assert bool((start[name] == weight).all()), name  # training started from the SFT adapter's weights

    model_dir = Path(summary["model_dir"])
    # an unfinished run
    running = _completed(make_adapter_run(runs_dir, tiny_model_dir, name="running-run"), state="running")
    with pytest.raises(ConfigError, match="running-run is running, not completed"):
        train.start_adapter(config.with_values({"model.adapter": str(running)}), model_dir)
    # a full fine-tune
    full = _completed(make_full_run(runs_dir, tiny_model_dir, tiny_model_dir, name="full-run"))
    with pytest.raises(ConfigError, match="full-run is a full fine-tune"):
        train.start_adapter(config.with_values({"model.adapter": str(full)}), model_dir)
    # another base
    other_base = shutil.copytree(tiny_model_dir, tmp_path / "other-base")
    other = _completed(make_adapter_run(runs_dir, other_base, name="other-run"))
    with pytest.raises(ConfigError, match="other-run was trained on .*other-base, not on"):
        train.start_adapter(config.with_values({"model.adapter": str(other)}), model_dir)
    # method full cannot continue an adapter
    with pytest.raises(ConfigError, match="method full"):
        train.start_adapter(config.with_values({"method.name": "full"}), model_dir)


@pytest.mark.integration
def test_dpo_on_the_public_demo_pairs_through_the_cli(shared_datasets, embedded_dir, tmp_path):
    """dpo_en_demo.json (ShareGPT conversations + chosen + rejected) trains 3 DPO steps on the
    embedded model at max length 512, batch 2, through `tunelab train` and the example config."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "train",
        "--config",
        str(repo / "assets/configs/cpu-dpo.yaml"),
        "--set",
        f"data.path={shared_datasets / 'dpo_en_demo.json'}",
        "--set",
        "data.validation_split=0",
        "--set",
        "training.max_steps=3",
        "--set",
        "training.batch_size=2",
        "--set",
        f"output.runs_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["stage"] == "dpo"
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r["rewards_margins"], float) and r["tokens"] > 0 for r in rows)
    data = runs.read_json(run_dir / runs.DATA_FILE)
    assert data["format"] == "preference" and data["usable"] == 300 and data["stage"] == "dpo"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    print(
        f"\nembedded DPO on dpo_en_demo: {rows[-1]['elapsed_s']} s for 3 steps, "
        f"tokens/s {[r['tokens_per_second'] for r in rows]}, memory peak {rows[-1]['memory_peak_mb']} MB"
    )


def test_a_dpo_run_resumes_and_its_adapter_loads_alone(tiny_model_dir, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pref_config(
        tiny_model_dir, data, tmp_path / "runs", data={"validation_split": 0}, training={"save_steps": 2}
    )
    run_dir = runs.create_run(config)
    train.train(config, run_dir)
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    summary = train.train(config.with_overrides(["training.resume=true", "training.max_steps=3"]), run_dir)
    assert summary["global_step"] == 3
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and isinstance(rows[-1]["rewards_margins"], float)
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter")
    assert list(model.peft_config) == ["default"]  # the reference copy is not in the result
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_padding_free_rows_give_the_padded_batchs_log_probabilities(tiny_model_dir):
    """DPO's padded batches run as one padding-free row (engine.train.pack_rows, attention per
    sequence): each sequence's answer log-probability and every gradient equal the padded
    batch's under TRL's head, and calls without packed rows are transformers' sdpa unchanged."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    padded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for model in (padded, packed):
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    assert train.use_label_positions_head(packed)
    assert packed.config._attn_implementation == train.PACKED_ATTENTION
    rows = []
    packed.model.register_forward_pre_hook(lambda m, a, kw: rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True)

    torch.manual_seed(0)
    lengths = torch.tensor([21, 9, 16, 30])  # chosen and rejected answers of 2 pairs, right-padded as TRL does
    ids = torch.randint(0, 1000, (4, 30))
    attention = (torch.arange(30)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :6] = -100  # the prompts
    sums = []
    for model in (padded, packed):
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        per_sequence = out.log_probs.sum(1)
        per_sequence.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sums.append((per_sequence.detach(), out.entropy.detach(), grads))
    assert rows == [(1, int(lengths.sum()))]  # one row, no padding
    (logps_a, entropy_a, grads_a), (logps_b, entropy_b, grads_b) = sums
    torch.testing.assert_close(logps_b, logps_a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy_b, entropy_a, atol=1e-4, rtol=1e-4)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)

    # Without labels (evaluation, generation) the model is transformers' sdpa, padding mask and all.
    with torch.no_grad():
        for kwargs in ({"attention_mask": attention}, {}):
            torch.testing.assert_close(packed(input_ids=ids, **kwargs).logits, padded(input_ids=ids, **kwargs).logits)
    # A left-padded batch is not packed, and still right.
    left = attention.flip(1)
    with torch.no_grad():
        a = padded(input_ids=ids, attention_mask=left, labels=labels.flip(1), fused_lm_head=True).log_probs
        b = packed(input_ids=ids, attention_mask=left, labels=labels.flip(1), fused_lm_head=True).log_probs
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(rows) == 4 and rows[-1] == (4, 30)


def test_a_finished_dpo_run_exports_answers_and_stages_its_card(tiny_model_dir, tmp_path):
    """A DPO run goes through the rest of the app as an SFT run does: merge and ONNX export,
    the playground's inference path (PyTorch adapter and ONNX, the same greedy answer), and the
    push's staged folder, whose model card names the stage and its data."""
    from engine import export
    from engine.inference import GenerationSettings, OnnxChatModel, load_chat_model, unload_all

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pref_config(tiny_model_dir, data, tmp_path / "runs", data={"validation_split": 0})
    run_dir = runs.create_run(config)
    assert train.train(config, run_dir)["state"] == "completed"

    merged = export.merge(run_dir)
    assert (merged / "config.json").is_file()
    onnx_dir = export.export_onnx(run_dir, "fp32")
    settings = GenerationSettings(greedy=True, max_new_tokens=8)
    messages = [{"role": "user", "content": PAIRS[0]["prompt"]}]
    try:
        tuned = load_chat_model(run_dir, "tuned")
        text_pt, stats_pt = tuned.complete(messages, settings)
        text_ox, stats_ox = OnnxChatModel(onnx_dir).complete(messages, settings)
    finally:
        unload_all()
    assert stats_pt.token_ids and stats_ox.token_ids == stats_pt.token_ids and text_ox == text_pt

    files = hub.stage_upload(run_dir, "adapter", "my-org/tiny-dpo", tmp_path / "staged")
    assert "README.md" in files and "adapter_model.safetensors" in files
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "- stage: DPO (TRL), loss sigmoid, beta 0.1" in card
    assert "| stage | DPO on preference data (prompt, chosen and rejected answers) |" in card
    assert "pairs.jsonl" in card and "- dpo\n" in card

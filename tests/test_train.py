"""engine.train on the tiny model, in this process: every method learns, adapters move and
bases do not, the loss falls on exactly the assistant tokens, the run directory is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine import runs, train
from engine.config import RunConfig

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    return path


def one_word_data(path: Path, n: int = 16) -> Path:
    return write_jsonl(
        path,
        [
            [
                {"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": f"Word {i}?"},
                {"role": "assistant", "content": "Zebra."},
            ]
            for i in range(n)
        ],
    )


def tiny_config(model_dir: Path, data_path: Path, runs_dir: Path, **sections) -> RunConfig:
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_path), "max_length": 48, "validation_split": 0.25},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "max_steps": 20,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "eval_steps": 10,
            "save_steps": 10,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "precision": "fp32",
        },
        "output": {"runs_dir": str(runs_dir)},
    }
    for section, values in sections.items():
        base[section].update(values)
    return RunConfig.from_dict(base)


class Snapshot(train.TrainerCallback):
    """Copies every parameter when training begins, and the output of each 4-bit layer on
    a fixed input (bitsandbytes repacks 4-bit weights for its CPU kernel, so their bytes
    change layout while their values do not)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters() if not _is_4bit(p)}
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self.quantized_out = self.quantized_outputs(model)

    @staticmethod
    def quantized_outputs(model) -> dict:
        import bitsandbytes as bnb
        import torch

        outputs = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
                    mode = module.training
                    module.eval()  # the CPU kernel differs between training and inference
                    module(x)  # the first call may repack the weight
                    outputs[name] = module(x)
                    module.train(mode)
        return outputs


def _is_4bit(param) -> bool:
    return type(param).__name__ == "Params4bit"


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "full"])
def test_method_learns_and_touches_only_what_it_should(method, tiny_model_dir, tmp_path):
    data = one_word_data(tmp_path / "data.jsonl")
    lr = 1e-3 if method == "full" else 1e-2
    config = tiny_config(
        tiny_model_dir, data, tmp_path / "runs", method={"name": method}, training={"learning_rate": lr}
    )
    run_dir = runs.create_run(config)
    snap = Snapshot()
    summary = train.train(config, run_dir, callbacks=[snap])
    assert summary["state"] == "completed"
    assert summary["global_step"] == 20

    # The loss falls (a few dozen steps on a task a tiny model can learn).
    losses = [row["loss"] for row in runs.read_metrics(run_dir) if "loss" in row]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"]
    assert evaluation["tuned"]["perplexity"] == pytest.approx(math.exp(evaluation["tuned"]["loss"]), rel=1e-3)

    model = summary["trainer"].model
    after = {name: p for name, p in model.named_parameters() if not _is_4bit(p)}
    moved = {n for n in snap.before if not _same(snap.before[n], after[n])}
    if method == "full":
        assert not (run_dir / "adapter").exists() and (run_dir / "model" / "config.json").is_file()
        assert moved == snap.trainable and len(moved) == len(snap.before)
        return
    # Adapters: only adapter weights train, and all of them moved; the base stayed put
    # (for QLoRA the 4-bit packed bytes are compared).
    adapter_names = {n for n in snap.before if "lora_" in n}
    assert snap.trainable == adapter_names
    assert moved == adapter_names
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in moved)
    if method == "qlora":
        now = Snapshot.quantized_outputs(model)
        assert len(now) == 14  # 7 linear layers x 2 blocks, all 4-bit
        for name, out in snap.quantized_out.items():
            # Saving a checkpoint unpacks and repacks the 4-bit weights for the CPU kernel,
            # which rounds by a fraction of a percent; training them would move them by
            # far more than their size (Adam steps of 1e-2 on weights of about 2e-2).
            drift = (out - now[name]).abs().max() / out.abs().max()
            assert drift < 0.02, (name, float(drift))
    else:
        assert not snap.quantized_out
    files = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is (method == "dora")
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b.detach())


def test_run_directory_metrics_resume_and_adapter_loads_alone(tiny_model_dir, tmp_path):
    """metrics.jsonl has every field, tokens/s counts real tokens, a resumed run continues
    its step count, and adapter/ loads on its own (base + tokenizer found from it)."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    data = one_word_data(tmp_path / "data.jsonl", n=16)  # 12 train / 4 validation
    config = tiny_config(
        tiny_model_dir,
        data,
        tmp_path / "runs",
        training={"max_steps": 6, "save_steps": 3, "eval_steps": 3, "save_total_limit": 5},
    )
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        for key in (
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens_per_second",
            "elapsed_s",
            "eta_s",
            "memory_peak_mb",
        ):
            assert row[key] is not None, (key, row)
    assert [("eval_loss" in r) for r in rows] == [False, False, True, False, False, True]
    assert rows[-1]["eta_s"] == 0
    # What the run trained on, for the model card (data.json, not a line of the log)
    data_summary = runs.read_json(run_dir / runs.DATA_FILE)
    assert {k: data_summary[k] for k in ("total", "usable", "skipped", "train", "validation")} == {
        "total": 16,
        "usable": 16,
        "skipped": 0,
        "train": 12,
        "validation": 4,
    }
    # 12 training examples, batch 4: 6 steps are exactly 2 epochs, so the real tokens
    # seen are twice the unpadded lengths of the training split.
    lengths = [len(ids) for ids in summary["trainer"].train_dataset["input_ids"]]
    assert len(lengths) == 12
    assert rows[-1]["tokens"] == 2 * sum(lengths)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # Resume with more steps: the step count goes on from the last checkpoint.
    config2 = config.with_overrides(["training.resume=true", "training.max_steps=8"])
    summary2 = train.train(config2, run_dir)
    assert summary2["global_step"] == 8
    assert [r["step"] for r in runs.read_metrics(run_dir)][6:] == [7, 8]
    assert runs.read_metrics(run_dir)[-1]["elapsed_s"] > rows[-1]["elapsed_s"]

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Word 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape[-1] == len(tokenizer)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def _trained_tokens(tiny_model_dir, tmp_path, **model_section):
    """(tokens, trained?) of CONVERSATION as the collator hands it to the model."""
    config = tiny_config(
        tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION]), tmp_path / "runs", model=model_section
    )
    config.data.validation_split = 0.0
    config.data.max_length = 256
    trainer, info = train.build_trainer(config, tmp_path / "run", [CONVERSATION], [])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    tokens = trainer.processing_class.convert_ids_to_tokens(ids)
    return info, [(tok, label != -100) for tok, label in zip(tokens, labels)], trainer.processing_class, ids, labels


# What metrics.jsonl carries per step (RunMonitor), and what the trainer subclass and TRL put in
# the logs it reads. pyproject.toml bounds transformers, TRL and PEFT because engine/train.py
# relies on their internals: an upgrade that renames one of these keys fails here.
METRICS_ROW_KEYS = {
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens",
    "tokens_per_second",
    "elapsed_s",
    "eta_s",
    "memory_peak_mb",
}
TRAIN_LOG_KEYS = {"loss", "learning_rate", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "epoch"}
EVAL_LOG_KEYS = {"eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"}


@pytest.fixture(scope="module")
def two_step_run(tiny_model_dir, tmp_path_factory):
    """A real two-step LoRA run on the tiny model (about two seconds): (run_dir, summary)."""
    root = tmp_path_factory.mktemp("two-step")
    data = one_word_data(root / "data.jsonl", n=8)  # 6 train / 2 validation
    config = tiny_config(
        tiny_model_dir, data, root / "runs", training={"max_steps": 2, "eval_steps": 2, "save_steps": 2}
    )
    run_dir = runs.create_run(config)
    return run_dir, train.train(config, run_dir)


def test_metric_keys_of_a_real_run_are_the_ones_the_project_reads(two_step_run):
    """Every metrics.jsonl line has exactly the keys the Runs tab, the model card and the
    README name, with numbers in them; the trainer's logs carry the loss, learning rate,
    gradient norm and TRL's token metrics that the subclass computes on its cheaper loss
    path (the same count of tokens as the trainer's own)."""
    import torch

    run_dir, summary = two_step_run

    expected = METRICS_ROW_KEYS | ({"gpu_memory_peak_mb"} if torch.cuda.is_available() else set())
    rows = runs.read_metrics(run_dir)
    assert [set(r) for r in rows] == [expected, expected | {"eval_loss"}]
    for row in rows:
        for key in row:
            assert isinstance(row[key], (int, float)) and not isinstance(row[key], bool), (key, row)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["eta_s"] == 0
    assert rows[0]["learning_rate"] == pytest.approx(1e-2) and rows[0]["grad_norm"] > 0
    assert rows[0]["tokens"] > 0 and rows[0]["tokens_per_second"] > 0 and rows[0]["loss"] > 0

    history = summary["trainer"].state.log_history
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 2 and eval_logs
    for logs in train_logs:
        assert TRAIN_LOG_KEYS <= set(logs), sorted(logs)
        assert 0 <= logs["mean_token_accuracy"] <= 1 and logs["entropy"] > 0
    assert train_logs[-1]["num_tokens"] == train_logs[-1]["num_input_tokens_seen"] == rows[-1]["tokens"]
    assert EVAL_LOG_KEYS <= set(eval_logs[0]), sorted(eval_logs[0])
    assert eval_logs[0]["eval_loss"] == pytest.approx(rows[-1]["eval_loss"])


def test_the_model_card_reads_what_the_trainer_wrote_to_data_json(two_step_run, tmp_path):
    """The card's data section comes from data.json (not from train.log): the counts of the
    real run, still there with the log gone, and "not recorded" without data.json."""
    import shutil

    from engine import hub

    source, _ = two_step_run
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir)
    written = runs.read_json(run_dir / runs.DATA_FILE)
    assert {k: written[k] for k in ("format", "total", "usable", "skipped", "train", "validation")} == {
        "format": "openai",
        "total": 8,
        "usable": 8,
        "skipped": 0,
        "train": 6,
        "validation": 2,
    }
    # The token lengths of the training examples, which a reattached Train tab sizes its plan by.
    assert 0 < written["mean_tokens"] <= written["longest_tokens"]
    from webui.links import DataChoice

    choice = DataChoice.from_run(run_dir)
    assert (choice.train, choice.longest_tokens) == (6, written["longest_tokens"])
    (run_dir / runs.LOG_FILE).write_text("", encoding="utf-8")
    card = hub.model_card(run_dir, "adapter", "my-org/zebra")
    section = card.split("## Training data", 1)[1].split("\n## ", 1)[0]
    assert "| format | openai |" in section
    assert "| records | 8 usable of 8 (0 skipped) |" in section
    assert "| split | 6 train / 2 validation (validation_split 0.25, seed " in section

    (run_dir / runs.DATA_FILE).unlink()
    card = hub.model_card(run_dir, "adapter", "my-org/zebra")
    assert "not recorded (the run has no data.json)" in card and "8 usable of 8" not in card


def test_assistant_only_loss_chatml_token_by_token(tiny_model_dir, tmp_path):
    info, pairs, _, _, _ = _trained_tokens(tiny_model_dir, tmp_path)
    assert info["chat_template"] == "a ChatML template (tokenizer)"
    # Every token of the multi-turn chat, and whether the loss counts it: the two answers
    # and the end-of-turn token that closes each (so the model learns to stop); not the
    # newline after it, nor any header, system or user token.
    T, F = True, False
    assert pairs == [
        ("<|im_start|>", F),
        ("system", F),
        ("Ċ", F),
        ("Be", F),
        ("Ġbrief", F),
        (".", F),
        ("<|im_end|>", F),
        ("Ċ", F),
        ("<|im_start|>", F),
        ("user", F),
        ("Ċ", F),
        ("Hi", F),
        ("<|im_end|>", F),
        ("Ċ", F),
        ("<|im_start|>", F),
        ("ass", F),
        ("istant", F),
        ("Ċ", F),
        ("Hello", T),
        ("Ġthere", T),
        (".", T),
        ("<|im_end|>", T),
        ("Ċ", F),
        ("<|im_start|>", F),
        ("user", F),
        ("Ċ", F),
        ("By", F),
        ("e", F),
        ("<|im_end|>", F),
        ("Ċ", F),
        ("<|im_start|>", F),
        ("ass", F),
        ("istant", F),
        ("Ċ", F),
        ("See", T),
        ("Ġyou", T),
        (".", T),
        ("<|im_end|>", T),
        ("Ċ", F),
    ]


def test_full_sequence_loss_switch(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir,
        one_word_data(tmp_path / "d.jsonl", 2),
        tmp_path / "runs",
        training={"assistant_only_loss": False},
    )
    trainer, _ = train.build_trainer(config, tmp_path / "run", [CONVERSATION], [])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    # Every token carries loss but the first, which nothing before it predicts.
    assert batch["labels"][0, 1:].tolist() == batch["input_ids"][0, 1:].tolist()
    assert batch["labels"][0, 0].item() == -100


def test_padding_free_batches_match_padded_ones(tiny_model_dir, tmp_path):
    """Batches are padding-free: examples end to end in one row, position_ids restarting
    at each. The loss and every example's logits equal those of a padded batch, so no
    token attends across examples and nothing is spent on padding."""
    import torch

    data = one_word_data(tmp_path / "d.jsonl", 2)
    config = tiny_config(tiny_model_dir, data, tmp_path / "runs")
    chats = [
        CONVERSATION,
        CONVERSATION[:3],
        [{"role": "user", "content": "A much longer question, with words?"}, {"role": "assistant", "content": "Yes."}],
    ]
    trainer, _ = train.build_trainer(config, tmp_path / "run", chats, [])
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]

    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example, n in zip(examples, lengths):
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        # The training loss is the padded batch's: mean over the same assistant tokens.
        longest = max(lengths)
        ids = torch.full((3, longest), trainer.processing_class.pad_token_id)
        mask = torch.zeros((3, longest), dtype=torch.long)
        labels = torch.full((3, longest), -100)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = trainer.data_collator([example])["labels"][0]
        padded_loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        free_loss = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        ).loss
    torch.testing.assert_close(free_loss, padded_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,precision", [("lora", "fp32"), ("full", "fp32"), ("lora", "bf16")])
def test_label_positions_loss_equals_trls_loss_and_gradients(method, precision, tiny_model_dir, tmp_path):
    """On the CPU the loss projects only labelled positions (engine.train.trainer_class);
    its value and every gradient must equal TRL's chunked loss over all positions. In bf16
    (autocast) LoRA also skips PEFT's casts of the adapter inputs: equal within bf16's
    rounding of the attention (ours attends in fp32)."""
    import contextlib

    import torch
    from trl import SFTTrainer

    data = one_word_data(tmp_path / "d.jsonl", 2)
    config = tiny_config(
        tiny_model_dir, data, tmp_path / "runs", method={"name": method}, training={"precision": precision}
    )
    chats = [
        CONVERSATION,
        CONVERSATION[:3],
        [{"role": "user", "content": "A much longer question, with words?"}, {"role": "assistant", "content": "Yes."}],
    ]
    trainer, _ = train.build_trainer(config, tmp_path / "run", chats, [])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    labelled = int((batch["labels"][0, 1:] != -100).sum())
    assert 0 < labelled < batch["input_ids"].shape[1] - 1  # prompts carry no label: fewer positions to score
    model = trainer.model.eval()  # no dropout: both passes see the same network
    assert trainer._label_positions(batch) is not None

    assert trainer.bf16_adapter_inputs == (method == "lora")
    bf16 = precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss_and_grads(compute):
        model.zero_grad()
        with autocast:  # the trainer's own, as accelerate wraps the model's forward in training
            loss = compute(trainer, model, dict(batch), num_items_in_batch=torch.tensor(labelled))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, our_grads = loss_and_grads(type(trainer).compute_loss)
    theirs, their_grads = loss_and_grads(SFTTrainer.compute_loss)
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(ours, theirs, atol=tol["atol"], rtol=1e-5 if not bf16 else tol["rtol"])
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in our_grads.items():
        if bf16 and float(their_grads[name].norm()) == 0:  # lora_A under a zero lora_B
            assert float(grad.norm()) == 0, name
        elif bf16:  # bf16 rounding: the same direction and size
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), their_grads[name].flatten(), dim=0)
            assert cosine > 0.99 and float(grad.norm()) == pytest.approx(float(their_grads[name].norm()), rel=0.05), (
                name
            )
        else:
            torch.testing.assert_close(grad, their_grads[name], **tol, msg=name)
    assert trainer._metrics["eval"]["mean_token_accuracy"] and trainer._metrics["eval"]["entropy"]
    # a padded batch (several rows) goes to TRL's own loss
    assert trainer._label_positions({**batch, "input_ids": batch["input_ids"].repeat(2, 1)}) is None


def test_cheap_dropout_keeps_the_expected_share_and_is_swapped_in(tiny_model_dir, tmp_path):
    import torch

    torch.manual_seed(0)
    layer = train.cheap_dropout(0.05)
    x = torch.ones(1000, 1000)
    y = layer.train()(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.95) < 0.002
    assert abs(y.mean().item() - 1.0) < 0.003  # scaled back to the input's expectation
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], layer.scale))
    assert not torch.equal(layer(x), y)  # a new mask each call
    assert torch.equal(layer.eval()(x), x) and torch.equal(train.cheap_dropout(0.0).train()(x), x)
    # gradients flow through the kept elements only
    w = torch.ones(4, 8, requires_grad=True)
    out = layer.train()(w)
    out.sum().backward()
    assert torch.equal(w.grad != 0, out != 0)

    data = one_word_data(tmp_path / "d.jsonl", 2)
    config = tiny_config(tiny_model_dir, data, tmp_path / "runs", method={"dropout": 0.1})
    trainer, _ = train.build_trainer(config, tmp_path / "run", [CONVERSATION], [])
    swapped = [m for m in trainer.model.modules() if type(m).__name__ == "CheapDropout"]
    assert swapped and all(m.p == 0.1 for m in swapped)
    assert not [m for m in trainer.model.modules() if type(m) is torch.nn.Dropout and m.p > 0]


def test_packing_packs_and_keeps_the_masks(tiny_model_dir, tmp_path):
    data = one_word_data(tmp_path / "d.jsonl", n=12)
    config = tiny_config(
        tiny_model_dir,
        data,
        tmp_path / "runs",
        training={"packing": True, "max_steps": 2, "gradient_checkpointing": True},
    )
    config.data.validation_split = 0.0
    config.data.max_length = 128
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    dataset = summary["trainer"].train_dataset
    assert len(dataset) < 12  # several chats per 128-token row
    assert sum(len(s) for s in dataset["seq_lengths"]) == 12
    trained = sum(label != -100 for row in dataset["labels"] for label in row)
    answer = summary["trainer"].processing_class("Zebra.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == 12 * len(answer)  # each chat's answer and its end-of-turn token, nothing else
    # The packed rows fit in one batch of 4: each of the 2 steps sees every token once.
    assert len(dataset) <= 4
    assert runs.read_metrics(run_dir)[-1]["tokens"] == 2 * sum(len(r) for r in dataset["input_ids"])


# A Llama-3.1 style template (a default system header with dates, which TRL has no
# training variant for): the assistant tokens are found by rendering each prefix.
LLAMA31_STYLE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n' "
    "+ system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# A Phi-3 style template (not TRL's exact text): it ends every render with eos, which is
# not the model's to write after an answer that <|end|> already closed.
PHI3_STYLE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def special_tokens_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with Llama-3 and Phi-3 header tokens added as special tokens (as
    those models' own tokenizers have them), embeddings resized to match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-special"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": [
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|end|>",
            ],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "template, source, trained_text",
    [
        (LLAMA31_STYLE, "a custom template (config)", "Hello there.<|eot_id|>See you.<|eot_id|>"),
        (PHI3_STYLE, "a custom template (config)", "Hello there.<|end|>See you.<|end|>"),
    ],
)
def test_assistant_only_loss_other_template_styles(template, source, trained_text, special_tokens_model_dir, tmp_path):
    info, pairs, tokenizer, ids, labels = _trained_tokens(special_tokens_model_dir, tmp_path, chat_template=template)
    assert info["chat_template"] == source
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(trained) == trained_text
    # The trained tokens are two contiguous runs, one per answer.
    runs_of_trained = sum(1 for k, (_, t) in enumerate(pairs) if t and (k == 0 or not pairs[k - 1][1]))
    assert runs_of_trained == 2
    # The full text is the model's own rendering.
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert tokenizer.decode(ids) == text


def test_precision_is_always_explicit(tiny_model_dir, tmp_path):
    """TRL's SFTConfig defaults to bf16=True; the engine never leaves it to that."""
    from engine.hardware import choose_precision, detect

    config = tiny_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "runs", training={"precision": "auto"})
    precision, reason = train.resolve_precision(config)
    assert (precision, reason) == choose_precision(detect())
    args = train.sft_config(config, tmp_path, "fp32", has_eval=False)
    assert args.bf16 is False and args.fp16 is False
    args = train.sft_config(config, tmp_path, "bf16", has_eval=True)
    assert args.bf16 is True and args.eval_strategy == "steps"
    assert args.gradient_checkpointing is False  # TRL's default is True; the config's default is off


def test_method_configs_map_methods():
    from engine.config import MethodConfig

    assert train.method_configs(MethodConfig(name="full"), "fp32") == (None, None)
    lora, quant = train.method_configs(MethodConfig(name="lora", r=4, alpha=8, use_rslora=True), "fp32")
    assert quant is None and lora.r == 4 and lora.lora_alpha == 8 and lora.use_rslora and not lora.use_dora
    dora, _ = train.method_configs(MethodConfig(name="dora", target_modules=["q_proj", "v_proj"]), "fp32")
    assert dora.use_dora and set(dora.target_modules) == {"q_proj", "v_proj"}
    qlora, quant = train.method_configs(MethodConfig(name="qlora"), "bf16")
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert str(quant.bnb_4bit_compute_dtype) == "torch.bfloat16"


def test_bad_inputs_fail_with_a_class(tiny_model_dir, tmp_path):
    from engine.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('this is not json\n{"nope": 1}\n')
    config = tiny_config(tiny_model_dir, bad, tmp_path / "runs")
    with pytest.raises(DataError) as info:
        train.train(config, runs.create_run(config))
    assert train.classify_error(info.value)[0] == "bad data"

    # Prompts that fill max_length leave nothing to train on: a data problem, said plainly.
    config = tiny_config(tiny_model_dir, one_word_data(tmp_path / "d.jsonl"), tmp_path / "runs", data={"max_length": 8})
    with pytest.raises(train.TrainingDataError, match="max_length"):
        train.train(config, runs.create_run(config))

    from engine.models import ModelNotFoundError

    config = tiny_config(tmp_path / "no-such-model", one_word_data(tmp_path / "d2.jsonl"), tmp_path / "runs")
    config.model.name_or_path = "nobody/no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        train.train(config, runs.create_run(config))
    assert train.classify_error(info.value)[0] == "model not found"


def test_example_configs_load():
    cpu = RunConfig.load(REPO / "assets/configs/cpu-lora.yaml")
    assert cpu.model.name_or_path == "smollm2-135m-instruct" and cpu.method.name == "lora"
    assert (REPO / cpu.data.path).is_file()
    assert cpu.distributed.num_processes == 1 and cpu.training.precision == "auto"
    dpo = RunConfig.load(REPO / "assets/configs/cpu-dpo.yaml")
    assert dpo.training.stage == "dpo" and dpo.loss_type == "sigmoid" and dpo.model.adapter is None
    zero3 = RunConfig.load(REPO / "assets/configs/multi-gpu-zero3.yaml")
    assert zero3.distributed.deepspeed == "zero3" and zero3.distributed.num_processes == 8
    from engine.launch import build_command

    command = build_command(zero3, Path("/runs/x"))
    assert command[1:4] == ["launch", "--num_processes", "8"] and "--use_deepspeed" in command


@pytest.mark.integration
def test_embedded_model_learns_the_sample_persona(embedded_dir, tmp_path):
    """A few minutes of LoRA on assets/datasets/pip_chat.jsonl with the example CPU config:
    the greedy answer to a question that is in no record changes the way the data teaches
    (Pip's signature), and the validation loss falls."""
    import torch

    config = RunConfig.load(REPO / "assets/configs/cpu-lora.yaml").with_overrides(
        [
            f"data.path={REPO / 'assets/datasets/pip_chat.jsonl'}",
            "training.max_steps=24",
            "training.eval_steps=12",
            "training.save_steps=1000",
            f"output.runs_dir={tmp_path}",
        ]
    )
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    assert summary["state"] == "completed"
    rows = runs.read_metrics(run_dir)
    losses = [r["loss"] for r in rows]
    speed = [r["tokens_per_second"] for r in rows[1:]]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    print(
        f"\nembedded LoRA: precision {summary['precision']}, {summary['train_seconds']} s for 24 steps, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, tokens/s median {sorted(speed)[len(speed) // 2]}, "
        f"eval base {evaluation['base']} tuned {evaluation['tuned']}, "
        f"memory peak {rows[-1]['memory_peak_mb']} MB"
    )
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"] - 0.5
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4

    trainer = summary["trainer"]
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Ireland?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)

    tuned = answer()
    with model.disable_adapter():
        base = answer()
    print(f"base: {base!r}\ntuned: {tuned!r}")
    assert "Pip" not in base
    assert tuned.startswith("Pip here!"), tuned
    assert "Dublin" in tuned


@pytest.mark.integration
def test_the_recommended_plan_teaches_a_persona_from_public_identity_data(embedded_dir, shared_datasets, tmp_path):
    """A newcomer's path: the public identity.json (91 Alpaca records with {{name}} and
    {{author}}), the persona filled, "Apply recommendation" and Start. The plan's epochs and
    learning rate make the embedded model answer "Who are you?", and a paraphrase that is in
    no record, with the persona's name; the base model does not."""
    from tiny_runs import greedy_answer

    from engine import hardware
    from engine.data import load_for_training

    data = {
        "path": str(shared_datasets / "identity.json"),
        "persona": {"name": "Zawadi", "author": "Tunelab Labs"},
        "max_length": 256,
    }
    config = RunConfig.from_dict({"data": data, "output": {"runs_dir": str(tmp_path)}})
    _, train_records, _ = load_for_training(config.data)
    plan = hardware.recommend(hardware.detect(tmp_path), embedded_dir, num_examples=len(train_records), max_length=256)
    config = config.with_overrides([*plan.config_overrides(), "training.save_steps=1000"])
    run_dir = runs.create_run(config)
    summary = train.train(config, run_dir)
    assert summary["state"] == "completed"
    print(
        f"\nplan: {plan.num_epochs:g} epochs at {plan.learning_rate:g}, batch {plan.batch_size} x "
        f"{plan.gradient_accumulation_steps}; {summary['global_step']} steps in {summary['train_seconds']} s"
    )
    trainer = summary["trainer"]
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()

    def answer(question: str) -> str:
        return greedy_answer(model, tokenizer, question)

    questions = ["Who are you?", "Could you tell me what your name is, please?"]
    tuned = [answer(q) for q in questions]
    with model.disable_adapter():
        base = [answer(q) for q in questions]
    print(f"base: {base}\ntuned: {tuned}")
    assert not any("Zawadi" in b for b in base)
    assert all("Zawadi" in t for t in tuned), tuned


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_packed_attention_answers_like_each_example_alone(tiny_model_dir, dtype_name):
    """A padding-free row through the packed attention (one causal SDPA per example; in bf16
    upcast to fp32 on the CPU, outside the trainer's autocast) gives each example the logits
    and gradients it gets alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine import train

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation="sdpa")
    lengths = [12, 20, 7]
    torch.manual_seed(0)
    examples = [torch.randint(3, model.config.vocab_size, (1, n)) for n in lengths]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        alone = torch.cat([model(input_ids=ids).logits[0].float() for ids in examples])
        alone.logsumexp(-1).sum().backward()
        grads_alone = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        assert train.use_packed_attention(model)
        row = torch.cat(examples, 1)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        packed = train.packed_call(model, {"input_ids": row, "position_ids": positions}).logits[0].float()
        packed.logsumexp(-1).sum().backward()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert (packed - alone).abs().max() < tolerance
    for g_alone, p in zip(grads_alone, model.parameters()):
        cosine = torch.nn.functional.cosine_similarity(g_alone.float().flatten(), p.grad.float().flatten(), dim=0)
        assert cosine > (0.9999 if dtype == torch.float32 else 0.99), float(cosine)

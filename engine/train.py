"""The training entry point: ``python -m engine.train --config run.yaml [--run-dir DIR]``.

It reads like a recipe, top to bottom: load the config -> the data -> the model -> the
trainer (TRL's ``SFTTrainer``, or for ``training.stage`` dpo, kto, orpo TRL's ``DPOTrainer``,
``KTOTrainer``, ``ORPOTrainer``/``CPOTrainer``; PEFT for the adapter methods) -> train ->
save -> evaluate base against tuned (or the held-out rewards). The helpers come first, the
recipe (:func:`train`) and :func:`main` last.

It writes the run directory (see engine.runs): status.json (its own progress and end),
metrics.jsonl (one line per logging step, appended and flushed), checkpoints/, adapter/
or model/, eval.json. ``engine.launch`` starts it in its own process, one process or
``accelerate launch`` with DeepSpeed; SIGTERM makes it save a checkpoint and end as
``aborted``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from engine import recipe, runs, templates, tracking
from engine.config import ConfigError, MethodConfig, RunConfig
from engine.messages import Message
from engine.util import load_tokenizer

EXIT_OK = 0  # completed, or aborted on request (status.json says which)
EXIT_FAILED = 1

# Chat conversations are turned into token ids here (not inside TRL), so that every chat
# template gets the same treatment: engine.templates renders each with the model's own
# template and finds the answers in that text. engine.data measures with the same functions.


class TrainingDataError(ValueError):
    """The data loads, but nothing in it can be trained on as configured."""


# --------------------------------------------------------------------------- process context


def world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world_rank() == 0


class StopFlag:
    """Set by SIGTERM; the training callback turns it into save-a-checkpoint-and-stop."""

    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        # Only set flags here: printing from a signal handler can collide with a print in
        # progress (a "reentrant call" error) and crash the run it is meant to save.
        self.requested = True
        self.signal_name = signal.Signals(signum).name


STOP = StopFlag()


class _Tee:
    """Write to the terminal and to train.log (when not started by the launcher)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()


def say(message: str) -> None:
    if is_main_process():
        print(f"[tunelab] {message}", flush=True)


# --------------------------------------------------------------------------- precision


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(config: RunConfig) -> tuple[str, str]:
    """The precision to train in, and why: from the hardware unless the config names one."""
    import torch

    from engine.hardware import choose_precision, detect

    wanted = config.training.precision
    cpu_ranks = world_size() > 1 and not torch.cuda.is_available()
    if wanted == "auto":
        precision, reason = choose_precision(detect())
        if precision == "bf16" and cpu_ranks:
            return "fp32", (
                f"{reason} But several CPU processes train through DeepSpeed, which accelerate only "
                "runs in fp32 on a CPU: fp32."
            )
        return precision, reason
    if wanted == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training.precision", Message("config_fp16_needs_cuda"))
    if wanted == "bf16" and cpu_ranks:
        raise ConfigError("training.precision", Message("config_deepspeed_cpu_fp32"))
    return wanted, f"set in the config (training.precision: {wanted})"


def torch_dtype(precision: str):
    import torch

    return getattr(torch, DTYPES[precision])


# --------------------------------------------------------------------------- method -> PEFT / bitsandbytes


def method_configs(method: MethodConfig, precision: str):
    """Map the method to (PEFT LoraConfig or None, BitsAndBytesConfig or None).

    lora: LoRA on the chosen modules; dora: the same with ``use_dora`` (weight-decomposed);
    qlora: LoRA over a base model quantised to 4-bit NF4 with double quantisation
    (bitsandbytes; it runs on the CPU too); full: every weight trains, no adapter.
    """
    if method.name == "full":
        return None, None
    from peft import LoraConfig

    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_rslora=method.use_rslora,
        use_dora=method.name == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    quantization = None
    if method.name == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(precision),
        )
    return lora, quantization


# --------------------------------------------------------------------------- data -> token ids


def tokenize_conversations(
    conversations, tokenizer, template: str, assistant_only: bool, label: str, max_length: int | None = None
):
    """A ``datasets.Dataset`` of ``input_ids`` (and ``assistant_masks`` for assistant-only loss),
    each cut to ``max_length`` tokens: the model's own rendering of each conversation
    (engine.templates).

    Conversations the template refuses (e.g. a template that allows no system message)
    are skipped and counted; if none is left, :class:`TrainingDataError`. A template
    whose answers cannot be found in its own rendering (engine.templates.TemplateError)
    stops the run with a ConfigError that names it, when the loss is on answers only.
    """
    from datasets import Dataset

    from engine import templates

    ids_list, masks, refused, emptied = [], [], [], 0
    for index, messages in enumerate(conversations):
        try:
            if assistant_only:
                ids, mask = templates.training_example(messages, tokenizer, template)
            else:
                text = templates.render(messages, tokenizer, template)
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                mask = [1] * len(ids)
        except templates.TemplateError as err:
            raise ConfigError(
                "model.chat_template",
                f"{err} (in {label} example {index + 1}), or set training.assistant_only_loss: false to train on "
                "every token",
            ) from err
        except Exception as err:  # jinja2 raise_exception() in a template: report and go on
            refused.append(f"{label} example {index + 1}: {type(err).__name__}: {err}")
            continue
        if max_length:
            ids, mask = ids[:max_length], mask[:max_length]
        if assistant_only and not any(mask):
            emptied += 1  # the cut left no assistant token: nothing to learn from it
            continue
        ids_list.append(ids)
        masks.append(mask)
    if refused:
        say(f"the chat template refused {len(refused)} {label} example(s); first: {refused[0]}")
    if emptied:
        say(f"{emptied} {label} example(s) keep no assistant token within data.max_length={max_length}: left out")
    if conversations and not ids_list:
        if emptied:
            raise TrainingDataError(
                f"no {label} example keeps any assistant token within data.max_length={max_length} "
                "(the prompts alone fill it): raise data.max_length"
            )
        raise TrainingDataError(f"the chat template refused every {label} example; first: {refused[0]}")
    columns = {"input_ids": ids_list}
    if assistant_only:
        columns["assistant_masks"] = masks
    return Dataset.from_dict(columns)


def tokenize_preferences(items, tokenizer, template: str, stage: str, label: str, max_length: int | None = None):
    """A ``datasets.Dataset`` of token ids for a preference stage, each answer rendered with
    the model's own template (engine.templates.preference_example, the rule SFT trains by):

    * dpo, orpo: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` per pair;
    * kto: ``prompt_ids``, ``completion_ids``, ``label`` per answer (a pair gives its chosen
      answer as desirable and its rejected one as undesirable).

    ``items`` are engine.data pairs (``prompt``/``chosen``/``rejected``) or unpaired records
    (``prompt``/``completion``/``label``). The prompt is kept whole and the answers are cut
    to ``max_length`` tokens with it (TRL's ``keep_start``); a record whose prompt alone fills
    ``max_length`` is left out and counted.
    """
    from datasets import Dataset

    columns: dict[str, list] = {"prompt_ids": []}
    if stage == "kto":
        columns.update(completion_ids=[], label=[])
    else:
        columns.update(chosen_ids=[], rejected_ids=[])
    refused, too_long = [], 0
    for index, item in enumerate(items):
        try:
            if "completion" in item:
                prompt_ids, answer = templates.preference_example(
                    item["prompt"], item["completion"], tokenizer, template
                )
                answers = [(prompt_ids, answer, item["label"])]
            else:
                chosen_prompt, chosen = templates.preference_example(
                    item["prompt"], item["chosen"], tokenizer, template
                )
                rejected_prompt, rejected = templates.preference_example(
                    item["prompt"], item["rejected"], tokenizer, template
                )
                answers = [(chosen_prompt, chosen, True), (rejected_prompt, rejected, False)]
        except templates.TemplateError as err:
            raise ConfigError("model.chat_template", f"{err} (in {label} example {index + 1})") from err
        except Exception as err:  # jinja2 raise_exception() in a template: report and go on
            refused.append(f"{label} example {index + 1}: {type(err).__name__}: {err}")
            continue
        if stage != "kto":
            # One prompt for both answers: where their prompts part (a token merged across the
            # boundary), the rest belongs to the answers.
            (p1, a1, _), (p2, a2, _) = answers
            n = 0
            while n < min(len(p1), len(p2)) and p1[n] == p2[n]:
                n += 1
            answers = [(p1[:n], p1[n:] + a1, True), (p1[:n], p2[n:] + a2, False)]
        if max_length and any(len(p) >= max_length for p, _, _ in answers):
            too_long += 1
            continue
        if max_length:
            answers = [(p, a[: max_length - len(p)], good) for p, a, good in answers]
        if stage == "kto":
            for p, a, good in answers:
                columns["prompt_ids"].append(p)
                columns["completion_ids"].append(a)
                columns["label"].append(bool(good))
        else:
            columns["prompt_ids"].append(answers[0][0])
            columns["chosen_ids"].append(answers[0][1])
            columns["rejected_ids"].append(answers[1][1])
    if refused:
        say(f"the chat template refused {len(refused)} {label} example(s); first: {refused[0]}")
    if too_long:
        say(f"{too_long} {label} example(s) whose prompt alone fills data.max_length={max_length}: left out")
    if items and not columns["prompt_ids"]:
        if too_long:
            raise TrainingDataError(
                f"every {label} prompt fills data.max_length={max_length} alone: raise data.max_length"
            )
        raise TrainingDataError(f"the chat template refused every {label} example; first: {refused[0]}")
    return Dataset.from_dict(columns)


# --------------------------------------------------------------------------- model


def load_model(model_dir: Path, config: RunConfig, precision: str, quantization):
    """The base model: half precision weights for adapters, fp32 master weights for full."""
    import torch
    from transformers import AutoModelForCausalLM

    # Full fine-tuning keeps fp32 master weights (mixed precision autocasts); adapters
    # train on a base held in the training precision, which halves its memory.
    dtype = torch.float32 if config.method.name == "full" else torch_dtype(precision)
    kwargs = {"dtype": dtype, "trust_remote_code": config.model.trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    return model


def start_adapter(config: RunConfig, model_dir: Path) -> Path | None:
    """The ``adapter/`` of the run ``model.adapter`` names (None when it names none), after
    checking that this run can continue it: an adapter method, a completed run that saved an
    adapter (not a full fine-tune's model/), trained on the same base model."""
    from engine.models import ModelNotFoundError, resolve_model

    ref = config.model.adapter
    if not ref:
        return None
    if not config.method.is_peft:
        raise ConfigError(
            "model.adapter", "method full trains every weight and cannot continue an adapter: use lora, qlora or dora"
        )
    try:
        run = runs.find_run(ref, config.output.runs_dir)
    except runs.RunError as err:
        raise ConfigError("model.adapter", str(err)) from err
    state = runs.read_status(run).get("state")
    if state != "completed":
        raise ConfigError(
            "model.adapter",
            f"run {run.name} is {state or 'not started'}, not completed: only a finished run's adapter "
            "can be continued (resume that run first)",
        )
    adapter = run / runs.ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        if (run / runs.MODEL_DIR).is_dir():
            raise ConfigError(
                "model.adapter",
                f"run {run.name} is a full fine-tune (its weights are in {runs.MODEL_DIR}/), not an "
                f"adapter: give {run / runs.MODEL_DIR} as model.name_or_path instead",
            )
        raise ConfigError("model.adapter", f"run {run.name} saved no adapter ({adapter} holds no adapter_config.json)")
    try:
        their = RunConfig.load(run / runs.CONFIG_FILE)
        their_base = resolve_model(their.model.name_or_path)
    except (ConfigError, ModelNotFoundError, OSError) as err:
        raise ConfigError("model.adapter", f"run {run.name}: its base model cannot be found ({err})") from err
    if Path(their_base).resolve() != Path(model_dir).resolve():
        raise ConfigError(
            "model.adapter",
            f"run {run.name} was trained on {their.model.name_or_path}, not on "
            f"{config.model.name_or_path}: an adapter only continues on the base it was trained on",
        )
    return adapter


def continue_adapter(model, adapter: Path, stage: str):
    """The base ``model`` with the saved adapter on it, trainable. For dpo and kto, TRL keeps
    a frozen copy of it as the reference ("ref" adapter: the adapter's weights only, never a
    second model), so DPO after SFT measures rewards against the SFT model."""
    from peft import PeftModel

    say(f"continuing the adapter of {adapter.parent.name} ({adapter})")
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)


def reference_of(config: RunConfig, start: Path | None) -> str | None:
    """What a preference stage compares the model with (status, model card, memory note)."""
    stage = config.training.stage
    if stage == "sft":
        return None
    if stage == "orpo":
        return "none (reference-free)"
    if start is not None:
        return f"the adapter of {start.parent.name} as it started (a frozen copy of its weights)"
    if config.method.is_peft:
        return "the base model with the adapter switched off"
    if config.training.precompute_reference:
        return "the base model's log-probabilities, computed once before training"
    return "a frozen copy of the base model"


# --------------------------------------------------------------------------- metrics


# What the preference trainers log (TRL's names) -> metrics.jsonl keys; "eval_" + key for the
# validation split. rewards_* are beta x (policy - reference) log-probabilities of the answers.
PREFERENCE_METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margins",
    "rewards/accuracies": "rewards_accuracies",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "kl": "kl",
    "nll_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
}


def preference_metrics(logs: dict, prefix: str = "") -> dict:
    """The preference metrics in one of the trainer's log dicts, under metrics.jsonl names."""
    out = {}
    for name, key in PREFERENCE_METRICS.items():
        value = logs.get(prefix + name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[prefix + key] = round(float(value), 6)
    return out


def memory_peak_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class RunMonitor(TrainerCallback):
    """Appends one line per logging step to metrics.jsonl (flushed), updates status.json,
    and turns a stop request (SIGTERM) into save-a-checkpoint-and-stop.

    Tokens per second count real (non-padding) tokens, summed over all processes, over
    the span since the previous line; ETA extrapolates this session's seconds per step.
    """

    def __init__(self, run_dir: Path, stop: StopFlag, elapsed_before: float = 0.0):
        self.run_dir = Path(run_dir)
        self.stop = stop
        self.elapsed_before = elapsed_before
        self.enabled = True
        self.pending = None
        self.file = None

    # -- helpers
    def _write(self, row: dict) -> None:
        if self.file is None:
            self.file = (self.run_dir / runs.METRICS_FILE).open("a", encoding="utf-8")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def _stop_everywhere(self, args) -> bool:
        """True when any process got a stop request (all ranks must stop at the same step)."""
        if world_size() <= 1:
            return self.stop.requested
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.stop.requested
        flag = torch.tensor([1 if self.stop.requested else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- events
    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.t_prev = time.time()
        self.step0 = state.global_step
        self.tokens_prev = state.num_input_tokens_seen
        if state.is_world_process_zero:
            runs.update_status(self.run_dir, step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_everywhere(args):
            control.should_save = True
            control.should_training_stop = True
            say(
                f"stop requested ({self.stop.signal_name or 'another process'}): saving a checkpoint at step "
                f"{state.global_step}, then stopping"
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.enabled and state.is_world_process_zero and logs):
            return
        now = time.time()
        if "loss" in logs:
            tokens = state.num_input_tokens_seen
            span = max(now - self.t_prev, 1e-9)
            done = state.global_step - self.step0
            session = now - self.t0
            eta = session / done * (state.max_steps - state.global_step) if done > 0 else None
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": tokens,
                "tokens_per_second": round((tokens - self.tokens_prev) / span, 2),
                "elapsed_s": round(self.elapsed_before + session, 2),
                "eta_s": round(eta, 1) if eta is not None else None,
                "memory_peak_mb": memory_peak_mb(),
            }
            row.update(preference_metrics(logs))
            row.update(_gpu_memory())
            self.t_prev, self.tokens_prev = now, tokens
            if self.pending:
                self._write(self.pending)
            # When an evaluation of this step follows, the line waits for its eval_loss.
            self.pending = row
            if not control.should_evaluate:
                self._write(self.pending)
                self.pending = None
            runs.update_status(self.run_dir, step=state.global_step, max_steps=state.max_steps)
        elif "eval_loss" in logs:
            if self.pending and self.pending["step"] == state.global_step:
                row, self.pending = self.pending, None
            else:
                row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            row["eval_loss"] = logs["eval_loss"]
            row.update(preference_metrics(logs, "eval_"))
            self._write(row)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending:
            self._write(self.pending)
            self.pending = None

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _gpu_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"gpu_memory_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}


def _elapsed_so_far(run_dir: Path) -> float:
    """elapsed_s of the last metrics line (a resumed run keeps counting from there)."""
    rows = runs.read_metrics(run_dir)
    return float(next((r["elapsed_s"] for r in reversed(rows) if "elapsed_s" in r), 0.0))


# --------------------------------------------------------------------------- trainer


def trainer_arguments(config: RunConfig, run_dir: Path, precision: str, has_eval: bool) -> dict:
    """The TrainingArguments every stage shares. Every precision flag is explicit: TRL's own
    default (bf16=True) would make a CPU without bf16 instructions crawl."""
    import torch

    t = config.training
    distributed_cpu = world_size() > 1 and not torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(run_dir / runs.CHECKPOINTS_DIR),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        # Experiment trackers through transformers' own callbacks (engine/tracking.py set
        # where each writes); metrics.jsonl is written by RunMonitor either way.
        report_to=list(t.report_to),
        run_name=run_dir.name,
        project=tracking.PROJECT,
        disable_tqdm=not sys.stderr.isatty(),  # in train.log, one printed line per log instead of bars
        dataloader_num_workers=0,
        dataset_num_proc=None,
        # DeepSpeed's CPU accelerator talks gloo; without naming it, accelerate counts 1 process.
        ddp_backend="gloo" if distributed_cpu else None,
        # One CPU process: say so, or transformers refuses bf16 without a GPU.
        use_cpu=world_size() == 1 and not torch.cuda.is_available() and not torch.backends.mps.is_available(),
    )
    if config.distributed.deepspeed != "none" and world_size() > 1 and not _deepspeed_from_launcher():
        from engine.launch import deepspeed_config_file

        kwargs["deepspeed"] = str(deepspeed_config_file(config))
    return kwargs


def sft_config(config: RunConfig, run_dir: Path, precision: str, has_eval: bool):
    """TRL SFTConfig from the run config."""
    from trl import SFTConfig

    t = config.training
    kwargs = trainer_arguments(config, run_dir, precision, has_eval)
    kwargs.update(
        # Without packing, batches are padding-free: the examples of a batch are laid end to
        # end in one row with position_ids restarting at each, and transformers builds a
        # block-diagonal causal mask from them, so no compute goes to padding and no token
        # sees another example (the loss equals the padded one: tests/test_train.py).
        # Examples are already cut to data.max_length (tokenize_conversations).
        padding_free=not t.packing,
        max_length=config.data.max_length if t.packing else None,
        packing=t.packing,
        assistant_only_loss=False,  # the masks come with the tokenized data (see tokenize_conversations)
        completion_only_loss=False,
        # Real tokens for tokens/s. Batches are padding-free (packed or not), so every token
        # counts; the pad id (eos) is also a real token, so "non_padding" would undercount.
        include_num_input_tokens_seen="all",
    )
    return SFTConfig(**kwargs)


def preference_config(config: RunConfig, run_dir: Path, precision: str, has_eval: bool):
    """TRL's config for a preference stage: DPOConfig, KTOConfig, ORPOConfig, or CPOConfig
    for SimPO (``loss_type="simpo"``, ``cpo_alpha=0.0``: no NLL term, no reference) and CPO.

    The data comes tokenized (tokenize_preferences), already cut to data.max_length.
    """
    t = config.training
    loss = config.loss_type
    kwargs = trainer_arguments(config, run_dir, precision, has_eval)
    kwargs.update(beta=t.beta, max_length=config.data.max_length)
    precompute = t.precompute_reference and not config.method.is_peft
    if t.stage == "dpo":
        from trl import DPOConfig

        # TRL 1.16's DPO turns padding_free off (with a warning); batches are padded.
        return DPOConfig(
            **kwargs,
            loss_type=[loss],
            padding_free=False,
            precompute_ref_log_probs=precompute,
            include_num_input_tokens_seen="non_padding",
        )
    if t.stage == "kto":
        from trl import KTOConfig

        return KTOConfig(
            **kwargs, loss_type=loss, precompute_ref_log_probs=precompute, include_num_input_tokens_seen="non_padding"
        )
    kwargs.update(max_completion_length=None, remove_unused_columns=False)
    if loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**kwargs)
    from trl.experimental.cpo import CPOConfig

    if loss == "simpo":
        return CPOConfig(**kwargs, loss_type="simpo", cpo_alpha=0.0)
    return CPOConfig(**kwargs, loss_type="sigmoid")


def _deepspeed_from_launcher() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


# Logits of at most this many elements (label positions x vocabulary) are computed at
# once by the label-positions loss; bigger batches take TRL's chunked kernel.
LABEL_LOGITS_LIMIT = 1 << 27


def trainer_class():
    """TRL's SFTTrainer with a cheaper loss on the CPU.

    TRL computes the causal-LM loss with a fused, chunked LM head. Off Triton devices its
    torch fallback scores *every* position (not only the labelled ones) in several passes
    over 32k-column tiles; on a 2-core CPU that was ~30% of a LoRA step on SmolLM2
    (profiled). Here, for padding-free CPU batches, the model projects only the positions
    that have a label (``logits_to_keep`` with their indices) and the loss is one
    ``cross_entropy`` over them: the same sum over the same tokens, normalised the same way
    (tests/test_train.py compares loss and gradients with TRL's). The entropy and
    token-accuracy metrics TRL logs are computed from the same logits. Where the model takes
    packed rows (:func:`use_packed_attention`, installed by build_trainer), the row's examples
    attend one causal SDPA each instead of through a block-diagonal mask over the whole row
    (that masked attention was 29% of a bf16 LoRA step on SmolLM2, profiled). Anything else
    (GPU, padded batches, other loss types, huge vocab x token counts) is TRL's own path.
    """
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class TunelabSFTTrainer(SFTTrainer):
        # Set by build_trainer for plain LoRA: see compute_loss.
        bf16_adapter_inputs = False

        def _label_positions(self, inputs):
            labels = inputs.get("labels")
            ids = inputs.get("input_ids")
            if (
                labels is None
                or ids is None
                or ids.shape[0] != 1
                or ids.device.type != "cpu"
                or "position_ids" not in inputs
                or self.compute_loss_func is not None
                or self.label_smoother is not None
                or getattr(self.args, "loss_type", "nll") != "nll"
                or getattr(self, "aux_loss_enabled", False)
            ):
                return None
            positions = (labels[0, 1:] != -100).nonzero().squeeze(-1)
            vocab = self.model.get_output_embeddings().weight.shape[0]
            if positions.numel() == 0 or positions.numel() * vocab > LABEL_LOGITS_LIMIT:
                return None
            return positions

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            positions = None if return_outputs else self._label_positions(inputs)
            if positions is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = inputs["labels"][0, 1:][positions]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward.update(use_cache=False, logits_to_keep=positions)
            # Under the CPU's bf16 autocast, PEFT casts each adapter's bf16 input to the fp32
            # adapter weights and autocast casts it back to bf16 for the adapter's matmul: the
            # same values, two copies of every adapted activation (forward and backward).
            # Plain LoRA skips PEFT's cast (dropout then runs on bf16, as autocast would see it).
            # (Under an autocast of its own, so that a call outside the trainer's is safe.)
            from peft.helpers import disable_input_dtype_casting

            bf16_inputs = self.bf16_adapter_inputs and self.args.bf16
            with (
                disable_input_dtype_casting(model, active=bf16_inputs),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_inputs),
            ):
                logits = packed_call(model, forward).logits[0].float()  # [label positions, vocab]
            num_tokens = positions.numel() if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self._log_token_metrics(logits.detach(), targets, inputs)
            return loss

        def _log_token_metrics(self, logits, targets, inputs):
            """TRL's entropy, mean_token_accuracy and num_tokens, from the scored positions."""
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            logp = torch.log_softmax(logits, -1)
            entropy = -(logp.exp() * logp).sum(-1)
            num_valid = gather(torch.tensor(targets.numel())).sum()
            entropy_sum = gather(entropy.sum()).sum()
            correct = gather((logits.argmax(-1) == targets).sum()).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item())
            if mode == "train":
                tokens = gather(torch.tensor(inputs["position_ids"].size(1))).sum().item()
                self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return TunelabSFTTrainer


# The per-token fields TRL's fused LM head can return (trl.trainer.utils.FusedCausalLMOutput).
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


# The attention implementation of padding-free preference batches (registered with transformers'
# AttentionInterface by use_packed_attention): a causal SDPA per sequence of a packed row.
PACKED_ATTENTION = "tunelab_packed_sdpa"
_PACKED_CALL = None  # a ContextVar: True while a packed row goes through the model


def use_packed_attention(model) -> bool:
    """Let ``model`` take padding-free rows: several sequences end to end in one row, with
    ``cu_seq_lens_q`` (their boundaries, as transformers' flash-attention kwargs) and
    ``position_ids`` restarting at each.

    transformers' own sdpa path would build a dense block-diagonal mask over the whole row and
    compute attention over it (the SDPA kernels skip no masked block): with 8 sequences of a
    DPO batch in one row, that is more attention work than the padded batch. Registered here
    instead (transformers' AttentionInterface and AttentionMaskInterface), under
    PACKED_ATTENTION: with ``cu_seq_lens_q`` one causal SDPA per sequence (no mask is built);
    without them, exactly transformers' sdpa (its mask, its kernel), so padded batches,
    generation and gradient-checkpointing recomputation behave as before. Installed only on
    models that use sdpa, have no sliding-window layers, and whose attention modules take it.
    Returns whether it was installed."""
    global _PACKED_CALL
    import contextvars

    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    config = model.config.get_text_config()
    if model.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return False
    if getattr(config, "sliding_window", None) or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
    ):
        return False
    if not getattr(model, "_supports_sdpa", False) or not model._can_set_attn_implementation():
        return False
    if PACKED_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        _PACKED_CALL = contextvars.ContextVar("tunelab_packed_call", default=False)

        def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
            bounds = kwargs.get("cu_seq_lens_q")
            if bounds is None:
                return sdpa_attention_forward(
                    module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
                )
            bounds = bounds.tolist()
            gqa = query.shape[1] != key.shape[1]
            # On the CPU, SDPA's flash kernel is 2.5-2.9x faster forward and backward in fp32
            # than in bf16 for 40-150-token sequences (bf16 is upcast inside, tile by tile),
            # and more exact: a half-precision row attends in fp32 and comes back in its dtype.
            dtype = query.dtype
            upcast = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            if upcast:  # and outside the trainer's bf16 autocast, which would cast them back
                query, key, value = query.float(), key.float(), value.float()
            with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
                parts = [
                    F.scaled_dot_product_attention(
                        query[:, :, start:end],
                        key[:, :, start:end],
                        value[:, :, start:end],
                        dropout_p=dropout,
                        is_causal=True,
                        scale=scaling,
                        enable_gqa=gqa,
                    )
                    for start, end in zip(bounds, bounds[1:])
                ]
            out = torch.cat(parts, 2).transpose(1, 2).contiguous()
            return (out.to(dtype) if upcast else out), None

        def mask(*args, **kwargs):
            return None if _PACKED_CALL.get() else sdpa_mask(*args, **kwargs)

        AttentionInterface.register(PACKED_ATTENTION, attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION


def packed_call(model, kwargs: dict):
    """``model(**kwargs)`` for one padding-free row (``position_ids`` restarting at 0 at each
    example): with the packed attention installed, each example attends one causal SDPA of its
    own (its bounds as ``cu_seq_lens_q``); otherwise the model's own attention."""
    import torch

    positions = kwargs.get("position_ids")
    if (
        _PACKED_CALL is None
        or positions is None
        or positions.shape[0] != 1
        or kwargs.get("attention_mask") is not None
        or getattr(getattr(model, "config", None), "_attn_implementation", None) != PACKED_ATTENTION
    ):
        return model(**kwargs)
    starts = (positions[0] == 0).nonzero().squeeze(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        return model(**kwargs)
    bounds = torch.cat([starts, starts.new_tensor([positions.shape[1]])]).to(torch.int32)
    return call_with_bounds(model, kwargs, bounds)


def call_with_bounds(model, kwargs: dict, bounds):
    """``model(**kwargs)`` on a packed row whose sequences end at ``bounds`` (cumulative, from
    0): the packed attention gets them as ``cu_seq_lens_q`` and builds no mask."""
    longest = int((bounds[1:] - bounds[:-1]).max())
    kwargs = {**kwargs, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}
    kwargs.update(max_length_q=longest, max_length_k=longest)
    token = _PACKED_CALL.set(True)
    try:
        return model(**kwargs)
    finally:
        _PACKED_CALL.reset(token)


def pack_rows(input_ids, attention_mask):
    """A right-padded batch as one padding-free row: (ids [1, T], position_ids [1, T],
    cu_seq_lens [rows + 1], the row's index of every padded position [rows, L]), or None when
    a row is not right-padded (a gap or left padding)."""
    import torch

    lengths = attention_mask.sum(1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    keep = columns[None] < lengths[:, None]
    if not torch.equal(keep, attention_mask.bool()):
        return None
    bounds = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    positions = columns.expand_as(input_ids)
    return input_ids[keep][None], positions[keep][None], bounds.to(torch.int32), bounds[:-1, None] + columns[None]


def use_label_positions_head(model, outputs: tuple[str, ...] = FUSED_OUTPUTS) -> bool:
    """Make DPO's and KTO's log-probabilities on the CPU cost only the answer tokens, on
    padding-free rows.

    TRL 1.16 patches the model with a fused LM head (``fused_lm_head=True`` returns per-token
    log-probabilities). Off Triton devices it projects *every* position, prompt and padding
    included, through the 49k-column vocabulary in tiles: on SmolLM2 with 512-token pairs that
    head was most of a DPO step on this CPU. Here, on the CPU, the labelled positions alone
    are projected (one ``log_softmax`` over them) and the fields TRL reads (log_probs,
    entropy, mean_logits, is_top1, log_sum_sq_probs) are scattered back: the same values, the
    same gradients (tests/test_preference.py compares them with TRL's).

    TRL 1.16's DPO pads its batches (its padding_free falls back to padding). Where the
    model takes packed rows (:func:`use_packed_attention`), the padded batch TRL hands over is
    laid end to end in one row (:func:`pack_rows`) before the model runs, so no compute goes
    to padding and attention is per sequence; the results come back in TRL's padded shape.
    Models that scale or soft-cap their logits, and batches whose labelled logits would pass
    LABEL_LOGITS_LIMIT, take TRL's path.

    ``outputs`` are the fields the trainer asked TRL's head for (``add_fused_lm_head``), the
    others are None, as there; log_probs always. Returns whether the head was installed."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    if any(getattr(text_config, name, None) not in (None, 1.0) for name in _SCALED_LOGITS):
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    trl_forward = model.forward  # TRL's fused forward (or the model's own)
    packs = use_packed_attention(model)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        lm_head = self.get_output_embeddings()
        eligible = fused_lm_head and labels is not None and shift_labels is None
        if eligible:
            mask = labels[:, 1:] != -100
            eligible = 0 < int(mask.sum()) * lm_head.weight.shape[0] <= LABEL_LOGITS_LIMIT
        if not eligible or kwargs.get("output_router_logits"):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        packed = None
        if packs and not args and kwargs.get("attention_mask") is not None and kwargs.get("input_ids") is not None:
            if not any(kwargs.get(k) is not None for k in ("position_ids", "inputs_embeds", "past_key_values")):
                packed = pack_rows(kwargs["input_ids"], kwargs["attention_mask"])
        if packed is None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1][mask]
        else:
            ids, positions, bounds, index = packed
            kwargs.update(input_ids=ids, position_ids=positions, attention_mask=None)
            hidden = call_with_bounds(self.base_model, kwargs, bounds).last_hidden_state[0]
            hidden = hidden[index[:, :-1][mask]]
        targets = labels[:, 1:][mask]
        logits = lm_head(hidden).float()  # [labelled positions, vocab]
        logp = torch.log_softmax(logits, -1)
        picked = logp.gather(-1, targets[:, None])[:, 0]

        def scatter(values):
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        fields = {}
        # A training-mode call without gradients is the reference's (or KTO's KL completions'):
        # its trainer reads the log-probabilities alone, so the metric fields are left out.
        if torch.is_grad_enabled() or not self.training:
            with torch.no_grad():
                if "entropy" in outputs:  # in blocks of rows: the temporaries stay in cache
                    fields["entropy"] = torch.cat([-(b.exp() * b).sum(-1) for b in logp.detach().split(64)])
                if "log_sum_sq_probs" in outputs:
                    fields["log_sum_sq_probs"] = torch.logsumexp(2 * logp, -1)
                if "mean_logits" in outputs:
                    fields["mean_logits"] = logits.mean(-1)
                if "is_top1" in outputs:
                    fields["is_top1"] = logits.argmax(-1) == targets
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-picked.sum() / denominator,
            log_probs=scatter(picked),
            **{name: scatter(values) for name, values in fields.items()},
            label_mask=mask,
            aux_loss=None,
        )

    model.forward = types.MethodType(forward, model)
    return True


def preference_trainer_class(stage: str, loss: str):
    """TRL's trainer for a preference stage, taking the data tokenized by
    :func:`tokenize_preferences` (prompts and answers rendered by engine.templates, not by
    TRL's own chat-template pass, so every stage trains on the same text as SFT).

    dpo: DPOTrainer; kto: KTOTrainer (with its KL completions: each batch's answers rotated
    by one); orpo: ORPOTrainer, or CPOTrainer for the simpo and cpo losses.
    """
    if stage == "dpo":
        from trl import DPOTrainer

        class TunelabDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids

        return TunelabDPOTrainer
    if stage == "kto":
        from trl import KTOTrainer

        class TunelabKTOTrainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if not self.calculate_KL:
                    return dataset

                def rotate(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

        return TunelabKTOTrainer
    if loss == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    else:
        from trl.experimental.cpo import CPOTrainer as base

    class TunelabOddsRatioTrainer(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Its batches hold chosen_/rejected_ ids, not input_ids: count their real tokens here.
            import torch

            tokens = sum(inputs[f"{side}_attention_mask"].sum() for side in ("chosen", "rejected"))
            tokens = torch.as_tensor(tokens, device=self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())
            return super().training_step(model, inputs, num_items_in_batch)

        def tokenize_row(self, feature, model=None):
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

    return TunelabOddsRatioTrainer


_DROPOUT_CLASS = None


def cheap_dropout(p: float):
    """A dropout module for the CPU that draws a third of the random numbers.

    ``torch.nn.Dropout`` draws one random number per element, ~2.6 ns each on this CPU:
    LoRA's dropout on the inputs of 210 projections was ~16% of a SmolLM2 LoRA step. This
    one fills one 64-bit random word per 4 elements and keeps an element when its 15
    random bits are at least ``round(p * 32768)``: the same Bernoulli mask up to a keep
    probability rounded to 1/32768, scaled to keep the expectation (0.6 ms against 1.7 ms
    for a 640 x 576 activation)."""
    global _DROPOUT_CLASS
    if _DROPOUT_CLASS is None:
        import torch

        class CheapDropout(torch.nn.Module):
            def __init__(self, p: float):
                super().__init__()
                self.p = p
                self.threshold = round(p * 32768)
                self.scale = 1.0 / (1.0 - self.threshold / 32768)

            def forward(self, x):
                if not self.training or self.threshold == 0:
                    return x
                n = x.numel()
                words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
                bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF
                return x.masked_fill(bits < self.threshold, 0) * self.scale

            def extra_repr(self) -> str:
                return f"p={self.p}"

        _DROPOUT_CLASS = CheapDropout
    return _DROPOUT_CLASS(p)


def use_cheap_dropout(model) -> int:
    """Swap the LoRA/DoRA dropout modules of a CPU model for :func:`cheap_dropout`; how many."""
    import torch

    if next(model.parameters()).device.type != "cpu":
        return 0
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    dropouts[name] = cheap_dropout(layer.p)
                    swapped += 1
    return swapped


def build_trainer(config: RunConfig, run_dir: Path, train_records, val_records, callbacks=()):
    """Tokenizer, model and the stage's trainer for ``config``; returns (trainer, info dict)."""
    from engine.models import resolve_model

    if not sys.stderr.isatty():  # train.log: no progress bars for the dataset preparation
        import datasets

        datasets.disable_progress_bars()
    precision, precision_reason = resolve_precision(config)
    say(f"precision {precision}: {precision_reason}")
    model_dir = resolve_model(config.model.name_or_path, progress=say)
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    template, template_source = templates.model_template(tokenizer, config.model.chat_template)
    template = templates.inference_template(template)
    tokenizer.chat_template = template  # what adapter/ or model/ will carry: the template trained with
    stage = config.training.stage
    assistant_only = config.training.assistant_only_loss or stage != "sft"
    say(
        f"stage {stage}{'' if stage == 'sft' else f' (loss {config.loss_type}, beta {config.training.beta:g})'}; "
        f"chat template: {templates.template_name(template)} ({template_source}); loss on "
        f"{'assistant tokens only' if assistant_only else 'every token'}"
    )

    cutoff = config.data.max_length
    if stage == "sft":
        train_ds = tokenize_conversations(train_records, tokenizer, template, assistant_only, "train", cutoff)
        val_ds = (
            tokenize_conversations(val_records, tokenizer, template, assistant_only, "validation", cutoff)
            if val_records
            else None
        )
    else:
        train_ds = tokenize_preferences(train_records, tokenizer, template, stage, "train", cutoff)
        val_ds = (
            tokenize_preferences(val_records, tokenizer, template, stage, "validation", cutoff) if val_records else None
        )
    summary = runs.read_json(run_dir / runs.DATA_FILE)  # written by train() before this
    if stage == "sft" and is_main_process() and len(train_ds) and summary is not None:
        # The token lengths the plan sizes memory and time by, for a page that reattaches.
        lengths = [len(ids) for ids in train_ds["input_ids"]]
        summary.update(mean_tokens=round(sum(lengths) / len(lengths), 1), longest_tokens=max(lengths))
        runs.write_json(run_dir / runs.DATA_FILE, summary)

    peft_config, quantization = method_configs(config.method, precision)
    model = load_model(model_dir, config, precision, quantization)
    start = start_adapter(config, model_dir)
    if start is not None:
        model = continue_adapter(model, start, stage)
        peft_config = None
    if stage == "sft":
        args = sft_config(config, run_dir, precision, has_eval=val_ds is not None)
        cls = trainer_class()
    else:
        args = preference_config(config, run_dir, precision, has_eval=val_ds is not None)
        cls = preference_trainer_class(stage, config.loss_type)
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks) or None,
    )
    if quantization is not None and precision == "fp32":
        # TRL casts QLoRA adapter weights to bf16 (the paper's recipe for GPUs); a run in
        # fp32 (no bf16 hardware) keeps them in fp32 like everything else it computes.
        import torch

        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype == torch.bfloat16:
                param.data = param.data.float()
    use_cheap_dropout(trainer.model)
    # One CPU process (DeepSpeed's engines wrap the model; a ZeRO-3 run failed with it).
    if stage == "sft" and next(trainer.model.parameters()).device.type == "cpu" and world_size() == 1:
        trainer.bf16_adapter_inputs = config.method.name == "lora" and quantization is None
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if use_packed_attention(base):
            say("padding-free batches: one causal attention per example (no block-diagonal mask)")
    if stage in ("dpo", "kto"):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        # The fields each trainer asks TRL's fused head for (DPOTrainer/KTOTrainer.__init__).
        policy = ("log_probs", "entropy", "mean_logits")
        if stage == "dpo":
            policy += ("is_top1",) + (("log_sum_sq_probs",) if trainer.use_weighting else ())
        for model_, outputs in ((base, policy), (getattr(trainer, "ref_model", None), ("log_probs",))):
            if hasattr(model_, "get_output_embeddings") and use_label_positions_head(model_, outputs):
                packed = model_.config._attn_implementation == PACKED_ATTENTION
                say(
                    f"log-probabilities of the answer tokens only ({type(model_).__name__})"
                    + (", padding-free batches" if packed else "")
                )
    if len(trainer.train_dataset) == 0:
        raise TrainingDataError(
            f"no training example keeps any {'assistant ' if assistant_only else ''}token within "
            f"data.max_length={config.data.max_length} (the prompts alone fill it): raise data.max_length"
        )
    info = {
        "model_dir": str(model_dir),
        "precision": precision,
        "precision_reason": precision_reason,
        "chat_template": f"{templates.template_name(template)} ({template_source})",
        "stage": stage,
        "reference": reference_of(config, start),
        "start_adapter": str(start) if start else None,
        "train_examples": len(trainer.train_dataset),
        "validation_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
    }
    return trainer, info


# --------------------------------------------------------------------------- evaluation


def _eval_loss(trainer) -> float:
    return float(trainer.evaluate()["eval_loss"])


def _loss_entry(loss: float | None) -> dict | None:
    if loss is None:
        return None
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4)}


def evaluate_base_vs_tuned(trainer, config: RunConfig, base_loss: float | None, n_examples: int) -> dict:
    """Validation loss and perplexity of the base and the tuned model (eval.json).

    The loss is on the same tokens as training (assistant tokens unless configured
    otherwise). For adapters the base is the same model with the adapter switched off;
    for full fine-tuning it was measured before training.
    """
    tuned = _eval_loss(trainer)
    if config.method.is_peft:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        with unwrapped.disable_adapter():
            base_loss = _eval_loss(trainer)
    result = {
        "split": "validation",
        "examples": n_examples,
        "loss_on": "assistant tokens" if config.training.assistant_only_loss else "all tokens",
        "base": _loss_entry(base_loss),
        "tuned": _loss_entry(tuned),
    }
    if base_loss is not None:
        result["loss_change"] = round(tuned - base_loss, 5)
    else:
        result["note"] = "base not measured: full fine-tuning measures it before training, which DeepSpeed runs skip"
    if config.method.name == "qlora":
        result["note"] = "base = the 4-bit quantised base model the adapter was trained on"
    return result


def evaluate_preferences(trainer, config: RunConfig, n_examples: int) -> dict:
    """The stage's loss and reward metrics on the validation split (eval.json). The base has
    no entry: its rewards are zero by definition (the reference is the model before training)."""
    metrics = trainer.evaluate()
    tuned = {"loss": round(float(metrics["eval_loss"]), 5)}
    tuned.update({k.removeprefix("eval_"): v for k, v in preference_metrics(metrics, "eval_").items()})
    return {
        "split": "validation",
        "examples": n_examples,
        "stage": config.training.stage,
        "loss_type": config.loss_type,
        "loss_on": "answer tokens",
        "base": None,
        "tuned": tuned,
        "note": "rewards are beta x log-probability ratios against the reference model; the base's are zero",
    }


# --------------------------------------------------------------------------- the recipe


def train(config: RunConfig, run_dir: str | Path, stop: StopFlag | None = None, callbacks=()) -> dict:
    """Train as ``config`` says, writing ``run_dir``.

    Returns a summary: ``state`` (``completed``, or ``aborted`` when a stop was requested),
    steps, losses, ``eval`` and ``trainer`` (the SFTTrainer, for tests and notebooks).
    Errors propagate (see classify_error). Extra TrainerCallbacks may be given.
    """
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from engine.data import load_for_training

    run_dir = Path(run_dir)
    stop = stop or STOP
    main_process = is_main_process()

    # 1. Seed: PEFT initialises adapters randomly, so before the model exists. What the run
    # is made of (versions, machine, data checksum, seeds) goes to environment.json, and the
    # trackers learn where to write before transformers' callbacks start.
    set_seed(config.training.seed)
    if main_process:
        runs.write_json(run_dir / runs.ENVIRONMENT_FILE, recipe.environment(config))
    tracking.prepare(run_dir, config.training.report_to)

    # 2. Data: read, validate, split.
    stage = config.training.stage
    loaded, train_records, val_records = load_for_training(config.data, stage)
    say(
        f"data {config.data.path}: format {loaded.format}, {len(loaded.records)} usable of {loaded.total} "
        f"records ({loaded.skipped} skipped); train {len(train_records)}, validation {len(val_records)}"
    )
    runs.write_json(
        run_dir / runs.DATA_FILE,
        {
            "path": str(config.data.path),
            "format": loaded.format,
            "stage": stage,
            "total": loaded.total,
            "usable": len(loaded.records),
            "skipped": loaded.skipped,
            "train": len(train_records),
            "validation": len(val_records),
            "validation_split": config.data.validation_split,
            "seed": config.data.seed,
        },
    )
    for problem in loaded.problems[:5]:
        say(f"  skipped: {problem}")
    for warning in loaded.warnings:
        say(f"  note: {warning}")
    if not train_records:
        raise TrainingDataError(f"{config.data.path}: no record left to train on")

    # 3 + 4. Model, tokenizer, PEFT/quantisation and the trainer.
    checkpoint = None
    checkpoints_dir = run_dir / runs.CHECKPOINTS_DIR
    if config.training.resume and checkpoints_dir.is_dir():
        checkpoint = get_last_checkpoint(str(checkpoints_dir))
    monitor = RunMonitor(run_dir, stop, elapsed_before=_elapsed_so_far(run_dir) if checkpoint else 0.0)
    trainer, info = build_trainer(config, run_dir, train_records, val_records, [monitor, *callbacks])
    if main_process:
        runs.update_status(
            run_dir,
            precision=info["precision"],
            precision_reason=info["precision_reason"],
            stage=stage,
            reference=info["reference"],
        )
    has_eval = trainer.eval_dataset is not None

    # Base loss for full fine-tuning is measured before its weights change (adapters
    # measure theirs after training, with the adapter switched off).
    base_loss = None
    eval_path = run_dir / runs.EVAL_FILE
    if has_eval and not config.method.is_peft and stage == "sft":
        previous = runs.read_json(eval_path) or {}
        if checkpoint and previous.get("base"):
            base_loss = previous["base"]["loss"]
        elif not checkpoint and config.distributed.deepspeed == "none":
            monitor.enabled = False
            base_loss = _eval_loss(trainer)
            monitor.enabled = True
            if main_process:
                eval_path.write_text(json.dumps({"base": _loss_entry(base_loss)}, indent=2) + "\n")

    # 5. Train (from the last checkpoint when resuming).
    if checkpoint:
        say(f"resuming from {Path(checkpoint).name}")
    elif config.training.resume:
        say("resume asked, but there is no checkpoint yet: starting from step 0")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    monitor.close()
    summary = {
        **info,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train_loss": result.training_loss,
        "train_seconds": round(time.time() - started, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "trainer": trainer,
    }
    if stop.requested:
        say(f"stopped at step {trainer.state.global_step}; checkpoint saved in {checkpoints_dir}")
        return {**summary, "state": "aborted"}

    # 6. Save: the adapter (PEFT layout) or the full model, with the tokenizer, so the
    # directory loads on its own.
    out_dir = run_dir / (runs.ADAPTER_DIR if config.method.is_peft else runs.MODEL_DIR)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # DPO/KTO's frozen reference copy is not part of the result
        unwrapped.set_adapter("default")
    trainer.save_model(str(out_dir))
    say(f"saved {out_dir}")

    # 7. Evaluate base against tuned on the validation split.
    if has_eval and not stop.requested:
        monitor.enabled = False
        if stage == "sft":
            evaluation = evaluate_base_vs_tuned(trainer, config, base_loss, len(trainer.eval_dataset))
            message = f"validation loss: base {evaluation['base']}, tuned {evaluation['tuned']}"
        else:
            evaluation = evaluate_preferences(trainer, config, len(trainer.eval_dataset))
            message = f"validation ({stage}): {evaluation['tuned']}"
        if main_process:
            eval_path.write_text(json.dumps(evaluation, indent=2) + "\n")
            say(message)
        summary["eval"] = evaluation
    return {**summary, "state": "completed"}


# --------------------------------------------------------------------------- errors


def classify_error(err: BaseException) -> tuple[str, str]:
    """(error class, one sentence) for a failure a person has to act on."""
    from engine.data import DataError
    from engine.models import ModelNotFoundError

    text = f"{type(err).__name__}: {err}"
    if isinstance(err, (DataError, TrainingDataError)):
        return runs.ERROR_BAD_DATA, str(err)
    if isinstance(err, ModelNotFoundError):
        return runs.ERROR_MODEL_NOT_FOUND, str(err)
    if isinstance(err, ConfigError):
        return runs.ERROR_CONFIG, str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower():
        return runs.ERROR_OOM, (
            f"{text.splitlines()[0]} -- lower training.batch_size or data.max_length, use qlora, turn on "
            "training.gradient_checkpointing, or use DeepSpeed ZeRO with offload"
        )
    if isinstance(err, OSError) and ("config.json" in str(err) or "does not appear to have" in str(err)):
        return runs.ERROR_MODEL_NOT_FOUND, str(err)
    return runs.ERROR_OTHER, text


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    from engine.config import add_set_argument

    parser = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Train one run from a YAML config (see engine/config.py); writes a run directory.",
    )
    parser.add_argument("--config", required=True, help="Run config (YAML).")
    add_set_argument(parser)
    parser.add_argument(
        "--run-dir", help="Run directory to write (made if missing). Default: a new one in output.runs_dir."
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="Measure instead of training: a few steps on the longest examples, then probe.json (engine/probe.py).",
    )
    return parser.parse_args(argv)


def _fail(run_dir: Path | None, error_class: str, message: str, supervised: bool) -> int:
    print(f"[tunelab] failed ({error_class}): {message}", file=sys.stderr, flush=True)
    if run_dir is not None and is_main_process() and run_dir.is_dir():
        runs.update_status(
            run_dir,
            state="failed",
            error_class=error_class,
            error=message,
            ended_at=time.time(),
            log_tail=None if supervised else runs.tail_log(run_dir, 30) or None,
        )
    return EXIT_FAILED


def main(argv=None) -> int:
    args = parse_args(argv)
    STOP.install()
    supervised = os.environ.get("TUNELAB_SUPERVISED") == "1"  # engine.launch sends our output to train.log
    launched = "LOCAL_RANK" in os.environ  # started by accelerate launch / torchrun
    main_process = is_main_process()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else None

    # 1. Config, and the run directory it writes.
    try:
        config = RunConfig.load(args.config).with_overrides(args.overrides)
        if not launched and (config.distributed.num_processes > 1 or config.distributed.deepspeed != "none"):
            raise ConfigError(
                "distributed",
                f"this config asks for {config.distributed.num_processes} process(es) with DeepSpeed "
                f"{config.distributed.deepspeed}: start it with `tunelab train --config FILE`, or with the "
                "accelerate command `tunelab train --config FILE --print-command` prints",
            )
        if run_dir is None:
            if world_size() > 1:
                raise ConfigError("--run-dir", "several processes must share one run directory: pass --run-dir")
            run_dir = runs.create_run(config)
        elif main_process and not (run_dir / runs.CONFIG_FILE).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            config.output.run_id = run_dir.name
            config.output.runs_dir = str(run_dir.parent)
            config.save(run_dir / runs.CONFIG_FILE)
    except ConfigError as err:
        return _fail(run_dir, runs.ERROR_CONFIG, str(err), supervised)
    run_dir.mkdir(parents=True, exist_ok=True)

    if main_process and not supervised:
        log = (run_dir / runs.LOG_FILE).open("a", encoding="utf-8")
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        command = [sys.executable, "-m", "engine.train", *(sys.argv[1:] if argv is None else argv)]
        (run_dir / runs.COMMAND_FILE).write_text(shlex.join(command) + "\n")
    if main_process:
        fields = {"state": "running", "trainer_pid": os.getpid(), "host": socket.gethostname()}
        if not supervised:
            fields.update(pid=os.getpid(), pid_started=runs.process_identity(os.getpid()), started_at=time.time())
        runs.update_status(run_dir, **fields)
    say(f"run {run_dir}")

    # 2-7. The recipe.
    try:
        if args.probe:
            from engine import probe

            summary = probe.run(config, run_dir, sys.modules[__name__])
        else:
            summary = train(config, run_dir)
        # The work is saved: a late or repeated stop request must not turn this clean exit
        # into a death by SIGTERM (Python restores the default handler while it shuts down).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        return _fail(run_dir, runs.ERROR_KILLED, "interrupted (Ctrl-C)", supervised)
    except Exception as err:  # record why, for the UI and the queue, then exit non-zero
        import traceback

        traceback.print_exc()
        error_class, message = classify_error(err)
        return _fail(run_dir, error_class, message, supervised)
    if main_process:
        runs.update_status(
            run_dir,
            state=summary["state"],
            ended_at=time.time(),
            step=summary["global_step"],
            max_steps=summary["max_steps"],
            train_loss=summary["train_loss"],
            tokens_seen=summary["tokens_seen"],
            error_class=None,
            error=None,
        )
    say(f"{summary['state']} at step {summary['global_step']}/{summary['max_steps']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

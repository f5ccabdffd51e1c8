"""Typed configuration of a run: model, data, method, training, distributed, output.

One dataclass per concern, each with help text (``field(metadata={"help": ...})``) and
checks in ``__post_init__``. A :class:`RunConfig` is read from and written to YAML; every
problem raises :class:`ConfigError` naming the field (``training.learning_rate``) and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from engine.messages import Message

METHODS = ("lora", "qlora", "dora", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEEPSPEED_STAGES = ("none", "zero2", "zero3")
DATA_FORMATS = ("auto", "openai", "sharegpt", "alpaca", "qa", "preference", "unpaired")
ON_ERROR = ("skip", "stop")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Experiment trackers, through transformers' integrations (engine/tracking.py says where each writes).
TRACKERS = ("trackio", "tensorboard", "mlflow", "wandb")
# Training stages: supervised fine-tuning, then preference tuning on TRL's trainers (DPOTrainer,
# KTOTrainer, and ORPOTrainer / CPOTrainer from trl.experimental).
STAGES = ("sft", "dpo", "kto", "orpo")
# The losses of each stage, the first its default. orpo's "simpo" is CPOConfig(loss_type="simpo",
# cpo_alpha=0.0), the reference-free choice; "cpo" is CPO's sigmoid loss with its NLL term.
STAGE_LOSSES = {
    "sft": ("nll",),
    "dpo": ("sigmoid", "ipo", "robust", "hinge", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "bco_pair"),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": ("orpo", "simpo", "cpo"),
}
LOSS_TYPES = ("auto",) + tuple(dict.fromkeys(loss for losses in STAGE_LOSSES.values() for loss in losses))

# Learning rates that work for each method (adapters tolerate much larger steps).
DEFAULT_LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "full": 2e-5}
# Preference stages take smaller steps (DPO recipes use 5e-6..5e-7 full, ~5e-5 LoRA).
PREFERENCE_LR_FACTOR = 0.25

# Serving (`tunelab ui`, `tunelab serve`, engine.serve): replies generated at the same time,
# all users together (the playground's and, separately, the API's), and what the API adds.
CHAT_CONCURRENCY = 4
SERVE_PORT = 8000
SERVE_API_KEY_ENV = "TUNELAB_API_KEY"
SERVE_QUEUE = 16  # API requests that may wait for a slot; more are answered 503
SERVE_MAX_BODY_BYTES = 1024 * 1024  # a larger request body is answered 413


class ConfigError(ValueError):
    """A configuration problem; ``field`` is the dotted name of the offending field.

    ``message`` is English text, or an engine.messages.Message (kept as ``coded``: the web
    page words it in the visitor's language)."""

    def __init__(self, field_name: str, message):
        self.field = field_name
        self.coded = message if isinstance(message, Message) else None
        super().__init__(f"{field_name}: {message}")


def _msg(code: str, **params) -> Message:
    return Message(code, params)


def tracker_list(value: Any) -> list[str]:
    """``training.report_to`` as a list of names: ``none`` or empty -> [], ``"a,b"`` -> [a, b]."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items]
    return [n for n in dict.fromkeys(names) if n and n != "none"]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, _msg("config_not_one_of", value=repr(value), allowed=", ".join(allowed)))


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if allow_zero and value == 0:
        return
    if value is None or value <= 0:
        raise ConfigError(name, _msg("config_non_negative" if allow_zero else "config_positive", value=repr(value)))


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "The embedded model 'smollm2-135m-instruct', a local directory, or a Hub id 'org/name'.",
            "label": "Model",
            "form_name": "model",
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped with a Hub model. Refused unless the operator sets "
            "TUNELAB_ALLOW_REMOTE_CODE=1.",
            "label": "Trust remote code",
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A Jinja chat template to use instead of the tokenizer's (optional).",
            "label": "Chat template (empty = the tokenizer's)",
            "lines": 2,
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continue from the adapter of a finished run (its folder, or its name in output.runs_dir) "
            "trained on the same base: the usual recipe is SFT, then DPO. Empty: a fresh adapter.",
            "label": "Start from the adapter of run (optional)",
        },
    )

    def __post_init__(self):
        if not str(self.name_or_path).strip():
            raise ConfigError("model.name_or_path", "must not be empty")
        if self.adapter is not None and not str(self.adapter).strip():
            self.adapter = None


@dataclass
class DataConfig:
    """Chosen on the Data tab; the Train tab takes this section from that choice, not from its form."""

    path: str = field(default="", metadata={"help": "Dataset file or directory (JSONL, JSON, CSV, TSV, Parquet)."})
    format: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(DATA_FORMATS)}; 'auto' detects it.", "choices": DATA_FORMATS},
    )
    validation_split: float = field(
        default=0.1, metadata={"help": "Fraction of records held out for evaluation (0 disables)."}
    )
    max_length: int = field(default=1024, metadata={"help": "Cutoff length in tokens; longer examples are truncated."})
    on_error: str = field(
        default="skip", metadata={"help": "'skip' bad records (they are listed) or 'stop'.", "choices": ON_ERROR}
    )
    max_records: int | None = field(default=None, metadata={"help": "Use only the first N valid records."})
    persona: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Values for {{placeholders}} in the data, e.g. {name: Ada}."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt added to records that have none."})
    seed: int = field(default=42, metadata={"help": "Seed of the train/validation split."})

    def __post_init__(self):
        _choice("data.format", self.format, DATA_FORMATS)
        _choice("data.on_error", self.on_error, ON_ERROR)
        if not 0 <= self.validation_split < 1:
            raise ConfigError("data.validation_split", _msg("config_fraction", value=repr(self.validation_split)))
        _positive("data.max_length", self.max_length)
        if self.max_records is not None:
            _positive("data.max_records", self.max_records)


@dataclass
class MethodConfig:
    name: str = field(
        default="lora",
        metadata={
            "help": f"Fine-tuning method: {', '.join(METHODS)}.",
            "label": "Method",
            "choices": METHODS,
            "form_name": "method",
        },
    )
    r: int = field(default=16, metadata={"help": "LoRA rank.", "label": "Rank r", "minimum": 1})
    alpha: int = field(
        default=32,
        metadata={
            "help": "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).",
            "label": "Alpha",
            "minimum": 1,
        },
    )
    dropout: float = field(
        default=0.05,
        metadata={
            "help": "Dropout on the LoRA input.",
            "label": "Dropout (probability)",
            "minimum": 0,
            "maximum": 0.99,
            "step": 0.01,
        },
    )
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "'all-linear' or a list of module names (q_proj, v_proj, ...).", "label": "Target modules"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling.", "label": "rsLoRA"})

    def __post_init__(self):
        _choice("method.name", self.name, METHODS)
        _positive("method.r", self.r)
        _positive("method.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError("method.dropout", _msg("config_fraction", value=repr(self.dropout)))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if not self.target_modules:
            raise ConfigError("method.target_modules", _msg("config_target_modules"))

    @property
    def is_peft(self) -> bool:
        return self.name != "full"


@dataclass
class TrainingConfig:
    stage: str = field(
        default="sft",
        metadata={
            "help": "sft (chat data), or preference tuning: dpo (chosen/rejected pairs), kto (pairs, or "
            "prompt/completion/label records), orpo (pairs; no reference model).",
            "label": "Stage",
            "choices": STAGES,
        },
    )
    loss_type: str = field(
        default="auto",
        metadata={
            "help": "The stage's loss; auto = its standard one. "
            + "; ".join(f"{stage}: {', '.join(losses)}" for stage, losses in STAGE_LOSSES.items())
            + ".",
            "label": "Loss (auto = the stage's own)",
            "choices": LOSS_TYPES,
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Preference stages: how far the model may move from the reference (DPO/KTO beta; ORPO's "
            "odds-ratio weight lambda; SimPO's reward scale).",
            "label": "Beta (preference stages)",
            "minimum": 0,
            "step": 0.01,
        },
    )
    precompute_reference: bool = field(
        default=False,
        metadata={
            "help": "dpo/kto with method full: compute the reference model's log-probabilities once before "
            "training instead of keeping a reference copy of the model in memory (adapters need neither: "
            "their reference is the base with the adapter off).",
            "label": "Precompute reference log-probs (full)",
        },
    )
    num_epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the training split.", "label": "Epochs (passes)", "minimum": 0.01, "step": 0.5},
    )
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "Stop after this many optimizer steps (-1: use epochs).",
            "label": "Max steps (optimizer steps, -1 = use epochs)",
            "minimum": -1,
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate; empty (0 in the app) picks the method's default (LoRA 2e-4, full 2e-5; "
            "a quarter of that for preference stages).",
            "label": "Learning rate (0 = the method's default)",
            "minimum": 0,
            "step": 1e-5,
        },
    )
    batch_size: int = field(
        default=4,
        metadata={"help": "Examples per device per step.", "label": "Batch size (examples / device)", "minimum": 1},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Steps accumulated per optimizer step.",
            "label": "Gradient accumulation (steps)",
            "minimum": 1,
        },
    )
    warmup_ratio: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of steps with a linear warm-up.",
            "label": "Warm-up (fraction of steps)",
            "minimum": 0,
            "maximum": 0.99,
            "step": 0.01,
        },
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay.", "label": "Weight decay", "minimum": 0, "step": 0.01}
    )
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": f"One of {', '.join(SCHEDULERS)}.", "label": "LR schedule", "choices": SCHEDULERS},
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm.", "label": "Gradient clipping (norm)", "minimum": 0}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (from the hardware), fp32, bf16 or fp16.", "label": "Precision", "choices": PRECISIONS},
    )
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Loss on assistant tokens only.", "label": "Loss on assistant tokens only"}
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack several examples into one sequence.", "label": "Packing"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Trade compute for activation memory.", "label": "Gradient checkpointing"},
    )
    logging_steps: int = field(
        default=1,
        metadata={"help": "Write a metrics line every N steps.", "label": "Log every (steps)", "minimum": 1},
    )
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "Evaluate every N steps (0: at the end only).",
            "label": "Evaluate every (steps, 0 = at the end)",
            "minimum": 0,
        },
    )
    save_steps: int = field(
        default=50, metadata={"help": "Checkpoint every N steps.", "label": "Checkpoint every (steps)", "minimum": 1}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "Checkpoints kept.", "label": "Checkpoints kept", "minimum": 1}
    )
    seed: int = field(default=42, metadata={"help": "Random seed.", "label": "Seed"})
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Experiment trackers that also log the run, several allowed (trackio, tensorboard, mlflow, "
            "wandb); none: only the run's own metrics.jsonl. They write beside the runs, in runs/.tracking/.",
            "label": "Experiment tracking",
            "choices": TRACKERS,
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Resume from the last checkpoint of the run.", "form": False},  # the Runs tab resumes
    )

    def __post_init__(self):
        _choice("training.stage", self.stage, STAGES)
        _choice("training.loss_type", self.loss_type, LOSS_TYPES)
        if self.loss_type != "auto" and self.loss_type not in STAGE_LOSSES[self.stage]:
            raise ConfigError(
                "training.loss_type",
                f"{self.loss_type!r} is not a loss of stage {self.stage}; "
                f"choose auto or one of {', '.join(STAGE_LOSSES[self.stage])}",
            )
        _positive("training.beta", self.beta)
        _positive("training.num_epochs", self.num_epochs)
        if self.max_steps != -1:
            _positive("training.max_steps", self.max_steps)
        if self.learning_rate is not None:
            _positive("training.learning_rate", self.learning_rate)
        _positive("training.batch_size", self.batch_size)
        _positive("training.gradient_accumulation_steps", self.gradient_accumulation_steps)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("training.warmup_ratio", _msg("config_fraction", value=repr(self.warmup_ratio)))
        _choice("training.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("training.precision", self.precision, PRECISIONS)
        _positive("training.logging_steps", self.logging_steps)
        _positive("training.eval_steps", self.eval_steps, allow_zero=True)
        _positive("training.save_steps", self.save_steps)
        _positive("training.save_total_limit", self.save_total_limit)
        self.report_to = tracker_list(self.report_to)
        for name in self.report_to:
            _choice("training.report_to", name, TRACKERS)


@dataclass
class DistributedConfig:
    num_processes: int = field(
        default=1,
        metadata={
            "help": "Processes (one per GPU, or CPU ranks); more than 1 uses accelerate launch.",
            "label": "Processes (one per GPU)",
            "minimum": 1,
        },
    )
    deepspeed: str = field(
        default="none",
        metadata={
            "help": "none, zero2 (shards gradients and optimizer states) or zero3 (the weights too).",
            "label": "DeepSpeed ZeRO stage",
            "choices": DEEPSPEED_STAGES,
        },
    )
    offload: bool = field(
        default=False,
        metadata={"help": "ZeRO: offload optimizer states (and zero3 params) to CPU.", "label": "Offload to CPU"},
    )
    num_machines: int = field(
        default=1,
        # multi-node runs are launched from the CLI (tunelab train --machine-rank ...), not from one page
        metadata={"help": "Nodes, for a multi-node accelerate launch.", "form": False},
    )

    def __post_init__(self):
        _positive("distributed.num_processes", self.num_processes)
        _positive("distributed.num_machines", self.num_machines)
        _choice("distributed.deepspeed", self.deepspeed, DEEPSPEED_STAGES)
        if self.offload and self.deepspeed == "none":
            raise ConfigError("distributed.offload", _msg("config_offload"))


@dataclass
class OutputConfig:
    runs_dir: str = field(
        default="runs",
        # the app decides where runs live (one folder per user on a shared app)
        metadata={"help": "Directory that holds one folder per run.", "form": False},
    )
    run_id: str | None = field(
        default=None,
        metadata={
            "help": "Folder name of the run; generated from the date, model and method if empty.",
            "label": "Run name (optional)",
            "form_name": "run_name",
        },
    )


# --------------------------------------------------------------------------- ONNX exports: variants, quality gate
# Not a section of a run's config.yaml: an export is judged after training, and the same
# run can be exported (and judged) again with other settings.

# Every ONNX export variant, named once: RUN/export/onnx-<variant> is its directory, and
# "onnx-<variant>" its backend name in the playground, the model card, `tunelab chat`,
# `tunelab eval --backends` and `tunelab serve --backend`. What each one is: engine.export.VARIANTS.
ONNX_VARIANTS = (
    "int4",
    "int4-rtn",
    "int4-kquant",
    "int4-hqq",
    "int4-gptq",
    "int4-rtn-last",
    "int4-kquant-mixed",
    "int8",
    "fp32",
)
# Auto mode (`tunelab export RUN --format onnx --precision auto`, the web app's default) builds
# these in this order, fastest decode first, and keeps the first whose verdict is faithful.
# Measured on the embedded model with a cpu-lora adapter (bench/results/exports.md): no int4
# variant is faithful there; int4-kquant-mixed comes closest (87.1% agreement, +13.3% perplexity)
# and builds in about half a minute, so it is the one int4 candidate. int4-gptq (81.7%, +25.5%)
# takes 17 minutes to build on 2 cores, int4-rtn-last (75.3%, +62.2%) and int4-hqq (59.1%) are
# broken: they stay variants to ask for, not auto candidates.
AUTO_ORDER = ("int4-kquant-mixed", "int8", "fp32")
# Exports whose onnxruntime-genai batches answer as one prompt at a time does, so an evaluation
# batches them (engine.evaluate.batch_generator): int8 gave the same greedy answers on 64 of 64
# Pip prompts at batch 8 (1.4x the one-at-a-time loop, bench/results/eval.md), fp32 is exact
# (tested). int4's MatMulNBits computes a batch differently from one row (24 of 64 the same).
ONNX_BATCH_VARIANTS = ("int8", "fp32")
# The fixed variant when one is asked for without auto (the playground's Export button, export()):
# the fastest that passed the gate on the embedded model.
DEFAULT_ONNX_VARIANT = "int8"
# The base model in fp32 with LoRA inputs, and the run's LoRA as an ONNX Runtime GenAI adapter
# file in its adapters/ folder (tunelab export RUN --adapter-file): RUN/export/onnx-lora-fp32.
ONNX_LORA_BASE = "lora-fp32"
DEFAULT_ONNX_PRECISION = "auto"
VERDICTS = ("faithful", "degraded", "broken", "unmeasured")


@dataclass
class ExportGate:
    """When an ONNX export answers like the tuned PyTorch model. Token agreement is the share
    of greedy choices equal to PyTorch's along PyTorch's own continuation of the probe chats;
    the perplexity change is relative, on the run's validation split. ``faithful`` (passes the
    gate): agreement >= faithful_agreement and |change| <= faithful_perplexity_change and
    greedy-identical replies >= faithful_greedy_identical; ``broken``: agreement <
    broken_agreement or change > broken_perplexity_change; ``degraded`` in between;
    ``unmeasured`` without a validation split of at least min_validation_chats chats.
    Set them with ``tunelab export --gate KEY=VALUE``."""

    faithful_agreement: float = field(default=0.85, metadata={"help": "Least token agreement of a faithful export."})
    faithful_perplexity_change: float = field(
        default=0.10, metadata={"help": "Largest relative perplexity change (either way) of a faithful export."}
    )
    faithful_greedy_identical: float = field(
        default=0.0, metadata={"help": "Least share of probe replies that must be greedy-identical to be faithful."}
    )
    broken_agreement: float = field(default=0.50, metadata={"help": "Below this token agreement an export is broken."})
    broken_perplexity_change: float = field(
        default=0.50, metadata={"help": "Above this relative perplexity rise an export is broken."}
    )
    min_validation_chats: int = field(
        default=4, metadata={"help": "Fewer validation chats than this: the verdict is unmeasured."}
    )

    def __post_init__(self):
        for name in ("faithful_agreement", "faithful_greedy_identical", "broken_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"gate.{name}", f"must be between 0 and 1, got {value!r}")
        for name in ("faithful_perplexity_change", "broken_perplexity_change"):
            _positive(f"gate.{name}", getattr(self, name), allow_zero=True)
        if self.broken_agreement > self.faithful_agreement:
            raise ConfigError("gate.broken_agreement", "must not be above gate.faithful_agreement")
        if self.broken_perplexity_change < self.faithful_perplexity_change:
            raise ConfigError("gate.broken_perplexity_change", "must not be below gate.faithful_perplexity_change")
        _positive("gate.min_validation_chats", self.min_validation_chats)

    @classmethod
    def from_pairs(cls, pairs: list[str] | None) -> "ExportGate":
        """From ``KEY=VALUE`` strings (``--gate faithful_agreement=0.9``)."""
        values: dict[str, Any] = {}
        for item in pairs or []:
            if "=" not in item:
                raise ConfigError("--gate", f"{item!r} is not of the form KEY=VALUE")
            key, raw = item.split("=", 1)
            values[key.strip()] = yaml.safe_load(raw)
        return _build(cls, values, "gate")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        if self.method.name == "qlora" and self.distributed.deepspeed == "zero3":
            raise ConfigError(
                "distributed.deepspeed", "QLoRA (4-bit weights) cannot be sharded with ZeRO-3; use zero2 or lora"
            )

    @property
    def learning_rate(self) -> float:
        """The configured learning rate, or the method's default (a quarter of it for preference stages)."""
        if self.training.learning_rate:
            return self.training.learning_rate
        return DEFAULT_LEARNING_RATE[self.method.name] * (1.0 if self.training.stage == "sft" else PREFERENCE_LR_FACTOR)

    @property
    def loss_type(self) -> str:
        """The stage's loss: the configured one, or the stage's standard one for auto."""
        loss = self.training.loss_type
        return STAGE_LOSSES[self.training.stage][0] if loss == "auto" else loss

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict | None) -> "RunConfig":
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError("config", f"cannot read {path}: {err.strerror}") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError("config", f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from err
        if data is not None and not isinstance(data, dict):
            raise ConfigError("config", f"{path} must hold a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML scalars)."""
        values = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError("--set", f"{item!r} is not of the form section.key=value")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            values[key.strip()] = value
        return self.with_values(values)

    def with_values(self, values: dict[str, Any]) -> "RunConfig":
        """A copy with ``{"section.key": value}`` applied and checked like a config file."""
        data = self.to_dict()
        for key, value in values.items():
            parts = key.split(".")
            if len(parts) != 2:
                raise ConfigError("--set", f"{key!r} must be section.key, e.g. training.max_steps")
            section, name = parts
            if section not in data:
                raise ConfigError(key, f"unknown section {section!r}; sections: {', '.join(data)}")
            data[section][name] = value
        return RunConfig.from_dict(data)

    def value(self, key: str) -> Any:
        """The value of ``section.key``."""
        section, name = key.split(".")
        return getattr(getattr(self, section), name)


def _build(cls, data: Any, prefix: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", f"must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(name, f"unknown field{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value or {}, name)
        else:
            kwargs[key] = _coerce(name, value, hint_type)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(prefix or "config", str(err)) from err


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a scalar against its annotation; ints are accepted for floats."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(name, _msg("config_empty"))
    if hint is bool or text == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(name, _msg("config_bool", value=repr(value)))
    if hint is int or text == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(name, _msg("config_integer", value=repr(value)))
    if hint is float or text.startswith("float"):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 2e-4 (no dot) as a string
            except ValueError:
                raise ConfigError(name, _msg("config_number", value=repr(value))) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(name, _msg("config_number", value=repr(value)))
    if text.startswith("int"):  # int | None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(name, _msg("config_integer", value=repr(value)))
    if hint is str or text.startswith("str"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(name, _msg("config_text", value=repr(value)))
    if text.startswith("dict"):
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        raise ConfigError(name, _msg("config_mapping", value=repr(value)))
    if text.startswith("list"):
        if isinstance(value, (list, str)):
            return value
        raise ConfigError(name, _msg("config_list", value=repr(value)))
    return value


def field_help(section_cls) -> dict[str, str]:
    """Help text of each field of a section dataclass (for the UI and the README)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(section_cls)}


# --------------------------------------------------------------------------- fields, for forms and the CLI


@dataclass(frozen=True)
class FieldInfo:
    """One field of a run config, as a form or a listing needs it. ``meta`` is the field's
    metadata: ``help``; for a form ``label``, ``minimum``, ``maximum``, ``step``, ``choices``,
    ``lines``, ``form_name`` (a shorter name) and ``form`` (False: set elsewhere)."""

    key: str  # "training.learning_rate"
    section: str
    name: str
    hint: Any
    default: Any
    meta: dict

    @property
    def help(self) -> str:
        return self.meta.get("help", "")

    @property
    def label(self) -> str:
        return self.meta.get("label") or self.name.replace("_", " ").capitalize()

    @property
    def optional(self) -> bool:
        return "None" in str(self.hint)

    @property
    def kind(self) -> str:
        """bool, int, float, choice, choices (several of a list), text, list or mapping."""
        if self.meta.get("choices"):
            return "choices" if str(self.hint).startswith("list") else "choice"
        text = str(self.hint)
        for kind, cls in (("bool", bool), ("int", int), ("float", float), ("list", list), ("mapping", dict)):
            if self.hint is cls or text.startswith(cls.__name__):
                return kind
        return "text"


def fields_of(config_cls: type | None = None) -> list[FieldInfo]:
    """Every field of every section of ``config_cls`` (RunConfig), in declaration order."""
    cls = config_cls or RunConfig
    hints = get_type_hints(cls)
    out = []
    for section in dataclasses.fields(cls):
        section_cls = hints[section.name]
        section_hints = get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(
                FieldInfo(
                    f"{section.name}.{f.name}", section.name, f.name, section_hints[f.name], default, dict(f.metadata)
                )
            )
    return out


def form_fields() -> list[FieldInfo]:
    """The fields a form of a run shows, in config order: all but the data section (chosen on
    its own, e.g. the web app's Data tab) and those whose metadata says ``form: False``."""
    return [f for f in fields_of() if f.section != "data" and f.meta.get("form", True)]


def commented_yaml(cfg: RunConfig) -> str:
    """The config as YAML, each field with its help as a comment (``tunelab config``)."""
    lines = []
    by_section: dict[str, list[FieldInfo]] = {}
    for info in fields_of(type(cfg)):
        by_section.setdefault(info.section, []).append(info)
    for section, infos in by_section.items():
        lines.append(f"{section}:")
        for info in infos:
            value = yaml.safe_dump(cfg.value(info.key), default_flow_style=True, allow_unicode=True, width=10**9)
            value = value.strip().removesuffix("...").strip()
            comment = f"  # {info.help}" if info.help else ""
            lines.append(f"  {info.name}: {value}{comment}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI: tunelab config


def add_set_argument(parser) -> None:
    """``--set section.key=value`` (repeatable, into ``args.overrides``), for RunConfig.with_overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override a config value, e.g. --set training.max_steps=20 (repeatable).",
    )


def add_cli_arguments(parser) -> None:
    parser.add_argument("--from", dest="source", metavar="FILE", help="Start from this config file (YAML).")
    add_set_argument(parser)


def run_cli(args) -> int:
    import sys

    try:
        cfg = RunConfig.load(args.source) if args.source else RunConfig()
        cfg = cfg.with_overrides(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(commented_yaml(cfg))
    return 0


# --------------------------------------------------------------------------- evaluation (engine.evaluate)
# The defaults of ``tunelab eval`` and the Evaluate tab.
EVAL_MAX_NEW_TOKENS = 128
EVAL_BATCH_SIZE = 8
EVAL_BACKENDS = ("base", "tuned", "onnx-int4")
# The pairwise judge (engine.judge): its prompt, the environment variable the CLI reads an
# endpoint's key from, and the one the web app passes a pasted key in (to the job only).
JUDGE_KEY_ENV = "OPENAI_API_KEY"
JUDGE_PASTED_KEY_ENV = "TUNELAB_JUDGE_KEY"
JUDGE_MAX_NEW_TOKENS = 96
JUDGE_TIMEOUT_S = 60.0
JUDGE_PROMPT = """You compare two answers to the same question. The reference answer shows what a good answer says.

Question:
{question}

Reference answer:
{reference}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is closer to the reference in content and style? Write one sentence with your reason, then a last line \
that is exactly "Verdict: A", "Verdict: B" or "Verdict: tie"."""

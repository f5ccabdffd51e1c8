"""One streaming chat interface over three backends: base, tuned and ONNX.

The playground, the CLI, the parity report and the tests all call the same generator::

    model = load_chat_model("runs/my-run", "tuned")
    for event in model.generate([{"role": "user", "content": "Hi"}], GenerationSettings(greedy=True)):
        if event.kind == "text":
            print(event.text, end="")
        elif event.kind == "done":
            print(event.stats.summary())

Backends (``BACKENDS``):

* ``base``  - the run's base model in PyTorch (``config.yaml`` -> ``model.name_or_path``);
* ``tuned`` - the base model with the run's PEFT adapter (``adapter/``, unmerged) or the
  full fine-tuned model (``model/``), in PyTorch;
* ``onnx``  - the run's ONNX export (``export/onnx-<precision>/``) run by onnxruntime-genai.

The generator knows nothing about the UI. It yields :class:`ChatEvent` objects:
``status`` (loading), ``text`` (a piece of the reply, as soon as it is decoded) and one
final ``done`` carrying :class:`GenerationStats` (time to first token, tokens per second,
why it stopped). A ``threading.Event`` passed as ``stop`` ends a generation after the
token being computed. Every backend stops at ``<|im_end|>`` (and the model's eos tokens).

:class:`GenerationSettings` mean the same on every backend: repetition penalty over the
prompt and the reply (divide positive logits, multiply negative ones), then greedy
(``greedy=True``, ``temperature == 0`` or ``top_k == 1``) or sampling with temperature,
top-k (0 = off) and then top-p over the top-k, with ``seed`` for repeatability; greedy
outputs are identical across backends where the weights are.

The PyTorch backend runs its own decode loop (prefill, then one token per step on a KV
cache) through a small decoder object (:class:`EagerDecoder`), so sampling, streaming and
stopping never depend on how logits are computed. Greedy replies of float32 Llama-family
models on the CPU go through engine.fastdecode instead: a 4-bit draft proposes tokens and
the float32 model checks several per pass, so the reply is the model's own greedy reply,
~1.7x faster than ``generate`` (see bench/). TUNELAB_FAST_DECODE=0 turns it off.

Loaded models are cached by (run, backend, variant) in this process (``MAX_LOADED``
entries, least recently used evicted) and reloaded when their files change. A server
(the web app, an evaluation job, an API) does not call this module from its own threads:
it submits requests to engine.scheduler, which loads and generates on one PyTorch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config import DEFAULT_ONNX_VARIANT, ONNX_LORA_BASE, ONNX_VARIANTS
from engine.templates import END_OF_TURN_MARKERS, end_of_turn_ids, inference_template

BACKENDS = ("base", "tuned", "onnx")
ONNX_PRECISIONS = ONNX_VARIANTS  # RUN/export/onnx-<variant>; backend name "onnx-<variant>"
# ... and the base with LoRA inputs whose adapters/ file is made active (engine.export.export_adapter_file)
ONNX_CHOICES = (*ONNX_VARIANTS, ONNX_LORA_BASE)
ROLES = ("system", "user", "assistant")
MAX_LOADED = int(os.environ.get("TUNELAB_MAX_LOADED_MODELS", "4"))

Progress = Callable[[str], None]


class InferenceError(ValueError):
    """A problem the user can fix: a missing adapter or export, bad messages or settings."""


class ContextLengthError(InferenceError):
    """The prompt leaves no room for a reply in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        super().__init__(
            f"the prompt has {prompt_tokens} tokens; the model's context is {context_length}: shorten the chat"
        )


# --------------------------------------------------------------------------- settings


@dataclass
class GenerationSettings:
    """How to pick tokens. The same values mean the same thing on every backend."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens in the reply."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling: keep the most likely tokens up to this mass (1 = off)."}
    )
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens (0 = off, 1 = greedy)."})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalise tokens already in the prompt or reply (1 = off)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling (empty: random)."})
    greedy: bool = field(
        default=False, metadata={"help": "Always take the most likely token (ignores temperature, top-p, top-k)."}
    )
    min_new_tokens: int = field(default=0, metadata={"help": "Do not stop before this many tokens (for benchmarks)."})

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise InferenceError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InferenceError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise InferenceError(f"repetition_penalty: must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InferenceError(
                f"min_new_tokens: must be an integer in [0, max_new_tokens], got {self.min_new_tokens!r}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0 or self.top_k == 1


@dataclass
class GenerationStats:
    """What one reply cost. ``decode_tokens_per_s`` excludes the prompt (prefill)."""

    backend: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    finish_reason: str  # "eos" | "length" | "stopped"
    token_ids: list[int] = field(default_factory=list)
    decoder: str = ""  # PyTorch: "speculative ..." or "plain"

    @property
    def tokens_per_s(self) -> float:
        """Reply tokens per second over the whole call, prompt processing included."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens, first after {self.ttft_s:.2f} s, "
            f"{self.decode_tokens_per_s:.1f} tokens/s ({self.finish_reason}"
            + (f", {self.decoder} decoder)" if self.decoder.startswith("speculative") else ")")
        )

    def to_dict(self, with_ids: bool = False) -> dict:
        data = asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        if not with_ids:
            data.pop("token_ids")
        return data


@dataclass(frozen=True)
class ChatEvent:
    """One thing a generation reports: ``status`` (loading), ``text`` (a new piece of the
    reply) or ``done`` (the end, with ``stats``)."""

    kind: str
    text: str = ""
    stats: GenerationStats | None = None
    ahead: int = 0  # ``queued``: the replies ahead of this one (the web app words it in its language)


# --------------------------------------------------------------------------- messages


def normalize_messages(messages: Any, system: str | None = None) -> list[dict]:
    """Check a chat and put ``system`` first (replacing a system message already there).

    Raises :class:`InferenceError` naming the offending message, e.g.
    ``messages[2].role: 'bot' is not one of system, user, assistant``.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages and not system:
        raise InferenceError("messages: must be a non-empty list of {'role', 'content'} dicts")
    out: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InferenceError(f"messages[{i}]: must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise InferenceError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InferenceError(f"messages[{i}].content: must be text, got {type(content).__name__}")
        if role == "system" and i > 0:
            raise InferenceError(f"messages[{i}].role: a system message may only come first")
        out.append({"role": role, "content": content})
    if system is not None and system.strip():
        if out and out[0]["role"] == "system":
            out = out[1:]
        out.insert(0, {"role": "system", "content": system})
    if not out or out[-1]["role"] != "user":
        raise InferenceError("messages: the last message must come from the user")
    return out


# --------------------------------------------------------------------------- streaming core


class _Detokenizer:
    """Turn token ids into text pieces as they arrive.

    It decodes a short window (the previous piece and the new tokens) and emits the new
    characters, holding back while the text ends in an incomplete UTF-8 sequence, so
    emojis split over several byte tokens come out whole.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class ChatModel:
    """A loaded model that turns a chat into a stream of :class:`ChatEvent`.

    Subclasses provide ``encode_prompt``, ``decode`` and ``token_stream`` (the raw token
    loop); this class adds stopping, streaming text and timing, identically for all.
    """

    backend: str = ""
    label: str = ""
    source: str = ""
    stop_ids: frozenset[int] = frozenset()
    context_length: int | None = None  # most tokens the model attends to (prompt and reply)

    def render(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_stream(
        self, prompt_ids: list[int], settings: GenerationSettings, used: list[str] | None = None
    ) -> Iterator[int]:
        """Yield sampled token ids one by one (the consumer stops the loop). A decoder that
        can fall back to another loop names the one it runs in ``used[0]``."""
        raise NotImplementedError

    def decoder_name(self, settings: GenerationSettings, prompt_tokens: int = 0) -> str:
        """Which decode loop ``token_stream`` uses for these settings."""
        return ""

    def generate(
        self,
        messages: Any,
        settings: GenerationSettings | None = None,
        *,
        system: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[ChatEvent]:
        """Stream a reply to ``messages``: ``text`` events, then one ``done`` event."""
        settings = settings or GenerationSettings()
        started = time.perf_counter()
        messages = normalize_messages(messages, system)
        prompt_ids = self.encode_prompt(messages)
        if self.context_length and len(prompt_ids) >= self.context_length:
            raise ContextLengthError(len(prompt_ids), self.context_length)
        detok = _Detokenizer(self.decode)
        used = [self.decoder_name(settings, len(prompt_ids))]
        reply_ids: list[int] = []
        sampled = 0
        first_at = last_at = None
        finish = "length"
        stream = self.token_stream(prompt_ids, settings, used)
        try:
            if stop is not None and stop.is_set():
                finish = "stopped"
            else:
                for token_id in stream:
                    last_at = time.perf_counter()
                    if first_at is None:
                        first_at = last_at
                    sampled += 1
                    if token_id in self.stop_ids:
                        finish = "eos"
                        break
                    reply_ids.append(token_id)
                    piece = detok.push(token_id)
                    if piece:
                        yield ChatEvent("text", piece)
                    if stop is not None and stop.is_set():
                        finish = "stopped"
                        break
        finally:
            stream.close()
        tail = detok.flush()
        if tail:
            yield ChatEvent("text", tail)
        ended = time.perf_counter()
        ttft = (first_at - started) if first_at is not None else ended - started
        decode_rate = (sampled - 1) / (last_at - first_at) if sampled > 1 and last_at > first_at else 0.0
        stats = GenerationStats(
            backend=self.backend,
            prompt_tokens=len(prompt_ids),
            new_tokens=len(reply_ids),
            ttft_s=ttft,
            decode_tokens_per_s=decode_rate,
            total_s=ended - started,
            finish_reason=finish,
            token_ids=reply_ids,
            decoder=used[0],
        )
        yield ChatEvent("done", stats=stats)

    def complete(
        self, messages: Any, settings: GenerationSettings | None = None, **kwargs
    ) -> tuple[str, GenerationStats]:
        """The whole reply at once: ``(text, stats)``."""
        parts: list[str] = []
        stats = None
        for event in self.generate(messages, settings, **kwargs):
            if event.kind == "text":
                parts.append(event.text)
            elif event.kind == "done":
                stats = event.stats
        return "".join(parts), stats

    # Teacher-forced scoring, for the parity report: the model's greedy choice at each
    # position of a given continuation, and the continuation's negative log-likelihood.
    def score_continuation(self, prompt_ids: list[int], continuation: list[int]) -> tuple[list[int], list[float]]:
        raise NotImplementedError


# --------------------------------------------------------------------------- PyTorch


class EagerDecoder:
    """Prefill, then one token per forward pass on a dynamic KV cache.

    The PyTorch backend only calls ``prefill(ids) -> logits`` and ``step(token) ->
    logits`` (last-position logits, float32, shape ``[vocab]``), so a faster decoder with
    the same two methods (static cache, compiled step) can be dropped in.
    """

    def __init__(self, model, device):
        self.model = model
        self.device = device
        self.cache = None

    def prefill(self, ids: list[int]):
        import torch
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def step(self, token_id: int):
        import torch

        input_ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True)
        return out.logits[0, -1].float()


class _TorchSampler:
    """The settings' token choice on a logits vector (see the module docstring)."""

    def __init__(self, settings: GenerationSettings, prompt_ids: list[int], vocab_size: int, device):
        import torch

        self.s = settings
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long, device=device)] = True
        self.gen = None
        if not settings.is_greedy:
            self.gen = torch.Generator(device=device)
            if settings.seed is not None:
                self.gen.manual_seed(int(settings.seed))
            else:
                self.gen.seed()

    def __call__(self, logits, step: int, stop_ids: Iterable[int]) -> int:
        import torch

        s = self.s
        logits = logits.clone()
        if s.repetition_penalty != 1.0:
            picked = logits[self.seen]
            logits[self.seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
        if step < s.min_new_tokens:
            for t in stop_ids:
                if t < logits.shape[0]:
                    logits[t] = float("-inf")
        if s.is_greedy:
            token = int(torch.argmax(logits))
        else:
            logits = logits / s.temperature
            if s.top_k > 0 and s.top_k < logits.shape[0]:
                values, indices = torch.topk(logits, s.top_k)
            else:
                values, indices = torch.sort(logits, descending=True)
            probs = torch.softmax(values, dim=-1)
            if s.top_p < 1.0:
                cumulative = torch.cumsum(probs, dim=-1)
                # keep the smallest prefix whose mass reaches top_p
                keep = int(torch.searchsorted(cumulative, torch.tensor(s.top_p, device=cumulative.device))) + 1
                probs = probs[:keep]
                indices = indices[:keep]
            choice = torch.multinomial(probs / probs.sum(), 1, generator=self.gen)
            token = int(indices[choice])
        self.seen[token] = True
        return token


class TorchChatModel(ChatModel):
    """A transformers (optionally PEFT-wrapped) causal LM with its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        backend: str,
        label: str,
        source: str,
        chat_template: str | None = None,
        decoder_factory=EagerDecoder,
        fast_decode: bool = True,
    ):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = backend
        self.label = label
        self.source = source
        self.chat_template = inference_template(chat_template or tokenizer.chat_template)
        if not self.chat_template:
            raise InferenceError(
                f"{source}: the tokenizer has no chat template; set model.chat_template in the run config"
            )
        self.device = next(model.parameters()).device
        self.decoder_factory = decoder_factory
        # the speculative greedy decoder replaces the default loop only (a custom decoder is kept)
        self.fast_decode = (
            fast_decode and decoder_factory is EagerDecoder and os.environ.get("TUNELAB_FAST_DECODE", "1") != "0"
        )
        self._lean = None  # engine.fastdecode.LeanModel, built on the first greedy reply
        self._lean_lock = threading.Lock()
        self.lean_note = ""  # why the lean decoder is not used, once that is known
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.context_length = int(positions) if isinstance(positions, int) and positions > 0 else None
        self.stop_ids = frozenset(
            stop_ids_from(tokenizer, getattr(model, "generation_config", None), self.chat_template)
        )
        self._torch = torch

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def lean_model(self):
        """The speculative greedy decoder of engine.fastdecode for this model, or None
        (unsupported architecture, not float32 on the CPU, too little free memory, or
        TUNELAB_FAST_DECODE=0); the reason is kept in ``lean_note``."""
        if not self.fast_decode:
            return None
        if self._lean is None and not self.lean_note:
            from engine import fastdecode

            try:
                needed = fastdecode.memory_factor() * sum(p.numel() * 4 for p in self.model.parameters())
                available = _available_memory()
                if needed > 0.6 * available:
                    raise fastdecode.Unsupported(
                        f"its weight copies need {needed / 1e9:.1f} GB and {available / 1e9:.1f} GB are free"
                    )
                self._lean = fastdecode.LeanModel(self.model)
            except fastdecode.Unsupported as err:
                self.lean_note = f"plain decoder: {err}"
        return self._lean

    def decoder_name(self, settings: GenerationSettings, prompt_tokens: int = 0) -> str:
        if (
            settings.is_greedy
            and self.lean_model() is not None
            and self._lean.fits(prompt_tokens + settings.max_new_tokens)
        ):
            kernels = f", native {self._lean.native.lib.isa} kernels" if self._lean.native is not None else ""
            return f"speculative (4-bit draft, float32 check{kernels})"
        return "plain"

    def token_stream(
        self, prompt_ids: list[int], settings: GenerationSettings, used: list[str] | None = None
    ) -> Iterator[int]:
        torch = self._torch
        name = self.decoder_name(settings, len(prompt_ids))
        # one speculative reply at a time per model (its caches are shared); a concurrent
        # reply takes the plain decoder below
        speculative = name != "plain" and self._lean_lock.acquire(blocking=False)
        if used is not None:
            used[:] = [name if speculative else "plain"]
        if speculative:
            from engine import fastdecode

            try:
                yield from self._lean.greedy(
                    prompt_ids,
                    settings.max_new_tokens,
                    self.stop_ids,
                    min_new_tokens=settings.min_new_tokens,
                    repetition_penalty=settings.repetition_penalty,
                )
                return
            except fastdecode.Unsupported as err:  # e.g. the chat outgrew the model's context
                raise InferenceError(str(err)) from err
            finally:
                self._lean_lock.release()
        with torch.inference_mode():
            decoder = self.decoder_factory(self.model, self.device)
            sampler = _TorchSampler(settings, prompt_ids, self.vocab_size, self.device)
            logits = decoder.prefill(prompt_ids)
            for step in range(settings.max_new_tokens):
                token = sampler(logits, step, self.stop_ids)
                yield token
                if token in self.stop_ids or step + 1 == settings.max_new_tokens:
                    return
                logits = decoder.step(token)

    def logits(self, ids: list[int]):
        """Float32 logits for every position of ``ids`` (one forward pass)."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False)
            logits = out.logits[0].to("cpu", torch.float32)
        return logits.clone()  # a normal tensor (inference tensors cannot be edited later)

    def score_continuation(self, prompt_ids, continuation):
        torch = self._torch
        logits = self.logits(list(prompt_ids) + list(continuation))
        start = len(prompt_ids) - 1
        rows = logits[start : start + len(continuation)]
        greedy = rows.argmax(-1).tolist()
        logp = torch.log_softmax(rows, -1)
        nll = [-float(logp[i, t]) for i, t in enumerate(continuation)]
        return greedy, nll


def _available_memory() -> int:
    """Bytes of memory this machine can still give (what engine.hardware reports as available)."""
    import psutil

    return int(psutil.virtual_memory().available)


def stop_ids_from(tokenizer, generation_config=None, template: str | None = None) -> set[int]:
    """Where generation stops: eos and the end-of-turn markers of the chat template
    (``template``, else the tokenizer's own; engine.templates), and the eos ids of
    ``generation_config``."""
    ids = end_of_turn_ids(tokenizer, template or tokenizer.chat_template)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(t) for t in eos)
    return ids


def _torch_device_and_dtype():
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    # fp32 on CPU: bf16 has no native support on most CPUs and is many times slower.
    return torch.device("cpu"), torch.float32


def _load_tokenizer(primary: Path, fallback: Path):
    from engine.util import load_tokenizer

    source = primary if (primary / "tokenizer_config.json").is_file() else fallback
    return load_tokenizer(source)


def load_torch_model(
    model_dir: Path,
    adapter_dir: Path | None = None,
    *,
    merge: bool = False,
    device=None,
    dtype=None,
    progress: Progress | None = None,
):
    """(model, tokenizer) for a transformers dir, with an optional PEFT adapter on top.

    The base is always loaded in full precision (also for QLoRA adapters: 4-bit loading
    is a training-memory trick, and inference and merging want the real weights).
    """
    from transformers import AutoModelForCausalLM

    say = progress or (lambda msg: None)
    auto_device, auto_dtype = _torch_device_and_dtype()
    device = device or auto_device
    dtype = dtype or auto_dtype
    say(f"Loading weights from {model_dir}...")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = _load_tokenizer(adapter_dir, model_dir) if adapter_dir else _load_tokenizer(model_dir, model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        say(f"Applying the adapter in {adapter_dir}...")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- ONNX


def onnx_threads(genai_config: dict) -> int | None:
    """Intra-op threads for an export's CPU session: every core this process may use.

    onnxruntime-genai leaves the thread count to ONNX Runtime, whose default used one
    thread too few on a 2-core machine (int4 decode ~115-135 tokens/s against ~200 with
    both cores, measured on SmolLM2-135M). An explicit ``intra_op_num_threads`` in the
    export's genai_config.json wins; TUNELAB_ONNX_THREADS overrides both (0 = ORT's own
    default)."""
    override = os.environ.get("TUNELAB_ONNX_THREADS", "").strip()
    if override:
        try:
            return int(override) or None
        except ValueError:
            raise InferenceError(f"TUNELAB_ONNX_THREADS must be a whole number, not {override!r}") from None
    options = genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
    if "intra_op_num_threads" in options:
        return None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count()


class OnnxChatModel(ChatModel):
    """An onnxruntime-genai export (``genai_config.json``, ``model.onnx``, tokenizer)."""

    def __init__(self, export_dir: Path, *, label: str | None = None, adapter_file: Path | None = None):
        """``adapter_file``: an ONNX Runtime GenAI adapter (.onnx_adapter) made active on every
        generator (og.Adapters); an export with LoRA inputs (tunelab export --adapter-file) uses
        the first of its adapters/ folder without one."""
        import numpy as np
        import onnxruntime_genai as og

        self._np = np
        self._og = og
        self.export_dir = Path(export_dir)
        self.backend = "onnx"
        self.source = str(self.export_dir)
        self.label = label or f"ONNX ({self.export_dir.name})"
        config = json.loads((self.export_dir / "genai_config.json").read_text(encoding="utf-8"))
        self._config = config
        og_config = og.Config(str(self.export_dir))
        self.threads = onnx_threads(config)
        if self.threads:
            og_config.overlay(
                json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}})
            )
        self.model = og.Model(og_config)
        self.tokenizer = og.Tokenizer(self.model)
        if adapter_file is None:
            adapter_file = next(iter(sorted((self.export_dir / "adapters").glob("*.onnx_adapter"))), None)
        self.adapters = None
        self.adapter_file = Path(adapter_file) if adapter_file else None
        if self.adapter_file is not None:
            if not self.adapter_file.is_file():
                raise InferenceError(f"{self.adapter_file}: no such adapter file")
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(self.adapter_file), "tuned")
            self.label = label or f"ONNX ({self.export_dir.name} + {self.adapter_file.name})"
        self.context_length = int(config["model"].get("context_length", 2048))
        eos = config["model"].get("eos_token_id", [])
        template_path = self.export_dir / "chat_template.jinja"
        self.chat_template = (
            inference_template(template_path.read_text(encoding="utf-8")) if template_path.is_file() else None
        )
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else eos) | frozenset(self._chat_end_ids())

    def _chat_end_ids(self) -> list[int]:
        """The template's end-of-turn markers that are one token of this tokenizer."""
        ids = []
        for marker in END_OF_TURN_MARKERS:
            if marker in (self.chat_template or "<|im_end|>"):
                encoded = self.tokenizer.encode(marker).tolist()
                ids += encoded if len(encoded) == 1 else []
        return ids

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            json.dumps(messages, ensure_ascii=False), template_str=self.chat_template, add_generation_prompt=True
        )

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.render(messages)).tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self._np.asarray(ids, dtype=self._np.int32))

    def _generator(self, prompt_len: int, settings: GenerationSettings | None, max_new: int):
        og = self._og
        params = og.GeneratorParams(self.model)
        max_length = min(prompt_len + max_new, self.context_length)
        if prompt_len >= max_length:
            raise ContextLengthError(prompt_len, self.context_length)
        options: dict[str, Any] = {"max_length": max_length, "do_sample": False, "repetition_penalty": 1.0}
        if settings is not None:
            options["repetition_penalty"] = float(settings.repetition_penalty)
            options["min_length"] = prompt_len + settings.min_new_tokens
            if not settings.is_greedy:
                options.update(
                    do_sample=True,
                    temperature=float(settings.temperature),
                    top_k=int(settings.top_k),
                    top_p=float(settings.top_p),
                    random_seed=int(settings.seed) if settings.seed is not None else -1,
                )
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "tuned")
        return generator

    def token_stream(
        self, prompt_ids: list[int], settings: GenerationSettings, used: list[str] | None = None
    ) -> Iterator[int]:
        np = self._np
        generator = self._generator(len(prompt_ids), settings, settings.max_new_tokens)
        try:
            generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])
        finally:
            del generator

    def pad_token_id(self) -> int:
        """The id that pads a batch's shorter prompts on the right (the export's own)."""
        return int(self._config["model"].get("pad_token_id", min(self.stop_ids) if self.stop_ids else 0))

    def generate_batch(self, chats: list[tuple]) -> Iterator[tuple[int, "ChatEvent | Exception"]]:
        """Greedy replies to several chats at once, with one ``og.Generator`` over all of
        them: each step reads the weights once for every sequence, which is what bounds a
        small model's decode on a CPU. ``chats`` holds ``(messages, settings, system, stop)``
        tuples whose settings are greedy with the same repetition penalty (engine.scheduler
        groups them). The prompts are right-padded with the export's pad token, as
        ``og.Tokenizer.encode_batch`` does. In fp32 each reply equals the chat's own greedy
        reply; an int4 export's MatMulNBits computes a batch differently from one row, so a
        near tie can go the other way (24 of 64 Pip prompts identical, bench/results/eval.md).

        Yields ``(index, event)``: the same ``text`` events and final ``done`` (with its own
        stats) as :meth:`generate` for each chat, interleaved, or ``(index, error)`` for a
        chat refused before generation (bad messages, too long a prompt)."""
        np, og = self._np, self._og
        started = time.perf_counter()
        live: dict[int, dict] = {}
        for i, (messages, settings, system, stop) in enumerate(chats):
            try:
                prompt = self.encode_prompt(normalize_messages(messages, system))
                if len(prompt) >= self.context_length:
                    raise ContextLengthError(len(prompt), self.context_length)
            except InferenceError as err:
                yield i, err
                continue
            settings = settings or GenerationSettings(greedy=True)
            live[i] = {"prompt": prompt, "settings": settings, "stop": stop, "detok": _Detokenizer(self.decode)}
            live[i].update(ids=[], sampled=0, first=None, last=None)
        if not live:
            return
        order = list(live)
        width = max(len(live[i]["prompt"]) for i in order)
        pad = self.pad_token_id()
        batch = np.full((len(order), width), pad, dtype=np.int32)
        for row, i in enumerate(order):
            batch[row, : len(live[i]["prompt"])] = live[i]["prompt"]
        longest = width + max(live[i]["settings"].max_new_tokens for i in order)
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=min(longest, self.context_length),
            batch_size=len(order),
            do_sample=False,
            repetition_penalty=float(live[order[0]]["settings"].repetition_penalty),
        )
        generator = og.Generator(self.model, params)

        def finish(i: int, reason: str):
            state = live.pop(i)
            tail = state["detok"].flush()
            if tail:
                yield i, ChatEvent("text", tail)
            ended = time.perf_counter()
            first, last, sampled = state["first"], state["last"], state["sampled"]
            rate = (sampled - 1) / (last - first) if sampled > 1 and last > first else 0.0
            stats = GenerationStats(
                backend=self.backend,
                prompt_tokens=len(state["prompt"]),
                new_tokens=len(state["ids"]),
                ttft_s=(first - started) if first is not None else ended - started,
                decode_tokens_per_s=rate,
                total_s=ended - started,
                finish_reason=reason,
                token_ids=state["ids"],
                decoder=f"batch of {len(order)}",
            )
            yield i, ChatEvent("done", stats=stats)

        try:
            generator.append_tokens(batch)
            while live and not generator.is_done():
                generator.generate_next_token()
                tokens = generator.get_next_tokens()
                now = time.perf_counter()
                for row, i in enumerate(order):
                    state = live.get(i)
                    if state is None:
                        continue
                    if state["stop"] is not None and state["stop"].is_set():
                        yield from finish(i, "stopped")
                        continue
                    token = int(tokens[row])
                    state["sampled"] += 1
                    state["last"] = now
                    state["first"] = state["first"] or now
                    if token in self.stop_ids:
                        yield from finish(i, "eos")
                        continue
                    state["ids"].append(token)
                    piece = state["detok"].push(token)
                    if piece:
                        yield i, ChatEvent("text", piece)
                    if len(state["ids"]) >= state["settings"].max_new_tokens:
                        yield from finish(i, "length")
            for i in list(live):
                yield from finish(i, "length")
        finally:
            del generator

    def score_continuation(self, prompt_ids, continuation):
        """Feed the continuation one token at a time and read the logits after each."""
        np = self._np
        generator = self._generator(len(prompt_ids), None, len(continuation) + 1)
        greedy: list[int] = []
        nll: list[float] = []
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for i, token in enumerate(continuation):
            logits = generator.get_logits()[0, -1].astype(np.float64)
            greedy.append(int(np.argmax(logits)))
            top = logits.max()
            nll.append(float(np.log(np.exp(logits - top).sum()) + top - logits[token]))
            if i + 1 < len(continuation):
                generator.append_tokens(np.asarray([token], dtype=np.int32))
        return greedy, nll


# --------------------------------------------------------------------------- runs and the cache


@dataclass
class Target:
    """What a (run, backend) pair resolves to on disk."""

    backend: str
    label: str
    model_dir: Path | None = None  # transformers dir (base or full fine-tune)
    adapter_dir: Path | None = None
    onnx_dir: Path | None = None
    chat_template: str | None = None

    @property
    def files(self) -> Path:
        return self.onnx_dir or self.adapter_dir or self.model_dir


def _auto_choice(export_dir: Path) -> list[str]:
    """The variant auto mode kept, as recorded in export/parity.json (empty when none)."""
    path = export_dir / "parity.json"
    if not path.is_file():
        return []
    try:
        chosen = (json.loads(path.read_text(encoding="utf-8")).get("auto") or {}).get("chosen")
    except (OSError, json.JSONDecodeError):
        return []
    return [chosen] if isinstance(chosen, str) else []


def _run_config(run_dir: Path):
    from engine.config import RunConfig

    return RunConfig.load(run_dir / "config.yaml")


def find_onnx_export(run_dir: Path, precision: str | None = None) -> Path:
    """``run/export/onnx-<precision>`` (any variant, e.g. ``int4-hqq``); without a precision the
    one auto mode kept (export/parity.json), else DEFAULT_ONNX_VARIANT, else the first present in
    ONNX_VARIANTS order."""
    export_dir = Path(run_dir) / "export"
    if precision and precision.startswith("onnx-"):
        precision = precision.removeprefix("onnx-")
    choices = [precision] if precision else [*_auto_choice(export_dir), DEFAULT_ONNX_VARIANT, *ONNX_PRECISIONS]
    for p in choices:
        candidate = export_dir / f"onnx-{p}"
        if (candidate / "genai_config.json").is_file():
            return candidate
    wanted = f"onnx-{precision}" if precision else "an onnx-<precision>"
    raise InferenceError(
        f"{run_dir}: no {wanted} export in {export_dir}; create it with "
        f"`tunelab export {run_dir} --format onnx --precision {precision or 'int4'}`"
    )


def resolve_target(
    run: str | Path, backend: str, precision: str | None = None, progress: Progress | None = None
) -> Target:
    """Map a run directory (or a bare model reference, for ``base``; or an ONNX export
    directory, for ``onnx``) and a backend to the files to load."""
    from engine.models import resolve_model

    if backend not in BACKENDS:
        raise InferenceError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    path = Path(run).expanduser()
    if (path / "config.yaml").is_file():
        cfg = _run_config(path)
        template = cfg.model.chat_template
        if backend == "base":
            return Target(
                "base",
                "Base (PyTorch)",
                model_dir=resolve_model(cfg.model.name_or_path, progress),
                chat_template=template,
            )
        if backend == "tuned":
            if (path / "model" / "config.json").is_file():
                return Target("tuned", "Tuned (PyTorch, full)", model_dir=path / "model", chat_template=template)
            if (path / "adapter" / "adapter_config.json").is_file():
                return Target(
                    "tuned",
                    "Tuned (PyTorch + adapter)",
                    model_dir=resolve_model(cfg.model.name_or_path, progress),
                    adapter_dir=path / "adapter",
                    chat_template=template,
                )
            raise InferenceError(
                f"{path}: the run has no adapter/adapter_config.json nor model/config.json yet "
                "(is it still training, or did it fail?)"
            )
        onnx_dir = find_onnx_export(path, precision)
        return Target("onnx", f"ONNX {onnx_dir.name.removeprefix('onnx-')}", onnx_dir=onnx_dir)
    if backend == "onnx" and (path / "genai_config.json").is_file():
        return Target("onnx", f"ONNX ({path.name})", onnx_dir=path)
    if backend == "base":
        return Target("base", "Base (PyTorch)", model_dir=resolve_model(str(run), progress))
    raise InferenceError(f"{run}: not a run directory (no config.yaml)")


def _signature(path: Path | None) -> tuple:
    """Changes when the files of a model change (retrained adapter, new export)."""
    if path is None or not path.exists():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir() if p.is_file()))


def build_chat_model(target: Target, *, merge: bool = False, progress: Progress | None = None) -> ChatModel:
    """Load a :class:`ChatModel` for a resolved target (no caching)."""
    if target.backend == "onnx":
        return OnnxChatModel(target.onnx_dir, label=target.label)
    model, tokenizer = load_torch_model(target.model_dir, target.adapter_dir, merge=merge, progress=progress)
    label = target.label + (" merged" if merge and target.adapter_dir else "")
    return TorchChatModel(
        model,
        tokenizer,
        backend=target.backend,
        label=label,
        source=str(target.files),
        chat_template=target.chat_template,
    )


# The model cache. In the web app every load comes from engine.scheduler's lanes (PyTorch
# models from its one PyTorch thread, ONNX models from its ONNX thread); the two locks make
# direct calls from several threads safe as well: the dict is read and written under
# _CACHE_LOCK, and a miss loads under _LOAD_LOCK, one load at a time (transformers' loading
# is not thread-safe), looking again first in case another thread has just loaded it.
_CACHE: "OrderedDict[tuple, tuple[tuple, ChatModel]]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()


def _cache_key(run, backend, precision, merge):
    return (
        str(Path(run).expanduser().resolve()) if Path(run).expanduser().exists() else str(run),
        backend,
        precision if backend == "onnx" else None,
        bool(merge),
    )


def _cached(key: tuple, signature: tuple) -> ChatModel | None:
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == signature:
            _CACHE.move_to_end(key)
            return hit[1]
    return None


def is_loaded(run: str | Path, backend: str, precision: str | None = None, merge: bool = False) -> bool:
    with _CACHE_LOCK:
        return _cache_key(run, backend, precision, merge) in _CACHE


def load_chat_model(
    run: str | Path,
    backend: str,
    *,
    precision: str | None = None,
    merge: bool = False,
    progress: Progress | None = None,
) -> ChatModel:
    """The cached :class:`ChatModel` for (run, backend), loading it on first use.

    ``progress`` receives short status strings while loading. Two threads asking for
    the same model load it once. ``precision`` picks the ONNX export; ``merge`` merges
    a tuned adapter into the weights in memory (faster, same outputs within rounding).
    A server loads through engine.scheduler, which calls this on the right thread.
    """
    say = progress or (lambda msg: None)
    key = _cache_key(run, backend, precision, merge)
    target = resolve_target(run, backend, precision, progress)
    signature = _signature(target.files)
    chat_model = _cached(key, signature)
    if chat_model is not None:
        return chat_model
    with _LOAD_LOCK:
        chat_model = _cached(key, signature)
        if chat_model is not None:
            return chat_model
        started = time.perf_counter()
        say(f"Loading {target.label} from {target.files}...")
        chat_model = build_chat_model(target, merge=merge, progress=progress)
        say(f"{target.label} loaded in {time.perf_counter() - started:.1f} s")
        with _CACHE_LOCK:
            _CACHE[key] = (signature, chat_model)
            _CACHE.move_to_end(key)
            while len(_CACHE) > MAX_LOADED:
                _CACHE.popitem(last=False)
        return chat_model


def unload_all() -> None:
    """Forget every cached model (frees memory once no caller holds one)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def stream_chat(
    run: str | Path,
    backend: str,
    messages: Any,
    settings: GenerationSettings | None = None,
    *,
    system: str | None = None,
    stop: threading.Event | None = None,
    precision: str | None = None,
    merge: bool = False,
) -> Iterator[ChatEvent]:
    """Load (with ``status`` events) if needed, then stream the reply (see ``ChatModel.generate``)."""
    statuses: list[str] = []
    if not is_loaded(run, backend, precision, merge):
        yield ChatEvent("status", f"Loading the {backend} model...")
    model = load_chat_model(run, backend, precision=precision, merge=merge, progress=statuses.append)
    if statuses:
        yield ChatEvent("status", statuses[-1])
    yield from model.generate(messages, settings, system=system, stop=stop)


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        metavar="RUN",
        help="Run directory (runs/<id>); for --backend base also a model "
        "name or directory; for --backend onnx also an export directory.",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="tuned", help="Which model answers (default: tuned).")
    parser.add_argument(
        "--precision",
        choices=ONNX_CHOICES,
        default=None,
        help="ONNX export variant to use (default: the one auto mode kept, else int8, else the first there is).",
    )
    parser.add_argument("--prompt", default=None, help="Answer this one message and exit (default: interactive chat).")
    parser.add_argument("--system", default=None, help="System prompt.")
    defaults = GenerationSettings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="Most tokens per reply.")
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="Sampling temperature (0: greedy)."
    )
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="Nucleus sampling mass (1: off).")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="Top-k sampling (0: off).")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1: off.")
    parser.add_argument("--seed", type=int, default=None, help="Random seed for sampling.")
    parser.add_argument("--greedy", action="store_true", help="Always pick the most likely token.")
    parser.add_argument("--json", action="store_true", help="With --prompt: print one JSON object (reply and stats).")


def _settings_from_args(args) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        greedy=args.greedy,
    )


def _print_reply(model: ChatModel, messages, settings, system, out=None) -> tuple[str, GenerationStats | None]:
    out = out or sys.stdout
    stop = threading.Event()
    parts: list[str] = []
    stats = None
    events = model.generate(messages, settings, system=system, stop=stop)
    try:
        for event in events:
            if event.kind == "text":
                parts.append(event.text)
                out.write(event.text)
                out.flush()
            elif event.kind == "done":
                stats = event.stats
    except KeyboardInterrupt:
        # Ctrl-C stops this reply, not the program: finish the generator to get its stats.
        stop.set()
        for event in events:
            if event.kind == "text":
                parts.append(event.text)
                out.write(event.text)
            elif event.kind == "done":
                stats = event.stats
    out.write("\n")
    if stats is not None:
        print(f"[{stats.summary()}]", file=sys.stderr)
    return "".join(parts), stats


def run_cli(args) -> int:
    from engine.config import ConfigError
    from engine.models import ModelNotFoundError

    try:
        settings = _settings_from_args(args)
        model = load_chat_model(
            args.run,
            args.backend,
            precision=args.precision,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        if args.prompt is not None:
            if args.json:
                text, stats = model.complete([{"role": "user", "content": args.prompt}], settings, system=args.system)
                print(
                    json.dumps(
                        {"backend": args.backend, "model": model.label, "reply": text, "stats": stats.to_dict()},
                        ensure_ascii=False,
                        indent=2,
                    )
                )
            else:
                _print_reply(model, [{"role": "user", "content": args.prompt}], settings, args.system)
            return 0
        return _repl(model, settings, args.system)
    except (InferenceError, ConfigError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _repl(model: ChatModel, settings: GenerationSettings, system: str | None) -> int:
    print(
        f"Chatting with {model.label}. /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply.",
        file=sys.stderr,
    )
    history: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("bot> ")
        reply, _ = _print_reply(model, history, settings, system)
        history.append({"role": "assistant", "content": reply})

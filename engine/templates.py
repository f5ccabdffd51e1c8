"""Chat templates: the one place that decides the text a model trains on, which of its
tokens carry the loss, and the text it is prompted with at inference.

The rule, for every model family:

* **The training text is the model's own rendering of the whole conversation**, byte for
  byte ``tokenizer.apply_chat_template(conversation, tokenize=False)`` with the model's
  original template (or the one ``model.chat_template`` names). Nothing is substituted:
  Qwen's default system prompt stays Qwen's, Qwen3's empty think block stays where Qwen3
  puts it.
* **Each assistant turn is trained from where the prompt for it ends**
  (``apply_chat_template(conversation[:i], add_generation_prompt=True)``) **through its
  first end-of-turn token**: what the model writes at inference, and where it stops.
  Whitespace or an end-of-text token that the template puts after the end-of-turn token
  is not the model's to write and is not trained.
* **Templates that re-render earlier turns** (Qwen3 and its variants drop the reasoning,
  and the empty think block, of every assistant turn before the last user message): the
  whole conversation's rendering wins. An earlier answer is trained as it appears there
  (without a think block), the last one with its think block (empty when the data has no
  reasoning; Qwen3's empty block is trained, as the model writes it at inference). Where
  the prompt of an earlier answer opens a think block that the conversation's text drops
  (Qwen3.5, Qwen3.6), that answer starts where its prompt and the conversation's text part.
  Where the default prompt opens a think block that the answer closes at once (Nemotron 3:
  ``<think></think>``), the prompt is the one with ``enable_thinking=False``, and the empty
  block is part of the prompt, not trained.
* A template for which the prompt of some assistant turn is not a prefix of the whole
  conversation's text (DeepSeek-R1-Distill prefills ``<think>`` in the prompt but drops
  it from the answers) cannot be trained on this way: it is refused with
  :class:`TemplateError`, a sentence that names it, never silently replaced.

Why not TRL's ``{% generation %}`` training variants: TRL ships them for some families
only, and a variant is a second copy of a template that must stay byte-equal to the
original. The masks here come from the original template itself, for any template; the
tests compare them with TRL's variants where TRL has one.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

# End-of-turn markers of the chat template families (the token a model writes to end its
# turn). The ones a template's text contains, and the tokenizer's eos, are its end-of-turn
# tokens: training masks end there and inference stops there.
END_OF_TURN_MARKERS = (
    "<|im_end|>",  # ChatML: SmolLM2, Qwen, LFM2, Nemotron, ...
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<end_of_turn>",  # Gemma 1-3
    "<turn|>",  # Gemma 4
    "<|end|>",  # Phi-3, Phi-4-mini, GPT-OSS
    "<|eot|>",  # Muse Glimmer
    "<end_of_utterance>",  # Idefics3, SmolVLM
    "<|user|>",  # GLM-4 ends an answer by starting the next user turn
    "<|observation|>",  # GLM-4 tool call
    "<|return|>",  # GPT-OSS final answer
    "<|call|>",  # GPT-OSS tool call
    "<|END_OF_TURN_TOKEN|>",  # Cohere
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "<|endoftext|>",
    "</s>",  # Mistral, Llama 2
)

# A ChatML template without a default system prompt, for a tokenizer that has no template.
PLAIN_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# SmolLM2's own template with TRL's {% generation %} markers around each answer: what TRL's
# assistant_only_loss needs (TRL ships no such variant for SmolLM2). tunelab does not train
# with it; the TRL baseline of `make bench` does, and tests compare masks with it.
SMOLLM2_MARKED = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Appended to an answer to find where the template puts its end (a private-use character:
# no template treats it specially, no stripping removes it).
_PROBE = "\ue000"


class TemplateError(ValueError):
    """A chat template that cannot be trained on as the model renders it; the message names it."""


def with_reasoning(content: str, reasoning: str) -> str:
    """An answer whose reasoning came in its own field (``reasoning_content``), written as
    the reasoning families write it: ``<think>...</think>`` before the answer. Their
    templates (Qwen3, Nemotron, ...) read it back out of the content; other templates keep
    it as text."""
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


def model_template(tokenizer, override: str | None = None) -> tuple[str, str]:
    """(template, where it comes from): ``override`` ("config"), else the tokenizer's own
    ("tokenizer"; its default one when it has several), else :data:`PLAIN_CHATML`
    ("plain ChatML: the tokenizer has none")."""
    if override:
        return override, "config"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates
        own = own.get("default") or next(iter(own.values()), None)
    if own:
        return own, "tokenizer"
    return PLAIN_CHATML, "plain ChatML: the tokenizer has none"


def inference_template(template: str | None) -> str | None:
    """A chat template without TRL's ``{% generation %}`` markers (which only tag the
    assistant tokens for the loss and render nothing). Runtimes other than transformers,
    onnxruntime-genai's among them, do not know these tags."""
    if not template:
        return template
    return GENERATION_TAG.sub("", template)


@functools.lru_cache(maxsize=1)
def _known_templates() -> dict[str, str]:
    """TRL's shipped templates (name -> text), for naming a template in messages."""
    try:
        import trl
    except ImportError:
        return {}
    folder = Path(trl.__file__).resolve().parent / "chat_templates"
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.jinja"))}


def template_name(template: str) -> str:
    """A short name for a template in messages: the family's name where it is one that TRL
    ships (e.g. "qwen3"), else "a custom template"."""
    for name, text in _known_templates().items():
        if text.strip() == template.strip():
            return f"the {name} template"
    if "<|im_start|>" in template:
        return "a ChatML template"
    return "a custom template"


def end_of_turn_texts(tokenizer, template: str) -> list[str]:
    """The end-of-turn markers this template writes (and the tokenizer's eos), longest first."""
    found = {marker for marker in END_OF_TURN_MARKERS if marker in template}
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        found.add(eos)
    return sorted(found, key=len, reverse=True)


def end_of_turn_ids(tokenizer, template: str | None) -> set[int]:
    """Token ids of the end-of-turn markers of ``template`` (and eos) that are single tokens
    of this tokenizer: where generation stops."""
    texts = end_of_turn_texts(tokenizer, template or "")
    ids: set[int] = set()
    unknown = getattr(tokenizer, "unk_token_id", None)
    for text in texts:
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid >= 0 and tid != unknown:
            ids.add(tid)
    return ids


def render(messages: list[dict], tokenizer, template: str, add_generation_prompt: bool = False, **switches) -> str:
    """The template's text for ``messages`` (generation markers, if any, render nothing);
    ``switches`` are the template's own variables (``enable_thinking=False``)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **switches
    )


# The prompt of an answer is rendered as the template does by default, else with its
# reasoning switched off: Nemotron 3's default prompt opens a think block ("<think>\n")
# that its rendering of an answer without reasoning closes at once ("<think></think>").
PROMPT_SWITCHES = ({}, {"enable_thinking": False})


def answer_prompt(messages: list[dict], i: int, tokenizer, template: str, full: str) -> str | None:
    """The prompt for assistant turn ``i`` as the template writes it, the first of
    :data:`PROMPT_SWITCHES` whose text the whole conversation's ``full`` text starts with
    (None when none does)."""
    if not i:
        return ""
    for switches in PROMPT_SWITCHES:
        prompt = render(messages[:i], tokenizer, template, add_generation_prompt=True, **switches)
        if full.startswith(prompt):
            return prompt
    return None


def assistant_spans(messages: list[dict], tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and, per assistant turn, the characters trained on: from the
    end of its prompt through its first end-of-turn marker (see the module's rules)."""
    template = inference_template(template)
    full = render(messages, tokenizer, template)
    stops = end_of_turn_texts(tokenizer, template)
    spans: list[tuple[int, int]] = []
    turn = 0
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn += 1
        prompt = answer_prompt(messages, i, tokenizer, template, full)
        if prompt is None and i < last:
            # a template that re-renders answers once a later user turn follows (Qwen3.5/3.6 drop
            # the think block their prompt opens): the whole conversation's text wins, and the
            # answer starts where its prompt and that text part
            prompt = render(messages[:i], tokenizer, template, add_generation_prompt=True)
            prompt = prompt[: _common_prefix(prompt, full)]
            if len(prompt) <= len(render(messages[:i], tokenizer, template)):
                prompt = None  # they part before the answer's header: nothing to anchor it
        if prompt is None:
            raise TemplateError(
                f"{template_name(template)} renders the prompt of assistant turn {turn} differently from the "
                "whole conversation (it re-renders or drops text the prompt holds), so the text the model would "
                "be prompted with is not the text it trains on: give model.chat_template a template that renders "
                "conversations prefix by prefix"
            )
        start = len(prompt)
        end = _answer_end(messages, i, tokenizer, template, full, start, stops)
        if end <= start:
            raise TemplateError(f"{template_name(template)} renders assistant turn {turn} as empty text")
        spans.append((start, end))
    return full, spans


def _answer_end(messages, i, tokenizer, template, full, start, stops) -> int:
    """Where assistant turn ``i`` ends in ``full``: after the first end-of-turn marker
    at or after its content's end, or (a template without one) at the end of its text."""
    probed = messages[:i] + [_with_text(messages[i], after=_PROBE)] + messages[i + 1 :]
    other = render(probed, tokenizer, template)
    content_end = _common_prefix(full, other)
    if content_end < start or not other[content_end:].startswith(_PROBE):
        content_end = start  # the template rewrites the content: look for the marker from the turn's start
    hits = [(full.find(stop, content_end), stop) for stop in stops]
    hits = [(at, stop) for at, stop in hits if at >= 0]
    nxt = _next_turn_start(messages, i, tokenizer, template, full)
    if hits:
        at, stop = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        if nxt is None or at < nxt:
            return at + len(stop)
    # no end-of-turn marker inside the turn: its text up to the next message, without trailing space
    return len(full[:nxt].rstrip()) if nxt is not None else len(full.rstrip())


def _next_turn_start(messages, i, tokenizer, template, full) -> int | None:
    """Where the message after turn ``i`` starts to differ, found by changing its content
    (None when turn ``i`` is the last)."""
    if i + 1 >= len(messages):
        return None
    changed = messages[: i + 1] + [_with_text(messages[i + 1], before=_PROBE)] + messages[i + 2 :]
    return _common_prefix(full, render(changed, tokenizer, template))


def _with_text(message: dict, before: str = "", after: str = "") -> dict:
    """A copy of ``message`` with text added around its content: a string, or the first
    and last text parts of a list of parts (vision-language templates)."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return dict(message, content=before + content + after)
    parts = [dict(part) for part in content]
    texts = [part for part in parts if part.get("type") == "text"]
    if not texts:
        parts = [{"type": "text", "text": ""}] + parts
        texts = parts[:1]
    texts[0]["text"] = before + texts[0]["text"]
    texts[-1]["text"] = texts[-1]["text"] + after
    return dict(message, content=parts)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (done in C:
    a character loop in Python made long tool-call conversations 25x slower)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def training_example(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of one conversation as the model renders it, and its assistant mask (1 =
    trained on): a token is trained on when it starts inside an assistant span."""
    full, spans = assistant_spans(messages, tokenizer, template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def preference_example(prompt: list[dict], answer: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one answer of a preference record (DPO, KTO, ORPO), by
    the same rule as SFT: the text is the model's rendering of ``prompt + answer``; the
    answer runs from where the prompt of its first assistant turn ends through the
    end-of-turn token of its last, so the loss covers exactly the answer's trained tokens.
    ``answer`` holds assistant turns only."""
    full, spans = assistant_spans(prompt + answer, tokenizer, template)
    answer_spans = spans[len(spans) - len(answer) :]
    start, end = answer_spans[0][0], answer_spans[-1][1]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if start <= a < end]
    if not trained:
        raise TemplateError(f"{template_name(template)} renders the answer as no token")
    return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]


def turn_end_marker(tokenizer, template: str) -> str:
    """The end-of-turn marker an answer of this template ends with ("" when it writes
    none): found by rendering a one-turn conversation."""
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
    try:
        text, spans = assistant_spans(messages, tokenizer, template)
    except (TemplateError, ValueError, TypeError) as err:  # a template that refuses this conversation
        raise TemplateError(f"{template_name(template)} cannot render a one-turn conversation: {err}") from err
    trained = text[spans[0][0] : spans[0][1]]
    return next((stop for stop in end_of_turn_texts(tokenizer, template) if trained.endswith(stop)), "")


def preview(messages: list[dict], tokenizer, template: str, max_length: int | None = None) -> dict:
    """What the model learns from one conversation, token by token (the Data tab's view and
    ``tunelab data preview``): the text, and per token its id, its text, whether it carries
    the loss and whether it lies within ``max_length`` (the cut the trainer makes)."""
    ids, mask = training_example(messages, tokenizer, template)
    pieces = [tokenizer.decode([tid]) for tid in ids]
    kept = len(ids) if not max_length else min(len(ids), max_length)
    return {
        "template": template_name(inference_template(template)),
        "text": tokenizer.decode(ids),
        "token_ids": ids,
        "tokens": pieces,
        "trained": mask,
        "kept": [int(i < kept) for i in range(len(ids))],
        "length": len(ids),
        "max_length": max_length,
        "cut_at": kept if kept < len(ids) else None,
        "trained_tokens": sum(mask[:kept]),
        "trained_tokens_cut": sum(mask[kept:]),
    }


def preview_text(view: dict, trained: tuple[str, str] = ("\u27e6", "\u27e7")) -> str:
    """A preview for a terminal: trained tokens between the two marks (⟦ ⟧), the cut at
    max_length marked on a line of its own."""
    out, inside = [], False
    for i, (piece, on, kept) in enumerate(zip(view["tokens"], view["trained"], view["kept"])):
        on = on and kept  # past the cut nothing is trained
        if view["cut_at"] is not None and i == view["cut_at"]:
            if inside:
                out.append(trained[1])
                inside = False
            out.append(
                f"\n----- cut at max_length={view['max_length']}: the {view['length'] - i} tokens below "
                "are not trained -----\n"
            )
        if on and not inside:
            out.append(trained[0])
        elif not on and inside:
            out.append(trained[1])
        inside = bool(on)
        out.append(piece)
    if inside:
        out.append(trained[1])
    return "".join(out)

"""engine.templates against the real chat templates that TRL ships (trl/chat_templates/,
found at test time, so a template added to TRL is covered by the next run).

For every original template and every conversation it accepts: the text trained on is
byte-equal to ``apply_chat_template(conversation)``; each assistant turn starts where the
prompt for it (``conversation[:i]`` with the generation prompt) ends and ends with its
end-of-turn marker; and where TRL has a ``{% generation %}`` training variant, the trained
tokens are the variant's, apart from whitespace and end-of-text tokens that the variant
puts after the end-of-turn marker, and the answer's header (its generation prompt), which
some variants train although the model is given it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import templates

TRL_TEMPLATES = Path(__import__("trl").__file__).resolve().parent / "chat_templates"
ORIGINALS = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))

# (template, conversation) pairs refused, and why (asserted: each must raise TemplateError,
# and every other pair must not).
_PROMPT_OPENS_THINK = (
    "its prompt ends in '<think>\\n' (with or without thinking switched off), which the "
    "rendered answer does not hold: the prompt is not a prefix of the conversation"
)
REFUSED = {
    **{
        (name, label): _PROMPT_OPENS_THINK
        for name in ("deepseekv3", "deepseek_r1_distill")
        for label in ("system + one turn", "one turn, no system", "multi-turn", "reasoning in the answers")
    },
    ("qwen3_5_nothink", "reasoning in the answers"): "the no-think template prompts with an empty think block, "
    "so an answer with reasoning cannot follow that prompt",
}

CONVERSATIONS = {
    "system + one turn": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ],
    "one turn, no system": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is a prime number."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am Pip, a small assistant."},
        {"role": "user", "content": "What can you do?"},
        {"role": "assistant", "content": "I can answer short questions."},
    ],
    "reasoning in the answers": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three makes five.\n</think>\n\nIt is 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "<think>\nFour and four is eight.\n</think>\n\nIt is 8."},
    ],
    "tool call": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
        {"role": "tool", "content": '{"temperature": 3, "sky": "cloudy"}'},
        {"role": "assistant", "content": "It is 3 degrees and cloudy in Oslo."},
    ],
}
_TOKEN = re.compile(r"<[^<>\s'\"{}()]{2,40}>")


def _tokenizer_for(embedded_tokenizer, text: str):
    """The embedded tokenizer with the template's own markers as single special tokens."""
    import copy

    tok = copy.deepcopy(embedded_tokenizer)
    markers = sorted(set(_TOKEN.findall(text)) | {m for m in templates.END_OF_TURN_MARKERS if m in text})
    tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    if tok.bos_token is None:  # templates that start with {{ bos_token }} (Llama 3)
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    return tok


@pytest.fixture(scope="module")
def embedded_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def _as_parts(messages):
    """Text-only conversations in the list-of-parts form that vision-language templates read."""
    return [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in messages]


def _accepted(tok, template, messages):
    """The conversation in the form the template renders (plain strings or text parts), or
    None when the template refuses it (no system role, no tool role, ...)."""
    for form in (messages, _as_parts(messages)):
        try:
            text = tok.apply_chat_template(form, chat_template=template, tokenize=False)
        except Exception:  # noqa: BLE001 - a template's raise_exception() or its own type errors
            continue
        if all(m["content"].split("\n")[-1] in text for m in messages if m["role"] != "system"):
            return form
    return None


def _content_text(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


@pytest.mark.parametrize("name", ORIGINALS)
def test_training_text_and_masks_follow_the_models_own_template(name, embedded_tokenizer):
    template = (TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    tok = _tokenizer_for(embedded_tokenizer, template)
    variant_path = TRL_TEMPLATES / f"{name}_training.jinja"
    variant = variant_path.read_text(encoding="utf-8") if variant_path.is_file() else None
    checked = 0
    for label, conversation in CONVERSATIONS.items():
        messages = _accepted(tok, template, conversation)
        if messages is None:
            continue
        if (name, label) in REFUSED:
            with pytest.raises(templates.TemplateError, match=re.escape(templates.template_name(template))):
                templates.assistant_spans(messages, tok, template)
            checked += 1
            continue
        text, spans = templates.assistant_spans(messages, tok, template)
        where = f"{name}, {label}"
        assert text == tok.apply_chat_template(messages, chat_template=template, tokenize=False), where
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(spans) == len(turns), where
        stops = templates.end_of_turn_texts(tok, template)
        for (start, end), i in zip(spans, turns):
            # the template's prompt for it: as rendered by default, or with thinking switched off
            # where the default one opens a think block that the answer does not have (Nemotron 3)
            prompts = [
                tok.apply_chat_template(
                    messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True, **switches
                )
                for switches in ({}, {"enable_thinking": False})
            ]
            if i != turns[-1] and text[:start] not in prompts:
                # an earlier answer the template re-renders (Qwen3.5 drops the think block its prompt
                # opens): it starts where its prompt and the conversation's text part
                assert any(p.startswith(text[:start]) and "<think>" in p[start:] for p in prompts), where
            else:
                assert text[:start] in prompts, (where, text[:start][-30:], [p[-30:] for p in prompts])
            trained = text[start:end]
            answer = _content_text(messages[i]).split("</think>")[-1].strip()
            assert answer in trained, (where, trained)
            # it ends with its end-of-turn marker, or, where the template writes none after the
            # last answer (GLM-4), with the text
            ends_turn = any(trained.endswith(stop) for stop in stops)
            assert ends_turn or (i == len(messages) - 1 and end == len(text.rstrip())), (where, trained[-40:])
            assert sum(trained.count(stop) for stop in stops) == int(ends_turn), (where, trained)
        ids, mask = templates.training_example(messages, tok, template)
        assert tok.decode(ids) == text, where  # the ids are exactly this text
        assert len(ids) == len(mask) and 0 < sum(mask) < len(mask), where
        if variant is not None:
            _same_as_trl_variant(tok, variant, messages, ids, mask, where)
        checked += 1
    assert checked, f"{name}: no conversation was accepted by the template"


def _same_as_trl_variant(tok, variant, messages, ids, mask, where):
    """TRL's generation-marked variant of the template trains the same tokens, apart from
    whitespace and end-of-text tokens after the end-of-turn marker (not the model's to write)
    and the answer's header."""
    out = tok.apply_chat_template(
        messages, chat_template=variant, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    if list(out["input_ids"]) != ids:
        # TRL's variants of re-rendering templates (Qwen3) are prefix-preserving on purpose: they
        # keep earlier reasoning, so their text is not the model's; nothing to compare
        original = tok.apply_chat_template(
            messages,
            chat_template=TRL_TEMPLATES.joinpath(where.split(",")[0] + ".jinja").read_text(encoding="utf-8"),
            tokenize=False,
        )
        assert "</think>" in original or "<think>" in original, f"{where}: TRL's variant renders other text"
        return
    # the answers' headers: TRL's variants may train the special tokens of an answer's generation
    # prompt (role tags, "<think>" openers), which the model is given and tunelab does not train
    # (and, gpt-oss, the whole generation prompt "<|start|>assistant")
    _, spans = templates.assistant_spans(messages, tok, variant)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    headers = [(spans[k - 1][1] if k else 0, start) for k, (start, _) in enumerate(spans)]
    prompts = [
        (len(templates.render(messages[:i], tok, variant)) if i else 0, start) for i, (start, _) in zip(turns, spans)
    ]
    variant_text = tok.apply_chat_template(messages, chat_template=variant, tokenize=False)
    allowed = {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    offsets = tok(variant_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for position, (mine, theirs) in enumerate(zip(mask, out["assistant_masks"])):
        if mine != theirs:
            token = tok.decode([ids[position]])
            at = offsets[position][0]
            in_header = any(a <= at < b for a, b in prompts) or (
                ids[position] in tok.all_special_ids and any(a <= at < b for a, b in headers)
            )
            assert token.strip() == "" or ids[position] in allowed or (in_header and theirs), (
                where,
                position,
                token,
                mine,
                theirs,
            )


def test_every_refused_template_is_still_refused():
    """REFUSED names real templates (a template TRL drops, or one tunelab learns to handle,
    must leave the list)."""
    assert {name for name, _ in REFUSED} <= set(ORIGINALS)
    assert {label for _, label in REFUSED} <= set(CONVERSATIONS)


def test_qwen3_trains_the_empty_think_block_of_the_last_answer_only(embedded_tokenizer):
    """Qwen3 writes an empty think block before the last answer and none before earlier
    ones: the whole conversation's rendering wins, and the block is trained as part of
    the answer. Reasoning in the data is kept."""
    template = (TRL_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    tok = _tokenizer_for(embedded_tokenizer, template)
    messages = CONVERSATIONS["multi-turn"]
    text, spans = templates.assistant_spans(messages, tok, template)
    first, last = (text[s:e] for s, e in spans)
    assert first == "I am Pip, a small assistant.<|im_end|>"
    assert last == "<think>\n\n</think>\n\nI can answer short questions.<|im_end|>"
    text, spans = templates.assistant_spans(CONVERSATIONS["reasoning in the answers"], tok, template)
    first, last = (text[s:e] for s, e in spans)
    assert "<think>" not in first and first.endswith("It is 5.<|im_end|>")  # earlier reasoning dropped by Qwen3
    assert last == "<think>\nFour and four is eight.\n</think>\n\nIt is 8.<|im_end|>"


def test_a_template_whose_prompt_is_not_a_prefix_is_refused_by_name(embedded_tokenizer):
    """A template that writes the prompt one way and the conversation another is refused
    with a sentence that names it, never replaced by another template."""
    template = (
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant (thinking): ' }}{%- endif %}"
    )
    with pytest.raises(templates.TemplateError, match="a custom template renders the prompt of assistant turn 1"):
        templates.assistant_spans(CONVERSATIONS["one turn, no system"], embedded_tokenizer, template)


def test_no_template_means_plain_chatml_and_an_override_wins(embedded_tokenizer):
    bare = type("Bare", (), {"chat_template": None})()
    assert templates.model_template(bare) == (templates.PLAIN_CHATML, "plain ChatML: the tokenizer has none")
    assert templates.model_template(embedded_tokenizer, "{{ x }}") == ("{{ x }}", "config")
    own, source = templates.model_template(embedded_tokenizer)
    assert source == "tokenizer" and own == embedded_tokenizer.chat_template

"""The lean speculative decoder (engine/fastdecode.py): the float32 model's greedy reply,
token for token, whatever its 4-bit draft proposes."""
from __future__ import annotations

import pytest
import torch
from tiny_runs import CHATS, chat_base, shared_adapter_run

from engine import fastdecode
from engine.inference import GenerationSettings, TorchChatModel, load_chat_model, normalize_messages

PROMPTS = [[{"role": "user", "content": q}] for q, _ in CHATS[:3]] + [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me about the sea."}]]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    base = chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())
    return shared_adapter_run(tmp_path_factory.getbasetemp(), base)


@pytest.fixture(scope="module", params=["base", "tuned"])
def chat(request, run) -> TorchChatModel:
    return load_chat_model(run, request.param)


def _hf_greedy(chat, prompt, new_tokens, min_new_tokens=0):
    with torch.inference_mode():
        out = chat.model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, eos_token_id=sorted(chat.stop_ids), pad_token_id=min(chat.stop_ids))
    return out[0, len(prompt):].tolist()


def test_greedy_replies_equal_transformers_generate(chat):
    lean = chat.lean_model()
    assert lean is not None, chat.lean_note
    for messages in PROMPTS:
        prompt = chat.encode_prompt(normalize_messages(messages))
        assert list(lean.greedy(prompt, 40, chat.stop_ids)) == _hf_greedy(chat, prompt, 40)
        forced = list(lean.greedy(prompt, 30, chat.stop_ids, min_new_tokens=30))
        assert len(forced) == 30 and forced == _hf_greedy(chat, prompt, 30, min_new_tokens=30)


@pytest.mark.parametrize("penalty", [1.15, 1.6])
def test_a_repetition_penalty_gives_the_plain_loops_reply(chat, penalty):
    """With a penalty, each choice depends on the tokens before it, guesses included."""
    plain = TorchChatModel(chat.model, chat.tokenizer, backend=chat.backend, label="plain", source="test",
                           fast_decode=False)
    for messages in PROMPTS:
        settings = GenerationSettings(greedy=True, repetition_penalty=penalty, max_new_tokens=40)
        fast = chat.complete(messages, settings)[1]
        reference = plain.complete(messages, settings)[1]
        assert fast.decoder.startswith("speculative") and reference.decoder == "plain"
        assert fast.token_ids == reference.token_ids
    with torch.inference_mode():  # and the penalty does change the reply
        prompt = chat.encode_prompt(normalize_messages(PROMPTS[0]))
        assert list(chat.lean_model().greedy(prompt, 40, chat.stop_ids, repetition_penalty=1.6)) != \
            list(chat.lean_model().greedy(prompt, 40, chat.stop_ids))


def test_a_useless_draft_changes_nothing_but_speed(chat, monkeypatch):
    """Replace the draft's guesses by noise: every guess is rejected or accepted by the
    float32 check alone, so the reply must still be the model's greedy reply."""
    lean = chat.lean_model()
    real = lean.draft.forward
    generator = torch.Generator().manual_seed(0)

    def noisy(ids, last_only=False):
        rows = real(ids, last_only)
        return torch.randn(rows.shape, generator=generator)

    monkeypatch.setattr(lean.draft, "forward", noisy)
    plain = TorchChatModel(chat.model, chat.tokenizer, backend=chat.backend, label="plain", source="test",
                           fast_decode=False)
    penalised = GenerationSettings(greedy=True, repetition_penalty=1.3, max_new_tokens=40)
    for messages in PROMPTS[:2]:
        prompt = chat.encode_prompt(normalize_messages(messages))
        assert list(lean.greedy(prompt, 40, chat.stop_ids)) == _hf_greedy(chat, prompt, 40)
        fast = [t for t in lean.greedy(prompt, 40, chat.stop_ids, repetition_penalty=1.3) if t not in chat.stop_ids]
        assert fast == plain.complete(messages, penalised)[1].token_ids


def test_target_logits_match_the_model_and_survive_a_rollback(chat):
    lean = chat.lean_model()
    ids = chat.encode_prompt(normalize_messages(PROMPTS[0]))
    with torch.inference_mode():
        reference = chat.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        lean.target.reserve(len(ids) + 8)
        head = lean.target.forward(ids[:-5])
        tail = lean.target.forward(ids[-5:])
        assert torch.allclose(torch.cat([head, tail]), reference, atol=1e-4)
        lean.target.length = len(ids) - 5  # roll back, then one token at a time
        rows = [lean.target.forward([t])[0] for t in ids[-5:]]
        assert torch.allclose(torch.stack(rows), reference[-5:], atol=1e-4)
        # the draft is a different (4-bit) model, yet close to it
        lean.draft.reserve(len(ids))
        draft = lean.draft.forward(ids)
    assert not torch.equal(draft, reference)
    assert (draft.argmax(-1) == reference.argmax(-1)).float().mean() > 0.5


def test_the_chat_loop_uses_it_for_greedy_replies_only(chat, monkeypatch):
    greedy = GenerationSettings(greedy=True, max_new_tokens=20)
    text, stats = chat.complete(PROMPTS[0], greedy)
    assert stats.decoder.startswith("speculative") and "speculative" in stats.summary()
    assert stats.token_ids == _hf_greedy(chat, chat.encode_prompt(normalize_messages(PROMPTS[0])), 20)[: len(stats.token_ids)]
    sampled = GenerationSettings(temperature=0.8, seed=1, max_new_tokens=8)
    assert chat.complete(PROMPTS[0], sampled)[1].decoder == "plain"
    too_long = GenerationSettings(greedy=True, max_new_tokens=chat.model.config.max_position_embeddings)
    assert chat.decoder_name(too_long, 10) == "plain"


def test_it_can_be_switched_off_and_refuses_what_it_cannot_run(run, monkeypatch):
    from transformers import AutoModelForCausalLM

    chat = load_chat_model(run, "base")
    monkeypatch.setenv("TUNELAB_FAST_DECODE", "0")
    plain = TorchChatModel(chat.model, chat.tokenizer, backend="base", label="plain", source="test")
    assert plain.lean_model() is None
    assert plain.complete(PROMPTS[0], GenerationSettings(greedy=True, max_new_tokens=5))[1].decoder == "plain"
    monkeypatch.delenv("TUNELAB_FAST_DECODE")
    monkeypatch.setattr(chat.model.config, "model_type", "gpt2")
    with pytest.raises(fastdecode.Unsupported, match="gpt2"):
        fastdecode.LeanModel(chat.model)
    monkeypatch.undo()
    half = AutoModelForCausalLM.from_pretrained(chat.model.name_or_path, dtype=torch.bfloat16)
    with pytest.raises(fastdecode.Unsupported, match="float32"):
        fastdecode.LeanModel(half)

"""The inference scheduler (engine.scheduler) on real tiny models: every PyTorch call on one
thread, a model loaded once for several requests, requests answered correctly and in order,
a stream that stops or is abandoned early, ONNX off the PyTorch thread.

Nothing here waits on a clock: a job that holds a lane until an event is set lines requests
up, and a call on the lane after them returns only once they are done.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from tiny_runs import CHATS, chat_base, make_adapter_run, shared_adapter_run

from engine import export, inference, scheduler
from engine.inference import GenerationSettings
from engine.scheduler import ChatRequest, Scheduler

GREEDY = GenerationSettings(greedy=True, max_new_tokens=40)
LONG = GenerationSettings(greedy=True, max_new_tokens=200, min_new_tokens=200)


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("sched"), base_dir, name="sched-run", seed=7)


@pytest.fixture
def work(monkeypatch):
    """Records, on whatever thread does it, each model load and each sampled token; with
    ``pause_at`` set, the work stops before that token until ``resume`` is set."""
    record = {"loads": [], "tokens": [], "pause_at": None, "paused": threading.Event(), "resume": threading.Event()}
    build = inference.build_chat_model
    stream = inference.TorchChatModel.token_stream

    def recording_build(target, **kwargs):
        record["loads"].append((threading.get_ident(), target.backend))
        return build(target, **kwargs)

    def recording_stream(self, prompt_ids, settings, used=None):
        tokens = stream(self, prompt_ids, settings, used)
        try:
            for token in tokens:
                if len(record["tokens"]) + 1 == record["pause_at"]:
                    record["paused"].set()
                    record["resume"].wait()
                record["tokens"].append((threading.get_ident(), tuple(prompt_ids)))
                yield token
        finally:
            tokens.close()

    monkeypatch.setattr(inference, "build_chat_model", recording_build)
    monkeypatch.setattr(inference.TorchChatModel, "token_stream", recording_stream)
    inference.unload_all()
    yield record
    inference.unload_all()


def hold(sched: Scheduler, lane: str = scheduler.TORCH):
    """A job that keeps ``lane`` busy until the returned event is set."""
    release = threading.Event()

    def blocker():
        release.wait()
        yield "released"

    return sched.stream(lane, blocker), release


def reply(stream) -> tuple[list, str, inference.GenerationStats | None]:
    events = list(stream)
    text = "".join(e.text for e in events if e.kind == "text")
    done = [e for e in events if e.kind == "done"]
    return events, text, done[0].stats if done else None


def ask(run, backend: str, question: str, settings=GREEDY) -> ChatRequest:
    return ChatRequest(run, backend, [{"role": "user", "content": question}], settings)


def test_pytorch_work_runs_on_one_thread_and_a_model_loads_once(run, work):
    sched = Scheduler(share_cpu=True)
    held, release = hold(sched)
    streams = [
        sched.submit(ask(run, "base", CHATS[0][0])),
        sched.submit(ask(run, "tuned", CHATS[1][0])),
        sched.submit(ask(run, "base", CHATS[2][0])),
        sched.submit(ask(run, "tuned", CHATS[0][0])),
    ]
    replies: dict[int, tuple] = {}

    def read(i):  # each stream read from a thread of its own, as Gradio's handlers do
        replies[i] = reply(streams[i])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for reader in readers:
        reader.start()
    release.set()
    for reader in readers:
        reader.join(120)
    assert list(held) == ["released"]

    threads = {ident for ident, _ in work["loads"]} | {ident for ident, _ in work["tokens"]}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert Counter(backend for _, backend in work["loads"]) == {"base": 1, "tuned": 1}
    for i in range(len(streams)):
        events, _, stats = replies[i]
        assert events[0].kind == "queued" and events[0].text == scheduler.WAITING_FOR_CPU
        assert stats is not None and stats.finish_reason == "eos"
    kinds = [[e.kind for e in replies[i][0]] for i in range(4)]
    assert "loading" in kinds[0] and "loading" in kinds[1]  # the first request of each model says so
    assert "loading" not in kinds[2] and "loading" not in kinds[3]
    assert replies[0][1] == CHATS[0][1] and replies[2][1] == CHATS[2][1]  # the base model's own answers
    tuned = inference.load_chat_model(run, "tuned")  # cached: same weights, answered here directly
    assert replies[1][1] == tuned.complete(CHATS[1][0], GREEDY)[0]
    assert replies[3][1] == tuned.complete(CHATS[0][0], GREEDY)[0]
    assert len(work["loads"]) == 2


def test_queued_requests_are_served_in_order_one_at_a_time_without_a_gpu(run, work):
    sched = Scheduler(share_cpu=True)
    held, release = hold(sched)
    first = sched.submit(ask(run, "base", CHATS[1][0]))
    second = sched.submit(ask(run, "base", CHATS[2][0]))
    release.set()
    _, text_2, _ = reply(second)  # read the later one first: order is the scheduler's, not the reader's
    _, text_1, _ = reply(first)
    assert (text_1, text_2) == (CHATS[1][1], CHATS[2][1])
    prompts = [prompt for _, prompt in work["tokens"]]
    first_prompt = prompts[0]
    n_first = prompts.count(first_prompt)
    assert n_first > 1 and len(set(prompts)) == 2
    assert prompts[:n_first] == [first_prompt] * n_first  # every token of the first before any of the second


def test_with_a_gpu_replies_stream_together_from_the_one_thread(run, work):
    sched = Scheduler(share_cpu=False, max_streams=2)
    settings = GenerationSettings(greedy=True, max_new_tokens=24, min_new_tokens=24)
    held, release = hold(sched)
    first = sched.submit(ask(run, "base", CHATS[0][0], settings))
    second = sched.submit(ask(run, "tuned", CHATS[1][0], settings))
    release.set()
    (events_1, text_1, stats_1), (events_2, text_2, stats_2) = reply(first), reply(second)
    assert events_1[0].kind != "queued"  # a free place: it starts beside the held job
    assert events_2[0].kind == "queued" and events_2[0].text == "waiting for 1 other reply"
    assert stats_1.new_tokens == stats_2.new_tokens == 24
    assert len({ident for ident, _ in work["tokens"] + work["loads"]}) == 1
    prompts = [prompt for _, prompt in work["tokens"]]
    a, b = prompts[0], next(p for p in prompts if p != prompts[0])
    last_a = len(prompts) - 1 - prompts[::-1].index(a)
    assert prompts.index(b) < last_a  # interleaved: the second began before the first ended
    base = inference.load_chat_model(run, "base")
    tuned = inference.load_chat_model(run, "tuned")
    assert text_1 == base.complete(CHATS[0][0], settings)[0]
    assert text_2 == tuned.complete(CHATS[1][0], settings)[0]


def test_stop_ends_a_reply_early_and_keeps_its_stats(run, work):
    sched = Scheduler(share_cpu=True)
    work["pause_at"] = 5
    with sched.submit(ask(run, "base", "Tell me about the sea.", LONG)) as stream:
        assert work["paused"].wait(120)
        stream.stop()  # as the playground's Stop button does, from another thread than the work's
        work["resume"].set()
        _, _, stats = reply(stream)
    assert stats.finish_reason == "stopped" and stats.new_tokens == 5
    assert len(work["tokens"]) == 5


def test_an_abandoned_stream_stops_its_work_and_a_queued_one_never_runs(run, work):
    sched = Scheduler(share_cpu=True)
    work["pause_at"] = 5
    running = sched.submit(ask(run, "base", "Tell me about the sea.", LONG))
    assert work["paused"].wait(120)
    held, release = hold(sched)
    queued = sched.submit(ask(run, "tuned", CHATS[0][0]))
    running.close()  # the reader leaves (a closed page, Clear)
    queued.close()
    work["resume"].set()
    release.set()
    assert sched.call(scheduler.TORCH, lambda: "after") == "after"  # the lane is past both
    assert list(running) == [] and list(queued) == [] and list(held) == ["released"]
    assert len(work["tokens"]) == 5  # closed after the token it was computing
    assert [backend for _, backend in work["loads"]] == ["base"]  # the queued tuned request never loaded


def test_a_queued_request_stopped_ends_at_once(run, work):
    sched = Scheduler(share_cpu=True)
    held, release = hold(sched)
    stream = sched.submit(ask(run, "base", CHATS[0][0]))
    stream.stop()
    assert [e.kind for e in stream] == ["queued"]  # no waiting for the lane, no done event
    release.set()
    assert list(held) == ["released"] and work["loads"] == []


def test_errors_reach_the_reader(run, tmp_path):
    sched = Scheduler(share_cpu=True)
    with pytest.raises(inference.InferenceError, match="not one of base, tuned, onnx"):
        sched.submit(ask(run, "gpu", "Hi!"))
    with pytest.raises(inference.InferenceError, match="not a run directory"):
        list(sched.submit(ask(tmp_path / "nowhere", "tuned", "Hi!")))
    assert sched.call(scheduler.TORCH, lambda: 1 + 1) == 2  # the lane goes on


def test_onnx_replies_run_off_the_pytorch_thread(base_dir, tmp_path_factory, work, monkeypatch):
    run_dir = shared_adapter_run(tmp_path_factory.getbasetemp(), base_dir)
    export.export_onnx(run_dir, "fp32")  # reused when another test file made it
    sched = Scheduler(share_cpu=True)
    onnx_threads = []
    original = inference.OnnxChatModel.token_stream

    def recording(self, prompt_ids, settings, used=None):
        for token in original(self, prompt_ids, settings, used):
            onnx_threads.append(threading.get_ident())
            yield token

    monkeypatch.setattr(inference.OnnxChatModel, "token_stream", recording)
    onnx = sched.submit(ChatRequest(run_dir, "onnx", "Hi!", GREEDY, precision="fp32"))
    torch = sched.submit(ask(run_dir, "tuned", "Hi!"))
    (_, onnx_text, _), (_, torch_text, _) = reply(onnx), reply(torch)
    torch_threads = {ident for ident, _ in work["tokens"]}
    assert onnx_threads and len(set(onnx_threads)) == 1 and len(torch_threads) == 1
    assert set(onnx_threads) != torch_threads
    assert onnx_text == torch_text  # the fp32 export makes the same greedy choices


def test_queued_onnx_greedy_replies_share_one_batch(base_dir, tmp_path_factory):
    run_dir = shared_adapter_run(tmp_path_factory.getbasetemp(), base_dir)
    export.export_onnx(run_dir, "fp32")  # reused when another test file made it
    short = GenerationSettings(greedy=True, max_new_tokens=3)
    asks = [(q, GREEDY) for q, _ in CHATS] + [(CHATS[0][0], short)]

    def request(question, settings):
        return ChatRequest(run_dir, "onnx", [{"role": "user", "content": question}], settings, precision="fp32")

    alone = Scheduler(share_cpu=True, max_batch=1)
    singles = [reply(alone.submit(request(q, s))) for q, s in asks]
    sched = Scheduler(share_cpu=True)
    held, release = hold(sched)  # the requests queue up behind it
    streams = [sched.submit(request(q, s)) for q, s in asks]
    sampled = sched.submit(request(CHATS[1][0], GenerationSettings(temperature=0.8, seed=1, max_new_tokens=5)))
    abandoned = sched.submit(request(CHATS[2][0], GREEDY))
    release.set()
    assert list(held) == ["released"]
    assert any(event.kind == "text" for event in abandoned)  # it has started, in the batch
    abandoned.close()  # then its reader leaves
    batched = [reply(s) for s in streams]
    assert [(text, stats.finish_reason) for _, text, stats in batched] == [
        (text, stats.finish_reason) for _, text, stats in singles
    ]
    assert {stats.decoder for _, _, stats in batched} == {"batch of 5"}
    assert singles[-1][2].finish_reason == "length" and singles[-1][2].new_tokens == 3
    assert reply(sampled)[2].decoder != "batch of 5"  # sampled: alone
    assert sched.call(scheduler.ONNX, lambda: "free") == "free"  # nothing left pending

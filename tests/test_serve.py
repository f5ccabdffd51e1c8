"""The OpenAI-compatible API (engine.serve) through the real ``openai`` client, against a
server on a free loopback port, on a tiny run: models, replies whole and streamed, usage,
stop sequences, the errors (401, 400, 404, 413, 503, context length), eight clients at once,
and a client that leaves mid-stream.

Nothing here waits on a clock: a job that holds the scheduler's lane lines requests up, and a
reply paused before a token lets a client leave mid-stream.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from tiny_runs import CHATS, chat_base, make_adapter_run, serving, shared_adapter_run

from engine import export, inference, scheduler, serve
from engine.scheduler import Scheduler

KEY = "sk-test-not-a-real-secret"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    base = chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("api-runs")
    make_adapter_run(root, base, name="api-run", seed=3)
    return root


@pytest.fixture(scope="module")
def sched() -> Scheduler:
    return Scheduler(share_cpu=True)


@pytest.fixture(scope="module")
def open_api(runs, sched):
    api = serve.Api(serve.RunsCatalog(lambda user: runs), serve.StaticKey(None), sched=sched)
    with serving(api) as url:
        yield api, url


@pytest.fixture
def client(open_api):
    return openai.OpenAI(base_url=open_api[1], api_key="unused", max_retries=0)


def hold(sched: Scheduler):
    """Keep the scheduler busy until the returned event is set (share_cpu: every lane waits)."""
    release = threading.Event()

    def blocker():
        release.wait()
        yield "released"

    return sched.stream(scheduler.TORCH, blocker), release


def test_models_lists_each_backend_of_each_run(client):
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == ["api-run:base", "api-run:tuned"]


def test_reply_usage_and_stream_agree(client, runs, tiny_model_dir):
    question, answer = CHATS[0]
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(model="api-run:base", messages=messages, temperature=0)
    assert whole.choices[0].message.content == answer
    assert whole.choices[0].finish_reason == "stop"
    tok = inference.load_chat_model(runs / "api-run", "base").tokenizer
    assert whole.usage.completion_tokens == len(tok(answer, add_special_tokens=False)["input_ids"])
    rendered = inference.load_chat_model(runs / "api-run", "base").encode_prompt(messages)
    assert whole.usage.prompt_tokens == len(rendered)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="api-run:base",
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_sequences_and_max_tokens(client):
    question, answer = CHATS[0]  # "Hello! How can I help you today?"
    messages = [{"role": "user", "content": question}]
    cut = client.chat.completions.create(model="api-run:base", messages=messages, temperature=0, stop=["help", "xyz"])
    assert cut.choices[0].message.content == answer[: answer.index("help")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="api-run:base", messages=messages, temperature=0, stop="can I", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer[: answer.index("can I")]
    short = client.chat.completions.create(model="api-run:base", messages=messages, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert answer.startswith(short.choices[0].message.content)


def test_bad_requests_name_the_field(client):
    messages = [{"role": "user", "content": "Hi!"}]
    cases = {
        "n": {"n": 2},
        "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "response_format": {"response_format": {"type": "json_object"}},
        "logprobs": {"logprobs": True},
        "temperature": {"temperature": 5},
    }
    for field, extra in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="api-run:base", messages=messages, **extra)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == field, field
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="api-run:base", messages=[{"role": "assistant", "content": "x"}])
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="api-run:base", messages=[{"role": "user", "content": "hi " * 1100}])
    assert caught.value.code == "context_length_exceeded"
    # accepted and ignored, as documented
    ok = client.chat.completions.create(
        model="api-run:base", messages=messages, temperature=0, presence_penalty=1, frequency_penalty=1, user="u"
    )
    assert ok.choices[0].message.content == CHATS[0][1]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="api-run:onnx-int4", messages=[{"role": "user", "content": "Hi!"}])
    assert caught.value.code == "model_not_found"


def test_body_over_the_limit_is_413(open_api):
    api, url = open_api
    body = {"model": "api-run:base", "messages": [{"role": "user", "content": "x" * (api.max_body + 1)}]}
    reply = httpx.post(f"{url}/chat/completions", json=body)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_key_required_when_set(runs, sched):
    api = serve.Api(serve.RunsCatalog(lambda user: runs), serve.StaticKey(KEY), sched=sched)
    with serving(api) as url:
        bad = openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
        assert caught.value.code == "invalid_api_key" and KEY not in caught.value.response.text
        no_key = httpx.get(f"{url}/models")
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list().data]


def test_user_keys_list_only_their_runs(runs, sched, tmp_path):
    (tmp_path / "bob").mkdir()
    keys = serve.UserKeys(tmp_path / "keys.json")
    api = serve.Api(serve.RunsCatalog(lambda user: runs if user == "alice" else tmp_path / user), keys, sched=sched)
    alice, bob = keys.issue("alice"), keys.issue("bob")
    assert alice not in (tmp_path / "keys.json").read_text()
    with serving(api) as url:
        assert len(openai.OpenAI(base_url=url, api_key=alice).models.list().data) == 2
        as_bob = openai.OpenAI(base_url=url, api_key=bob, max_retries=0)
        assert as_bob.models.list().data == []
        with pytest.raises(openai.NotFoundError):
            as_bob.chat.completions.create(model="api-run:base", messages=[{"role": "user", "content": "Hi!"}])
        renewed = keys.issue("alice")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key=alice, max_retries=0).models.list()
        assert len(openai.OpenAI(base_url=url, api_key=renewed).models.list().data) == 2


def test_full_queue_is_503_with_retry_after(runs, sched):
    api = serve.Api(
        serve.RunsCatalog(lambda user: runs), serve.StaticKey(None), concurrency=1, queue_size=0, sched=sched
    )
    body = {"model": "api-run:base", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}
    with serving(api) as url:
        blocker, release = hold(sched)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/chat/completions", json=body, timeout=60)
            while api.admission.active == 0:  # the first request holds the one slot
                time.sleep(0.01)
            busy = httpx.post(f"{url}/chat/completions", json=body)
            release.set()
            assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
            assert busy.json()["error"]["type"] == "server_error"
            assert first.result().json()["choices"][0]["message"]["content"] == CHATS[0][1]
        list(blocker)


def test_eight_clients_at_once_all_answered(open_api):
    api, url = open_api
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

    def ask(i: int) -> tuple[str, str, str]:
        question, answer = CHATS[i % len(CHATS)]
        stream = client.chat.completions.create(
            model="api-run:base", messages=[{"role": "user", "content": question}], temperature=0, stream=True
        )
        chunks = list(stream)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return "".join(c.choices[0].delta.content or "" for c in chunks), answer, reasons[-1]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert [(text, reason) for text, _, reason in results] == [(answer, "stop") for _, answer, _ in results]
    assert api.admission.active == 0 and api.admission.waiting == 0
    assert client.models.list().data  # healthy afterwards


def test_client_leaving_mid_stream_frees_its_slot(open_api, monkeypatch):
    api, url = open_api
    tokens, paused, resume = [], threading.Event(), threading.Event()
    original = inference.TorchChatModel.token_stream

    def paused_stream(self, prompt_ids, settings, used=None):
        for token in original(self, prompt_ids, settings, used):
            if len(tokens) == 1:  # the first token is out; the reply waits here
                paused.set()
                resume.wait()
            tokens.append(token)
            yield token

    monkeypatch.setattr(inference.TorchChatModel, "token_stream", paused_stream)
    body = {"model": "api-run:base", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert paused.wait(30)  # the reply is mid-stream, and waits
        lines.close()
    # the client has gone while its reply waits: the server notices and frees the slot
    deadline = time.monotonic() + 30
    while api.admission.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api.admission.active == 0 and not resume.is_set()
    resume.set()
    sched = api.scheduler
    assert sched.call(scheduler.ONNX, lambda: "after") == "after"  # share_cpu: runs once the reply is gone
    assert len(tokens) <= 2  # abandoned: the reply did not run to its end


def test_web_app_serves_each_person_their_runs(runs, tmp_path, monkeypatch):
    """`tunelab ui --api --auth ...`: /v1 beside the page, a key per person, and the
    Playground's Python snippet runs as shown."""
    import re
    import shutil

    from engine.security import user_dir
    from webui import api_panel
    from webui.app import api_routes, build_api, build_app
    from webui.common import AppContext

    ctx = AppContext(runs_dir=tmp_path / "runs", auth=True)
    shutil.copytree(runs / "api-run", user_dir(ctx.runs_dir, "alice", True) / "api-run")
    ctx.api = build_api(ctx)
    demo = build_app(ctx)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(
        prevent_thread_lock=True,
        server_port=port,
        quiet=True,
        auth=[("alice", "pw-a"), ("bob", "pw-b")],
        app_kwargs={"routes": api_routes(ctx)},
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{url}/models").status_code == 401  # a login app always wants a key
        alice, bob = ctx.api.keys.issue("alice"), ctx.api.keys.issue("bob")
        assert [m.id for m in openai.OpenAI(base_url=url, api_key=bob).models.list().data] == []
        ids = [m.id for m in openai.OpenAI(base_url=url, api_key=alice).models.list().data]
        assert ids == ["api-run:base", "api-run:tuned"]
        shown = serve.client_snippet(url, api_panel.model_id("api-run", "tuned", "int4"))
        code = re.search(r"```python\n(.*?)```", shown, re.S).group(1)
        monkeypatch.setenv("TUNELAB_API_KEY", alice)
        exec(compile(code, "snippet", "exec"), {})  # raises on any error status
        assert f"curl {url}/chat/completions" in shown and alice not in shown
    finally:
        demo.close()


def test_merged_backend_answers_as_the_tuned_one(tiny_model_dir, tmp_path, tmp_path_factory, sched):
    base = chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())  # the session's (cached)
    run_dir = make_adapter_run(tmp_path, base, name="merge-run", seed=5, scale=0.02)
    export.merge(run_dir)
    catalog = serve.RunsCatalog(lambda user: tmp_path)
    assert [m.id for m in catalog.models(None)] == ["merge-run:base", "merge-run:tuned", "merge-run:merged"]
    api = serve.Api(catalog, serve.StaticKey(None), sched=sched)
    with serving(api) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        replies = [
            client.chat.completions.create(
                model=f"merge-run:{backend}", messages=[{"role": "user", "content": "Hi!"}], temperature=0
            )
            .choices[0]
            .message.content
            for backend in ("tuned", "merged")
        ]
    assert replies[0] == replies[1]


def test_onnx_clients_at_once_share_a_batch(tiny_model_dir, tmp_path_factory, sched, monkeypatch):
    """Four streaming clients of an ONNX export: each gets the reply it gets alone, and the
    scheduler answered them in batches (not one by one)."""
    run_dir = shared_adapter_run(
        tmp_path_factory.getbasetemp(), chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())
    )
    export.export_onnx(run_dir, "fp32")  # reused when another test file made it
    decoders = []
    original = inference.OnnxChatModel.generate_batch

    def recording(self, chats):
        decoders.append(len(chats))
        yield from original(self, chats)

    monkeypatch.setattr(inference.OnnxChatModel, "generate_batch", recording)
    api = serve.Api(serve.OneModel(run_dir, "onnx-fp32"), serve.StaticKey(None), sched=sched)
    with serving(api) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(question: str) -> str:
            chunks = client.chat.completions.create(
                model="lora-run:onnx-fp32",
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=24,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks)

        alone = [ask(q) for q, _ in CHATS]
        blocker, release = hold(sched)  # the four requests queue up behind it
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, CHATS[i % len(CHATS)][0]) for i in range(4)]
            while api.admission.active < 4:
                time.sleep(0.01)
            release.set()
            together = [f.result() for f in futures]
        list(blocker)
    assert together == [alone[i % len(CHATS)] for i in range(4)]
    assert max(decoders) == 4

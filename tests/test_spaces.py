"""The web app is safe to share (a public Hugging Face Space, a team server).

* Handler level (the app's own event handlers, taken from the built gr.Blocks and called
  as Gradio calls them, with a request standing for a signed-in user): run ids and paths
  from the page that leave the user's directory are refused, uploaded file names are
  sanitised, upload size and count are limited, a public demo refuses runs over its
  limits with the limits named, trust_remote_code is refused, a push never uses the
  server's own token.
* Over HTTP (integration): the real app (`python -m engine.cli ui --auth alice:pw1,bob:pw2`
  with TUNELAB_MULTI_USER=1), logged in as each user: each lists and downloads only their
  own runs, Gradio's file route serves no file of any run, and no response carries the
  HF_TOKEN of the server's environment; the same with "Sign in with Hugging Face" (a
  Space's OAuth session) instead of passwords.
* Secrets in the environment never reach a run's files (config.yaml, command.txt,
  status.json, train.log) when the app starts a run.

Runs are made by hand (config.yaml + status.json + a small adapter folder): no training.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_runs import stop_process

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "datasets"
SECRET = "hf_" + "Zq8" * 10  # shaped like a Hub token
OTHER_SECRET = "wandb-key-0123456789abcdef"


# --------------------------------------------------------------------------- helpers


def make_run(user_root: Path, run_id: str, note: str = "") -> Path:
    """A finished LoRA run written by hand: config.yaml, status.json, command.txt, adapter/."""
    run_dir = user_root / run_id
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "model:\n  name_or_path: smollm2-135m-instruct\nmethod:\n  name: lora\n"
        f"data:\n  path: {user_root}/.uploads/0123/{run_id}-data.jsonl\n",
        encoding="utf-8",
    )
    (run_dir / "status.json").write_text(
        json.dumps({"state": "completed", "run_id": run_id, "created_at": time.time(), "error": note}), encoding="utf-8"
    )
    (run_dir / "command.txt").write_text(f"python -m engine.train --config config.yaml {note}\n", encoding="utf-8")
    (run_dir / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(f"weights of {run_id}".encode())
    return run_dir


def user(name: str) -> SimpleNamespace:
    """What a handler's gr.Request says about a user signed in with --auth."""
    return SimpleNamespace(username=name, session_hash=f"session-of-{name}")


def handlers(app) -> dict:
    """The app's event handlers by API name (as Gradio registered them)."""
    return {fn.api_name: fn.fn for fn in app.fns.values() if fn.api_name}


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A multi-user app (not launched) with one run for alice and one for bob."""
    from engine.security import user_dir
    from webui.app import build_app
    from webui.common import AppContext

    monkeypatch.delenv("TUNELAB_DEMO", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where download zips are built
    ctx = AppContext(runs_dir=tmp_path / "runs", multi_user=True)
    app = build_app(ctx)
    roots = {name: user_dir(ctx.runs_dir, name, True) for name in ("alice", "bob")}
    runs = {name: make_run(root, f"{name}-run") for name, root in roots.items()}
    return SimpleNamespace(ctx=ctx, app=app, fn=handlers(app), roots=roots, runs=runs)


def refused(call, *args, match: str = ""):
    """The handler refuses with a gr.Error (a message in the page, never a traceback),
    optionally matching."""
    import gradio as gr

    with pytest.raises(gr.Error) as caught:
        out = call(*args)
        if hasattr(out, "__next__"):  # a streaming handler runs when iterated
            list(out)
    assert match.lower() in caught.value.message.lower(), caught.value.message
    assert "Traceback" not in caught.value.message
    return caught.value.message


# --------------------------------------------------------------------------- who is asking


def test_multi_user_turns_on_with_a_login_and_reads_each_kind_of_user(tmp_path, monkeypatch):
    from webui.common import AppContext, oauth_configured

    for name in ("TUNELAB_MULTI_USER", "SPACE_ID", "OAUTH_CLIENT_ID", "SYSTEM"):
        monkeypatch.delenv(name, raising=False)
    assert AppContext(runs_dir=tmp_path).multi_user is False
    assert AppContext(runs_dir=tmp_path, auth=True).multi_user is True
    monkeypatch.setenv("TUNELAB_MULTI_USER", "0")  # the operator's explicit choice wins
    assert AppContext(runs_dir=tmp_path, auth=True).multi_user is False
    monkeypatch.delenv("TUNELAB_MULTI_USER")

    # A Space with hf_oauth: true sets SPACE_ID, SYSTEM=spaces and OAUTH_CLIENT_ID.
    space = {"SPACE_ID": "me/tunelab", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "id"}
    assert oauth_configured(space)
    assert not oauth_configured({"SPACE_ID": "me/tunelab", "SYSTEM": "spaces"})  # no hf_oauth
    assert not oauth_configured({"SPACE_ID": "me/tunelab", "OAUTH_CLIENT_ID": "id"})  # not in a Space
    ctx = AppContext(runs_dir=tmp_path, oauth=True)
    assert ctx.multi_user
    signed_in = SimpleNamespace(
        username=None,
        session_hash="s1",
        session={"oauth_info": {"expires_at": time.time() + 60, "userinfo": {"preferred_username": "carol"}}},
    )
    expired = SimpleNamespace(
        username=None,
        session_hash="s2",
        session={"oauth_info": {"expires_at": time.time() - 1, "userinfo": {"preferred_username": "carol"}}},
    )
    assert ctx.user_of(signed_in) == "hf:carol" and ctx.display_name(signed_in) == "carol"
    assert ctx.user_of(expired) is None and ctx.listing_dir(expired) is None
    refused(ctx.runs_for, expired, match="Sign in with Hugging Face")
    # An --auth user and a Hugging Face user of the same name do not share a directory.
    assert ctx.runs_for(signed_in) != ctx.runs_for(user("carol"))

    # Multi-user with no login at all: a workspace per page (session).
    monkeypatch.setenv("TUNELAB_MULTI_USER", "1")
    open_ctx = AppContext(runs_dir=tmp_path)
    a, b = SimpleNamespace(username=None, session_hash="aaa"), SimpleNamespace(username=None, session_hash="bbb")
    assert open_ctx.runs_for(a) != open_ctx.runs_for(b)


def test_no_login_button_outside_a_space(tmp_path):
    """Gradio builds its OAuth routes when the page has a LoginButton; outside a Space it
    would replace them with the machine's own Hugging Face login, so the app only adds the
    button in a Space with OAuth (the integration test below runs one)."""
    import gradio as gr

    from webui.app import build_app
    from webui.common import AppContext

    app = build_app(AppContext(runs_dir=tmp_path, auth=True))
    assert not [b for b in app.blocks.values() if isinstance(b, gr.LoginButton)]


# --------------------------------------------------------------------------- path traversal


TRAVERSALS = [
    "../bob-run",
    "..",
    ".",
    "../../users",
    "alice-run/../../bob",
    "alice-run/..",
    "/etc",
    "a\\..\\..\\b",
    ".hidden",
    "",
]


def test_run_ids_and_paths_that_leave_the_users_directory_are_refused(shared):
    fn, alice, bob_run = shared.fn, user("alice"), shared.runs["bob"]
    bob_rel = f"../{bob_run.parent.name}/{bob_run.name}"
    attempts = [
        *TRAVERSALS,
        bob_rel,
        str(bob_run),
        str(shared.roots["alice"] / ".." / bob_run.parent.name / "bob-run"),
        "bob-run",
    ]  # bob's run id is simply not among alice's runs
    for value in attempts:
        for call, args in (
            (fn["download_adapter"], (value, alice)),
            (fn["export_contents"], (value, alice)),
            (fn["run_details"], (value, alice)),
            (fn["delete_run"], (value, [], alice)),
            (fn["resume_run"], (value, alice)),
            (fn["model_card"], (value, "adapter", "alice/x", alice)),
            (fn["push"], (value, "adapter", "alice/x", True, "hf_pasted_token_value_1234", alice, None)),
            (fn["try_example"], (value, None, alice)),
            (fn["open_in_playground"], (value, alice)),
        ):
            if not value and call in (fn["export_contents"], fn["run_details"]):
                continue  # an empty picker shows "Pick a run", which is not a refusal
            refused(call, *args)
        if value:
            refused(fn["loss_curves"], [value], "train", alice)
            refused(fn["show_availability"], value, "int4", alice)
    # Nothing of bob's was touched, and the refusals name no directory of this machine.
    assert (bob_run / "adapter" / "adapter_model.safetensors").is_file()
    message = refused(fn["download_adapter"], str(bob_run), alice, match="not one of your runs")
    assert str(shared.ctx.runs_dir) not in message

    # The chat columns refuse another user's run before loading anything.
    from webui.playground_tab import Column

    refused(fn["answer_1"], "Hi", Column("tuned"), bob_rel, "", 8, 0.0, 1.0, 1.0, "int4", alice)


def test_each_user_works_on_their_own_runs(shared):
    import zipfile

    fn = shared.fn
    alice, bob = user("alice"), user("bob")
    table, compare, picker = fn["list_runs"](None, [], alice)
    assert [row[0] for row in table["data"]] == ["alice-run"] and picker.choices == [("alice-run", "alice-run")]
    assert [v for _, v in fn["export_runs"](None, bob).choices] == ["bob-run"]
    (archive,) = fn["download_adapter"]("alice-run", alice)
    with zipfile.ZipFile(archive) as zf:
        assert zf.read("adapter/adapter_model.safetensors") == b"weights of alice-run"
    # Zips are built outside the runs directory (which a shared app never serves).
    assert not Path(archive).is_relative_to(shared.ctx.runs_dir)
    # The picker may hold a run's full path; one inside the user's directory is accepted.
    assert "adapter" in fn["export_contents"](str(shared.runs["alice"]), alice)[0]
    fn["delete_run"]("bob-run", [], bob)
    assert not shared.runs["bob"].exists() and shared.runs["alice"].exists()
    assert fn["list_runs"](None, [], bob)[0]["data"] == []


def test_uploaded_file_names_are_sanitised_and_samples_are_only_the_listed_ones(shared, tmp_path):
    """An upload reaches a handler as a file in Gradio's cache named as the browser sent it
    (a name may hold backslashes, dots and shell characters): it is stored under the user's
    uploads folder with a sanitised name, or refused when nothing usable is left."""
    fn, alice = shared.fn, user("alice")
    uploads = shared.roots["alice"] / ".uploads"
    cache = tmp_path / "gradio-cache"
    cache.mkdir()
    for i, (name, kept) in enumerate(
        (
            ("..\\..\\..\\bob\\evil.jsonl", "evil.jsonl"),
            ("my data;rm -rf $HOME.jsonl", "my_data_rm_-rf_HOME.jsonl"),
            ("...hidden.jsonl", "hidden.jsonl"),
        )
    ):
        src = cache / name
        src.write_text(f'{{"n": {i}}}\n')
        stored = Path(fn["upload"](str(src), alice))
        assert stored.name == kept and stored.parent.parent == uploads and stored.is_file()
    for bad in ("...", " .. ", "_._"):
        src = cache / bad
        src.write_text('{"n": 9}\n')
        refused(fn["upload"], str(src), alice, match="not usable")
    assert sorted(p.name for p in uploads.rglob("*") if p.is_file()) == [
        "evil.jsonl",
        "hidden.jsonl",
        "my_data_rm_-rf_HOME.jsonl",
    ]
    refused(fn["load_sample"], "../../engine/security.py", match="not one of the sample datasets")
    refused(fn["load_sample"], "/etc/passwd", match="not one of the sample datasets")
    assert fn["load_sample"]("pip_chat.jsonl") == str(SAMPLES / "pip_chat.jsonl")


def test_upload_size_and_count_limits_say_what_to_do(shared, tmp_path, monkeypatch):
    from engine import security

    fn, alice = shared.fn, user("alice")
    uploads = shared.roots["alice"] / ".uploads"
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 2048)
    monkeypatch.setattr(security, "MAX_UPLOAD_BYTES", 1024)
    message = refused(fn["upload"], str(big), alice, match="uploads are limited to")
    assert "big.jsonl" in message and "TUNELAB_MAX_UPLOAD_MB" in message
    assert not uploads.exists() or not any(uploads.iterdir())
    monkeypatch.setattr(security, "MAX_UPLOAD_BYTES", 1 << 20)

    monkeypatch.setattr(security, "MAX_UPLOADS_PER_USER", 2)
    stored = []
    for i in range(3):
        src = tmp_path / f"data{i}.jsonl"
        src.write_text(f'{{"n": {i}}}\n')
        stored.append(Path(fn["upload"](str(src), alice)))
        os.utime(stored[-1].parent, (time.time() - 100 + i, time.time() - 100 + i))
    # The oldest upload, used by no run, made room for the third.
    assert not stored[0].exists() and stored[1].exists() and stored[2].exists()
    # When runs train on every upload, a new one is refused with what to do.
    for i, path in enumerate(stored[1:]):
        run = make_run(shared.roots["alice"], f"uses-{i}")
        (run / "config.yaml").write_text(f"data:\n  path: {path}\n", encoding="utf-8")
    src = tmp_path / "data9.jsonl"
    src.write_text('{"n": 9}\n')
    message = refused(fn["upload"], str(src), alice, match="TUNELAB_MAX_UPLOADS")
    assert "Runs tab" in message and stored[1].exists() and stored[2].exists()
    # Re-uploading a file already stored is not a new upload.
    assert Path(fn["upload"](str(tmp_path / "data2.jsonl"), alice)) == stored[2]


# --------------------------------------------------------------------------- demo mode and remote code


def _start_values(**form) -> list:
    from webui.train_tab import FormValues

    values = FormValues(**form)
    return [getattr(values, name) for name in FormValues.names()]


def _dataset(path: Path, records: int = 10, max_length: int = 256):
    from engine.config import DataConfig
    from webui.links import DataChoice

    config = DataConfig(path=str(path), format="openai", on_error="skip", validation_split=0.2, max_length=max_length)
    return DataChoice(config=config, name=path.name, records=records, train=records - 2, val=2)


def test_demo_mode_prefills_its_limits_and_refuses_a_run_over_them(tmp_path, monkeypatch):
    from webui.app import build_app
    from webui.common import AppContext

    monkeypatch.setenv("TUNELAB_DEMO", "1")
    monkeypatch.delenv("TUNELAB_DEMO_MAX_STEPS", raising=False)
    ctx = AppContext(runs_dir=tmp_path / "runs", multi_user=True)
    app = build_app(ctx)
    widgets = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert widgets["train-max-steps"].value == 60 and widgets["data-max-length"].value == 512
    assert widgets["data-max-length"].maximum == 512
    assert widgets["train-deepspeed"].interactive is False and widgets["train-num-processes"].interactive is False
    assert [v for _, v in widgets["train-model"].choices] == ["smollm2-135m-instruct"]

    start, alice = handlers(app)["start"], user("alice")
    data = SAMPLES / "pip_chat.jsonl"
    import gradio as gr

    with pytest.raises(gr.Error) as caught:
        start(alice, _dataset(data, max_length=2048), *_start_values(max_steps=500, method="full"))
    message = caught.value.message
    assert message.startswith("This is a demo with limits") and caught.value.title == "Not allowed here"
    for limit in ("training.max_steps 500 (at most 60)", "method 'full'", "data.max_length 2048 (at most 512)"):
        assert limit in message, message
    refused(start, alice, _dataset(data), *_start_values(max_steps=-1), match="training.max_steps -1 (at most 60)")
    refused(
        start,
        alice,
        _dataset(data, records=5000),
        *_start_values(max_steps=10),
        match="5000 usable records (at most 2000)",
    )
    refused(
        start,
        alice,
        _dataset(data),
        *_start_values(max_steps=10, deepspeed="zero2", num_processes=2),
        match="distributed training",
    )
    assert not any(ctx.runs_for(alice).glob("*/status.json"))  # nothing was started


def test_trust_remote_code_is_refused_unless_the_operator_allows_it(tmp_path, monkeypatch):
    from webui.app import build_app
    from webui.common import AppContext

    monkeypatch.delenv("TUNELAB_DEMO", raising=False)
    monkeypatch.delenv("TUNELAB_ALLOW_REMOTE_CODE", raising=False)
    ctx = AppContext(runs_dir=tmp_path / "runs", multi_user=True)
    start, alice = handlers(build_app(ctx))["start"], user("alice")
    refused(
        start,
        alice,
        _dataset(SAMPLES / "pip_chat.jsonl"),
        *_start_values(max_steps=1, trust_remote_code=True),
        match="TUNELAB_ALLOW_REMOTE_CODE=1",
    )
    assert not any(ctx.runs_for(alice).glob("*/status.json"))


def test_a_shared_app_refuses_models_and_datasets_of_other_users(shared):
    start, alice = shared.fn["start"], user("alice")
    bob_model = str(shared.runs["bob"] / "adapter")
    refused(
        start,
        alice,
        _dataset(SAMPLES / "pip_chat.jsonl"),
        *_start_values(model=bob_model, max_steps=1),
        match="not available here",
    )
    bob_data = shared.roots["bob"] / ".uploads" / "0123" / "data.jsonl"
    refused(start, alice, _dataset(bob_data), *_start_values(max_steps=1), match="not one of your uploads")
    assert shared.ctx.check_model(alice, "HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id is fine
    refused(shared.ctx.check_model, alice, "/etc", match="not available here")


# --------------------------------------------------------------------------- the Hub from the Export tab


def test_push_uses_the_users_token_never_the_servers(shared, monkeypatch):
    fn, alice = shared.fn, user("alice")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(
        fn["push"],
        "alice-run",
        "adapter",
        "alice/tuned",
        True,
        "",
        alice,
        None,
        match="the server's own token is never used",
    )
    # With a pasted token the push goes ahead, and the engine's HubError is the message.
    refused(
        fn["push"],
        "alice-run",
        "adapter",
        "alice/tuned",
        True,
        "hf_" + "p" * 30,
        alice,
        None,
        match="offline mode is on",
    )
    refused(
        fn["push"],
        "alice-run",
        "adapter",
        "not a repo id",
        True,
        "hf_" + "p" * 30,
        alice,
        None,
        match="invalid repository id",
    )
    oauth = SimpleNamespace(token="hf_" + "o" * 30, scope="openid profile write-repos", expires_at=0)
    refused(fn["push"], "alice-run", "onnx-int4", "alice/tuned", True, "", alice, oauth, match="no ONNX int4")

    card = fn["model_card"]("alice-run", "adapter", "alice/tuned", alice)
    assert card.visible and "alice/tuned" in card.value and "lora" in card.value.lower()
    assert SECRET not in card.value and str(shared.ctx.runs_dir) not in card.value


def test_pages_show_logs_and_commands_with_secrets_redacted(shared, monkeypatch):
    from webui.train_tab import failure_markdown

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", OTHER_SECRET)
    leaky = make_run(shared.roots["alice"], "leaky-run", note=f"token={SECRET} key={OTHER_SECRET}")
    details = shared.fn["run_details"]("leaky-run", user("alice"))
    assert SECRET not in details and OTHER_SECRET not in details and "token=***" in details
    status = json.loads((leaky / "status.json").read_text())
    panel = failure_markdown({**status, "state": "failed", "log_tail": f"error with {SECRET}\n"})
    assert SECRET not in panel and OTHER_SECRET not in panel


# --------------------------------------------------------------------------- secrets and run files


def test_secrets_in_the_environment_never_reach_a_runs_files(tmp_path, monkeypatch):
    """A run started from the Train tab (it fails fast: its upload is gone) writes
    config.yaml, command.txt, status.json and train.log without the tokens of the
    environment it inherited."""
    from engine import runs
    from webui.app import build_app
    from webui.common import AppContext

    for name, value in (("HF_TOKEN", SECRET), ("HUGGING_FACE_HUB_TOKEN", SECRET), ("WANDB_API_KEY", OTHER_SECRET)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNELAB_DEMO", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = AppContext(runs_dir=tmp_path / "runs", multi_user=True)
    alice = user("alice")
    gone = ctx.runs_for(alice) / ".uploads" / "0123" / "gone.jsonl"
    handlers(build_app(ctx))["start"](alice, _dataset(gone), *_start_values(max_steps=1))
    (run_dir,) = [p.parent for p in ctx.runs_for(alice).glob("*/status.json")]
    deadline = time.time() + 120
    while (status := runs.refresh_status(run_dir)).get("state") not in runs.FINAL_STATES:
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "failed" and status.get("error_class") == "bad data", status
    written = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in run_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "command.txt", "status.json", "train.log"} <= set(written)
    assert "gone.jsonl" in written["train.log"]  # the log is real
    for name, text in written.items():
        assert SECRET not in text and OTHER_SECRET not in text, name


# --------------------------------------------------------------------------- over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path: Path, args: list[str], env: dict):
    """Start `python -m engine.cli ui` on a free port; returns (process, base url)."""
    port = _free_port()
    log_path = tmp_path / "app.log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("TUNELAB_DEMO", "TUNELAB_AUTH")}
    (tmp_path / "tmp").mkdir(exist_ok=True)  # the app's zips and Gradio's cache stay in the test's folder
    full_env.update(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"), **env)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "ui", "--port", str(port), *args],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 90
    while True:
        try:
            httpx.get(base + "/", timeout=2)
            return proc, base, log_path
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)


@pytest.fixture
def two_user_server(tmp_path):
    from engine.security import user_dir

    runs_dir = tmp_path / "runs"
    roots = {name: user_dir(runs_dir, name, True) for name in ("alice", "bob")}
    made = {name: make_run(root, f"{name}-run", note=f"secret {SECRET}") for name, root in roots.items()}
    proc, base, log_path = _serve(
        tmp_path,
        ["--runs-dir", str(runs_dir), "--auth", "alice:pw1,bob:pw2"],
        {"TUNELAB_MULTI_USER": "1", "HF_TOKEN": SECRET, "TUNELAB_MAX_UPLOAD_MB": "1"},
    )
    yield SimpleNamespace(base=base, runs=made, runs_dir=runs_dir, log=log_path, tmp=tmp_path / "tmp")
    stop_process(proc)


@pytest.mark.integration
def test_users_list_and_fetch_only_their_own_runs_over_http(two_user_server):
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    srv = two_user_server
    # Without logging in, nothing: the API and the file route ask for a login, and a
    # wrong password does not open them.
    assert httpx.get(srv.base + "/gradio_api/info").status_code == 401
    own_file = srv.runs["alice"] / "adapter" / "adapter_model.safetensors"
    assert httpx.get(f"{srv.base}/gradio_api/file={own_file}").status_code == 401
    guesser = httpx.Client(base_url=srv.base)
    assert guesser.post("/login", data={"username": "alice", "password": "pw2"}).status_code >= 400
    assert guesser.get("/gradio_api/info").status_code == 401

    for me, password, other in (("alice", "pw1", "bob"), ("bob", "pw2", "alice")):
        client = Client(srv.base, auth=(me, password), verbose=False)
        table, _, picker = client.predict(None, [], api_name="/list_runs")
        assert [row[0] for row in table["data"]] == [f"{me}-run"]
        assert other not in json.dumps(table)
        assert [v for _, v in client.predict(None, api_name="/export_runs")["choices"]] == [f"{me}-run"]
        assert [v for _, v in client.predict(None, api_name="/playground_runs")["choices"]] == [f"{me}-run"]
        details = client.predict(f"{me}-run", api_name="/run_details")
        assert f"{me}-run" in details and SECRET not in details and "secret ***" in details

        # Their own adapter comes as a zip; the other user's run, by id or path, does not.
        (archive,) = client.predict(f"{me}-run", api_name="/download_adapter")
        import zipfile

        assert list((srv.tmp / "tunelab-downloads").glob(f"{me}-run-*/{me}-run-adapter.zip"))

        with zipfile.ZipFile(archive) as zf:
            assert zf.read("adapter/adapter_model.safetensors") == f"weights of {me}-run".encode()
        for value in (f"{other}-run", str(srv.runs[other]), f"../{srv.runs[other].parent.name}/{other}-run"):
            for api_name in ("/download_adapter", "/run_details", "/export_contents", "/resume_run"):
                with pytest.raises(AppError) as caught:
                    client.predict(value, api_name=api_name)
                assert f"weights of {other}" not in str(caught.value)

        # Gradio's file route serves no file of any run, the user's own included, nor
        # the zips before Gradio copies them.
        http = httpx.Client(base_url=srv.base)
        assert http.post("/login", data={"username": me, "password": password}).status_code == 200
        theirs = srv.runs[other]
        for path in (
            theirs / "adapter" / "adapter_model.safetensors",
            theirs / "config.yaml",
            srv.runs[me] / "config.yaml",
            f"{srv.runs[me]}/../../{theirs.parent.name}/{other}-run/config.yaml",
            *(srv.tmp / "tunelab-downloads").glob(f"{other}-run-*/*.zip"),
        ):
            response = http.get(f"/gradio_api/file={path}")
            assert response.status_code == 403, (path, response.status_code)
            assert f"weights of {other}" not in response.text
        # An upload over TUNELAB_MAX_UPLOAD_MB (1 MB here) is refused as it arrives.
        response = http.post("/gradio_api/upload", files={"files": ("big.jsonl", b"x" * ((1 << 20) + 1))})
        assert response.status_code == 413, response.text[:200]
        small = http.post("/gradio_api/upload", files={"files": ("small.jsonl", b'{"n": 1}\n')})
        assert small.status_code == 200
        # No response carries the server's token: the page, its config, the API description.
        for route in ("/", "/config", "/gradio_api/info"):
            response = http.get(route)
            assert response.status_code == 200 and SECRET not in response.text, route
        assert (theirs / "adapter" / "adapter_model.safetensors").is_file()


def _oauth_cookie(secret: str, username: str) -> str:
    """A session cookie as gradio's "Sign in with Hugging Face" callback leaves it."""
    import itsdangerous

    session = {
        "oauth_info": {
            "access_token": f"oauth-{username}",
            "scope": "openid profile",
            "expires_at": int(time.time()) + 3600,
            "userinfo": {
                "preferred_username": username,
                "name": username.title(),
                "profile": f"https://huggingface.co/{username}",
                "picture": "",
            },
        }
    }
    key = hashlib.sha256((secret + "-v4").encode()).hexdigest()  # gradio.oauth.attach_oauth's key
    return itsdangerous.TimestampSigner(key).sign(base64.b64encode(json.dumps(session).encode())).decode()


@pytest.mark.integration
def test_hugging_face_sign_in_separates_users_over_http(tmp_path):
    pytest.importorskip("authlib")
    from gradio_client import Client

    from engine.security import user_dir

    runs_dir = tmp_path / "runs"
    for name in ("carol", "dave"):
        make_run(user_dir(runs_dir, f"hf:{name}", True), f"{name}-run")
    client_secret = "space-oauth-secret"
    env = {
        "SYSTEM": "spaces",
        "SPACE_ID": "someone/tunelab",
        "OAUTH_CLIENT_ID": "client-id",
        "OAUTH_CLIENT_SECRET": client_secret,
        "OAUTH_SCOPES": "openid profile",
        "OPENID_PROVIDER_URL": "http://127.0.0.1:9",
        "HF_TOKEN": SECRET,
    }
    proc, base, log_path = _serve(tmp_path, ["--runs-dir", str(runs_dir)], env)
    try:
        import httpx

        page = httpx.get(base + "/config").text
        assert "Sign in with Hugging Face" in page and SECRET not in page
        for name in ("carol", "dave"):
            client = Client(base, headers={"Cookie": f"session={_oauth_cookie(client_secret, name)}"}, verbose=False)
            assert f"Signed in as **{name}**" in client.predict(api_name="/whoami")
            table, _, _ = client.predict(None, [], api_name="/list_runs")
            assert [row[0] for row in table["data"]] == [f"{name}-run"]
        anonymous = Client(base, verbose=False)
        assert "not signed in" in anonymous.predict(api_name="/whoami")
        assert anonymous.predict(None, [], api_name="/list_runs")[0]["data"] == []
        forged = Client(base, headers={"Cookie": f"session={_oauth_cookie('not-the-secret', 'carol')}"}, verbose=False)
        assert "not signed in" in forged.predict(api_name="/whoami")
    finally:
        stop_process(proc)
    assert "Expected 1 arguments" not in log_path.read_text()  # gr.Request reached every handler

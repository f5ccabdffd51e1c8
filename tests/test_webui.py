"""The web app's handlers and helpers, without a browser.

The tabs' handlers are thin (widgets -> one engine call); what they add is turning engine
results into what the page shows, and these tests check that on real data: the sample
datasets, a tiny model's tokenizer, run directories written the way the trainer writes them.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "datasets"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --------------------------------------------------------------------------- app and CLI


def _ui_args(argv):
    from webui import app

    parser = argparse.ArgumentParser()
    app.add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_cli_options_parse():
    args = _ui_args(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "7999",
            "--auth",
            "ada:secret1",
            "--runs-dir",
            "/tmp/r",
            "--share",
            "--extra-model",
            "/models/tiny",
        ]
    )
    assert (args.host, args.port, args.auth, args.runs_dir, args.share) == (
        "0.0.0.0",
        7999,
        "ada:secret1",
        "/tmp/r",
        True,
    )
    assert args.extra_model == ["/models/tiny"]


def test_auth_parsing_accepts_pairs_and_rejects_malformed():
    from webui.app import parse_auth

    assert parse_auth(None) is None
    assert parse_auth("ada:pw1, bob:pw:2") == [("ada", "pw1"), ("bob", "pw:2")]
    for bad in ("ada", "ada:", ":pw"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)


def test_bad_auth_and_port_from_environment_exit_with_a_message(monkeypatch, capsys):
    from webui import app

    monkeypatch.setenv("TUNELAB_AUTH", "nopassword")
    assert app.run_cli(_ui_args([])) == 2
    assert "user:password" in capsys.readouterr().err
    monkeypatch.delenv("TUNELAB_AUTH")
    monkeypatch.setenv("TUNELAB_PORT", "eighty")
    assert app.run_cli(_ui_args([])) == 2
    assert "TUNELAB_PORT" in capsys.readouterr().err


def test_context_reads_extra_models_and_samples(monkeypatch, tmp_path):
    from webui.common import AppContext

    monkeypatch.setenv("TUNELAB_EXTRA_MODELS", f"/a/tiny{':'}/b/other")
    ctx = AppContext(runs_dir=tmp_path / "runs", extra_models=["/c/given"])
    assert ctx.model_choices() == ["smollm2-135m-instruct", "/c/given", "/a/tiny", "/b/other"]
    assert ctx.runs_dir.is_absolute()
    samples = ctx.sample_datasets()
    assert "pip_chat.jsonl" in samples and not any(s.endswith(".py") for s in samples)


def test_multi_user_mode_gives_each_user_a_runs_directory(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from webui.common import AppContext

    monkeypatch.setenv("TUNELAB_MULTI_USER", "1")
    ctx = AppContext(runs_dir=tmp_path)
    ada, bob = (ctx.runs_for(SimpleNamespace(username=name)) for name in ("ada", "bob"))
    assert ada != bob and ada.parent == bob.parent == tmp_path / "users" and ada.is_dir()
    assert ctx.runs_for(SimpleNamespace(username="ada")) == ada
    monkeypatch.delenv("TUNELAB_MULTI_USER")
    assert AppContext(runs_dir=tmp_path).runs_for(SimpleNamespace(username="ada")) == tmp_path


@pytest.mark.parametrize("demo", ["", "1"])
def test_the_whole_app_builds_with_six_tabs(tmp_path, monkeypatch, demo):
    import gradio as gr

    monkeypatch.setenv("TUNELAB_DEMO", demo)

    from webui.app import build_app
    from webui.common import AppContext

    app = build_app(AppContext(runs_dir=tmp_path / "runs"))
    tabs = [b for b in app.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.id for t in tabs] == ["data", "train", "playground", "export", "runs", "evaluate"]
    methods = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "train-method")
    assert [v for _, v in methods.choices] == (["lora", "dora"] if demo else ["lora", "qlora", "dora", "full"])
    assert (tmp_path / "runs").is_dir()


@pytest.mark.parametrize(
    "module", ["data_tab", "train_tab", "playground_tab", "export_tab", "runs_tab", "evaluate_tab"]
)
def test_each_tab_builds_alone(module, tmp_path):
    import importlib

    import gradio as gr

    from webui.common import AppContext

    demo = importlib.import_module(f"webui.{module}").create(AppContext(runs_dir=tmp_path))
    assert isinstance(demo, gr.Blocks)


def test_engine_errors_become_page_messages_with_the_engine_sentence():
    import gradio as gr

    from engine.config import ConfigError
    from webui.common import engine_errors

    @engine_errors
    def handler():
        raise ConfigError("training.batch_size", "must be > 0, got 0")

    @engine_errors
    def streaming():
        yield 1
        raise RuntimeError("")

    with pytest.raises(gr.Error) as caught:
        handler()
    assert caught.value.message == "training.batch_size: must be > 0, got 0"
    assert caught.value.title == "ConfigError"
    gen = streaming()
    assert next(gen) == 1
    with pytest.raises(gr.Error) as caught:
        next(gen)
    assert caught.value.message == "RuntimeError (no message)"


def test_stream_progress_yields_lines_then_the_result_and_reraises():
    from webui.common import stream_progress

    def work(n, progress):
        for i in range(n):
            progress(f"step {i}")
        return "result"

    assert list(stream_progress(work, 2)) == [("line", "step 0"), ("line", "step 1"), ("done", "result")]

    def broken(progress):
        progress("starting")
        raise ValueError("bad precision")

    gen = stream_progress(broken)
    assert next(gen) == ("line", "starting")
    with pytest.raises(ValueError, match="bad precision"):
        next(gen)


def test_engine_work_runs_on_the_serving_main_thread_and_survives_a_leaving_consumer():
    """`tunelab ui` serves MainThreadRunner on the main thread (PyTorch on the CPU runs ~2x
    slower from other threads): handlers' generators and progress jobs run there, and a
    consumer that stops early must not leave the main thread blocked."""
    import threading

    from webui.common import MAIN_THREAD, iterate_in_thread, stream_progress

    main = threading.main_thread()
    assert threading.current_thread() is main  # pytest runs tests on the main thread
    where: dict[str, object] = {}

    def counting():
        where["generator"] = threading.current_thread()
        yield from range(1000)  # more than the hand-over queue holds

    def job(progress):
        where["job"] = threading.current_thread()
        progress("working")
        return 7

    def handlers():
        try:
            stream = iterate_in_thread(counting)
            assert [next(stream) for _ in range(3)] == [0, 1, 2]
            stream.close()  # the consumer leaves with the generator still running
            where["progress"] = list(stream_progress(job))
            where["after"] = list(iterate_in_thread(lambda: iter([1, 2])))
        finally:
            MAIN_THREAD.stop()

    MAIN_THREAD.open()
    thread = threading.Thread(target=handlers)
    thread.start()
    MAIN_THREAD.serve(until=lambda: not thread.is_alive())  # returns when handlers() is done
    thread.join(5)
    assert where["generator"] is main and where["job"] is main
    assert where["progress"] == [("line", "working"), ("done", 7)] and where["after"] == [1, 2]
    assert not MAIN_THREAD.serving
    # nobody serving: the work runs in a thread of its own
    assert list(iterate_in_thread(lambda: iter("ab"))) == ["a", "b"]
    assert where["generator"] is main  # unchanged: that generator was not run again


# --------------------------------------------------------------------------- data tab


def test_inspect_sample_shows_format_split_stats_and_histogram(tokenizer):
    from webui import data_tab

    ins = data_tab.inspect_dataset(SAMPLES / "pip_chat.jsonl", "auto", "skip", 0.1, 1024, tokenizer)
    assert not ins.stopped and ins.format == "openai" and ins.records
    summary = data_tab.summary_markdown(ins)
    assert "openai" in summary and "(detected)" in summary
    assert f"{ins.split['train']} train / {ins.split['validation']} validation" in summary
    assert ins.split["train"] + ins.split["validation"] == len(ins.records)
    stats = data_tab.stats_markdown(ins.report["tokens"])
    assert "Tokens per record" in stats and "a ChatML template (tokenizer)" in stats
    frame = data_tab.histogram_frame(ins.report["tokens"])
    assert frame["records"].sum() == len(ins.records)
    assert frame["tokens"].iloc[0].startswith("0-")
    choice = data_tab.dataset_choice(ins, "skip", 0.1, 1024)
    assert choice.config.format == "openai" and choice.records == len(ins.records) and choice.mean_tokens > 0


def test_data_tab_shows_what_the_model_learns(tokenizer):
    """The Data tab's training view: the answer and its end-of-turn token highlighted as
    trained, the system and user text not, and what lies past the cutoff marked cut off."""
    from webui import data_tab

    record = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, I am Pip."}]
    pieces, info = data_tab.learned_view(record, tokenizer, 1024)
    assert "".join(p for p, _ in pieces) == tokenizer.apply_chat_template(record, tokenize=False)
    assert "".join(p for p, label in pieces if label == "trained") == "Hello, I am Pip.<|im_end|>"
    assert "cut off" not in {label for _, label in pieces} and "trained" in info and "cut at" not in info
    short, info = data_tab.learned_view(record, tokenizer, 20)
    assert [label for _, label in short[20:]] == ["cut off"] * (len(short) - 20)
    assert "cut at 20 tokens" in info and "trained tokens lost" in info


def test_broken_file_lists_problems_by_line_and_stop_refuses_it(tokenizer):
    from webui import data_tab

    skipped = data_tab.inspect_dataset(SAMPLES / "broken_example.jsonl", "auto", "skip", 0.1, 1024, tokenizer)
    rows = data_tab.problem_rows(skipped.problems)
    assert rows and all(r[0] == "broken_example.jsonl" for r in rows)
    assert ["line 2" == r[1] for r in rows].count(True) == 1  # the unclosed JSON line
    assert any(r[1] == "line 3" and "role" in r[2] for r in rows)  # role 'bot'
    assert data_tab.dataset_choice(skipped, "skip", 0.1, 1024) is not None

    stopped = data_tab.inspect_dataset(SAMPLES / "broken_example.jsonl", "auto", "stop", 0.1, 1024, tokenizer)
    assert stopped.stopped and not stopped.records
    assert [r[1] for r in data_tab.problem_rows(stopped.problems)] == [r[1] for r in rows]
    assert data_tab.summary_markdown(stopped).startswith("### Stopped: broken_example.jsonl")
    assert data_tab.dataset_choice(stopped, "stop", 0.1, 1024) is None


def test_qa_csv_rows_and_format_override(tokenizer):
    from webui import data_tab

    ins = data_tab.inspect_dataset(SAMPLES / "orbit_kettle_qa.csv", "auto", "skip", 0.2, 256, tokenizer)
    assert ins.format == "qa" and len(ins.records) > 5
    assert ins.records[0][-1]["role"] == "assistant"
    forced = data_tab.inspect_dataset(SAMPLES / "orbit_kettle_qa.csv", "openai", "skip", 0.2, 256, tokenizer)
    assert forced.stopped  # no row has 'messages'
    assert "(as given)" not in data_tab.summary_markdown(forced)


def test_upload_is_copied_out_of_the_temporary_cache_once(tmp_path, monkeypatch):
    from engine import security
    from engine.uploads import stable_copy

    src = tmp_path / "tmp" / "my data.jsonl"
    src.parent.mkdir()
    src.write_text('{"messages": []}\n')
    first = stable_copy(src, tmp_path / ".uploads")
    again = stable_copy(src, tmp_path / ".uploads")
    assert first == again and first.read_text() == src.read_text()
    assert first.name == "my_data.jsonl" and first.parent.parent == tmp_path / ".uploads"
    src.write_text('{"messages": [1]}\n')
    assert stable_copy(src, tmp_path / ".uploads") != first
    monkeypatch.setattr(security, "MAX_UPLOAD_BYTES", 4)
    with pytest.raises(security.UnsafeInputError, match="limited to"):
        stable_copy(src, tmp_path / ".uploads")


def test_preview_pages_escape_html_and_clamp():
    from webui.chat_html import render_page
    from webui.data_tab import PER_PAGE, clamp_page, page_label

    records = [
        [{"role": "user", "content": f"<b>q{i}</b>"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(PER_PAGE * 2 + 1)
    ]
    html = render_page(records, 3, PER_PAGE)
    assert f"Record {PER_PAGE * 2 + 1} of {len(records)}" in html and "&lt;b&gt;" in html and "<b>" not in html
    assert clamp_page(99, len(records)) == 3 and clamp_page(0, len(records)) == 1 and clamp_page(None, 0) == 1
    assert page_label(2, len(records)) == f"Page 2 of 3 ({len(records)} records)"


# --------------------------------------------------------------------------- train tab


def _dataset_choice(path: Path):
    from engine.config import DataConfig
    from webui.links import DataChoice

    config = DataConfig(path=str(path), format="openai", on_error="skip", validation_split=0.2, max_length=256)
    return DataChoice(config=config, name=path.name, records=10, train=8, val=2, mean_tokens=40)


def test_form_builds_a_validated_run_config(tmp_path):
    from engine.config import ConfigError
    from webui.train_tab import FormValues, build_config

    form = FormValues(
        model="/models/tiny",
        method="dora",
        max_steps=5,
        learning_rate=None,
        batch_size=2,
        target_modules="q_proj, v_proj",
        deepspeed="zero2",
        num_processes=2,
        run_name="my-run",
    )
    cfg = build_config(form, _dataset_choice(SAMPLES / "pip_chat.jsonl"), tmp_path)
    assert cfg.method.name == "dora" and cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.max_steps == 5 and cfg.learning_rate == 2e-4  # empty -> method default
    assert cfg.data.validation_split == 0.2 and cfg.data.max_length == 256
    assert cfg.distributed.deepspeed == "zero2" and cfg.output.run_id == "my-run"
    with pytest.raises(ConfigError, match="data.path"):
        build_config(form, None, tmp_path)
    with pytest.raises(ConfigError, match="training.batch_size"):
        build_config(FormValues(batch_size=0), _dataset_choice(SAMPLES / "pip_chat.jsonl"), tmp_path)


def test_placeholders_are_filled_on_the_page_and_start_asks_when_they_are_not(shared_datasets, tokenizer, tmp_path):
    """identity.json holds {{name}} and {{author}}: the Data tab says how to fill them (its
    own field, not only the CLI's flag), the fill and the record limit reach the run's
    config, and Start asks before training on placeholders nothing fills."""
    from webui import data_tab
    from webui.train_tab import FormValues, build_config, unfilled_question

    path = shared_datasets / "identity.json"
    ins = data_tab.inspect_dataset(path, "auto", "skip", 0.1, 1024, tokenizer)
    choice = data_tab.dataset_choice(ins, "skip", 0.1, 1024)
    assert choice.placeholders == ["author", "name"]
    assert "Fill placeholders" in data_tab.summary_markdown(ins) and "name=..." in data_tab.summary_markdown(ins)
    question = unfilled_question(choice)
    assert "{{author}}, {{name}}" in question and "press Start again" in question
    persona = data_tab.parse_persona("name=Pip,\nauthor = tunelab")
    assert persona == {"name": "Pip", "author": "tunelab"}
    filled = data_tab.inspect_dataset(path, "auto", "skip", 0.1, 1024, tokenizer, persona=persona, max_records=10)
    choice = data_tab.dataset_choice(filled, "skip", 0.1, 1024, persona, 10)
    assert len(filled.records) == 10 and choice.placeholders == [] and unfilled_question(choice) is None
    assert "Pip" in filled.records[0][-1]["content"] and "{{" not in str(filled.records)
    cfg = build_config(FormValues(max_steps=1), choice, tmp_path)
    assert cfg.data.persona == persona and cfg.data.max_records == 10
    import gradio as gr

    with pytest.raises(gr.Error, match="'Pip' is not of the form name=value"):
        data_tab.parse_persona("name=Ada, Pip")


def test_the_model_list_offers_hub_models_with_sizes_and_needs():
    """The Train tab lists the catalog next to the embedded model, each with its size from its
    shipped config and, offline, that it needs a network; gated ones say so; estimates for
    one of them come without a download."""
    from engine.models import CATALOG
    from webui.train_tab import catalog_choices, comparison_markdown, recommendation_for

    choices = dict((value, label) for label, value in catalog_choices())
    assert set(choices) == {m.hub_id for m in CATALOG}
    assert choices["Qwen/Qwen2.5-0.5B-Instruct"].startswith("Qwen2.5 0.5B Instruct (494M")
    assert "1.24B" in choices["meta-llama/Llama-3.2-1B-Instruct"] and "gated" in choices["google/gemma-3-1b-it"]
    assert all("needs a network" in label for label in choices.values())  # the suite runs offline
    rec = recommendation_for("Qwen/Qwen3-1.7B", None, None)
    table = comparison_markdown(rec, "Qwen/Qwen3-1.7B", None)
    for method in ("lora", "qlora", "dora", "full"):
        assert f"| {method}" in table


def test_recommendation_panel_compares_the_four_methods(tiny_model_dir):
    from webui.train_tab import comparison_markdown, reasons_markdown, recommendation_for

    choice = _dataset_choice(SAMPLES / "pip_chat.jsonl")
    rec = recommendation_for(str(tiny_model_dir), None, choice)
    table = comparison_markdown(rec, str(tiny_model_dir), choice)
    for method in ("lora", "qlora", "dora", "full"):
        assert f"| {method}" in table
    assert "8 training examples" in table
    reasons = reasons_markdown(rec)
    assert "**precision:" in reasons and rec.reasons["precision"][:30] in reasons
    overrides = dict(o.split("=", 1) for o in rec.config_overrides())
    assert overrides["method.name"] == rec.method


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_watch_reads_only_new_metric_lines(tmp_path):
    from engine import runs
    from engine.config import RunConfig
    from webui.train_tab import Watch, loss_frame

    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl")}})
    run_dir = runs.create_run(cfg, tmp_path)
    watch = Watch.attach(run_dir)
    assert watch.read() is False and watch.points == [] and loss_frame(watch.points) is None
    _write_metrics(run_dir, [{"step": 1, "loss": 3.0, "eta_s": 20}, {"step": 2, "loss": 2.5, "eta_s": 10}])
    assert watch.read() is True
    assert [p["loss"] for p in watch.points] == [3.0, 2.5]
    assert watch.read() is False  # nothing new: the chart is not redrawn
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 2.0, "eval_lo')  # a line still being written
    assert watch.read() is False
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('ss": 2.2}\n')
    assert watch.read() is True
    frame = loss_frame(watch.points)
    assert list(frame[frame.series == "eval"].loss.dropna()) == [2.2] and len(frame[frame.series == "train"]) == 3
    assert watch.last["step"] == 3


def test_progress_bar_shows_steps_eta_and_completion():
    from webui.train_tab import progress_html

    running = progress_html({"state": "running", "max_steps": 20}, {"step": 5, "eta_s": 75, "loss": 1.23}, "/r/run-1")
    assert 'data-percent="25"' in running and "step 5 / 20 (25%)" in running and "ETA 1 min 15 s" in running
    done = progress_html({"state": "completed", "max_steps": 20, "step": 20}, {"step": 19}, "/r/run-1")
    assert 'data-percent="100"' in done and "ETA" not in done
    queued = progress_html({"state": "queued"}, {}, "/r/run-2")
    assert 'data-state="queued"' in queued and "waiting for the running job" in queued


def test_failure_panel_names_the_class_and_what_to_do():
    from webui.train_tab import failure_markdown

    assert failure_markdown({"state": "running"}) == ""
    oom = failure_markdown(
        {"state": "failed", "error_class": "out of memory", "error": "CUDA out of memory", "exit_code": 3}
    )
    assert "Training failed: out of memory" in oom and "CUDA out of memory" in oom and "Lower the batch size" in oom
    assert "Exit code 3" in oom
    other = failure_markdown({"state": "failed", "error_class": "error", "log_tail": "line\nValueError: boom"})
    assert "ValueError: boom" in other and "log tail" in other
    stopped = failure_markdown({"state": "aborted"})
    assert "Training stopped" in stopped and "Resume" in stopped


def test_active_run_is_found_for_reattaching(tmp_path):
    import os
    import time

    from engine import runs
    from engine.config import RunConfig
    from webui.train_tab import find_active_run

    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl")}})
    done = runs.create_run(cfg, tmp_path)
    runs.update_status(done, state="completed")
    assert find_active_run(tmp_path) is None
    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl")}})
    live = runs.create_run(cfg, tmp_path)
    # This test process stands in for the trainer: alive, so the run is not a ghost.
    runs.update_status(
        live, state="running", pid=os.getpid(), pid_started=runs.process_identity(os.getpid()), started_at=time.time()
    )
    assert Path(find_active_run(tmp_path)) == live
    assert find_active_run(tmp_path / "missing") is None


# --------------------------------------------------------------------------- playground


def test_columns_say_what_is_missing(tmp_path):
    from webui.playground_tab import backend_availability

    assert backend_availability(None, "base") == (True, "")
    ok, why = backend_availability(None, "tuned")
    assert not ok and "Train" in why
    run = tmp_path / "run-1"
    run.mkdir()
    ok, why = backend_availability(str(run), "tuned")
    assert not ok and "no trained weights" in why
    (run / "adapter").mkdir()
    assert backend_availability(str(run), "tuned") == (True, "")
    ok, why = backend_availability(str(run), "onnx", "int8")
    assert not ok and "ONNX int8" in why
    (run / "export" / "onnx-int8").mkdir(parents=True)
    assert backend_availability(str(run), "onnx", "int8") == (True, "")


def test_showing_the_playground_or_export_derives_the_run_state_again(tmp_path):
    """A run that finished or was exported since the tab last showed it: showing the tab (its
    own select, Train's 'Chat with it' / 'Export it', Runs' open) must run the tab's ``show``
    after refreshing the picker, whose change event does not fire when the same run stays picked."""
    import gradio as gr

    from webui.app import build_app
    from webui.common import AppContext

    app = build_app(AppContext(runs_dir=tmp_path / "runs"))
    fns = list(app.fns.values())

    def chained(trigger) -> set[str]:
        """Names of the functions an event runs, with every .then/.success after them."""
        todo = [fn for fn in fns if (trigger._id, trigger_event[trigger._id]) in fn.targets]
        names = set()
        while todo:
            fn = todo.pop()
            names.add(fn.name)
            todo += [after for after in fns if after.trigger_after == fn._id]
        return names

    tabs = {b.id: b for b in app.blocks.values() if isinstance(b, gr.Tab)}
    buttons = {b.elem_id: b for b in app.blocks.values() if isinstance(b, gr.Button) and b.elem_id}
    trigger_event = {tabs["playground"]._id: "select", tabs["export"]._id: "select"}
    trigger_event |= {buttons[i]._id: "click" for i in ("train-open-playground", "train-open-export", "runs-open")}
    assert "show_availability" in chained(tabs["playground"])
    assert "show" in chained(tabs["export"])
    assert "show_availability" in chained(buttons["train-open-playground"])
    assert "show" in chained(buttons["train-open-export"])
    assert "show_availability" in chained(buttons["runs-open"])


def test_a_column_streams_its_reply_through_the_scheduler(tiny_model_dir, tmp_path_factory, tmp_path):
    """The playground's handler: a notice while the engine's PyTorch thread is busy, another
    while the model loads, the reply, then its statistics; Stop ends it early."""
    import threading
    from types import SimpleNamespace

    from tiny_runs import CHATS, chat_base, make_adapter_run

    from engine import inference, scheduler
    from webui import playground_tab
    from webui.common import AppContext
    from webui.playground_tab import Column

    run_dir = make_adapter_run(tmp_path / "runs", chat_base(tiny_model_dir, tmp_path_factory.getbasetemp()))
    demo = playground_tab.create(AppContext(runs_dir=tmp_path / "runs"))
    answer = next(fn.fn for fn in demo.fns.values() if fn.api_name == "answer")  # the base column
    request = SimpleNamespace(username=None, session_hash="page")
    inference.unload_all()

    def hold():
        """Keep the engine's PyTorch thread busy until the returned event is set."""
        release = threading.Event()

        def busy():
            release.wait()
            yield "released"

        return scheduler.default().stream(scheduler.TORCH, busy), release

    held, release = hold()
    column = Column("base")
    updates = answer(CHATS[0][0], column, run_dir.name, "", 40, 0.0, 1.0, 1.0, "int4", request)
    waiting = scheduler.WAITING_FOR_CPU if scheduler.default().share_cpu else "waiting for 1 other reply"
    history, stats, _ = next(updates)
    assert history[-1] == {"role": "assistant", "content": f"({waiting})"} and stats == ""
    release.set()
    assert list(held) == ["released"]
    history, stats, _ = next(updates)
    assert history[-1]["content"] == "(loading the Base model...)"
    *_, (history, stats, _) = updates
    assert history == [{"role": "user", "content": CHATS[0][0]}, {"role": "assistant", "content": CHATS[0][1]}]
    assert column.history == history and "tokens/s" in stats and "stopped" not in stats

    held, release = hold()
    updates = answer(CHATS[1][0], column, run_dir.name, "", 40, 0.0, 1.0, 1.0, "int4", request)
    assert next(updates)[0][-1]["content"] == f"({waiting})"
    column.request_stop()  # the Stop button while the column waits: it ends now
    *_, (history, stats, _) = updates
    assert history[-2:] == [{"role": "user", "content": CHATS[1][0]}, {"role": "assistant", "content": "(stopped)"}]
    assert stats == "" and column.history == history
    release.set()
    assert list(held) == ["released"]


def test_validation_example_comes_from_the_held_out_split(tmp_path):
    import random

    from engine import data, runs
    from engine.config import RunConfig
    from webui.playground_tab import validation_example

    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl"), "validation_split": 0.2}})
    run_dir = runs.create_run(cfg, tmp_path)
    _, _, val = data.load_for_training(cfg.data)
    system, prompt, reference = validation_example(str(run_dir), random.Random(0))
    assert any(m["content"] == reference for conv in val for m in conv if m["role"] == "assistant")
    assert any(m["content"] == prompt for conv in val for m in conv if m["role"] == "user")


def test_stats_line_shows_time_to_first_token_and_speed():
    from engine.inference import GenerationStats
    from webui.playground_tab import stats_line

    stats = GenerationStats(
        backend="onnx",
        prompt_tokens=10,
        new_tokens=32,
        ttft_s=0.123,
        decode_tokens_per_s=87.5,
        total_s=0.5,
        finish_reason="length",
    )
    line = stats_line(stats, "onnx")
    assert "first token 0.12 s" in line and "87.5 tokens/s" in line and "32 tokens" in line
    assert "hit max new tokens" in line and "speculative" not in line
    fast = GenerationStats(
        backend="tuned",
        prompt_tokens=10,
        new_tokens=5,
        ttft_s=0.1,
        decode_tokens_per_s=48.0,
        total_s=0.2,
        finish_reason="eos",
        decoder="speculative (4-bit draft, float32 check)",
    )
    assert "speculative decoding" in stats_line(fast, "tuned")
    assert stats_line(None, "base") == ""


# --------------------------------------------------------------------------- export and runs


def test_downloads_zip_the_run_artefacts(tmp_path):
    from webui.export_tab import artefacts, download_targets, zip_dir

    run = tmp_path / "run-1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    assert list(artefacts(run)) == ["adapter"]
    with pytest.raises(FileNotFoundError, match="ONNX"):
        download_targets(run, "onnx")
    (targets,) = download_targets(run, "adapter")
    archive = zip_dir(targets, run / "export" / "downloads", run.name)
    assert archive.name == "run-1-adapter.zip"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["adapter/", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    mtime = archive.stat().st_mtime_ns
    assert zip_dir(targets, run / "export" / "downloads", run.name).stat().st_mtime_ns == mtime  # reused


def test_export_table_gives_verdicts_in_the_visitors_language(tmp_path):
    """The engine's verdict (parity.json) as the page shows it: English words in English,
    the locale's words in Kiswahili; variant names stay."""
    from webui.export_tab import artefact_markdown, download_targets
    from webui.i18n import tr

    run = tmp_path / "run-1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    for variant in ("int8", "fp32"):
        (run / "export" / f"onnx-{variant}").mkdir(parents=True)
        (run / "export" / f"onnx-{variant}" / "genai_config.json").write_text("{}")
    (run / "export" / "parity.json").write_text(json.dumps({"onnx": {"int8": {"verdict": {"verdict": "degraded"}}}}))
    english, swahili = artefact_markdown(run), artefact_markdown(run, "sw")
    assert "| onnx-int8 |" in english and "| degraded |" in english and "| not measured yet |" in english
    assert f"| {tr('sw', 'export.verdict.degraded')} |" in swahili and "| onnx-int8 |" in swahili
    assert f"| {tr('sw', 'export.not_measured')} |" in swahili and "degraded" not in swahili
    with pytest.raises(FileNotFoundError, match="onnx|ONNX") as err:
        download_targets(tmp_path / "empty", "onnx", "sw")
    assert str(err.value) == tr("sw", "export.none_onnx", run="empty")


def test_runs_table_and_loss_curves(tmp_path):
    import time

    from engine import runs
    from engine.config import RunConfig
    from webui.runs_tab import loss_curves, run_details, run_table

    cfg = RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl")}, "method": {"name": "dora"}})
    run_dir = runs.create_run(cfg, tmp_path)
    now = time.time()
    runs.update_status(run_dir, state="completed", started_at=now - 65, ended_at=now, step=4, max_steps=4)
    _write_metrics(run_dir, [{"step": s, "loss": 3.0 - s * 0.5} for s in range(1, 5)] + [{"step": 4, "eval_loss": 1.7}])
    (run_dir / "eval.json").write_text(json.dumps({"base": {"loss": 2.9}, "tuned": {"loss": 1.7}}))
    rows, ids = run_table(tmp_path)
    assert ids == [run_dir.name]
    row = dict(
        zip(["run", "status", "method", "model", "data", "steps", "train", "eval", "duration", "created"], rows[0])
    )
    assert row["status"] == "completed" and row["method"] == "dora" and row["data"] == "pip_chat.jsonl"
    assert row["steps"] == "4/4" and row["train"] == "1" and row["eval"] == "1.7 (base 2.9)"
    assert row["duration"] == "1 min 05 s"
    frame = loss_curves(tmp_path, ids, "train")
    assert list(frame.loss) == [2.5, 2.0, 1.5, 1.0] and set(frame.run) == {run_dir.name}
    assert list(loss_curves(tmp_path, ids, "eval").loss) == [1.7]
    details = run_details(tmp_path, run_dir.name)
    assert "base loss 2.9" in details and "tuned loss 1.7" in details
    # In Kiswahili: the state word and the details' headings, the figures unchanged.
    from webui.i18n import tr

    sw_rows, _ = run_table(tmp_path, "sw")
    assert sw_rows[0][1] == tr("sw", "runs.state.completed") != "completed"
    assert sw_rows[0][7] == "1.7 " + tr("sw", "runs.base_loss", loss="2.9")
    sw_details = run_details(tmp_path, run_dir.name, "sw")
    assert sw_details.startswith(f"### {run_dir.name} - {tr('sw', 'runs.state.completed')}")
    assert tr("sw", "runs.validation", figures="") in sw_details and "base loss 2.9" in sw_details


def test_the_preview_keeps_a_bounded_number_of_records_and_says_so():
    from engine import security
    from webui.data_tab import page_label

    assert page_label(1, 10) == "Page 1 of 3 (10 records)"
    n = security.PREVIEW_MAX_RECORDS
    label = page_label(1, n, n + 7)
    assert f"the first {n} of {n + 7} records" in label and "training uses all" in label


def test_a_capped_preview_says_so_on_every_page_and_in_the_training_text_view(monkeypatch, tmp_path):
    """The session keeps a Preview (the first PREVIEW_MAX_RECORDS records and the total), and
    the Data tab's paging and training-text handlers read it, so every page says it is capped."""
    from types import SimpleNamespace

    import gradio as gr

    from engine import security
    from webui import data_tab
    from webui.common import AppContext

    monkeypatch.setattr(security, "PREVIEW_MAX_RECORDS", 6)
    records = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(20)]
    kept = data_tab.Preview.of(records)
    assert len(kept.records) == 6 and kept.total == 20
    fns = {fn.api_name: fn.fn for fn in data_tab.create(AppContext(runs_dir=tmp_path)).fns.values() if fn.api_name}
    page, label, html = fns["show_page"](kept, 2)
    assert page == 2 and label == "Page 2 of 2 (the first 6 of 20 records; training uses all)"
    assert "q4" in html and "q6" not in html
    assert fns["show_page"](kept, 9)[0] == 2  # past the kept records: their last page
    with pytest.raises(gr.Error, match="the preview holds the first 6 of 20 usable records"):
        fns["show_learned"](kept, 7, "", 256, SimpleNamespace(username=None))


def test_a_reload_while_a_run_trains_shows_that_runs_form_dataset_and_estimates(tmp_path):
    """Reloading the page mid-training: the Train tab shows the run it reattached to with its
    own config (method, rank, batch, epochs), its dataset and the estimates for that dataset,
    not the defaults and a 1000-example guess."""
    import os
    import time

    from engine import runs
    from engine.config import RunConfig
    from webui.app import build_app
    from webui.common import AppContext
    from webui.links import DataChoice

    runs_dir = tmp_path / "runs"
    app = build_app(AppContext(runs_dir=runs_dir))
    (load,) = [
        fn
        for fn in app.fns.values()
        if fn.name == "on_load" and any(getattr(o, "elem_id", None) == "train-progress-box" for o in fn.outputs)
    ]
    fresh = {getattr(k, "elem_id", None): v for k, v in load.fn(None).items()}
    assert "no dataset chosen yet" in fresh["train-comparison"]

    cfg = RunConfig.from_dict(
        {
            "data": {"path": str(SAMPLES / "pip_chat.jsonl"), "max_length": 128, "validation_split": 0.1},
            "method": {"name": "dora", "r": 8},
            "training": {"batch_size": 4, "num_epochs": 2.5},
        }
    )
    live = runs.create_run(cfg, runs_dir)
    runs.update_status(  # this test process stands in for the trainer
        live, state="running", pid=os.getpid(), pid_started=runs.process_identity(os.getpid()), started_at=time.time()
    )
    out = load.fn(None)
    shown = {getattr(k, "elem_id", None): v for k, v in out.items()}
    assert shown["train-method"] == "dora" and shown["train-r"] == 8
    assert shown["train-batch-size"] == 4 and shown["train-num-epochs"] == 2.5
    (choice,) = [v for v in out.values() if isinstance(v, DataChoice)]
    assert choice.name == "pip_chat.jsonl" and choice.config.max_length == 128
    assert choice.train + choice.val == choice.records > 100
    assert f"{choice.train} training examples" in shown["train-comparison"]
    assert "--config" in shown["train-command"]


# --------------------------------------------------------------------------- preference stages


def test_data_tab_says_which_stages_and_the_train_tab_checks_the_stage(tokenizer, tmp_path):
    from engine.config import ConfigError
    from webui import data_tab
    from webui.train_tab import FormValues, build_config

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) + "\n" for i in range(5))
    )
    ins = data_tab.inspect_dataset(pairs, "auto", "skip", 0.2, 256, tokenizer)
    assert "Trains stage: **dpo, kto, orpo**" in data_tab.summary_markdown(ins)
    choice = data_tab.dataset_choice(ins, "skip", 0.2, 256)
    assert choice.stages == ("dpo", "kto", "orpo")
    cfg = build_config(FormValues(stage="dpo", loss_type="ipo"), choice, tmp_path)
    assert cfg.training.stage == "dpo" and cfg.loss_type == "ipo" and cfg.data.path == str(pairs)
    with pytest.raises(ConfigError, match="training.stage: pairs.jsonl trains stage dpo or kto or orpo, not sft"):
        build_config(FormValues(), choice, tmp_path)
    chat = data_tab.inspect_dataset(SAMPLES / "pip_chat.jsonl", "auto", "skip", 0.1, 1024, tokenizer)
    assert "Trains stage: **sft**" in data_tab.summary_markdown(chat)
    with pytest.raises(ConfigError, match="trains stage sft, not kto"):
        build_config(FormValues(stage="kto"), data_tab.dataset_choice(chat, "skip", 0.1, 1024), tmp_path)


def test_watch_draws_the_rewards_of_preference_runs(tmp_path):
    from engine import runs
    from engine.config import RunConfig
    from webui.train_tab import Watch, progress_html, reward_frame

    run_dir = runs.create_run(RunConfig.from_dict({"data": {"path": str(SAMPLES / "pip_chat.jsonl")}}), tmp_path)
    watch = Watch.attach(run_dir)
    _write_metrics(
        run_dir,
        [
            {"step": 1, "loss": 0.69, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "rewards_margins": 0.0},
            {"step": 2, "loss": 0.5, "rewards_margins": 0.4, "rewards_accuracies": 1.0, "eval_rewards_margins": 0.3},
        ],
    )
    assert watch.read() is True and len(watch.points) == 2
    frame = reward_frame(watch.reward_points)
    assert list(frame[frame.series == "margin"].value.dropna()) == [0.0, 0.4]
    assert list(frame[frame.series == "eval margin"].value.dropna()) == [0.3]
    assert "reward margin 0.4" in progress_html({"state": "running"}, watch.last, str(run_dir))
    assert reward_frame([]) is None  # an SFT run draws no reward chart

"""engine.evaluate: metrics on strings with known scores, the run's own split, an
end-to-end evaluation of a tiny run over base, tuned and ONNX, batched greedy == one at a
time, and a queued job that is stopped and found again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_runs import CHATS, chat_base, serving, shared_adapter_run

from engine import config, evalfiles, evaluate, export, runs, serve
from engine.evaluate import EvalError, EvalSpec
from engine.scheduler import Scheduler

# sacrebleu's README example: three hypotheses, two reference streams.
SACREBLEU_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
SACREBLEU_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]


def test_bleu_and_chrf_match_sacrebleus_documented_scores():
    assert evaluate.corpus_bleu(SACREBLEU_SYS, *SACREBLEU_REFS) == pytest.approx(48.53, abs=0.01)
    assert evaluate.corpus_chrf(SACREBLEU_SYS, *SACREBLEU_REFS) == pytest.approx(59.73, abs=0.01)


def test_squad_exact_match_token_f1_and_rouge_l():
    assert evaluate.exact_match("The Cat!", "cat") == 100.0
    assert evaluate.exact_match("a dog", "cat") == 0.0
    # pred {cat, sat} against ref {cat, sat, down}: precision 1, recall 2/3 -> F1 0.8
    assert evaluate.token_f1("the cat sat", "a cat sat down") == pytest.approx(80.0)
    # longest common subsequence 5 of 6 (answer) and 5 (reference) words -> F 10/11
    assert evaluate.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(1000 / 11)


def test_checks_and_bad_checks():
    assert evaluate.parse_check("starts_with:Pip here!").passes("  Pip here! Hi.")
    assert not evaluate.parse_check("starts_with:Pip here!").passes("Hi. Pip here!")
    assert evaluate.parse_check("contains:tuning").passes("Happy tuning!")
    assert evaluate.parse_check(r"regex:^\d+$").passes("42")
    with pytest.raises(EvalError, match="KIND:VALUE"):
        evaluate.parse_check("endswith:x")
    with pytest.raises(EvalError, match="not a regular expression"):
        evaluate.parse_check("regex:(")


def test_closed_label_set_is_detected():
    assert evaluate.label_set(["yes", "No.", "yes", "no"]) == ["no", "yes"]
    assert evaluate.label_set(["yes", "no", "yes"]) is None  # "no" occurs once
    assert evaluate.label_set([f"answer {i}" for i in range(30)] * 2) is None  # more than 20 labels


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.0, 100.0, 100.0, 0.0, 100.0, 100.0, 100.0, 0.0]
    first, second = evaluate.mean_with_ci(values), evaluate.mean_with_ci(values)
    assert first == second
    low, high = first["ci95"]
    assert low < first["value"] == 62.5 < high
    assert evaluate.mean_with_ci([50.0] * 5)["ci95"] == [50.0, 50.0]


def test_backend_names():
    assert evaluate.backend_parts("onnx-int4-hqq") == ("onnx", "int4-hqq")
    assert evaluate.backend_parts("merged") == ("merged", None)
    with pytest.raises(EvalError, match="onnx-<variant>"):
        evaluate.backend_parts("onnx")


def _split_run(tmp_path: Path, base: str = "unused") -> Path:
    from engine.config import DataConfig, ModelConfig, RunConfig

    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            + "\n"
            for i in range(20)
        )
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunConfig(
        model=ModelConfig(name_or_path=base), data=DataConfig(path=str(data), validation_split=0.25, seed=7)
    ).save(run_dir / runs.CONFIG_FILE)
    return run_dir


def test_validation_split_is_the_trainers(tmp_path):
    from engine.config import RunConfig
    from engine.data import load_for_training

    run_dir = _split_run(tmp_path)
    _, train, val = load_for_training(RunConfig.load(run_dir / runs.CONFIG_FILE).data)
    runs.write_json(run_dir / runs.DATA_FILE, {"train": len(train), "validation": len(val)})
    examples, source = evaluate.load_examples(run_dir, EvalSpec(run=str(run_dir), split="validation"))
    assert [e.reference for e in examples] == [m[1]["content"] for m in val]
    assert source["seed"] == 7 and source["examples"] == 5
    runs.write_json(run_dir / runs.DATA_FILE, {"train": 14, "validation": 6})
    with pytest.raises(EvalError, match="data changed"):
        evaluate.load_examples(run_dir, EvalSpec(run=str(run_dir)))


def test_a_training_run_and_a_used_name_are_refused(tmp_path):
    run_dir = _split_run(tmp_path)
    runs.update_status(run_dir, state="running", pid=os.getpid(), pid_started=runs.process_identity(os.getpid()))
    (run_dir / "eval" / "first").mkdir(parents=True)
    with pytest.raises(EvalError, match="once training has ended"):
        evaluate.check_can_start(run_dir, "second")
    runs.update_status(run_dir, state="completed")
    with pytest.raises(EvalError, match="exists"):
        evaluate.prepare(EvalSpec(run=str(run_dir), name="first"))


# --------------------------------------------------------------------------- tiny model, end to end


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory) -> Path:
    base = chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())
    return shared_adapter_run(tmp_path_factory.getbasetemp(), base)


@pytest.fixture(scope="module")
def tiny_run(adapter_run) -> Path:
    export.export_onnx(adapter_run, "fp32")
    return adapter_run


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaldata") / "chats.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in CHATS * 2
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_end_to_end_over_base_tuned_and_onnx(tiny_run, chats_file, capsys):
    from engine import cli

    name = f"e2e-{time.time_ns()}"
    argv = ["eval", str(tiny_run), "--data", str(chats_file), "--name", name, "--foreground", "--json"]
    argv += ["--backends", "base,tuned,onnx-fp32,onnx-int8", "--check", "starts_with:Hello", "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert "skipping onnx-int8" in out.err and "onnx-int8" in summary["skipped_backends"]
    # Why, as a code the web page translates (the engine's own words stay English).
    from webui.evaluate_tab import progress_markdown
    from webui.i18n import tr

    issue = summary["skipped_codes"]["onnx-int8"]
    assert issue["code"] == "no_onnx" and issue["params"]["name"] == "onnx-int8"
    shown = {lang: progress_markdown({"name": name, "state": "completed"}, summary, lang) for lang in ("en", "sw")}
    assert f"Skipped onnx-int8: {summary['skipped_backends']['onnx-int8']}" in shown["en"]
    assert tr("sw", "evaluate.skip.no_onnx", **issue["params"]) in shown["sw"]
    assert tr("sw", "runs.state.completed") in shown["sw"] and "Skipped" not in shown["sw"]
    assert list(summary["backends"]) == ["base", "tuned", "onnx-fp32"]
    eval_dir = tiny_run / "eval" / name
    rows = evaluate.read_results(eval_dir)
    assert len(rows) == 3 * len(CHATS) * 2
    base_rows = [r for r in rows if r["backend"] == "base"]
    # the tiny base was trained on CHATS: it answers them word for word
    assert all(r["answer"] == r["reference"] for r in base_rows)
    assert summary["backends"]["base"]["metrics"]["exact_match"]["value"] == 100.0
    assert summary["backends"]["base"]["metrics"]["starts_with:Hello"]["value"] == pytest.approx(100 / 3)
    assert summary["labels"] == sorted(evaluate.normalize_answer(a) for _, a in CHATS)  # each answer twice
    for metric in ("rouge_l", "chrf", "bleu", "token_f1", "loss", "perplexity"):
        entry = summary["backends"]["tuned"]["metrics"][metric]
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1], metric
    assert "loss" not in summary["backends"]["onnx-fp32"]["metrics"]  # PyTorch backends only
    # the tuned adapter is a random perturbation: it answers worse than the base, and the
    # float32 export answers as the tuned model does
    assert (
        summary["backends"]["tuned"]["metrics"]["loss"]["value"]
        > summary["backends"]["base"]["metrics"]["loss"]["value"]
    )
    tuned = {r["example"]: r for r in rows if r["backend"] == "tuned"}
    for row in rows:
        if row["backend"] == "onnx-fp32":
            assert row["answer"] == tuned[row["example"]]["answer"]
            assert row["deltas"]["tuned"]["rouge_l"] == 0.0
    for row in tuned.values():
        base_row = next(r for r in base_rows if r["example"] == row["example"])
        assert row["deltas"]["base"]["rouge_l"] == pytest.approx(
            row["scores"]["rouge_l"] - base_row["scores"]["rouge_l"]
        )
    report = (eval_dir / "report.md").read_text()
    assert "| rouge_l |" in report and "Skipped onnx-int8" in report and CHATS[1][1] in report
    assert evalfiles.latest_summary(tiny_run)["name"] == name
    # the name is taken now
    assert cli.main(argv) == 2
    assert "exists" in capsys.readouterr().err


def _plain_greedy(model, ids: list[int], max_new: int) -> list[int]:
    """The model's plain one-at-a-time greedy loop (engine.inference.EagerDecoder)."""
    from engine.inference import GenerationSettings, TorchChatModel

    plain = TorchChatModel(
        model.model,
        model.tokenizer,
        backend=model.backend,
        label=model.label,
        source=model.source,
        chat_template=model.chat_template,
        fast_decode=False,
    )
    out = []
    for token in plain.token_stream(ids, GenerationSettings(max_new_tokens=max_new, greedy=True)):
        if token in plain.stop_ids:
            break
        out.append(token)
    return out


def _first_divergence(model, ids, one, batched) -> str:
    step = next(i for i, (a, b) in enumerate(zip(one + [-1], batched + [-1])) if a != b)
    logits = model.logits(ids + one[:step])[-1]
    chosen = [t for t in (one + [-1])[step : step + 1] + (batched + [-1])[step : step + 1] if t >= 0]
    gap = float(logits[chosen[0]] - logits[chosen[-1]]) if len(chosen) == 2 else float("nan")
    return (
        f"diverges at step {step}: one at a time {one[step : step + 1]}, batched {batched[step : step + 1]}, "
        f"logit gap {gap:.6f}"
    )


def test_batched_greedy_equals_one_at_a_time_on_pip_prompts(embedded_dir):
    from engine.data import load_records
    from engine.inference import load_chat_model

    records = load_records(Path(__file__).resolve().parent.parent / "assets" / "datasets" / "pip_chat.jsonl").records
    examples, _ = evaluate.examples_from_records(records[:6])
    model = load_chat_model(embedded_dir, "base")
    prompts = [model.encode_prompt(e.prompt) for e in examples]
    ended = []
    # 6 prompts, 3 rows at a time: rows leave when they end and the next prompts join
    batched = evaluate.torch_greedy_batch(
        model, prompts, 20, batch_size=3, on_reply=lambda index, reply, seconds: ended.append(index)
    )
    assert sorted(ended) == list(range(6))
    for ids, reply in zip(prompts, batched):
        one = _plain_greedy(model, ids, 20)
        assert one == reply, _first_divergence(model, ids, one, reply)


def test_onnx_fp32_batches_answer_as_one_prompt_at_a_time(tiny_run, chats_file):
    """The fp32 export answers an evaluation in onnxruntime-genai batches (prompts of different
    lengths, padded), with the answers of its one-at-a-time loop; an int4 export would not be
    batched (engine.config.ONNX_BATCH_VARIANTS)."""
    from engine.inference import GenerationSettings, load_chat_model

    model = load_chat_model(tiny_run, "onnx", precision="fp32")
    assert evaluate.batch_generator(model) is evaluate.onnx_batches
    records = [json.loads(line)["messages"][:1] for line in chats_file.read_text().splitlines()]
    assert len({len(model.encode_prompt(r)) for r in records}) > 1  # rows of different lengths
    settings = GenerationSettings(max_new_tokens=12, greedy=True)
    batched = evaluate.generate_answers(model, records, settings, batch_size=4)
    single = evaluate.generate_answers(model, records, settings, batch_size=1)
    assert [b[0] for b in batched] == [s[0] for s in single]
    assert {b[1]["batch"] for b in batched} == {4} and "batch" not in single[0][1]
    model.export_dir = model.export_dir.with_name("onnx-int4")  # what decides is the variant's name
    assert evaluate.batch_generator(model) is None


def test_a_queued_job_reports_progress_and_stops_keeping_its_answers(tiny_run, chats_file, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text(chats_file.read_text() * 10)  # 60 examples, one at a time: still running when stopped
    name = f"job-{time.time_ns()}"
    spec = EvalSpec(run=str(tiny_run), name=name, backends=["base"], data=str(data), batch_size=1, max_new_tokens=12)
    eval_dir = evaluate.submit(spec)
    deadline = time.time() + 300
    found = None
    while time.time() < deadline:
        # what a reloaded page does: find the run's evaluations and their progress
        found = next(e for e in evalfiles.list_evals(tiny_run) if e["name"] == name)
        if found["state"] in runs.FINAL_STATES or (found["progress"] or {}).get("done", 0) >= 2:
            break
        time.sleep(0.5)
    assert found["state"] == "running", (found, runs.tail_log(eval_dir))
    assert found["progress"]["total"] == 60 and found["progress"]["eta_s"] >= 0
    status = evaluate.stop_job(eval_dir, wait=True, timeout=120)
    assert status["state"] == "aborted", runs.tail_log(eval_dir)
    summary = json.loads((eval_dir / evaluate.SUMMARY_FILE).read_text())
    rows = evaluate.read_results(eval_dir)
    assert summary["partial"] is True and 2 <= len(rows) < 60
    assert summary["backends"]["base"]["examples"] == len(rows)
    assert "**Partial**" in (eval_dir / evaluate.REPORT_FILE).read_text()


# --------------------------------------------------------------------------- the judge


def test_judge_verdicts_urls_and_keys():
    from engine import judge

    assert judge.parse_verdict("A is closer.\nVerdict: B") == "B"
    assert judge.parse_verdict("**Verdict:** tie") == "tie"
    assert judge.parse_verdict("I cannot decide.") is None
    assert [judge.combine(*v) for v in (("A", "B"), ("A", "A"), ("B", "A"), ("tie", "tie"), ("A", None))] == [
        "win",
        "tie",
        "loss",
        "tie",
        None,
    ]
    for private in ("http://127.0.0.1:8000/v1", "http://10.1.2.3/v1", "http://[::1]/v1", "http://169.254.169.254/"):
        with pytest.raises(judge.JudgeError, match="not a public address"):
            judge.check_url(private, shared=True)
    assert judge.check_url("http://127.0.0.1:8000/v1/", shared=False) == "http://127.0.0.1:8000/v1"
    with pytest.raises(judge.JudgeError, match="must contain"):
        judge.check_prompt("Which is better, {answer_a} or {answer_b}?")
    unreachable = judge.EndpointJudge("http://127.0.0.1:9/v1", "m", key="sk-do-not-leak", timeout_s=2)
    with pytest.raises(judge.JudgeError) as err:
        unreachable.ask("hello")
    assert "sk-do-not-leak" not in str(err.value)


class _AlwaysA:
    """A judge with nothing but a position bias: it always prefers the first answer."""

    label = "always A"

    def ask(self, prompt: str) -> str:
        return "The first one.\nVerdict: A"


def test_asking_both_orders_cancels_a_position_bias(adapter_run, chats_file):
    from engine import judge

    name = f"judge-{time.time_ns()}"
    spec = EvalSpec(run=str(adapter_run), name=name, backends=["base", "tuned"], data=str(chats_file), max_new_tokens=8)
    spec.metrics = ["rouge_l"]
    eval_dir = evaluate.prepare(spec)
    evaluate.run_evaluation(eval_dir, spec, say=lambda m: None)
    verdicts = judge.run_judge(eval_dir, _AlwaysA(), say=lambda m: None)
    pair = verdicts["pairs"]["tuned vs base"]
    assert pair["tie"] == len(CHATS) * 2 and pair["rates"] == {"win": 0.0, "tie": 1.0, "loss": 0.0}


def test_judge_with_a_tiny_local_model(adapter_run, chats_file, tmp_path_factory):
    from engine import judge

    base = chat_base(None, tmp_path_factory.getbasetemp())  # cached by the adapter_run fixture
    name = f"local-judge-{time.time_ns()}"
    spec = EvalSpec(
        run=str(adapter_run),
        name=name,
        backends=["base", "tuned"],
        data=str(chats_file),
        limit=2,
        max_new_tokens=8,
        metrics=["rouge_l"],
        judge=str(base),
    )
    summary = evaluate.run_evaluation(evaluate.prepare(spec), spec, say=lambda m: None)
    eval_dir = adapter_run / "eval" / name
    lines = [json.loads(line) for line in (eval_dir / judge.JUDGE_FILE).read_text().splitlines()]
    assert [(e["example"], e["compared"], e["against"]) for e in lines] == [(0, "tuned", "base"), (1, "tuned", "base")]
    assert all(len(e["reasons"]) == 2 and len(e["verdicts"]) == 2 for e in lines)  # both orders, reasons kept
    counts = summary["judge"]["pairs"]["tuned vs base"]
    assert sum(counts[k] for k in ("win", "tie", "loss", "unparsed")) == 2
    assert summary["judge"]["prompt"] == judge.DEFAULT_PROMPT
    assert json.loads((eval_dir / evaluate.SUMMARY_FILE).read_text())["judge"]["pairs"] == summary["judge"]["pairs"]
    assert "Judge (local model" in (eval_dir / evaluate.REPORT_FILE).read_text()


# --------------------------------------------------------------------------- the judge in the Evaluate tab

PASTED_KEY = "sk-pasted-judge-key-4f1c9e"


class _SeenKeys:
    """A served API's one key, recording every bearer token it is shown."""

    def __init__(self, key: str):
        from engine import serve

        self.inner = serve.StaticKey(key)
        self.seen: list[str | None] = []

    @property
    def required(self) -> bool:
        return self.inner.required

    def user_of(self, token):
        self.seen.append(token)
        return self.inner.user_of(token)


def _tab(ctx):
    from webui import evaluate_tab

    demo = evaluate_tab.create(ctx)
    fns = {fn.fn.__name__: fn.fn for fn in demo.fns.values() if fn.fn}
    fns.update({fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name})
    return fns


def test_tab_judge_asks_a_served_endpoint_with_the_pasted_key_and_keeps_it_out(adapter_run, chats_file):
    from webui import evaluate_tab
    from webui.common import AppContext

    keys = _SeenKeys(PASTED_KEY)
    api = serve.Api(serve.RunsCatalog(lambda user: adapter_run.parent), keys, sched=Scheduler(share_cpu=True))
    fns = _tab(AppContext(runs_dir=adapter_run.parent, multi_user=False))
    name = f"tab-judge-{time.time_ns()}"
    outputs = []
    with serving(api) as url:
        outputs.append(
            fns["eval_start"](
                adapter_run.name,
                ["base", "tuned"],
                str(chats_file),
                "",
                2,
                8,
                2,
                name,
                evaluate_tab.JUDGE_ENDPOINT,
                "",
                url,
                f"{adapter_run.name}:base",
                PASTED_KEY,
                config.JUDGE_PROMPT,
                None,
            )
        )
        eval_dir = adapter_run / "eval" / name
        deadline = time.time() + 180
        while runs.read_status(eval_dir).get("state") not in runs.FINAL_STATES and time.time() < deadline:
            time.sleep(0.3)
    status = runs.read_status(eval_dir)
    assert status["state"] == "completed", runs.tail_log(eval_dir)
    assert PASTED_KEY in keys.seen  # the endpoint was asked with the pasted key in Authorization
    spec = json.loads((eval_dir / evaluate.SPEC_FILE).read_text())
    assert spec["judge"] == url and spec["judge_public_only"] is False
    lines = evaluate.read_judged(eval_dir)
    assert [(e["example"], e["compared"]) for e in lines] == [(0, "tuned"), (1, "tuned")]
    assert all(len(e["reasons"]) == 2 for e in lines)  # both orders, the judge's replies kept
    summary = json.loads((eval_dir / evaluate.SUMMARY_FILE).read_text())
    assert sum(summary["judge"]["pairs"]["tuned vs base"][k] for k in ("win", "tie", "loss", "unparsed")) == 2
    report = (eval_dir / evaluate.REPORT_FILE).read_text()
    assert "| pair | win | tie | loss |" in report and "judge tuned vs base | reasons" in report
    # what the page shows: the judge's table in the summary, a verdict and reasons column per pair
    view_args = (adapter_run.name, name, "rouge_l", evaluate.FILTERS[0], None)
    outputs.append(fns["show_eval"](*view_args))
    table = outputs[-1][4]
    assert {"judge tuned vs base", "judge tuned vs base reasons"} <= set(table.columns)
    assert "| tuned vs base |" in outputs[-1][1]
    csv_path = fns["eval_download_csv"](*view_args)
    header = Path(csv_path).read_text().splitlines()[0]
    assert header.endswith("judge tuned vs base,judge tuned vs base reasons")
    assert PASTED_KEY not in Path(csv_path).read_text()
    # the key is nowhere: no file of the run (spec, results, summary, report, status, job log), no page output
    for path in adapter_run.rglob("*"):
        if path.is_file():
            assert PASTED_KEY.encode() not in path.read_bytes(), path
    assert PASTED_KEY not in repr(outputs)


def test_shared_app_refuses_a_private_judge_url_and_lends_no_server_key(adapter_run, monkeypatch):
    import gradio as gr

    from webui import evaluate_tab
    from webui.common import AppContext

    fns = _tab(AppContext(runs_dir=adapter_run.parent, multi_user=True, auth=True))
    visitor = SimpleNamespace(username="visitor")

    def start(kind, url="", prompt=config.JUDGE_PROMPT):
        args = ("any-run", ["base"], "", "", 0, 8, 1, "", kind, "", url, "judge-model", "sk-visitor", prompt)
        return fns["eval_start"](*args, visitor)

    for private in ("http://127.0.0.1:8000/v1", "http://10.1.2.3/v1", "http://169.254.169.254/v1", "http://[::1]/v1"):
        with pytest.raises(gr.Error, match="not a public address"):
            start(evaluate_tab.JUDGE_ENDPOINT, private)
    with pytest.raises(gr.Error, match=r"must contain \{reference\}"):
        start(
            evaluate_tab.JUDGE_ENDPOINT, "https://8.8.8.8/v1", "Which is better, {question} {answer_a} or {answer_b}?"
        )
    # a shared app's job never borrows the server's own key; a visitor's pasted one is theirs
    monkeypatch.setenv(config.JUDGE_KEY_ENV, "sk-server-own")
    monkeypatch.delenv(config.JUDGE_PASTED_KEY_ENV, raising=False)
    spec = EvalSpec(run="r", judge="https://8.8.8.8/v1", judge_model="m", judge_public_only=True)
    assert evaluate.make_judge(spec).key is None
    monkeypatch.setenv(config.JUDGE_PASTED_KEY_ENV, "sk-visitor")
    assert evaluate.make_judge(spec).key == "sk-visitor"
    monkeypatch.delenv(config.JUDGE_PASTED_KEY_ENV)
    assert evaluate.make_judge(EvalSpec(run="r", judge="https://8.8.8.8/v1", judge_model="m")).key == "sk-server-own"
    with pytest.raises(evaluate.JudgeError, match="not a public address"):
        evaluate.make_judge(EvalSpec(run="r", judge="http://127.0.0.1/v1", judge_model="m", judge_public_only=True))

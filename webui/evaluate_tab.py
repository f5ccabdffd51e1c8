"""Evaluate tab: answer a whole dataset with base, tuned, merged and ONNX backends and compare
them (engine.evaluate).

Start queues a background job in the same queue as training (engine.launch), so the page
never waits on it; a timer shows its progress (examples done, ETA) and a reloaded page
finds it again (the run's newest evaluation is picked, its status read from its directory).
Stop keeps the finished examples (the summary says ``partial``).

The results: the aggregates per backend with 95% intervals, a bar chart of them, and a
table with one row per example (prompt, reference, each backend's answer and score) with
the filters "tuned worse than base", "ONNX differs from tuned" and "all wrong", downloads
as CSV and JSONL, and a click on a row that opens the conversation in the playground.

The optional judge (engine.judge): none, the run's base model, another local model, or an
OpenAI-compatible endpoint with a pasted key. The key goes to the evaluation job in its
environment only (engine.config.JUDGE_PASTED_KEY_ENV), never to the spec, the results, the log or
the page. On a shared app the endpoint must be public and the server's own key is not lent.

Launch alone: ``python -m webui.evaluate_tab``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine import config, evalfiles, evaluate, runs
from engine import judge as judging
from webui.common import AppContext, engine_errors, escape_md, fmt_duration, launch_standalone, plot_frame
from webui.links import standalone_tab
from webui.playground_tab import run_picker

CELL_CHARS = 400  # characters of a prompt or answer shown in a table cell (downloads hold all)
CHART_METRICS = ("exact_match", "token_f1", "rouge_l", "chrf", "bleu", "accuracy")
JUDGE_NONE, JUDGE_BASE, JUDGE_LOCAL, JUDGE_ENDPOINT = (
    "none",
    "the run's base model",
    "another local model",
    "an OpenAI-compatible endpoint",
)
JUDGE_KINDS = (JUDGE_NONE, JUDGE_BASE, JUDGE_LOCAL, JUDGE_ENDPOINT)


def run_backends(run_dir: Path) -> tuple[list[str], list[str]]:
    """(the backend names this run may offer, those that can answer now)."""
    names = ["base", "tuned", "merged"]
    export_dir = run_dir / "export"
    if export_dir.is_dir():
        names += sorted(p.name for p in export_dir.iterdir() if p.name.startswith("onnx-") and p.is_dir())
    for default in ("onnx-int4",):
        if default not in names:
            names.append(default)
    ready = [n for n in names if evaluate.backend_problem(run_dir, n) is None]
    return names, ready


def progress_markdown(info: dict | None, summary: dict | None) -> str:
    if info is None:
        return "No evaluation yet for this run: choose the backends and press **Evaluate**."
    state = info.get("state") or "?"
    progress = info.get("progress") or {}
    line = f"**{escape_md(info['name'])}**: {state}"
    if progress:
        line += f", {progress.get('done', 0)} of {progress.get('total', '?')} answers"
        if state == "running":
            line += f" ({escape_md(progress.get('backend', ''))}), about {fmt_duration(progress.get('eta_s'))} left"
    elif state == "queued":
        line += ": waiting for the machine (a training or another evaluation runs first)"
    if summary and summary.get("partial"):
        line += ". **Partial**: stopped before the end; the figures cover the finished answers."
    for name, why in (summary or {}).get("skipped_backends", {}).items():
        line += f"\n\nSkipped {escape_md(name)}: {escape_md(why)}"
    return line


def chart_frame(summary: dict | None):
    rows = []
    for backend, entry in ((summary or {}).get("backends") or {}).items():
        for metric, value in entry["metrics"].items():
            if (metric in CHART_METRICS or ":" in metric) and value.get("value") is not None:
                rows.append({"metric": metric, "backend": backend, "score": float(value["value"])})
    # one bar per (metric, backend), grouped by metric: a bar plot stacks bars that share an x value
    rows.sort(key=lambda r: r["metric"])
    for r in rows:
        r["bar"] = f"{r['metric']} \u00b7 {r['backend']}"
    return plot_frame(rows, {"bar": "str", "metric": "str", "backend": "str", "score": "float64"})


def chart_update(summary: dict | None):
    frame = chart_frame(summary)
    return gr.BarPlot(value=frame, sort=list(frame["bar"]) if frame is not None else None)


def table_value(entries: list[dict], backends: list[str], score: str, pairs: list[str] | None = None):
    """The comparison table; ``pairs``: the judged pairs, each with a verdict and a reasons column."""
    import pandas as pd

    pairs = pairs or []
    columns = ["#", "prompt", "reference"] + [c for b in backends for c in (b, f"{b} {score}")]
    columns += [c for p in pairs for c in (f"judge {p}", f"judge {p} reasons")]
    data = []
    for e in entries:
        row = [e["example"], e["prompt"][-1]["content"][:CELL_CHARS], e["reference"][:CELL_CHARS]]
        for b in backends:
            value = e["scores"].get(b)
            row += [e["answers"].get(b, "")[:CELL_CHARS], None if value is None else round(value, 1)]
        for p in pairs:
            verdict = e.get("judge", {}).get(p) or {}
            row += [verdict.get("outcome", ""), verdict.get("reasons", "")[:CELL_CHARS]]
        data.append(row)
    return pd.DataFrame(data, columns=columns)


def build(ctx: AppContext, links) -> SimpleNamespace:
    defaults = evaluate.EvalSpec(run="")
    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="eval-run")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=90)
    with gr.Row():
        backends = gr.CheckboxGroup([], value=[], label="Backends", elem_id="eval-backends", scale=3)
        data_path = gr.Textbox(
            "",
            label="Dataset file (optional)",
            placeholder="empty: the run's validation split, as the trainer split it",
            elem_id="eval-data",
            visible=not ctx.multi_user,
            scale=2,
        )
    with gr.Accordion("Checks and settings", open=False, elem_id="eval-settings"):
        checks = gr.Textbox(
            "",
            label="Checks (one per line)",
            lines=2,
            placeholder="starts_with:Pip here!\ncontains:Happy tuning\nregex:^\\d+$",
            elem_id="eval-checks",
        )
        with gr.Row():
            limit = gr.Number(
                0, label="Only the first N examples (0: all)", precision=0, minimum=0, elem_id="eval-limit"
            )
            max_new = gr.Number(
                defaults.max_new_tokens, label="Max new tokens", precision=0, minimum=1, elem_id="eval-max-new"
            )
            batch = gr.Number(defaults.batch_size, label="Batch size", precision=0, minimum=1, elem_id="eval-batch")
            name = gr.Textbox("", label="Name", placeholder="eval-<date>-<time>", elem_id="eval-name")
    with gr.Accordion("Judge (optional)", open=False, elem_id="eval-judge"):
        judge_kind = gr.Radio(
            list(JUDGE_KINDS),
            value=JUDGE_NONE,
            label="Judge: tuned vs base and ONNX vs tuned, each asked in both orders",
            elem_id="eval-judge-kind",
        )
        judge_local = gr.Textbox(
            "",
            label="Judge model (a local directory or a Hub id tunelab can load)",
            visible=False,
            elem_id="eval-judge-local",
        )
        with gr.Row(visible=False) as endpoint_row:
            judge_url = gr.Textbox(
                "",
                label="Endpoint URL",
                placeholder="https://host/v1",
                elem_id="eval-judge-url",
                info="A public address on a shared app." if ctx.multi_user else None,
            )
            judge_endpoint_model = gr.Textbox("", label="Model name", elem_id="eval-judge-endpoint-model")
            judge_key = gr.Textbox(
                "",
                label="Key",
                type="password",
                elem_id="eval-judge-key",
                info="Used by this evaluation's job only; never stored, logged or shown."
                + ("" if ctx.multi_user else f" Empty: {config.JUDGE_KEY_ENV} from the environment."),
            )
        judge_prompt = gr.Textbox(
            config.JUDGE_PROMPT,
            label="Judge prompt ({question}, {reference}, {answer_a}, {answer_b} are filled in)",
            lines=8,
            elem_id="eval-judge-prompt",
        )
    with gr.Row():
        start_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="eval-stop", scale=0, min_width=80)
    with gr.Row():
        pick = gr.Dropdown([], value=None, label="Evaluation", elem_id="eval-pick", scale=3)
        score = gr.Dropdown([], value=None, label="Score shown", elem_id="eval-score", scale=1)
    progress = gr.Markdown("", elem_id="eval-progress")
    summary_md = gr.Markdown("", elem_id="eval-summary")
    chart = gr.BarPlot(
        None, x="bar", y="score", color="backend", label="Metrics per backend (0-100)", elem_id="eval-chart"
    )
    view = gr.Radio(list(evaluate.FILTERS), value=evaluate.FILTERS[0], label="Show", elem_id="eval-filter")
    table = gr.Dataframe(
        None,
        label="Every answer (click a row to open it in the playground)",
        interactive=False,
        wrap=True,
        elem_id="eval-table",
    )
    with gr.Row():
        dl_csv = gr.Button("Download CSV", elem_id="eval-dl-csv")
        dl_jsonl = gr.Button("Download JSONL", elem_id="eval-dl-jsonl")
    files = gr.File(label="Files", interactive=False, elem_id="eval-files")
    entries_state = gr.State([])  # the rows shown, with their whole conversations
    timer = gr.Timer(max(1.0, 2 * ctx.poll_seconds), active=False)

    def refresh(current, request: gr.Request = None):
        return run_picker(ctx, current, request)

    def eval_dir(run_id, eval_name, request) -> Path:
        run_dir = ctx.run_dir(request, run_id)
        if not eval_name or not evaluate.NAME_PATTERN.match(str(eval_name)):
            raise gr.Error("Pick an evaluation first.")
        path = evaluate.eval_root(run_dir) / str(eval_name)
        if not (path / evaluate.SPEC_FILE).is_file():
            raise gr.Error(f"There is no evaluation {eval_name!r} for this run.")
        return path

    def results_view(run_id, eval_name, score_v, view_v, request):
        """Everything shown about one evaluation; the timer runs while it is queued or running."""
        run_dir = ctx.run_dir(request, run_id)
        info = next((e for e in evalfiles.list_evals(run_dir) if e["name"] == eval_name), None)
        path = evaluate.eval_root(run_dir) / str(eval_name) if info else None
        summary = runs.read_json(path / evaluate.SUMMARY_FILE) if path else None
        active = bool(info and info["state"] in runs.ACTIVE_STATES)
        if not summary:
            return (
                progress_markdown(info, None),
                "",
                None,
                gr.Dropdown(choices=[], value=None),
                None,
                [],
                gr.Timer(active=active),
            )
        choices = evaluate.score_choices(summary)
        score_v = score_v if score_v in choices else (choices[0] if choices else None)
        names = list(summary["backends"])
        judged = evaluate.read_judged(path)
        entries = evaluate.comparison(evaluate.read_results(path), names, score_v, view_v, judged) if score_v else []
        text = "Aggregates with bootstrap 95% intervals:\n\n" + evaluate.summary_table(summary)
        if summary.get("judge"):
            text += (
                f"\n\nJudge ({escape_md(summary['judge']['judge'])}, both orders asked): "
                "win / tie / loss of the first named\n\n" + evaluate.judge_table(summary)
            )
        return (
            progress_markdown(info, summary),
            text,
            chart_update(summary),
            gr.Dropdown(choices=choices, value=score_v),
            table_value(entries, names, score_v, evaluate.judge_pair_names(judged)),
            entries,
            gr.Timer(active=active),
        )

    view_outputs = [progress, summary_md, chart, score, table, entries_state, timer]

    @engine_errors
    def show_run(run_id, request: gr.Request):
        if not run_id:
            return gr.CheckboxGroup(choices=[], value=[]), gr.Dropdown(choices=[], value=None)
        run_dir = ctx.run_dir(request, run_id)
        names, ready = run_backends(run_dir)
        evals = [e["name"] for e in evalfiles.list_evals(run_dir)]
        return (
            gr.CheckboxGroup(choices=names, value=ready),
            gr.Dropdown(choices=evals, value=evals[0] if evals else None),
        )

    @engine_errors
    def show_eval(run_id, eval_name, score_v, view_v, request: gr.Request):
        if not run_id or not eval_name:
            return progress_markdown(None, None), "", None, gr.Dropdown(choices=[]), None, [], gr.Timer(active=False)
        return results_view(run_id, eval_name, score_v, view_v, request)

    def judge_settings(run_id, kind, local_v, url_v, model_v, prompt_v, request) -> dict:
        """The spec's judge fields from the page (checked now, not by the job)."""
        if kind in (None, JUDGE_NONE):
            return {}
        prompt = judging.check_prompt(prompt_v or config.JUDGE_PROMPT)
        fields = {"judge_prompt": None if prompt == config.JUDGE_PROMPT else prompt}
        if kind == JUDGE_BASE:
            from engine.config import RunConfig

            run_dir = ctx.run_dir(request, run_id)
            fields["judge"] = str(RunConfig.load(run_dir / runs.CONFIG_FILE).model.name_or_path)
        elif kind == JUDGE_LOCAL:
            fields["judge"] = ctx.check_model(request, local_v)
        elif kind == JUDGE_ENDPOINT:
            if not (model_v or "").strip():
                raise gr.Error("Judge endpoint: name its model (the Model name box).")
            fields["judge"] = judging.check_url(url_v or "", shared=bool(ctx.multi_user))
            fields["judge_model"] = model_v.strip()
            fields["judge_public_only"] = bool(ctx.multi_user)
        else:
            raise gr.Error(f"Judge: {kind!r} is not one of {', '.join(JUDGE_KINDS)}.")
        return fields

    @engine_errors
    def start(
        run_id,
        chosen,
        data_v,
        checks_v,
        limit_v,
        max_new_v,
        batch_v,
        name_v,
        kind,
        local_v,
        url_v,
        model_v,
        key_v,
        prompt_v,
        request: gr.Request,
    ):
        judge_fields = judge_settings(run_id, kind, local_v, url_v, model_v, prompt_v, request)
        run_dir = ctx.run_dir(request, run_id)
        data_file = (data_v or "").strip() or None
        if data_file and ctx.multi_user:
            raise gr.Error("On a shared app an evaluation uses the run's own validation split.", title="Refused")
        spec = evaluate.EvalSpec(
            run=str(run_dir),
            name=(name_v or "").strip(),
            backends=list(chosen or []),
            data=data_file,
            checks=[c.strip() for c in (checks_v or "").splitlines() if c.strip()],
            limit=int(limit_v) if limit_v else None,
            max_new_tokens=int(max_new_v or defaults.max_new_tokens),
            batch_size=int(batch_v or defaults.batch_size),
            **judge_fields,
        )
        evaluate.load_examples(run_dir, spec)  # a bad file or split is said now, not by the job
        pasted = (key_v or "").strip() if kind == JUDGE_ENDPOINT else ""
        evaluate.submit(spec, judge_key=pasted or None)
        evals = [e["name"] for e in evalfiles.list_evals(run_dir)]
        gr.Info(f"Evaluation {spec.name} queued.")
        return gr.Dropdown(choices=evals, value=spec.name), gr.Timer(active=True)

    @engine_errors
    def stop(run_id, eval_name, request: gr.Request):
        status = evaluate.stop_job(eval_dir(run_id, eval_name, request))
        gr.Info(f"Stopping {eval_name} ({status.get('state')}): the finished answers are kept.")

    def download(kind):
        @engine_errors
        def handler(run_id, eval_name, score_v, view_v, request: gr.Request):
            path = eval_dir(run_id, eval_name, request)
            summary = runs.read_json(path / evaluate.SUMMARY_FILE)
            if not summary:
                raise gr.Error("This evaluation has no results yet.")
            out = Path(tempfile.mkdtemp(prefix="tunelab-eval-"))
            if kind == "jsonl":
                target = out / f"{path.name}-results.jsonl"
                target.write_bytes((path / evaluate.RESULTS_FILE).read_bytes())
            else:
                names = list(summary["backends"])
                score_v = score_v or (evaluate.score_choices(summary) or ["rouge_l"])[0]
                judged = evaluate.read_judged(path)
                entries = evaluate.comparison(evaluate.read_results(path), names, score_v, view_v, judged)
                target = out / f"{path.name}.csv"
                target.write_text(evaluate.comparison_csv(entries, names, score_v), encoding="utf-8")
            return str(target)

        handler.__name__ = f"eval_download_{kind}"
        return handler

    def on_load(request: gr.Request):
        return refresh(None, request)

    # ---- events
    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden", api_name="eval_runs")
    gr.on(triggers=None, fn=on_load, inputs=None, outputs=run, show_progress="hidden")
    run.change(show_run, inputs=run, outputs=[backends, pick], show_progress="hidden")
    judge_kind.change(
        lambda kind: (gr.Textbox(visible=kind == JUDGE_LOCAL), gr.Row(visible=kind == JUDGE_ENDPOINT)),
        inputs=judge_kind,
        outputs=[judge_local, endpoint_row],
        show_progress="hidden",
    )
    view_inputs = [run, pick, score, view]
    pick.change(show_eval, inputs=view_inputs, outputs=view_outputs, show_progress="hidden")
    score.input(show_eval, inputs=view_inputs, outputs=view_outputs, show_progress="hidden")
    view.change(show_eval, inputs=view_inputs, outputs=view_outputs, show_progress="hidden")
    timer.tick(show_eval, inputs=view_inputs, outputs=view_outputs, show_progress="hidden")
    start_btn.click(
        start,
        inputs=[
            run,
            backends,
            data_path,
            checks,
            limit,
            max_new,
            batch,
            name,
            judge_kind,
            judge_local,
            judge_url,
            judge_endpoint_model,
            judge_key,
            judge_prompt,
        ],
        outputs=[pick, timer],
        api_name="eval_start",
    ).success(show_eval, inputs=view_inputs, outputs=view_outputs, show_progress="hidden")
    stop_btn.click(stop, inputs=[run, pick], outputs=None, concurrency_limit=None)
    dl_csv.click(download("csv"), inputs=view_inputs, outputs=files)
    dl_jsonl.click(download("jsonl"), inputs=view_inputs, outputs=files)
    return SimpleNamespace(
        run=run,
        refresh=refresh,
        show=show_run,
        show_inputs=[run],
        show_outputs=[backends, pick],
        table=table,
        entries=entries_state,
    )


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "evaluate", ctx)


if __name__ == "__main__":
    launch_standalone(create)

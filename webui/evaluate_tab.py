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
from webui.common import AppContext, engine_errors, escape_md, fmt_duration, launch_standalone, plot_frame, state_text
from webui.i18n import lang_of, t, tr
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
# The page's words for the judge kinds, the engine's filters (engine.evaluate.FILTERS), a judged
# pair's outcome and why a backend was skipped (the summary's skipped_codes); the values stay.
JUDGE_KEYS = {
    JUDGE_NONE: "evaluate.judge_kind.none",
    JUDGE_BASE: "evaluate.judge_kind.base",
    JUDGE_LOCAL: "evaluate.judge_kind.local",
    JUDGE_ENDPOINT: "evaluate.judge_kind.endpoint",
}
FILTER_KEYS = {
    "all examples": "evaluate.filter.all",
    "tuned worse than base": "evaluate.filter.tuned_worse",
    "ONNX differs from tuned": "evaluate.filter.onnx_differs",
    "all wrong": "evaluate.filter.all_wrong",
}
OUTCOME_KEYS = {
    "win": "evaluate.outcome.win",
    "tie": "evaluate.outcome.tie",
    "loss": "evaluate.outcome.loss",
    "unparsed": "evaluate.outcome.unparsed",
}
SKIP_KEYS = {
    "no_adapter": "evaluate.skip.no_adapter",
    "no_merged": "evaluate.skip.no_merged",
    "no_onnx": "evaluate.skip.no_onnx",
}


def judge_choices(lang: str | None) -> list[tuple[str, str]]:
    return [(tr(lang, JUDGE_KEYS[k]), k) for k in JUDGE_KINDS]


def filter_choices(lang: str | None) -> list[tuple[str, str]]:
    return [(tr(lang, FILTER_KEYS[f]) if f in FILTER_KEYS else f, f) for f in evaluate.FILTERS]


def skipped_text(lang: str | None, summary: dict, name: str) -> str:
    """Why a backend was skipped, in ``lang`` (the engine's English when it gave no known code)."""
    issue = (summary.get("skipped_codes") or {}).get(name) or {}
    key = SKIP_KEYS.get(issue.get("code"))
    return tr(lang, key, **issue.get("params", {})) if key else summary["skipped_backends"][name]


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


def progress_markdown(info: dict | None, summary: dict | None, lang: str = "en") -> str:
    if info is None:
        return tr(lang, "evaluate.none_yet")
    state = info.get("state") or "?"
    progress = info.get("progress") or {}
    line = f"**{escape_md(info['name'])}**: {state_text(lang, state)}"
    if progress:
        line += tr(lang, "evaluate.answers", done=progress.get("done", 0), total=progress.get("total", "?"))
        if state == "running":
            backend = escape_md(progress.get("backend", ""))
            line += tr(lang, "evaluate.eta", backend=backend, eta=fmt_duration(progress.get("eta_s")))
    elif state == "queued":
        line += tr(lang, "evaluate.waiting")
    if summary and summary.get("partial"):
        line += tr(lang, "evaluate.partial")
    for name in (summary or {}).get("skipped_backends", {}):
        line += "\n\n" + tr(
            lang, "evaluate.skipped", backend=escape_md(name), why=escape_md(skipped_text(lang, summary, name))
        )
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


def table_value(entries: list[dict], backends: list[str], score: str, pairs: list[str] | None = None, lang: str = "en"):
    """The comparison table, its headers in ``lang`` (backend, metric and pair names stay);
    ``pairs``: the judged pairs, each with a verdict and a reasons column."""
    import pandas as pd

    pairs = pairs or []
    columns = ["#", tr(lang, "evaluate.col.prompt"), tr(lang, "evaluate.col.reference")]
    columns += [c for b in backends for c in (b, f"{b} {score}")]
    columns += [
        c for p in pairs for c in (tr(lang, "evaluate.col.judge", pair=p), tr(lang, "evaluate.col.reasons", pair=p))
    ]
    data = []
    for e in entries:
        row = [e["example"], e["prompt"][-1]["content"][:CELL_CHARS], e["reference"][:CELL_CHARS]]
        for b in backends:
            value = e["scores"].get(b)
            row += [e["answers"].get(b, "")[:CELL_CHARS], None if value is None else round(value, 1)]
        for p in pairs:
            verdict = e.get("judge", {}).get(p) or {}
            outcome = verdict.get("outcome", "")
            row += [tr(lang, OUTCOME_KEYS[outcome]) if outcome in OUTCOME_KEYS else outcome]
            row += [verdict.get("reasons", "")[:CELL_CHARS]]
        data.append(row)
    return pd.DataFrame(data, columns=columns)


def build(ctx: AppContext, links) -> SimpleNamespace:
    defaults = evaluate.EvalSpec(run="")

    def key_info(lang: str) -> str:
        if ctx.multi_user:  # a shared app lends no key of its own
            return tr(lang, "evaluate.judge_key_info")
        return tr(lang, "evaluate.judge_key_info_env", env=config.JUDGE_KEY_ENV)

    with gr.Row():
        run = gr.Dropdown([], value=None, label=t("evaluate.run"), scale=3, elem_id="eval-run")
        refresh_btn = gr.Button(t("evaluate.refresh"), size="sm", scale=0, min_width=90)
    with gr.Row():
        backends = gr.CheckboxGroup([], value=[], label=t("evaluate.backends"), elem_id="eval-backends", scale=3)
        data_path = gr.Textbox(
            "",
            label=t("evaluate.data"),
            placeholder=t("evaluate.data_placeholder"),
            elem_id="eval-data",
            visible=not ctx.multi_user,
            scale=2,
        )
    with gr.Accordion(t("evaluate.settings"), open=False, elem_id="eval-settings"):
        checks = gr.Textbox(
            "",
            label=t("evaluate.checks"),
            lines=2,
            placeholder=t("evaluate.checks_placeholder"),
            elem_id="eval-checks",
        )
        with gr.Row():
            limit = gr.Number(0, label=t("evaluate.limit"), precision=0, minimum=0, elem_id="eval-limit")
            max_new = gr.Number(
                defaults.max_new_tokens, label=t("evaluate.max_new"), precision=0, minimum=1, elem_id="eval-max-new"
            )
            batch = gr.Number(
                defaults.batch_size, label=t("evaluate.batch"), precision=0, minimum=1, elem_id="eval-batch"
            )
            name = gr.Textbox(
                "", label=t("evaluate.name"), placeholder=t("evaluate.name_placeholder"), elem_id="eval-name"
            )
    with gr.Accordion(t("evaluate.judge"), open=False, elem_id="eval-judge"):
        judge_kind = gr.Radio(
            judge_choices("en"),  # in the visitor's language on load
            value=JUDGE_NONE,
            label=t("evaluate.judge_kind_label"),
            elem_id="eval-judge-kind",
        )
        judge_local = gr.Textbox(
            "",
            label=t("evaluate.judge_local"),
            visible=False,
            elem_id="eval-judge-local",
        )
        with gr.Row(visible=False) as endpoint_row:
            judge_url = gr.Textbox(
                "",
                label=t("evaluate.judge_url"),
                placeholder=t("evaluate.judge_url_placeholder"),
                elem_id="eval-judge-url",
                info=t("evaluate.judge_url_info") if ctx.multi_user else None,
            )
            judge_endpoint_model = gr.Textbox("", label=t("evaluate.judge_model"), elem_id="eval-judge-endpoint-model")
            judge_key = gr.Textbox(
                "",
                label=t("evaluate.judge_key"),
                type="password",
                elem_id="eval-judge-key",
                info=key_info("en"),  # in the visitor's language on load
            )
        judge_prompt = gr.Textbox(
            config.JUDGE_PROMPT,  # what the judge model reads: English, as engine.config has it
            label=t("evaluate.judge_prompt"),
            lines=8,
            elem_id="eval-judge-prompt",
        )
    with gr.Row():
        start_btn = gr.Button(t("evaluate.start"), variant="primary", elem_id="eval-start")
        stop_btn = gr.Button(t("evaluate.stop"), variant="stop", elem_id="eval-stop", scale=0, min_width=80)
    with gr.Row():
        pick = gr.Dropdown([], value=None, label=t("evaluate.pick"), elem_id="eval-pick", scale=3)
        score = gr.Dropdown([], value=None, label=t("evaluate.score"), elem_id="eval-score", scale=1)
    progress = gr.Markdown("", elem_id="eval-progress")
    summary_md = gr.Markdown("", elem_id="eval-summary")
    chart = gr.BarPlot(None, x="bar", y="score", color="backend", label=t("evaluate.chart"), elem_id="eval-chart")
    view = gr.Radio(filter_choices("en"), value=evaluate.FILTERS[0], label=t("evaluate.show"), elem_id="eval-filter")
    table = gr.Dataframe(
        None,
        label=t("evaluate.table"),
        interactive=False,
        wrap=True,
        elem_id="eval-table",
    )
    with gr.Row():
        dl_csv = gr.Button(t("evaluate.dl_csv"), elem_id="eval-dl-csv")
        dl_jsonl = gr.Button(t("evaluate.dl_jsonl"), elem_id="eval-dl-jsonl")
    files = gr.File(label=t("evaluate.files"), interactive=False, elem_id="eval-files")
    entries_state = gr.State([])  # the rows shown, with their whole conversations
    timer = gr.Timer(max(1.0, 2 * ctx.poll_seconds), active=False)

    def refresh(current, request: gr.Request = None):
        return run_picker(ctx, current, request)

    def eval_dir(run_id, eval_name, request) -> Path:
        lang = lang_of(request)
        run_dir = ctx.run_dir(request, run_id)
        if not eval_name or not evaluate.NAME_PATTERN.match(str(eval_name)):
            raise gr.Error(tr(lang, "evaluate.pick_first"))
        path = evaluate.eval_root(run_dir) / str(eval_name)
        if not (path / evaluate.SPEC_FILE).is_file():
            raise gr.Error(tr(lang, "evaluate.no_such", name=repr(eval_name)))
        return path

    def results_view(run_id, eval_name, score_v, view_v, request):
        """Everything shown about one evaluation (in the visitor's language); the timer runs
        while it is queued or running."""
        lang = lang_of(request)
        run_dir = ctx.run_dir(request, run_id)
        info = next((e for e in evalfiles.list_evals(run_dir) if e["name"] == eval_name), None)
        path = evaluate.eval_root(run_dir) / str(eval_name) if info else None
        summary = runs.read_json(path / evaluate.SUMMARY_FILE) if path else None
        active = bool(info and info["state"] in runs.ACTIVE_STATES)
        if not summary:
            return (
                progress_markdown(info, None, lang),
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
        head = (tr(lang, "evaluate.col.metric"), tr(lang, "evaluate.col.examples"))
        text = tr(lang, "evaluate.aggregates") + "\n\n" + evaluate.summary_table(summary, head)
        if summary.get("judge"):
            judge_head = tuple(
                tr(lang, k)
                for k in (
                    "evaluate.col.pair",
                    "evaluate.outcome.win",
                    "evaluate.outcome.tie",
                    "evaluate.outcome.loss",
                    "evaluate.col.no_verdict",
                )
            )
            text += (
                "\n\n"
                + tr(lang, "evaluate.judge_head", judge=escape_md(summary["judge"]["judge"]))
                + "\n\n"
                + evaluate.judge_table(summary, judge_head)
            )
        return (
            progress_markdown(info, summary, lang),
            text,
            chart_update(summary),
            gr.Dropdown(choices=choices, value=score_v),
            table_value(entries, names, score_v, evaluate.judge_pair_names(judged), lang),
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
            return (
                progress_markdown(None, None, lang_of(request)),
                "",
                None,
                gr.Dropdown(choices=[]),
                None,
                [],
                gr.Timer(active=False),
            )
        return results_view(run_id, eval_name, score_v, view_v, request)

    def judge_settings(run_id, kind, local_v, url_v, model_v, prompt_v, request) -> dict:
        """The spec's judge fields from the page (checked now, not by the job)."""
        lang = lang_of(request)
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
                raise gr.Error(tr(lang, "evaluate.judge_no_model"))
            fields["judge"] = judging.check_url(url_v or "", shared=bool(ctx.multi_user))
            fields["judge_model"] = model_v.strip()
            fields["judge_public_only"] = bool(ctx.multi_user)
        else:
            raise gr.Error(tr(lang, "evaluate.judge_unknown", kind=repr(kind), kinds=", ".join(JUDGE_KINDS)))
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
        lang = lang_of(request)
        if data_file and ctx.multi_user:
            raise gr.Error(tr(lang, "evaluate.shared_split"), title=tr(lang, "evaluate.refused"))
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
        gr.Info(tr(lang, "evaluate.queued", name=spec.name))
        return gr.Dropdown(choices=evals, value=spec.name), gr.Timer(active=True)

    @engine_errors
    def stop(run_id, eval_name, request: gr.Request):
        status = evaluate.stop_job(eval_dir(run_id, eval_name, request))
        lang = lang_of(request)
        gr.Info(tr(lang, "evaluate.stopping", name=eval_name, state=state_text(lang, status.get("state"))))

    def download(kind):
        @engine_errors
        def handler(run_id, eval_name, score_v, view_v, request: gr.Request):
            path = eval_dir(run_id, eval_name, request)
            summary = runs.read_json(path / evaluate.SUMMARY_FILE)
            if not summary:
                raise gr.Error(tr(lang_of(request), "evaluate.no_results"))
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
        lang = lang_of(request)
        return (
            refresh(None, request),
            gr.Radio(choices=judge_choices(lang)),
            gr.Radio(choices=filter_choices(lang)),
            gr.Textbox(info=key_info(lang)),
        )

    # ---- events
    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden", api_name="eval_runs")
    gr.on(triggers=None, fn=on_load, inputs=None, outputs=[run, judge_kind, view, judge_key], show_progress="hidden")
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

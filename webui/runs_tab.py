"""Runs tab: every run on disk with its status, method, data, final losses and duration;
the loss curves of several runs on one chart; resume, delete (with confirmation), open in
the playground, its experiment trackers and their commands, and its recipe to download.

Launch alone: ``python -m webui.runs_tab``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr  # at module level: the select handler's gr.SelectData annotation must resolve

from webui.common import (
    AppContext,
    engine_errors,
    escape_md,
    fmt_duration,
    fmt_number,
    launch_standalone,
    plot_frame,
    state_text,
)
from webui.i18n import lang_of, t, tr
from webui.links import standalone_tab

PALETTE = ["#6366f1", "#f97316", "#10b981", "#ef4444", "#0ea5e9", "#a855f7", "#eab308", "#14b8a6", "#ec4899", "#64748b"]
COLUMN_KEYS = [
    "runs.col.run",
    "runs.col.status",
    "runs.col.method",
    "runs.col.model",
    "runs.col.data",
    "runs.col.steps",
    "runs.col.train_loss",
    "runs.col.eval_loss",
    "runs.col.duration",
    "runs.col.created",
]
COLUMNS = [tr("en", k) for k in COLUMN_KEYS]
SERIES = ("train", "eval")  # loss_curves' series


# The page's words for a job's state (engine.runs.STATES); the engine, the CLI and the logs keep
# the English state names.
def final_losses(run_dir: Path, tail_bytes: int = 16384) -> dict:
    """The last train loss and eval loss in metrics.jsonl (reads only the end of the file)."""
    path = run_dir / "metrics.jsonl"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {}
    with path.open("rb") as fh:
        fh.seek(max(0, size - tail_bytes))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    found: dict = {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the first line of the tail is usually cut
        for key in ("loss", "eval_loss"):
            if key not in found and row.get(key) is not None:
                found[key] = row[key]
        if len(found) == 2:
            break
    return found


def run_table(runs_dir: Path, lang: str = "en") -> tuple[list[list], list[str]]:
    """Rows for the table (in ``lang``) and the run ids, newest first (from runs.list_runs)."""
    from engine import runs

    if not runs_dir.is_dir():
        return [], []
    rows, ids = [], []
    now = time.time()
    for info in runs.list_runs(runs_dir):
        losses = final_losses(Path(info["path"]))
        started, ended = info.get("started_at"), info.get("ended_at")
        duration = (ended or now) - started if started else None
        eval_loss = info.get("tuned_eval_loss", losses.get("eval_loss"))
        base_eval = info.get("base_eval_loss")
        eval_text = fmt_number(eval_loss) + (
            " " + tr(lang, "runs.base_loss", loss=fmt_number(base_eval)) if base_eval is not None else ""
        )
        step = info.get("step")
        rows.append(
            [
                info["run_id"],
                state_text(lang, info.get("state")) + (f": {info['error_class']}" if info.get("error_class") else ""),
                info.get("method") or "-",
                Path(str(info.get("model") or "-")).name,
                Path(str(info.get("data") or "-")).name,
                f"{step}/{info.get('max_steps') or '?'}" if step is not None else "-",
                fmt_number(losses.get("loss")),
                eval_text,
                fmt_duration(duration),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(info["created_at"])) if info.get("created_at") else "-",
            ]
        )
        ids.append(info["run_id"])
    return rows, ids


def loss_curves(runs_dir: Path, run_ids: list[str], series: str = "train"):
    """A DataFrame (step, loss, run) of the chosen runs' train or eval loss.

    Raises engine.security.UnsafeInputError for a run id that would leave ``runs_dir``."""
    from engine import runs
    from engine.security import safe_run_id, within

    key = "loss" if series == "train" else "eval_loss"
    points = []
    for run_id in run_ids:
        for row in runs.read_metrics(within(runs_dir, safe_run_id(run_id))):
            if row.get(key) is not None and row.get("step") is not None:
                points.append({"step": row["step"], "loss": float(row[key]), "run": run_id})
    return plot_frame(points, {"step": "int64", "loss": "float64", "run": "str"})


def run_details(runs_dir: Path, run_id: str | None, lang: str = "en") -> str:
    """Status, base-vs-tuned evaluation and the command of one run (secrets redacted), in ``lang``.

    Raises engine.security.UnsafeInputError for a run id that would leave ``runs_dir``."""
    from engine import runs
    from engine.security import redact, safe_run_id, within

    if not run_id:
        return tr(lang, "runs.select")
    run_dir = within(runs_dir, safe_run_id(run_id))
    status = runs.refresh_status(run_dir)
    lines = [f"### {escape_md(run_id)} - {escape_md(state_text(lang, status.get('state')))}"]
    if status.get("error_class"):
        lines.append(f"**{escape_md(status['error_class'])}**: {escape_md(redact(status.get('error') or ''))}")
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        try:
            ev = json.loads(eval_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            ev = {"error": tr(lang, "runs.eval_unreadable", error=str(err))}
        parts = []
        for name, value in ev.items():
            if isinstance(value, dict):  # {"base": {"loss": ...}, "tuned": {...}}
                parts += [
                    f"{name} {k.replace('_', ' ')} {fmt_number(v)}"
                    for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                ]
            elif isinstance(value, (int, float, str)):
                parts.append(f"{name.replace('_', ' ')} {fmt_number(value)}")
        lines.append(tr(lang, "runs.validation", figures=escape_md(", ".join(parts))))
    cmd = run_dir / "command.txt"
    if cmd.is_file():
        lines.append(f"```\n{redact(cmd.read_text(encoding='utf-8').strip())}\n```")
    from engine.tracking import run_locations

    for loc in run_locations(run_dir):
        lines.append(tr(lang, "runs.tracker", tracker=loc.tracker, where=escape_md(loc.where), command=loc.command))
    return "\n\n".join(lines)


def series_choices(lang: str | None) -> list[tuple[str, str]]:
    """The curve picker's choices: (label in ``lang``, value)."""
    return list(zip((tr(lang, "runs.train_loss"), tr(lang, "runs.eval_loss")), SERIES))


def build(ctx: AppContext, links) -> SimpleNamespace:
    rows, ids = [], []  # filled when the page loads
    with gr.Row():
        refresh_btn = gr.Button(t("runs.refresh"), size="sm", scale=0, min_width=90, elem_id="runs-refresh")
    table = gr.Dataframe(
        headers=[t(k) for k in COLUMN_KEYS],
        value=rows,
        interactive=False,
        wrap=True,
        elem_id="runs-table",
        label=t("runs.table"),
        max_height=360,
    )
    with gr.Row():
        with gr.Column(scale=2):
            compare = gr.CheckboxGroup(ids, value=ids[:3], label=t("runs.compare"), elem_id="runs-compare")
            series = gr.Radio(series_choices("en"), value=SERIES[0], label=t("runs.curve"), elem_id="runs-series")
        with gr.Column(scale=3):
            curves = gr.LinePlot(
                None, x="step", y="loss", color="run", title=t("runs.curves"), height=300, elem_id="runs-curves"
            )
    with gr.Row():
        selected = gr.Dropdown(
            ids, value=ids[0] if ids else None, label=t("runs.run"), elem_id="runs-selected", scale=2
        )
        resume_btn = gr.Button(t("runs.resume"), elem_id="runs-resume", scale=1)
        open_btn = gr.Button(t("runs.open"), elem_id="runs-open", scale=1)
        recipe_btn = gr.Button(t("runs.recipe"), elem_id="runs-recipe", scale=1)
        delete_btn = gr.Button(t("runs.delete"), variant="stop", elem_id="runs-delete", scale=1)
    recipe_file = gr.File(label=t("runs.recipe_file"), visible=False)
    with gr.Row(visible=False) as confirm_row:
        confirm_md = gr.Markdown("", elem_id="runs-confirm-text")
        confirm_btn = gr.Button(t("runs.confirm"), variant="stop", elem_id="runs-confirm", scale=0)
        cancel_btn = gr.Button(t("runs.cancel"), elem_id="runs-cancel", scale=0)
    details = gr.Markdown("", elem_id="runs-details")

    def refresh(current_selected=None, current_compare=None, request: gr.Request = None):
        lang = lang_of(request)
        root = ctx.listing_dir(request)
        rows, ids = run_table(root, lang) if root is not None else ([], [])
        keep = [r for r in (current_compare or []) if r in ids] or ids[:3]
        sel = current_selected if current_selected in ids else (ids[0] if ids else None)
        # the headers go with the rows, in the visitor's language (a handler's value carries its
        # headers, and the page translates no i18n key inside a value)
        table_value = {"data": rows, "headers": [tr(lang, k) for k in COLUMN_KEYS]}
        return table_value, gr.CheckboxGroup(choices=ids, value=keep), gr.Dropdown(choices=ids, value=sel)

    @engine_errors
    def plot(chosen, which, request: gr.Request):
        chosen = [ctx.run_dir(request, c).name for c in (chosen or [])]
        # A colour per run: a new colour map makes the chart rebuild its legend (it keeps the
        # categories of the first frame otherwise).
        colors = {run_id: PALETTE[i % len(PALETTE)] for i, run_id in enumerate(chosen)}
        return gr.LinePlot(value=loss_curves(ctx.runs_for(request), chosen, which), color_map=colors)

    def pick_row(evt: gr.SelectData, rows):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return rows.iloc[row, 0] if hasattr(rows, "iloc") else rows[row][0]
        except (IndexError, KeyError, TypeError):
            return gr.skip()

    def ask_delete(run_id, request: gr.Request = None):
        lang = lang_of(request)
        if not run_id:
            raise gr.Error(tr(lang, "runs.pick_delete"))
        return gr.Row(visible=True), tr(lang, "runs.ask_delete", run=escape_md(run_id))

    @engine_errors
    def delete(run_id, chosen, request: gr.Request):
        from engine import runs

        lang = lang_of(request)
        if not run_id:
            raise gr.Error(tr(lang, "runs.pick_delete"))
        run_dir = ctx.run_dir(request, run_id)
        status = runs.refresh_status(run_dir)
        if status.get("state") in ("running", "starting", "queued"):
            raise gr.Error(tr(lang, "runs.busy", run=run_id, state=state_text(lang, status.get("state"))))
        delete_run = getattr(runs, "delete_run", None)
        if delete_run is not None:
            delete_run(run_dir)
        else:
            shutil.rmtree(run_dir)
        from webui.export_tab import downloads_dir

        staged = downloads_dir(ctx, run_dir)
        if ctx.multi_user and staged.is_dir():  # its zips, built outside the runs directory
            shutil.rmtree(staged)
        gr.Info(tr(lang, "runs.deleted", run=run_id))
        return (gr.Row(visible=False), *refresh(None, [c for c in (chosen or []) if c != run_id], request))

    @engine_errors
    def resume(run_id, request: gr.Request):
        from engine import launch

        lang = lang_of(request)
        if not run_id:
            raise gr.Error(tr(lang, "runs.pick_resume"))
        run_dir = launch.resume(ctx.run_dir(request, run_id))
        gr.Info(tr(lang, "runs.resuming", run=run_id))
        return str(run_dir)

    @engine_errors
    def recipe(run_id, request: gr.Request):
        from engine.recipe import write_recipe
        from webui.export_tab import downloads_dir

        if not run_id:
            raise gr.Error(tr(lang_of(request), "runs.pick_first"))
        run_dir = ctx.run_dir(request, run_id)
        staged = downloads_dir(ctx, run_dir)
        staged.mkdir(parents=True, exist_ok=True)
        path = write_recipe(run_dir, staged / f"{run_dir.name}-recipe.zip")
        return gr.File(value=str(path), visible=True)

    recipe_btn.click(recipe, inputs=selected, outputs=recipe_file, api_name="run_recipe")
    refresh_outputs = [table, compare, selected]
    refresh_btn.click(
        refresh, inputs=[selected, compare], outputs=refresh_outputs, show_progress="hidden", api_name="list_runs"
    )
    gr.on(
        [compare.change, series.change],
        plot,
        inputs=[compare, series],
        outputs=curves,
        show_progress="hidden",
        api_name="loss_curves",
    )
    # UI only: its input's headers are i18n keys, which the API's description cannot hold
    table.select(pick_row, inputs=table, outputs=selected, show_progress="hidden", api_visibility="private")

    @engine_errors
    def details_of(run_id, request: gr.Request):
        lang = lang_of(request)
        if not run_id:
            return run_details(ctx.runs_dir, None, lang)
        run_dir = ctx.run_dir(request, run_id)
        return run_details(run_dir.parent, run_dir.name, lang)

    selected.change(details_of, inputs=selected, outputs=details, show_progress="hidden", api_name="run_details")
    delete_btn.click(ask_delete, inputs=selected, outputs=[confirm_row, confirm_md])
    cancel_btn.click(lambda: gr.Row(visible=False), outputs=confirm_row)
    confirm_btn.click(
        delete, inputs=[selected, compare], outputs=[confirm_row, *refresh_outputs], api_name="delete_run"
    )
    resumed = gr.State(None)  # the run directory just resumed (the app hands it to the Train tab)
    resume_dep = resume_btn.click(resume, inputs=selected, outputs=resumed, api_name="resume_run")

    def on_load(request: gr.Request):
        return (*refresh(None, None, request), gr.Radio(choices=series_choices(lang_of(request))))

    gr.on(triggers=None, fn=on_load, inputs=None, outputs=[*refresh_outputs, series], show_progress="hidden")
    return SimpleNamespace(
        table=table,
        selected=selected,
        open=open_btn,
        resume=resume_btn,
        resume_dep=resume_dep,
        resumed=resumed,
        refresh=refresh,
        refresh_inputs=[selected, compare],
        outputs=refresh_outputs,
    )


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "runs", ctx)


if __name__ == "__main__":
    launch_standalone(create)

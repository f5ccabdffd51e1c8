"""Train tab: model, method with a per-method comparison on this hardware, the hardware
recommendation with its reasons, typed hyperparameters, LoRA and DeepSpeed options, the
command that will run, Start/Stop, and live progress (bar, loss chart, log tail, failure
panel). Its texts come from the locale files (webui/locales): static ones as gr.I18n keys,
messages with numbers formatted on the server in the visitor's language (webui.i18n.tr).

Training runs in its own detached process (engine.launch); this tab only reads the run
directory. A per-user ``gr.State`` remembers which run the page watches and the metrics
reader's byte offset, so each tick reads only the new lines of metrics.jsonl, and the chart
is redrawn only when new points arrive. Reloading the page re-attaches to the active run.

Launch alone: ``python -m webui.train_tab``.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine import probe, runs
from engine.config import DataConfig, RunConfig
from webui.common import (
    AppContext,
    engine_errors,
    error_message,
    escape_md,
    fmt_duration,
    fmt_number,
    launch_standalone,
    plot_frame,
    state_name,
)
from webui.config_form import ConfigForm, FormValues, label_of
from webui.i18n import lang_of, reason, t, tr
from webui.links import DataChoice, dataset_summary, dataset_summary_for, standalone_tab

# The Method radio's choices: (label key, method); the frontend translates the labels.
METHOD_KEYS = [("train.method.lora", "lora"), ("train.method.qlora", "qlora"), ("train.method.dora", "dora")]
METHOD_KEYS.append(("train.method.full", "full"))
METHOD_CHOICES = [(str(t(key)), value) for key, value in METHOD_KEYS]
ACTIVE_STATES = runs.ACTIVE_STATES
LOG_LINES = 40

# What to do for each failure class the trainer reports (status.json "error_class",
# engine.runs.ERROR_CLASSES): the key of its advice.
FAILURE_ADVICE = {
    "out of memory": "train.advice.out_of_memory",
    "bad data": "train.advice.bad_data",
    "config error": "train.advice.config_error",
    "model not found": "train.advice.model_not_found",
    "killed": "train.advice.killed",
    "aborted": "train.advice.aborted",
}


@functools.lru_cache(maxsize=1)
def hardware_profile():
    """This machine's hardware (detected once per process)."""
    from engine import hardware

    return hardware.detect()


# --------------------------------------------------------------------------- config

# Where the form's sections go (config section -> accordion title key, open at first), in page order.
SECTION_TITLES = {
    "training": ("train.section.training", True),
    "method": ("train.section.method", False),
    "distributed": ("train.section.distributed", False),
    "model": ("train.section.model", False),
    "output": ("train.section.output", True),
}
# The number of examples estimates assume before a dataset is chosen.
ESTIMATE_EXAMPLES = 1000


def build_config(form: FormValues, dataset: DataChoice | None, runs_dir: Path, lang: str | None = None):
    """A RunConfig from the form, the dataset chosen on the Data tab (its data section, as
    chosen there) and where this user's runs live; raises ConfigError naming the field (the
    tab's own checks say why in ``lang``, the config's in English)."""
    from engine.config import ConfigError

    if not dataset:
        raise ConfigError("data.path", tr(lang, "train.no_dataset"))
    values = form.config_values()
    values.update({f"data.{name}": value for name, value in dataclasses.asdict(dataset.config).items()})
    values["output.runs_dir"] = str(runs_dir)
    stage = values.get("training.stage", "sft")
    if stage not in dataset.stages:
        raise ConfigError(
            "training.stage",
            tr(
                lang,
                "train.wrong_stage",
                name=dataset.name,
                stages=f" {tr(lang, 'train.or')} ".join(dataset.stages),
                stage=stage,
                first=dataset.stages[0],
            ),
        )
    return RunConfig().with_values(values)


def command_preview(form: FormValues, dataset: DataChoice | None, runs_dir: Path, lang: str | None = None) -> str:
    """The command line that Start would run (the run id is a placeholder until it starts)."""
    from engine import launch
    from engine.security import redact

    cfg = build_config(form, dataset, runs_dir, lang)
    run_dir = runs_dir / (cfg.output.run_id or "<run-id>")
    return redact(shlex.join(str(part) for part in launch.build_command(cfg, run_dir)))


# --------------------------------------------------------------------------- recommendation


def recommendation_for(model_ref: str, method: str | None, dataset: DataChoice | None):
    """The plan for a model on this machine, from its config alone (a catalog model's
    shipped shape: no download)."""
    from engine import hardware
    from engine.models import model_config

    shape = hardware.ModelShape.from_config(model_config(model_ref))
    n = dataset.train if dataset else ESTIMATE_EXAMPLES
    max_length = (dataset.config if dataset else DataConfig()).max_length
    mean = dataset.mean_tokens if dataset else None
    # preference data trains a preference stage (its first: dpo, or kto for unpaired data)
    stage = dataset.stages[0] if dataset else "sft"
    longest = dataset.longest_tokens if dataset else None
    return hardware.recommend(
        hardware_profile(), shape, method, n, max_length, mean, training_stage=stage, longest_tokens=longest
    )


@functools.lru_cache(maxsize=8)
def catalog_choices(lang: str | None = None) -> list[tuple[str, str]]:
    """The Hub models the Train tab offers (engine.models.CATALOG), each labelled with its
    size and what stands in its way here: a network, a token, this machine's memory (in ``lang``)."""
    from engine import hardware
    from engine.models import CATALOG, availability

    profile = hardware_profile()
    choices = []
    for entry in CATALOG:
        shape = hardware.ModelShape.from_config(entry.config())
        notes = [f"{shape.params / 1e9:.2f}B" if shape.params >= 0.995e9 else f"{shape.params / 1e6:.0f}M"]
        if entry.gated:
            notes.append(tr(lang, "train.catalog.gated"))
        problem = availability(entry.hub_id)
        if problem and "network" in problem:
            notes.append(tr(lang, "train.catalog.network"))
        if not hardware.recommend(profile, shape, "lora", ESTIMATE_EXAMPLES, DataConfig().max_length).fits("lora"):
            notes.append(tr(lang, "train.catalog.no_fit"))
        choices.append((f"{entry.label} ({', '.join(notes)})", entry.hub_id))
    return choices


TABLE_COLUMNS = ("method", "trainable", "weights", "grads", "optimizer", "activations", "peak", "time")


def comparison_markdown(rec, model_ref: str, dataset: DataChoice | None, lang: str | None = None) -> str:
    """The methods compared on this machine (engine.hardware.Recommendation.table_rows), in ``lang``."""
    from engine.hardware import fmt_bytes

    if dataset:
        basis = tr(lang, "train.basis_data", n=dataset.train)
    else:
        basis = tr(lang, "train.basis_none", n=ESTIMATE_EXAMPLES)
    head = tr(lang, "train.estimated", model=escape_md(model_ref), basis=basis, epochs=rec.num_epochs)
    rows = [
        "| " + " | ".join(tr(lang, f"train.col.{c}") for c in TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1),
    ]
    for r in rec.table_rows():
        cells = dict(r)
        if r["recommended"]:
            cells["method"] = f"{r['method']} {tr(lang, 'train.recommended')}"
        if not r["fits"]:
            cells["peak"] = f"{r['peak']} {tr(lang, 'train.no_fit')}"
        rows.append("| " + " | ".join(str(cells[c]) for c in TABLE_COLUMNS) + " |")
    if rec.reference_bytes():
        rows.append("\n" + tr(lang, "train.reference_copy", size=fmt_bytes(rec.reference_bytes())))
    return head + "\n\n" + "\n".join(rows)


def reasons_markdown(rec, lang: str | None = None) -> str:
    profile = hardware_profile()
    lines = [
        tr(lang, "train.hardware", summary=escape_md(reason(lang, profile.summary()))),
        "",
        tr(lang, "train.recommendation"),
        "",
    ]
    plan = {
        "precision": rec.precision,
        "method": rec.method,
        "batch_size": tr(lang, "train.batch_value", batch=rec.batch_size, accum=rec.gradient_accumulation_steps),
        "deepspeed": rec.deepspeed,
        "launcher": tr(lang, "train.launcher_value", launcher=rec.launcher, n=rec.num_processes),
        "gradient_checkpointing": tr(lang, "train.on" if rec.gradient_checkpointing else "train.off"),
    }
    for key, value in plan.items():
        why = escape_md(reason(lang, rec.reasons.get(key)))
        lines.append(f"- **{tr(lang, 'train.plan.' + key)}: {value}** - {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- progress


@dataclass
class Watch:
    """The run this page watches, and how far it has read (lives in a per-user gr.State)."""

    run_dir: str
    reader: Any = None
    points: list = field(default_factory=list)
    reward_points: list = field(default_factory=list)  # preference stages (engine.train.PREFERENCE_METRICS)
    last: dict = field(default_factory=dict)
    log_size: int = -1

    @classmethod
    def attach(cls, run_dir: str | Path) -> "Watch":
        from engine import runs

        return cls(run_dir=str(run_dir), reader=runs.MetricsReader(Path(run_dir)))

    def read(self) -> bool:
        """Read the new metric lines; True when there are new chart points."""
        new = self.reader.read_new()
        added = False
        for row in new:
            self.last.update({k: v for k, v in row.items() if v is not None})
            step = row.get("step")
            if step is None:
                continue
            if row.get("loss") is not None:
                self.points.append({"step": step, "loss": float(row["loss"]), "series": "train"})
                added = True
            if row.get("eval_loss") is not None:
                self.points.append({"step": step, "loss": float(row["eval_loss"]), "series": "eval"})
                added = True
            for key, series in REWARD_SERIES.items():
                if row.get(key) is not None:
                    self.reward_points.append({"step": step, "value": float(row[key]), "series": series})
                    added = True
        return added


def loss_frame(points: list):
    """Train and eval loss by step. An eval row without a value is always there: the chart
    fixes its colours from the first frame it draws (gradio 6.31), so 'eval' must be known
    before the first evaluation, or its points would never be drawn; a NaN is not drawn."""
    if not points:
        return None
    placeholder = {"step": points[0]["step"], "loss": float("nan"), "series": "eval"}
    return plot_frame([*points, placeholder], {"step": "int64", "loss": "float64", "series": "str"})


# metrics.jsonl keys drawn on the rewards chart, and their series names.
REWARD_SERIES = {
    "rewards_chosen": "chosen",
    "rewards_rejected": "rejected",
    "rewards_margins": "margin",
    "rewards_accuracies": "accuracy",
    "eval_rewards_margins": "eval margin",
    "eval_rewards_accuracies": "eval accuracy",
}
REWARD_COLORS = {
    "chosen": "#16a34a",
    "rejected": "#dc2626",
    "margin": "#6366f1",
    "accuracy": "#0ea5e9",
    "eval margin": "#f97316",
    "eval accuracy": "#a16207",
}


def reward_frame(points: list):
    """Rewards of the chosen and rejected answers, their margin and the reward accuracy by
    step (DPO, KTO, ORPO runs), with a NaN placeholder per series (see loss_frame)."""
    if not points:
        return None
    placeholders = [{"step": points[0]["step"], "value": float("nan"), "series": s} for s in REWARD_COLORS]
    return plot_frame([*points, *placeholders], {"step": "int64", "value": "float64", "series": "str"})


def _total_steps(status: dict, last: dict) -> int | None:
    for source in (last, status):
        for key in ("total_steps", "max_steps"):
            value = source.get(key)
            if isinstance(value, (int, float)) and value > 0:
                return int(value)
    return None


def progress_html(status: dict, last: dict, run_dir: str, lang: str | None = None) -> str:
    """A progress bar with step counts, ETA and the state of the run (in ``lang``)."""
    state = status.get("state", "unknown")
    run_id = Path(run_dir).name
    step = int(last.get("step") or status.get("step") or 0)
    total = _total_steps(status, last)
    if state == "completed":
        frac = 1.0
        if total:
            step = max(step, total)
    else:
        frac = min(1.0, step / total) if total else 0.0
    pct = int(round(frac * 100))
    parts = [f"<b>{escape_md(run_id)}</b> - {escape_md(state_name(state, lang))}"]
    if total:
        parts.append(tr(lang, "train.step_of", step=step, total=total, pct=pct))
    elif step:
        parts.append(tr(lang, "train.step", step=step))
    if state == "running" and status.get("stop_requested_at"):
        parts.append(tr(lang, "train.stopping"))
    elif state == "running":
        if last.get("eta_s") is not None:
            parts.append(tr(lang, "train.eta", eta=fmt_duration(last.get("eta_s"), lang)))
        if last.get("elapsed_s") is not None:
            parts.append(tr(lang, "train.elapsed", elapsed=fmt_duration(last.get("elapsed_s"), lang)))
    for key, text in (
        ("loss", "train.loss"),
        ("eval_loss", "train.eval_loss"),
        ("rewards_margins", "train.reward_margin"),
        ("rewards_accuracies", "train.reward_accuracy"),
    ):
        if last.get(key) is not None:
            parts.append(tr(lang, text, value=fmt_number(last.get(key))))
    if last.get("tokens_per_second"):
        parts.append(tr(lang, "train.tokens_per_s", value=fmt_number(last.get("tokens_per_second"), 3)))
    if state == "queued":
        parts.append(tr(lang, "train.waiting"))
    elif state == "created":
        parts.append(tr(lang, "train.starting"))
    return (
        f'<div class="tl-status" id="train-progress" data-state="{state}" data-percent="{pct}">'
        f"<div>{' &middot; '.join(parts)}</div>"
        f'<div class="tl-progress" role="progressbar" aria-valuenow="{pct}" aria-valuemin="0" aria-valuemax="100">'
        f'<div style="width:{pct}%"></div></div></div>'
    )


def failure_markdown(status: dict, lang: str | None = None) -> str:
    """The failure panel: error class, message and what to do ('' when nothing failed), in
    ``lang`` (the error itself as the trainer wrote it); secrets from the environment never
    reach the page (engine.security.redact)."""
    from engine.security import redact

    state = status.get("state")
    if state not in ("failed", "aborted"):
        return ""
    cls = status.get("error_class") or ("aborted" if state == "aborted" else "error")
    message = status.get("error") or status.get("message") or status.get("error_message") or ""
    advice = status.get("hint") or tr(lang, FAILURE_ADVICE.get(cls, "train.advice.other"))
    head = "train.stopped_head" if state == "aborted" else "train.failed_head"
    exit_code = status.get("exit_code")
    lines = [tr(lang, head, cls=escape_md(cls))]
    if status.get("log_tail") and state == "failed":
        message = message or status["log_tail"].strip().splitlines()[-1]
    if message:
        lines.append(f"**{escape_md(message)}**")
    if exit_code not in (None, 0):
        lines.append(tr(lang, "train.exit_code", code=exit_code))
    lines.append(tr(lang, "train.what_to_do", advice=advice))
    return redact("\n\n".join(lines))


def find_active_run(runs_dir: Path) -> str | None:
    """The running run, else the oldest queued one, else None."""
    from engine import runs

    if not runs_dir.is_dir():
        return None
    listed = runs.list_runs(runs_dir, probes=True)  # a probe being measured is followed too
    for wanted in ("running", "queued", "created"):
        for info in listed:
            if info.get("state") == wanted:
                return info["path"]
    return None


def read_log_tail(run_dir: str) -> str:
    from engine import runs
    from engine.security import redact

    return redact(runs.tail_log(Path(run_dir), LOG_LINES))


# --------------------------------------------------------------------------- shared-app checks


def demo_defaults(limits) -> tuple[int, int]:
    """(max_steps, max_length) the form starts with: the config defaults, clamped into a
    public demo's limits (DemoLimits.clamp)."""
    cfg = RunConfig()
    limits.clamp(cfg)
    return cfg.training.max_steps, cfg.data.max_length


def demo_model_choices(ctx: AppContext, limits) -> list[str]:
    """The models a demo lets people pick (all of the app's models when not a demo)."""
    choices = ctx.model_choices()
    if not limits.enabled:
        return choices
    allowed = set(limits.models) | set(limits.extra_models)
    return [m for m in choices if m in allowed] + [m for m in limits.extra_models if m not in choices] or choices


def check_run_allowed(cfg, dataset: DataChoice | None, limits, lang: str | None = None) -> None:
    """Refuse, with the message shown in the page, what this app may not run:
    trust_remote_code unless the operator allowed it (engine.security.check_remote_code),
    and in a public demo anything over DemoLimits (steps, cutoff, model, method, processes,
    records)."""
    from engine import security

    security.check_remote_code(cfg)
    limits.check(cfg)
    records = dataset.records if dataset else 0
    if limits.enabled and records > limits.max_records:
        raise security.UnsafeInputError(tr(lang, "train.demo_records", records=records, limit=limits.max_records))


def check_dataset_path(ctx: AppContext, request, dataset: DataChoice | None) -> None:
    """The dataset must be a sample or one of this user's uploads (on a shared app)."""
    from engine.security import owns

    if not dataset or not ctx.multi_user:
        return
    path = Path(dataset.config.path)
    if not (owns(ctx.samples_dir, path) or owns(ctx.runs_for(request), path)):
        lang = lang_of(request)
        raise gr.Error(tr(lang, "train.not_your_upload", name=path.name), title=tr(lang, "common.refused"))


# --------------------------------------------------------------------------- layout


def unfilled_question(dataset: DataChoice | None, lang: str | None = None) -> str | None:
    """What Start asks before training on data with placeholders nothing fills (None: no question)."""
    unfilled = dataset.placeholders if dataset else []
    if not unfilled:
        return None
    names = ", ".join("{{" + name + "}}" for name in unfilled)
    example = " ".join(n + "=..." for n in unfilled)
    return tr(lang, "train.unfilled", name=dataset.name, names=names, example=example)


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine.security import DemoLimits

    demo = DemoLimits.from_env()  # a public demo (TUNELAB_DEMO=1) limits steps, models and methods
    start_steps, _ = demo_defaults(demo)
    models = demo_model_choices(ctx, demo)
    form = ConfigForm("train")  # one widget per field of engine.config (webui.config_form)
    watch_state = gr.State(None)  # Watch of the run this page shows
    rec_state = gr.State(None)  # the last recommendation's config overrides

    dataset_md = gr.Markdown(t("links.no_dataset"), elem_id="train-dataset")

    def demo_note(lang: str | None = None) -> str:
        methods = ", ".join(demo.methods)
        return tr(lang, "train.demo", steps=demo.max_steps, max_length=demo.max_length, methods=methods)

    # a public demo's limits, in the visitor's language once the page loads
    demo_md = gr.Markdown(demo_note() if demo.enabled else "", visible=demo.enabled, elem_classes=["tl-note"])
    with gr.Row():
        with gr.Column(scale=3):
            model = form.add(
                "model",
                gr.Dropdown(
                    [(m, m) for m in models] + ([] if demo.enabled else catalog_choices()),
                    value=models[0],
                    allow_custom_value=not demo.enabled,
                    label=label_of(form.fields["model"]),
                    elem_id=form.elem_id("model"),
                    info=t("train.model_info"),
                ),
            )
            method = form.add(
                "method",
                gr.Radio(
                    [c for c in METHOD_CHOICES if not demo.enabled or c[1] in demo.methods],
                    value=form.default("method"),
                    label=label_of(form.fields["method"]),
                    elem_id=form.elem_id("method"),
                ),
            )
        with gr.Column(scale=2):
            apply_btn = gr.Button(t("train.apply"), elem_id="train-apply", variant="secondary")
            gr.Markdown(t("train.apply_info"))
    with gr.Accordion(t("train.plan_box"), open=True):
        comparison = gr.Markdown(elem_id="train-comparison")
        reasons = gr.Markdown(elem_id="train-reasons")

    # Every other field of the config, a section to an accordion; a section the config gains
    # later gets an accordion of its own, titled with its name.
    known = [section for section in SECTION_TITLES if section in form.sections()]
    for section in known + [section for section in form.sections() if section not in SECTION_TITLES]:
        key, is_open = SECTION_TITLES.get(section, (None, False))
        title = t(key) if key else section.replace("_", " ").capitalize()
        locked = demo.enabled and section == "distributed"  # a public demo runs one process
        with gr.Accordion(title, open=is_open) as box:
            form.render_section(section, overrides={"max_steps": {"value": start_steps}}, interactive=not locked)
        if section == "method":
            lora_box = box
    command = gr.Code(
        "",
        language="shell",
        label=t("train.command"),
        interactive=False,
        elem_id="train-command",
        lines=2,
    )
    with gr.Row():
        start_btn = gr.Button(t("train.start"), variant="primary", elem_id="train-start")
        probe_btn = gr.Button(t("train.probe"), elem_id="train-probe")
        stop_btn = gr.Button(t("train.stop"), variant="stop", elem_id="train-stop", interactive=False)
    gr.Markdown(t("train.probe_info"))
    probe_md = gr.Markdown("", elem_id="train-probe-result", visible=False)

    gr.Markdown(t("train.progress"))
    progress = gr.HTML(t("train.idle"), elem_id="train-progress-box")
    failure = gr.Markdown("", visible=False, elem_id="train-failure", elem_classes=["tl-fail"])
    with gr.Row():
        loss_plot = gr.LinePlot(
            loss_frame([]),
            x="step",
            y="loss",
            color="series",
            title=t("train.loss_title"),
            height=300,
            elem_id="train-loss",
            # gr.I18n does not reach a plot's axis titles: English here, the visitor's
            # language from the timer's first update.
            x_title=tr(None, "chart.step"),
            y_title=tr(None, "chart.loss"),
            color_map={"train": "#6366f1", "eval": "#f97316"},
        )
        # Preference stages: shown once the run logs rewards.
        reward_plot = gr.LinePlot(
            reward_frame([]),
            x="step",
            y="value",
            color="series",
            title=t("train.rewards_title"),
            height=300,
            elem_id="train-rewards",
            x_title=tr(None, "chart.step"),
            y_title=tr(None, "chart.reward_accuracy"),
            color_map=REWARD_COLORS,
            visible=False,
        )
    log_tail = gr.Code(
        "",
        language=None,
        label=t("train.log"),
        interactive=False,
        lines=10,
        max_lines=20,
        elem_id="train-log",
    )
    with gr.Row(visible=False) as after_row:
        open_playground = gr.Button(t("train.open_playground"), elem_id="train-open-playground")
        open_export = gr.Button(t("train.open_export"), elem_id="train-open-export")
    current_run = gr.State(None)  # run directory (str) this page watches, for the buttons above
    asked_state = gr.State(None)  # the question Start asked about this dataset, once answered by a second Start
    timer = gr.Timer(ctx.poll_seconds, active=False)

    form_inputs = form.inputs  # in FormValues.names() order

    # ---- handlers

    def update_command(request: gr.Request, dataset, *values):
        from engine.config import ConfigError

        lang = lang_of(request)
        try:
            runs_dir = ctx.listing_dir(request) or ctx.runs_dir
            return command_preview(FormValues.from_values(values), dataset, runs_dir, lang)
        except ConfigError as err:
            return tr(lang, "train.not_ready", error=error_message(err, lang))

    def update_plan(model_ref, method_v, dataset, request: gr.Request = None):
        from engine.models import ModelNotFoundError
        from engine.security import redact

        lang = lang_of(request)
        try:
            ctx.check_model(request, model_ref)
            rec = recommendation_for(model_ref, method_v, dataset)
        except (ModelNotFoundError, OSError, KeyError, ValueError, gr.Error) as err:
            why = redact(err.message) if isinstance(err, gr.Error) else error_message(err, lang)
            msg = tr(lang, "train.cannot_estimate", model=escape_md(model_ref), why=escape_md(why))
            return msg, msg, None
        from engine.models import availability

        needs = availability(model_ref)
        table = comparison_markdown(rec, model_ref, dataset, lang)
        if needs:
            table = tr(lang, "train.before_training", needs=escape_md(needs)) + f"\n\n{table}"
        return table, reasons_markdown(rec, lang), rec.config_overrides()

    def apply_recommendation(request: gr.Request, overrides, *values):
        """The plan applied through the config's own override path (RunConfig.with_overrides);
        only the widgets whose value changes are updated."""
        lang = lang_of(request)
        if not overrides:
            raise gr.Error(tr(lang, "train.no_recommendation"))
        before = FormValues.from_values(values).config()
        after = before.with_overrides(overrides)
        changed = form.labels(after, before, lang)
        gr.Info(tr(lang, "train.applied", fields=", ".join(changed)) if changed else tr(lang, "train.already"))
        return form.updates(after, than=before)

    progress_outputs = [
        progress,
        loss_plot,
        reward_plot,
        log_tail,
        failure,
        watch_state,
        timer,
        start_btn,
        stop_btn,
        current_run,
        after_row,
        probe_md,
    ]

    def render(watch: Watch, new_points: bool, first: bool = False, lang: str | None = None) -> dict:
        """``{widget: update}`` for progress_outputs (a widget left out keeps its value), in ``lang``."""
        from engine import runs

        status = runs.refresh_status(Path(watch.run_dir))
        state = status.get("state")
        active = state in ACTIVE_STATES
        log_path = Path(watch.run_dir) / "train.log"
        size = log_path.stat().st_size if log_path.exists() else 0
        log_value = read_log_tail(watch.run_dir) if (size != watch.log_size or first) else gr.skip()
        watch.log_size = size
        fail = failure_markdown(status, lang)
        probing = bool(status.get("probe"))
        measured = probe.read(watch.run_dir) if probing and state == "completed" else None
        updates = {
            progress: progress_html(status, watch.last, watch.run_dir, lang),
            log_tail: log_value,
            failure: gr.Markdown(fail, visible=bool(fail)),
            watch_state: watch,
            timer: gr.Timer(active=active),
            start_btn: gr.Button(interactive=True),
            stop_btn: gr.Button(interactive=active),
            current_run: watch.run_dir,
            after_row: gr.Row(visible=state == "completed" and not probing),
            probe_md: gr.Markdown(probe.table(measured) if measured else "", visible=bool(measured)),
        }
        if new_points or first:
            step = tr(lang, "chart.step")
            updates[loss_plot] = gr.LinePlot(loss_frame(watch.points), x_title=step, y_title=tr(lang, "chart.loss"))
            updates[reward_plot] = gr.LinePlot(
                reward_frame(watch.reward_points),
                visible=bool(watch.reward_points),
                x_title=step,
                y_title=tr(lang, "chart.reward_accuracy"),
            )
        return updates

    @engine_errors
    def start(request: gr.Request, dataset, *values):
        """Start (or queue) a run. ``values``: the form's fields in FormValues order, then the
        question Start asked last time, if any (the page passes it; other callers may not)."""
        return submit(request, dataset, values, probe=False)

    @engine_errors
    def measure(request: gr.Request, dataset, *values):
        """Start (or queue) a probe of the form's config (engine/probe.py); same values as start."""
        return submit(request, dataset, values, probe=True)

    def submit(request, dataset, values, probe: bool):
        from engine import launch, runs
        from engine.models import availability

        lang = lang_of(request)
        fields = len(FormValues.names())
        asked = values[fields] if len(values) > fields else None
        form_values = FormValues.from_values(values[:fields])
        ctx.check_model(request, form_values.model)
        problem = availability(form_values.model)
        if problem:  # before a run exists: a run never fails in the trainer for a model it cannot get
            raise gr.Error(problem, title=tr(lang, "train.model_unavailable"))
        question = unfilled_question(dataset, lang)
        if question and asked != question:  # ask once; the same Start again trains as it is
            gr.Warning(question, duration=None)
            return {asked_state: question}
        runs_dir = ctx.runs_for(request)
        check_dataset_path(ctx, request, dataset)
        cfg = build_config(form_values, dataset, runs_dir, lang)
        check_run_allowed(cfg, dataset, DemoLimits.from_env(), lang)
        running = find_active_run(runs_dir)
        run_dir = launch.submit(cfg, runs_dir, probe=probe)
        status = runs.read_status(Path(run_dir))
        what = tr(lang, "train.the_probe") if probe else Path(run_dir).name
        if status.get("state") == "queued":
            other = Path(running).name if running else tr(lang, "train.another_run")
            gr.Info(tr(lang, "train.queued", other=other, what=what))
        else:
            steps = probe.steps()
            gr.Info(tr(lang, "train.measuring", steps=steps) if probe else tr(lang, "train.started", what=what))
        watch = Watch.attach(run_dir)
        return {**render(watch, watch.read(), first=True, lang=lang), asked_state: None}

    @engine_errors
    def stop(watch: Watch | None, request: gr.Request = None):
        from engine import launch

        lang = lang_of(request)
        if watch is None:
            raise gr.Error(tr(lang, "train.nothing_to_stop"))
        launch.stop(Path(watch.run_dir))
        gr.Info(tr(lang, "train.stopping_run", name=Path(watch.run_dir).name))
        return render(watch, watch.read(), lang=lang)

    @engine_errors
    def tick(watch: Watch | None, request: gr.Request = None):
        if watch is None:
            return {timer: gr.Timer(active=False)}
        return render(watch, watch.read(), lang=lang_of(request))

    # ---- events
    plan_outputs = [comparison, reasons, rec_state]
    gr.on(
        [model.change, method.change, links.dataset.change],
        update_plan,
        inputs=[model, method, links.dataset],
        outputs=plan_outputs,
        show_progress="minimal",
    )
    gr.on(
        [w.change for w in form_inputs] + [links.dataset.change],
        update_command,
        inputs=[links.dataset, *form_inputs],
        outputs=command,
        show_progress="hidden",
    )
    links.dataset.change(dataset_summary_for, inputs=links.dataset, outputs=dataset_md, show_progress="hidden")
    apply_btn.click(apply_recommendation, inputs=[rec_state, *form_inputs], outputs=form_inputs)
    start_btn.click(
        start,
        inputs=[links.dataset, *form_inputs, asked_state],
        outputs=[*progress_outputs, asked_state],
        concurrency_limit=1,
        concurrency_id="train-start",
    )
    probe_btn.click(
        measure,
        inputs=[links.dataset, *form_inputs, asked_state],
        outputs=[*progress_outputs, asked_state],
        concurrency_limit=1,
        concurrency_id="train-start",
    )
    stop_btn.click(stop, inputs=watch_state, outputs=progress_outputs)
    timer.tick(tick, inputs=watch_state, outputs=progress_outputs, show_progress="hidden", concurrency_limit=None)
    method.change(lambda m: gr.Accordion(open=m != "full"), inputs=method, outputs=lora_box, show_progress="hidden")

    defaults = FormValues(model=models[0], max_steps=start_steps)

    def showing(request, values: FormValues, dataset: DataChoice | None) -> dict:
        """The plan and the command for a form and dataset, and the texts written on the
        server (the dataset line, the model list, a demo's limits) in the visitor's language."""
        lang = lang_of(request)
        names = FormValues.names()
        comparison_v, reasons_v, overrides = update_plan(values.model, values.method, dataset, request)
        cmd = update_command(request, dataset, *[getattr(values, n) for n in names])
        choices = [(m, m) for m in models] + ([] if demo.enabled else catalog_choices(lang))
        return {
            comparison: comparison_v,
            reasons: reasons_v,
            rec_state: overrides,
            command: cmd,
            dataset_md: dataset_summary(dataset, lang),
            model: gr.Dropdown(choices=choices, value=values.model),
            demo_md: demo_note(lang) if demo.enabled else gr.skip(),
        }

    @engine_errors
    def on_load(request: gr.Request):
        """A page (re)loads. With a run training or queued, it shows that run: its progress,
        and the form, the dataset, the plan and the estimates of its own config (training
        survives reloads and other devices). Otherwise the plan for the default form."""
        from engine.runs import CONFIG_FILE

        root = ctx.listing_dir(request)
        run_dir = find_active_run(root) if root is not None else None
        if run_dir is None:
            return {**showing(request, defaults, None), timer: gr.Timer(active=False)}
        cfg = RunConfig.load(Path(run_dir) / CONFIG_FILE)
        choice = DataChoice.from_run(run_dir)
        watch = Watch.attach(run_dir)
        return {
            **render(watch, watch.read(), first=True, lang=lang_of(request)),
            **form.updates(cfg),
            links.dataset: choice,
            **showing(request, FormValues.from_config(cfg), choice),
        }

    # triggers=None with no inputs: runs when the page loads.
    gr.on(
        triggers=None,
        fn=on_load,
        inputs=None,
        outputs=[*progress_outputs, *form_inputs, links.dataset, dataset_md, demo_md, *plan_outputs, command],
        show_progress="hidden",
    )

    @engine_errors
    def attach(run_dir, request: gr.Request = None):
        """Watch a given run (the Runs tab's resume uses this)."""
        watch = Watch.attach(run_dir)
        return render(watch, watch.read(), first=True, lang=lang_of(request))

    return SimpleNamespace(
        model=model,
        method=method,
        start=start_btn,
        stop=stop_btn,
        progress=progress,
        watch=watch_state,
        timer=timer,
        progress_outputs=progress_outputs,
        attach=attach,
        run_dir=current_run,
        open_playground=open_playground,
        open_export=open_export,
    )


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "train", ctx)


if __name__ == "__main__":
    launch_standalone(create)

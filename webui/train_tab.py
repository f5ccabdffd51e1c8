"""Train tab: model, method with a per-method comparison on this hardware, the hardware
recommendation with its reasons, typed hyperparameters, LoRA and DeepSpeed options, the
command that will run, Start/Stop, and live progress (bar, loss chart, log tail, failure
panel).

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
    escape_md,
    fmt_duration,
    fmt_number,
    launch_standalone,
    plot_frame,
)
from webui.config_form import ConfigForm, FormValues
from webui.links import DataChoice, dataset_summary, standalone_tab

METHOD_CHOICES = [("LoRA", "lora"), ("QLoRA (4-bit base)", "qlora"), ("DoRA", "dora"), ("Full fine-tune", "full")]
ACTIVE_STATES = runs.ACTIVE_STATES
LOG_LINES = 40

# What to do for each failure class the trainer reports (status.json "error_class",
# engine.runs.ERROR_CLASSES).
FAILURE_ADVICE = {
    "out of memory": "The model did not fit. Lower the batch size (raise gradient accumulation to keep the "
    "effective batch), lower the cutoff length, turn on gradient checkpointing, or use QLoRA.",
    "bad data": "The dataset has a problem: open the Data tab, fix the listed lines, or choose to skip bad records.",
    "config error": "A setting is invalid: the message names the field; correct it and start again.",
    "model not found": "The model could not be loaded: use the embedded model or an existing local directory "
    "(the Hub is not reachable without a network).",
    "killed": "The process was killed (often the system ran out of memory, or the machine restarted): lower the "
    "batch size or cutoff length, then resume the run from the Runs tab.",
    "aborted": "The run was stopped. Resume it from its last checkpoint on the Runs tab, or start a new one.",
}


@functools.lru_cache(maxsize=1)
def hardware_profile():
    """This machine's hardware (detected once per process)."""
    from engine import hardware

    return hardware.detect()


# --------------------------------------------------------------------------- config

# Where the form's sections go (config section -> accordion title, open at first), in page order.
SECTION_TITLES = {
    "training": ("Hyperparameters", True),
    "method": ("LoRA options", False),
    "distributed": ("Distributed (DeepSpeed)", False),
    "model": ("Model code", False),
    "output": ("Run", True),
}
# The number of examples estimates assume before a dataset is chosen.
ESTIMATE_EXAMPLES = 1000


def build_config(form: FormValues, dataset: DataChoice | None, runs_dir: Path):
    """A RunConfig from the form, the dataset chosen on the Data tab (its data section, as
    chosen there) and where this user's runs live; raises ConfigError naming the field."""
    from engine.config import ConfigError

    if not dataset:
        raise ConfigError("data.path", "no dataset chosen: load one on the Data tab first")
    values = form.config_values()
    values.update({f"data.{name}": value for name, value in dataclasses.asdict(dataset.config).items()})
    values["output.runs_dir"] = str(runs_dir)
    stage = values.get("training.stage", "sft")
    if stage not in dataset.stages:
        raise ConfigError(
            "training.stage",
            f"{dataset.name} trains stage {' or '.join(dataset.stages)}, not {stage}: pick "
            f"{dataset.stages[0]} as the Stage, or another dataset on the Data tab",
        )
    return RunConfig().with_values(values)


def command_preview(form: FormValues, dataset: DataChoice | None, runs_dir: Path) -> str:
    """The command line that Start would run (the run id is a placeholder until it starts)."""
    from engine import launch
    from engine.security import redact

    cfg = build_config(form, dataset, runs_dir)
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
    return hardware.recommend(hardware_profile(), shape, method, n, max_length, mean, training_stage=stage)


def catalog_choices() -> list[tuple[str, str]]:
    """The Hub models the Train tab offers (engine.models.CATALOG), each labelled with its
    size and what stands in its way here: a network, a token, this machine's memory."""
    from engine import hardware
    from engine.models import CATALOG, availability

    profile = hardware_profile()
    choices = []
    for entry in CATALOG:
        shape = hardware.ModelShape.from_config(entry.config())
        notes = [f"{shape.params / 1e9:.2f}B" if shape.params >= 0.995e9 else f"{shape.params / 1e6:.0f}M"]
        if entry.gated:
            notes.append("gated: token + licence")
        problem = availability(entry.hub_id)
        if problem and "network" in problem:
            notes.append("needs a network")
        if not hardware.recommend(profile, shape, "lora", ESTIMATE_EXAMPLES, DataConfig().max_length).fits("lora"):
            notes.append("does not fit this machine")
        choices.append((f"{entry.label} ({', '.join(notes)})", entry.hub_id))
    return choices


def comparison_markdown(rec, model_ref: str, dataset: DataChoice | None) -> str:
    basis = f"{dataset.train} training examples" if dataset else f"{ESTIMATE_EXAMPLES} examples (no dataset chosen yet)"
    epochs = f"the plan's {rec.num_epochs:g} epoch{'' if rec.num_epochs == 1 else 's'}"
    return f"Estimated for **{escape_md(model_ref)}** on this machine, {basis}, {epochs}:\n\n" + rec.table()


def reasons_markdown(rec) -> str:
    profile = hardware_profile()
    lines = [f"**Hardware:** {escape_md(profile.summary())}", "", "**Recommendation**", ""]
    plan = {
        "precision": rec.precision,
        "method": rec.method,
        "batch_size": f"{rec.batch_size} x {rec.gradient_accumulation_steps} accumulation",
        "deepspeed": rec.deepspeed,
        "launcher": f"{rec.launcher} ({rec.num_processes} process(es))",
        "gradient_checkpointing": "on" if rec.gradient_checkpointing else "off",
    }
    for key, value in plan.items():
        lines.append(f"- **{key.replace('_', ' ')}: {value}** - {escape_md(rec.reasons.get(key, ''))}")
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


def progress_html(status: dict, last: dict, run_dir: str) -> str:
    """A progress bar with step counts, ETA and the state of the run."""
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
    parts = [f"<b>{escape_md(run_id)}</b> - {escape_md(state)}"]
    if total:
        parts.append(f"step {step} / {total} ({pct}%)")
    elif step:
        parts.append(f"step {step}")
    if state == "running" and status.get("stop_requested_at"):
        parts.append("stopping: saving a checkpoint")
    elif state == "running":
        if last.get("eta_s") is not None:
            parts.append(f"ETA {fmt_duration(last.get('eta_s'))}")
        if last.get("elapsed_s") is not None:
            parts.append(f"elapsed {fmt_duration(last.get('elapsed_s'))}")
    if last.get("loss") is not None:
        parts.append(f"loss {fmt_number(last.get('loss'))}")
    if last.get("eval_loss") is not None:
        parts.append(f"eval loss {fmt_number(last.get('eval_loss'))}")
    if last.get("rewards_margins") is not None:
        parts.append(f"reward margin {fmt_number(last.get('rewards_margins'))}")
    if last.get("rewards_accuracies") is not None:
        parts.append(f"reward accuracy {fmt_number(last.get('rewards_accuracies'))}")
    if last.get("tokens_per_second"):
        parts.append(f"{fmt_number(last.get('tokens_per_second'), 3)} tokens/s")
    if state == "queued":
        parts.append("waiting for the running job to finish")
    elif state == "created":
        parts.append("starting")
    return (
        f'<div class="tl-status" id="train-progress" data-state="{state}" data-percent="{pct}">'
        f"<div>{' &middot; '.join(parts)}</div>"
        f'<div class="tl-progress" role="progressbar" aria-valuenow="{pct}" aria-valuemin="0" aria-valuemax="100">'
        f'<div style="width:{pct}%"></div></div></div>'
    )


def failure_markdown(status: dict) -> str:
    """The failure panel: error class, message and what to do ('' when nothing failed);
    secrets from the environment never reach the page (engine.security.redact)."""
    from engine.security import redact

    state = status.get("state")
    if state not in ("failed", "aborted"):
        return ""
    cls = status.get("error_class") or ("aborted" if state == "aborted" else "error")
    message = status.get("error") or status.get("message") or status.get("error_message") or ""
    advice = (
        status.get("hint")
        or FAILURE_ADVICE.get(cls)
        or ("Read the log tail below for the cause; fix it and start again (the run directory keeps everything).")
    )
    head = "Training stopped" if state == "aborted" else "Training failed"
    exit_code = status.get("exit_code")
    lines = [f"### {head}: {escape_md(cls)}"]
    if status.get("log_tail") and state == "failed":
        message = message or status["log_tail"].strip().splitlines()[-1]
    if message:
        lines.append(f"**{escape_md(message)}**")
    if exit_code not in (None, 0):
        lines.append(f"Exit code {exit_code}.")
    lines.append(f"What to do: {advice}")
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


def check_run_allowed(cfg, dataset: DataChoice | None, limits) -> None:
    """Refuse, with the message shown in the page, what this app may not run:
    trust_remote_code unless the operator allowed it (engine.security.check_remote_code),
    and in a public demo anything over DemoLimits (steps, cutoff, model, method, processes,
    records)."""
    from engine import security

    security.check_remote_code(cfg)
    limits.check(cfg)
    records = dataset.records if dataset else 0
    if limits.enabled and records > limits.max_records:
        raise security.UnsafeInputError(
            f"This is a demo with limits: the dataset has {records} usable records (at most {limits.max_records}); "
            "upload a smaller file."
        )


def check_dataset_path(ctx: AppContext, request, dataset: DataChoice | None) -> None:
    """The dataset must be a sample or one of this user's uploads (on a shared app)."""
    from engine.security import owns

    if not dataset or not ctx.multi_user:
        return
    path = Path(dataset.config.path)
    if not (owns(ctx.samples_dir, path) or owns(ctx.runs_for(request), path)):
        raise gr.Error(
            f"The dataset {path.name!r} is not one of your uploads: load it again on the Data tab.", title="Refused"
        )


# --------------------------------------------------------------------------- layout


def unfilled_question(dataset: DataChoice | None) -> str | None:
    """What Start asks before training on data with placeholders nothing fills (None: no question)."""
    unfilled = dataset.placeholders if dataset else []
    if not unfilled:
        return None
    names = ", ".join("{{" + name + "}}" for name in unfilled)
    return (
        f"{dataset.name} holds placeholders that nothing fills: {names}. The model would "
        f"learn them as they are. Fill them on the Data tab (Fill placeholders, e.g. "
        f"{' '.join(n + '=...' for n in unfilled)}) and inspect again, or press Start again to train with them."
    )


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine.security import DemoLimits

    demo = DemoLimits.from_env()  # a public demo (TUNELAB_DEMO=1) limits steps, models and methods
    start_steps, _ = demo_defaults(demo)
    models = demo_model_choices(ctx, demo)
    form = ConfigForm("train")  # one widget per field of engine.config (webui.config_form)
    watch_state = gr.State(None)  # Watch of the run this page shows
    rec_state = gr.State(None)  # the last recommendation's config overrides

    dataset_md = gr.Markdown(dataset_summary(None), elem_id="train-dataset")
    if demo.enabled:
        gr.Markdown(
            f"This is a public demo: at most {demo.max_steps} steps, cutoff {demo.max_length} tokens, "
            f"methods {', '.join(demo.methods)}, one process.",
            elem_classes=["tl-note"],
        )
    with gr.Row():
        with gr.Column(scale=3):
            model = form.add(
                "model",
                gr.Dropdown(
                    [(m, m) for m in models] + ([] if demo.enabled else catalog_choices()),
                    value=models[0],
                    allow_custom_value=not demo.enabled,
                    label=form.fields["model"].label,
                    elem_id=form.elem_id("model"),
                    info="The embedded SmolLM2-135M-Instruct, a listed Hub model (size and what it "
                    "needs shown; estimates below), a local directory, or a Hub id (org/name)",
                ),
            )
            method = form.add(
                "method",
                gr.Radio(
                    [c for c in METHOD_CHOICES if not demo.enabled or c[1] in demo.methods],
                    value=form.default("method"),
                    label=form.fields["method"].label,
                    elem_id=form.elem_id("method"),
                ),
            )
        with gr.Column(scale=2):
            apply_btn = gr.Button("Apply recommendation", elem_id="train-apply", variant="secondary")
            gr.Markdown(
                "Sets precision, method, batch size, accumulation, checkpointing, DeepSpeed, epochs and "
                "learning rate to the plan below."
            )
    with gr.Accordion("This model on this hardware: methods compared, and the recommendation", open=True):
        comparison = gr.Markdown(elem_id="train-comparison")
        reasons = gr.Markdown(elem_id="train-reasons")

    # Every other field of the config, a section to an accordion; a section the config gains
    # later gets an accordion of its own, titled with its name.
    known = [section for section in SECTION_TITLES if section in form.sections()]
    for section in known + [section for section in form.sections() if section not in SECTION_TITLES]:
        title, is_open = SECTION_TITLES.get(section, (section.replace("_", " ").capitalize(), False))
        locked = demo.enabled and section == "distributed"  # a public demo runs one process
        with gr.Accordion(title, open=is_open) as box:
            form.render_section(section, overrides={"max_steps": {"value": start_steps}}, interactive=not locked)
        if section == "method":
            lora_box = box
    command = gr.Code(
        "",
        language="shell",
        label="Command that will run (copy it to run on a cluster)",
        interactive=False,
        elem_id="train-command",
        lines=2,
    )
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
        probe_btn = gr.Button("Measure first", elem_id="train-probe")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop", interactive=False)
    gr.Markdown(
        "**Measure first** runs a few steps of this config on the longest examples (in the training queue) and "
        "shows the measured peak memory and the whole run's time beside the estimates above."
    )
    probe_md = gr.Markdown("", elem_id="train-probe-result", visible=False)

    gr.Markdown("#### Progress")
    progress = gr.HTML(
        '<div class="tl-status" id="train-progress" data-state="idle">No training yet.</div>',
        elem_id="train-progress-box",
    )
    failure = gr.Markdown("", visible=False, elem_id="train-failure", elem_classes=["tl-fail"])
    with gr.Row():
        loss_plot = gr.LinePlot(
            loss_frame([]),
            x="step",
            y="loss",
            color="series",
            title="Loss",
            height=300,
            elem_id="train-loss",
            x_title="step",
            y_title="loss",
            color_map={"train": "#6366f1", "eval": "#f97316"},
        )
        # Preference stages: shown once the run logs rewards.
        reward_plot = gr.LinePlot(
            reward_frame([]),
            x="step",
            y="value",
            color="series",
            title="Rewards (preference stages)",
            height=300,
            elem_id="train-rewards",
            x_title="step",
            y_title="reward / accuracy",
            color_map=REWARD_COLORS,
            visible=False,
        )
    log_tail = gr.Code(
        "",
        language=None,
        label=f"Log (last {LOG_LINES} lines)",
        interactive=False,
        lines=10,
        max_lines=20,
        elem_id="train-log",
    )
    with gr.Row(visible=False) as after_row:
        open_playground = gr.Button("Chat with it in the Playground", elem_id="train-open-playground")
        open_export = gr.Button("Export it", elem_id="train-open-export")
    current_run = gr.State(None)  # run directory (str) this page watches, for the buttons above
    asked_state = gr.State(None)  # the question Start asked about this dataset, once answered by a second Start
    timer = gr.Timer(ctx.poll_seconds, active=False)

    form_inputs = form.inputs  # in FormValues.names() order

    # ---- handlers

    def update_command(request: gr.Request, dataset, *values):
        from engine.config import ConfigError

        try:
            return command_preview(FormValues.from_values(values), dataset, ctx.listing_dir(request) or ctx.runs_dir)
        except ConfigError as err:
            return f"# not ready: {err}"

    def update_plan(model_ref, method_v, dataset, request: gr.Request = None):
        from engine.models import ModelNotFoundError
        from engine.security import redact

        try:
            ctx.check_model(request, model_ref)
            rec = recommendation_for(model_ref, method_v, dataset)
        except (ModelNotFoundError, OSError, KeyError, ValueError, gr.Error) as err:
            why = err.message if isinstance(err, gr.Error) else str(err)
            msg = f"Cannot estimate for {escape_md(model_ref)}: {escape_md(redact(why))}"
            return msg, msg, None
        from engine.models import availability

        needs = availability(model_ref)
        table = comparison_markdown(rec, model_ref, dataset)
        if needs:
            table = f"> **Before training:** {escape_md(needs)}\n\n{table}"
        return table, reasons_markdown(rec), rec.config_overrides()

    def apply_recommendation(overrides, *values):
        """The plan applied through the config's own override path (RunConfig.with_overrides);
        only the widgets whose value changes are updated."""
        if not overrides:
            raise gr.Error("No recommendation yet: choose a model that can be estimated.")
        before = FormValues.from_values(values).config()
        after = before.with_overrides(overrides)
        changed = form.labels(after, before)
        gr.Info(f"Recommendation applied: {', '.join(changed)}." if changed else "The form already follows the plan.")
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

    def render(watch: Watch, new_points: bool, first: bool = False) -> dict:
        """``{widget: update}`` for progress_outputs (a widget left out keeps its value)."""
        from engine import runs

        status = runs.refresh_status(Path(watch.run_dir))
        state = status.get("state")
        active = state in ACTIVE_STATES
        log_path = Path(watch.run_dir) / "train.log"
        size = log_path.stat().st_size if log_path.exists() else 0
        log_value = read_log_tail(watch.run_dir) if (size != watch.log_size or first) else gr.skip()
        watch.log_size = size
        fail = failure_markdown(status)
        probing = bool(status.get("probe"))
        measured = probe.read(watch.run_dir) if probing and state == "completed" else None
        updates = {
            progress: progress_html(status, watch.last, watch.run_dir),
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
            updates[loss_plot] = loss_frame(watch.points)
            updates[reward_plot] = gr.LinePlot(reward_frame(watch.reward_points), visible=bool(watch.reward_points))
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

        fields = len(FormValues.names())
        asked = values[fields] if len(values) > fields else None
        form_values = FormValues.from_values(values[:fields])
        ctx.check_model(request, form_values.model)
        problem = availability(form_values.model)
        if problem:  # before a run exists: a run never fails in the trainer for a model it cannot get
            raise gr.Error(problem, title="Model not available")
        question = unfilled_question(dataset)
        if question and asked != question:  # ask once; the same Start again trains as it is
            gr.Warning(question, duration=None)
            return {asked_state: question}
        runs_dir = ctx.runs_for(request)
        check_dataset_path(ctx, request, dataset)
        cfg = build_config(form_values, dataset, runs_dir)
        check_run_allowed(cfg, dataset, DemoLimits.from_env())
        running = find_active_run(runs_dir)
        run_dir = launch.submit(cfg, runs_dir, probe=probe)
        status = runs.read_status(Path(run_dir))
        what = "the probe" if probe else Path(run_dir).name
        if status.get("state") == "queued":
            other = Path(running).name if running else "another run"
            gr.Info(f"Queued: {other} is training; {what} starts when it ends (one job at a time).")
        else:
            steps = probe.steps()
            gr.Info(f"Measuring {steps} steps of this config..." if probe else f"Started {what}.")
        watch = Watch.attach(run_dir)
        return {**render(watch, watch.read(), first=True), asked_state: None}

    @engine_errors
    def stop(watch: Watch | None):
        from engine import launch

        if watch is None:
            raise gr.Error("No training to stop.")
        launch.stop(Path(watch.run_dir))
        gr.Info(f"Stopping {Path(watch.run_dir).name}...")
        return render(watch, watch.read())

    @engine_errors
    def tick(watch: Watch | None):
        if watch is None:
            return {timer: gr.Timer(active=False)}
        return render(watch, watch.read())

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
    links.dataset.change(dataset_summary, inputs=links.dataset, outputs=dataset_md, show_progress="hidden")
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
        """The plan and the command for a form and dataset."""
        names = FormValues.names()
        comparison_v, reasons_v, overrides = update_plan(values.model, values.method, dataset, request)
        cmd = update_command(request, dataset, *[getattr(values, n) for n in names])
        return {comparison: comparison_v, reasons: reasons_v, rec_state: overrides, command: cmd}

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
            **render(watch, watch.read(), first=True),
            **form.updates(cfg),
            links.dataset: choice,
            dataset_md: dataset_summary(choice),
            **showing(request, FormValues.from_config(cfg), choice),
        }

    # triggers=None with no inputs: runs when the page loads.
    gr.on(
        triggers=None,
        fn=on_load,
        inputs=None,
        outputs=[*progress_outputs, *form_inputs, links.dataset, dataset_md, *plan_outputs, command],
        show_progress="hidden",
    )

    @engine_errors
    def attach(run_dir):
        """Watch a given run (the Runs tab's resume uses this)."""
        watch = Watch.attach(run_dir)
        return render(watch, watch.read(), first=True)

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

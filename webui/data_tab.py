"""Data tab: upload or pick a sample, see the detected format, a paged chat preview, the
statistics with a token-length histogram, the problems with their line numbers, and
choose what happens to bad records and how much is held out for validation.

Launch alone: ``python -m webui.data_tab``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine import security, uploads
from engine.config import DATA_FORMATS, DataConfig
from webui.chat_html import render_page
from webui.common import (
    AppContext,
    engine_errors,
    escape_md,
    launch_standalone,
    load_tokenizer,
    plot_frame,
)
from webui.i18n import lang_of, problem_message, problem_where, t, tr
from webui.links import DataChoice, standalone_tab

FORMATS = DATA_FORMATS
DATA_DEFAULTS = DataConfig()  # the form starts from engine.config's data section
PER_PAGE = 4
PROBLEM_COLUMN_KEYS = ["data.col.file", "data.col.where", "data.col.field", "data.col.problem"]
PROBLEM_COLUMNS = [tr("en", k) for k in PROBLEM_COLUMN_KEYS]


@dataclass
class Inspection:
    """What the Data tab shows for one dataset (from engine.data.inspect_file)."""

    path: Path
    name: str
    records: list
    problems: list
    report: dict  # inspect_file's report; empty when loading stopped
    stopped: str = ""  # the DataError message when loading stopped

    @property
    def format(self) -> str:
        return self.report.get("format", "")

    @property
    def split(self) -> dict:
        return self.report.get("split", {})


@dataclass
class Preview:
    """What one browser session keeps of a dataset, for paging the preview and the training
    text view: the first engine.security.PREVIEW_MAX_RECORDS of its ``total`` usable records."""

    records: list
    total: int

    @classmethod
    def of(cls, records: list) -> "Preview":
        return cls(list(records[: security.PREVIEW_MAX_RECORDS]), len(records))

    def page(self, page: int) -> tuple[str, str]:
        """The page's label and its records as HTML."""
        return page_label(page, len(self.records), self.total), render_page(self.records, page, PER_PAGE)


def parse_persona(text: str | None) -> dict[str, str]:
    """``name=Pip, author=tunelab`` (commas or new lines between pairs) as a dict; a pair
    without ``=`` is a gr.Error that names it."""
    persona = {}
    for item in (text or "").replace("\n", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise gr.Error(f"Fill placeholders: {item.strip()!r} is not of the form name=value (e.g. name=Pip).")
        persona[key.strip()] = value.strip()
    return persona


def inspect_dataset(
    path: Path,
    fmt: str,
    on_error: str,
    validation_split: float,
    max_length: int,
    tokenizer,
    persona: dict | None = None,
    max_records: int | None = None,
) -> Inspection:
    """One engine call: read, validate, fill placeholders, keep the first ``max_records``,
    measure and split (a DataError becomes a 'stopped' view)."""
    from engine import data

    try:
        result, report = data.inspect_file(
            str(path),
            format=fmt,
            on_error=on_error,
            max_length=int(max_length),
            tokenizer=tokenizer,
            validation_split=float(validation_split),
            persona=persona or None,
            max_records=max_records or None,
        )
    except data.DataError as err:
        return Inspection(path, path.name, [], list(err.problems), {}, stopped=str(err))
    return Inspection(path, path.name, result.records, list(result.problems), report)


def dataset_choice(
    ins: Inspection,
    on_error: str,
    validation_split,
    max_length,
    persona: dict | None = None,
    max_records: int | None = None,
):
    """What the Train tab needs to know about a usable dataset, a links.DataChoice (None if it
    cannot be trained). Raises ConfigError naming the field if a setting is out of range."""
    if ins.stopped or not ins.records:
        return None
    tokens = (ins.report.get("tokens") or {}).get("tokens") or {}
    defaults = DataConfig()
    config = DataConfig(
        path=str(ins.path),
        format=ins.format,
        on_error=on_error,
        validation_split=float(validation_split if validation_split is not None else defaults.validation_split),
        max_length=int(max_length or defaults.max_length),
        persona=dict(persona or {}),
        max_records=int(max_records) if max_records else None,
    )
    return DataChoice(
        config=config,
        name=ins.name,
        records=len(ins.records),
        train=ins.split.get("train", len(ins.records)),
        val=ins.split.get("validation", 0),
        mean_tokens=int(tokens["mean"]) if tokens.get("mean") else None,
        placeholders=list(ins.report.get("placeholders_unfilled", [])),
        stages=tuple(ins.report.get("stages") or ("sft",)),
    )


def where(problem, lang: str = "en") -> str:
    """'line 3', 'row 4', 'record 2 (line 10)' or 'whole file' (in ``lang``)."""
    return problem_where(lang, problem)


def problem_rows(problems: list, lang: str = "en") -> list[list]:
    """The problems table, in ``lang`` (the engine's messages translated by their code)."""
    from engine.security import redact

    return [[Path(str(p.file)).name, where(p, lang), p.field or "", redact(problem_message(lang, p))] for p in problems]


def summary_markdown(ins: Inspection) -> str:
    from engine.security import redact

    return redact(_summary_markdown(ins))


def _summary_markdown(ins: Inspection) -> str:
    if ins.stopped:
        first = ins.stopped.splitlines()[0]
        return (
            f"### Stopped: {escape_md(ins.name)}\n"
            f"{escape_md(first)}\n\n"
            "Fix the lines listed below, or choose **Skip bad records** to keep the good ones."
        )
    rep = ins.report
    how = "detected" if rep.get("format_detected", True) else "as given"
    split = ins.split
    lines = [
        f"### {escape_md(ins.name)}",
        f"Format: **{rep.get('format')}** ({how}) - **{rep.get('valid')}** usable record(s) of {rep.get('total')}, "
        f"{rep.get('skipped')} skipped",
        f"Split: **{split.get('train', 0)} train / {split.get('validation', 0)} validation** "
        f"(seed {split.get('seed', DATA_DEFAULTS.seed)})",
        f"Trains stage: **{', '.join(rep.get('stages') or ['sft'])}** (the Train tab's Stage)",
    ]
    counts = rep.get("counts") or {}
    if counts.get("messages"):
        lines.append(
            "Messages: "
            + ", ".join(f"{k} {v}" for k, v in counts["messages"].items())
            + f"; tool calls {counts.get('tool_calls', 0)}"
        )
    if rep.get("note"):
        lines.append(f"> {escape_md(rep['note'])}")
    for warning in rep.get("warnings", []):
        lines.append(f"> Warning: {escape_md(warning)}")
    return "\n\n".join(lines)


def stats_markdown(tokens: dict | None) -> str:
    """The token statistics of inspect_file's report as a table."""
    if not tokens:
        return ""
    t = tokens.get("tokens", {})
    turns = tokens.get("turns", {})
    rows = [
        ("Records measured", f"{tokens.get('records', 0):,}"),
        ("Turns per record (median / max)", f"{turns.get('median', 0):g} / {turns.get('max', 0)}"),
        (
            "Tokens per record (min / median / mean)",
            f"{t.get('min', 0)} / {t.get('median', 0):g} / {t.get('mean', 0):g}",
        ),
        ("Tokens per record (p95 / max)", f"{t.get('p95', 0):g} / {t.get('max', 0)}"),
        ("Tokens in all", f"{t.get('total', 0):,}"),
        (
            f"Over the cutoff ({tokens.get('max_length')})",
            f"{tokens.get('over_max_length', 0)} records, {tokens.get('truncated_tokens', 0):,} tokens cut",
        ),
        (
            "Trained (assistant) tokens",
            f"{tokens.get('assistant_tokens', 0):,} ({tokens.get('assistant_fraction', 0):.0%} of kept tokens)",
        ),
        ("Chat template", str(tokens.get("template", ""))),
    ]
    if tokens.get("no_assistant_after_truncation"):
        rows.append(("Left with no answer after truncation", str(tokens["no_assistant_after_truncation"])))
    if tokens.get("render_errors"):
        rows.append(("Render errors", f"{len(tokens['render_errors'])} (first: {tokens['render_errors'][0]})"))
    return "| statistic | value |\n|---|---:|\n" + "\n".join(f"| {escape_md(a)} | {escape_md(b)} |" for a, b in rows)


def histogram_frame(tokens: dict | None):
    """A DataFrame (bin label, count) of the token lengths, for a bar plot."""
    hist = (tokens or {}).get("histogram") or {}
    counts = hist.get("counts") or []
    edges = hist.get("edges") or []
    rows = [{"tokens": f"{edges[i]}-{edges[i + 1] - 1}", "records": counts[i]} for i in range(len(counts))]
    return plot_frame(rows, {"tokens": "str", "records": "int64"})


def learned_view(messages: list[dict], tokenizer, max_length: int) -> tuple[list[tuple[str, str | None]], str]:
    """One record as the model trains on it (engine.templates.preview), as the highlighted
    pieces of gr.HighlightedText ("trained", "cut off" or none) and a one-line summary."""
    from engine import templates

    template, source = templates.model_template(tokenizer)
    view = templates.preview(messages, tokenizer, template, max_length)
    pieces = [
        (piece, "cut off" if not kept else ("trained" if on else None))
        for piece, on, kept in zip(view["tokens"], view["trained"], view["kept"])
    ]
    cut = (
        f"; cut at {view['cut_at']} tokens: {view['trained_tokens_cut']} trained tokens lost"
        if view["cut_at"] is not None
        else ""
    )
    info = f"{view['length']} tokens, {view['trained_tokens']} trained, rendered by {view['template']} ({source}){cut}."
    return pieces, info


def page_label(page: int, n_records: int, total: int | None = None) -> str:
    """'Page 2 of 3 (10 records)'; with ``total`` over the previewed ``n_records``, says the
    preview holds only the first ones (engine.security.PREVIEW_MAX_RECORDS)."""
    pages = max(1, -(-n_records // PER_PAGE))
    if total is not None and total > n_records:
        return f"Page {page} of {pages} (the first {n_records} of {total} records; training uses all)"
    return f"Page {page} of {pages} ({n_records} records)"


def clamp_page(page, n_records: int) -> int:
    pages = max(1, -(-n_records // PER_PAGE))
    try:
        page = int(page)
    except (TypeError, ValueError):
        page = 1
    return min(max(1, page), pages)


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine.security import DemoLimits

    demo = DemoLimits.from_env()
    from webui.train_tab import demo_defaults

    _, start_max_length = demo_defaults(demo)
    samples = ctx.sample_datasets()
    # this user's usable records (a Preview: at most PREVIEW_MAX_RECORDS), for paging the preview; dropped when idle
    records_state = gr.State(Preview([], 0), time_to_live=security.SESSION_TTL_S)

    gr.Markdown(t("data.intro"))
    with gr.Row():
        with gr.Column(scale=3):
            upload = gr.File(
                label=t("data.file"),
                file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet"],
                file_count="single",
                elem_id="data-upload",
                height=140,
            )
        with gr.Column(scale=2):
            sample = gr.Dropdown(
                samples,
                value=None,
                label=t("data.sample"),
                elem_id="data-sample",
                info=t("data.sample_info"),
            )
            load_sample = gr.Button(t("data.load_sample"), elem_id="data-load-sample")
    with gr.Row():
        fmt = gr.Dropdown(
            list(FORMATS),
            value=DATA_DEFAULTS.format,
            label=t("data.format"),
            elem_id="data-format",
            info=t("data.format_info"),
        )
        on_error = gr.Radio(
            [("Skip bad records (listed below)", "skip"), ("Stop and list every problem", "stop")],
            value=DATA_DEFAULTS.on_error,
            label=t("data.on_error"),
            elem_id="data-on-error",
        )
        split = gr.Slider(
            0.0,
            0.5,
            value=DATA_DEFAULTS.validation_split,
            step=0.05,
            label=t("data.split"),
            info=t("data.split_info"),
            elem_id="data-split",
        )
        max_length = gr.Number(
            start_max_length,
            label=t("data.max_length"),
            precision=0,
            minimum=16,
            maximum=demo.max_length if demo.enabled else 131072,
            info=t("data.max_length_info"),
            elem_id="data-max-length",
        )
        tokenizer_model = gr.Dropdown(
            ctx.model_choices(),
            value=ctx.model_choices()[0],
            allow_custom_value=True,
            label=t("data.tokenizer"),
            elem_id="data-tokenizer",
        )
    with gr.Row():
        persona = gr.Textbox(
            label=t("data.persona"),
            placeholder=t("data.persona_placeholder"),
            elem_id="data-persona",
            info=t("data.persona_info"),
        )
        max_records = gr.Number(0, label=t("data.max_records"), precision=0, minimum=0, elem_id="data-max-records")
    inspect_btn = gr.Button(t("data.inspect"), variant="primary", elem_id="data-inspect")
    path_state = gr.State(None)  # stable path of the current file

    summary = gr.Markdown(elem_id="data-summary")
    with gr.Row(visible=False) as stats_row:
        with gr.Column(scale=1):
            stats_md = gr.Markdown(elem_id="data-stats")
        with gr.Column(scale=2):
            hist = gr.BarPlot(
                histogram_frame(None),
                x="tokens",
                y="records",
                sort=None,
                title="Tokens per record",
                height=260,
                x_title="tokens",
                y_title="records",
                elem_id="data-histogram",
            )
    problems = gr.Dataframe(
        headers=[t(k) for k in PROBLEM_COLUMN_KEYS],
        value=[],
        label=t("data.problems"),
        interactive=False,
        wrap=True,
        elem_id="data-problems",
        max_height=300,
        column_widths=["20%", "12%", "18%", "50%"],
    )
    gr.Markdown(t("data.preview"))
    with gr.Row(equal_height=True):
        prev_btn = gr.Button(t("data.previous"), size="sm", elem_id="data-prev", scale=0, min_width=110)
        page = gr.Number(
            1, show_label=False, precision=0, minimum=1, elem_id="data-page", scale=0, min_width=80, container=False
        )
        next_btn = gr.Button(t("data.next"), size="sm", elem_id="data-next", scale=0, min_width=110)
        page_info = gr.Markdown("", elem_id="data-page-info")
    preview = gr.HTML(t("data.preview_empty"), elem_id="data-preview")
    gr.Markdown(t("data.learns"))
    with gr.Row(equal_height=True):
        learn_index = gr.Number(
            1, label=t("data.record"), precision=0, minimum=1, elem_id="data-learn-index", scale=0, min_width=120
        )
        learn_btn = gr.Button(t("data.learn"), size="sm", elem_id="data-learn", scale=0, min_width=200)
        learn_info = gr.Markdown("", elem_id="data-learn-info")
    learned = gr.HighlightedText(
        label=t("data.learned"),
        combine_adjacent=True,
        show_legend=True,
        color_map={"trained": "green", "cut off": "gray"},
        elem_id="data-learned",
    )

    @engine_errors
    def on_upload(file, request: gr.Request):
        if not file:
            return None
        return str(uploads.stable_copy(file, uploads.uploads_dir(ctx.runs_for(request))))

    @engine_errors
    def on_sample(name):
        if not name:
            raise gr.Error("Choose a sample dataset first.")
        return str(ctx.sample_path(name))

    @engine_errors
    def run_inspect(
        path,
        fmt_v,
        on_error_v,
        split_v,
        max_len_v,
        tok_model,
        persona_v,
        max_records_v,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        from engine.security import owns

        lang = lang_of(request)
        if not path:
            raise gr.Error(tr(lang, "data.no_file"))
        if ctx.multi_user and not (owns(ctx.samples_dir, path) or owns(ctx.runs_for(request), path)):
            raise gr.Error("That file is not one of your uploads: upload it again.", title="Refused")
        tok_model = ctx.check_model(request, tok_model or ctx.model_choices()[0])
        progress(0.1, desc=tr(lang, "data.progress_tokenizer"))
        tokenizer = load_tokenizer(tok_model)
        progress(0.3, desc=tr(lang, "data.progress_reading"))
        filled = parse_persona(persona_v)
        limit = int(max_records_v or 0) or None
        ins = inspect_dataset(
            Path(path),
            fmt_v,
            on_error_v,
            split_v or 0.0,
            max_len_v or DATA_DEFAULTS.max_length,
            tokenizer,
            persona=filled,
            max_records=limit,
        )
        if ins.stopped:
            gr.Warning(tr(lang, "data.warn_stopped", name=ins.name, n=len(ins.problems)))
        elif ins.problems:
            gr.Warning(tr(lang, "data.warn_skipped", name=ins.name, n=ins.report.get("skipped")))
        tokens = ins.report.get("tokens")
        return (
            summary_markdown(ins),
            gr.Row(visible=bool(tokens)),
            stats_markdown(tokens),
            gr.BarPlot(
                value=(frame := histogram_frame(tokens)), sort=list(frame["tokens"]) if frame is not None else None
            ),
            gr.Dataframe(
                value=problem_rows(ins.problems, lang),
                headers=[tr(lang, k) for k in PROBLEM_COLUMN_KEYS],
                label=tr(lang, "data.problems_count", n=len(ins.problems))
                if ins.problems
                else tr(lang, "data.problems_none"),
            ),
            (kept := Preview.of(ins.records)),
            1,
            *kept.page(1),
            dataset_choice(ins, on_error_v, split_v, max_len_v, filled, limit),
        )

    @engine_errors
    def show_learned(kept: Preview, index, tok_model, max_len_v, request: gr.Request):
        records = kept.records if kept else []
        if not records:
            raise gr.Error("Load a dataset first.")
        index = int(index or 1)
        if not 1 <= index <= len(records):
            held = f"the preview holds the first {len(records)} of {kept.total}" if kept.total > len(records) else ""
            raise gr.Error(
                f"Record {index}: {held or f'the dataset has {len(records)}'} usable records (1 to {len(records)})."
            )
        tokenizer = load_tokenizer(ctx.check_model(request, tok_model or ctx.model_choices()[0]))
        pieces, info = learned_view(records[index - 1], tokenizer, int(max_len_v or DATA_DEFAULTS.max_length))
        return pieces, f"Record {index} of {kept.total}: {info}"

    def show_page(kept: Preview, page_v, delta=0):
        kept = kept or Preview([], 0)
        p = clamp_page((page_v or 1) + delta, len(kept.records))
        return p, *kept.page(p)

    inspect_inputs = [path_state, fmt, on_error, split, max_length, tokenizer_model, persona, max_records]
    inspect_outputs = [
        summary,
        stats_row,
        stats_md,
        hist,
        problems,
        records_state,
        page,
        page_info,
        preview,
        links.dataset,
    ]
    upload.upload(on_upload, inputs=upload, outputs=path_state, api_name="upload").success(
        run_inspect, inputs=inspect_inputs, outputs=inspect_outputs
    )
    load_sample.click(on_sample, inputs=sample, outputs=path_state, api_name="load_sample").success(
        run_inspect, inputs=inspect_inputs, outputs=inspect_outputs
    )
    inspect_btn.click(run_inspect, inputs=inspect_inputs, outputs=inspect_outputs)
    for widget in (fmt, on_error):
        widget.input(run_inspect, inputs=inspect_inputs, outputs=inspect_outputs)
    split.release(run_inspect, inputs=inspect_inputs, outputs=inspect_outputs)
    for widget in (max_length, persona, max_records):
        widget.submit(run_inspect, inputs=inspect_inputs, outputs=inspect_outputs)
    prev_btn.click(
        lambda r, p: show_page(r, p, -1),
        inputs=[records_state, page],
        outputs=[page, page_info, preview],
        show_progress="hidden",
    )
    next_btn.click(
        lambda r, p: show_page(r, p, +1),
        inputs=[records_state, page],
        outputs=[page, page_info, preview],
        show_progress="hidden",
    )
    page.submit(show_page, inputs=[records_state, page], outputs=[page, page_info, preview], show_progress="hidden")
    learn_inputs = [records_state, learn_index, tokenizer_model, max_length]
    learn_btn.click(show_learned, inputs=learn_inputs, outputs=[learned, learn_info])
    learn_index.submit(show_learned, inputs=learn_inputs, outputs=[learned, learn_info])
    return SimpleNamespace(
        upload=upload, sample=sample, summary=summary, problems=problems, preview=preview, learned=learned
    )


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "data", ctx)


if __name__ == "__main__":
    launch_standalone(create)

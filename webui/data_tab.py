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

    def page(self, page: int, lang: str | None = None) -> tuple[str, str]:
        """The page's label (in ``lang``) and its records as HTML."""
        return page_label(page, len(self.records), self.total, lang), render_page(self.records, page, PER_PAGE, lang)


def parse_persona(text: str | None, lang: str | None = None) -> dict[str, str]:
    """``name=Pip, author=tunelab`` (commas or new lines between pairs) as a dict; a pair
    without ``=`` is a gr.Error that names it (in ``lang``)."""
    persona = {}
    for item in (text or "").replace("\n", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise gr.Error(tr(lang, "data.bad_persona", item=item.strip()))
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
        longest_tokens=int(tokens["max"]) if tokens.get("max") else None,
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


def summary_markdown(ins: Inspection, lang: str | None = None) -> str:
    from engine.security import redact

    return redact(_summary_markdown(ins, lang))


def _summary_markdown(ins: Inspection, lang: str | None = None) -> str:
    """What was read, in ``lang`` (the engine's notes and warnings as it wrote them)."""
    if ins.stopped:
        first = ins.stopped.splitlines()[0]
        return (
            tr(lang, "data.stopped", name=escape_md(ins.name))
            + f"\n{escape_md(first)}\n\n"
            + tr(lang, "data.stopped_fix")
        )
    rep = ins.report
    how = tr(lang, "data.detected" if rep.get("format_detected", True) else "data.as_given")
    split = ins.split
    lines = [
        f"### {escape_md(ins.name)}",
        tr(
            lang,
            "data.format_line",
            format=rep.get("format"),
            how=how,
            valid=rep.get("valid"),
            total=rep.get("total"),
            skipped=rep.get("skipped"),
        ),
        tr(
            lang,
            "data.split_line",
            train=split.get("train", 0),
            validation=split.get("validation", 0),
            seed=split.get("seed", DATA_DEFAULTS.seed),
        ),
        tr(lang, "data.stages_line", stages=", ".join(rep.get("stages") or ["sft"])),
    ]
    counts = rep.get("counts") or {}
    if counts.get("messages"):
        by_role = ", ".join(f"{k} {v}" for k, v in counts["messages"].items())
        lines.append(tr(lang, "data.messages_line", counts=by_role, tool_calls=counts.get("tool_calls", 0)))
    if rep.get("note"):
        lines.append(f"> {escape_md(rep['note'])}")
    for warning in rep.get("warnings", []):
        lines.append(tr(lang, "data.warning", warning=escape_md(warning)))
    return "\n\n".join(lines)


def stats_markdown(tokens: dict | None, lang: str | None = None) -> str:
    """The token statistics of inspect_file's report as a table (in ``lang``)."""
    if not tokens:
        return ""
    t = tokens.get("tokens", {})
    turns = tokens.get("turns", {})
    over = tr(
        lang,
        "data.stat.over_value",
        records=tokens.get("over_max_length", 0),
        tokens=f"{tokens.get('truncated_tokens', 0):,}",
    )
    trained = tr(
        lang,
        "data.stat.trained_value",
        tokens=f"{tokens.get('assistant_tokens', 0):,}",
        share=f"{tokens.get('assistant_fraction', 0):.0%}",
    )
    rows = [
        ("data.stat.records", f"{tokens.get('records', 0):,}"),
        ("data.stat.turns", f"{turns.get('median', 0):g} / {turns.get('max', 0)}"),
        ("data.stat.tokens", f"{t.get('min', 0)} / {t.get('median', 0):g} / {t.get('mean', 0):g}"),
        ("data.stat.tokens_tail", f"{t.get('p95', 0):g} / {t.get('max', 0)}"),
        ("data.stat.total", f"{t.get('total', 0):,}"),
        ("data.stat.over", over),
        ("data.stat.trained", trained),
        ("data.stat.template", str(tokens.get("template", ""))),
    ]
    if tokens.get("no_assistant_after_truncation"):
        rows.append(("data.stat.no_answer", str(tokens["no_assistant_after_truncation"])))
    if tokens.get("render_errors"):
        errors = tokens["render_errors"]
        rows.append(
            ("data.stat.render_errors", tr(lang, "data.stat.render_errors_value", n=len(errors), first=errors[0]))
        )
    names = {key: tr(lang, key, max_length=tokens.get("max_length")) for key, _ in rows}
    return (
        tr(lang, "data.stat.head")
        + "\n|---|---:|\n"
        + "\n".join(f"| {escape_md(names[a])} | {escape_md(b)} |" for a, b in rows)
    )


def histogram_frame(tokens: dict | None):
    """A DataFrame (bin label, count) of the token lengths, for a bar plot."""
    hist = (tokens or {}).get("histogram") or {}
    counts = hist.get("counts") or []
    edges = hist.get("edges") or []
    rows = [{"tokens": f"{edges[i]}-{edges[i + 1] - 1}", "records": counts[i]} for i in range(len(counts))]
    return plot_frame(rows, {"tokens": "str", "records": "int64"})


def learned_view(
    messages: list[dict], tokenizer, max_length: int, lang: str | None = None
) -> tuple[list[tuple[str, str | None]], str]:
    """One record as the model trains on it (engine.templates.preview), as the highlighted
    pieces of gr.HighlightedText ("trained", "cut off" or none) and a one-line summary (in ``lang``)."""
    from engine import templates

    template, source = templates.model_template(tokenizer)
    view = templates.preview(messages, tokenizer, template, max_length)
    trained, cut_off = tr(lang, "data.label_trained"), tr(lang, "data.label_cut")
    pieces = [
        (piece, cut_off if not kept else (trained if on else None))
        for piece, on, kept in zip(view["tokens"], view["trained"], view["kept"])
    ]
    cut = (
        tr(lang, "data.learned_cut", cut_at=view["cut_at"], lost=view["trained_tokens_cut"])
        if view["cut_at"] is not None
        else ""
    )
    info = tr(
        lang,
        "data.learned_info",
        length=view["length"],
        trained=view["trained_tokens"],
        template=view["template"],
        source=source,
        cut=cut,
    )
    return pieces, info


def page_label(page: int, n_records: int, total: int | None = None, lang: str | None = None) -> str:
    """'Page 2 of 3 (10 records)'; with ``total`` over the previewed ``n_records``, says the
    preview holds only the first ones (engine.security.PREVIEW_MAX_RECORDS). In ``lang``."""
    pages = max(1, -(-n_records // PER_PAGE))
    if total is not None and total > n_records:
        return tr(lang, "data.page_capped", page=page, pages=pages, n=n_records, total=total)
    return tr(lang, "data.page", page=page, pages=pages, n=n_records)


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
            [(str(t("data.skip_bad")), "skip"), (str(t("data.stop_bad")), "stop")],
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
                title=t("data.histogram"),
                height=260,
                # gr.I18n does not reach a plot's axis titles: English here, the visitor's
                # language from the handler that fills the chart.
                x_title=tr(None, "chart.tokens"),
                y_title=tr(None, "chart.records"),
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
        elem_id="data-learned",
    )

    @engine_errors
    def on_upload(file, request: gr.Request):
        if not file:
            return None
        return str(uploads.stable_copy(file, uploads.uploads_dir(ctx.runs_for(request))))

    @engine_errors
    def on_sample(name, request: gr.Request = None):
        if not name:
            raise gr.Error(tr(lang_of(request), "data.choose_sample"))
        return str(ctx.sample_path(name, request))

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
            raise gr.Error(tr(lang, "data.not_your_upload"), title=tr(lang, "common.refused"))
        tok_model = ctx.check_model(request, tok_model or ctx.model_choices()[0])
        progress(0.1, desc=tr(lang, "data.progress_tokenizer"))
        tokenizer = load_tokenizer(tok_model)
        progress(0.3, desc=tr(lang, "data.progress_reading"))
        filled = parse_persona(persona_v, lang)
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
            summary_markdown(ins, lang),
            gr.Row(visible=bool(tokens)),
            stats_markdown(tokens, lang),
            gr.BarPlot(
                value=(frame := histogram_frame(tokens)),
                sort=list(frame["tokens"]) if frame is not None else None,
                x_title=tr(lang, "chart.tokens"),
                y_title=tr(lang, "chart.records"),
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
            *kept.page(1, lang),
            dataset_choice(ins, on_error_v, split_v, max_len_v, filled, limit),
        )

    @engine_errors
    def show_learned(kept: Preview, index, tok_model, max_len_v, request: gr.Request):
        lang = lang_of(request)
        records = kept.records if kept else []
        if not records:
            raise gr.Error(tr(lang, "data.load_first"))
        index = int(index or 1)
        if not 1 <= index <= len(records):
            if kept.total > len(records):
                raise gr.Error(tr(lang, "data.record_range_capped", index=index, n=len(records), total=kept.total))
            raise gr.Error(tr(lang, "data.record_range", index=index, n=len(records)))
        tokenizer = load_tokenizer(ctx.check_model(request, tok_model or ctx.model_choices()[0]))
        max_len = int(max_len_v or DATA_DEFAULTS.max_length)
        pieces, info = learned_view(records[index - 1], tokenizer, max_len, lang)
        # the highlights' labels (and legend) in the visitor's language
        colors = {tr(lang, "data.label_trained"): "green", tr(lang, "data.label_cut"): "gray"}
        learned_v = gr.HighlightedText(value=pieces, color_map=colors)
        return learned_v, tr(lang, "data.record_of", index=index, total=kept.total, info=info)

    def turn_page(kept: Preview, page_v, delta: int, lang: str | None):
        kept = kept or Preview([], 0)
        p = clamp_page((page_v or 1) + delta, len(kept.records))
        return p, *kept.page(p, lang)

    def show_page(kept: Preview, page_v, request: gr.Request = None):
        return turn_page(kept, page_v, 0, lang_of(request))

    def page_before(kept: Preview, page_v, request: gr.Request = None):
        return turn_page(kept, page_v, -1, lang_of(request))

    def page_after(kept: Preview, page_v, request: gr.Request = None):
        return turn_page(kept, page_v, +1, lang_of(request))

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
    page_io = {"inputs": [records_state, page], "outputs": [page, page_info, preview], "show_progress": "hidden"}
    prev_btn.click(page_before, **page_io)
    next_btn.click(page_after, **page_io)
    page.submit(show_page, **page_io)
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

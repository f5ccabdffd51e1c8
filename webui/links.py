"""The few things that cross tabs.

``Links.dataset`` is a per-user ``gr.State`` holding the :class:`DataChoice` made on the
Data tab, which the Train tab reads when it starts a run. ``Links.tabs`` is the app's
``gr.Tabs``, so a button can switch tab; it is None when a tab runs alone.
:func:`connect_tabs` wires the buttons that lead from one tab to another.

Imported only when a page is built (never by ``tunelab --help``), so gradio is imported
at module level: handlers annotate ``gr.Request``, which must resolve here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from engine.config import DataConfig
from webui.i18n import lang_of, tr


@dataclass
class DataChoice:
    """A dataset the Data tab found trainable: the run's data section as chosen there, and
    what the Train tab shows and checks about it."""

    config: DataConfig  # becomes the run config's data section as it is
    name: str  # file name shown to the user
    records: int  # usable records (after skipping bad ones and the record limit)
    train: int
    val: int
    mean_tokens: int | None = None  # per record, with the model's template
    longest_tokens: int | None = None  # the longest record, with the model's template
    placeholders: list[str] = field(default_factory=list)  # {{names}} nothing fills
    stages: tuple[str, ...] = ("sft",)  # the training stages it can train (engine.data.trainable_stages)

    @classmethod
    def from_run(cls, run_dir) -> "DataChoice":
        """The dataset a run trains on, as the Data tab would have handed it over: its config's
        data section, and the counts the trainer wrote to data.json (read from the file
        itself while the run still waits in the queue)."""
        from pathlib import Path

        from engine.config import RunConfig
        from engine.data import load_for_training, trainable_stages
        from engine.runs import CONFIG_FILE, DATA_FILE, read_json

        run_dir = Path(run_dir)
        config = RunConfig.load(run_dir / CONFIG_FILE)
        data = config.data
        counts = read_json(run_dir / DATA_FILE)
        if counts is None:
            loaded, train, val = load_for_training(data, config.training.stage)
            counts = {"format": loaded.format, "usable": len(loaded.records), "train": len(train)}
            counts["validation"] = len(val)
        return cls(
            config=data,
            name=Path(str(data.path)).name,
            records=counts.get("usable", 0),
            train=counts.get("train", 0),
            val=counts.get("validation", 0),
            mean_tokens=int(counts["mean_tokens"]) if counts.get("mean_tokens") else None,
            longest_tokens=counts.get("longest_tokens"),
            stages=trainable_stages(counts.get("format") or data.format),
        )


@dataclass
class Links:
    dataset: Any  # gr.State holding a DataChoice, or None
    tabs: Any = None  # gr.Tabs, or None when a tab is launched alone

    @classmethod
    def create(cls) -> "Links":
        return cls(dataset=gr.State(None))


def dataset_summary(choice: DataChoice | None, lang: str | None = None) -> str:
    """One line describing the dataset chosen on the Data tab (in ``lang``)."""
    if not choice:
        return tr(lang, "links.no_dataset")
    return tr(
        lang,
        "links.dataset",
        name=choice.name,
        format=choice.config.format,
        records=choice.records,
        train=choice.train,
        val=choice.val,
        split=f"{choice.config.validation_split:g}",
        on_error=choice.config.on_error,
    )


def dataset_summary_for(choice: DataChoice | None, request: gr.Request) -> str:
    """:func:`dataset_summary` in the language of ``request`` (a handler)."""
    return dataset_summary(choice, lang_of(request))


def standalone_tab(build, name: str, ctx=None):
    """One tab alone in its own gr.Blocks (each tab module's ``create``)."""
    from webui.common import AppContext

    ctx = ctx or AppContext()
    with gr.Blocks(title=f"tunelab - {name}") as demo:
        build(ctx, Links.create())
    return demo


def user_banner(ctx):
    """A handler for the line at the top of a shared app: who is signed in, and that their
    runs are theirs alone (or how to sign in)."""
    from webui.common import escape_md

    def whoami(request: gr.Request):
        lang = lang_of(request)
        name = ctx.display_name(request)
        if name is None:
            how = tr(lang, "links.banner_hf" if ctx.oauth else "common.log_in")
            return tr(lang, "links.banner_out", how=how)
        if (ctx.user_of(request) or "").startswith("session:"):
            return tr(lang, "links.banner_session")
        return tr(lang, "links.banner_in", name=escape_md(name))

    return whoami


def connect_tabs(ctx, tabs, tab_of: dict, train, play, export, runs, evaluation=None) -> None:
    """Wire what leads from one tab to another (call inside the app's Blocks)."""

    # Tabs that list runs refresh their pickers when shown (runs appear while the app lives), and
    # what they show about the picked run is derived from its directory again then: a run that
    # finished or was exported since must not keep an earlier moment's notices. (The picker's
    # change event alone misses it: the picked run is often the same.)
    def reshow(tab):
        return dict(fn=tab.show, inputs=tab.show_inputs, outputs=tab.show_outputs, show_progress="hidden")

    tab_of["playground"].select(play.refresh, inputs=[play.run], outputs=[play.run], show_progress="hidden").then(
        **reshow(play)
    )
    tab_of["export"].select(export.refresh, inputs=[export.run], outputs=[export.run], show_progress="hidden").then(
        **reshow(export)
    )
    tab_of["runs"].select(runs.refresh, inputs=runs.refresh_inputs, outputs=runs.outputs, show_progress="hidden")

    def open_in_playground(run_id, request: gr.Request):
        run_dir = ctx.run_dir(request, run_id)  # refuses ids that are not this user's runs
        return play.refresh(run_dir.name, request), gr.Tabs(selected="playground")

    def open_run(refresh, tab):
        def handler(run_dir, request: gr.Request):
            return refresh(run_dir, request), gr.Tabs(selected=tab)

        return handler

    # Runs -> Playground: pick the run there and switch tab.
    runs.open.click(open_in_playground, inputs=runs.selected, outputs=[play.run, tabs], show_progress="hidden").then(
        **reshow(play)
    )
    # Runs -> Train: a resumed run is followed on the Train tab.
    runs.resume_dep.success(train.attach, inputs=runs.resumed, outputs=train.progress_outputs).then(
        lambda: gr.Tabs(selected="train"), outputs=tabs
    )
    # Train -> Playground / Export once a run has finished.
    train.open_playground.click(
        open_run(play.refresh, "playground"), inputs=train.run_dir, outputs=[play.run, tabs], show_progress="hidden"
    ).then(**reshow(play))
    train.open_export.click(
        open_run(export.refresh, "export"), inputs=train.run_dir, outputs=[export.run, tabs], show_progress="hidden"
    ).then(**reshow(export))
    if evaluation is None:
        return
    tab_of["evaluate"].select(
        evaluation.refresh, inputs=[evaluation.run], outputs=[evaluation.run], show_progress="hidden"
    ).then(**reshow(evaluation))

    # Evaluate -> Playground: a clicked row's conversation is loaded there (earlier turns in
    # every column's history, its last user turn in the prompt box, the reference below).
    def open_example(run_id, entries, evt: gr.SelectData, request: gr.Request):
        from webui.common import escape_md

        lang = lang_of(request)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not entries or row is None or not 0 <= int(row) < len(entries):
            raise gr.Error(tr(lang, "links.row_gone"))
        entry = entries[int(row)]
        run_dir = ctx.run_dir(request, run_id)
        reference = tr(lang, "links.reference", n=entry["example"]) + f"\n\n> {escape_md(entry['reference'])}"
        return (
            play.refresh(run_dir.name, request),
            *play.load_conversation(entry["prompt"], reference),
            gr.Tabs(selected="playground"),
        )

    evaluation.table.select(
        open_example,
        inputs=[evaluation.run, evaluation.entries],
        outputs=[play.run, *play.load_outputs, tabs],
        show_progress="hidden",
    ).then(**reshow(play))

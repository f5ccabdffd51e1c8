"""The few things that cross tabs.

``Links.dataset`` is a per-user ``gr.State`` holding the dataset chosen on the Data tab (a
plain dict: path, name, format, on_error, validation_split, max_length, records), which
the Train tab reads when it starts a run. ``Links.tabs`` is the app's ``gr.Tabs``, so a
button can switch tab; it is None when a tab runs alone. :func:`connect_tabs` wires the
buttons that lead from one tab to another.

Imported only when a page is built (never by ``tunelab --help``), so gradio is imported
at module level: handlers annotate ``gr.Request``, which must resolve here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr


@dataclass
class Links:
    dataset: Any  # gr.State
    tabs: Any = None  # gr.Tabs, or None when a tab is launched alone

    @classmethod
    def create(cls) -> "Links":
        return cls(dataset=gr.State(None))


def dataset_summary(choice: dict | None) -> str:
    """One line describing the dataset chosen on the Data tab."""
    if not choice:
        return "No dataset chosen yet: load one on the **Data** tab."
    split = choice.get("validation_split", 0)
    return (
        f"**{choice.get('name')}** - {choice.get('format')} format, {choice.get('records')} usable records "
        f"({choice.get('train')} train / {choice.get('val')} validation, split {split:g}); "
        f"bad records: {choice.get('on_error')}."
    )


def user_banner(ctx):
    """A handler for the line at the top of a shared app: who is signed in, and that their
    runs are theirs alone (or how to sign in)."""
    from webui.common import escape_md

    def whoami(request: gr.Request):
        name = ctx.display_name(request)
        if name is None:
            how = "Sign in with Hugging Face (button above)" if ctx.oauth else "Log in"
            return f"You are not signed in. {how} to upload data and train; each person's runs are private here."
        if (ctx.user_of(request) or "").startswith("session:"):
            return (
                "Your runs are private to this page: reloading it starts a new workspace "
                "(the operator can add a login to keep them)."
            )
        return f"Signed in as **{escape_md(name)}**: only you see your data, runs and downloads."

    return whoami


def connect_tabs(ctx, tabs, tab_of: dict, train, play, export, runs) -> None:
    """Wire what leads from one tab to another (call inside the app's Blocks)."""
    # Tabs that list runs refresh their pickers when shown (runs appear while the app lives).
    tab_of["playground"].select(play.refresh, inputs=[play.run], outputs=[play.run], show_progress="hidden")
    tab_of["export"].select(export.refresh, inputs=[export.run], outputs=[export.run], show_progress="hidden")
    tab_of["runs"].select(runs.refresh, inputs=runs.refresh_inputs, outputs=runs.outputs, show_progress="hidden")

    def open_in_playground(run_id, request: gr.Request):
        run_dir = ctx.run_dir(request, run_id)  # refuses ids that are not this user's runs
        return play.refresh(run_dir.name, request), gr.Tabs(selected="playground")

    def open_run(refresh, tab):
        def handler(run_dir, request: gr.Request):
            return refresh(run_dir, request), gr.Tabs(selected=tab)

        return handler

    # Runs -> Playground: pick the run there and switch tab.
    runs.open.click(open_in_playground, inputs=runs.selected, outputs=[play.run, tabs], show_progress="hidden")
    # Runs -> Train: a resumed run is followed on the Train tab.
    runs.resume_dep.success(train.attach, inputs=runs.resumed, outputs=train.progress_outputs).then(
        lambda: gr.Tabs(selected="train"), outputs=tabs
    )
    # Train -> Playground / Export once a run has finished.
    train.open_playground.click(
        open_run(play.refresh, "playground"), inputs=train.run_dir, outputs=[play.run, tabs], show_progress="hidden"
    )
    train.open_export.click(
        open_run(export.refresh, "export"), inputs=train.run_dir, outputs=[export.run, tabs], show_progress="hidden"
    )

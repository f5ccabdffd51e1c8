"""The few things that cross tabs, created once per page.

``dataset`` is a per-user ``gr.State`` holding the dataset chosen on the Data tab (a
plain dict: path, name, format, on_error, validation_split, max_length, records), which
the Train tab reads when it starts a run. ``tabs`` is the ``gr.Tabs`` of the app, so a
button can switch tab; it is None when a tab runs alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Links:
    dataset: Any  # gr.State
    tabs: Any = None  # gr.Tabs, or None when a tab is launched alone

    @classmethod
    def create(cls) -> "Links":
        import gradio as gr

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

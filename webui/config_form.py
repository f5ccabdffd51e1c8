"""A Gradio form generated from engine.config: one widget per field of a run config.

The Train tab does not list its settings. Every field of every section of
:class:`engine.config.RunConfig` becomes a widget here, except the data section (the Data
tab chooses it: :class:`webui.links.DataChoice`) and fields whose metadata says
``form: False``. The widget's kind comes from the field's annotation (bool: checkbox,
int/float: number, ``choices``: dropdown (several for a list), text and lists: textbox), its label, limits and
help from the metadata, its starting value from the default. The label and help reach the page
through the locale files: ``config.<section>.<field>.label`` / ``.info``, whose English is the
metadata itself (webui.i18n.config_texts). So a field added to
engine/config.py appears in this form, in ``tunelab config`` and in the YAML with no edit
here or in the tab (tests/test_config_form.py adds one and checks all three).

Handlers receive the widgets' values positionally in :meth:`FormValues.names` order (the
order :attr:`ConfigForm.inputs` lists them in; both come from :func:`form_fields`) and turn
them into a :class:`FormValues` at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import gradio as gr
import yaml

from engine.config import FieldInfo, RunConfig
from engine.config import form_fields as config_form_fields
from webui.i18n import config_key, t, tr

DATA_SECTION = "data"  # chosen on the Data tab, not in this form
_DEFAULT = object()  # a widget left empty: the config's default applies


def form_fields() -> list[FieldInfo]:
    """The fields the form shows, in config order (read from engine.config on each call)."""
    return config_form_fields()


def _flat_names(fields: list[FieldInfo]) -> dict[str, FieldInfo]:
    """Short names for handlers and tests: ``form_name`` metadata, else the field's name, else
    ``section_name`` where two sections share a name."""
    counts: dict[str, int] = {}
    for f in fields:
        counts[f.meta.get("form_name", f.name)] = counts.get(f.meta.get("form_name", f.name), 0) + 1
    out = {}
    for f in fields:
        name = f.meta.get("form_name", f.name)
        out[name if counts[name] == 1 else f"{f.section}_{f.name}"] = f
    return out


def label_of(info: FieldInfo):
    """The field's label as a component's text (a gr.I18n key)."""
    return t(config_key(info.key, "label"))


def info_of(info: FieldInfo):
    """The field's help as a component's info text (None when it has none)."""
    return t(config_key(info.key, "info")) if info.help else None


def to_widget(info: FieldInfo, value: Any) -> Any:
    """A config value as its widget shows it."""
    if info.kind == "list" and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if info.kind == "mapping":
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else ""
    if value is None and info.kind in ("text", "list"):
        return ""
    if value is None and info.kind in ("int", "float"):
        return 0  # a gradio Number cannot be empty (the page sends 0): 0 stands for "none"
    return value


def from_widget(info: FieldInfo, value: Any) -> Any:
    """A widget's value as the config reads it; ``_DEFAULT`` when left empty (the config's
    default applies), None when empty and the field is optional."""
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "" or (info.optional and info.kind in ("int", "float") and value == 0):
        return None if info.optional else _DEFAULT
    if info.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if info.kind == "mapping" and isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value  # the config names the field and says it must be a mapping
    return value


class FormValues:
    """The form's values by short name (``model``, ``method``, ``batch_size``, ``run_name``...),
    each starting at engine.config's default, as the widgets hold them."""

    def __init__(self, **values: Any):
        fields = _flat_names(form_fields())
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise TypeError(f"unknown form field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        self._fields = fields
        for name, info in fields.items():
            setattr(self, name, values[name] if name in values else to_widget(info, info.default))

    @classmethod
    def names(cls) -> list[str]:
        return list(_flat_names(form_fields()))

    @classmethod
    def from_values(cls, values: Sequence) -> "FormValues":
        names = cls.names()
        if len(values) != len(names):
            raise ValueError(f"the form has {len(names)} fields ({', '.join(names)}), got {len(values)} values")
        return cls(**dict(zip(names, values)))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "FormValues":
        return cls(**{name: to_widget(info, cfg.value(info.key)) for name, info in _flat_names(form_fields()).items()})

    def config_values(self) -> dict[str, Any]:
        """``{"section.key": value}`` for RunConfig.with_values (empty fields keep the default)."""
        out = {}
        for name, info in self._fields.items():
            value = from_widget(info, getattr(self, name))
            if value is not _DEFAULT:
                out[info.key] = value
        return out

    def config(self) -> RunConfig:
        """The form alone as a RunConfig (data and output at their defaults)."""
        return RunConfig().with_values(self.config_values())

    def __repr__(self) -> str:
        return f"FormValues({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


class ConfigForm:
    """The widgets of :func:`form_fields`: generic ones made by :meth:`widget` or
    :meth:`render_section`, special ones (a model picker) registered with :meth:`add`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.fields = _flat_names(form_fields())
        self.components: dict[str, Any] = {}

    def elem_id(self, name: str) -> str:
        return f"{self.prefix}-{name.replace('_', '-')}"

    def default(self, name: str) -> Any:
        return to_widget(self.fields[name], self.fields[name].default)

    def sections(self) -> list[str]:
        return list(dict.fromkeys(info.section for info in self.fields.values()))

    def add(self, name: str, component) -> Any:
        if name not in self.fields:
            raise KeyError(f"{name!r} is not a form field; fields: {', '.join(self.fields)}")
        self.components[name] = component
        return component

    def widget(self, name: str, **overrides) -> Any:
        """The widget of one field (``overrides``: value, interactive, ... for gradio)."""
        info = self.fields[name]
        meta = info.meta
        kwargs = {"label": label_of(info), "info": info_of(info), "elem_id": self.elem_id(name)}
        kwargs["value"] = self.default(name)
        limits = {k: meta[k] for k in ("minimum", "maximum", "step") if k in meta}
        kwargs.update(overrides)
        if info.kind == "bool":
            component = gr.Checkbox(**kwargs)
        elif info.kind == "choice":
            component = gr.Dropdown(list(meta["choices"]), **kwargs)
        elif info.kind == "choices":
            component = gr.Dropdown(list(meta["choices"]), multiselect=True, **kwargs)
        elif info.kind in ("int", "float"):
            component = gr.Number(precision=0 if info.kind == "int" else None, **limits, **kwargs)
        else:
            component = gr.Textbox(lines=meta.get("lines", 1), **kwargs)
        return self.add(name, component)

    def render_section(self, section: str, per_row: int = 5, overrides: dict | None = None, **common) -> list:
        """Widgets for the fields of ``section`` not made yet, ``per_row`` to a row; ``common``
        goes to every widget, ``overrides[name]`` to one."""
        names = [n for n, info in self.fields.items() if info.section == section and n not in self.components]
        made = []
        for start in range(0, len(names), per_row):
            with gr.Row():
                for name in names[start : start + per_row]:
                    made.append(self.widget(name, **{**common, **(overrides or {}).get(name, {})}))
        return made

    @property
    def inputs(self) -> list:
        """Every widget, in FormValues.names() order."""
        missing = [n for n in self.fields if n not in self.components]
        if missing:
            raise RuntimeError(f"form fields without a widget: {', '.join(missing)}")
        return [self.components[n] for n in self.fields]

    def updates(self, cfg: RunConfig, than: RunConfig | None = None) -> dict:
        """``{widget: value}`` showing ``cfg`` (only the fields that differ from ``than``)."""
        return {
            self.components[name]: to_widget(info, cfg.value(info.key))
            for name, info in self.fields.items()
            if than is None or cfg.value(info.key) != than.value(info.key)
        }

    def labels(self, cfg: RunConfig, than: RunConfig, lang: str | None = None) -> list[str]:
        """The labels (in ``lang``) of the fields whose value differs between ``cfg`` and ``than``."""
        return [
            tr(lang, config_key(info.key, "label"))
            for info in self.fields.values()
            if cfg.value(info.key) != than.value(info.key)
        ]

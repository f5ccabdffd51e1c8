"""The Train tab's form is generated from engine.config: its widgets start at the config's
defaults, its values become the same RunConfig the CLI reads, the recommendation goes
through the config's override path, and a field added to engine/config.py appears in the
form, in `tunelab config` and in the YAML with no other edit (its label and help in English
until a locale file translates them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "assets" / "datasets"


def _handlers(app) -> dict:
    return {fn.api_name: fn for fn in app.fns.values() if fn.api_name}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from webui.app import build_app
    from webui.common import AppContext

    os.environ.pop("TUNELAB_DEMO", None)
    return build_app(AppContext(runs_dir=tmp_path_factory.mktemp("runs")))


def test_every_widget_starts_at_the_config_default(app):
    from engine.config import RunConfig
    from webui.config_form import FormValues, form_fields

    widgets = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    defaults = FormValues.from_config(RunConfig())
    names = FormValues.names()
    assert len(names) == len(form_fields()) > 25
    for name in names:
        widget = widgets[f"train-{name.replace('_', '-')}"]
        if name == "model":  # the picker starts at the app's first model
            continue
        assert widget.value == getattr(defaults, name) or (
            widget.value in ("", None) and not getattr(defaults, name)
        ), (
            name,
            widget.value,
        )
    # LoRA dropout and warm-up once differed between the form and the config
    assert widgets["train-dropout"].value == RunConfig().method.dropout
    assert widgets["train-warmup-ratio"].value == RunConfig().training.warmup_ratio
    # The start handler takes exactly the generated widgets, in FormValues.names() order
    start = _handlers(app)["start"]
    ids = [getattr(b, "elem_id", None) for b in start.inputs]
    assert ids[1 : 1 + len(names)] == [f"train-{n.replace('_', '-')}" for n in names]


def test_form_values_round_trip_through_the_config():
    from engine.config import ConfigError, RunConfig
    from webui.config_form import FormValues

    form = FormValues(
        learning_rate=0.0, max_steps=7.0, target_modules=" q_proj,v_proj ", run_name="  ", chat_template=""
    )
    cfg = form.config()
    assert cfg.training.learning_rate is None and cfg.training.max_steps == 7
    assert cfg.method.target_modules == ["q_proj", "v_proj"] and cfg.output.run_id is None
    assert cfg.model.chat_template is None
    again = FormValues.from_config(cfg)
    assert again.target_modules == "q_proj,v_proj" and again.config() == cfg
    # an empty number keeps the config's default; a bad one is named by its dotted field
    assert FormValues(batch_size=None).config().training.batch_size == RunConfig().training.batch_size
    with pytest.raises(ConfigError, match="training.warmup_ratio"):
        FormValues(warmup_ratio=1.5).config()
    with pytest.raises(TypeError, match="unknown form field"):
        FormValues(batch=2)
    with pytest.raises(ValueError, match="the form has"):
        FormValues.from_values([1, 2])


def test_apply_recommendation_updates_only_what_the_plan_changes(app):
    from engine.config import RunConfig
    from webui.config_form import FormValues

    apply = _handlers(app)["apply_recommendation"]
    values = [getattr(FormValues(), n) for n in FormValues.names()]
    overrides = ["training.batch_size=2", "training.gradient_accumulation_steps=8", "method.name=qlora"]
    updates = apply.fn(None, overrides, *values)
    changed = {block.elem_id: value for block, value in updates.items()}
    assert changed == {"train-method": "qlora", "train-batch-size": 2, "train-gradient-accumulation-steps": 8}
    assert RunConfig().training.batch_size != 2  # the plan really changed it
    import gradio as gr

    with pytest.raises(gr.Error, match="No recommendation yet"):
        apply.fn(None, None, *values)


NEW_FIELD = (
    '    label_smoothing: float = field(\n        default=0.0,\n        metadata={"help": "Label smoothing of the '
    'loss (0 = off).", "label": "Label smoothing", "minimum": 0, "maximum": 0.5},\n    )\n'
)

CHECK = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pathlib import Path

    from engine import cli
    from engine.config import RunConfig

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["config", "--set", "training.label_smoothing=0.1"])
    cli_line = next(line for line in out.getvalue().splitlines() if "label_smoothing" in line)

    Path("run.yaml").write_text("training:\\n  label_smoothing: 0.2\\n")
    from_yaml = RunConfig.load("run.yaml").training.label_smoothing

    from engine.config import DataConfig
    from webui.app import build_app
    from webui.common import AppContext
    from webui.i18n import tr, translations
    from webui.links import DataChoice
    from webui.train_tab import FormValues, build_config

    app = build_app(AppContext(runs_dir=Path("runs")))
    widget = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "train-label-smoothing")
    start = next(fn for fn in app.fns.values() if fn.api_name == "start")
    choice = DataChoice(config=DataConfig(path=sys.argv[1]), name="d", records=1, train=1, val=0)
    cfg = build_config(FormValues(label_smoothing=0.3), choice, Path("runs"))
    print(json.dumps({
        "cli_code": code, "cli_line": cli_line, "from_yaml": from_yaml,
        "label": widget.label.key, "value": widget.value, "maximum": widget.maximum,
        "label_en": tr("en", widget.label.key), "label_sw": tr("sw", widget.label.key),
        "missing_sw": sorted(set(translations()["en"]) - set(translations()["sw"])),
        "in_start_inputs": widget in start.inputs, "from_form": cfg.training.label_smoothing,
        "in_saved_yaml": "label_smoothing: 0.3" in cfg.to_yaml(),
    }))
    """
)


def test_a_field_added_to_the_config_appears_in_the_form_the_cli_and_the_yaml(tmp_path):
    """Add a field to TrainingConfig in a copy of the source, and nothing else."""
    for package in ("engine", "webui"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    config = tmp_path / "engine" / "config.py"
    text = config.read_text(encoding="utf-8")
    text, n = re.subn(r"(class TrainingConfig:\n)", r"\1" + NEW_FIELD.replace("\\", "\\\\"), text)
    assert n == 1
    config.write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TUNELAB_DEMO", None)
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(SAMPLES / "pip_chat.jsonl")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["cli_code"] == 0 and got["cli_line"].strip().startswith("label_smoothing: 0.1  # Label smoothing")
    assert got["from_yaml"] == 0.2
    assert got["value"] == 0.0 and got["maximum"] == 0.5
    # Its label is a locale key whose English is the field's metadata; a language that has not
    # translated it yet shows the English, and the missing-key test (test_i18n) names the keys.
    assert got["label"] == "config.training.label_smoothing.label" and got["label_en"] == "Label smoothing"
    assert got["label_sw"] == "Label smoothing"
    assert got["missing_sw"] == ["config.training.label_smoothing.info", "config.training.label_smoothing.label"]
    assert got["in_start_inputs"] and got["from_form"] == 0.3 and got["in_saved_yaml"]

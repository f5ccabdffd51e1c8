"""Experiment tracking (engine/tracking.py) and reproducible runs (engine/recipe.py).

Real trainer processes on the tiny model: TensorBoard, MLflow and Trackio read back with
their own readers, no secret in any file a run writes, environment.json, the recipe zip, and
two seeded runs with equal losses (the second from the recipe, through `tunelab train`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from test_launch import final, make_config, runs_dir, write_data  # noqa: F401  (runs_dir is a fixture)

from engine import launch, recipe, runs, tracking
from engine.config import TRACKERS, ConfigError, RunConfig

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-5f1e9a77c3",
    "MLFLOW_TRACKING_TOKEN": "mlflow-secret-0b44d2e1aa",
    "HF_TOKEN": "hf_secretQ7nV2xLr8pKd",
}


def test_report_to_reads_every_form_and_names_the_field():
    assert RunConfig.from_dict({"training": {"report_to": "none"}}).training.report_to == []
    assert RunConfig.from_dict({"training": {"report_to": "TensorBoard, mlflow"}}).training.report_to == [
        "tensorboard",
        "mlflow",
    ]
    cfg = RunConfig().with_overrides(["training.report_to=trackio,tensorboard"])
    assert cfg.training.report_to == ["trackio", "tensorboard"]
    assert RunConfig.from_dict(cfg.to_dict()).training.report_to == ["trackio", "tensorboard"]  # YAML round trip
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"training": {"report_to": ["tensorboard", "neptune"]}})
    assert err.value.field == "training.report_to" and "'neptune'" in str(err.value)
    assert set(tracking.INSTALL) == set(TRACKERS)  # one install hint per tracker the config allows


def test_locations_follow_the_run_and_leave_a_set_server_alone(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    env = tracking.environment(run_dir, ["tensorboard", "mlflow", "trackio", "wandb"], env={})
    root = (tmp_path / "runs" / ".tracking").resolve()
    assert env["TENSORBOARD_LOGGING_DIR"] == str(root / "tensorboard" / "r1")
    assert env["MLFLOW_TRACKING_URI"] == (root / "mlruns").as_uri()
    assert env["TRACKIO_DIR"] == str(root / "trackio")
    assert env["WANDB_MODE"] == "offline"  # no key: nothing leaves the machine
    preset = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "WANDB_API_KEY": "k"}
    env = tracking.environment(run_dir, ["mlflow", "wandb"], env=preset)
    assert "MLFLOW_TRACKING_URI" not in env and "WANDB_MODE" not in env
    assert tracking.environment(run_dir, [], env={}) == {}
    commands = {loc.tracker: loc.command for loc in tracking.locations(run_dir, ["tensorboard", "mlflow"])}
    assert commands["tensorboard"].startswith("tensorboard --logdir ") and str(root) in commands["tensorboard"]
    assert commands["mlflow"].startswith("MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:")


def test_a_tracker_that_is_not_installed_is_refused_before_a_run_exists(
    tiny_model_dir,
    tmp_path,
    runs_dir,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setitem(tracking.INSTALL, "wandb", ("tunelab_no_such_module", "pip install wandb"))
    config = make_config(tiny_model_dir, write_data(tmp_path / "d.jsonl"), runs_dir, report_to=["wandb"])
    with pytest.raises(ConfigError) as err:
        launch.submit(config, runs_dir)
    assert err.value.field == "training.report_to" and "pip install wandb" in str(err.value)
    assert list(runs_dir.iterdir()) == []


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_trackers_hold_every_step_and_no_secret_reaches_a_file(tiny_model_dir, tmp_path, runs_dir, monkeypatch):  # noqa: F811
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = make_config(
        tiny_model_dir,
        write_data(tmp_path / "d.jsonl", 24),
        runs_dir,
        max_steps=4,
        report_to=["tensorboard", "mlflow", "trackio"],
    )
    run = launch.submit(config, runs_dir)
    status = final(run, timeout=240)
    assert status["state"] == "completed", runs.tail_log(run, 40)
    losses = {r["step"]: r["loss"] for r in runs.read_metrics(run) if r.get("loss") is not None}
    assert sorted(losses) == [1, 2, 3, 4]
    root = runs_dir / tracking.TRACKING_DIR

    # TensorBoard, read by tensorboard's own reader: the loss at every step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "tensorboard" / run.name))
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(scalars) == [1, 2, 3, 4]
    assert all(abs(scalars[s] - losses[s]) < 1e-4 for s in losses)

    # MLflow's local file store, experiment "tunelab", run named after the run.
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run.name}'")
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert sorted(history) == [1, 2, 3, 4] and all(abs(history[s] - losses[s]) < 1e-4 for s in losses)

    # Trackio's local store, project "tunelab".
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", root / "trackio")
    logs = sqlite_storage.SQLiteStorage.get_logs(tracking.PROJECT, run.name)
    tracked = [row for row in logs if "train/loss" in row]
    assert len(tracked) == 4, logs  # Trackio counts its own steps from 0; the values are the run's
    assert all(abs(row["train/loss"] - losses[s]) < 1e-4 for row, s in zip(tracked, [1, 2, 3, 4])), tracked

    # No secret in any file of the run or of the trackers.
    files = _files_under(run, root)
    assert run / "config.yaml" in files and run / "command.txt" in files and run / "train.log" in files
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name}'s value found in {path}"

    # The run shows where each tracker keeps it.
    shown = {loc.tracker for loc in tracking.run_locations(run)}
    assert shown == {"tensorboard", "mlflow", "trackio"}


def test_environment_recipe_and_a_seeded_run_again_reproduces_every_loss(
    tiny_model_dir,
    tmp_path,
    runs_dir,  # noqa: F811
    capsys,
):
    from engine.cli import main as cli_main

    data = write_data(tmp_path / "d.jsonl", 24)
    # LoRA dropout on: its masks come from the seeded generator too.
    config = make_config(tiny_model_dir, data, runs_dir, max_steps=6, seed=7)
    config.method.dropout = 0.1
    first = launch.submit(config, runs_dir)
    assert final(first, timeout=240)["state"] == "completed", runs.tail_log(first, 40)

    env = json.loads((first / runs.ENVIRONMENT_FILE).read_text())
    assert env["dataset"]["sha256"] == recipe.file_sha256(data)
    assert env["seeds"] == {"training": 7, "data": config.data.seed}
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["torch"]["version"]
    assert env["cpu"]["model"] and isinstance(env["cpu"]["isa"]["avx2"], bool)

    zip_path = recipe.write_recipe(first, tmp_path / "recipe.zip")
    folder = f"{first.name}-recipe"
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(f"{folder}/{n}" for n in recipe.RECIPE_FILES)
        zf.extractall(tmp_path / "unzipped")
    recipe_config = tmp_path / "unzipped" / folder / "config.yaml"
    assert RunConfig.load(recipe_config).output.run_id is None
    assert recipe.dataset_warning(recipe_config, RunConfig.load(recipe_config)) is None

    capsys.readouterr()
    assert cli_main(["train", "--config", str(recipe_config)]) == 0
    second = runs.find_run(capsys.readouterr().out.split()[1].rstrip(":"), runs_dir)
    assert second != first
    a = [(r["step"], r["loss"]) for r in runs.read_metrics(first) if r.get("loss") is not None]
    b = [(r["step"], r["loss"]) for r in runs.read_metrics(second) if r.get("loss") is not None]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x - y) <= 1e-6 for (_, x), (_, y) in zip(a, b)), (a, b)

    # The data changed since: the recipe says so before it starts.
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    warning = recipe.dataset_warning(recipe_config, RunConfig.load(recipe_config))
    assert warning and str(data) in warning and "has changed" in warning

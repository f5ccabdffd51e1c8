"""The probe run (engine/probe.py): a few real steps on the longest examples, measured and
projected beside the formula's estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_launch import final, make_config, runs_dir, write_data  # noqa: F401  (runs_dir is a fixture)

from engine import launch, probe, runs
from engine.config import RunConfig

REPO = Path(__file__).resolve().parent.parent


def test_the_longest_examples_and_the_run_steps():
    assert probe.longest_first([5, 9, 1, 7], 3) == [1, 3, 0]
    assert probe.longest_first([5, 9], 5) == [1, 0, 1, 0, 1]  # repeated when there are fewer
    cfg = RunConfig.from_dict({"training": {"batch_size": 4, "gradient_accumulation_steps": 2, "num_epochs": 3}})
    assert probe.planned_steps(cfg, 100) == 3 * 13  # ceil(ceil(100 / 4) / 2) per epoch
    assert probe.planned_steps(cfg.with_overrides(["training.max_steps=7"]), 100) == 7


def test_a_probe_measures_and_stays_out_of_the_run_list(tiny_model_dir, tmp_path, runs_dir):  # noqa: F811
    config = make_config(tiny_model_dir, write_data(tmp_path / "d.jsonl", 24), runs_dir, max_steps=50)
    run = launch.submit(config, runs_dir, probe=True)
    assert "--probe" in (run / "command.txt").read_text()
    status = final(run, timeout=240)
    assert status["state"] == "completed" and status["probe"] is True, runs.tail_log(run, 30)
    report = probe.read(run)
    assert status["step"] == probe.steps()  # not the config's 50
    assert report["projected"]["steps"] == 50
    assert report["seconds_per_step"] > 0 and report["tokens_per_second"] > 0
    assert report["peak_rss_bytes"] > report["rss_before_bytes"] > 0
    assert report["projected"]["seconds"] > 0 and report["formula"]["peak_bytes"] > 0
    assert report["ratio"]["memory"] == pytest.approx(
        report["formula"]["peak_bytes"] / report["projected"]["peak_bytes"], rel=0.01
    )
    assert "| peak memory" in probe.table(report)
    assert not (run / "adapter").exists()  # a probe saves no weights
    assert [r["run_id"] for r in runs.list_runs(runs_dir)] == []
    assert [r["run_id"] for r in runs.list_runs(runs_dir, probes=True)] == [run.name]


@pytest.mark.integration
def test_the_probe_projects_the_peak_memory_of_a_real_run(embedded_dir, tmp_path):
    """On the embedded model with the example CPU config, the probe's peak (3 steps on the
    longest examples) lands within 25% of a whole short run's measured peak, and the formula's
    estimate within 1.5x of the probe's."""
    config = RunConfig.load(REPO / "assets/configs/cpu-lora.yaml").with_overrides(
        [
            f"data.path={REPO / 'assets/datasets/pip_chat.jsonl'}",
            "training.max_steps=6",
            "training.eval_steps=0",
            "training.save_steps=1000",
            f"output.runs_dir={tmp_path}",
        ]
    )
    measured = launch.submit(config, tmp_path, probe=True)
    assert final(measured, timeout=600)["state"] == "completed", runs.tail_log(measured, 30)
    report = probe.read(measured)
    real = launch.submit(config, tmp_path)
    assert final(real, timeout=900)["state"] == "completed", runs.tail_log(real, 30)
    peak_mb = max(r["memory_peak_mb"] for r in runs.read_metrics(real))
    projected_mb = report["projected"]["process_peak_bytes"] / 2**20
    print(
        f"\nprobe: {report['seconds_per_step']} s/step, {report['tokens_per_second']} tokens/s, projected peak "
        f"{projected_mb:.0f} MB (above start {report['peak_above_before_bytes'] / 2**20:.0f} MB), formula "
        f"{report['formula']['peak_bytes'] / 2**20:.0f} MB (ratio {report['ratio']['memory']}); "
        f"run peak {peak_mb:.0f} MB"
    )
    assert abs(projected_mb - peak_mb) <= 0.25 * peak_mb
    # The formula (engine.hardware.estimate_memory, CPU terms) is within 1.5x of the measure.
    assert 1 / 1.5 <= report["ratio"]["memory"] <= 1.5, report["formula"]["parts"]

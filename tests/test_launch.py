"""engine.launch + engine.runs: commands, the detached supervisor, the queue, stop/resume,
crash classes, and the run directory readers. Real trainer processes on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine import launch, runs
from engine.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_data(path: Path, n: int = 16) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Word {i}?"}, {"role": "assistant", "content": "Zebra."}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(model_dir: Path, data: Path, runs_dir: Path, **training) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data), "max_length": 64, "validation_split": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "max_steps": 12,
                "batch_size": 4,
                "logging_steps": 1,
                "save_steps": 1000,
                "precision": "fp32",
                **training,
            },
            "output": {"runs_dir": str(runs_dir)},
        }
    )


@pytest.fixture
def runs_dir(tmp_path):
    """A runs directory; whatever is still running in it at the end is killed."""
    path = tmp_path / "runs"
    path.mkdir()
    yield path
    for run_dir in (p for p in path.iterdir() if p.is_dir()):
        status = runs.read_status(run_dir)
        for key, started in (("pid", "pid_started"), ("supervisor_pid", "supervisor_started")):
            if runs.process_alive(status.get(key), status.get(started)):
                try:
                    os.killpg(status[key], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def final(run_dir: Path, timeout: float = 120) -> dict:
    return wait_for(
        lambda: (
            (s := runs.refresh_status(run_dir)).get("state") in runs.FINAL_STATES
            and not runs.process_alive(s.get("supervisor_pid"), s.get("supervisor_started"))
            and s
        ),
        timeout,
        f"{run_dir.name} to end",
    )


def last_step(run_dir: Path) -> int:
    rows = runs.read_metrics(run_dir)
    return rows[-1]["step"] if rows else 0


def test_stop_queue_bad_data_and_resume(tiny_model_dir, tmp_path, runs_dir):
    """Run A starts; B (bad data, through `tunelab train`) queues behind it; A is stopped
    mid-way (aborted, checkpoint kept); B then starts and fails as `bad data`; A resumes to
    completion with its step count continuing."""
    data = write_data(tmp_path / "data.jsonl")
    # enough steps that the stop below lands mid-run however fast the machine trains
    run_a = launch.submit(make_config(tiny_model_dir, data, runs_dir, max_steps=60), runs_dir)
    assert (run_a / "command.txt").read_text().split()[1:3] == ["-m", "engine.train"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json at all\n', encoding="utf-8")
    b_yaml = tmp_path / "b.yaml"
    make_config(tiny_model_dir, bad, runs_dir).save(b_yaml)
    cli = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "train", "--config", str(b_yaml)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        run_b = wait_for(
            lambda: next((p for p in runs_dir.iterdir() if p.is_dir() and p != run_a), None), 30, "run B to appear"
        )
        wait_for(lambda: runs.read_status(run_b).get("state") == "queued", 30, "run B queued")
        wait_for(lambda: last_step(run_a) >= 2, 120, "run A to train 2 steps")
        assert runs.read_status(run_a)["state"] == "running"
        assert runs.read_status(run_b)["state"] == "queued"  # one job at a time

        status_a = launch.stop(run_a, grace_s=60, wait=True)
        assert status_a["state"] == "aborted"
        assert status_a["exit_code"] == 0
        checkpoints = sorted(int(p.name.split("-")[1]) for p in (run_a / "checkpoints").glob("checkpoint-*"))
        assert len(checkpoints) == 1 and 2 <= checkpoints[0] < 60
        stopped_at = checkpoints[0]
        assert last_step(run_a) == stopped_at
        assert not (run_a / "adapter").exists()

        out, _ = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 1, out
    assert "bad data" in out and "bad.jsonl" in out
    status_b = final(run_b)
    assert status_b["state"] == "failed" and status_b["error_class"] == "bad data"
    assert "bad.jsonl" in status_b["error"]
    assert status_b["started_at"] >= runs.read_status(run_a)["ended_at"]

    launch.resume(run_a)
    status_a = final(run_a)
    assert status_a["state"] == "completed", status_a
    assert status_a["step"] == 60
    steps = [r["step"] for r in runs.read_metrics(run_a)]
    assert steps == list(range(1, stopped_at + 1)) + list(range(stopped_at + 1, 61))
    assert [h["state"] for h in status_a["history"]] == ["aborted"]
    assert (run_a / "adapter" / "adapter_model.safetensors").is_file()
    evaluation = json.loads((run_a / "eval.json").read_text())
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"]
    assert "resuming from checkpoint-" in (run_a / "train.log").read_text()


def test_sigkill_ends_failed_killed(tiny_model_dir, tmp_path, runs_dir):
    run = launch.submit(
        make_config(tiny_model_dir, write_data(tmp_path / "d.jsonl"), runs_dir, max_steps=500), runs_dir
    )
    wait_for(lambda: last_step(run) >= 1, 120, "the first step")
    os.kill(runs.read_status(run)["pid"], signal.SIGKILL)
    status = final(run)
    assert status["state"] == "failed"
    assert status["error_class"] == "killed"
    assert status["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in status["error"] and status["log_tail"]


def test_dead_processes_never_stick_the_queue(tmp_path, runs_dir):
    """A run whose supervisor and trainer died without writing is marked failed, and
    the next queued run gets its turn."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    config = RunConfig()
    ghost = runs.create_run(config, runs_dir)
    runs.update_status(ghost, state="running", pid=dead.pid, supervisor_pid=dead.pid, queued_at=1.0)
    orphan = runs.create_run(config, runs_dir)
    runs.update_status(orphan, state="queued", supervisor_pid=dead.pid, queued_at=2.0)
    waiting = runs.create_run(config, runs_dir)
    me = runs.update_status(
        waiting,
        state="queued",
        supervisor_pid=os.getpid(),
        supervisor_started=runs.process_identity(os.getpid()),
        queued_at=3.0,
    )
    assert launch._my_turn(waiting, me)
    listed = {r["run_id"]: r for r in runs.list_runs(runs_dir)}
    assert listed[ghost.name]["state"] == "failed" and listed[ghost.name]["error_class"] == "killed"
    assert listed[orphan.name]["state"] == "failed"
    assert listed[waiting.name]["state"] == "queued"

    # A stop before the start drops the run from the queue.
    assert launch.stop(waiting)["state"] == "aborted"


def test_build_command_for_one_and_many_devices(tmp_path):
    config = RunConfig()
    run_dir = tmp_path / "run"
    assert launch.build_command(config, run_dir, python="/py") == [
        "/py",
        "-m",
        "engine.train",
        "--config",
        str(run_dir / "config.yaml"),
        "--run-dir",
        str(run_dir),
    ]
    zero3 = config.with_overrides(["distributed.num_processes=4", "distributed.deepspeed=zero3"])
    command = launch.build_command(zero3, run_dir, python="/venv/bin/python")
    assert command[1:8] == [
        "launch",
        "--num_processes",
        "4",
        "--num_machines",
        "1",
        "--use_deepspeed",
        "--deepspeed_config_file",
    ]
    assert command[8].endswith("engine/deepspeed/zero3.json")
    assert command[9:12] == ["-m", "engine.train", "--config"]

    nodes = config.with_overrides(
        [
            "distributed.num_processes=8",
            "distributed.num_machines=2",
            "distributed.deepspeed=zero2",
            "distributed.offload=true",
        ]
    )
    with pytest.raises(ConfigError, match="main-process-ip"):
        launch.build_command(nodes, run_dir)
    command = launch.build_command(
        nodes, run_dir, machine_rank=1, main_process_ip="10.0.0.1", overrides=["training.max_steps=5"]
    )
    text = " ".join(command)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in text
    assert "--main_process_port 29500" in text and text.endswith("--set training.max_steps=5")
    assert "zero2_offload.json" in text


def test_deepspeed_files_match_the_trainer():
    """Every ZeRO file leaves precision and batch sizes to the trainer ("auto"), so TRL's
    settings and DeepSpeed's never disagree."""
    files = sorted((REPO / "engine" / "deepspeed").glob("*.json"))
    assert [f.name for f in files] == ["zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    for f in files:
        cfg = json.loads(f.read_text())
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert cfg[key] == "auto"
        stage = cfg["zero_optimization"]["stage"]
        assert f.name.startswith(f"zero{stage}")
        assert ("offload_optimizer" in cfg["zero_optimization"]) == ("offload" in f.name)
    assert (
        json.loads((REPO / "engine/deepspeed/zero3.json").read_text())["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        is True
    )


def test_metrics_reader_is_incremental_and_tail_log(tmp_path):
    reader = runs.MetricsReader(tmp_path)
    assert reader.read_new() == []
    with (tmp_path / "metrics.jsonl").open("w") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"step": 3')  # the third line is still being written
        f.flush()
        assert [r["step"] for r in reader.read_new()] == [1, 2]
        assert reader.read_new() == []
        f.write(', "loss": 1.5}\n')
        f.flush()
        assert reader.read_new() == [{"step": 3, "loss": 1.5}]
    (tmp_path / "train.log").write_text("a\nprogress 1%\rprogress 50%\rprogress 100%\nb\n" + "x\n" * 3)
    assert runs.tail_log(tmp_path, 5) == "progress 100%\nb\nx\nx\nx"
    assert runs.tail_log(tmp_path / "missing") == ""


def test_runs_cli_lists_json(tmp_path, runs_dir, capsys):
    import argparse

    run = runs.create_run(RunConfig(), runs_dir)
    runs.update_status(run, state="completed", step=3, max_steps=3)
    from engine import runs_cli

    parser = argparse.ArgumentParser()
    runs_cli.add_cli_arguments(parser)
    assert runs_cli.run_cli(parser.parse_args(["--runs-dir", str(runs_dir), "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["run_id"] == run.name and rows[0]["state"] == "completed" and rows[0]["method"] == "lora"
    assert runs_cli.run_cli(parser.parse_args(["show", run.name[:12], "--runs-dir", str(runs_dir), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert runs_cli.run_cli(parser.parse_args(["stop", "nope", "--runs-dir", str(runs_dir)])) == 1


def test_direct_python_m_engine_train_refuses_a_distributed_config(tmp_path):
    """`python -m engine.train` is one process; a ZeRO config must go through the launcher."""
    cfg = RunConfig().with_overrides(
        ["distributed.num_processes=2", "distributed.deepspeed=zero2", f"output.runs_dir={tmp_path / 'runs'}"]
    )
    path = tmp_path / "run.yaml"
    cfg.save(path)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 1
    assert "tunelab train" in proc.stderr and "config error" in proc.stderr
    assert yaml.safe_load(path.read_text())["distributed"]["deepspeed"] == "zero2"


def test_tunelab_train_follows_the_log_and_ctrl_c(tiny_model_dir, tmp_path, runs_dir):
    """`tunelab train` prints the log as it grows. Ctrl-C stops following, not the run;
    with --foreground, Ctrl-C stops the run (a checkpoint is saved, exit status 3)."""
    config_file = tmp_path / "run.yaml"
    make_config(tiny_model_dir, write_data(tmp_path / "d.jsonl"), runs_dir, max_steps=500).save(config_file)

    def start(*extra):
        return subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "train", "--config", str(config_file), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def newest_run():
        dirs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        return dirs[-1] if dirs else None

    cli = start()
    try:
        run = wait_for(newest_run, 30, "the run directory")
        wait_for(lambda: last_step(run) >= 1, 120, "the first step")
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0
    assert "[tunelab] run " in out and "stopped following; the run goes on" in out
    assert runs.refresh_status(run)["state"] == "running"
    assert launch.stop(run, grace_s=60, wait=True)["state"] == "aborted"

    cli = start("--foreground")
    try:
        run2 = wait_for(lambda: (r := newest_run()) != run and r, 30, "the second run directory")
        wait_for(lambda: last_step(run2) >= 1, 120, "the first step of the second run")
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == launch.EXIT_ABORTED, out
    assert "stopping the run" in out and f"run {run2.name}: aborted" in out
    assert list((run2 / "checkpoints").glob("checkpoint-*"))


def test_users_of_one_app_share_one_queue(tmp_path, runs_dir):
    """The web app keeps each user's runs in <runs>/users/<user>/: a run of bob's waits for
    alice's running one, and the queue lock sits at the top runs directory."""
    alice_dir = runs_dir / "users" / "alice-1"
    bob_dir = runs_dir / "users" / "bob-2"
    config = RunConfig()
    alice = runs.create_run(config, alice_dir)
    runs.update_status(
        alice,
        state="running",
        pid=os.getpid(),
        pid_started=runs.process_identity(os.getpid()),
        supervisor_pid=os.getpid(),
        supervisor_started=runs.process_identity(os.getpid()),
        queued_at=1.0,
    )
    bob = runs.create_run(config, bob_dir)
    me = runs.update_status(
        bob,
        state="queued",
        supervisor_pid=os.getpid(),
        supervisor_started=runs.process_identity(os.getpid()),
        queued_at=2.0,
    )
    assert launch.queue_root(bob) == launch.queue_root(alice) == runs_dir
    assert set(launch.queue_members(runs_dir)) == {alice, bob}
    assert not launch._my_turn(bob, me), "bob must wait while alice trains"
    runs.update_status(alice, state="completed")
    assert launch._my_turn(bob, me)
    # A plain runs directory is its own queue.
    assert launch.queue_root(runs.create_run(config, tmp_path / "plain")) == tmp_path / "plain"

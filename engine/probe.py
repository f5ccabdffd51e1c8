"""Measure before training: a probe run of a few real optimizer steps.

``tunelab train --config FILE --probe`` (the Train tab's "Measure first") runs the real
config, data and hardware for :data:`WARMUP_STEPS` + :data:`TIMED_STEPS` optimizer steps on
the longest training examples (the peak comes from the longest sequences), waiting in the
training queue like any run. It measures:

* peak memory: the process's peak resident memory above what it held before the model was
  loaded, and the GPU's peak allocation where there is a GPU;
* seconds per optimizer step after the warm-up step, and tokens per second;

then projects the whole run (its steps from the config and the data, at the measured
tokens per second) and sets it beside the formula's estimate (engine.hardware), with the
ratio between the two. The result is ``RUN/probe.json`` (and a table in the log); the run
directory is marked ``probe`` in status.json, so run lists leave it out unless asked.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

from engine import runs

WARMUP_STEPS = 1
TIMED_STEPS = 2
PROBE_FILE = "probe.json"


def steps() -> int:
    """Optimizer steps a probe runs."""
    return WARMUP_STEPS + TIMED_STEPS


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_clock():
    """A TrainerCallback that keeps the wall time and the tokens seen at the end of every
    optimizer step in ``.marks`` (transformers is imported here, not when the CLI reads a
    report)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepClock()


def longest_first(lengths: list[int], count: int) -> list[int]:
    """Indices of the ``count`` longest examples (repeated when there are fewer)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return (order * math.ceil(count / max(len(order), 1)))[:count]


def planned_steps(config, n_examples: int, world: int = 1) -> int:
    """Optimizer steps of the whole run, as the trainer will count them."""
    t = config.training
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / (t.batch_size * world)) / t.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * t.num_epochs))


def formula(config, model_dir: Path, precision: str, seq_len: int, n_examples: int, mean_tokens: float) -> dict:
    """engine.hardware's estimate for this config: peak bytes and seconds."""
    from engine import hardware

    shape = hardware.ModelShape.from_dir(model_dir)
    stage = {"none": 0, "zero2": 2, "zero3": 3}[config.distributed.deepspeed]
    world = config.distributed.num_processes * config.distributed.num_machines
    profile = hardware.detect(config.output.runs_dir or ".")
    est = hardware.estimate_memory(
        shape,
        config.method.name,
        precision,
        config.training.batch_size,
        seq_len,
        config.method.r,
        stage,
        world,
        config.training.gradient_checkpointing,
        config.training.stage,
        config.training.precompute_reference,
        cpu=profile.device == "cpu",
    )
    steps = planned_steps(config, n_examples, world)
    tokens = steps * config.training.batch_size * config.training.gradient_accumulation_steps * world * mean_tokens
    seconds = hardware.estimate_seconds(shape, config.method.name, tokens, profile, world, precision)
    return {"peak_bytes": int(est.total), "parts": est.to_dict(), "seconds": round(seconds, 1), "seq_len": seq_len}


def run(config, run_dir: Path, trainer_kit) -> dict:
    """The probe (engine.train's ``--probe``): returns a summary like engine.train.train's.

    ``trainer_kit`` is engine.train itself (its build_trainer, say, world_size,
    is_main_process, TrainingDataError), handed over by its caller so that this module,
    which engine.launch reads reports from, never imports the trainer."""
    import torch

    from engine.data import load_for_training

    train = trainer_kit
    run_dir = Path(run_dir)
    before = rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loaded, train_records, _ = load_for_training(config.data)
    if not train_records:
        raise train.TrainingDataError(f"{config.data.path}: no record left to train on")
    n_steps = steps()
    probe_config = config.with_overrides(
        [
            f"training.max_steps={n_steps}",
            "training.eval_steps=0",
            "training.save_steps=1000000",
            "training.report_to=none",
        ]
    )
    clock = step_clock()
    trainer, info = train.build_trainer(probe_config, run_dir, train_records, [], [clock])
    # Only the longest examples: every batch of the probe is among the heaviest of the run.
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    world = train.world_size()
    t = config.training
    per_step = t.batch_size * t.gradient_accumulation_steps * world
    trainer.train_dataset = dataset.select(longest_first(lengths, per_step * n_steps))
    train.say(
        f"probe: {n_steps} optimizer steps ({WARMUP_STEPS} warm-up) on the {min(per_step * n_steps, len(lengths))} "
        f"longest of {len(lengths)} training examples ({max(lengths)} tokens the longest)"
    )
    trainer.train()

    peak = peak_rss_bytes()
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (t_warm, tok_warm), (t_end, tok_end) = clock.marks[WARMUP_STEPS], clock.marks[-1]
    timed = max(len(clock.marks) - 1 - WARMUP_STEPS, 1)
    seconds_per_step = (t_end - t_warm) / timed
    tokens_per_second = (tok_end - tok_warm) / max(t_end - t_warm, 1e-9)
    mean_tokens = sum(lengths) / len(lengths)
    run_steps = planned_steps(config, len(lengths), world)
    run_tokens = run_steps * per_step * mean_tokens
    projected_seconds = run_tokens / tokens_per_second if tokens_per_second > 0 else None
    # Batches are padding-free: the formula is sized for the longest example, as the plan is.
    seq_len = min(config.data.max_length, max(lengths))
    est = formula(config, Path(info["model_dir"]), info["precision"], seq_len, len(lengths), mean_tokens)
    measured_peak = gpu_peak if gpu_peak else peak - before
    report = {
        "precision": info["precision"],
        "device": "cuda" if gpu_peak else "cpu",
        "examples": len(lengths),
        "longest_tokens": max(lengths),
        "mean_tokens": round(mean_tokens, 1),
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "peak_above_before_bytes": peak - before,
        "gpu_peak_bytes": gpu_peak,
        "seconds_per_step": round(seconds_per_step, 3),
        "tokens_per_second": round(tokens_per_second, 1),
        "projected": {
            "steps": run_steps,
            "seconds": round(projected_seconds, 1) if projected_seconds else None,
            "peak_bytes": measured_peak,
            "process_peak_bytes": peak,
        },
        "formula": est,
        "ratio": {  # formula / measured: above 1 the formula overestimates
            "memory": round(est["peak_bytes"] / measured_peak, 2) if measured_peak else None,
            "time": round(est["seconds"] / projected_seconds, 2) if projected_seconds else None,
        },
    }
    if train.is_main_process():
        runs.write_json(run_dir / PROBE_FILE, report)
        train.say(table(report))
    return {
        **info,
        "state": "completed",
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train_loss": None,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds": round(t_end - clock.marks[0][0], 2),
    }


def _gb(n: float | None) -> str:
    from engine.util import fmt_bytes

    return fmt_bytes(n) if n else "-"


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def table(report: dict) -> str:
    """The probe's result beside the formula's estimate, as markdown."""
    p, f, r = report["projected"], report["formula"], report["ratio"]
    memory_what = "GPU peak" if report["device"] == "cuda" else "peak resident memory above the process's start"
    return "\n".join(
        [
            f"Probe: {report['seconds_per_step']} s per optimizer step, {report['tokens_per_second']} tokens/s "
            f"({report['precision']}, the longest examples: {report['longest_tokens']} tokens).",
            "",
            "| | measured, projected to the whole run | formula | formula / measured |",
            "|---|---:|---:|---:|",
            f"| peak memory ({memory_what}) | {_gb(p['peak_bytes'])} | {_gb(f['peak_bytes'])} | {r['memory']} |",
            f"| time for {p['steps']} steps | {_time(p['seconds'])} | {_time(f['seconds'])} | {r['time']} |",
        ]
    )


def read(run_dir: str | Path) -> dict | None:
    return runs.read_json(Path(run_dir) / PROBE_FILE)

"""DeepSpeed ZeRO-2 and ZeRO-3 for real: 2 CPU processes (gloo) through the launcher's
`accelerate launch` command, on the tiny model; the saved adapter loads on its own."""

from __future__ import annotations

import json

import pytest
from test_launch import final, runs_dir, write_data  # noqa: F401  (runs_dir is a fixture)

from engine import launch, runs
from engine.config import RunConfig

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_process_zero_run_completes(stage, tiny_model_dir, tmp_path, runs_dir):  # noqa: F811
    import torch
    from peft import AutoPeftModelForCausalLM

    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(write_data(tmp_path / "d.jsonl", 24)), "max_length": 64, "validation_split": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"max_steps": 4, "batch_size": 2, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-2},
            "distributed": {"num_processes": 2, "deepspeed": stage},
            "output": {"runs_dir": str(runs_dir)},
        }
    )
    run = launch.submit(config, runs_dir)
    command = (run / "command.txt").read_text()
    assert " launch --num_processes 2 " in command and f"deepspeed/{stage}.json" in command
    status = final(run, timeout=240)
    log = (run / "train.log").read_text()
    assert status["state"] == "completed", (status, runs.tail_log(run, 40))
    assert status["exit_code"] == 0
    # Both ranks trained under DeepSpeed with gloo, and precision came out fp32 on this CPU.
    assert "RANK" not in status and status["precision"] == "fp32"
    rows = runs.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 2 processes x batch 2 = 4 sequences per step: the token count covers both ranks.
    assert rows[0]["tokens"] > 4 * 8
    assert (run / "checkpoints" / "checkpoint-4").is_dir()
    assert json.loads((run / "eval.json").read_text())["tuned"]["loss"] > 0
    assert "Traceback" not in log

    adapter = run / "adapter"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # the gathered adapter is not empty
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_two_process_zero2_dpo_run_completes(tiny_model_dir, tmp_path, runs_dir):  # noqa: F811
    rows = [{"prompt": f"Word {i}?", "chosen": "Zebra.", "rejected": "Lion, perhaps."} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(data), "max_length": 48, "validation_split": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"stage": "dpo", "max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2},
            "distributed": {"num_processes": 2, "deepspeed": "zero2"},
            "output": {"runs_dir": str(runs_dir)},
        }
    )
    run = launch.submit(config, runs_dir)
    status = final(run, timeout=240)
    assert status["state"] == "completed", (status, runs.tail_log(run, 40))
    assert status["stage"] == "dpo" and status["reference"] == "the base model with the adapter switched off"
    metrics = runs.read_metrics(run)
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(isinstance(r["rewards_margins"], float) for r in metrics)
    assert json.loads((run / "eval.json").read_text())["stage"] == "dpo"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "Traceback" not in (run / "train.log").read_text()

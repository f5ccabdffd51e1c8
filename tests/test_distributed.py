"""DeepSpeed ZeRO-2 and ZeRO-3 for real: 2 CPU processes (gloo) through the launcher's
`accelerate launch` command, on the tiny model; the saved adapter loads on its own."""

from __future__ import annotations

import json

import pytest
from test_launch import final, runs_dir, write_data  # noqa: F401  (runs_dir is a fixture)

from engine import launch, runs
from engine.config import RunConfig

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "stage,training_stage",
    # ZeRO-2 trains DPO (pairs, the reference as the adapter switched off), ZeRO-3 SFT: each
    # DeepSpeed stage and each trainer family once, without a third 2-process launch (~40 s).
    [("zero2", "dpo"), ("zero3", "sft")],
)
def test_two_process_zero_run_completes(stage, training_stage, tiny_model_dir, tmp_path, runs_dir):  # noqa: F811
    import torch
    from peft import AutoPeftModelForCausalLM

    if training_stage == "dpo":
        pairs = [{"prompt": f"Word {i}?", "chosen": "Zebra.", "rejected": "Lion, perhaps."} for i in range(24)]
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    else:
        data = write_data(tmp_path / "d.jsonl", 24)
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(data), "max_length": 64, "validation_split": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "stage": training_stage,
                "max_steps": 4,
                "batch_size": 2,
                "logging_steps": 1,
                "save_steps": 2,
                "learning_rate": 1e-2,
            },
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
    assert status["exit_code"] == 0 and status["stage"] == training_stage
    # Both ranks trained under DeepSpeed with gloo, and precision came out fp32 on this CPU.
    assert "RANK" not in status and status["precision"] == "fp32"
    rows = runs.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 2 processes x batch 2 = 4 sequences per step: the token count covers both ranks.
    assert rows[0]["tokens"] > 4 * 8
    assert (run / "checkpoints" / "checkpoint-4").is_dir()
    evaluation = json.loads((run / "eval.json").read_text())
    if training_stage == "dpo":
        assert status["reference"] == "the base model with the adapter switched off"
        assert all(isinstance(r["rewards_margins"], float) for r in rows)
        assert evaluation["stage"] == "dpo"
    else:
        assert evaluation["tuned"]["loss"] > 0
    assert "Traceback" not in log

    adapter = run / "adapter"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # the gathered adapter is not empty
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

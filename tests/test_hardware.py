"""Hardware detection and the training plan, with faked device properties for GPU branches."""

import json
from types import SimpleNamespace

from engine import hardware as hw

AVX2_ONLY = "model name\t: Test CPU\nflags\t\t: fpu sse2 avx fma avx2\n"
AMX = "model name\t: Test Xeon\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"

# SmolLM2-135M's shape, without loading anything.
SMOL = hw.ModelShape.from_config(
    {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "head_dim": 64,
    }
)
# An 8B Llama-3-like shape.
LLAMA8B = hw.ModelShape.from_config(
    {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
)


class FakeCuda:
    def __init__(self, devices):
        self.devices = devices

    def is_available(self):
        return bool(self.devices)

    def device_count(self):
        return len(self.devices)

    def get_device_properties(self, i):
        name, mem_gb, major, minor = self.devices[i]
        return SimpleNamespace(name=name, total_memory=int(mem_gb * hw.GB), major=major, minor=minor)


def fake_torch(devices=(), mps=False):
    return SimpleNamespace(
        cuda=FakeCuda(list(devices)),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps)),
    )


def profile(devices=(), cpuinfo=AVX2_ONLY, mps=False, tmp_path="."):
    return hw.detect(tmp_path, cpuinfo_text=cpuinfo, torch_module=fake_torch(devices, mps))


def test_parameter_count_matches_the_real_embedded_model(embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    real = sum(p.numel() for p in model.parameters())
    assert hw.ModelShape.from_dir(embedded_dir).params == real == SMOL.params


def test_lora_trainable_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert hw.ModelShape.from_dir(tiny_model_dir).lora_params_per_rank * 8 == trainable


def test_cpu_without_bf16_instructions_chooses_fp32():
    prof = profile(cpuinfo=AVX2_ONLY)
    assert prof.device == "cpu"
    assert prof.cpu.isa["avx2"] and not prof.cpu.native_bf16
    precision, reason = hw.choose_precision(prof)
    assert precision == "fp32"
    assert "no bf16 instructions" in reason and "slower" in reason


def test_cpu_with_amx_chooses_bf16():
    prof = profile(cpuinfo=AMX)
    assert prof.cpu.isa["amx_bf16"] and prof.cpu.isa["avx512"]
    assert hw.choose_precision(prof)[0] == "bf16"


def test_detect_reads_gpu_properties():
    prof = profile([("NVIDIA A100-SXM4-80GB", 80, 8, 0), ("NVIDIA A100-SXM4-80GB", 80, 8, 0)])
    assert prof.device == "cuda"
    assert len(prof.gpus) == 2 and prof.gpus[1].index == 1
    assert prof.gpus[0].compute_capability == (8, 0) and prof.gpus[0].bf16
    assert prof.device_memory_bytes == 80 * hw.GB
    json.dumps(prof.to_dict())  # serialisable for --json


def test_old_gpu_uses_fp16():
    prof = profile([("Tesla T4", 15, 7, 5)])
    precision, reason = hw.choose_precision(prof)
    assert precision == "fp16" and "Tesla T4" in reason


def test_mps_is_detected_and_uses_fp32():
    prof = profile(mps=True)
    assert prof.device == "mps" and hw.choose_precision(prof)[0] == "fp32"


def test_small_model_on_cpu_plan():
    rec = hw.recommend(profile(cpuinfo=AVX2_ONLY), SMOL, num_examples=200, max_length=512, mean_tokens=120)
    assert rec.precision == "fp32"
    assert rec.method == "lora" and rec.launcher == "python" and rec.deepspeed == "none"
    assert rec.num_processes == 1 and 1 <= rec.batch_size <= 8
    assert set(rec.reasons) >= {"precision", "method", "batch_size", "deepspeed", "launcher"}
    assert all(len(r) > 20 for r in rec.reasons.values())
    # Adapters need far less optimizer memory than full fine-tuning; QLoRA's weights are smallest.
    assert rec.memory["full"].optimizer > 20 * rec.memory["lora"].optimizer
    assert rec.memory["qlora"].weights < rec.memory["lora"].weights
    assert rec.memory["dora"].trainable_params > rec.memory["lora"].trainable_params
    assert "| lora (recommended)" in rec.table()


def test_the_plan_sizes_memory_for_the_longest_example_and_the_cpu():
    """Batches are padding-free: with the data inspected, memory is sized for its longest
    example (up to max_length), not for max_length; the CPU keeps more per token than a GPU."""
    cpu = profile(cpuinfo=AVX2_ONLY)
    blind = hw.recommend(cpu, SMOL, "lora", num_examples=111, max_length=1024, mean_tokens=56)
    seen = hw.recommend(cpu, SMOL, "lora", num_examples=111, max_length=1024, mean_tokens=56, longest_tokens=112)
    short = hw.recommend(cpu, SMOL, "lora", num_examples=111, max_length=112, mean_tokens=56)
    assert seen.memory["lora"].activations == short.memory["lora"].activations
    assert blind.memory["lora"].activations > 3 * seen.memory["lora"].activations
    capped = hw.recommend(cpu, SMOL, "lora", num_examples=111, max_length=64, longest_tokens=112)
    assert capped.memory["lora"].activations < seen.memory["lora"].activations  # cut at max_length
    on_cpu = hw.estimate_memory(SMOL, "lora", "bf16", 8, 128, cpu=True)
    on_gpu = hw.estimate_memory(SMOL, "lora", "bf16", 8, 128)
    assert on_cpu.weights == on_gpu.weights and on_cpu.activations > 1.5 * on_gpu.activations


def test_preference_stages_size_two_answers_and_the_full_reference_copy():
    sft = hw.recommend(profile(cpuinfo=AVX2_ONLY), SMOL, num_examples=200, max_length=512)
    dpo = hw.recommend(profile(cpuinfo=AVX2_ONLY), SMOL, num_examples=200, max_length=512, training_stage="dpo")
    pre = hw.recommend(
        profile(cpuinfo=AVX2_ONLY),
        SMOL,
        num_examples=200,
        max_length=512,
        training_stage="dpo",
        precompute_reference=True,
    )
    orpo = hw.recommend(profile(cpuinfo=AVX2_ONLY), SMOL, num_examples=200, max_length=512, training_stage="orpo")
    # full DPO keeps a frozen copy of the weights (fp32 here: 4 bytes a parameter); adapters none
    assert dpo.memory["full"].reference == SMOL.params * 4 and dpo.memory["lora"].reference == 0
    assert pre.memory["full"].reference == 0 and orpo.memory["full"].reference == 0
    batch = dpo.batch_size
    assert hw.estimate_memory(SMOL, "lora", "fp32", batch, 512, stage="dpo").activations == (
        hw.estimate_memory(SMOL, "lora", "fp32", 2 * batch, 512).activations
    )
    assert "frozen copy" in dpo.reasons["reference"] and "computed once" in pre.reasons["reference"]
    assert "reference" not in sft.reasons and "reference copy" in dpo.table()


def test_8b_model_on_one_24gb_gpu_needs_qlora():
    rec = hw.recommend(profile([("NVIDIA L4", 24, 8, 9)]), LLAMA8B, num_examples=5000, max_length=1024)
    assert rec.precision == "bf16"
    assert rec.method == "qlora"
    assert rec.memory["qlora"].total < 24 * hw.GB < rec.memory["lora"].total


def test_8b_model_on_8_gpus_uses_zero_and_accelerate():
    rec = hw.recommend(
        profile([("NVIDIA H100 80GB HBM3", 80, 9, 0)] * 8),
        LLAMA8B,
        method="full",
        num_examples=100_000,
        max_length=2048,
    )
    assert rec.launcher == "accelerate" and rec.num_processes == 8
    assert rec.deepspeed in ("zero2", "zero3")
    assert "--num_processes 8" in rec.reasons["launcher"]
    # Full fine-tuning of 8B does not fit one GPU without sharding the weights.
    assert rec.deepspeed == "zero3"
    assert rec.memory["full"].total < 80 * hw.GB


def test_zero3_with_qlora_falls_back_to_lora():
    rec = hw.recommend(profile([("Tesla T4", 15, 7, 5)] * 4), LLAMA8B, method="qlora", max_length=4096)
    if rec.deepspeed == "zero3":
        assert rec.method == "lora" and "ZeRO-3" in rec.reasons["method"]


def test_recommendation_applies_to_a_config():
    from engine.config import RunConfig

    rec = hw.recommend(profile([("NVIDIA A100", 40, 8, 0)] * 2), SMOL, num_examples=1000)
    cfg = RunConfig().with_overrides(rec.config_overrides())
    assert cfg.training.precision == "bf16"
    assert cfg.distributed.num_processes == 2 and cfg.distributed.deepspeed == rec.deepspeed


def test_the_plan_picks_epochs_and_learning_rate_from_data_and_model_size():
    from engine.config import RunConfig

    cpu = profile(cpuinfo=AVX2_ONLY)
    few = hw.recommend(cpu, SMOL, num_examples=82, max_length=256)  # identity.json's training split
    many = hw.recommend(cpu, SMOL, num_examples=20_000, max_length=256)
    assert few.num_epochs > many.num_epochs == 1
    assert few.learning_rate > 2e-4  # a 135M model takes larger adapter steps than LoRA's usual default
    assert "82 training examples" in few.reasons["schedule"] and "epochs" in few.reasons["schedule"]
    # The time estimate counts the plan's epochs.
    assert few.seconds["lora"] > hw.recommend(cpu, SMOL, num_examples=82, max_length=256, num_epochs=1).seconds["lora"]
    big = hw.recommend(profile([("NVIDIA A100", 80, 8, 0)]), LLAMA8B, num_examples=82, max_length=256)
    assert big.learning_rate < few.learning_rate
    full = hw.recommend(cpu, SMOL, method="full", num_examples=82, max_length=256)
    assert full.learning_rate < 1e-4
    cfg = RunConfig().with_overrides(["training.max_steps=30", *few.config_overrides()])
    assert cfg.training.num_epochs == few.num_epochs and cfg.training.max_steps == -1
    assert cfg.training.learning_rate == few.learning_rate


def test_cli_json(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    hw.add_cli_arguments(parser)
    assert hw.run_cli(parser.parse_args(["--json", "--examples", "100"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"]["cpu"]["logical_cores"] >= 1
    assert out["recommendation"]["precision"] in ("fp32", "bf16")
    assert set(out["recommendation"]["memory"]) == {"lora", "qlora", "dora", "full"}

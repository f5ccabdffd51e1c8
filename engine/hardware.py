"""Detect the hardware and recommend how to train on it, with a reason for every choice.

``detect()`` returns a :class:`HardwareProfile` (CUDA GPUs, Apple MPS, the CPU and its
instruction sets, RAM, free disk). ``recommend()`` turns a profile, a model and a dataset
into a :class:`Recommendation`: precision, method, batch size and accumulation, DeepSpeed
stage and launcher, each with a one-line reason, and a peak-memory estimate (weights,
gradients, optimizer states, activations) and a time estimate for every method.

Every decision is a small function that returns ``(value, reason)``, so the UI and the CLI
can show why, and the GPU branches can be tested with made-up device properties.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.util import fmt_bytes

GB = 1024**3

# Dense bf16/fp16 tensor-core peak (FLOP/s) of common training GPUs, for time estimates.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A6000": 155e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}
# Fraction of peak that fine-tuning usually reaches (model FLOPs utilisation).
TYPICAL_MFU = {"cuda": 0.35, "mps": 0.25, "cpu": 0.45}
# tunelab's CPU trainer reaches 45.7% of the measured fp32 matmul peak in fp32 and 63% of it in
# bf16 where the CPU multiplies bf16 natively (bench/results/train.md: 162 and 223 tokens/s,
# AVX-512 BF16); the time estimate counts bf16 there as this much faster than fp32.
CPU_BF16_SPEEDUP = 1.4
# Training on the CPU: activation bytes per token per layer in units of the hidden size (34 on
# a GPU), and the runtime's own memory; see estimate_memory.
CPU_ACTIVATION_BYTES = 80
CPU_RUNTIME_BYTES = 200e6


@dataclass
class GPUInfo:
    index: int
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    bf16: bool

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


@dataclass
class CPUInfo:
    model: str
    logical_cores: int
    physical_cores: int
    flags: list[str] = field(default_factory=list)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def isa(self) -> dict[str, bool]:
        return {
            "avx2": self.has("avx2"),
            "fma": self.has("fma"),
            "avx512": self.has("avx512f"),
            "avx512_bf16": self.has("avx512_bf16"),
            "amx_bf16": self.has("amx_bf16"),
        }

    @property
    def native_bf16(self) -> bool:
        return self.has("avx512_bf16") or self.has("amx_bf16")


@dataclass
class HardwareProfile:
    gpus: list[GPUInfo]
    mps: bool
    cpu: CPUInfo
    ram_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    os: str = field(default_factory=platform.platform)

    @property
    def device(self) -> str:
        if self.gpus:
            return "cuda"
        return "mps" if self.mps else "cpu"

    @property
    def device_memory_bytes(self) -> int:
        """Memory of one training device (the smallest GPU, or system RAM)."""
        if self.gpus:
            return min(g.memory_bytes for g in self.gpus)
        return self.ram_available_bytes or self.ram_bytes

    def summary(self) -> "Reason":
        """One line: GPUs, CPU, RAM, free disk (English text; a Reason, so the web app words it)."""
        if self.gpus:
            names = {g.name for g in self.gpus}
            gpu = f"{len(self.gpus)} x {', '.join(sorted(names))} ({self.gpus[0].memory_gb:.0f} GB)"
        else:
            gpu = Reason.of("hardware_mps" if self.mps else "hardware_no_gpu")
        isa = ", ".join(k.upper() for k, v in self.cpu.isa.items() if v) or Reason.of("hardware_no_avx2")
        return Reason.of(
            "hardware",
            gpu=gpu,
            cpu=self.cpu.model,
            threads=self.cpu.logical_cores,
            isa=isa,
            ram=f"{self.ram_bytes / GB:.1f}",
            disk=f"{self.disk_free_bytes / GB:.0f}",
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["device"] = self.device
        data["cpu"]["isa"] = self.cpu.isa
        return data


# --------------------------------------------------------------------------- detection


def read_cpuinfo(text: str | None = None) -> CPUInfo:
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    model, flags = platform.processor() or platform.machine(), []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return CPUInfo(model=model, logical_cores=logical, physical_cores=physical, flags=sorted(set(flags)))


def gpus_from_torch(torch_module) -> list[GPUInfo]:
    """Read CUDA devices through a torch-like module (a fake one in tests)."""
    cuda = torch_module.cuda
    if not cuda.is_available():
        return []
    gpus = []
    for i in range(cuda.device_count()):
        props = cuda.get_device_properties(i)
        cc = (int(props.major), int(props.minor))
        gpus.append(
            GPUInfo(
                index=i,
                name=str(props.name),
                memory_bytes=int(props.total_memory),
                compute_capability=cc,
                bf16=cc >= (8, 0),
            )
        )
    return gpus


def detect(disk_path: str | os.PathLike = ".", cpuinfo_text: str | None = None, torch_module=None) -> HardwareProfile:
    """Detect this machine. ``torch_module`` and ``cpuinfo_text`` exist for tests."""
    import psutil

    if torch_module is None:
        import torch as torch_module
    gpus = gpus_from_torch(torch_module)
    mps_backend = getattr(getattr(torch_module, "backends", None), "mps", None)
    mps = bool(mps_backend and mps_backend.is_available())
    mem = psutil.virtual_memory()
    path = Path(disk_path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return HardwareProfile(
        gpus=gpus,
        mps=mps,
        cpu=read_cpuinfo(cpuinfo_text),
        ram_bytes=int(mem.total),
        ram_available_bytes=int(mem.available),
        disk_free_bytes=int(shutil.disk_usage(path).free),
    )


# --------------------------------------------------------------------------- reasons

# Why the plan chose what it chose: one English sentence per stable code, with parameters.
# The CLI prints the English; the web app words each code in its visitor's language
# (webui/locales: reason.<code>, the same parameters).
REASON_TEXTS = {
    "hardware": "{gpu}; CPU {cpu} ({threads} threads; {isa}); RAM {ram} GB; disk free {disk} GB",
    "hardware_no_gpu": "no GPU",
    "hardware_mps": "Apple MPS",
    "hardware_no_avx2": "no AVX2",
    "precision_bf16_gpu": "{gpu} (compute capability {cc}) has bf16 tensor cores: half the memory of fp32, "
    "no loss scaling needed.",
    "precision_fp16_gpu": "{gpu} has no bf16 (compute capability < 8.0): fp16 mixed precision with loss scaling.",
    "precision_mps": "Apple MPS: fp32 is the reliable choice for training (half precision on MPS is patchy).",
    "precision_cpu_bf16": "This CPU has native bf16 instructions (AVX512-BF16/AMX): bf16 halves memory at full speed.",
    "precision_cpu_fp32": "This CPU has no bf16 instructions (no AVX512-BF16 or AMX): bf16 would be emulated and "
    "many times slower, so fp32 it is (TRL's default bf16=True is overridden).",
    "method_lora_fits": "LoRA trains {share} of the weights and fits easily ({lora} of {budget} usable); full "
    "fine-tuning needs {full} and rarely helps on small chat datasets.",
    "method_qlora": "LoRA needs {lora} but only {budget} is usable: QLoRA keeps the frozen weights in 4-bit NF4 "
    "({qlora}).",
    "method_lora_sharded": "LoRA (with ZeRO-3 sharding across devices below, if there are several).",
    "method_chosen_fits": "{method} chosen by you: about {size} at batch 1, which fits in {budget}.",
    "method_chosen_no_fit": "{method} chosen by you: about {size} at batch 1, which does NOT fit in {budget}.",
    "method_qlora_cpu": "QLoRA runs on this CPU through bitsandbytes but several times slower than LoRA.",
    "method_switched_lora": "Switched to LoRA: 4-bit weights cannot be sharded by ZeRO-3.",
    "deepspeed_zero2": "{n} GPUs: ZeRO-2 shards gradients and optimizer states; the weights ({weights}) fit on "
    "each GPU, so ZeRO-3's extra communication is not needed.",
    "deepspeed_zero3": "{n} GPUs and the model does not fit on one ({total} > {budget}): ZeRO-3 shards weights "
    "too ({per_gpu} per GPU).",
    "deepspeed_none_cpu": "One device: no DeepSpeed. ZeRO pays off when several devices share the states; CPU "
    "ranks would only split the same cores.",
    "deepspeed_none": "One device: no DeepSpeed needed.",
    "launcher_accelerate": "accelerate launch --num_processes {n}: one process per GPU.",
    "launcher_python": "python -m engine.train: a single process uses the whole device.",
    "checkpointing_on": "Activations do not fit even at batch 1: gradient checkpointing on.",
    "checkpointing_off": "Off: activations fit, and recomputing them costs ~30% speed.",
    "batch_cpu": "Batch {batch} per device (on a CPU larger batches do not raise throughput, only latency per "
    "step) x {accum} accumulation x {nproc} process(es) = {total} examples per optimizer step, {steps} steps "
    "per epoch.",
    "batch_gpu": "Batch {batch} per device (the largest that fits) x {accum} accumulation x {nproc} process(es) "
    "= {total} examples per optimizer step, {steps} steps per epoch.",
    "schedule_several": "{n} training examples on a {size}-parameter model: {epochs} epochs, as a small dataset "
    "needs several passes to be learnt.",
    "schedule_one": "{n} training examples on a {size}-parameter model: {epochs} epoch, enough data for one pass.",
    "lr_preference": "Peak learning rate {lr}: {stage} refines a model that already answers, so small steps.",
    "lr_full": "Peak learning rate {lr}: full fine-tuning takes small steps.",
    "lr_small_model": "Peak learning rate {lr}: a small model takes large adapter steps.",
    "lr_lora": "Peak learning rate {lr}: LoRA's usual rate for a model this size.",
    "schedule_steps": "About {steps} optimizer steps, {time} on this machine.",
    "reference_precomputed": "{stage} compares with a reference model: with an adapter it is the model with the "
    "adapter switched off (no copy); a full fine-tune uses reference log-probabilities computed once before "
    "training (no copy).",
    "reference_copy": "{stage} compares with a reference model: with an adapter it is the model with the adapter "
    "switched off (no copy); a full fine-tune keeps a frozen copy ({size}, in the full estimate); "
    "training.precompute_reference avoids it.",
}


class Reason(str):
    """A reason of the plan: its English text (a str, as the CLI prints it) made of parts,
    each a code of :data:`REASON_TEXTS` with its parameters (text, or a Reason of their own),
    for the web app to word in its own language. ``a + b`` joins two reasons."""

    parts: tuple[tuple[str, dict], ...]

    def __new__(cls, parts):
        parts = tuple((code, dict(params)) for code, params in parts)
        obj = super().__new__(cls, " ".join(REASON_TEXTS[code].format(**params) for code, params in parts))
        obj.parts = parts
        return obj

    @classmethod
    def of(cls, code: str, **params) -> "Reason":
        return cls([(code, {k: v if isinstance(v, Reason) else str(v) for k, v in params.items()})])

    def __add__(self, other):
        if isinstance(other, Reason):
            return Reason(self.parts + other.parts)
        return str(self) + other

    def __getnewargs__(self):
        return (self.parts,)

    def __deepcopy__(self, memo):
        return self

    def codes(self) -> list[dict]:
        """The parts as ``{"code": ..., "params": {...}}`` (for --json)."""
        return [
            {"code": code, "params": {k: v.codes() if isinstance(v, Reason) else v for k, v in params.items()}}
            for code, params in self.parts
        ]


# --------------------------------------------------------------------------- decisions


def choose_precision(profile: HardwareProfile) -> tuple[str, Reason]:
    """The training precision for this hardware, and why."""
    if profile.gpus:
        gpu = profile.gpus[0]
        if all(g.bf16 for g in profile.gpus):
            cc = ".".join(map(str, gpu.compute_capability))
            return "bf16", Reason.of("precision_bf16_gpu", gpu=gpu.name, cc=cc)
        return "fp16", Reason.of("precision_fp16_gpu", gpu=gpu.name)
    if profile.mps:
        return "fp32", Reason.of("precision_mps")
    if profile.cpu.native_bf16:
        return "bf16", Reason.of("precision_cpu_bf16")
    return "fp32", Reason.of("precision_cpu_fp32")


def _linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of each linear layer in one decoder block of a Llama-like model."""
    h = cfg["hidden_size"]
    heads = cfg.get("num_attention_heads", 1)
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    inter = cfg.get("intermediate_size", 4 * h)
    return [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    linear_params: int  # parameters in the decoder blocks' linear layers (what LoRA/QLoRA touch)
    lora_params_per_rank: int  # trainable parameters of all-linear LoRA at rank 1
    dora_magnitude_params: int  # extra DoRA magnitude vector entries

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        shapes = _linear_shapes(cfg)
        layers = cfg["num_hidden_layers"]
        h, vocab = cfg["hidden_size"], cfg["vocab_size"]
        linear = layers * sum(i * o for i, o in shapes)
        embed = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
        norms = layers * 2 * h + h
        return cls(
            params=linear + embed + norms,
            layers=layers,
            hidden=h,
            heads=cfg.get("num_attention_heads", 1),
            vocab=vocab,
            linear_params=linear,
            lora_params_per_rank=layers * sum(i + o for i, o in shapes),
            dora_magnitude_params=layers * sum(o for _, o in shapes),
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ModelShape":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    trainable_params: int
    reference: float = 0.0  # a frozen reference copy of the model (dpo/kto with method full)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reference

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def estimate_memory(
    shape: ModelShape,
    method: str,
    precision: str,
    batch_size: int,
    seq_len: int,
    lora_r: int = 16,
    zero_stage: int = 0,
    num_devices: int = 1,
    gradient_checkpointing: bool = False,
    stage: str = "sft",
    precompute_reference: bool = False,
    cpu: bool = False,
) -> MemoryEstimate:
    """Peak bytes on one device for a training step (a planning estimate, not a promise).

    Preference stages (``stage`` dpo, kto, orpo) run the chosen and the rejected answer of
    each pair: twice the sequences. dpo and kto with method ``full`` keep a frozen reference
    copy of the weights (``reference``) unless ``precompute_reference`` computes its
    log-probabilities once before training; adapters need no copy (the reference is the
    model with the adapter switched off), and orpo has no reference.

    Weights at the compute precision (4-bit NF4 for QLoRA's frozen linears), gradients for
    trainable parameters, AdamW's two fp32 moments (plus an fp32 master copy for full
    fine-tuning in half precision), and activations from the standard per-layer estimate
    (about 34·h + 5·heads·s bytes per token per layer in 16-bit, doubled in fp32) plus the
    vocabulary logits. ZeRO-2 divides gradients and optimizer states by the device count,
    ZeRO-3 the weights too.

    ``cpu``: training on the CPU keeps more per token than that GPU estimate: measured with the
    probe on the embedded model (LoRA, bf16, max length 128), the peak above the process start
    was 1648 / 2613 / 4228 MB at batch 4 / 8 / 16 against 34·h's 1.73 GB at batch 8. The CPU
    estimate counts about 80·h bytes per token per layer (autocast keeps fp32 copies of the
    adapters' inputs, the attention runs in its math kernel) plus the runtime's own ~200 MB
    (libraries, thread pools, allocator), which lands within 15% at batch 4-16 there.
    """
    b = 2 if precision in ("bf16", "fp16") else 4
    non_linear = shape.params - shape.linear_params
    if method == "full":
        trainable = shape.params
        weights = shape.params * b
        grads = shape.params * b
        optimizer = shape.params * (8 + (4 if b == 2 else 0))
    else:
        trainable = shape.lora_params_per_rank * lora_r
        if method == "dora":
            trainable += shape.dora_magnitude_params
        if method == "qlora":
            # NF4: half a byte per weight plus one fp32 absmax per 64-weight block.
            weights = shape.linear_params * (0.5 + 4 / 64) + non_linear * b
        else:
            weights = shape.params * b
        weights += trainable * 4
        grads = trainable * 4
        optimizer = trainable * 8
    tokens = batch_size * seq_len * (2 if stage in ("dpo", "kto", "orpo") else 1)
    reference = 0.0
    if stage in ("dpo", "kto") and method == "full" and not precompute_reference:
        reference = shape.params * b
    per_token_layer = shape.hidden * (CPU_ACTIVATION_BYTES if cpu else 34) + 5 * shape.heads * seq_len
    if gradient_checkpointing:
        per_token_layer = shape.hidden * 2 * 2
    activations = tokens * shape.layers * per_token_layer * (b / 2)
    # Logits, their log-softmax and gradient, kept in fp32.
    activations += tokens * shape.vocab * 4 * 3
    if method == "dora":
        # DoRA materialises W + scale·BA to take its column norms: one extra weight matrix.
        activations += max(i * o for i, o in [(shape.hidden, shape.hidden * 4)]) * 4
    if cpu:
        activations += CPU_RUNTIME_BYTES
    if zero_stage >= 2 and num_devices > 1:
        grads /= num_devices
        optimizer /= num_devices
    if zero_stage == 3 and num_devices > 1:
        weights /= num_devices
        reference /= num_devices
    return MemoryEstimate(weights, grads, optimizer, activations, int(trainable), reference)


def peak_flops(profile: HardwareProfile) -> float:
    """Peak FLOP/s of one training device, for time estimates."""
    if profile.gpus:
        name = profile.gpus[0].name
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 50e12
    if profile.mps:
        return 10e12
    # fp32 FMA throughput per core: 2 x 8-lane (AVX2) or 2 x 16-lane (AVX-512) units at ~3 GHz,
    # of which a matmul reaches about half (measured ~100 GFLOP/s on 2 AVX2 cores).
    lanes = 16 if profile.cpu.isa["avx512"] else 8 if profile.cpu.isa["avx2"] else 4
    return profile.cpu.physical_cores * 2 * lanes * 2 * 3e9 * 0.5


def estimate_seconds(
    shape: ModelShape,
    method: str,
    tokens: float,
    profile: HardwareProfile,
    num_devices: int = 1,
    precision: str = "fp32",
) -> float:
    """Training time for ``tokens`` tokens: 6·N FLOPs per token for full fine-tuning, about
    4·N for adapters (no weight gradients for the frozen base), QLoRA ~30% slower for
    de-quantisation, DoRA ~20% slower for its norm. On a CPU with native bf16, bf16 training
    counts CPU_BF16_SPEEDUP faster than fp32."""
    factor = {"full": 6.0, "lora": 4.0, "qlora": 4.0 * 1.3, "dora": 4.0 * 1.2}[method]
    mfu = TYPICAL_MFU[profile.device]
    if profile.device == "cpu" and precision == "bf16" and profile.cpu.native_bf16:
        mfu *= CPU_BF16_SPEEDUP
    if profile.device == "cpu" and method == "qlora":
        mfu /= 4  # 4-bit kernels on the CPU are far from the matmul peak
    return factor * shape.params * tokens / (peak_flops(profile) * mfu * num_devices)


@dataclass
class Recommendation:
    precision: str
    method: str
    batch_size: int
    gradient_accumulation_steps: int
    deepspeed: str
    num_processes: int
    launcher: str
    gradient_checkpointing: bool
    num_epochs: float
    learning_rate: float
    reasons: dict[str, Reason]  # English text; each also carries its codes (Reason.parts)
    memory: dict[str, MemoryEstimate]
    seconds: dict[str, float]
    device_memory_bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = {k: v.to_dict() for k, v in self.memory.items()}
        d["reasons"] = {k: str(v) for k, v in self.reasons.items()}
        d["reason_codes"] = {k: v.codes() for k, v in self.reasons.items() if isinstance(v, Reason)}
        return d

    def config_overrides(self) -> list[str]:
        """``section.key=value`` strings that apply this plan to a RunConfig."""
        return [
            f"training.precision={self.precision}",
            f"method.name={self.method}",
            f"training.batch_size={self.batch_size}",
            f"training.gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"training.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"distributed.deepspeed={self.deepspeed}",
            f"distributed.num_processes={self.num_processes}",
            f"training.num_epochs={self.num_epochs:g}",
            "training.max_steps=-1",  # the epochs decide the length
            f"training.learning_rate={self.learning_rate:g}",
        ]

    def fits(self, method: str) -> bool:
        """Whether ``method``'s estimated peak stays within 90% of the device's memory."""
        return self.memory[method].total <= self.device_memory_bytes * 0.9

    def table_rows(self) -> list[dict]:
        """The comparison of the methods as data: per method whether the plan chose it and
        whether it fits, and the estimates as text (the web app labels them in its language)."""
        return [
            {
                "method": method,
                "recommended": method == self.method,
                "fits": self.fits(method),
                "trainable": f"{est.trainable_params:,}",
                "weights": fmt_bytes(est.weights),
                "grads": fmt_bytes(est.gradients),
                "optimizer": fmt_bytes(est.optimizer),
                "activations": fmt_bytes(est.activations),
                "peak": fmt_bytes(est.total),
                "time": _duration(self.seconds[method]),
            }
            for method, est in self.memory.items()
        ]

    def reference_bytes(self) -> int:
        """The frozen reference copy a full fine-tune of a preference stage keeps (0: none)."""
        return (self.memory.get("full") and self.memory["full"].reference) or 0

    def table(self) -> str:
        """Markdown comparison of the methods on this hardware."""
        rows = [
            "| method | trainable params | weights | grads | optimizer | activations | est. peak | est. time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.table_rows():
            rows.append(
                f"| {r['method']}{' (recommended)' if r['recommended'] else ''} | {r['trainable']} | "
                f"{r['weights']} | {r['grads']} | {r['optimizer']} | {r['activations']} | "
                f"{r['peak']}{'' if r['fits'] else ' (does not fit)'} | {r['time']} |"
            )
        if self.reference_bytes():
            rows.append(f"\nfull includes a frozen reference copy of the model: {fmt_bytes(self.reference_bytes())}.")
        return "\n".join(rows)


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def schedule(params: int, num_examples: int, method: str, stage: str = "sft") -> tuple[float, float, Reason]:
    """Epochs and peak learning rate for ``num_examples`` on a model of ``params`` weights,
    and why: what makes a newcomer's first run show that training worked.

    A few hundred examples seen once barely move a model: small datasets get several passes
    (on the public identity.json, 91 records, one pass at LoRA's usual 2e-4 left the embedded
    135M model answering as its old self). Small models take large adapter steps; large
    models and full fine-tuning need small ones, or they forget what they knew.
    """
    if num_examples <= 300:
        epochs = 3.0
    elif num_examples <= 2000:
        epochs = 2.0
    else:
        epochs = 1.0
    if method == "full":
        lr = 5e-5 if params < 1e9 else 2e-5
    elif params < 1e9:
        lr = 1e-3 if num_examples <= 2000 else 5e-4
    elif params < 10e9:
        lr = 2e-4
    else:
        lr = 1e-4
    if stage != "sft":
        # Preference tuning moves a model that already answers well: the stage's own default
        # (engine.config: a quarter of the method's), whatever the size.
        from engine.config import DEFAULT_LEARNING_RATE, PREFERENCE_LR_FACTOR

        lr = DEFAULT_LEARNING_RATE[method] * PREFERENCE_LR_FACTOR
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    passes = "schedule_several" if epochs > 1 else "schedule_one"
    why = Reason.of(passes, n=num_examples, size=size, epochs=f"{epochs:g}")
    if stage != "sft":
        why += Reason.of("lr_preference", lr=f"{lr:g}", stage=stage.upper())
    else:
        code = "lr_full" if method == "full" else "lr_small_model" if params < 1e9 else "lr_lora"
        why += Reason.of(code, lr=f"{lr:g}")
    return epochs, lr, why


def recommend(
    profile: HardwareProfile,
    model: str | os.PathLike | ModelShape,
    method: str | None = None,
    num_examples: int = 1000,
    max_length: int = 1024,
    mean_tokens: int | None = None,
    num_epochs: float | None = None,
    lora_r: int = 16,
    training_stage: str = "sft",
    precompute_reference: bool = False,
    longest_tokens: int | None = None,
) -> Recommendation:
    """A training plan for ``model`` on ``profile`` with a reason for each choice.

    ``method`` None lets the plan choose; a given method is kept and only the rest is fitted
    to it (with a warning reason when it does not fit). ``mean_tokens`` is the average
    example length, when the data has been inspected (else half of ``max_length``).
    ``num_epochs`` None lets the plan choose the epochs and learning rate (:func:`schedule`).
    ``training_stage`` (engine.config.STAGES) and ``precompute_reference`` size a preference
    stage: two answers per example and, for a full fine-tune, its reference copy.
    ``longest_tokens`` is the longest example, when the data has been inspected: batches are
    padding-free, so memory is sized for the longest example up to ``max_length`` (without
    it, for ``max_length``: Pip's 112-token chats at max length 1024 were sized for 13 GB
    against 2.4 GB measured).
    """
    shape = model if isinstance(model, ModelShape) else ModelShape.from_dir(model)
    reasons: dict[str, Reason] = {}
    precision, reasons["precision"] = choose_precision(profile)
    n_dev = len(profile.gpus) if profile.gpus else 1
    budget = profile.device_memory_bytes * 0.9
    seq = min(max_length, longest_tokens) if longest_tokens else max_length

    def mem(m: str, batch: int = 1, stage: int = 0, ckpt: bool = False) -> MemoryEstimate:
        return estimate_memory(
            shape,
            m,
            precision,
            batch,
            seq,
            lora_r,
            stage,
            n_dev,
            ckpt,
            training_stage,
            precompute_reference,
            cpu=profile.device == "cpu",
        )

    # Method: LoRA unless it does not fit; QLoRA when only 4-bit weights fit.
    if method is None:
        if mem("lora").total <= budget:
            method = "lora"
            reasons["method"] = Reason.of(
                "method_lora_fits",
                share=f"{mem('lora').trainable_params / shape.params:.1%}",
                lora=fmt_bytes(mem("lora").total),
                budget=fmt_bytes(budget),
                full=fmt_bytes(mem("full").total),
            )
        elif mem("qlora").total <= budget and profile.device == "cuda":
            method = "qlora"
            reasons["method"] = Reason.of(
                "method_qlora",
                lora=fmt_bytes(mem("lora").total),
                budget=fmt_bytes(budget),
                qlora=fmt_bytes(mem("qlora").total),
            )
        else:
            method = "lora"
            reasons["method"] = Reason.of("method_lora_sharded")
    else:
        est = mem(method)
        code = "method_chosen_fits" if est.total <= budget else "method_chosen_no_fit"
        reasons["method"] = Reason.of(code, method=method, size=fmt_bytes(est.total), budget=fmt_bytes(budget))
        if method == "qlora" and profile.device == "cpu":
            reasons["method"] += Reason.of("method_qlora_cpu")

    # DeepSpeed and launcher.
    stage = 0
    if n_dev > 1:
        if mem(method).total <= budget:
            stage = 2
            reasons["deepspeed"] = Reason.of("deepspeed_zero2", n=n_dev, weights=fmt_bytes(mem(method).weights))
        else:
            stage = 3
            reasons["deepspeed"] = Reason.of(
                "deepspeed_zero3",
                n=n_dev,
                total=fmt_bytes(mem(method).total),
                budget=fmt_bytes(budget),
                per_gpu=fmt_bytes(mem(method, stage=3).total),
            )
            if method == "qlora":
                method = "lora"
                reasons["method"] += Reason.of("method_switched_lora")
        launcher, nproc = "accelerate", n_dev
        reasons["launcher"] = Reason.of("launcher_accelerate", n=n_dev)
    else:
        launcher, nproc = "python", 1
        reasons["deepspeed"] = Reason.of("deepspeed_none_cpu" if profile.device == "cpu" else "deepspeed_none")
        reasons["launcher"] = Reason.of("launcher_python")

    # Batch size: the largest power of two whose activations fit, capped for small data.
    ckpt = False
    batch = 1
    for candidate in (1, 2, 4, 8, 16, 32):
        if mem(method, candidate, stage).total <= budget:
            batch = candidate
    if mem(method, 1, stage).total > budget:
        ckpt = True
        reasons["gradient_checkpointing"] = Reason.of("checkpointing_on")
    else:
        reasons["gradient_checkpointing"] = Reason.of("checkpointing_off")
    if profile.device == "cpu":
        batch = min(batch, 8)
        batch_code = "batch_cpu"  # larger batches do not raise a CPU's throughput
    else:
        batch_code = "batch_gpu"  # the largest that fits
    target = 16
    batch = min(batch, target)
    accum = max(1, target // (batch * nproc))
    steps_per_epoch = max(1, math.ceil(num_examples / (batch * accum * nproc)))
    if steps_per_epoch < 20 and accum > 1:
        accum = max(1, num_examples // (batch * nproc * 20))
        steps_per_epoch = max(1, math.ceil(num_examples / (batch * accum * nproc)))
    reasons["batch_size"] = Reason.of(
        batch_code, batch=batch, accum=accum, nproc=nproc, total=batch * accum * nproc, steps=steps_per_epoch
    )

    epochs, lr, reasons["schedule"] = schedule(shape.params, num_examples, method, training_stage)
    if num_epochs is not None:
        epochs = num_epochs
    tokens = num_examples * (mean_tokens or max_length / 2) * epochs
    memory = {m: mem(m, batch, stage, ckpt) for m in ("lora", "qlora", "dora", "full")}
    if training_stage in ("dpo", "kto"):
        if precompute_reference:
            reasons["reference"] = Reason.of("reference_precomputed", stage=training_stage.upper())
        else:
            size = fmt_bytes(memory["full"].reference)
            reasons["reference"] = Reason.of("reference_copy", stage=training_stage.upper(), size=size)
    seconds = {m: estimate_seconds(shape, m, tokens, profile, nproc, precision) for m in memory}
    reasons["schedule"] += Reason.of(
        "schedule_steps", steps=math.ceil(steps_per_epoch * epochs), time=_duration(seconds[method])
    )
    return Recommendation(
        precision=precision,
        method=method,
        batch_size=batch,
        gradient_accumulation_steps=accum,
        deepspeed={0: "none", 2: "zero2", 3: "zero3"}[stage],
        num_processes=nproc,
        launcher=launcher,
        gradient_checkpointing=ckpt,
        num_epochs=epochs,
        learning_rate=lr,
        reasons=reasons,
        memory=memory,
        seconds=seconds,
        device_memory_bytes=profile.device_memory_bytes,
    )


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the profile and the plan as JSON.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model to plan for (default: embedded).")
    parser.add_argument("--method", choices=("lora", "qlora", "dora", "full"), help="Keep this method.")
    parser.add_argument("--examples", type=int, default=1000, help="Number of training examples.")
    parser.add_argument("--max-length", type=int, default=1024, help="Cutoff length in tokens.")
    parser.add_argument("--mean-tokens", type=int, help="Average example length, if known.")
    parser.add_argument("--longest-tokens", type=int, help="Longest example, if known (sizes the memory).")


def run_cli(args) -> int:
    import sys

    from engine.models import ModelNotFoundError, resolve_model

    profile = detect()
    try:
        model_dir = resolve_model(args.model)
    except ModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rec = recommend(
        profile,
        model_dir,
        args.method,
        args.examples,
        args.max_length,
        args.mean_tokens,
        longest_tokens=args.longest_tokens,
    )
    if args.json:
        print(json.dumps({"profile": profile.to_dict(), "recommendation": rec.to_dict()}, indent=2))
        return 0
    print(f"Hardware: {profile.summary()}\n")
    print(
        f"Plan for {args.model} ({ModelShape.from_dir(model_dir).params / 1e6:.0f}M parameters), "
        f"{args.examples} examples, cutoff {args.max_length} tokens:"
    )
    plan = {
        "precision": rec.precision,
        "method": rec.method,
        "batch_size": rec.batch_size,
        "gradient_accumulation_steps": rec.gradient_accumulation_steps,
        "deepspeed": rec.deepspeed,
        "launcher": f"{rec.launcher} ({rec.num_processes} process{'es' if rec.num_processes > 1 else ''})",
    }
    for key, value in plan.items():
        reason = rec.reasons.get(key, "")
        print(f"  {key:<28} {value!s:<14} {reason}")
    print()
    print(rec.table())
    return 0

"""Merge a run's adapter, export it to ONNX, and check that the exports still answer the same.

``tunelab export RUN --format merged|onnx --precision int4|int8|fp32``

* :func:`merge` loads the base model in full precision (also for QLoRA, whose adapter was
  trained on 4-bit weights: merging into those would bake the quantisation error in),
  applies the adapter with PEFT, merges it, and saves a standard transformers directory
  with the tokenizer and an inference chat template under ``RUN/export/merged``. A full
  fine-tune is re-saved from ``RUN/model``.
* :func:`export_onnx` runs onnxruntime-genai's model builder on that directory, as a
  subprocess (no shell) whose output streams to the progress callback, into
  ``RUN/export/onnx-<precision>``. The result holds everything ONNX Runtime GenAI needs:
  ``model.onnx``, ``genai_config.json`` (its eos list includes ``<|im_end|>``), the
  tokenizer and the chat template.
* :func:`write_parity_report` compares what exists under ``RUN/export`` on fixed probe
  chats and writes ``parity.json`` and ``parity.md`` there: merged vs unmerged logits,
  ONNX greedy continuations and token agreement vs PyTorch, perplexity (validation split
  if the run has one, else the probes), tokenizer parity, file sizes and decode speed.

Every step writes into a temporary directory and renames it when done, so an interrupted
export never leaves a half-written ``merged/`` or ``onnx-*/`` behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import (
    AUTO_ORDER,
    DEFAULT_ONNX_PRECISION,
    DEFAULT_ONNX_VARIANT,
    ONNX_LORA_BASE,
    ONNX_VARIANTS,
    ExportGate,
)
from engine.launch import EXPORT_JOBS
from engine.util import atomic_dir, dir_size, fmt_bytes, load_tokenizer

FORMATS = ("merged", "onnx")
PRECISIONS = ("int4", "int8", "fp32")  # what the model builder's --precision takes
EXECUTION_PROVIDERS = ("auto", "cpu", "cuda")
# int4 weight block size. Measured on SmolLM2-135M on a 2-core CPU (bench/): 32 (the
# builder's default) decodes ~90 tokens/s, 64 ~105, 128 ~110-150; teacher-forced greedy
# agreement with PyTorch is 70%, 69% and 66%, but at 128 even "What is the capital of
# France?" turns into nonsense. 64 keeps the answers and most of the speed.
DEFAULT_BLOCK_SIZE = 64
STAMP = "tunelab-export.json"
# accuracy_level 4 (int8 activations in MatMulNBits): the builder's own choice for the CPU,
# also set on the nodes onnxruntime's HQQ quantizer writes (it leaves the attribute out).
CPU_ACCURACY_LEVEL = 4
# GPTQ in onnxruntime 1.2x (its neural_compressor port) fake-quantizes each weight on its own
# grid, then quantizes the result again for MatMulNBits: with symmetric scales the two grids
# differ and the second rounding undoes the error compensation (a tiny Pip-trained model:
# 75.9% token agreement, against 98.1% for plain RTN). Asymmetric scales match, so GPTQ is
# asymmetric here (99.1%). Its zero points are packed two per byte across a column's blocks,
# which fails unless every weight has an even number of blocks: GPTQ_BLOCK_SIZES are tried
# in order (32 fits SmolLM2's 576 and 1536 rows: 18 and 48 blocks).
GPTQ_BLOCK_SIZES = (32, 64, 16)
GPTQ_CALIBRATION_CHATS = 32  # training chats fed to GPTQ (each at most GPTQ_CALIBRATION_TOKENS tokens)
GPTQ_CALIBRATION_TOKENS = 128

# Every ONNX export variant (names: engine.config.ONNX_VARIANTS; directory RUN/export/onnx-<name>).
# "builder": the model builder's --precision; "extra": its --extra_options; "quantizer": one of
# onnxruntime.quantization.matmul_nbits_quantizer's configs applied to the builder's fp32 model
# (HQQ and GPTQ are not builder options). onnxruntime-genai 0.18 reads algo_config, block_size,
# nodes_to_exclude and accuracy_level, and ignores the int4_* names its help still lists.
VARIANTS: dict[str, dict[str, Any]] = {
    "int4": {"builder": "int4", "extra": {}, "about": "int4, the builder's default (round to nearest)"},
    "int4-rtn": {"builder": "int4", "extra": {"algo_config": "rtn"}, "about": "int4, the builder's RTN"},
    "int4-kquant": {
        "builder": "int4",
        "extra": {"algo_config": "k_quant"},
        "block_size": 32,  # asymmetric: needs an even number of blocks per row (GPTQ_BLOCK_SIZES)
        "about": "int4, the builder's k-quant (block size 32)",
    },
    "int4-hqq": {"builder": "fp32", "quantizer": "hqq", "about": "int4 by onnxruntime's HQQ (no data)"},
    "int4-gptq": {
        "builder": "fp32",
        "quantizer": "gptq",
        "about": "int4 by onnxruntime's GPTQ, calibrated on the run's training split",
    },
    "int4-rtn-last": {
        "builder": "int4",
        "extra": {"algo_config": "rtn_last"},
        "about": "int4 RTN with the LM head in int8",
    },
    "int4-kquant-mixed": {
        "builder": "int4",
        "extra": {"algo_config": "k_quant_mixed"},
        "block_size": 32,
        "about": "int4 k-quant (block size 32) with the LM head and the most sensitive layers in int8",
    },
    "int8": {"builder": "int8", "extra": {}, "about": "int8 weights"},
    "fp32": {"builder": "fp32", "extra": {}, "about": "full precision"},
}
MERGE_TOLERANCE = 1e-3  # max |logit difference| accepted between merged and unmerged (fp32)

Progress = Callable[[str], None]

# Probe chats of the parity report: each has a reference answer, used to measure
# perplexity when the run has no validation split.
PROBES: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "answer": "The capital of France is Paris.",
    },
    {
        "messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}],
        "answer": "Red leaves drift and fall,\nwhispering to the cold ground:\nsummer says goodbye.",
    },
    {
        "messages": [{"role": "user", "content": "Explain in one sentence what a neural network is."}],
        "answer": "A neural network is a model made of layers of simple units that learn patterns from data "
        "by adjusting the weights of their connections.",
    },
    {
        "messages": [{"role": "user", "content": "Translate 'good morning' into German and Spanish."}],
        "answer": "German: Guten Morgen. Spanish: Buenos días.",
    },
    {
        "messages": [
            {"role": "user", "content": "Hi! My name is Ana."},
            {"role": "assistant", "content": "Nice to meet you, Ana! How can I help you today?"},
            {"role": "user", "content": "What is my name?"},
        ],
        "answer": "Your name is Ana.",
    },
]

# Texts on which the ONNX Runtime GenAI tokenizer must give the transformers ids.
TOKENIZER_TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "  leading spaces,\ttabs\nand new lines\n\n  end ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語, 中文, 한국어, emoji 🙂🚀👩‍💻",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nSpecial tokens inside text<|im_end|>\n<|im_start|>assistant\n",
]


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


# --------------------------------------------------------------------------- helpers


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda msg: None)


def _signature(path: Path) -> list:
    """Names, sizes and modification times of the files under ``path``."""
    if not path.exists():
        return []
    return sorted(
        [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in path.rglob("*")
        if p.is_file() and p.name != STAMP
    )


def _read_stamp(directory: Path) -> dict | None:
    path = directory / STAMP
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def run_source(run_dir: Path) -> dict:
    """What a run holds: ``{"kind": "adapter"|"full", "dir", "base", "config"}``."""
    from engine.config import RunConfig
    from engine.models import resolve_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = RunConfig.load(config_path)
    if (run_dir / "model" / "config.json").is_file():
        return {"kind": "full", "dir": run_dir / "model", "base": None, "config": cfg}
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return {
            "kind": "adapter",
            "dir": run_dir / "adapter",
            "base": resolve_model(cfg.model.name_or_path),
            "config": cfg,
        }
    raise ExportError(
        f"{run_dir}: nothing to export: no adapter/adapter_config.json nor model/config.json "
        "(is the run still training, or did it fail?)"
    )


# --------------------------------------------------------------------------- merge


def _save_tokenizer(tokenizer, directory: Path, chat_template: str | None) -> None:
    """Save the tokenizer with an inference chat template and eos = <|im_end|> when the
    vocabulary has it, so every runtime stops at the end of a chat turn."""
    from engine.templates import inference_template

    template = inference_template(chat_template or tokenizer.chat_template)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)


def _fix_generation_config(directory: Path, tokenizer) -> list[int]:
    from engine.inference import stop_ids_from

    path = directory / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    eos = gen.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    for tid in sorted(stop_ids_from(tokenizer)):
        if tid not in ids:
            ids.append(tid)
    gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    path.write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return ids


def merge(run_dir: str | Path, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Write ``RUN/export/merged``: the adapter merged into a full-precision copy of the
    base (or the full fine-tune re-saved), with tokenizer and chat template.

    Reused as is when it is newer than the adapter (``force`` rebuilds it).
    """
    import torch
    from transformers import AutoModelForCausalLM

    say = _say(progress)
    run_dir = Path(run_dir)
    source = run_source(run_dir)
    target = run_dir / "export" / "merged"
    wanted = {
        "source": source["kind"],
        "signature": _signature(source["dir"]),
        "base": str(source["base"]) if source["base"] else None,
    }
    stamp = _read_stamp(target)
    if not force and stamp and all(stamp.get(k) == v for k, v in wanted.items()) and (target / "config.json").is_file():
        say(f"Merged model is up to date: {target}")
        return target

    started = time.perf_counter()
    cfg = source["config"]
    with atomic_dir(target) as tmp:
        if source["kind"] == "adapter":
            from peft import PeftModel

            say(f"Loading the base model {source['base']} in full precision...")
            base = AutoModelForCausalLM.from_pretrained(source["base"], dtype=torch.float32)
            say(f"Merging the {cfg.method.name} adapter from {source['dir']}...")
            model = PeftModel.from_pretrained(base, source["dir"], is_trainable=False)
            model = model.merge_and_unload(safe_merge=True)
            tokenizer_dir = source["dir"] if (source["dir"] / "tokenizer_config.json").is_file() else source["base"]
        else:
            say(f"Loading the full fine-tune from {source['dir']}...")
            model = AutoModelForCausalLM.from_pretrained(source["dir"], dtype=torch.float32)
            tokenizer_dir = source["dir"]
        tokenizer = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code)
        say(f"Saving the merged model to {target}...")
        model.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(tokenizer, tmp, cfg.model.chat_template)
        _fix_generation_config(tmp, tokenizer)
        stamp_data = dict(wanted, method=cfg.method.name, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / STAMP).write_text(json.dumps(stamp_data, indent=2), encoding="utf-8")
    say(f"Merged model saved in {time.perf_counter() - started:.1f} s: {target}")
    return target


# --------------------------------------------------------------------------- ONNX


def default_execution_provider() -> str:
    """``cuda`` when both onnxruntime-genai and torch see a CUDA device, else ``cpu``."""
    try:
        import onnxruntime_genai as og

        has_og_cuda = bool(og.is_cuda_available())
    except (ImportError, AttributeError):
        has_og_cuda = False
    if not has_og_cuda:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def builder_command(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    execution_provider: str,
    cache_dir: Path,
    block_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """The model builder's command line (a list: it runs without a shell). ``extra``: more
    ``--extra_options`` (algo_config, nodes_to_exclude as a list, accuracy_level, ...)."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        execution_provider,
        "-c",
        str(cache_dir),
    ]
    options = []
    if precision in ("int4", "int8") and block_size:
        options.append(f"block_size={int(block_size)}")
    for key, value in (extra or {}).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        options.append(f"{key}={value}")
    if options:
        cmd += ["--extra_options", *options]
    return cmd


def _stream_process(cmd: list[str], log_path: Path, progress: Progress, stop: threading.Event | None) -> int:
    """Run ``cmd``, writing its output to ``log_path`` and passing lines to ``progress``
    (progress-bar redraws at most twice a second). ``stop`` terminates it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    last_bar = 0.0
    pending = b""
    with open(log_path, "wb") as log, selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if stop is not None and stop.is_set():
                proc.terminate()
                proc.wait()
                raise ExportError("export stopped")
            if not sel.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            log.write(chunk)
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                # progress bars and per-tensor / per-layer lines: at most two a second
                is_bar = "%|" in line or line.startswith(("Saving ", "Reading layer"))
                now = time.monotonic()
                if is_bar and now - last_bar < 0.5:
                    continue
                last_bar = now if is_bar else last_bar
                progress(line)
        if pending.strip():
            progress(pending.decode("utf-8", errors="replace").strip())
    return proc.wait()


def _finish_onnx_dir(out_dir: Path, hf_dir: Path) -> None:
    """Make the export self-contained for ONNX Runtime GenAI: tokenizer files and the
    chat template next to the model, and ``<|im_end|>`` among its eos ids."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    ):
        if (hf_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    from engine.inference import stop_ids_from
    from engine.templates import inference_template

    tokenizer = load_tokenizer(hf_dir)
    if tokenizer.chat_template:
        (out_dir / "chat_template.jinja").write_text(inference_template(tokenizer.chat_template), encoding="utf-8")
    config_path = out_dir / "genai_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    eos = config["model"].get("eos_token_id", [])
    ids = [eos] if isinstance(eos, int) else list(eos)
    for tid in sorted(stop_ids_from(tokenizer)):
        if tid not in ids:
            ids.append(tid)
    config["model"]["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    config_path.write_text(json.dumps(config, indent=4), encoding="utf-8")


def builder_architectures() -> list[str]:
    """The architectures (config.json "architectures") onnxruntime-genai's model builder has
    a recipe for, read from the installed builder itself (it has no list to ask)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or not spec.origin:
        return []
    source = Path(spec.origin).read_text(encoding="utf-8", errors="replace")
    return sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source)))


def _builder_failure(hf_dir: Path, code: int, log_path: Path) -> str:
    """A sentence for a failed builder run: the model's architecture, the builder's version
    and its own error line (not its traceback), and where the whole log is."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log_path.is_file() else []
    errors = [line.strip() for line in lines if re.match(r"^\s*[A-Za-z_.]*(Error|Exception)\b", line)]
    try:
        architecture = _architecture(hf_dir) or "this model"
    except ExportError:
        architecture = "this model"
    try:
        from importlib.metadata import version

        builder = f"onnxruntime-genai {version('onnxruntime-genai')}"
    except ImportError:
        builder = "onnxruntime-genai"
    said = errors[-1] if errors else (lines[-1] if lines else f"exit code {code}, no output")
    return (
        f"the ONNX model builder ({builder}) could not export {architecture}: {said}. The PyTorch columns "
        f"of the playground still chat with this model. Full log: {log_path}"
    )


def _architecture(hf_dir: Path) -> str | None:
    """config.json's first architecture (None without config.json, or without one given)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return (json.loads(path.read_text(encoding="utf-8")).get("architectures") or [None])[0]
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} cannot be read: {err}") from err


def _check_architecture(hf_dir: Path) -> None:
    """ExportError naming the model's architecture when the builder has no recipe for it
    (a directory without config.json is left to the builder to describe)."""
    if not (hf_dir / "config.json").is_file():
        return
    architecture = _architecture(hf_dir) or "(none given)"
    supported = builder_architectures()
    if supported and architecture not in supported:
        raise ExportError(
            f"{architecture} is not one the ONNX model builder (onnxruntime-genai) can export; it exports "
            f"{', '.join(supported)}. The PyTorch columns of the playground still chat with this model."
        )


def _variant(precision: str) -> dict[str, Any]:
    from engine.config import ONNX_VARIANTS

    if precision not in VARIANTS:
        raise ExportError(f"precision: {precision!r} is not one of {', '.join(ONNX_VARIANTS)} (or auto)")
    return VARIANTS[precision]


def quantize_weights(
    onnx_dir: Path,
    method: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    calibration: list[list[int]] | None = None,
    progress: Progress | None = None,
) -> int:
    """Quantize the MatMul weights of the fp32 ``onnx_dir/model.onnx`` to int4 in place with
    onnxruntime's MatMulNBitsQuantizer: ``hqq`` (HQQWeightOnlyQuantConfig, no data) or ``gptq``
    (GPTQWeightOnlyQuantConfig, calibrated on ``calibration``: token id sequences). Returns
    the block size used (GPTQ picks its own: gptq_block_size)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    say = _say(progress)
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    if method == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif method == "gptq":
        if not calibration:
            raise ExportError(
                "GPTQ needs calibration data: the run's training split gave no chats (check data.path in config.yaml)"
            )
        config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_CalibrationReader(model, calibration, onnx_dir / "genai_config.json"),
            percdamp=0.01,
            actorder=False,
        )
        block_size = gptq_block_size(model)
    else:
        raise ExportError(f"quantizer: {method!r} is not one of hqq, gptq")
    say(f"Quantizing the MatMul weights to int4 with onnxruntime's {method.upper()} (block size {block_size})...")
    started = time.perf_counter()
    quantizer = mnq.MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=method != "gptq",  # GPTQ_BLOCK_SIZES says why GPTQ is asymmetric
        accuracy_level=CPU_ACCURACY_LEVEL,
        algo_config=config,
    )
    quant_logger = logging.getLogger("onnxruntime.quantization")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        # GPTQ prints a progress bar to stdout, which would corrupt `tunelab export --json`
        with contextlib.redirect_stdout(sys.stderr):
            quantizer.process()
    finally:
        quant_logger.setLevel(level)
    quantized = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    for node in quantized.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", CPU_ACCURACY_LEVEL))
    for old in onnx_dir.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(
        quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
    )
    say(f"{method.upper()} int4 quantization done in {time.perf_counter() - started:.1f} s")
    return block_size


def gptq_block_size(model) -> int:
    """The first of GPTQ_BLOCK_SIZES that splits every MatMul weight's rows into an even
    number of blocks (what onnxruntime's GPTQ can pack); ExportError when none does."""
    weights = {init.name: init for init in model.graph.initializer}
    rows = set()
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights:
            dims = list(weights[node.input[1]].dims)
            if len(dims) == 2:
                rows.add(int(dims[0]))
    for size in GPTQ_BLOCK_SIZES:
        if all(r % size == 0 and (r // size) % 2 == 0 for r in rows):
            return size
    raise ExportError(
        f"GPTQ: no block size of {', '.join(map(str, GPTQ_BLOCK_SIZES))} splits the weights' rows "
        f"({', '.join(map(str, sorted(rows)))}) into an even number of blocks; use int4-rtn-last or int8"
    )


class _CalibrationReader:
    """onnxruntime CalibrationDataReader for GPTQ: one prompt at a time, as the exported model's
    inputs (token ids, attention mask, empty past key/values)."""

    def __init__(self, model, sequences: list[list[int]], genai_config: Path):
        import numpy as np
        from onnx import TensorProto

        decoder = json.loads(genai_config.read_text(encoding="utf-8"))["model"]["decoder"]
        kv_shape = (1, int(decoder["num_key_value_heads"]), 0, int(decoder["head_size"]))
        self.feeds = []
        inputs = {i.name: i for i in model.graph.input}
        for ids in sequences:
            feed = {}
            n = len(ids)
            for name, info in inputs.items():
                if name == "input_ids":
                    feed[name] = np.array([ids], dtype=np.int64)
                elif name == "attention_mask":
                    feed[name] = np.ones((1, n), dtype=np.int64)
                elif name == "position_ids":
                    feed[name] = np.arange(n, dtype=np.int64)[None, :]
                elif name.startswith("past_key_values"):
                    dtype = np.float16 if info.type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
                    feed[name] = np.zeros(kv_shape, dtype=dtype)
                else:
                    raise ExportError(f"GPTQ calibration: the exported model has an input {name!r} it cannot feed")
            self.feeds.append(feed)
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return iter(self.feeds)


def build_onnx(
    hf_dir: str | Path,
    out_dir: str | Path,
    precision: str = "int4",
    *,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    extra: dict[str, Any] | None = None,
    calibration: list[list[int]] | None = None,
) -> Path:
    """Export any transformers directory to ONNX with onnxruntime-genai's model builder.
    ``precision`` is a variant (VARIANTS); ``extra`` adds builder ``--extra_options``."""
    say = _say(progress)
    variant = _variant(precision)
    if execution_provider not in EXECUTION_PROVIDERS:
        raise ExportError(f"execution provider: {execution_provider!r} is not one of {', '.join(EXECUTION_PROVIDERS)}")
    ep = default_execution_provider() if execution_provider == "auto" else execution_provider
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_architecture(hf_dir)
    log_path = out_dir.with_name(out_dir.name + ".log")
    options = {**variant.get("extra", {}), **(extra or {})}
    quantizer = variant.get("quantizer")
    started = time.perf_counter()
    requested_block_size = block_size
    block_size = variant.get("block_size", block_size)
    with atomic_dir(out_dir) as tmp:
        cache_dir = tmp.with_name(tmp.name + "-cache")
        cmd = builder_command(hf_dir, tmp, variant["builder"], ep, cache_dir, block_size, options)
        say(f"Building ONNX {precision} for {ep.upper()}: {' '.join(cmd[1:])}")
        try:
            code = _stream_process(cmd, log_path, say, stop)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if code != 0 or not (tmp / "genai_config.json").is_file():
            raise ExportError(_builder_failure(hf_dir, code, log_path))
        if quantizer:
            if stop is not None and stop.is_set():
                raise ExportError("export stopped")
            block_size = quantize_weights(
                tmp, quantizer, block_size=block_size or DEFAULT_BLOCK_SIZE, calibration=calibration, progress=say
            )
        _finish_onnx_dir(tmp, hf_dir)
        stamp = {
            "source": str(hf_dir),
            "source_signature": _signature(hf_dir),
            "precision": precision,
            "variant": f"onnx-{precision}",
            "about": variant["about"],
            "builder_precision": variant["builder"],
            "extra_options": options,
            "quantizer": quantizer,
            "calibration_chats": len(calibration or []) if quantizer == "gptq" else None,
            "execution_provider": ep,
            "block_size": block_size if precision != "fp32" else None,
            "requested_block_size": requested_block_size if precision != "fp32" else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    say(
        f"ONNX {precision} export done in {time.perf_counter() - started:.1f} s: {out_dir} "
        f"({fmt_bytes(dir_size(out_dir), binary=False)})"
    )
    return out_dir


def calibration_sequences(run_dir: Path, limit: int = GPTQ_CALIBRATION_CHATS) -> list[list[int]]:
    """Token ids of the first ``limit`` chats of the run's training split, as the merged
    model's chat template renders them (at most GPTQ_CALIBRATION_TOKENS each)."""
    from engine.data import DataError, load_for_training

    cfg = run_source(run_dir)["config"]
    merged_dir = Path(run_dir) / "export" / "merged"
    if not cfg.data.path or not Path(cfg.data.path).exists():
        return []
    try:
        _, train, _ = load_for_training(cfg.data)
    except (DataError, OSError) as err:
        raise ExportError(f"GPTQ calibration: the run's training data cannot be read: {err}") from err
    tokenizer = load_tokenizer(merged_dir)
    sequences = []
    for record in train[:limit]:
        text = tokenizer.apply_chat_template(record, tokenize=False) if tokenizer.chat_template else None
        if not text:
            text = "\n".join(m["content"] for m in record)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:GPTQ_CALIBRATION_TOKENS]
        if ids:
            sequences.append(list(ids))
    return sequences


def export_onnx(
    run_dir: str | Path,
    precision: str = "int4",
    *,
    progress: Progress | None = None,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    stop: threading.Event | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Merge (if needed) and write ``RUN/export/onnx-<precision>`` (a variant name); reused when
    up to date."""
    say = _say(progress)
    variant = _variant(precision)
    run_dir = Path(run_dir)
    merged = merge(run_dir, progress=progress, force=force)
    out_dir = run_dir / "export" / f"onnx-{precision}"
    stamp = _read_stamp(out_dir)
    ep = default_execution_provider() if execution_provider == "auto" else execution_provider
    if (
        not force
        and stamp
        and stamp.get("source_signature") == _signature(merged)
        and stamp.get("execution_provider") == ep
        and stamp.get("requested_block_size", stamp.get("block_size")) == (block_size if precision != "fp32" else None)
        and stamp.get("extra_options", {}) == {**variant.get("extra", {}), **(extra or {})}
    ):
        say(f"ONNX {precision} export is up to date: {out_dir}")
        return out_dir
    calibration = None
    if variant.get("quantizer") == "gptq":
        calibration = calibration_sequences(run_dir)
        say(f"GPTQ calibration: {len(calibration)} chats of the run's training split")
    return build_onnx(
        merged,
        out_dir,
        precision,
        execution_provider=ep,
        block_size=block_size,
        progress=progress,
        stop=stop,
        extra=extra,
        calibration=calibration,
    )


# --------------------------------------------------------------------------- LoRA adapter files

LORA_BASE = ONNX_LORA_BASE  # RUN/export/onnx-lora-fp32: the base with LoRA inputs (backend name onnx-lora-fp32)
ADAPTERS_DIR = "adapters"  # ... and its adapters/<run>.onnx_adapter


def split_lora_weights(onnx_dir: Path, adapter_file: Path) -> int:
    """Turn the LoRA weights the builder baked into ``onnx_dir/model.onnx`` into graph inputs
    (their rank dimension free) and write their values to ``adapter_file`` with onnxruntime's
    AdapterFormat; onnxruntime-genai's og.Adapters feeds them back at run time. Returns the
    number of LoRA tensors."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    params = {}
    kept = []
    for init in model.graph.initializer:
        is_a, is_b = ".lora_A." in init.name, ".lora_B." in init.name
        if not (is_a or is_b):
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        params[init.name] = ort.OrtValue.ortvalue_from_numpy(values.copy())
        shape: list[Any] = list(values.shape)
        shape[1 if is_a else 0] = "lora_rank"
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, shape))
    if not params:
        raise ExportError(f"{path}: the model builder wrote no LoRA weights (lora_A/lora_B) to split off")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for old in onnx_dir.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
    )
    adapter_file.parent.mkdir(parents=True, exist_ok=True)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    adapter.export_adapter(str(adapter_file))
    return len(params)


def export_adapter_file(
    run_dir: str | Path,
    *,
    progress: Progress | None = None,
    force: bool = False,
    stop: threading.Event | None = None,
) -> dict:
    """Export a LoRA run for ONNX Runtime GenAI's multi-LoRA (og.Adapters): the base model in
    fp32 with LoRA inputs in ``RUN/export/onnx-lora-fp32`` (the same for every run of one base
    and target modules) and the run's adapter as ``adapters/<run>.onnx_adapter`` beside it."""
    say = _say(progress)
    run_dir = Path(run_dir)
    source = run_source(run_dir)
    cfg = source["config"]
    if source["kind"] != "adapter":
        raise ExportError(
            f"{run_dir.name} is a full fine-tune: it has no adapter to export on its own; export the whole "
            "model with --precision auto (or a variant)"
        )
    if cfg.method.name == "dora":
        raise ExportError("a DoRA adapter is not a plain LoRA: ONNX Runtime GenAI adapter files hold LoRA only")
    merged = merge(run_dir, progress=progress, force=force)  # tokenizer and inference chat template
    out_dir = run_dir / "export" / f"onnx-{LORA_BASE}"
    adapter_file = out_dir / ADAPTERS_DIR / f"{run_dir.name}.onnx_adapter"
    stamp = _read_stamp(out_dir) or {}
    if not force and stamp.get("adapter_signature") == _signature(source["dir"]) and adapter_file.is_file():
        say(f"ONNX base + adapter file are up to date: {adapter_file}")
        return {"base": str(out_dir), "adapter_file": str(adapter_file)}
    with atomic_dir(out_dir) as tmp:
        build_onnx(
            source["base"],
            tmp / "model",
            "fp32",
            execution_provider="cpu",
            progress=progress,
            stop=stop,
            extra={"adapter_path": str(source["dir"])},
        )
        for item in (tmp / "model").iterdir():
            item.rename(tmp / item.name)
        (tmp / "model").rmdir()
        count = split_lora_weights(tmp, tmp / ADAPTERS_DIR / adapter_file.name)
        _finish_onnx_dir(tmp, merged)
        stamp = json.loads((tmp / STAMP).read_text(encoding="utf-8"))
        stamp.update(adapter_signature=_signature(source["dir"]), lora_tensors=count, variant=f"onnx-{LORA_BASE}")
        stamp["about"] = "the base in fp32 with LoRA inputs, for og.Adapters; the adapter in adapters/"
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    say(f"LoRA adapter file ({count} tensors): {adapter_file}; base with LoRA inputs: {out_dir}")
    return {"base": str(out_dir), "adapter_file": str(adapter_file)}


# --------------------------------------------------------------------------- tokenizer parity


def check_tokenizer_parity(
    onnx_dir: str | Path, hf_dir: str | Path | None = None, texts: list[str] | None = None
) -> dict:
    """Encode texts (and a rendered multi-turn chat) with transformers and with ONNX Runtime
    GenAI; report whether the ids are identical and the first mismatches."""
    import onnxruntime_genai as og

    onnx_dir = Path(onnx_dir)
    hf_tok = load_tokenizer(hf_dir or onnx_dir)
    og_tok = og.Tokenizer(og.Model(str(onnx_dir)))
    texts = list(texts or TOKENIZER_TEXTS)
    if hf_tok.chat_template:
        for probe in PROBES:
            texts.append(hf_tok.apply_chat_template(probe["messages"], tokenize=False, add_generation_prompt=True))
    mismatches = []
    for text in texts:
        hf_ids = list(hf_tok(text, add_special_tokens=False)["input_ids"])
        og_ids = og_tok.encode(text).tolist()
        if hf_ids != og_ids:
            at = next((i for i, (a, b) in enumerate(zip(hf_ids, og_ids)) if a != b), min(len(hf_ids), len(og_ids)))
            mismatches.append(
                {
                    "text": text[:80],
                    "position": at,
                    "transformers": hf_ids[at : at + 5],
                    "onnxruntime_genai": og_ids[at : at + 5],
                }
            )
    return {"identical": not mismatches, "texts": len(texts), "mismatches": mismatches}


# --------------------------------------------------------------------------- the quality gate


def onnx_variants_present(run_dir: str | Path) -> list[str]:
    """The ONNX exports of a run (variant names, in ONNX_VARIANTS order)."""
    export_dir = Path(run_dir) / "export"
    return [v for v in (*ONNX_VARIANTS, LORA_BASE) if (export_dir / f"onnx-{v}" / "genai_config.json").is_file()]


def _fraction(text: str | None) -> float | None:
    """ "3/5" -> 0.6."""
    if not text or "/" not in str(text):
        return None
    done, total = str(text).split("/", 1)
    return int(done) / int(total) if int(total) else None


def export_verdicts(run_dir: Path) -> dict[str, str]:
    """{"onnx-int4": "faithful", ...} from the run's parity report (export/parity.json)."""
    path = run_dir / "export" / "parity.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {
        f"onnx-{name}": (info.get("verdict") or {}).get("verdict", "no verdict")
        for name, info in (report.get("onnx") or {}).items()
    }


def verdict(figures: dict, gate: ExportGate | None = None) -> dict:
    """The verdict on one ONNX export from its parity figures (``token_agreement``,
    ``greedy_identical`` "n/m", ``perplexity`` {pytorch, onnx}, ``validation_chats``):
    ``{"verdict": faithful|degraded|broken|unmeasured, "passes": bool, "summary": words,
    "reasons": [...], "perplexity_change": relative change or None}``."""
    gate = gate or ExportGate()
    agreement = figures.get("token_agreement")
    identical = _fraction(figures.get("greedy_identical"))
    ppl = figures.get("perplexity") or {}
    change = None
    if ppl.get("pytorch") and ppl.get("onnx") is not None and math.isfinite(ppl["onnx"]):
        change = (ppl["onnx"] - ppl["pytorch"]) / ppl["pytorch"]
    elif ppl.get("pytorch") and ppl.get("onnx") is not None:
        change = math.inf
    chats = int(figures.get("validation_chats") or 0)
    reasons: list[str] = []
    if agreement is not None:
        reasons.append(f"token agreement {agreement:.1%}")
    if change is not None:
        reasons.append(f"validation perplexity {change:+.1%}" if chats else f"probe perplexity {change:+.1%}")
    if identical is not None:
        reasons.append(f"{figures.get('greedy_identical')} replies greedy-identical")
    if chats < gate.min_validation_chats or agreement is None or change is None:
        why = (
            "the run has no validation split"
            if not chats
            else f"the validation split has {chats} chats (fewer than {gate.min_validation_chats})"
        )
        name = "unmeasured"
        summary = f"unmeasured: {why}, so the perplexity change cannot be judged"
    elif agreement < gate.broken_agreement or change > gate.broken_perplexity_change:
        name = "broken"
        summary = "broken: its answers differ from the tuned model's"
    elif (
        agreement >= gate.faithful_agreement
        and abs(change) <= gate.faithful_perplexity_change
        and (identical is None or identical >= gate.faithful_greedy_identical)
    ):
        name = "faithful"
        summary = "faithful: it answers like the tuned model"
    else:
        name = "degraded"
        summary = "degraded: it answers close to, but not like, the tuned model"
    return {
        "verdict": name,
        "passes": name == "faithful",
        "summary": f"{summary} ({', '.join(reasons)})" if reasons else summary,
        "reasons": reasons,
        "perplexity_change": None if change is None else (round(change, 4) if math.isfinite(change) else None),
    }


def advice(precision: str, report: dict) -> str | None:
    """For an export that is not faithful: which precision or setting would do better (a
    faithful export of the report, the fastest first; else the next candidate of auto mode)."""
    info = report.get("onnx", {}).get(precision, {})
    if (info.get("verdict") or {}).get("verdict") in ("faithful", None):
        return None
    speed = report.get("speed", {})
    faithful = [
        name
        for name, other in report.get("onnx", {}).items()
        if name != precision and (other.get("verdict") or {}).get("passes")
    ]
    faithful.sort(key=lambda n: -(speed.get(f"onnx_{n}") or {}).get("decode_tokens_per_s", 0))
    if faithful:
        best = faithful[0]
        tps = (speed.get(f"onnx_{best}") or {}).get("decode_tokens_per_s")
        return f"use onnx-{best}: it is faithful" + (f" ({tps:.0f} tokens/s)" if tps else "")
    if (info.get("verdict") or {}).get("verdict") == "unmeasured":
        return "give the run a validation split (data.validation_split) to measure it"
    later = [v for v in AUTO_ORDER if v != precision and v not in report.get("onnx", {})]
    if precision in AUTO_ORDER:
        later = [v for v in AUTO_ORDER[AUTO_ORDER.index(precision) + 1 :] if v not in report.get("onnx", {})]
    if later:
        return (
            f"try --precision {later[0]} (more accurate, slower), or --precision auto to build candidates "
            "until one is faithful"
        )
    return "try --precision fp32"


def headline(report: dict) -> list[str]:
    """One line per ONNX export: its verdict in words (the top of the parity report)."""
    lines = []
    for precision, info in (report.get("onnx") or {}).items():
        v = info.get("verdict") or {}
        line = f"**onnx-{precision}: {v.get('summary', 'no verdict')}.**"
        if v.get("advice"):
            line += f" Better: {v['advice']}."
        lines.append(f"- {line}")
    return lines


# --------------------------------------------------------------------------- parity report


def _probe_prompts(model, probes) -> list[list[int]]:
    from engine.inference import normalize_messages

    return [model.encode_prompt(normalize_messages(p["messages"])) for p in probes]


def _answer_ids(model, answer: str) -> list[int]:
    """Token ids of an assistant answer followed by the model's end-of-turn marker."""
    from engine.templates import turn_end_marker

    marker = turn_end_marker(model.tokenizer, model.chat_template or model.tokenizer.chat_template)
    return model.tokenizer(answer + marker, add_special_tokens=False)["input_ids"][:64]


def _perplexity_texts(cfg, probes, progress) -> tuple[list[dict], str, int]:
    """Chats with a reference answer: the run's validation split when it has one, else the probes."""
    if cfg is not None and cfg.data.path and cfg.data.validation_split > 0 and Path(cfg.data.path).exists():
        try:
            from engine.data import DataError, load_for_training
        except ImportError as err:
            progress(f"Validation split not used (engine.data unavailable: {err})")
        else:
            try:
                _, _, val = load_for_training(cfg.data)
            except (DataError, OSError) as err:
                progress(f"Validation split not used: {err}")
                val = []
            items = []
            for record in val:
                last = max((i for i, m in enumerate(record) if m["role"] == "assistant"), default=None)
                if last is None or not any(m["role"] == "user" for m in record[:last]):
                    continue
                items.append({"messages": record[:last], "answer": record[last]["content"]})
                if len(items) == 16:
                    break
            if items:
                return items, f"validation split ({len(items)} chats)", len(items)
    return list(probes), f"probe prompts ({len(probes)} chats with reference answers)", 0


def _greedy_exact(model, messages, new_tokens: int) -> list[int]:
    from engine.inference import GenerationSettings, normalize_messages

    settings = GenerationSettings(greedy=True, max_new_tokens=new_tokens)
    prompt = model.encode_prompt(normalize_messages(messages))
    ids = []
    stream = model.token_stream(prompt, settings)
    try:
        for token in stream:
            ids.append(token)
            if token in model.stop_ids:
                break
    finally:
        stream.close()
    return ids


def _speed(model, messages, tokens: int) -> dict:
    from engine.inference import GenerationSettings

    settings = GenerationSettings(greedy=True, max_new_tokens=tokens, min_new_tokens=tokens)
    model.complete(messages, GenerationSettings(greedy=True, max_new_tokens=4))  # warm-up
    _, stats = model.complete(messages, settings)
    return {
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
        "ttft_s": round(stats.ttft_s, 4),
        "tokens": stats.new_tokens,
    }


def _perplexity(model, scored: list[tuple[list[int], list[int]]]) -> float:
    """exp(mean negative log-likelihood) of the answers given their prompts."""
    nll: list[float] = []
    for prompt, answer in scored:
        _, values = model.score_continuation(prompt, answer)
        nll.extend(values)
    return math.exp(sum(nll) / len(nll)) if nll else float("nan")


def _previous_report(export_dir: Path) -> dict:
    path = export_dir / "parity.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _max_logit_diff(a, b, prompts_and_answers) -> float:
    worst = 0.0
    for prompt, answer in prompts_and_answers:
        ids = list(prompt) + list(answer)
        worst = max(worst, float((a.logits(ids) - b.logits(ids)).abs().max()))
    return worst


def write_parity_report(
    run_dir: str | Path,
    *,
    progress: Progress | None = None,
    new_tokens: int = 32,
    speed_tokens: int = 32,
    probes: list[dict] | None = None,
    gate: ExportGate | None = None,
) -> dict:
    """Compare every export of the run and write ``export/parity.json`` and ``export/parity.md``;
    each ONNX export gets a verdict (:func:`verdict`) against ``gate`` (default: engine.config's)."""
    from engine.inference import OnnxChatModel, Target, build_chat_model, normalize_messages

    say = _say(progress)
    run_dir = Path(run_dir)
    export_dir = run_dir / "export"
    merged_dir = export_dir / "merged"
    if not (merged_dir / "config.json").is_file():
        raise ExportError(f"{run_dir}: no merged export yet; run `tunelab export {run_dir} --format merged`")
    source = run_source(run_dir)
    cfg = source["config"]
    probes = probes or PROBES
    gate = gate or ExportGate()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "run": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "method": cfg.method.name,
        "base_model": str(source["base"] or source["dir"]),
        "new_tokens": new_tokens,
        "probes": [p["messages"][-1]["content"] for p in probes],
    }

    say("Parity: loading the merged model (PyTorch)...")
    merged = build_chat_model(Target("tuned", "PyTorch merged", model_dir=merged_dir))
    prompts = _probe_prompts(merged, probes)
    say("Parity: greedy reference continuations (PyTorch merged)...")
    references = [_greedy_exact(merged, p["messages"], new_tokens) for p in probes]
    ppl_items, ppl_source, validation_chats = _perplexity_texts(cfg, probes, say)

    speeds: dict[str, dict] = {}
    if source["kind"] == "adapter":
        say("Parity: loading the unmerged adapter (PyTorch + PEFT)...")
        tuned = build_chat_model(
            Target(
                "tuned",
                "PyTorch adapter",
                model_dir=source["base"],
                adapter_dir=source["dir"],
                chat_template=cfg.model.chat_template,
            )
        )
        scored = [(pr, _answer_ids(merged, p["answer"])) for pr, p in zip(prompts, probes)]
        diff = _max_logit_diff(merged, tuned, scored)
        tuned_refs = [_greedy_exact(tuned, p["messages"], new_tokens) for p in probes]
        same = sum(a == b for a, b in zip(tuned_refs, references))
        report["merge"] = {
            "max_abs_logit_diff": diff,
            "tolerance": MERGE_TOLERANCE,
            "passed": diff <= MERGE_TOLERANCE,
            "greedy_identical": f"{same}/{len(probes)}",
        }
        say(f"Parity: merged vs unmerged max |logit diff| = {diff:.2e}")
        speeds["pytorch_adapter"] = _speed(tuned, probes[0]["messages"], speed_tokens)
        del tuned
    else:
        report["merge"] = {"note": "full fine-tune: no adapter to merge"}
    speeds["pytorch_merged"] = _speed(merged, probes[0]["messages"], speed_tokens)
    ppl_scored = [
        (merged.encode_prompt(normalize_messages(item["messages"])), _answer_ids(merged, item["answer"]))
        for item in ppl_items
    ]
    ppl_reference = _perplexity(merged, ppl_scored)
    report["perplexity"] = {
        "source": ppl_source,
        "pytorch_merged": round(ppl_reference, 4),
        "answer_tokens": sum(len(a) for _, a in ppl_scored),
        "validation_chats": validation_chats,
    }
    report["gate"] = dataclasses.asdict(gate)

    report["onnx"] = {}
    report["tokenizer"] = {}
    # An export measured before against the same merged model, probes and reference keeps its
    # figures (auto mode measures after each candidate; the earlier ones are not measured again).
    previous = _previous_report(export_dir)
    merged_created = (_read_stamp(merged_dir) or {}).get("created")
    report["merged_created"] = merged_created
    comparable = (
        previous.get("merged_created") == merged_created
        and previous.get("new_tokens") == new_tokens
        and previous.get("probes") == report["probes"]
        and (previous.get("perplexity") or {}).get("pytorch_merged") == report["perplexity"]["pytorch_merged"]
    )
    for precision in onnx_variants_present(run_dir):
        onnx_dir = export_dir / f"onnx-{precision}"
        old_entry = (previous.get("onnx") or {}).get(precision)
        created = (_read_stamp(onnx_dir) or {}).get("created")
        if comparable and old_entry and created and old_entry.get("export_created") == created:
            say(f"Parity: ONNX {precision} measured before (export unchanged)")
            report["onnx"][precision] = old_entry
            report["tokenizer"][precision] = previous["tokenizer"][precision]
            old_entry["verdict"] = verdict(old_entry, gate)
            if f"onnx_{precision}" in previous.get("speed", {}):
                speeds[f"onnx_{precision}"] = previous["speed"][f"onnx_{precision}"]
            continue
        say(f"Parity: ONNX {precision}...")
        report["tokenizer"][precision] = check_tokenizer_parity(onnx_dir, merged_dir)
        onnx = OnnxChatModel(onnx_dir)
        same_prompt = all(onnx.encode_prompt(normalize_messages(p["messages"])) == pr for p, pr in zip(probes, prompts))
        outputs = [_greedy_exact(onnx, p["messages"], new_tokens) for p in probes]
        identical = sum(a == b for a, b in zip(outputs, references))
        agree = total = 0
        for prompt, ref in zip(prompts, references):
            if not ref:
                continue
            predicted, _ = onnx.score_continuation(prompt, ref)
            agree += sum(int(a == b) for a, b in zip(predicted, ref))
            total += len(ref)
        ppl_onnx = _perplexity(onnx, ppl_scored)
        stamp = _read_stamp(onnx_dir) or {}
        report["onnx"][precision] = {
            "prompt_ids_identical": same_prompt,
            "greedy_identical": f"{identical}/{len(probes)}",
            "greedy_all_identical": identical == len(probes),
            "token_agreement": round(agree / total, 4) if total else None,
            "agreement_tokens": total,
            "perplexity": {
                "pytorch": round(ppl_reference, 4),
                "onnx": round(ppl_onnx, 4),
                "difference": round(ppl_onnx - ppl_reference, 4),
                "source": ppl_source,
            },
            "block_size": stamp.get("block_size"),
            "execution_provider": stamp.get("execution_provider"),
            "about": stamp.get("about") or VARIANTS.get(precision, {}).get("about"),
            "validation_chats": validation_chats,
            "export_created": stamp.get("created"),
        }
        report["onnx"][precision]["verdict"] = verdict(report["onnx"][precision], gate)
        speeds[f"onnx_{precision}"] = _speed(onnx, probes[0]["messages"], speed_tokens)
        del onnx
    for precision, info in report["onnx"].items():
        info["verdict"]["advice"] = advice(precision, report)

    report["sizes_bytes"] = {
        name: dir_size(path)
        for name, path in [
            ("adapter", run_dir / "adapter"),
            ("model", run_dir / "model"),
            ("merged", merged_dir),
            *[(f"onnx-{p}", export_dir / f"onnx-{p}") for p in onnx_variants_present(run_dir)],
        ]
        if path.exists()
    }
    report["speed"] = speeds
    report["seconds"] = round(time.perf_counter() - started, 1)
    (export_dir / "parity.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (export_dir / "parity.md").write_text(parity_markdown(report), encoding="utf-8")
    say(f"Parity report written to {export_dir / 'parity.md'} ({report['seconds']} s)")
    return report


def parity_markdown(report: dict) -> str:
    lines = [f"# Export parity: {report['run']}", ""]
    if report.get("onnx"):
        lines += headline(report) + [""]
    lines += [
        f"Method {report['method']}, base {report['base_model']}, {len(report['probes'])} probe chats, "
        f"{report['new_tokens']} greedy tokens each. Created {report['created']}.",
        "",
    ]
    merge_info = report.get("merge", {})
    if "max_abs_logit_diff" in merge_info:
        ok = "OK" if merge_info["passed"] else "FAILED"
        lines += [
            f"- Merged vs unmerged adapter: max |logit diff| {merge_info['max_abs_logit_diff']:.2e} "
            f"(tolerance {merge_info['tolerance']:.0e}) {ok}; greedy identical "
            f"{merge_info['greedy_identical']}.",
            "",
        ]
    elif merge_info:
        lines += [f"- {merge_info.get('note')}", ""]
    if report.get("onnx"):
        lines += [
            "| export | verdict | greedy identical | token agreement | perplexity (PyTorch -> ONNX) | tokenizer |",
            "|---|---|---|---|---|---|",
        ]
        for precision, info in report["onnx"].items():
            ppl = info["perplexity"]
            tok = "identical" if report["tokenizer"][precision]["identical"] else "DIFFERS"
            change = (info.get("verdict") or {}).get("perplexity_change")
            change_text = f", {change:+.1%}" if change is not None else ""
            lines.append(
                f"| onnx-{precision} | {(info.get('verdict') or {}).get('verdict', '-')} | {info['greedy_identical']} "
                f"| {info['token_agreement']:.1%} | {ppl['pytorch']:.3f} -> {ppl['onnx']:.3f} "
                f"({ppl['difference']:+.3f}{change_text}) | {tok} |"
            )
        first = next(iter(report["onnx"].values()))
        gate = report.get("gate") or dataclasses.asdict(ExportGate())
        lines += [
            "",
            f"Perplexity on the {first['perplexity']['source']}; token agreement is the share of "
            "positions where the export's greedy choice equals PyTorch's along the PyTorch continuation. "
            f"Faithful: agreement >= {gate['faithful_agreement']:.0%} and perplexity change within "
            f"{gate['faithful_perplexity_change']:.0%}; broken: agreement < {gate['broken_agreement']:.0%} or "
            f"perplexity change > +{gate['broken_perplexity_change']:.0%}; degraded in between; unmeasured "
            f"without a validation split of {gate['min_validation_chats']} chats or more.",
            "",
        ]
    lines += [
        "| model | size | decode tokens/s | time to first token | verdict |",
        "|---|---|---|---|---|",
    ]
    sizes = report.get("sizes_bytes", {})
    size_of = {
        "pytorch_adapter": sizes.get("adapter"),
        "pytorch_merged": sizes.get("merged"),
        **{f"onnx_{p}": sizes.get(f"onnx-{p}") for p in report.get("onnx", {})},
    }
    for name, speed in report.get("speed", {}).items():
        size = size_of.get(name)
        size_text = f"{size / 1e6:.1f} MB" if size else "-"
        v = ((report.get("onnx") or {}).get(name.removeprefix("onnx_")) or {}).get("verdict") or {}
        label = f"onnx-{name.removeprefix('onnx_')}" if name.startswith("onnx_") else name
        lines.append(
            f"| {label} | {size_text} | {speed['decode_tokens_per_s']:.1f} | {speed['ttft_s'] * 1000:.0f} ms "
            f"| {v.get('verdict', '(reference)')} |"
        )
    if report.get("auto"):
        lines += ["", *auto_markdown(report["auto"])]
    return "\n".join(lines) + "\n"


def auto_markdown(auto: dict) -> list[str]:
    """What auto mode tried, each candidate's figures or failure, and what it kept."""
    lines = [f"## Auto mode: candidates in order ({', '.join('onnx-' + c for c in auto['order'])})", ""]
    lines += ["| candidate | verdict | token agreement | perplexity change | decode tokens/s | note |"]
    lines += ["|---|---|---|---|---|---|"]
    for item in auto["tried"]:
        change = item.get("perplexity_change")
        lines.append(
            f"| {item['variant']} | {item.get('verdict', 'failed')} | "
            f"{'-' if item.get('token_agreement') is None else format(item['token_agreement'], '.1%')} | "
            f"{'-' if change is None else format(change, '+.1%')} | "
            f"{'-' if item.get('decode_tokens_per_s') is None else format(item['decode_tokens_per_s'], '.1f')} | "
            f"{item.get('error') or ''} |"
        )
    lines += ["", auto["summary"]]
    return lines


# --------------------------------------------------------------------------- one call for the CLI and UI


def export_auto(
    run_dir: str | Path,
    *,
    candidates: tuple[str, ...] | list[str] = AUTO_ORDER,
    gate: ExportGate | None = None,
    progress: Progress | None = None,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    stop: threading.Event | None = None,
    measure: Callable[..., dict] | None = None,
    build: Callable[..., Path] | None = None,
) -> dict:
    """Auto mode: build ``candidates`` in order (fastest first: engine.config.AUTO_ORDER) and
    keep the first whose verdict is faithful. Every finished candidate stays under RUN/export
    (a stopped build leaves no partial directory). ``build`` and ``measure`` default to
    :func:`export_onnx` and :func:`write_parity_report`. Returns ``{"order", "tried",
    "chosen", "summary", "report"}``."""
    say = _say(progress)
    gate = gate or ExportGate()
    build = build or export_onnx
    measure = measure or write_parity_report
    tried: list[dict] = []
    chosen = None
    report: dict = {}
    note = ""
    if (Path(run_dir) / "config.yaml").is_file():
        chats = _perplexity_texts(run_source(Path(run_dir))["config"], PROBES, say)[2]
        if chats < gate.min_validation_chats:
            # no candidate can be judged: build the fixed default only, said as such
            candidates = [DEFAULT_ONNX_VARIANT]
            note = (
                f" The run has {'no validation split' if not chats else f'a validation split of {chats} chats'}, "
                f"so no candidate can be judged: auto built only onnx-{DEFAULT_ONNX_VARIANT}, the default."
            )
            say("Auto:" + note)
    for precision in candidates:
        _variant(precision)
        if stop is not None and stop.is_set():
            tried.append({"variant": f"onnx-{precision}", "verdict": "not tried", "error": "stopped before it"})
            continue
        say(f"Auto: candidate onnx-{precision} ({VARIANTS[precision]['about']})")
        try:
            build(
                run_dir,
                precision,
                progress=progress,
                execution_provider=execution_provider,
                block_size=block_size,
                force=force,
                stop=stop,
            )
            report = measure(run_dir, progress=progress, gate=gate)
        except ExportError as err:
            tried.append({"variant": f"onnx-{precision}", "verdict": "failed", "error": str(err)})
            say(f"Auto: onnx-{precision} failed: {err}")
            if stop is not None and stop.is_set():
                continue
            continue
        info = report["onnx"][precision]
        v = info["verdict"]
        tried.append(
            {
                "variant": f"onnx-{precision}",
                "verdict": v["verdict"],
                "token_agreement": info.get("token_agreement"),
                "perplexity_change": v.get("perplexity_change"),
                "greedy_identical": info.get("greedy_identical"),
                "decode_tokens_per_s": (report.get("speed", {}).get(f"onnx_{precision}") or {}).get(
                    "decode_tokens_per_s"
                ),
            }
        )
        say(f"Auto: onnx-{precision} is {v['summary']}")
        if v["passes"]:
            chosen = precision
            break
    if chosen:
        summary = f"Auto mode kept **onnx-{chosen}**: the first candidate in order of speed that is faithful."
        slower = [t for t in tried if t["variant"] != f"onnx-{chosen}" and t.get("verdict") not in ("failed",)]
        if slower:
            summary += f" Faster candidates tried first were not faithful: {', '.join(t['variant'] for t in slower)}."
    else:
        measured = [t for t in tried if t.get("token_agreement") is not None]
        best = max(measured, key=lambda t: t["token_agreement"], default=None)
        summary = "Auto mode found no faithful candidate"
        if stop is not None and stop.is_set():
            summary += " before it was stopped"
        summary += "." + (
            f" The closest is {best['variant']} ({best['verdict']}, agreement {best['token_agreement']:.1%})."
            if best
            else ""
        )
    summary += note
    auto = {"order": list(candidates), "tried": tried, "chosen": chosen, "summary": summary}
    if report:
        report["auto"] = auto
        export_dir = Path(run_dir) / "export"
        (export_dir / "parity.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        (export_dir / "parity.md").write_text(parity_markdown(report), encoding="utf-8")
    say(summary.replace("**", ""))
    return {**auto, "report": report}


def export(
    run_dir: str | Path,
    fmt: str = "onnx",
    precision: str = DEFAULT_ONNX_VARIANT,
    *,
    progress: Progress | None = None,
    report: bool = True,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    stop: threading.Event | None = None,
    gate: ExportGate | None = None,
) -> dict:
    """Merge or export (``precision`` a variant or ``auto``), then write the parity report.
    Returns paths, the report and, for an ONNX export, its verdict."""
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    result: dict[str, Any] = {"run": str(run_dir), "format": fmt}
    if fmt == "merged":
        result["path"] = str(merge(run_dir, progress=progress, force=force))
    elif precision == "auto":
        auto = export_auto(
            run_dir,
            gate=gate,
            progress=progress,
            execution_provider=execution_provider,
            block_size=block_size,
            force=force,
            stop=stop,
        )
        chosen = auto["chosen"]
        result["auto"] = {k: v for k, v in auto.items() if k != "report"}
        result["precision"] = chosen
        result["variant"] = f"onnx-{chosen}" if chosen else None
        result["path"] = str(run_dir / "export" / f"onnx-{chosen}") if chosen else None
        if auto["report"]:
            result["report"] = auto["report"]
            result["report_path"] = str(run_dir / "export" / "parity.md")
            if chosen:
                result["verdict"] = auto["report"]["onnx"][chosen]["verdict"]
        return result
    else:
        result["path"] = str(
            export_onnx(
                run_dir,
                precision,
                progress=progress,
                execution_provider=execution_provider,
                block_size=block_size,
                force=force,
                stop=stop,
            )
        )
        result["precision"] = precision
        result["variant"] = f"onnx-{precision}"
    if report:
        result["report"] = write_parity_report(run_dir, progress=progress, gate=gate)
        result["report_path"] = str(run_dir / "export" / "parity.md")
        if fmt == "onnx":
            result["verdict"] = result["report"]["onnx"][precision]["verdict"]
    return result


# --------------------------------------------------------------------------- export jobs

# RUN/export/jobs/<name>/: an export queued with the trainings (engine.launch), as an
# evaluation is, so a build never competes with a training for the CPU and the web page
# never waits on it. Its spec.json says what to build; its train.log is the progress;
# result.json the outcome (auto mode: what it tried and kept).
JOB_SPEC = "spec.json"
JOB_RESULT = "result.json"


def export_jobs(run_dir: str | Path) -> list[Path]:
    """The run's export jobs, oldest first."""
    root = Path(run_dir).joinpath(*EXPORT_JOBS)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / JOB_SPEC).is_file())


def submit_export(
    run_dir: str | Path,
    variants: list[str] | tuple[str, ...],
    *,
    adapter_file: bool = False,
    gate: ExportGate | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    execution_provider: str = "auto",
) -> Path:
    """Queue an export of ``variants`` (ONNX variant names or ``auto``; ``adapter_file`` adds
    the LoRA adapter file) as a background job; returns its directory. Refused, with a
    sentence, when the run has nothing to export, is training, or already has an export
    waiting or running."""
    from engine import launch, runs

    run_dir = Path(run_dir).resolve()
    run_source(run_dir)  # nothing to export is said now, not by the job
    state = runs.refresh_status(run_dir).get("state")
    if state in runs.ACTIVE_STATES:
        raise ExportError(f"{run_dir.name} is {state}: export it once its training has ended")
    for precision in variants:
        if precision != "auto":
            _variant(precision)
    if not variants and not adapter_file:
        raise ExportError("choose at least one ONNX variant (or auto, or the adapter file)")
    for job in export_jobs(run_dir):
        job_state = runs.refresh_status(job).get("state")
        if job_state in runs.ACTIVE_STATES:
            raise ExportError(f"an export of {run_dir.name} is already {job_state}: {job.name}")
    root = run_dir.joinpath(*EXPORT_JOBS)
    root.mkdir(parents=True, exist_ok=True)
    name = time.strftime("export-%Y%m%d-%H%M%S")
    job_dir = root / name
    n = 1
    while job_dir.exists():
        n += 1
        job_dir = root / f"{name}-{n}"
    job_dir.mkdir()
    spec = {
        "run": str(run_dir),
        "variants": list(variants),
        "adapter_file": bool(adapter_file),
        "gate": dataclasses.asdict(gate or ExportGate()),
        "block_size": block_size,
        "execution_provider": execution_provider,
    }
    (job_dir / JOB_SPEC).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    runs.update_status(job_dir, state="created", kind="export")
    launch.submit_job(job_dir, [sys.executable, "-m", "engine.export", "--job", str(job_dir)])
    return job_dir


def run_export_job(job_dir: str | Path) -> int:
    """The job's process: build what spec.json asks, one step after another, then the parity
    report (or auto mode's own); SIGTERM stops the build in progress (its partial directory is
    removed; finished variants are kept)."""
    import signal

    from engine import runs
    from engine.config import ConfigError
    from engine.models import ModelNotFoundError

    job_dir = Path(job_dir).resolve()
    spec = json.loads((job_dir / JOB_SPEC).read_text(encoding="utf-8"))
    run_dir = Path(spec["run"])
    gate = ExportGate(**spec["gate"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    named = [v for v in spec["variants"] if v != "auto"]
    steps: list[tuple[str, Callable[[], Any]]] = []

    def say(message: str) -> None:
        print(f"[export {time.strftime('%H:%M:%S')}] {message}", flush=True)

    options = {
        "progress": say,
        "execution_provider": spec["execution_provider"],
        "block_size": spec["block_size"],
        "stop": stop,
    }
    for precision in named:
        steps.append((f"ONNX {precision}", lambda p=precision: export_onnx(run_dir, p, **options)))
    if spec["adapter_file"]:
        steps.append(("LoRA adapter file", lambda: export_adapter_file(run_dir, progress=say, stop=stop)))
    if steps:
        steps.append(("Parity report", lambda: write_parity_report(run_dir, progress=say, gate=gate)))
    if "auto" in spec["variants"]:
        steps.append(("ONNX auto", lambda: export_auto(run_dir, gate=gate, **options)))
    result: dict[str, Any] = {"steps": []}
    for i, (label, step) in enumerate(steps):
        if stop.is_set():
            result["steps"].append({"step": label, "state": "not started: stopped"})
            continue
        runs.update_status(job_dir, progress={"done": i, "total": len(steps), "step": label})
        say(f"== {label}")
        try:
            out = step()
        except (ExportError, ConfigError, ModelNotFoundError) as err:
            say(f"error: {err}")
            result["steps"].append({"step": label, "state": "failed", "error": str(err)})
            continue
        entry: dict[str, Any] = {"step": label, "state": "done"}
        if isinstance(out, dict) and "chosen" in out:
            entry["auto"] = {k: v for k, v in out.items() if k != "report"}
        result["steps"].append(entry)
    runs.write_json(job_dir / JOB_RESULT, result)
    failed = [s for s in result["steps"] if s["state"] == "failed"]
    if stop.is_set():
        state = "aborted"
    elif failed and len(failed) == len(steps):
        state = "failed"
    else:
        state = "completed"
    fields: dict[str, Any] = {"state": state, "ended_at": time.time()}
    if state == "failed":
        fields.update(error=failed[0]["error"], error_class=runs.ERROR_CONFIG)
    runs.update_status(job_dir, progress={"done": len(steps), "total": len(steps)}, **fields)
    say(f"export {state}" + (f": {len(failed)} of {len(steps)} steps failed" if failed else ""))
    return 0 if state != "failed" else 2


def stop_export(job_dir: str | Path, wait: bool = False, timeout: float | None = None) -> dict:
    """Stop a queued or running export job (finished variants are kept)."""
    from engine import launch

    return launch.stop(job_dir, grace_s=60.0, wait=wait, timeout=timeout)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="Run directory (runs/<id>) with adapter/ or model/.")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="merged: a transformers directory; onnx: ONNX Runtime GenAI (merges first).",
    )
    parser.add_argument(
        "--precision",
        choices=(*ONNX_VARIANTS, "auto"),
        default=DEFAULT_ONNX_PRECISION,
        metavar="VARIANT",
        help=f"ONNX export variant: {', '.join(ONNX_VARIANTS)}, or auto (default): build "
        f"{', '.join(AUTO_ORDER)} in that order and keep the first that passes the quality gate.",
    )
    parser.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Quality-gate threshold (repeatable), e.g. --gate faithful_agreement=0.9; keys: "
        + ", ".join(f.name for f in dataclasses.fields(ExportGate))
        + " (defaults in engine/config.py ExportGate).",
    )
    parser.add_argument(
        "--execution-provider",
        choices=EXECUTION_PROVIDERS,
        default="auto",
        help="Device the ONNX model is built for (auto: CUDA when available, else CPU).",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"int4/int8 quantisation block size (default {DEFAULT_BLOCK_SIZE}; 32: a little more "
        "accurate and slower, 128: faster, less accurate).",
    )
    parser.add_argument(
        "--adapter-file",
        action="store_true",
        help="Export the LoRA adapter on its own: an ONNX Runtime GenAI adapter file (og.Adapters) in "
        f"RUN/export/onnx-{ONNX_LORA_BASE}/adapters/, beside the base in fp32 with LoRA inputs.",
    )
    parser.add_argument("--force", action="store_true", help="Rebuild even if the export is up to date.")
    parser.add_argument("--no-report", action="store_true", help="Skip the parity report.")
    parser.add_argument("--json", action="store_true", help="Print the result (paths and report) as JSON.")


def run_cli(args) -> int:
    from engine.config import ConfigError
    from engine.models import ModelNotFoundError

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.adapter_file:
            result = export_adapter_file(args.run, progress=progress, force=args.force)
            if not args.no_report:
                result["report"] = write_parity_report(
                    args.run, progress=progress, gate=ExportGate.from_pairs(args.gate)
                )
                result["verdict"] = result["report"]["onnx"][LORA_BASE]["verdict"]
            print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else result["adapter_file"])
            return 0
        result = export(
            args.run,
            args.format,
            args.precision,
            progress=progress,
            report=not args.no_report,
            execution_provider=args.execution_provider,
            block_size=args.block_size,
            force=args.force,
            gate=ExportGate.from_pairs(args.gate),
        )
    except (ExportError, ConfigError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(result["path"] or "no faithful export (see the report)")
        if "report_path" in result:
            print((Path(result["report_path"])).read_text(encoding="utf-8"))
    return 0


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.export", description="Run a queued export job.")
    parser.add_argument("--job", required=True, help="RUN/export/jobs/<name>: the job to run (engine.launch).")
    return run_export_job(parser.parse_args(argv).job)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_main())

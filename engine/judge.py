"""A pairwise LLM judge over an evaluation's answers (``tunelab eval --judge``).

For each example and each compared pair (tuned vs base, each ONNX export vs tuned), the judge
model reads the question, the reference and two answers and names the better one, with a
reason. It is asked twice, the answers swapped the second time, to cancel its preference for
a position; per order the compared backend scores 1 (win), 0.5 (tie) or 0 (loss), and the
mean of the two orders decides: above 0.5 a win, 0.5 a tie, below a loss. A reply without a
verdict is counted as ``unparsed`` and left out of the rates. The reasons are kept per
example in ``judge.jsonl``; the rates go into summary.json under ``judge``.

The judge is a local model (any model reference tunelab can load: the embedded one, a local
directory, a Hub id) or an OpenAI-compatible endpoint (``https://host/v1``) with a key the
person gives. The key is held in memory only: it is never written to spec.json, the results,
the summary or the log, and it is removed from any error text. On a shared app an endpoint
may not point at a loopback, private, link-local or reserved address.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from engine import runs
from engine.config import JUDGE_MAX_NEW_TOKENS, JUDGE_PROMPT, JUDGE_TIMEOUT_S
from engine.evalfiles import SUMMARY_FILE, read_results

JUDGE_FILE = "judge.jsonl"
DEFAULT_PROMPT = JUDGE_PROMPT  # one source: engine.config
PLACEHOLDERS = ("{question}", "{reference}", "{answer_a}", "{answer_b}")
VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*(a|b|tie)\b", re.IGNORECASE)


class JudgeError(ValueError):
    """A judge that cannot be used: a bad prompt, URL or reply."""


def check_prompt(template: str) -> str:
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise JudgeError(
            f"judge prompt: it must contain {', '.join(missing)} (where the question, the reference "
            "and the two answers go)"
        )
    try:
        template.format(question="", reference="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as err:
        raise JudgeError(
            f"judge prompt: {err!r} is not one of {', '.join(PLACEHOLDERS)}; write a literal brace as {{{{ or }}}}"
        ) from None
    return template


def check_url(url: str, shared: bool) -> str:
    """An endpoint URL (http or https). On a shared app every address its host resolves to
    must be public: no loopback, private, link-local, multicast or reserved address."""
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JudgeError(f"judge URL {url!r}: write it as https://host[:port]/v1")
    if shared:
        try:
            infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
        except socket.gaierror as err:
            raise JudgeError(f"judge URL: cannot resolve {parsed.hostname}: {err}") from err
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global or address.is_multicast:
                raise JudgeError(
                    f"judge URL: {parsed.hostname} resolves to {address}, not a public address; "
                    "on a shared app a judge endpoint must be public"
                )
    return url.strip().rstrip("/")


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the last "Verdict: ..." in a reply, else None."""
    found = VERDICT.findall(text or "")
    if not found:
        return None
    last = found[-1].lower()
    return "tie" if last == "tie" else last.upper()


def combine(first: str | None, second: str | None) -> str | None:
    """The verdict for the compared answer, asked as A first and as B second."""
    if first is None or second is None:
        return None
    score = {"A": 1.0, "tie": 0.5, "B": 0.0}[first] + {"B": 1.0, "tie": 0.5, "A": 0.0}[second]
    return "win" if score > 1.0 else "tie" if score == 1.0 else "loss"


# --------------------------------------------------------------------------- judges


@dataclass
class LocalJudge:
    """A model tunelab can load, answering greedily."""

    model: str
    max_new_tokens: int = JUDGE_MAX_NEW_TOKENS

    @property
    def label(self) -> str:
        return f"local model {Path(self.model).name}"

    def ask(self, prompt: str) -> str:
        from engine.inference import GenerationSettings, load_chat_model

        chat = load_chat_model(self.model, "base")
        text, _ = chat.complete(prompt, GenerationSettings(max_new_tokens=self.max_new_tokens, greedy=True))
        return text


@dataclass
class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint. ``key`` stays in memory."""

    url: str
    model: str
    key: str | None = None
    timeout_s: float = JUDGE_TIMEOUT_S

    @property
    def label(self) -> str:
        return f"{self.model} at {urlparse(self.url).hostname}"

    def scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def ask(self, prompt: str) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        try:
            reply = httpx.post(f"{self.url}/chat/completions", json=body, headers=headers, timeout=self.timeout_s)
            reply.raise_for_status()
            return reply.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            raise JudgeError(self.scrub(f"judge endpoint {self.url}: {err}")) from None


# --------------------------------------------------------------------------- judging an evaluation


def judge_pairs(backends: list[str]) -> list[tuple[str, str]]:
    """(compared, against): tuned vs base, each ONNX export vs tuned."""
    pairs = [("tuned", "base")] if "tuned" in backends and "base" in backends else []
    pairs += [(b, "tuned") for b in backends if b.startswith("onnx-") and "tuned" in backends]
    return pairs


def run_judge(
    eval_dir: str | Path,
    judge,
    prompt_template: str = DEFAULT_PROMPT,
    *,
    say: Callable[[str], None] = print,
    stop=None,
) -> dict:
    """Judge an evaluation's answers; writes judge.jsonl and summary.json's ``judge``."""
    eval_dir = Path(eval_dir)
    check_prompt(prompt_template)
    rows = read_results(eval_dir)
    by_key = {(r["example"], r["backend"]): r for r in rows}
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    out_path = eval_dir / JUDGE_FILE
    out_path.unlink(missing_ok=True)
    totals: dict[str, dict] = {}
    for compared, against in judge_pairs(backends):
        counts = {"win": 0, "tie": 0, "loss": 0, "unparsed": 0}
        examples = sorted({e for e, b in by_key if b == compared and (e, against) in by_key})
        say(f"judge: {compared} vs {against} on {len(examples)} examples ({judge.label})")
        for example in examples:
            if stop is not None and stop.is_set():
                break
            mine, theirs = by_key[(example, compared)], by_key[(example, against)]
            question = mine["prompt"][-1]["content"]
            replies = [
                judge.ask(
                    prompt_template.format(
                        question=question, reference=mine["reference"], answer_a=first, answer_b=second
                    )
                )
                for first, second in ((mine["answer"], theirs["answer"]), (theirs["answer"], mine["answer"]))
            ]
            verdicts = [parse_verdict(r) for r in replies]
            outcome = combine(*verdicts)
            counts[outcome or "unparsed"] += 1
            with out_path.open("a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "example": example,
                            "compared": compared,
                            "against": against,
                            "outcome": outcome,
                            "verdicts": verdicts,  # compared as A, then as B
                            "reasons": replies,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        parsed = counts["win"] + counts["tie"] + counts["loss"]
        totals[f"{compared} vs {against}"] = {
            **counts,
            "rates": {k: counts[k] / parsed for k in ("win", "tie", "loss")} if parsed else None,
        }
    summary = runs.read_json(eval_dir / SUMMARY_FILE) or {}
    summary["judge"] = {"judge": judge.label, "prompt": prompt_template, "both_orders": True, "pairs": totals}
    runs.write_json(eval_dir / SUMMARY_FILE, summary)
    return summary["judge"]

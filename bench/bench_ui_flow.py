"""A newcomer's whole flow in a real browser, on the embedded model, timed stage by stage.

    python -m bench.bench_ui_flow [--max-steps N] [--out bench/results]

Starts the app as `make run` does (`tunelab ui`, its own runs directory), then drives
Debian's Chromium with Playwright: upload the Pip sample -> train SmolLM2-135M-Instruct with
the form's defaults (LoRA, one epoch) -> export ONNX int4 -> ask the playground two questions
and wait for the three answers (base, tuned, ONNX) to each. Prints a table and writes
bench/results/ui_flow.{json,md}. Run it on an idle machine; it is not part of `make bench`
(it trains the real model for several minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))

from test_browser import (  # noqa: E402  (the browser tests' page helpers)
    CHROMIUM,
    CHROMIUM_ARGS,
    SAMPLES,
    VIEWPORT,
    _free_port,
    _open,
    _set_number,
    _tab,
    _upload,
    _wait_until,
)

QUESTIONS = ["What is the capital of Ireland?", "Give me two tips for a good night's sleep."]


def start_app(runs_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "ui", "--port", str(port), "--runs-dir", str(runs_dir)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}") from None
            time.sleep(0.5)


def flow(page, url: str, max_steps: int | None) -> dict:
    stages: dict[str, float] = {}
    details: dict = {}
    mark = time.perf_counter()

    def done(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = round(now - mark, 1)
        mark = now
        print(f"  {name}: {stages[name]} s", flush=True)

    _open(page, url)
    done("open the page")
    _upload(page, SAMPLES / "pip_chat.jsonl")
    page.locator("#data-summary").get_by_text("Split:").wait_for()
    done("upload and check the data")

    _tab(page, "2. Train")
    page.locator("#train-dataset").get_by_text("pip_chat.jsonl").wait_for()
    if max_steps:
        _set_number(page, "train-max-steps", max_steps)
    _wait_until(page, lambda: "engine.train" in page.locator("#train-command").inner_text(), what="the command")
    page.locator("#train-start").click()
    page.locator("#train-progress[data-state=completed]").wait_for(timeout=1_500_000)
    details["training"] = page.locator("#train-progress").inner_text().strip()
    done("train (LoRA, form defaults)")

    page.locator("#train-open-export").click()
    page.locator("#export-contents").get_by_text("adapter").first.wait_for()
    page.locator("#export-onnx").click()
    status = page.locator("#export-status textarea")
    _wait_until(page, lambda: "Done." in status.input_value(), 900, "the export")
    done("export ONNX int4 (with parity report)")

    _tab(page, "3. Playground")
    page.wait_for_function("document.querySelector('#play-run input').value.includes('completed')")
    for n, question in enumerate(QUESTIONS, 1):
        page.locator("#play-prompt textarea").fill(question)
        page.locator("#play-send").click()
        for backend in ("base", "tuned", "onnx"):
            page.locator(f"#play-chat-{backend} .bot").nth(n - 1).wait_for(timeout=600_000)
            _wait_until(
                page,
                lambda: (
                    page.locator(f"#play-chat-{backend} .bot").count() == n
                    and page.locator(f"#play-stats-{backend} .tl-stats").count() == 1
                    and "first token" in page.locator(f"#play-stats-{backend}").inner_text()
                    and page.locator(f"#play-stats-{backend}").inner_text() != details.get(("stats", backend))
                ),
                600,
                f"answer {n} of {backend}",
            )
            details[("stats", backend)] = page.locator(f"#play-stats-{backend}").inner_text()
        done(f"three answers in the playground ({'models loaded on first use' if n == 1 else 'models loaded'})")
        details.setdefault("answers", []).append(
            {
                backend: {
                    "reply": page.locator(f"#play-chat-{backend} .bot").last.inner_text().strip(),
                    "stats": page.locator(f"#play-stats-{backend}").inner_text().strip(),
                }
                for backend in ("base", "tuned", "onnx")
            }
        )
    for backend in ("base", "tuned", "onnx"):
        details.pop(("stats", backend), None)
    return {"stages_s": stages, "total_s": round(sum(stages.values()), 1), **details}


def to_markdown(result: dict) -> str:
    lines = [
        f"Web app flow on the embedded model in Chromium ({result['machine']}), "
        f"{result['created']}; app start {result['app_start_s']} s before the first stage. The browser "
        "shares the machine's cores with the app, so the playground's tokens/s here are below "
        "inference.md's (a visitor's browser runs on their own machine).",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds} |" for name, seconds in result["stages_s"].items()]
    lines += [
        f"| **total** | **{result['total_s']}** ({result['total_s'] / 60:.1f} min) |",
        "",
        f"Training: {result.get('training', '?')}",
        "",
    ]
    for question, answers in zip(QUESTIONS, result.get("answers", [])):
        lines += [f"Question: {question}", ""]
        for backend, answer in answers.items():
            reply = " ".join(answer["reply"].split())
            lines.append(f"- {backend}: {answer['stats']} - {reply[:160]}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="Training steps (default: the form's, one epoch).")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (make chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from bench.machine import describe, write_results

    work = Path(tempfile.mkdtemp(prefix="tunelab-ui-flow-"))
    started = time.perf_counter()
    proc, url = start_app(work / "runs", work / "app.log")
    app_start = round(time.perf_counter() - started, 1)
    print(f"app up in {app_start} s at {url}", flush=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(120_000)
            result = flow(page, url, args.max_steps)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    machine = describe()
    result.update(
        app_start_s=app_start,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        machine=f"{machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']}",
    )
    write_results(args.out, "ui_flow", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

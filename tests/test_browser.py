"""The web app in a real browser: Playwright drives Debian's Chromium against the real app,
started as `tunelab ui` would be, with a tiny model added to the model list.

Each test starts its own app on a free port with its own runs directory. The screenshots
of the five tabs (docs/screenshots/*.png) are written by the end-to-end test, for the
README.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_runs import stop_process

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "datasets"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model taught to answer a few chats (a random one often answers nothing
    visible), shared with the export tests."""
    from tiny_runs import chat_base

    return chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())


@contextlib.contextmanager
def _running_app(tmp_path: Path, runs_dir: Path, extra_env: dict | None = None):
    """The real app (`python -m engine.cli ui`) on a free port, its output in tmp_path/app.log;
    yields its url and ends it afterwards."""
    port = _free_port()
    log_path = tmp_path / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", **(extra_env or {}))
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "ui", "--port", str(port), "--runs-dir", str(runs_dir)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def app(chat_model, tmp_path):
    """The real app on a free port, with the chat model offered; yields (url, runs_dir)."""
    runs_dir = tmp_path / "runs"
    with _running_app(tmp_path, runs_dir, {"TUNELAB_EXTRA_MODELS": str(chat_model)}) as url:
        yield url, runs_dir
    # Trainings this test left running (it stops its own; this is for failures).
    from engine import launch, runs

    for info in runs.list_runs(runs_dir):
        if info["state"] in ("created", "queued", "running"):
            launch.stop(info["path"], grace_s=5, wait=True, timeout=30)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def _open(page, url):
    page.goto(url)
    page.locator("#data-upload").wait_for()


def _tab(page, name):
    page.get_by_role("tab", name=name).click()


def _pick(page, elem_id, option):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def _shot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _upload(page, path: Path):
    page.locator("#data-upload input[type=file]").set_input_files(str(path))


def _prepare_training(page, chat_model, max_steps, batch=2):
    _upload(page, SAMPLES / "pip_chat.jsonl")
    page.locator("#data-summary").get_by_text("Split:").wait_for()
    _tab(page, "2. Train")
    page.locator("#train-dataset").get_by_text("pip_chat.jsonl").wait_for()
    _pick(page, "train-model", str(chat_model))
    _set_number(page, "train-max-steps", max_steps)
    _set_number(page, "train-batch-size", batch)
    _wait_until(page, lambda: "engine.train" in page.locator("#train-command").inner_text(), what="the command")


def _progress(page):
    return page.locator("#train-progress")


def _wait_until(page, condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(250)


def _problem_places(page) -> list[str]:
    """The 'Line / record' column of the problems table."""
    return [t.strip() for t in page.locator("#data-problems [data-testid^=cell-][data-testid$='-1']").all_inner_texts()]


def test_invalid_file_shows_line_numbered_errors(app, page):
    url, _ = app
    _open(page, url)
    _upload(page, SAMPLES / "broken_example.jsonl")
    _wait_until(page, lambda: "line 2" in _problem_places(page))
    places = _problem_places(page)
    assert places.count("line 2") == 1 and places.count("line 3") == 1, places
    assert "skipped" in page.locator("#data-summary").inner_text()
    page.get_by_text("Stop and list every problem").click()
    page.locator("#data-summary").get_by_text("Stopped: broken_example.jsonl").wait_for()
    assert _problem_places(page) == places
    _shot(page, "data-problems")


def test_person_trains_exports_and_chats(app, page, chat_model):
    url, runs_dir = app
    _open(page, url)

    # Data: upload a sample, see its format and statistics.
    _upload(page, SAMPLES / "pip_chat.jsonl")
    summary = page.locator("#data-summary")
    summary.get_by_text("Split:").wait_for()
    assert "openai" in summary.inner_text() and "(detected)" in summary.inner_text()
    assert "Tokens per record" in page.locator("#data-stats").inner_text()
    page.locator("#data-preview").get_by_text("Record 1 of").wait_for()
    _shot(page, "data")

    # Train: a short run of the tiny model; the progress reaches 100%.
    _tab(page, "2. Train")
    page.locator("#train-comparison").get_by_text("qlora").wait_for()
    page.locator("#train-dataset").get_by_text("pip_chat.jsonl").wait_for()
    _pick(page, "train-model", str(chat_model))
    _set_number(page, "train-max-steps", 8)
    _set_number(page, "train-batch-size", 2)
    _set_number(page, "train-eval-steps", 4)
    _wait_until(page, lambda: "engine.train" in page.locator("#train-command").inner_text(), what="the command")
    page.locator("#train-start").click()
    page.locator("#train-progress[data-state=completed]").wait_for(timeout=240_000)
    assert _progress(page).get_attribute("data-percent") == "100"
    assert "step 8 / 8 (100%)" in _progress(page).inner_text()
    page.locator("#train-loss svg").first.wait_for()
    _shot(page, "train")

    # Export: ONNX (auto, the default) with its parity report and verdict.
    page.locator("#train-open-export").click()
    page.locator("#export-contents").get_by_text("adapter").first.wait_for()
    page.locator("#export-onnx").click()
    status = page.locator("#export-status textarea")
    _wait_until(page, lambda: "Done." in status.input_value(), 240, "the export")
    page.locator("#export-parity").get_by_text("onnx-").first.wait_for()
    page.locator("#export-dl-onnx").click()
    _wait_until(page, lambda: "onnx-" in page.locator("#export-files").inner_text(), what="the ONNX zip")
    _shot(page, "export")

    # Playground: a validation example, then one prompt answered by the three columns.
    _tab(page, "3. Playground")
    page.locator("#play-run input").wait_for()
    page.wait_for_function("document.querySelector('#play-run input').value.includes('completed')")
    page.locator("#play-example").click()
    page.locator("#play-reference").get_by_text("Reference answer").wait_for()
    assert page.locator("#play-prompt textarea").input_value().strip()
    # The tiny model was taught to answer this one.
    page.locator("#play-clear").click()
    _wait_until(page, lambda: not page.locator("#play-reference").inner_text().strip(), what="Clear")
    page.locator("#play-system textarea").fill("")
    page.locator("#play-prompt textarea").fill("Hi!")
    page.locator("#play-settings").get_by_text("Generation settings").click()
    _set_number(page, "play-max-new", 12)
    page.locator("#play-send").click()
    for backend in ("base", "tuned", "onnx"):
        page.locator(f"#play-stats-{backend} .tl-stats").wait_for(timeout=180_000)
    _shot(page, "playground")
    for backend in ("base", "tuned", "onnx"):
        bot = page.locator(f"#play-chat-{backend} .bot").last
        assert bot.inner_text().strip(), f"{backend} answered nothing"
        stats = page.locator(f"#play-stats-{backend}").inner_text()
        assert "first token" in stats and "tokens/s" in stats

    # Runs: the run is listed with its losses.
    _tab(page, "5. Runs")
    table = page.locator("#runs-table")
    _wait_until(page, lambda: "completed" in table.inner_text(), what="the runs table")
    assert "lora" in table.inner_text()
    page.locator("#runs-curves svg").first.wait_for()
    _shot(page, "runs")
    assert any(p.name.startswith("onnx-") for p in runs_dir.glob("*/export/*"))


def test_second_start_queues_reload_reattaches_and_stop_stops(app, page, chat_model):
    url, runs_dir = app
    _open(page, url)
    _prepare_training(page, chat_model, max_steps=2000)
    page.locator("#train-start").click()
    running = page.locator("#train-progress[data-state=running]")
    running.wait_for(timeout=120_000)
    first = running.locator("b").inner_text()

    # A second Start while one trains: queued, and the page says so.
    page.locator("#train-start").click()
    page.get_by_text("Queued:").first.wait_for()
    page.locator("#train-progress[data-state=queued]").wait_for()
    second = page.locator("#train-progress b").inner_text()
    assert second != first

    # Reload: the page re-attaches to the running training, with its progress.
    page.reload()
    _tab(page, "2. Train")
    page.locator("#train-progress[data-state=running]").wait_for()
    assert page.locator("#train-progress b").inner_text() == first
    page.wait_for_function("/step [1-9]/.test(document.querySelector('#train-progress').innerText)", timeout=120_000)

    # Stop: the run ends 'aborted' and the failure panel says what to do; the queued run starts.
    page.locator("#train-stop").click()
    page.locator("#train-progress[data-state=aborted]").wait_for(timeout=120_000)
    assert "Training stopped" in page.locator("#train-failure").inner_text()
    page.reload()
    _tab(page, "2. Train")
    page.locator("#train-progress b").get_by_text(second).wait_for(timeout=60_000)
    page.locator("#train-stop").click()
    page.locator("#train-progress[data-state=aborted]").wait_for(timeout=120_000)
    from engine import runs

    states = {info["run_id"]: info["state"] for info in runs.list_runs(runs_dir)}
    assert states == {first: "aborted", second: "aborted"}
    shutil.rmtree(runs_dir, ignore_errors=True)


def test_playground_derives_the_run_state_again_when_shown(app, page):
    """A run picked while it had no weights: once it has them (and an ONNX export), going back
    to the Playground shows the columns ready, not the notices of the earlier moment."""
    import re

    from engine import runs
    from engine.config import RunConfig

    url, runs_dir = app
    run_dir = runs.create_run(RunConfig(), runs_dir)
    runs.update_status(run_dir, state="running")
    page.goto(url)
    page.get_by_role("tab", name="3. Playground").click()
    page.locator("#play-run input").click()
    page.get_by_role("option", name=re.compile(re.escape(run_dir.name))).click()
    notice = page.locator("#play-notice-tuned")
    notice.get_by_text("has no trained weights yet").wait_for(timeout=20_000)
    assert page.locator("#play-notice-onnx").get_by_text("has no trained weights yet").is_visible()

    (run_dir / "adapter").mkdir()
    (run_dir / "export" / "onnx-int4").mkdir(parents=True)
    runs.update_status(run_dir, state="completed")
    page.get_by_role("tab", name="4. Export").click()
    page.get_by_role("tab", name="3. Playground").click()
    notice.wait_for(state="hidden", timeout=20_000)
    page.locator("#play-notice-onnx").wait_for(state="hidden", timeout=20_000)
    assert not page.locator("#play-export-onnx").is_visible()


def test_dpo_on_the_public_demo_pairs_in_the_browser(app, page, shared_datasets):
    """dpo_en_demo.json on the Data tab says it trains dpo, kto or orpo; the Train tab trains 3
    DPO steps of the embedded model on it (max length 512, batch 2) and draws the rewards."""
    url, runs_dir = app
    _open(page, url)
    _set_number(page, "data-max-length", 512)
    split = page.locator("#data-split input[type=number]")  # a slider with a number box
    split.fill("0")
    split.press("Tab")
    _upload(page, shared_datasets / "dpo_en_demo.json")
    summary = page.locator("#data-summary")
    summary.get_by_text("Trains stage:").wait_for(timeout=120_000)
    assert "dpo, kto, orpo" in summary.inner_text()
    _tab(page, "2. Train")
    page.locator("#train-dataset").get_by_text("dpo_en_demo.json").wait_for()
    _pick(page, "train-stage", "dpo")
    _set_number(page, "train-max-steps", 3)
    _set_number(page, "train-batch-size", 2)
    _wait_until(page, lambda: "engine.train" in page.locator("#train-command").inner_text(), what="the command")
    page.locator("#train-start").click()
    page.locator("#train-progress[data-state=completed]").wait_for(timeout=900_000)
    assert "step 3 / 3 (100%)" in _progress(page).inner_text()
    page.locator("#train-rewards svg").first.wait_for()
    assert "reward margin" in _progress(page).inner_text()
    from engine import runs

    (run,) = [r for r in runs.list_runs(runs_dir)]
    config = runs.read_json(Path(run["path"]) / "status.json")
    assert config["stage"] == "dpo" and config["state"] == "completed"
    assert runs.read_json(Path(run["path"]) / runs.DATA_FILE)["stage"] == "dpo"


def test_evaluate_tab_starts_compares_filters_and_opens_a_row(app, page, chat_model):
    """An evaluation started from the page runs in the background queue; its table, filters
    and downloads come from the results, and a clicked row opens in the playground."""
    import json

    from tiny_runs import CHATS, make_adapter_run

    from engine import evaluate, runs

    url, runs_dir = app
    run_dir = make_adapter_run(runs_dir, chat_model, name="20260101-000000-lora-eval", scale=0.05)
    runs.update_status(run_dir, state="completed")
    data = runs_dir.parent / "chats.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in CHATS
        )
    )
    page.goto(url)
    _tab(page, "6. Evaluate")
    page.locator("#eval-backends").get_by_text("tuned").wait_for()
    page.locator("#eval-data input, #eval-data textarea").first.fill(str(data))
    page.get_by_text("Checks and settings").click()
    page.locator("#eval-checks textarea").fill("starts_with:Hello")
    _set_number(page, "eval-max-new", 12)
    page.locator("#eval-name input, #eval-name textarea").first.fill("from-page")
    page.locator("#eval-start").click()
    progress = page.locator("#eval-progress")
    _wait_until(page, lambda: "completed" in progress.inner_text(), timeout_s=240, what="the evaluation")
    page.locator("#eval-summary").get_by_text("rouge_l").wait_for()
    rows = evaluate.read_results(run_dir / "eval" / "from-page")
    assert {r["backend"] for r in rows} == {"base", "tuned"}  # onnx-int4 was not offered: no export
    table = page.locator("#eval-table")
    _wait_until(page, lambda: table.get_by_text(CHATS[2][0], exact=True).count() > 0, what="the table")

    # The filter shows what the engine's comparison keeps for it.
    page.locator("#eval-filter").get_by_text("tuned worse than base").click()
    kept = evaluate.comparison(rows, ["base", "tuned"], "starts_with:Hello", "tuned worse than base")
    _wait_until(
        page,
        lambda: all(
            table.get_by_text(q, exact=True).count() == (q in [e["prompt"][-1]["content"] for e in kept])
            for q, _ in CHATS
        ),
        what="the filtered table",
    )
    page.locator("#eval-filter").get_by_text("all examples").click()
    _wait_until(page, lambda: table.get_by_text(CHATS[0][0], exact=True).count() > 0, what="every row again")
    page.locator("#eval-dl-csv").click()
    _wait_until(page, lambda: "from-page" in page.locator("#eval-files").inner_text(), what="the CSV download")
    _shot(page, "evaluate")

    # A click on a row: the playground with that prompt and its reference.
    table.get_by_text(CHATS[1][0], exact=True).first.click()
    _wait_until(page, lambda: page.locator("#play-prompt textarea").input_value() == CHATS[1][0], what="the playground")
    assert CHATS[1][1] in page.locator("#play-reference").inner_text()


@pytest.fixture
def bare_app(tmp_path):
    """The real app with no extra model (for tests that only look at the page); yields its url."""
    with _running_app(tmp_path, tmp_path / "runs") as url:
        yield url


def _visible(text: str) -> str:
    """A locale value as the page shows it: without Markdown heading marks or HTML tags."""
    import re

    return re.sub(r"<[^>]+>", "", text).lstrip("#").strip()


def _english_left(text: str, prefixes: tuple[str, ...]) -> list[str]:
    """The English locale values under ``prefixes`` that differ from Kiswahili and appear in
    ``text`` as whole words. A value with {placeholders} counts by its literal pieces of 12
    characters or more (the rest is filled on the server)."""
    import re

    from webui.i18n import translations

    sw, en = translations()["sw"], translations()["en"]
    found = []
    for key, value in en.items():
        if not key.startswith(prefixes) or value == sw[key]:
            continue
        shown = _visible(value).replace("**", "").lstrip("> ").strip()
        pieces = [p.strip(" ,.:;()") for p in re.split(r"\{[^}]*\}", shown)] if "{" in shown else [shown]
        for piece in pieces:
            if (len(piece) >= 12 or "{" not in shown) and piece:
                if re.search(r"(?<!\w)" + re.escape(piece) + r"(?!\w)", text):
                    found.append(f"{key}: {piece!r}")
    return found


def _tab_text(page, inside: str) -> str:
    """The visible text of the tab panel that holds ``inside`` (a CSS selector)."""
    return page.locator(inside).locator("xpath=ancestor::div[@role='tabpanel'][1]").inner_text()


def _kiswahili_page(browser, url: str):
    """A new browser context whose language is Kiswahili, with the app open on its Data tab."""
    context = browser.new_context(viewport=VIEWPORT, locale="sw")
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#data-upload").wait_for()
    return context, page


def test_language_follows_the_browser_and_the_picker_overrides_it(browser, bare_app):
    """Browser language sw: the tabs are in Kiswahili, and Data, Train (a sample loaded) and
    Playground show no English locale text (docs/screenshots/sw/). The header's picker switches
    to English at once and the choice survives a reload; picking Kiswahili again brings it back."""
    from webui.i18n import translations

    sw, en = translations()["sw"], translations()["en"]
    tab_keys = [k for k in en if k.startswith("app.tab.") and en[k] != sw[k]]
    shots = SCREENSHOTS / "sw"
    shots.mkdir(parents=True, exist_ok=True)
    context, page = _kiswahili_page(browser, bare_app)
    try:
        for key in tab_keys:
            page.get_by_role("tab", name=sw[key]).wait_for()
        assert page.get_by_role("tab", name=en["app.tab.train"]).count() == 0
        page.get_by_text(_visible(sw["data.inspect"]), exact=True).wait_for()
        body = page.locator("#data-upload").locator("xpath=ancestor::div[@role='tabpanel']").inner_text()
        body = body.replace("Drop File Here", "")  # Gradio's own text: Gradio ships no Kiswahili
        english = [_visible(en[k]) for k in en if k.startswith(("data.", "app.")) and en[k] != sw[k]]
        assert not [text for text in english if text in body], "English left on the Data tab"
        # A file with bad records: the problems come back in Kiswahili.
        _pick(page, "data-sample", "broken_example.jsonl")
        page.locator("#data-load-sample").click()
        page.locator("#data-inspect").click()
        page.locator("#data-problems").get_by_text("Matatizo: 7", exact=False).wait_for()
        from playwright.sync_api import expect

        expect(page.locator("#data-problems")).to_contain_text("jukumu lisilojulikana 'bot'")
        page.screenshot(path=str(shots / "data.png"), full_page=True)

        # Data -> Train -> Playground with a trainable sample: no English locale text on any
        # tab (the Train form's labels and help included), and a screenshot of each.
        _pick(page, "data-sample", "pip_chat.jsonl")
        page.locator("#data-load-sample").click()
        page.locator("#data-summary").get_by_text("pip_chat.jsonl").wait_for()
        body = _tab_text(page, "#data-upload").replace("Drop File Here", "").replace("Click to Upload", "")
        assert not _english_left(body, ("data.", "app.", "problem.", "links.")), "English left on the Data tab"
        page.get_by_role("tab", name=sw["app.tab.train"]).click()
        page.locator("#train-dataset").get_by_text("pip_chat.jsonl").wait_for()
        expect(page.locator("#train-reasons")).to_contain_text(sw["train.recommendation"].strip("*"))
        expect(page.locator("#train-command")).to_contain_text("engine.train")
        for title in ("train.section.method", "train.section.distributed", "train.section.model"):
            page.get_by_text(sw[title], exact=True).click()  # open every section of the form
        page.get_by_label(sw["config.training.batch_size.label"]).wait_for()
        left = _english_left(_tab_text(page, "#train-start"), ("train.", "config.", "links.", "common."))
        assert not left, f"English left on the Train tab: {left}"
        page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")  # the Data tab's notices
        page.wait_for_timeout(800)  # their fade-out
        page.screenshot(path=str(shots / "train.png"), full_page=True)
        page.get_by_role("tab", name=sw["app.tab.playground"]).click()
        expect(page.locator("#play-notice-tuned")).to_contain_text(_visible(sw["play.pick_trained"]).split("**")[0])
        left = _english_left(_tab_text(page, "#play-prompt"), ("play.", "common.", "links."))
        assert not left, f"English left on the Playground tab: {left}"
        page.screenshot(path=str(shots / "playground.png"), full_page=True)
        page.get_by_role("tab", name=sw["app.tab.data"]).click()

        _pick(page, "tl-lang", en["lang.self"])
        page.get_by_role("tab", name=en["app.tab.train"]).wait_for()
        page.reload()
        page.locator("#data-upload").wait_for()
        page.get_by_role("tab", name=en["app.tab.train"]).wait_for()
        assert page.get_by_role("tab", name=sw["app.tab.train"]).count() == 0

        _pick(page, "tl-lang", sw["lang.self"])
        page.get_by_role("tab", name=sw["app.tab.train"]).wait_for()
        page.reload()
        page.locator("#data-upload").wait_for()
        page.get_by_role("tab", name=sw["app.tab.train"]).wait_for()
        assert page.locator("#tl-lang input").input_value() == sw["lang.self"]
    finally:
        context.close()


def test_export_runs_and_evaluate_tabs_show_no_english_in_kiswahili(browser, bare_app):
    """Browser language sw: the Export, Runs and Evaluate tabs (accordions open, the endpoint
    judge chosen) show none of their English locale values; screenshots in docs/screenshots/sw/."""
    import re

    from webui.i18n import translations

    sw, en = translations()["sw"], translations()["en"]
    mine = ("export.", "runs.", "evaluate.")
    sw_words = " ".join(v for k, v in sw.items() if k.startswith(mine))
    # English values a Kiswahili text may hold as a word of its own (e.g. "loss") are left out.
    english = {
        prefix: [
            _visible(en[k])
            for k in en
            if k.startswith(prefix) and en[k] != sw[k] and not re.search(rf"\b{re.escape(_visible(en[k]))}\b", sw_words)
        ]
        for prefix in mine
    }
    shots = SCREENSHOTS / "sw"
    shots.mkdir(parents=True, exist_ok=True)
    context, page = _kiswahili_page(browser, bare_app)
    try:

        def panel(elem_id: str) -> str:
            return page.locator(f"#{elem_id}").locator("xpath=ancestor::div[@role='tabpanel']").inner_text()

        def no_english(elem_id: str, prefix: str, name: str):
            body = panel(elem_id)
            left = [text for text in english[prefix] if re.search(rf"(?<!\w){re.escape(text)}(?!\w)", body)]
            assert not left, f"English left on the {name} tab: {left}"
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        _tab(page, sw["app.tab.export"])
        page.locator("#export-precisions").get_by_text(sw["export.adapter_file"]).wait_for()  # set on load
        page.locator("#export-onnx-intro").get_by_text(_visible(sw["export.onnx_intro"]).split(".")[0]).wait_for()
        no_english("export-run", "export.", "export")

        _tab(page, sw["app.tab.runs"])
        page.locator("#runs-table").get_by_text(sw["runs.col.train_loss"]).wait_for()
        no_english("runs-table", "runs.", "runs")

        _tab(page, sw["app.tab.evaluate"])
        page.get_by_text(sw["evaluate.settings"]).click()
        page.get_by_text(_visible(sw["evaluate.judge"])).click()
        page.locator("#eval-judge-kind").get_by_text(sw["evaluate.judge_kind.endpoint"]).click()
        page.locator("#eval-judge-url").wait_for()
        page.locator("#eval-filter").get_by_text(sw["evaluate.filter.tuned_worse"]).wait_for()
        no_english("eval-run", "evaluate.", "evaluate")
    finally:
        context.close()

"""Export tab: merge a run's adapter into the base model, export to ONNX (int4, int8,
fp32) with live progress, show the parity report, offer zip downloads of the adapter,
the merged model and the ONNX model, and push one of them to the Hugging Face Hub with
a model card (previewed first).

On a shared app (multi-user mode) the zips are built outside the runs directory, which
the app then never serves directly, and a push uses the user's own Hugging Face sign-in
or a token they paste, never the server's HF_TOKEN.

Launch alone: ``python -m webui.export_tab``.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine.config import AUTO_ORDER, DEFAULT_ONNX_PRECISION, ONNX_LORA_BASE, ONNX_VARIANTS
from engine.util import dir_size, fmt_bytes
from webui.common import (
    AppContext,
    engine_errors,
    escape_md,
    launch_standalone,
    state_text,
    stream_progress,
)
from webui.i18n import lang_of, t, tr
from webui.links import standalone_tab
from webui.playground_tab import run_picker

ADAPTER_FILE = "LoRA adapter file"  # the base with LoRA inputs + the run's .onnx_adapter (og.Adapters)
ONNX_CHOICES = ("auto", *ONNX_VARIANTS, ADAPTER_FILE)
PROGRESS_LINES = 12
# The page's words for the engine's verdicts on an ONNX export (engine.export.verdict); the
# parity report's own file, the CLI and --json keep the English words.
VERDICT_KEYS = {
    "faithful": "export.verdict.faithful",
    "degraded": "export.verdict.degraded",
    "broken": "export.verdict.broken",
    "unmeasured": "export.verdict.unmeasured",
    "no verdict": "export.verdict.none",
}
# The export job's step labels (engine.export.run_export_job) that are words, not variant names.
STEP_KEYS = {"LoRA adapter file": "export.adapter_file", "Parity report": "export.step_parity"}


def verdict_text(lang: str | None, verdict: str) -> str:
    key = VERDICT_KEYS.get(verdict)
    return tr(lang, key) if key else verdict


def step_text(lang: str | None, label: str) -> str:
    key = STEP_KEYS.get(label)
    return tr(lang, key) if key else label


def precision_choices(lang: str | None) -> list[tuple[str, str]]:
    """The ONNX variants to build, (label in ``lang``, value): variant names stay as they are."""
    return [(tr(lang, "export.adapter_file") if c == ADAPTER_FILE else c, c) for c in ONNX_CHOICES]


def onnx_intro(lang: str | None) -> str:
    return tr(lang, "export.onnx_intro", order=", ".join(AUTO_ORDER))


def zip_dir(directory: Path, dest_dir: Path, prefix: str) -> Path:
    """``directory`` as ``dest_dir/<prefix>-<name>.zip`` (rebuilt only when the folder is newer)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist yet")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{prefix}-{directory.name}.zip"
    newest = max((p.stat().st_mtime for p in directory.rglob("*") if p.is_file()), default=0)
    if target.exists() and target.stat().st_mtime >= newest:
        return target
    tmp = target.with_name(target.stem + ".partial")
    archive = shutil.make_archive(str(tmp), "zip", root_dir=directory.parent, base_dir=directory.name)
    Path(archive).replace(target)
    return target


def artefacts(run_dir: Path) -> dict[str, Path]:
    """What the run has that can be downloaded: adapter, full model, merged model, ONNX exports."""
    found = {}
    for name, rel in (("adapter", "adapter"), ("model", "model"), ("merged", "export/merged")):
        if (run_dir / rel / "config.json").is_file() or (run_dir / rel / "adapter_config.json").is_file():
            found[name] = run_dir / rel
    for precision in (*ONNX_VARIANTS, ONNX_LORA_BASE):
        onnx_dir = run_dir / "export" / f"onnx-{precision}"
        if (onnx_dir / "genai_config.json").is_file():
            found[f"onnx-{precision}"] = onnx_dir
    return found


def artefact_markdown(run_dir: Path, lang: str = "en") -> str:
    found = artefacts(run_dir)
    if not found:
        return tr(lang, "export.nothing", run=escape_md(run_dir.name))
    from engine.export import export_verdicts

    verdicts = {name: verdict_text(lang, v) for name, v in export_verdicts(run_dir).items()}
    head = [tr(lang, k) for k in ("export.col.artefact", "export.col.folder", "export.col.size", "export.col.verdict")]
    rows = ["| " + " | ".join(head) + " |", "|---|---|---:|---|"]
    for name, path in found.items():
        judged = verdicts.get(name, tr(lang, "export.not_measured") if name.startswith("onnx-") else "")
        rows.append(
            f"| {name} | `{escape_md(path.relative_to(run_dir))}` | {fmt_bytes(dir_size(path))} | {escape_md(judged)} |"
        )
    return "\n".join(rows)


def parity_text(run_dir: Path, lang: str = "en") -> str:
    """The parity report the engine wrote (export/parity.md, in English), or what to do to get one."""
    path = run_dir / "export" / "parity.md"
    if not path.is_file():
        return tr(lang, "export.no_parity")
    from engine.security import redact

    text = redact(path.read_text(encoding="utf-8"))
    # The report's first line is a page title: make it a smaller heading inside the tab.
    return text.replace("# Export parity:", "##### " + tr(lang, "export.parity_title") + ":", 1)


def download_targets(run_dir: Path, kind: str, lang: str = "en") -> list[Path]:
    """Folders to zip for a download button; raises FileNotFoundError saying what to do (in ``lang``)."""
    found = artefacts(run_dir)
    if kind == "adapter":
        wanted = [found.get("adapter") or found.get("model")]
    elif kind == "merged":
        wanted = [found.get("merged") or found.get("model")]
    else:
        wanted = [p for name, p in found.items() if name.startswith("onnx-")]
    wanted = [w for w in wanted if w]
    if not wanted:
        key = {"adapter": "export.none_adapter", "merged": "export.none_merged", "onnx": "export.none_onnx"}[kind]
        raise FileNotFoundError(tr(lang, key, run=run_dir.name))
    return wanted


def downloads_dir(ctx: AppContext, run_dir: Path) -> Path:
    """Where the zips of a run are built. Single-user: ``<run>/export/downloads``. Multi-user:
    a private folder of the system's temporary directory, one per run directory (the runs
    directory is blocked from Gradio's file route there; Gradio copies what a handler
    returns from this folder into its own cache)."""
    if not ctx.multi_user:
        return run_dir / "export" / "downloads"
    base = Path(tempfile.gettempdir()) / "tunelab-downloads"
    base.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(str(run_dir.resolve()).encode("utf-8")).hexdigest()[:16]
    return base / f"{run_dir.name}-{key}"


def push_token(ctx: AppContext, pasted: str | None, oauth_token, lang: str = "en") -> str | None:
    """The token a push from the page uses: the one pasted, else the user's Hugging Face
    sign-in; on a single-user app None (engine.hub then reads HF_TOKEN). On a shared app the
    server's own token is never used for a user's push: gr.Error says what to do instead."""
    if pasted and pasted.strip():
        return pasted.strip()
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    if not ctx.multi_user:
        return None
    raise gr.Error(
        tr(lang, "export.no_token_oauth" if ctx.oauth else "export.no_token"), title=tr(lang, "export.no_token_title")
    )


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine import export, hub, runs
    from engine.security import redact

    timer = gr.Timer(max(1.0, 2 * ctx.poll_seconds), active=False)  # polls the export job in the queue
    with gr.Row():
        run = gr.Dropdown([], value=None, label=t("export.run"), scale=3, elem_id="export-run")
        refresh_btn = gr.Button(t("export.refresh"), size="sm", scale=0, min_width=90)
    contents = gr.Markdown("", elem_id="export-contents")
    with gr.Row():
        with gr.Column():
            gr.Markdown(t("export.merge_intro"))
            merge_btn = gr.Button(t("export.merge"), elem_id="export-merge")
        with gr.Column():
            intro = gr.Markdown(onnx_intro("en"), elem_id="export-onnx-intro")  # in the visitor's language on load
            precisions = gr.CheckboxGroup(
                precision_choices("en"),
                value=[DEFAULT_ONNX_PRECISION],
                label=t("export.variants"),
                elem_id="export-precisions",
            )
            with gr.Row():
                onnx_btn = gr.Button(t("export.onnx"), variant="primary", elem_id="export-onnx")
                stop_btn = gr.Button(t("export.stop"), variant="stop", elem_id="export-stop", scale=0, min_width=80)
    status = gr.Textbox(
        "",
        label=t("export.progress"),
        lines=4,
        max_lines=PROGRESS_LINES,
        interactive=False,
        elem_id="export-status",
        autoscroll=True,
    )
    gr.Markdown(t("export.parity"))
    parity = gr.Markdown("", elem_id="export-parity")
    gr.Markdown(t("export.downloads"))
    with gr.Row():
        dl_adapter = gr.Button(t("export.dl_adapter"), elem_id="export-dl-adapter")
        dl_merged = gr.Button(t("export.dl_merged"), elem_id="export-dl-merged")
        dl_onnx = gr.Button(t("export.dl_onnx"), elem_id="export-dl-onnx")
    files = gr.File(label=t("export.files"), file_count="multiple", interactive=False, elem_id="export-files")

    gr.Markdown(t("export.hub_intro"))
    with gr.Row():
        hub_artifact = gr.Dropdown(
            list(hub.ARTIFACTS),
            value=hub.ARTIFACTS[0],
            label=t("export.artefact"),
            scale=1,
            elem_id="export-hub-artifact",
        )
        hub_repo = gr.Textbox(
            "",
            label=t("export.repo"),
            placeholder=t("export.repo_placeholder"),
            scale=2,
            elem_id="export-hub-repo",
            info=t("export.repo_info"),
        )
        hub_private = gr.Checkbox(True, label=t("export.private"), scale=0, min_width=100, elem_id="export-hub-private")
    # the token box's help: a single-user app falls back on HF_TOKEN, a Space with sign-in on that
    token_info = {
        (False, False): "export.token_info_env",
        (False, True): "export.token_info",
        (True, False): "export.token_info_oauth_env",
        (True, True): "export.token_info_oauth",
    }[(bool(ctx.oauth), bool(ctx.multi_user))]
    hub_token_box = gr.Textbox(
        "", label=t("export.token"), type="password", elem_id="export-hub-token", info=t(token_info)
    )
    with gr.Row():
        card_btn = gr.Button(t("export.card_preview"), elem_id="export-hub-card")
        push_btn = gr.Button(t("export.push"), variant="primary", elem_id="export-hub-push")
    hub_result = gr.Markdown("", elem_id="export-hub-result")
    card = gr.Code(
        "",
        language="markdown",
        label=t("export.card"),
        interactive=False,
        visible=False,
        elem_id="export-hub-card-text",
        lines=12,
        max_lines=40,
    )

    def refresh(current, request: gr.Request = None):
        return run_picker(ctx, current, request)

    def need_run(run_id, request) -> Path:
        return ctx.run_dir(request, run_id)

    @engine_errors
    def show(run_id, request: gr.Request):
        lang = lang_of(request)
        if not run_id:
            return tr(lang, "export.pick_run"), "", gr.Dropdown(), "", gr.Timer(active=False)
        path = need_run(run_id, request)
        found = [a for a in artefacts(path) if a in hub.ARTIFACTS]
        text, active = job_view(path, lang)  # a reloaded page finds its export job again
        return (
            artefact_markdown(path, lang),
            parity_text(path, lang),
            gr.Dropdown(choices=found or list(hub.ARTIFACTS), value=found[0] if found else "adapter"),
            text,
            gr.Timer(active=active),
        )

    def follow(jobs, path: Path, progress, lang: str):
        """Run (label, fn, kwargs) jobs one after another, streaming their progress lines (the
        engine's, in English; the labels and the end in ``lang``)."""
        log: list[str] = []
        for i, (label, fn, kwargs) in enumerate(jobs):
            log.append(f"== {label}")
            progress(i / len(jobs), desc=label)
            for kind, item in stream_progress(fn, **kwargs):
                if kind == "line":
                    log.append(redact(item))
                    progress(i / len(jobs), desc=f"{label}: {log[-1][:80]}")
                    yield "\n".join(log[-PROGRESS_LINES:]), gr.skip(), gr.skip()
        progress(1.0, desc=tr(lang, "export.done"))
        log.append(tr(lang, "export.done_line"))
        yield "\n".join(log[-PROGRESS_LINES:]), artefact_markdown(path, lang), parity_text(path, lang)

    @engine_errors
    def merge(run_id, request: gr.Request, progress=gr.Progress()):
        lang = lang_of(request)
        path = need_run(run_id, request)
        jobs = [(tr(lang, "export.merging"), export.merge, {"run_dir": path})]
        yield from follow(jobs, path, progress, lang)

    def job_view(run_dir: Path, lang: str = "en"):
        """The run's newest export job: (progress text in ``lang``, timer active?)."""
        jobs = export.export_jobs(run_dir)
        if not jobs:
            return "", False
        job = jobs[-1]
        info = runs.refresh_status(job)
        state = info.get("state") or "?"
        step = info.get("progress") or {}
        head = tr(lang, "export.job", job=job.name, state=state_text(lang, state))
        if state in ("created", "queued"):
            head += " " + tr(lang, "export.waiting")
        elif state == "running" and step.get("step"):
            head += tr(
                lang,
                "export.step",
                n=step.get("done", 0) + 1,
                total=step.get("total", "?"),
                step=step_text(lang, step["step"]),
            )
        elif state == "failed" and info.get("error"):
            head += f": {info['error']}"
        lines = [line for line in runs.tail_log(job, PROGRESS_LINES).splitlines() if line.strip()]
        done = state in runs.FINAL_STATES
        end = [tr(lang, "export.done_line")] if done else []
        return "\n".join([head, *(redact(line) for line in lines), *end]), not done

    @engine_errors
    def poll(run_id, request: gr.Request):
        if not run_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        lang = lang_of(request)
        path = need_run(run_id, request)
        text, active = job_view(path, lang)
        return text, artefact_markdown(path, lang), parity_text(path, lang), gr.Timer(active=active)

    @engine_errors
    def onnx(run_id, chosen, request: gr.Request):
        """Queue the export as a background job (engine.export.submit_export): it waits for
        a training or evaluation in progress, and the page polls its log."""
        lang = lang_of(request)
        path = need_run(run_id, request)
        if not chosen:
            raise gr.Error(tr(lang, "export.choose"))
        variants = [p for p in chosen if p in ONNX_VARIANTS or p == "auto"]
        job = export.submit_export(path, variants, adapter_file=ADAPTER_FILE in chosen)
        gr.Info(tr(lang, "export.queued", job=job.name))
        text, _ = job_view(path, lang)
        return text, gr.Timer(active=True)

    @engine_errors
    def request_stop(run_id, request: gr.Request):
        if not run_id:
            return
        jobs = export.export_jobs(need_run(run_id, request))
        if jobs:
            status = export.stop_export(jobs[-1])
            lang = lang_of(request)
            gr.Info(tr(lang, "export.stopping", job=jobs[-1].name, state=state_text(lang, status.get("state"))))

    def download(kind):
        @engine_errors
        def handler(run_id, request: gr.Request, progress=gr.Progress()):
            lang = lang_of(request)
            path = need_run(run_id, request)
            try:
                wanted = download_targets(path, kind, lang)
            except FileNotFoundError as err:
                raise gr.Error(str(err)) from err
            progress(0.2, desc=tr(lang, "export.zipping"))
            return [str(zip_dir(w, downloads_dir(ctx, path), path.name)) for w in wanted]

        handler.__name__ = f"download_{kind}"
        return handler

    @engine_errors
    def preview_card(run_id, artifact, repo_id, request: gr.Request):
        path = need_run(run_id, request)
        text = hub.model_card(path, artifact or "adapter", (repo_id or "").strip() or None)
        return gr.Code(redact(text), visible=True)

    @engine_errors
    def push(
        run_id,
        artifact,
        repo_id,
        private,
        pasted,
        request: gr.Request,
        oauth_token: gr.OAuthToken | None,
        progress=gr.Progress(),
    ):
        lang = lang_of(request)
        path = need_run(run_id, request)
        token = push_token(ctx, pasted, oauth_token, lang)
        log: list[str] = ["== " + tr(lang, "export.push_head", artefact=artifact, run=path.name, repo=repo_id or "?")]
        progress(0.0, desc=tr(lang, "export.pushing"))
        kwargs = {
            "run_dir": path,
            "artifact": artifact or "adapter",
            "repo_id": (repo_id or "").strip(),
            "private": bool(private),
            "token": token,
        }
        try:
            for kind, item in stream_progress(hub.push_to_hub, **kwargs):
                if kind == "line":
                    log.append(hub.scrub(str(item), token))
                    progress(None, desc=log[-1][:80])
                    yield "\n".join(log[-PROGRESS_LINES:]), gr.skip()
                else:
                    url = hub.scrub(str(item), token)
                    log.append(tr(lang, "export.pushed_line", url=url))
                    yield (
                        "\n".join(log[-PROGRESS_LINES:]),
                        tr(
                            lang,
                            "export.pushed_private" if private else "export.pushed_public",
                            artefact=escape_md(artifact),
                            link=f"[{escape_md(url)}]({url})",
                        ),
                    )
        except hub.HubError as err:
            title = tr(lang, "export.push_failed")
            raise gr.Error(hub.scrub(str(err), token), title=title, print_exception=False) from None

    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden", api_name="export_runs")

    def on_load(request: gr.Request):
        lang = lang_of(request)
        return refresh(None, request), onnx_intro(lang), gr.CheckboxGroup(choices=precision_choices(lang))

    gr.on(triggers=None, fn=on_load, inputs=None, outputs=[run, intro, precisions], show_progress="hidden")
    run.change(
        show,
        inputs=run,
        outputs=[contents, parity, hub_artifact, status, timer],
        show_progress="hidden",
        api_name="export_contents",
    )
    merge_btn.click(merge, inputs=run, outputs=[status, contents, parity], concurrency_limit=1, concurrency_id="export")
    onnx_btn.click(onnx, inputs=[run, precisions], outputs=[status, timer], api_name="export_onnx")
    timer.tick(poll, inputs=run, outputs=[status, contents, parity, timer], show_progress="hidden")
    stop_btn.click(request_stop, inputs=run, outputs=None, concurrency_limit=None)
    for button, kind in ((dl_adapter, "adapter"), (dl_merged, "merged"), (dl_onnx, "onnx")):
        button.click(download(kind), inputs=run, outputs=files, api_name=f"download_{kind}")
    card_btn.click(preview_card, inputs=[run, hub_artifact, hub_repo], outputs=card, api_name="model_card")
    push_btn.click(
        push,
        inputs=[run, hub_artifact, hub_repo, hub_private, hub_token_box],
        outputs=[status, hub_result],
        concurrency_limit=2,
        concurrency_id="hub-push",
        api_name="push",
    )
    # what the run holds (merged, exports, parity), derived from its directory again whenever the tab is shown
    return SimpleNamespace(
        run=run,
        refresh=refresh,
        show=show,
        show_inputs=[run],
        show_outputs=[contents, parity, hub_artifact, status, timer],
    )


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "export", ctx)


if __name__ == "__main__":
    launch_standalone(create)

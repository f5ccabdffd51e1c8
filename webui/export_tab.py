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
    stream_progress,
)
from webui.links import standalone_tab
from webui.playground_tab import run_picker

ADAPTER_FILE = "LoRA adapter file"  # the base with LoRA inputs + the run's .onnx_adapter (og.Adapters)
ONNX_CHOICES = ("auto", *ONNX_VARIANTS, ADAPTER_FILE)
PROGRESS_LINES = 12


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


def artefact_markdown(run_dir: Path) -> str:
    found = artefacts(run_dir)
    if not found:
        return f"Run **{escape_md(run_dir.name)}** has nothing to export yet (no adapter or model)."
    from engine.export import export_verdicts

    verdicts = export_verdicts(run_dir)
    rows = ["| artefact | folder | size | verdict |", "|---|---|---:|---|"]
    for name, path in found.items():
        judged = verdicts.get(name, "not measured yet" if name.startswith("onnx-") else "")
        rows.append(
            f"| {name} | `{escape_md(path.relative_to(run_dir))}` | {fmt_bytes(dir_size(path))} | {escape_md(judged)} |"
        )
    return "\n".join(rows)


def parity_text(run_dir: Path) -> str:
    """The parity report the engine wrote (export/parity.md), or what to do to get one."""
    path = run_dir / "export" / "parity.md"
    if not path.is_file():
        return "No parity report yet: export to ONNX to compare its outputs with the PyTorch model."
    from engine.security import redact

    text = redact(path.read_text(encoding="utf-8"))
    # The report's first line is a page title: make it a smaller heading inside the tab.
    return text.replace("# Export parity:", "##### Export parity:", 1)


def download_targets(run_dir: Path, kind: str) -> list[Path]:
    """Folders to zip for a download button; raises FileNotFoundError saying what to do."""
    found = artefacts(run_dir)
    if kind == "adapter":
        wanted = [found.get("adapter") or found.get("model")]
    elif kind == "merged":
        wanted = [found.get("merged") or found.get("model")]
    else:
        wanted = [p for name, p in found.items() if name.startswith("onnx-")]
    wanted = [w for w in wanted if w]
    if not wanted:
        what = {
            "adapter": "an adapter or model (is it trained?)",
            "merged": "a merged model (press Merge)",
            "onnx": "an ONNX export (press Export to ONNX)",
        }[kind]
        raise FileNotFoundError(f"Run {run_dir.name} has no {what} yet.")
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


def push_token(ctx: AppContext, pasted: str | None, oauth_token) -> str | None:
    """The token a push from the page uses: the one pasted, else the user's Hugging Face
    sign-in; on a single-user app None (engine.hub then reads HF_TOKEN). On a shared app the
    server's own token is never used for a user's push: gr.Error says what to do instead."""
    if pasted and pasted.strip():
        return pasted.strip()
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    if not ctx.multi_user:
        return None
    how = "sign in with Hugging Face (top of the page) or paste" if ctx.oauth else "paste"
    raise gr.Error(
        f"To push, {how} a Hugging Face token with write access: on a shared app the server's own "
        "token is never used for your pushes.",
        title="No token",
    )


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine import export, hub, runs
    from engine.security import redact

    timer = gr.Timer(max(1.0, 2 * ctx.poll_seconds), active=False)  # polls the export job in the queue
    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="export-run")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=90)
    contents = gr.Markdown("", elem_id="export-contents")
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Merge\nFold the adapter into the base weights: one standalone transformers model.")
            merge_btn = gr.Button("Merge adapter", elem_id="export-merge")
        with gr.Column():
            gr.Markdown(
                "#### ONNX\nFor ONNX Runtime GenAI. Each export gets a verdict against the tuned model "
                "(faithful, degraded, broken, or unmeasured without a validation split). int4 is the smallest "
                "and fastest, at a cost in accuracy that the verdict measures; **auto** builds "
                f"{', '.join(AUTO_ORDER)} in that order (fastest first) and keeps the first that is faithful."
            )
            precisions = gr.CheckboxGroup(
                list(ONNX_CHOICES), value=[DEFAULT_ONNX_PRECISION], label="Variants", elem_id="export-precisions"
            )
            with gr.Row():
                onnx_btn = gr.Button("Export to ONNX", variant="primary", elem_id="export-onnx")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="export-stop", scale=0, min_width=80)
    status = gr.Textbox(
        "",
        label="Progress",
        lines=4,
        max_lines=PROGRESS_LINES,
        interactive=False,
        elem_id="export-status",
        autoscroll=True,
    )
    gr.Markdown("#### Parity report")
    parity = gr.Markdown("", elem_id="export-parity")
    gr.Markdown("#### Downloads (zip)")
    with gr.Row():
        dl_adapter = gr.Button("Adapter", elem_id="export-dl-adapter")
        dl_merged = gr.Button("Merged model", elem_id="export-dl-merged")
        dl_onnx = gr.Button("ONNX model", elem_id="export-dl-onnx")
    files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")

    gr.Markdown(
        "#### Push to the Hugging Face Hub\nUploads the chosen artefact with a model card "
        "(base model, data, method, hyperparameters, losses, parity) in one commit."
    )
    with gr.Row():
        hub_artifact = gr.Dropdown(
            list(hub.ARTIFACTS), value="adapter", label="Artefact", scale=1, elem_id="export-hub-artifact"
        )
        hub_repo = gr.Textbox(
            "",
            label="Repository id",
            placeholder="your-name/my-tuned-model",
            scale=2,
            elem_id="export-hub-repo",
            info="OWNER/NAME; created if it does not exist",
        )
        hub_private = gr.Checkbox(True, label="Private", scale=0, min_width=100, elem_id="export-hub-private")
    token_info = (
        "A token with write access (https://huggingface.co/settings/tokens); used for this push only, "
        "never stored."
        + (" Empty: your Hugging Face sign-in." if ctx.oauth else "")
        + ("" if ctx.multi_user else " Empty: HF_TOKEN from the environment.")
    )
    hub_token_box = gr.Textbox(
        "", label="Hugging Face token", type="password", elem_id="export-hub-token", info=token_info
    )
    with gr.Row():
        card_btn = gr.Button("Preview model card", elem_id="export-hub-card")
        push_btn = gr.Button("Push to the Hub", variant="primary", elem_id="export-hub-push")
    hub_result = gr.Markdown("", elem_id="export-hub-result")
    card = gr.Code(
        "",
        language="markdown",
        label="Model card (README.md of the repository)",
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
        if not run_id:
            return "Pick a run.", "", gr.Dropdown(), "", gr.Timer(active=False)
        path = need_run(run_id, request)
        found = [a for a in artefacts(path) if a in hub.ARTIFACTS]
        text, active = job_view(path)  # a reloaded page finds its export job again
        return (
            artefact_markdown(path),
            parity_text(path),
            gr.Dropdown(choices=found or list(hub.ARTIFACTS), value=found[0] if found else "adapter"),
            text,
            gr.Timer(active=active),
        )

    def follow(jobs, path: Path, progress):
        """Run (label, fn, kwargs) jobs one after another, streaming their progress lines."""
        log: list[str] = []
        for i, (label, fn, kwargs) in enumerate(jobs):
            log.append(f"== {label}")
            progress(i / len(jobs), desc=label)
            for kind, item in stream_progress(fn, **kwargs):
                if kind == "line":
                    log.append(redact(item))
                    progress(i / len(jobs), desc=f"{label}: {log[-1][:80]}")
                    yield "\n".join(log[-PROGRESS_LINES:]), gr.skip(), gr.skip()
        progress(1.0, desc="Done")
        log.append("Done.")
        yield "\n".join(log[-PROGRESS_LINES:]), artefact_markdown(path), parity_text(path)

    @engine_errors
    def merge(run_id, request: gr.Request, progress=gr.Progress()):
        path = need_run(run_id, request)
        jobs = [("Merging the adapter into the base model", export.merge, {"run_dir": path})]
        yield from follow(jobs, path, progress)

    def job_view(run_dir: Path):
        """The run's newest export job: (progress text, timer active?)."""
        jobs = export.export_jobs(run_dir)
        if not jobs:
            return "", False
        job = jobs[-1]
        info = runs.refresh_status(job)
        state = info.get("state") or "?"
        step = info.get("progress") or {}
        head = f"Export {job.name}: {state}"
        if state in ("created", "queued"):
            head += " (waiting for the machine: a training or an evaluation runs first)"
        elif state == "running" and step.get("step"):
            head += f", step {step.get('done', 0) + 1} of {step.get('total', '?')}: {step['step']}"
        elif state == "failed" and info.get("error"):
            head += f": {info['error']}"
        lines = [line for line in runs.tail_log(job, PROGRESS_LINES).splitlines() if line.strip()]
        done = state in runs.FINAL_STATES
        return "\n".join([head, *(redact(line) for line in lines), *(["Done."] if done else [])]), not done

    @engine_errors
    def poll(run_id, request: gr.Request):
        if not run_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        path = need_run(run_id, request)
        text, active = job_view(path)
        return text, artefact_markdown(path), parity_text(path), gr.Timer(active=active)

    @engine_errors
    def onnx(run_id, chosen, request: gr.Request):
        """Queue the export as a background job (engine.export.submit_export): it waits for
        a training or evaluation in progress, and the page polls its log."""
        path = need_run(run_id, request)
        if not chosen:
            raise gr.Error("Choose at least one ONNX precision.")
        variants = [p for p in chosen if p in ONNX_VARIANTS or p == "auto"]
        job = export.submit_export(path, variants, adapter_file=ADAPTER_FILE in chosen)
        gr.Info(f"Export {job.name} queued.")
        text, _ = job_view(path)
        return text, gr.Timer(active=True)

    @engine_errors
    def request_stop(run_id, request: gr.Request):
        if not run_id:
            return
        jobs = export.export_jobs(need_run(run_id, request))
        if jobs:
            status = export.stop_export(jobs[-1])
            gr.Info(f"Stopping {jobs[-1].name} ({status.get('state')}): finished variants are kept.")

    def download(kind):
        @engine_errors
        def handler(run_id, request: gr.Request, progress=gr.Progress()):
            path = need_run(run_id, request)
            try:
                wanted = download_targets(path, kind)
            except FileNotFoundError as err:
                raise gr.Error(str(err)) from err
            progress(0.2, desc="Zipping")
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
        path = need_run(run_id, request)
        token = push_token(ctx, pasted, oauth_token)
        log: list[str] = [f"== Push {artifact} of {path.name} to {repo_id or '?'}"]
        progress(0.0, desc="Pushing to the Hub")
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
                    log.append(f"Done: {url}")
                    yield (
                        "\n".join(log[-PROGRESS_LINES:]),
                        f"Pushed **{escape_md(artifact)}** to [{escape_md(url)}]({url}) "
                        f"({'private' if private else 'public'}).",
                    )
        except hub.HubError as err:
            raise gr.Error(hub.scrub(str(err), token), title="Push failed", print_exception=False) from None

    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden", api_name="export_runs")

    def on_load(request: gr.Request):
        return refresh(None, request)

    gr.on(triggers=None, fn=on_load, inputs=None, outputs=run, show_progress="hidden")
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

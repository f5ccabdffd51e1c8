"""Export tab: merge a run's adapter into the base model, export to ONNX (int4, int8,
fp32) with live progress, show the parity report, and offer zip downloads of the adapter,
the merged model and the ONNX model.

Launch alone: ``python -m webui.export_tab``.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from webui.common import AppContext, engine_errors, escape_md, fmt_bytes, stream_progress
from webui.playground_tab import list_chat_runs

ONNX_PRECISIONS = ("int4", "int8", "fp32")
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
    for precision in ONNX_PRECISIONS:
        onnx_dir = run_dir / "export" / f"onnx-{precision}"
        if (onnx_dir / "genai_config.json").is_file():
            found[f"onnx-{precision}"] = onnx_dir
    return found


def artefact_markdown(run_dir: Path) -> str:
    found = artefacts(run_dir)
    if not found:
        return f"Run **{escape_md(run_dir.name)}** has nothing to export yet (no adapter or model)."
    rows = ["| artefact | folder | size |", "|---|---|---:|"]
    for name, path in found.items():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append(f"| {name} | `{escape_md(path.relative_to(run_dir))}` | {fmt_bytes(size)} |")
    return "\n".join(rows)


def parity_text(run_dir: Path) -> str:
    """The parity report the engine wrote (export/parity.md), or what to do to get one."""
    path = run_dir / "export" / "parity.md"
    if not path.is_file():
        return "No parity report yet: export to ONNX to compare its outputs with the PyTorch model."
    text = path.read_text(encoding="utf-8")
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
        what = {"adapter": "an adapter or model (is it trained?)", "merged": "a merged model (press Merge)",
                "onnx": "an ONNX export (press Export to ONNX)"}[kind]
        raise FileNotFoundError(f"Run {run_dir.name} has no {what} yet.")
    return wanted


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine import export

    stop_state = gr.State(None)  # threading.Event of this user's export in flight
    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="export-run")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=90)
    contents = gr.Markdown("", elem_id="export-contents")
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Merge\nFold the adapter into the base weights: one standalone transformers model.")
            merge_btn = gr.Button("Merge adapter", elem_id="export-merge")
        with gr.Column():
            gr.Markdown("#### ONNX\nFor ONNX Runtime GenAI: int4 is the smallest and fastest on a CPU.")
            precisions = gr.CheckboxGroup(list(ONNX_PRECISIONS), value=["int4"], label="Precisions",
                                          elem_id="export-precisions")
            with gr.Row():
                onnx_btn = gr.Button("Export to ONNX", variant="primary", elem_id="export-onnx")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="export-stop", scale=0, min_width=80)
    status = gr.Textbox("", label="Progress", lines=4, max_lines=PROGRESS_LINES, interactive=False,
                        elem_id="export-status", autoscroll=True)
    gr.Markdown("#### Parity report")
    parity = gr.Markdown("", elem_id="export-parity")
    gr.Markdown("#### Downloads (zip)")
    with gr.Row():
        dl_adapter = gr.Button("Adapter", elem_id="export-dl-adapter")
        dl_merged = gr.Button("Merged model", elem_id="export-dl-merged")
        dl_onnx = gr.Button("ONNX model", elem_id="export-dl-onnx")
    files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")

    def refresh(current, request: gr.Request = None):
        choices = list_chat_runs(ctx.runs_for(request))
        values = [v for _, v in choices]
        return gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None))

    def show(run_dir):
        if not run_dir:
            return "Pick a run.", ""
        path = Path(run_dir)
        return artefact_markdown(path), parity_text(path)

    def need_run(run_dir) -> Path:
        if not run_dir:
            raise gr.Error("Pick a run first.")
        return Path(run_dir)

    def follow(jobs, run_dir, progress):
        """Run (label, fn, kwargs) jobs one after another, streaming their progress lines."""
        log: list[str] = []
        for i, (label, fn, kwargs) in enumerate(jobs):
            log.append(f"== {label}")
            progress(i / len(jobs), desc=label)
            for kind, item in stream_progress(fn, **kwargs):
                if kind == "line":
                    log.append(item)
                    progress(i / len(jobs), desc=f"{label}: {item[:80]}")
                    yield "\n".join(log[-PROGRESS_LINES:]), gr.skip(), gr.skip()
        progress(1.0, desc="Done")
        log.append("Done.")
        yield ("\n".join(log[-PROGRESS_LINES:]), *show(run_dir))

    @engine_errors
    def merge(run_dir, progress=gr.Progress()):
        path = need_run(run_dir)
        jobs = [("Merging the adapter into the base model", export.merge, {"run_dir": path})]
        yield from follow(jobs, run_dir, progress)

    @engine_errors
    def onnx(run_dir, chosen, progress=gr.Progress()):
        path = need_run(run_dir)
        if not chosen:
            raise gr.Error("Choose at least one ONNX precision.")
        stop = threading.Event()
        yield gr.skip(), gr.skip(), gr.skip(), stop
        jobs = [(f"ONNX {p}", export.export_onnx, {"run_dir": path, "precision": p, "stop": stop})
                for p in chosen]
        jobs.append(("Parity report (PyTorch vs ONNX)", export.write_parity_report, {"run_dir": path}))
        for out in follow(jobs, run_dir, progress):
            yield (*out, stop)

    def request_stop(stop):
        if stop is not None:
            stop.set()
            gr.Info("Stopping the export...")

    def download(kind):
        @engine_errors
        def handler(run_dir, progress=gr.Progress()):
            path = need_run(run_dir)
            try:
                wanted = download_targets(path, kind)
            except FileNotFoundError as err:
                raise gr.Error(str(err)) from err
            progress(0.2, desc="Zipping")
            return [str(zip_dir(w, path / "export" / "downloads", path.name)) for w in wanted]

        return handler

    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden")
    def on_load(request: gr.Request):
        return refresh(None, request)

    gr.on(triggers=None, fn=on_load, inputs=None, outputs=run, show_progress="hidden")
    run.change(show, inputs=run, outputs=[contents, parity], show_progress="hidden")
    merge_btn.click(merge, inputs=run, outputs=[status, contents, parity], concurrency_limit=1,
                    concurrency_id="export")
    onnx_btn.click(onnx, inputs=[run, precisions], outputs=[status, contents, parity, stop_state],
                   concurrency_limit=1, concurrency_id="export")
    stop_btn.click(request_stop, inputs=stop_state, outputs=None, concurrency_limit=None)
    dl_adapter.click(download("adapter"), inputs=run, outputs=files)
    dl_merged.click(download("merged"), inputs=run, outputs=files)
    dl_onnx.click(download("onnx"), inputs=run, outputs=files)
    return SimpleNamespace(run=run, refresh=refresh)


def create(ctx: AppContext | None = None):
    from webui.links import Links

    ctx = ctx or AppContext()
    with gr.Blocks(title="tunelab - export") as demo:
        build(ctx, Links.create())
    return demo


if __name__ == "__main__":
    from webui.app import launch_kwargs

    _ctx = AppContext()
    create(_ctx).launch(**launch_kwargs(_ctx))

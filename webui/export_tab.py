"""Export tab: merge a run's adapter into the base model, export to ONNX (int4, int8,
fp32) with progress, show the parity report, and offer zip downloads of the adapter, the
merged model and the ONNX model.

Launch alone: ``python -m webui.export_tab``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from webui.common import AppContext, engine_errors, escape_md, fmt_bytes, fmt_number
from webui.playground_tab import list_chat_runs

ONNX_PRECISIONS = ("int4", "int8", "fp32")


def zip_dir(directory: Path, dest_dir: Path, prefix: str) -> Path:
    """``directory`` as ``dest_dir/<prefix>-<name>.zip`` (rebuilt only when the folder is newer)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist yet")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{prefix}-{directory.name}.zip"
    newest = max((p.stat().st_mtime for p in directory.rglob("*") if p.is_file()), default=0)
    if target.exists() and target.stat().st_mtime >= newest:
        return target
    tmp = target.with_suffix(".tmp")
    archive = shutil.make_archive(str(tmp), "zip", root_dir=directory.parent, base_dir=directory.name)
    Path(archive).replace(target)
    return target


def artefacts(run_dir: Path) -> dict[str, Path]:
    """What the run has that can be downloaded: adapter, full model, merged model, ONNX exports."""
    found = {}
    for name, rel in (("adapter", "adapter"), ("model", "model"), ("merged", "export/merged")):
        if (run_dir / rel).is_dir():
            found[name] = run_dir / rel
    export = run_dir / "export"
    if export.is_dir():
        for sub in sorted(export.iterdir()):
            if sub.is_dir() and sub.name.startswith("onnx-"):
                found[sub.name] = sub
    return found


def parity_reports(run_dir: Path) -> list[dict]:
    """Every parity report JSON under the run's export/ folder."""
    export = run_dir / "export"
    reports = []
    if not export.is_dir():
        return reports
    for path in sorted(export.rglob("*parity*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            data = {"error": f"cannot read {path.name}: {err}"}
        data.setdefault("_file", str(path.relative_to(run_dir)))
        reports.append(data)
    return reports


def parity_markdown(reports: list[dict]) -> str:
    if not reports:
        return "No parity report yet: export to ONNX (or merge) to compare outputs with the PyTorch model."
    out = []
    for rep in reports:
        title = rep.get("target") or rep.get("precision") or rep.get("_file")
        passed = rep.get("passed", rep.get("ok"))
        verdict = "" if passed is None else (" - **passed**" if passed else " - **FAILED**")
        out.append(f"#### {escape_md(title)}{verdict}")
        rows = ["| check | value |", "|---|---|"]
        for key, value in rep.items():
            if key.startswith("_") or key in ("target", "passed", "ok") or isinstance(value, (list, dict)):
                continue
            shown = fmt_number(value) if isinstance(value, float) else str(value)
            rows.append(f"| {escape_md(key.replace('_', ' '))} | {escape_md(shown)} |")
        out.append("\n".join(rows))
        for key, value in rep.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                cols = list(value[0].keys())
                out.append(f"**{escape_md(key)}**")
                out.append("| " + " | ".join(escape_md(c) for c in cols) + " |\n|" + "---|" * len(cols))
                for item in value[:10]:
                    out.append("| " + " | ".join(escape_md(str(item.get(c, ""))[:200]) for c in cols) + " |")
    return "\n\n".join(out)


def artefact_markdown(run_dir: Path) -> str:
    found = artefacts(run_dir)
    if not found:
        return f"Run **{escape_md(run_dir.name)}** has nothing to export yet (no adapter or model)."
    rows = ["| artefact | folder | size |", "|---|---|---:|"]
    for name, path in found.items():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append(f"| {name} | `{escape_md(path.relative_to(run_dir))}` | {fmt_bytes(size)} |")
    return "\n".join(rows)


def build(ctx: AppContext, links) -> SimpleNamespace:
    import gradio as gr

    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="export-run")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=90)
    contents = gr.Markdown("", elem_id="export-contents")
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Merge\nFold the adapter into the base weights: one standalone transformers model.")
            merge_btn = gr.Button("Merge adapter", elem_id="export-merge")
        with gr.Column():
            gr.Markdown("#### ONNX\nFor ONNX Runtime (GenAI): int4 is smallest and fastest on a CPU.")
            precisions = gr.CheckboxGroup(list(ONNX_PRECISIONS), value=["int4"], label="Precisions",
                                          elem_id="export-precisions")
            onnx_btn = gr.Button("Export to ONNX", variant="primary", elem_id="export-onnx")
    status = gr.Markdown("", elem_id="export-status")
    gr.Markdown("#### Parity report")
    parity = gr.Markdown("", elem_id="export-parity")
    gr.Markdown("#### Downloads")
    with gr.Row():
        dl_adapter = gr.Button("Adapter (.zip)", elem_id="export-dl-adapter")
        dl_merged = gr.Button("Merged model (.zip)", elem_id="export-dl-merged")
        dl_onnx = gr.Button("ONNX model (.zip)", elem_id="export-dl-onnx")
    files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="export-files")

    def refresh(current):
        choices = list_chat_runs(ctx.runs_dir)
        values = [v for _, v in choices]
        return gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None))

    def show(run_dir):
        if not run_dir:
            return "Pick a run.", ""
        path = Path(run_dir)
        return artefact_markdown(path), parity_markdown(parity_reports(path))

    def need_run(run_dir) -> Path:
        if not run_dir:
            raise gr.Error("Pick a run first.")
        return Path(run_dir)

    @engine_errors
    def merge(run_dir, progress=gr.Progress()):
        from engine import export

        path = need_run(run_dir)
        progress(0.1, desc="Merging the adapter into the base model")
        out = export.merge(path)
        return f"Merged model written to `{escape_md(Path(out).relative_to(path))}`.", *show(run_dir)

    @engine_errors
    def onnx(run_dir, chosen, progress=gr.Progress()):
        from engine import export

        path = need_run(run_dir)
        if not chosen:
            raise gr.Error("Choose at least one ONNX precision.")
        done = []
        for i, prec in enumerate(chosen):
            progress(i / len(chosen), desc=f"Exporting ONNX {prec} ({i + 1} of {len(chosen)})")
            out = export.export_onnx(path, prec)
            done.append(f"`{escape_md(Path(out).relative_to(path))}`")
        progress(1.0, desc="Done")
        return f"ONNX written to {', '.join(done)}.", *show(run_dir)

    def download(kind):
        @engine_errors
        def handler(run_dir, progress=gr.Progress()):
            path = need_run(run_dir)
            found = artefacts(path)
            if kind == "adapter":
                wanted = [found.get("adapter") or found.get("model")]
            elif kind == "merged":
                wanted = [found.get("merged") or found.get("model")]
            else:
                wanted = [p for name, p in found.items() if name.startswith("onnx-")]
            wanted = [w for w in wanted if w]
            if not wanted:
                what = {"adapter": "an adapter", "merged": "a merged model (press Merge)",
                        "onnx": "an ONNX export (press Export to ONNX)"}[kind]
                raise gr.Error(f"Run {path.name} has no {what} yet.")
            progress(0.2, desc="Zipping")
            return [str(zip_dir(w, path / "export" / "downloads", path.name)) for w in wanted]

        return handler

    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden")
    gr.on(triggers=None, fn=lambda: refresh(None), inputs=None, outputs=run, show_progress="hidden")
    run.change(show, inputs=run, outputs=[contents, parity], show_progress="hidden")
    merge_btn.click(merge, inputs=run, outputs=[status, contents, parity], concurrency_limit=1,
                    concurrency_id="export")
    onnx_btn.click(onnx, inputs=[run, precisions], outputs=[status, contents, parity], concurrency_limit=1,
                   concurrency_id="export")
    dl_adapter.click(download("adapter"), inputs=run, outputs=files)
    dl_merged.click(download("merged"), inputs=run, outputs=files)
    dl_onnx.click(download("onnx"), inputs=run, outputs=files)
    return SimpleNamespace(run=run, refresh=refresh)


def create(ctx: AppContext | None = None):
    import gradio as gr

    from webui.links import Links

    ctx = ctx or AppContext()
    with gr.Blocks(title="tunelab - export") as demo:
        build(ctx, Links.create())
    return demo


if __name__ == "__main__":
    from webui.app import launch_kwargs

    _ctx = AppContext()
    create(_ctx).launch(**launch_kwargs(_ctx))

"""The tunelab web app: `tunelab ui`.

Each tab lives in its own module with a ``build(ctx, links)`` that lays out its widgets in
the current Blocks and a ``create(ctx)`` that wraps it in a ``gr.Blocks`` of its own, so a
tab can be launched alone (``python -m webui.data_tab``). This module renders the six tabs
in one page and connects the few things that cross tabs (the dataset chosen on the Data tab
feeds the Train tab; "open in playground" switches tabs).

Options come from the command line, or the environment when not given:
TUNELAB_HOST, TUNELAB_PORT, TUNELAB_AUTH (user:pass[,user2:pass2]), TUNELAB_RUNS_DIR,
TUNELAB_EXTRA_MODELS (local model directories added to the model list, separated by ':').

A shared app: with a login (--auth, or "Sign in with Hugging Face" in a Space whose README
has ``hf_oauth: true``) or TUNELAB_MULTI_USER=1, each person has their own runs directory
and nobody reaches another's runs, uploads or downloads through the page or Gradio's file
route (see webui.common.AppContext). TUNELAB_DEMO=1 adds the public demo's limits.
"""

from __future__ import annotations

import os
import sys

from webui.common import AppContext, launch_and_serve, launch_kwargs

TAB_IDS = ("data", "train", "playground", "export", "runs", "evaluate")


def add_cli_arguments(parser) -> None:
    parser.add_argument(
        "--host",
        default=None,
        help="Address to bind (default 127.0.0.1, or $TUNELAB_HOST). Use 0.0.0.0 to serve other machines.",
    )
    parser.add_argument("--port", type=int, default=None, help="Port (default 7860, or $TUNELAB_PORT).")
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link.")
    parser.add_argument(
        "--auth", default=None, metavar="USER:PASS", help="Require a login; several as 'a:1,b:2' (or $TUNELAB_AUTH)."
    )
    parser.add_argument(
        "--runs-dir", default=None, help="Directory of the runs (default ./runs, or $TUNELAB_RUNS_DIR)."
    )
    parser.add_argument(
        "--extra-model",
        action="append",
        default=[],
        metavar="DIR",
        help="Add a local model directory to the model list (repeatable; $TUNELAB_EXTRA_MODELS).",
    )
    parser.add_argument(
        "--chat-concurrency",
        type=int,
        default=4,
        help="Chat requests served at the same time, all users together (default 4).",
    )


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """'user:pass[,user2:pass2]' -> [(user, pass), ...]; None or '' -> no login."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        item = item.strip()
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth expects user:password (several separated by commas), got {item!r}")
        pairs.append((user, password))
    return pairs


def build_app(ctx: AppContext):
    """The whole app as one gr.Blocks (not launched)."""
    import gradio as gr

    from webui import data_tab, evaluate_tab, export_tab, playground_tab, runs_tab, train_tab
    from webui.links import Links, connect_tabs, user_banner

    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="tunelab", fill_width=False) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(
                "## tunelab\nFine-tune a chat model on your data, then compare base, tuned and ONNX side by side.",
                elem_id="tl-header",
            )
            if ctx.oauth:  # a Space with hf_oauth: true
                gr.LoginButton(scale=0, min_width=240, elem_id="tl-login")
        whoami = gr.Markdown("", elem_id="tl-user", visible=ctx.multi_user)
        if ctx.multi_user:
            gr.on(
                triggers=None,
                fn=user_banner(ctx),
                inputs=None,
                outputs=whoami,
                show_progress="hidden",
                api_name="whoami",
            )
        links = Links.create()
        with gr.Tabs(selected="data") as tabs:
            links.tabs = tabs
            with gr.Tab("1. Data", id="data"):
                data_tab.build(ctx, links)
            with gr.Tab("2. Train", id="train"):
                train = train_tab.build(ctx, links)
            with gr.Tab("3. Playground", id="playground") as t_play:
                play = playground_tab.build(ctx, links)
            with gr.Tab("4. Export", id="export") as t_export:
                export = export_tab.build(ctx, links)
            with gr.Tab("5. Runs", id="runs") as t_runs:
                runs = runs_tab.build(ctx, links)
            with gr.Tab("6. Evaluate", id="evaluate") as t_eval:
                evaluation = evaluate_tab.build(ctx, links)
        connect_tabs(
            ctx,
            tabs,
            tab_of={"playground": t_play, "export": t_export, "runs": t_runs, "evaluate": t_eval},
            train=train,
            play=play,
            export=export,
            runs=runs,
            evaluation=evaluation,
        )
    return demo


def run_cli(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    host = args.host or os.environ.get("TUNELAB_HOST") or "127.0.0.1"
    port_text = args.port if args.port is not None else os.environ.get("TUNELAB_PORT", "7860")
    try:
        port = int(port_text)
    except ValueError:
        print(f"error: TUNELAB_PORT must be a number, got {port_text!r}", file=sys.stderr)
        return 2
    try:
        auth = parse_auth(args.auth if args.auth is not None else os.environ.get("TUNELAB_AUTH"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs_dir = args.runs_dir or os.environ.get("TUNELAB_RUNS_DIR") or "runs"
    ctx = AppContext(
        runs_dir=runs_dir,
        extra_models=list(args.extra_model),
        chat_concurrency=max(1, args.chat_concurrency),
        auth=bool(auth),
    )
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=8)
    how = []
    if ctx.multi_user:
        how.append("one runs directory per user")
    if ctx.oauth:
        how.append("Sign in with Hugging Face")
    print(
        f"tunelab: runs in {ctx.runs_dir}{' (' + ', '.join(how) + ')' if how else ''}; open http://{host}:{port}",
        flush=True,
    )
    launch_and_serve(
        demo,
        server_name=host,
        server_port=port,
        share=args.share,
        auth=auth,
        auth_message="tunelab: log in" if auth else None,
        **launch_kwargs(ctx),
    )
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m webui.app")
    add_cli_arguments(p)
    sys.exit(run_cli(p.parse_args()))

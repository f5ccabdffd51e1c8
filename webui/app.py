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

``--api`` also serves the runs' models over the OpenAI-compatible API of engine.serve at /v1
(added to Gradio's own server as a route; see :func:`build_api`).
"""

from __future__ import annotations

import os
import sys

from engine.config import CHAT_CONCURRENCY, SERVE_API_KEY_ENV
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
        default=CHAT_CONCURRENCY,
        help=f"Chat requests served at the same time, all users together (default {CHAT_CONCURRENCY}); "
        "with --api, the API has as many slots of its own.",
    )
    parser.add_argument(
        "--api",
        action="store_true",
        help="Also serve the runs' models over an OpenAI-compatible API at /v1 (see `tunelab serve`). "
        f"Key: ${SERVE_API_KEY_ENV}; with a login or on a Space, each person creates their own on the Playground.",
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


def build_api(ctx: AppContext):
    """The API of ``tunelab ui --api`` (engine.serve.Api): the runs of the caller's runs
    directory. With a login or a Space, keys are per person (created on the Playground) and
    always required; otherwise the one key in $TUNELAB_API_KEY, if set."""
    from engine import serve
    from engine.security import user_dir

    if ctx.multi_user or ctx.auth or ctx.oauth:
        keys = serve.UserKeys(ctx.runs_dir / ".api-keys.json")
    else:
        keys = serve.StaticKey(os.environ.get(SERVE_API_KEY_ENV, "").strip() or None)

    def runs_dir_of(user):
        if not ctx.multi_user:
            return ctx.runs_dir
        return user_dir(ctx.runs_dir, user, True) if user else None

    return serve.Api(serve.RunsCatalog(runs_dir_of), keys, concurrency=ctx.chat_concurrency)


def api_routes(ctx: AppContext) -> list:
    """The routes to add to the app's server: the API mounted at /v1 (none without --api)."""
    if ctx.api is None:
        return []
    from starlette.routing import Mount

    from engine import serve

    return [Mount("/v1", app=serve.create_app(ctx.api))]


def build_app(ctx: AppContext):
    """The whole app as one gr.Blocks (not launched)."""
    import gradio as gr

    from webui import data_tab, evaluate_tab, export_tab, playground_tab, runs_tab, train_tab
    from webui.i18n import connect_picker, picker, t
    from webui.links import Links, connect_tabs, user_banner

    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="tunelab", fill_width=False) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(t("app.header"), elem_id="tl-header")
            lang_picker = picker()
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
            with gr.Tab(t("app.tab.data"), id="data") as t_data:
                data_tab.build(ctx, links)
            with gr.Tab(t("app.tab.train"), id="train") as t_train:
                train = train_tab.build(ctx, links)
            with gr.Tab(t("app.tab.playground"), id="playground") as t_play:
                play = playground_tab.build(ctx, links)
            with gr.Tab(t("app.tab.export"), id="export") as t_export:
                export = export_tab.build(ctx, links)
            with gr.Tab(t("app.tab.runs"), id="runs") as t_runs:
                runs = runs_tab.build(ctx, links)
            with gr.Tab(t("app.tab.evaluate"), id="evaluate") as t_eval:
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
        tab_items = {t_data: "data", t_train: "train", t_play: "playground", t_export: "export"}
        tab_items.update({t_runs: "runs", t_eval: "evaluate"})
        connect_picker(demo, lang_picker, {tab: f"app.tab.{k}" for tab, k in tab_items.items()})
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
    if args.api:
        ctx.api = build_api(ctx)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=8)
    how = []
    if ctx.multi_user:
        how.append("one runs directory per user")
    if ctx.oauth:
        how.append("Sign in with Hugging Face")
    if ctx.api is not None:
        how.append(f"OpenAI-compatible API at http://{host}:{port}/v1")
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
        app_kwargs={"routes": api_routes(ctx)},
        **launch_kwargs(ctx),
    )
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m webui.app")
    add_cli_arguments(p)
    sys.exit(run_cli(p.parse_args()))

"""The Playground's "Use via API" panel: a ready call (Python's openai client and curl) of
the selected run and backend through the OpenAI-compatible API (engine.serve), and in a
shared app a button that gives the signed-in person their own API key.

The API is served beside the page when the app runs with ``tunelab ui --api`` (at /v1);
otherwise the panel says how to start it, or to serve the run alone with ``tunelab serve``.
"""

from __future__ import annotations

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine import serve
from engine.config import SERVE_API_KEY_ENV, SERVE_PORT
from webui.common import AppContext
from webui.i18n import lang_of, t, tr

CHOICES = ("base", "tuned", "merged", "onnx")  # backend names, as the API's model ids spell them
DEFAULT_BACKEND = "tuned"


def base_url(request) -> str:
    """The /v1 address of the app the page came from (behind a proxy: its forwarded name)."""
    headers = getattr(request, "headers", None) or {}
    host = headers.get("x-forwarded-host") or headers.get("host")
    if not host:
        return "http://127.0.0.1:7860/v1"
    scheme = (headers.get("x-forwarded-proto") or "http").split(",")[0].strip()
    return f"{scheme}://{host}/v1"


def model_id(run_id: str, backend: str, onnx_precision: str) -> str:
    return f"{run_id}:{'onnx-' + onnx_precision if backend == 'onnx' else backend}"


def build(ctx: AppContext, run, onnx_precision) -> None:
    """The panel, under the Playground's run picker (``run``) and ONNX precision."""
    per_user = ctx.api is not None and isinstance(ctx.api.keys, serve.UserKeys)
    with gr.Accordion(t("api.title"), open=False, elem_id="play-api"):
        backend = gr.Radio(list(CHOICES), value=DEFAULT_BACKEND, label=t("api.backend"), elem_id="play-api-backend")
        snippet = gr.Markdown("", elem_id="play-api-snippet")
        key_btn = gr.Button(t("api.create_key"), visible=per_user, size="sm", elem_id="play-api-key-btn")
        key_box = gr.Textbox(
            label=t("api.key"),
            visible=False,
            interactive=False,
            elem_id="play-api-key",
        )

    def show(run_id, backend_v, precision, request: gr.Request = None) -> str:
        lang = lang_of(request)
        if not run_id:
            return tr(lang, "api.pick_run")
        mid = model_id(run_id, backend_v, precision)
        if ctx.api is None:
            url = f"http://127.0.0.1:{SERVE_PORT}/v1"
            command = f"{SERVE_API_KEY_ENV}=... tunelab serve runs/{run_id} --backend {mid.split(':', 1)[1]}"
            head = tr(lang, "api.no_api", command=command, url=url)
        else:
            url = base_url(request)
            how = tr(lang, "api.your_key") if per_user else tr(lang, "api.env_key", env=SERVE_API_KEY_ENV)
            head = tr(lang, "api.model_at", model=mid, url=url, how=how)
        return head + "\n\n" + serve.client_snippet(url, mid)

    def new_key(request: gr.Request):
        user = ctx.user_of(request)
        if user is None:
            lang = lang_of(request)
            raise gr.Error(tr(lang, "api.sign_in"), title=tr(lang, "api.not_signed_in"))
        return gr.Textbox(value=ctx.api.keys.issue(user), visible=True)

    inputs = [run, backend, onnx_precision]
    for trigger in (run.change, backend.change, onnx_precision.change):
        trigger(show, inputs=inputs, outputs=snippet, show_progress="hidden")
    key_btn.click(new_key, inputs=None, outputs=key_box, show_progress="hidden")

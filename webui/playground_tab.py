"""Playground tab: one prompt, three streaming answers side by side - the base model, the
tuned model (PyTorch, adapter applied) and the tuned model exported to ONNX - each with
its time to first token and tokens per second.

Each column's history and the stream of its reply in flight live in ``gr.State`` (dropped
after an idle hour). The models do not: every reply is a request to the engine's one
inference scheduler (engine.scheduler), shared by all users, which loads each model once
into the engine's cache and generates on its own threads - PyTorch work on one thread, ONNX
Runtime on another. The three columns are three events fired by the same click; with a GPU
they stream together, on a CPU-only machine the scheduler serves them one at a time in
order (a waiting column says so), so each column's tokens per second is its own and not a
share of the cores. Stop ends the replies after their current token (their statistics
still come); a closed page or Clear abandons them. ``concurrency_limit`` bounds how many
chats the page hands to the scheduler at once for all users together.

Launch alone: ``python -m webui.playground_tab``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr  # at module level: handlers' gr.Request annotations must resolve

from engine import security
from engine.config import DEFAULT_ONNX_PRECISION, DEFAULT_ONNX_VARIANT, ONNX_LORA_BASE, ONNX_VARIANTS
from webui import api_panel
from webui.common import (
    AppContext,
    engine_errors,
    escape_md,
    launch_standalone,
    state_name,
    stream_progress,
)
from webui.i18n import lang_of, t, tr
from webui.links import standalone_tab

BACKENDS = ("base", "tuned", "onnx")
TITLES = {"base": "play.title.base", "tuned": "play.title.tuned", "onnx": "play.title.onnx"}  # locale keys
STREAM_INTERVAL_S = 0.15  # the chat is redrawn at most this often while a reply streams


# --------------------------------------------------------------------------- engine adapters


def list_chat_runs(runs_dir: Path, lang: str | None = None) -> list[tuple[str, str]]:
    """(label, run id) of the runs in ``runs_dir``, newest first; the label says whether the
    run has trained weights yet (in ``lang``). The page holds run ids, never paths of this machine."""

    from engine import runs

    if not runs_dir.is_dir():
        return []
    choices = []
    for info in runs.list_runs(runs_dir):
        run_dir = Path(info["path"])
        state = info.get("state") or "?"
        has_weights = (run_dir / "adapter").is_dir() or (run_dir / "model").is_dir()
        key = "play.run_state" if has_weights else "play.no_weights"
        label = tr(lang, key, name=run_dir.name, state=state_name(state, lang))
        choices.append((label, run_dir.name))
    return choices


def backend_availability(
    run_dir: str | None, backend: str, onnx_precision: str = "int4", lang: str | None = None
) -> tuple[bool, str]:
    """Whether ``backend`` can answer for this run, and if not, what to do (a sentence in ``lang``)."""
    if backend == "base":
        return True, ""
    if not run_dir:
        return False, tr(lang, "play.pick_trained")
    run = Path(run_dir)
    if not ((run / "adapter").is_dir() or (run / "model").is_dir()):
        return False, tr(lang, "play.not_trained", name=escape_md(run.name))
    if onnx_precision == "auto":  # the export auto mode kept, else the first there is
        present = sorted((run / "export").glob("onnx-*")) if (run / "export").is_dir() else []
        if backend == "onnx" and not any(p.is_dir() for p in present):
            return False, tr(lang, "play.no_onnx", name=escape_md(run.name))
        return True, ""
    if backend == "onnx" and not (run / "export" / f"onnx-{onnx_precision}").is_dir():
        return False, tr(lang, "play.no_onnx_variant", precision=onnx_precision, name=escape_md(run.name))
    return True, ""


def onnx_header(run_dir: str | None, onnx_precision: str, lang: str | None = None) -> str:
    """The ONNX column's title: the export variant and its verdict from the parity report (in ``lang``)."""
    from engine.export import export_verdicts

    if onnx_precision == "auto" and run_dir:
        from engine.inference import InferenceError, find_onnx_export

        try:
            onnx_precision = find_onnx_export(Path(run_dir)).name.removeprefix("onnx-")
        except InferenceError:
            return tr(lang, TITLES["onnx"])
    title = tr(lang, "play.onnx_title", precision=onnx_precision)
    if not run_dir:
        return title
    judged = export_verdicts(Path(run_dir)).get(f"onnx-{onnx_precision}")
    if judged:
        return f"{title}, {judged}"
    if (Path(run_dir) / "export" / f"onnx-{onnx_precision}").is_dir():
        return f"{title}, {tr(lang, 'play.verdict_unmeasured')}"
    return title


@dataclass
class Column:
    """One column's per-user state: its history and the reply in flight.

    The loaded models themselves are shared by every user through the engine's scheduler
    and cache (engine.scheduler, engine.inference.load_chat_model, a small LRU), so three
    users chatting with the same run do not load it three times.
    """

    backend: str
    history: list = field(default_factory=list)
    stream: Any = None  # engine.scheduler.Stream of the reply in flight

    def request_stop(self):
        if self.stream is not None:
            self.stream.stop()


def stats_line(stats, backend: str, lang: str | None = None) -> str:
    """Time to first token and tokens per second of one reply (engine GenerationStats), in ``lang``."""
    if stats is None:
        return ""
    parts = [
        tr(lang, "play.first_token", s=f"{stats.ttft_s:.2f}"),
        tr(lang, "play.tokens_per_s", value=f"{stats.decode_tokens_per_s:.1f}"),
        tr(lang, "play.tokens", n=stats.new_tokens),
    ]
    if stats.decoder.startswith("speculative"):
        parts.append(tr(lang, "play.speculative"))
    if stats.finish_reason == "length":
        parts.append(tr(lang, "play.hit_max"))
    elif stats.finish_reason == "stopped":
        parts.append(tr(lang, "play.stopped"))
    elif stats.finish_reason != "eos":
        parts.append(stats.finish_reason)
    return f'<span class="tl-stats" data-backend="{backend}">' + " &middot; ".join(parts) + "</span>"


def validation_example(run_dir: str, rng: random.Random, lang: str | None = None) -> tuple[str, str, str]:
    """(system prompt, prompt, reference answer) from the run's held-out split."""
    from engine import data
    from engine.config import RunConfig

    cfg = RunConfig.load(Path(run_dir) / "config.yaml")
    _, _, val = data.load_for_training(cfg.data)
    if not val:
        raise ValueError(tr(lang, "play.no_validation", name=Path(run_dir).name))
    conv = rng.choice(val)
    last_assistant = (
        max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        if any(m["role"] == "assistant" for m in conv)
        else len(conv)
    )
    user_turns = [m for m in conv[:last_assistant] if m["role"] == "user"]
    system = next((m["content"] for m in conv if m["role"] == "system"), "")
    prompt = user_turns[-1]["content"] if user_turns else ""
    reference = conv[last_assistant]["content"] if last_assistant < len(conv) else ""
    return system, prompt, reference


# --------------------------------------------------------------------------- layout


def build(ctx: AppContext, links) -> SimpleNamespace:
    from engine import inference, scheduler

    with gr.Row():
        run = gr.Dropdown(
            [],
            value=None,
            label=t("play.run"),
            scale=3,
            elem_id="play-run",
            info=t("play.run_info"),
        )
        onnx_precision = gr.Dropdown(
            ["auto", *ONNX_VARIANTS, ONNX_LORA_BASE],
            value=DEFAULT_ONNX_PRECISION,  # auto: the variant the export's auto mode kept
            label=t("play.onnx_export"),
            scale=1,
            min_width=110,
            elem_id="play-onnx-precision",
        )
        refresh_btn = gr.Button(t("play.refresh"), size="sm", scale=0, min_width=90)
    system = gr.Textbox(
        "", label=t("play.system"), placeholder=t("play.system_placeholder"), lines=1, elem_id="play-system"
    )
    with gr.Accordion(t("play.settings"), open=False, elem_id="play-settings"):
        with gr.Row():
            max_new_tokens = gr.Number(
                128, label=t("play.max_new_tokens"), precision=0, minimum=1, maximum=4096, elem_id="play-max-new"
            )
            temperature = gr.Slider(
                0.0, 2.0, value=0.0, step=0.05, label=t("play.temperature"), info=t("play.temperature_info")
            )
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label=t("play.top_p"))
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label=t("play.repetition_penalty"))

    chatbots, stats_boxes, notices, fix_buttons, col_states = {}, {}, {}, {}, {}
    with gr.Row(equal_height=True):
        for backend in BACKENDS:
            with gr.Column(min_width=260):
                chatbots[backend] = gr.Chatbot(
                    label=t(TITLES[backend]),
                    height=380,
                    elem_id=f"play-chat-{backend}",
                    buttons=["copy"],
                    feedback_options=None,
                )
                stats_boxes[backend] = gr.HTML("", elem_id=f"play-stats-{backend}")
                notices[backend] = gr.Markdown(
                    "", visible=False, elem_id=f"play-notice-{backend}", elem_classes=["tl-note"]
                )
                if backend == "onnx":
                    fix_buttons[backend] = gr.Button(t("play.export_now"), visible=False, elem_id="play-export-onnx")
                elif backend == "tuned":
                    fix_buttons[backend] = gr.Button(t("play.go_train"), visible=False, elem_id="play-go-train")
                col_states[backend] = gr.State(Column(backend), time_to_live=security.SESSION_TTL_S)
    prompt = gr.Textbox(
        label=t("play.prompt"), placeholder=t("play.prompt_placeholder"), lines=2, elem_id="play-prompt"
    )
    with gr.Row():
        send_btn = gr.Button(t("play.send"), variant="primary", elem_id="play-send")
        stop_btn = gr.Button(t("play.stop"), variant="stop", elem_id="play-stop")
        clear_btn = gr.Button(t("play.clear"), elem_id="play-clear")
        example_btn = gr.Button(t("play.example"), elem_id="play-example")
    reference = gr.Markdown("", elem_id="play-reference")
    api_panel.build(ctx, run, onnx_precision)
    pending = gr.State("")  # the prompt being answered (so the textbox can be cleared at once)
    rng_state = gr.State(None)

    # ---- handlers

    def refresh(current, request: gr.Request = None):
        return run_picker(ctx, current, request)

    def run_path(run_id, request) -> str | None:
        """The checked directory of this user's run ``run_id`` (None when none is picked)."""
        return str(ctx.run_dir(request, run_id)) if run_id else None

    @engine_errors
    def show_availability(run_id, onnx_prec="int4", request: gr.Request = None):
        lang = lang_of(request)
        run_dir = run_path(run_id, request)
        out = []
        for backend in BACKENDS:
            ok, why = backend_availability(run_dir, backend, onnx_prec, lang)
            out.append(gr.Markdown(why, visible=not ok))
            if backend in fix_buttons:
                out.append(gr.Button(visible=not ok and (backend != "tuned" or links.tabs is not None)))
        out.append(gr.Chatbot(label=onnx_header(run_dir, onnx_prec, lang)))
        return out

    availability_outputs = []
    for backend in BACKENDS:
        availability_outputs.append(notices[backend])
        if backend in fix_buttons:
            availability_outputs.append(fix_buttons[backend])
    availability_outputs.append(chatbots["onnx"])  # its header names the export and its verdict

    def take_prompt(text, request: gr.Request = None):
        text = (text or "").strip()
        if not text:
            raise gr.Error(tr(lang_of(request), "play.type_prompt"))
        return "", text

    def chat_request(backend, history, run_dir, system_v, max_new, temp, top_p_v, rep, onnx_prec):
        """The engine request for one column's reply (the base column uses the run's base model)."""
        settings = inference.GenerationSettings(
            max_new_tokens=int(max_new or 128),
            temperature=float(temp or 0.0),
            top_p=float(top_p_v or 1.0),
            repetition_penalty=float(rep or 1.0),
        )
        return scheduler.ChatRequest(
            run=run_dir or ctx.model_choices()[0],
            backend=backend,
            messages=history,
            settings=settings,
            system=system_v or None,
            precision=onnx_prec if backend == "onnx" and onnx_prec != "auto" else None,
        )

    def make_answer(backend: str):
        @engine_errors
        def answer(text, column: Column, run_id, system_v, max_new, temp, top_p_v, rep, onnx_prec, request: gr.Request):
            if not text:
                return
            lang = lang_of(request)
            run_dir = run_path(run_id, request)
            if not backend_availability(run_dir, backend, onnx_prec)[0]:  # the column's notice says what to do
                yield column.history, "", column
                return
            history = column.history + [{"role": "user", "content": text}]
            chat = chat_request(backend, history, run_dir, system_v, max_new, temp, top_p_v, rep, onnx_prec)
            reply, stats, shown_at = "", None, 0.0
            with scheduler.default().submit(chat) as column.stream:
                for event in column.stream:
                    if event.kind == "text":
                        reply += event.text
                        # at most STREAM_INTERVAL_S between page updates: redrawing the chat per
                        # token (200 a second from ONNX) costs the server and the browser more
                        # CPU than the model itself on a small machine
                        if time.perf_counter() - shown_at < STREAM_INTERVAL_S:
                            continue
                        shown_at = time.perf_counter()
                    elif event.kind == "done":
                        stats = event.stats
                        continue
                    yield history + [{"role": "assistant", "content": reply or notice(event, lang)}], "", column
            stopped = "" if stats else tr(lang, "play.stopped_reply")
            column.history = history + [{"role": "assistant", "content": reply or stopped}]
            yield column.history, stats_line(stats, backend, lang), column

        def notice(event, lang: str | None) -> str:
            """What a column shows before its reply: why it waits, or that its model loads (in ``lang``)."""
            if event.kind == "loading":
                return tr(lang, "play.loading", title=tr(lang, TITLES[backend]))
            if event.kind == "queued":
                if event.text == scheduler.WAITING_FOR_CPU:
                    return tr(lang, "play.waiting_cpu")
                return tr(lang, "play.waiting_for", n=event.ahead)
            return f"({event.text})"

        return answer

    def stop_all(*columns):
        for column in columns:
            column.request_stop()

    def clear(*columns):
        for column in columns:
            column.request_stop()
            column.history = []
        return [[] for _ in columns] + ["" for _ in columns] + [*columns, ""]

    @engine_errors
    def try_example(run_id, rng, request: gr.Request):
        lang = lang_of(request)
        if not run_id:
            raise gr.Error(tr(lang, "play.pick_run_example"))
        run_dir = run_path(run_id, request)
        rng = rng or random.Random()
        system_v, prompt_v, ref = validation_example(run_dir, rng, lang)
        return system_v, prompt_v, tr(lang, "play.reference") + f"\n\n> {escape_md(ref)}", rng

    @engine_errors
    def export_onnx(run_id, precision, request: gr.Request, progress=gr.Progress()):
        from engine import export

        lang = lang_of(request)
        if not run_id:
            raise gr.Error(tr(lang, "play.pick_trained_first"))
        run_dir = run_path(run_id, request)
        precision = DEFAULT_ONNX_VARIANT if precision == "auto" else precision
        progress(None, desc=tr(lang, "play.exporting", name=Path(run_dir).name, precision=precision))
        for kind, item in stream_progress(export.export_onnx, run_dir=Path(run_dir), precision=precision):
            if kind == "line":
                progress(None, desc=str(item)[:120])
        gr.Info(tr(lang, "play.export_ready", precision=precision))
        return show_availability(run_id, precision, request)

    # ---- events
    refresh_btn.click(refresh, inputs=run, outputs=run, show_progress="hidden", api_name="playground_runs")
    run.change(show_availability, inputs=[run, onnx_precision], outputs=availability_outputs, show_progress="hidden")
    gr.on(
        triggers=None,
        fn=lambda: show_availability(None),
        inputs=None,
        outputs=availability_outputs,
        show_progress="hidden",
    )

    def on_load(request: gr.Request):
        return refresh(None, request)

    gr.on(triggers=None, fn=on_load, inputs=None, outputs=run, show_progress="hidden")
    started = gr.on(
        [send_btn.click, prompt.submit], take_prompt, inputs=prompt, outputs=[prompt, pending], show_progress="hidden"
    )
    answer_events = []
    for backend in BACKENDS:
        answer_events.append(
            started.success(
                make_answer(backend),
                inputs=[
                    pending,
                    col_states[backend],
                    run,
                    system,
                    max_new_tokens,
                    temperature,
                    top_p,
                    repetition_penalty,
                    onnx_precision,
                ],
                outputs=[chatbots[backend], stats_boxes[backend], col_states[backend]],
                concurrency_limit=ctx.chat_concurrency,
                concurrency_id=f"chat-{backend}",
                show_progress="minimal",
            )
        )
    columns = [col_states[b] for b in BACKENDS]
    # Stop sets each column's stop flag: the generators end after the current token and
    # still report their statistics (cancelling the events would lose them).
    stop_btn.click(stop_all, inputs=columns, outputs=None, concurrency_limit=None, show_progress="hidden")
    clear_btn.click(
        clear,
        inputs=columns,
        outputs=[*(chatbots[b] for b in BACKENDS), *(stats_boxes[b] for b in BACKENDS), *columns, reference],
        cancels=answer_events,
        show_progress="hidden",
    )
    example_btn.click(try_example, inputs=[run, rng_state], outputs=[system, prompt, reference, rng_state])
    fix_buttons["onnx"].click(
        export_onnx,
        inputs=[run, onnx_precision],
        outputs=availability_outputs,
        concurrency_limit=1,
        concurrency_id="export",
    )
    onnx_precision.change(
        show_availability, inputs=[run, onnx_precision], outputs=availability_outputs, show_progress="hidden"
    )
    if links.tabs is not None:
        fix_buttons["tuned"].click(lambda: gr.Tabs(selected="train"), outputs=links.tabs)

    def load_conversation(messages: list[dict], reference_text: str) -> list:
        """Values for ``load_outputs`` that put a conversation in the tab: its system prompt,
        its earlier turns in every column's history, its last user turn in the prompt box."""
        system_v = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        earlier = [m for m in messages[:-1] if m["role"] != "system"]
        return [
            system_v,
            messages[-1]["content"],
            reference_text,
            *[list(earlier) for _ in BACKENDS],
            *[Column(b, history=list(earlier)) for b in BACKENDS],
        ]

    return SimpleNamespace(
        run=run,
        refresh=refresh,
        load_conversation=load_conversation,
        load_outputs=[system, prompt, reference, *(chatbots[b] for b in BACKENDS), *columns],
        prompt=prompt,
        send=send_btn,
        chatbots=chatbots,
        # what the columns can do, derived from the run directory again whenever the tab is shown
        show=show_availability,
        show_inputs=[run, onnx_precision],
        show_outputs=availability_outputs,
    )


def run_picker(ctx: AppContext, current, request=None):
    """The run dropdown, refreshed from this user's runs, keeping ``current`` when it is still there."""
    root = ctx.listing_dir(request)
    choices = list_chat_runs(root, lang_of(request)) if root is not None else []
    values = [v for _, v in choices]
    current = Path(str(current)).name if current else None
    return gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None))


def create(ctx: AppContext | None = None):
    """This tab alone in its own gr.Blocks."""
    return standalone_tab(build, "playground", ctx)


if __name__ == "__main__":
    launch_standalone(create)

"""One scheduler for the process's inference work: the playground's replies now, an
evaluation job and an OpenAI-compatible API next, and the long engine calls of the web app
(export, merge) through :meth:`Scheduler.progress`.

A caller submits a request and reads a stream::

    stream = scheduler.default().submit(ChatRequest("runs/my-run", "tuned", "Hi!"))
    with stream:
        for event in stream:  # engine.inference.ChatEvent
            ...

Work runs on **lanes**, one worker thread each, never on the caller's thread:

* ``torch`` - every PyTorch call: loading a model (engine.inference.load_chat_model, whose
  cache keeps at most MAX_LOADED models, least recently used evicted) and generating. One
  thread for all of it: transformers' loading is not thread-safe, torch's inference mode
  belongs to a thread, and each thread calling PyTorch brings its own OpenMP pool (replies
  once ran about 2x slower from Gradio's many worker threads; on a busy 2-core AMD EPYC,
  SmolLM2-135M's plain decoder later ran at 13-16 tokens/s from the main thread, one
  dedicated thread or threads taking turns alike). ``tunelab ui`` lends this lane its main
  thread (:meth:`Lane.host`, through webui.common.MAIN_THREAD); elsewhere the lane starts a
  thread of its own.
* ``onnx`` - ONNX Runtime GenAI replies, which need no PyTorch and run on a thread of their own.

Each lane serves its queue in order. A lane steps its running jobs in turn, one event each,
so on a GPU up to ``MAX_STREAMS`` replies stream together from the one thread; without a GPU
(``share_cpu``) one job runs at a time over all lanes, in the order they were submitted, so
each reply's tokens per second is its own and not a share of the cores. A request that
waits first yields a ``queued`` event saying so; a request whose model is not loaded yet
yields ``loading``; then come the model's ``text`` events and one ``done`` with the stats.

A caller can end a reply: :meth:`Stream.stop` ends it after the token being computed (the
``done`` event and its stats still come; a queued request is dropped at once), and
:meth:`Stream.close` (or leaving the ``with`` block, or dropping the stream) abandons it:
queued, it never runs; running, its generator is closed on its lane.

Batching: a lane admits jobs in :meth:`Lane._admit_ready` and advances them in
:meth:`Lane.step`. A batched ONNX lane would admit every queued request whose settings can
share one ``og.Generator`` there, and step them as one batch (one ``generate_next_token``
for all, each job receiving its own token); the queue, the order and the streams stay as
they are. Nothing batches yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import inference

TORCH = "torch"
ONNX = "onnx"
LANES = (TORCH, ONNX)
LANE_OF_BACKEND = {"base": TORCH, "tuned": TORCH, "onnx": ONNX}
# Replies a lane streams together when the machine has a GPU (one thread steps them in turn).
MAX_STREAMS = int(os.environ.get("TUNELAB_MAX_STREAMS", "4"))
WAITING_FOR_CPU = "waiting: on this CPU the models answer one at a time"

log = logging.getLogger("tunelab.scheduler")

_ITEM, _END, _ERROR = "item", "end", "error"


@dataclass
class ChatRequest:
    """One reply to compute: the arguments of engine.inference.stream_chat."""

    run: str | Path  # a run directory, or for ``base`` a model reference
    backend: str  # base | tuned | onnx
    messages: Any
    settings: inference.GenerationSettings | None = None
    system: str | None = None
    precision: str | None = None  # the ONNX export (int4, int8, fp32)
    merge: bool = False
    stop: threading.Event | None = None  # set to end the reply after the current token

    @property
    def lane(self) -> str:
        if self.backend not in LANE_OF_BACKEND:
            raise inference.InferenceError(f"backend: {self.backend!r} is not one of {', '.join(inference.BACKENDS)}")
        return LANE_OF_BACKEND[self.backend]


class _ChatWork:
    """The iterator a chat job runs on its lane: ``loading`` when the model is not in the
    cache, then the model's own events. Each step of a PyTorch reply runs in inference mode,
    so replies stepped in turn on one thread do not undo each other's mode."""

    def __init__(self, request: ChatRequest, stop: threading.Event):
        self.request = request
        self.stop = stop
        self.events: Iterator[inference.ChatEvent] | None = None
        self.announced = False

    def __iter__(self):
        return self

    def _mode(self):
        if self.request.lane != TORCH:
            return contextlib.nullcontext()
        import torch

        return torch.inference_mode()

    def __next__(self) -> inference.ChatEvent:
        r = self.request
        if self.events is None:
            if not self.announced and not inference.is_loaded(r.run, r.backend, r.precision, r.merge):
                self.announced = True
                return inference.ChatEvent("loading", f"Loading the {r.backend} model...")
            model = inference.load_chat_model(r.run, r.backend, precision=r.precision, merge=r.merge)
            self.events = model.generate(r.messages, r.settings, system=r.system, stop=self.stop)
        with self._mode():
            return next(self.events)

    def close(self) -> None:
        if self.events is not None:
            with self._mode():
                self.events.close()


class _Job:
    """A unit of work on a lane: an iterator made and advanced on the lane's thread, its
    items handed to a :class:`Stream` (at most ``buffer`` waiting, when given)."""

    def __init__(self, make: Callable[[], Iterable], *, buffer: int | None, stop: threading.Event | None):
        self.make = make
        self.iterator: Iterator | None = None
        self.buffer = buffer
        self.stop = stop or threading.Event()
        self.out: deque = deque()
        self.state = "queued"  # queued -> running -> done
        self.cancelled = False
        self.ticket = 0

    def ready(self) -> bool:
        return self.cancelled or self.buffer is None or len(self.out) < self.buffer


class Stream:
    """What a caller reads: the items of one job, in order, from any thread.

    Iterating blocks until the next item; an exception raised by the work is raised here.
    The lane holds the job, not the stream, so a stream dropped unread is closed."""

    def __init__(self, scheduler: "Scheduler", lane: "Lane", job: _Job):
        self._scheduler = scheduler
        self._lane = lane
        self._job = job
        self.finished = False

    def __iter__(self):
        return self

    def __next__(self):
        job, cond = self._job, self._scheduler.cond
        if self.finished:
            raise StopIteration
        with cond:
            while not job.out:
                cond.wait()
            kind, value = job.out.popleft()
            if job.buffer is not None:
                cond.notify_all()  # room for the lane's next step
        if kind == _ITEM:
            return value
        self.finished = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def stop(self) -> None:
        """End the work early but keep its last events: a reply stops after the current
        token and still reports its stats; queued work is dropped now."""
        self._job.stop.set()
        self._lane.drop_if_queued(self._job)

    def close(self) -> None:
        """Abandon the work: queued, it never runs; running, it is closed on its lane."""
        if self.finished:
            return
        self.finished = True
        self._job.stop.set()
        self._lane.cancel(self._job)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not self.finished:
            self.close()


class Lane:
    """One worker thread and its queue (see the module docstring)."""

    def __init__(self, scheduler: "Scheduler", name: str, max_active: int):
        self.scheduler = scheduler
        self.name = name
        self.max_active = max(1, max_active)
        self.queue: deque[_Job] = deque()
        self.active: list[_Job] = []
        self.runner: int | None = None  # thread ident serving the lane now
        self.host_expected = False
        self.hosted = False  # a host thread serves the lane now
        self.own_thread: threading.Thread | None = None

    # ---- submitting and cancelling (any thread)

    def put(self, job: _Job) -> None:
        cond = self.scheduler.cond
        with cond:
            self.queue.append(job)
            if not self.host_expected:
                self._ensure_own_thread()
            cond.notify_all()

    def waiting_ahead(self) -> int:
        """Jobs that would run before one submitted now (the scheduler's condition held)."""
        if self.scheduler.share_cpu:
            return len(self.scheduler.pending)
        return max(0, len(self.queue) + len(self.active) - self.max_active + 1)

    def drop_if_queued(self, job: _Job) -> None:
        cond = self.scheduler.cond
        with cond:
            if job.state == "queued":
                self.queue.remove(job)
                self._finish(job, (_END, None))
            cond.notify_all()

    def cancel(self, job: _Job) -> None:
        cond = self.scheduler.cond
        with cond:
            job.cancelled = True
            if job.state == "queued":
                self.queue.remove(job)
                self._finish(job, (_END, None))
            cond.notify_all()  # a running job is closed by the lane's next round

    # ---- serving

    def _ensure_own_thread(self) -> None:
        if self.own_thread is None:
            self.own_thread = threading.Thread(target=self._serve, name=f"tunelab-{self.name}", daemon=True)
            self.own_thread.start()

    def expect_host(self) -> None:
        """A host thread will serve this lane: the lane's own thread hands over after its
        current step, and work submitted from now on waits for the host."""
        with self.scheduler.cond:
            self.host_expected = True
            self.scheduler.cond.notify_all()

    def release_host(self) -> None:
        """No host after all: the lane's own thread serves again (if there is work)."""
        with self.scheduler.cond:
            if self.host_expected and not self.hosted:
                self.host_expected = False
                if self.queue or self.active:
                    self._ensure_own_thread()
            self.scheduler.cond.notify_all()

    def host(self, until: Callable[[], bool]) -> None:
        """Serve this lane on the calling thread until ``until()`` is true (checked at least
        every 0.2 s); then the lane's own thread takes over what is left."""
        self.expect_host()
        self._serve(until)

    def wake(self) -> None:
        with self.scheduler.cond:
            self.scheduler.cond.notify_all()

    def _serve(self, until: Callable[[], bool] | None = None) -> None:
        hosting = until is not None
        me = threading.get_ident()
        cond = self.scheduler.cond
        with cond:
            while self.runner is not None and self.runner != me:  # the own thread finishes its step
                cond.wait(0.2)
            self.runner = me
            self.hosted = hosting
        try:
            while True:
                with cond:
                    while True:
                        if hosting and until():
                            return
                        if not hosting and self.host_expected:
                            return
                        ready = self._admit_ready()
                        if ready:
                            break
                        cond.wait(0.2 if hosting else 5.0)
                for job in ready:
                    self.step(job)
        finally:
            with cond:
                self.runner = None
                self.hosted = False
                if not hosting and self.own_thread is threading.current_thread():
                    self.own_thread = None  # a later submission starts a new one
                if hosting:
                    self.host_expected = False
                    if self.queue or self.active:
                        self._ensure_own_thread()
                cond.notify_all()

    def _admit_ready(self) -> list[_Job]:
        """Start queued jobs in order while there is room (the scheduler's condition held),
        and return the running jobs that can take a step."""
        pending = self.scheduler.pending
        while self.queue:
            job = self.queue[0]
            if job.stop.is_set():  # stopped before it started
                self.queue.popleft()
                self._finish(job, (_END, None))
                continue
            if self.scheduler.share_cpu:
                if job.ticket != min(pending):
                    break
            elif len(self.active) >= self.max_active:
                break
            self.queue.popleft()
            job.state = "running"
            self.active.append(job)
        return [job for job in self.active if job.ready()]

    def step(self, job: _Job) -> None:
        """Advance ``job`` by one item, on this lane's thread (the condition not held)."""
        if job.cancelled:
            self._close(job)
            with self.scheduler.cond:
                self._finish(job, (_END, None))
            return
        try:
            if job.iterator is None:
                job.iterator = iter(job.make())
            entry = (_ITEM, next(job.iterator))
        except StopIteration:
            entry = (_END, None)
        except Exception as err:  # noqa: BLE001 - raised again in the reader's thread
            entry = (_ERROR, err)
        except BaseException as err:  # KeyboardInterrupt on a hosting main thread: end the job, then stop
            with self.scheduler.cond:
                self._finish(job, (_ERROR, err))
            raise
        with self.scheduler.cond:
            if entry[0] == _ITEM:
                job.out.append(entry)
                self.scheduler.cond.notify_all()
            else:
                self._finish(job, entry)

    def _close(self, job: _Job) -> None:
        close = getattr(job.iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - the reader has left; nobody to tell but the log
                log.exception("closing abandoned work on the %s lane failed", self.name)

    def _finish(self, job: _Job, entry: tuple) -> None:
        """Mark ``job`` done with its last entry (the scheduler's condition held)."""
        if job.state == "done":
            return
        job.state = "done"
        job.out.append(entry)
        if job in self.active:
            self.active.remove(job)
        self.scheduler.pending.discard(job.ticket)
        self.scheduler.cond.notify_all()


class Scheduler:
    """The lanes and their order (see the module docstring).

    ``share_cpu``: one job at a time over all lanes, in submission order (default: when
    PyTorch has no GPU). ``max_streams``: jobs a lane runs together otherwise.
    """

    def __init__(self, share_cpu: bool | None = None, max_streams: int = MAX_STREAMS):
        if share_cpu is None:
            import torch

            share_cpu = not torch.cuda.is_available()
        self.share_cpu = share_cpu
        self.cond = threading.Condition()
        self.pending: set[int] = set()  # tickets of jobs not finished (used when share_cpu)
        self._tickets = 0
        self.lanes = {name: Lane(self, name, max_streams) for name in LANES}

    def lane(self, name: str) -> Lane:
        return self.lanes[name]

    def _submit(self, lane_name: str, job: _Job, queued_item=None) -> Stream:
        lane = self.lanes[lane_name]
        with self.cond:
            ahead = lane.waiting_ahead()
            if ahead and queued_item is not None:
                job.out.append((_ITEM, queued_item(ahead)))
            self._tickets += 1
            job.ticket = self._tickets
            if self.share_cpu:
                self.pending.add(job.ticket)
            lane.put(job)
        return Stream(self, lane, job)

    def submit(self, request: ChatRequest) -> Stream:
        """Stream the reply to ``request`` (engine.inference.ChatEvent items)."""
        stop = request.stop or threading.Event()

        def queued(ahead: int) -> inference.ChatEvent:
            if self.share_cpu:
                return inference.ChatEvent("queued", WAITING_FOR_CPU)
            return inference.ChatEvent("queued", f"waiting for {ahead} other repl{'y' if ahead == 1 else 'ies'}")

        job = _Job(lambda: _ChatWork(request, stop), buffer=None, stop=stop)
        return self._submit(request.lane, job, queued)

    def stream(self, lane: str, make_iterator: Callable[[], Iterable], buffer: int | None = 64) -> Stream:
        """Run ``make_iterator()`` and advance it on ``lane``'s thread; the stream yields its items."""
        return self._submit(lane, _Job(make_iterator, buffer=buffer, stop=None))

    def progress(self, lane: str, fn: Callable, *args, **kwargs) -> Stream:
        """Run ``fn(*args, progress=callback, **kwargs)`` on ``lane``: the stream yields
        ``("line", text)`` for each progress message as it comes, then ``("done", result)``."""

        def emit(msg) -> None:
            with self.cond:
                job.out.append((_ITEM, ("line", str(msg))))
                self.cond.notify_all()

        def work():
            yield ("done", fn(*args, progress=emit, **kwargs))

        job = _Job(work, buffer=None, stop=None)
        return self._submit(lane, job)

    def call(self, lane: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on ``lane``'s thread, waited for (run at once when called
        from that thread)."""
        if self.lanes[lane].runner == threading.get_ident():
            return fn(*args, **kwargs)
        with self.stream(lane, lambda: iter([fn(*args, **kwargs)]), buffer=None) as stream:
            return next(stream)


_DEFAULT: Scheduler | None = None
_DEFAULT_LOCK = threading.Lock()


def default() -> Scheduler:
    """The process's scheduler (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Scheduler()
        return _DEFAULT

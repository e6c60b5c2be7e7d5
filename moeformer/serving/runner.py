"""One engine, many asyncio callers: the engine lives on a background thread that steps it while it has work;
callers submit requests through a thread-safe queue and receive each request's outputs on an asyncio queue of
their own event loop.

    runner = EngineRunner(engine).start()
    stream = await runner.submit("req-1", prompt_ids, SamplingParams(max_tokens=32))   # ValueError: bad request
    async for out in stream:          # StepOutputs of this request until the finished one
        ...
    stream.abort()                    # no-op once finished: frees the request's cache blocks in the engine
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeformer.serving.engine import Engine
from moeformer.serving.request import SamplingParams, StepOutput

_ACCEPTED = object()  # first item on a request's queue once the engine holds it


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        """Hand `item` to the caller's event loop (dropped when that loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


class RequestStream:
    """The outputs of one submitted request, as an async iterator that ends after the finished output; an engine
    error ends it by raising that error."""

    def __init__(self, runner: EngineRunner, request_id: str, items: asyncio.Queue) -> None:
        self.runner, self.request_id, self._items = runner, request_id, items
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request in the engine (its cache blocks are freed); nothing more arrives."""
        if not self.finished:
            self.finished = True
            self.runner.abort(self.request_id)


class EngineRunner:
    """Owns `engine` (a `moeformer.serving.Engine`) on one thread: adds and aborts requests between steps, steps it
    while it has unfinished requests, and delivers each StepOutput to its request's caller. An exception from a
    step fails the requests then running (their callers receive it) and the thread goes on with new ones."""

    def __init__(self, engine: Engine, idle_poll: float = 0.1, keepalive: float = 60.0) -> None:
        self.engine = engine
        self.idle_poll = idle_poll  # seconds between checks for a stop request while idle
        # a multi-rank engine's other ranks wait in a collective for rank 0's next step: an idle engine still steps
        # every `keepalive` seconds (an empty step), so that wait never reaches the process group's timeout
        self.keepalive = keepalive if engine.group is not None else None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EngineRunner:
        if not self.alive:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="moeformer-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread: the requests in flight fail with a RuntimeError and are aborted in the engine (their
        blocks are freed by its next step, if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """Add a request (on the engine's thread); returns its stream once the engine accepted it, or raises the
        engine's ValueError for a bad request. Cancelled while waiting, the request is aborted."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, list(prompt_ids), params, sink))
        try:
            first = await sink.queue.get()
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, sink.queue)

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe; unknown or finished ids are ignored)."""
        self._commands.put(("abort", request_id))

    # ---- the engine's thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.engine.device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(self.engine.device)
        last_step = time.monotonic()
        while not self._stop.is_set():
            self._apply_commands(wait=not self.engine.has_unfinished())
            idle = not self.engine.has_unfinished()
            if idle and (self.keepalive is None or time.monotonic() - last_step < self.keepalive):
                continue
            last_step = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as error:  # fail the running requests, keep serving
                self._fail_all(error)
                continue
            self._deliver(outputs)
        closing = RuntimeError("the engine has stopped")
        self._fail_all(closing)
        while not self._commands.empty():  # requests submitted too late
            command = self._commands.get_nowait()
            if command[0] == "add":
                command[-1].put(closing)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Hand a step's outputs to their callers: one wake-up per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                by_loop.setdefault(sink.loop, []).append((sink.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody reads these requests anymore
                for _, out in items:
                    if not out.finished:
                        self._abort(out.request_id)

    def _apply_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_poll) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if command[0] == "add":
                _, request_id, prompt_ids, params, sink = command
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except Exception as error:
                    sink.put(error)
                else:
                    self._sinks[request_id] = sink
                    sink.put(_ACCEPTED)
            else:
                self._abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self.engine.abort(request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            del self._sinks[request_id]
            sink.put(error)
            with contextlib.suppress(Exception):  # the engine may be unusable after the error
                self.engine.abort(request_id)

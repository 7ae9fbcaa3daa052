"""The persistent engine loop: a background thread that steps the engine while there is work.

Callers on any thread submit requests and read their outputs from a queue; the loop owns the
engine, so the engine itself needs no locks. Bad requests are rejected in the caller's thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

_DONE = object()


class OutputStream:
    """Iterator over one request's outputs (each carries its `text_delta`)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            yield item
            if item.finished:
                return

    def result(self):
        """Block until the request finishes; its final output."""
        last = None
        for last in self:
            pass
        return last


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, OutputStream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="opdisagg-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt, sampling_params=None, request_id: str | None = None,
               cache_salt: str | None = None) -> OutputStream:
        req = self.engine._make_request(prompt, sampling_params, request_id, cache_salt)  # raises ValueError here
        stream = OutputStream(req.request_id)
        self._inbox.put(("add", req, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, stream = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._streams[item.request_id] = stream
                self.engine._enqueue(item)
            elif self.engine.abort(item):
                self._close(item)

    def _close(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._queue.put(_DONE)

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            for out in self.engine.step():
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._queue.put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._close(rid)

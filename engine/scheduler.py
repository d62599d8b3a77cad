"""Which requests step next: submitted requests wait in a queue; each loop of the engine's worker
takes the arrivals, retires the requests that are done, cancelled or out of time, and admits the
oldest of the rest whose candidate rows fit one batch."""

from __future__ import annotations

import queue
import time

from .request import Request


class Scheduler:
    def __init__(self, max_batch_rows: int):
        self.max_batch_rows = max_batch_rows
        self.requests: dict[int, Request] = {}  # queued or being denoised
        self.active: list[Request] = []  # taken from the queue, in arrival order
        self._incoming: queue.Queue[Request | None] = queue.Queue()

    def add(self, request: Request) -> None:
        """From any thread."""
        self.requests[request.id] = request
        self._incoming.put(request)

    def close(self) -> None:
        """From any thread: the worker's next `receive` returns False."""
        self._incoming.put(None)

    def receive(self) -> bool:
        """Move the arrivals into the active requests, waiting for one when there are none;
        False once the engine is closing."""
        try:
            incoming = [self._incoming.get()] if not self.active else []
            while True:
                incoming.append(self._incoming.get_nowait())
        except queue.Empty:
            pass
        self.active += [r for r in incoming if r is not None]
        return None not in incoming

    def batch(self) -> list[Request]:
        """The oldest active requests whose rows fit one batch."""
        batch, rows = [], 0
        for request in self.active:
            if rows + request.n > self.max_batch_rows and batch:
                break
            batch.append(request)
            rows += request.n
        return batch

    def retire(self) -> list[tuple[Request, str]]:
        """Remove the requests that leave now, each with why: "resolved" (its future is already
        done), "cancelled", "done" (every position decoded) or "budget" (past its deadline)."""
        now, leaving, staying = time.monotonic(), [], []
        for request in self.active:
            if request.future.done():  # resolved, or cancelled through an asyncio wrapper of its future
                leaving.append((request, "resolved"))
            elif request.cancelled.is_set():
                leaving.append((request, "cancelled"))
            elif request.denoiser.done:
                leaving.append((request, "done"))
            elif request.deadline is not None and now >= request.deadline:
                leaving.append((request, "budget"))
            else:
                staying.append(request)
        self.active = staying
        for request, _ in leaving:
            self.requests.pop(request.id, None)
        return leaving

    def drain(self) -> list[Request]:
        """Every request not yet resolved, removed: for closing."""
        remaining = list(self.requests.values())
        self.active, self.requests = [], {}
        return remaining

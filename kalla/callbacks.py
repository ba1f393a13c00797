"""Progress, completion and error callbacks: small validated POSTs with the stdlib.

Delivery never raises into the job: it returns an outcome that the caller records.
Completion and error callbacks retry with exponential backoff on connection errors,
timeouts, 5xx and 429; other 4xx answers are final. Progress callbacks are one attempt.
`Courier` orders one job's callbacks: coalesced progress first, the terminal one last.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import orjson

log = logging.getLogger("kalla.callbacks")

KINDS = ("progress", "complete", "error")


@dataclass
class Outcome:
    kind: str
    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "delivered": self.delivered, "attempts": self.attempts,
                "status": self.status, "error": self.error}


def _json_default(value):
    # orjson does not serialise Decimal; callbacks only carry counts and text, but be safe.
    return str(value)


def encode(body: dict) -> bytes:
    return orjson.dumps(body, default=_json_default)


class CallbackSender:
    """POSTs callback bodies to one job's callback_url."""

    def __init__(self, url: str, *, style: str = "exact", timeout: float = 10.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 8.0):
        self.url = url
        self.style = style
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def target(self, kind: str) -> str:
        if self.style == "suffix":
            return self.url.rstrip("/") + "/" + kind
        return self.url

    def send(self, kind: str, body: dict) -> Outcome:
        attempts = 1 if kind == "progress" else self.retries
        outcome = Outcome(kind, False, 0)
        delay = self.backoff
        for attempt in range(1, attempts + 1):
            outcome = self._post_once(kind, body)
            outcome.attempts = attempt
            if outcome.delivered or not _retryable(outcome):
                break
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        if not outcome.delivered:
            # progress is best effort: one lost update is not worth a warning
            (log.debug if kind == "progress" else log.warning)(
                "callback %s for run %s not delivered after %d attempt(s): %s",
                kind, body.get("run_id"), outcome.attempts, outcome.error)
        return outcome

    def _post_once(self, kind: str, body: dict) -> Outcome:
        request = urllib.request.Request(
            self.target(kind), data=encode(body), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "kalla-runner"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read(65536)
                return Outcome(kind, 200 <= response.status < 300, 0, response.status)
        except urllib.error.HTTPError as exc:
            return Outcome(kind, False, 0, exc.code, f"HTTP {exc.code}")
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            return Outcome(kind, False, 0, None, f"{type(exc).__name__}: {reason}")


def _retryable(outcome: Outcome) -> bool:
    return outcome.status is None or outcome.status == 429 or outcome.status >= 500


class Courier:
    """Delivers one job's callbacks in order, on its own thread, off the job's path.

    Progress is coalesced by (stage, source): a newer event replaces the one still waiting,
    so the buffer holds at most one event per source and stage, and the last one - a
    source's 1.0, matching's final matched_count - is never the one dropped. The terminal
    callback goes last, after every progress event queued before it, exactly once. Once a
    progress POST fails the receiver is presumed unwell and the remaining progress is
    dropped, so a hanging receiver cannot hold back the terminal callback for long.
    """

    MAX_PENDING = 32

    def __init__(self, sender: CallbackSender, run_id: str,
                 on_delivery: Callable[[Outcome], None] | None = None):
        self.sender = sender
        self.run_id = run_id
        self.on_delivery = on_delivery or (lambda outcome: None)
        self._pending: OrderedDict[tuple, dict] = OrderedDict()
        self._terminal: tuple[str, dict] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"courier-{run_id[:8]}",
                                        daemon=True)
        self._started = False
        self.done = threading.Event()

    def progress(self, body: dict) -> None:
        with self._cond:
            if self._closed:
                return
            key = (body.get("stage"), body.get("source"))
            self._pending.pop(key, None)
            self._pending[key] = body
            while len(self._pending) > self.MAX_PENDING:
                self._pending.popitem(last=False)
            self._start_locked()

    def finish(self, kind: str, body: dict) -> None:
        """Queue the terminal callback (complete or error); later calls are ignored."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._terminal = (kind, body)
            self._start_locked()

    def abandon(self) -> None:
        """Drop what is waiting and send no terminal callback (the job will run again)."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify()
        if not self._started:
            self.done.set()

    def _start_locked(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()
        self._cond.notify()

    def _next(self) -> tuple[str, dict] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._pending:
                return "progress", self._pending.popitem(last=False)[1]
            terminal, self._terminal = self._terminal, None
            return terminal

    def _run(self) -> None:
        try:
            while (item := self._next()) is not None:
                outcome = self.sender.send(*item)
                if item[0] == "progress" and not outcome.delivered:
                    with self._cond:
                        self._pending.clear()
                try:
                    self.on_delivery(outcome)
                except Exception:  # bookkeeping must not stop delivery
                    log.exception("recording a %s callback outcome failed", item[0])
                if item[0] != "progress":
                    return
        finally:
            self.done.set()

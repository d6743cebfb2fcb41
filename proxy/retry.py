"""Request-level retries: which failed attempts are sent again, and how often.

A failed attempt is classified by the `Stage` it reached, and `plan_retry`
decides from that stage, the method and the body whether the request goes
out again:

- No connection was made (refused, unreachable, connect timeout): nothing
  of the request was written, so any method goes to another pod.
- A pooled keep-alive connection broke before any response byte: the pod
  most likely closed it while it was idle, so an idempotent request is sent
  once more to the same pod. aiohttp takes another idle pooled connection
  for it when there is one, else it opens a new connection.
- A new connection broke before any response byte: the pod may have seen
  the request, so only an idempotent request goes to another pod, and only
  when its body can be sent again.
- A read timeout or an invalid response is never retried, because the pod
  may still be working on the request. Nor is any response, 5xx included.

Every retry also needs the service's `RetryBudget`, so that a broken pod
cannot multiply the load on the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Final, Protocol

from aiohttp import web

logger = logging.getLogger("stateful_route.retry")

# Idempotent methods (RFC 9110, section 9.2.2) that a retry may send again
# after the pod may have seen them. TRACE is idempotent too, but is left out
# because the proxy has no reason to repeat it.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Slots of the sliding window, so the window moves in steps of window_s / 10.
_WINDOW_SLOTS: Final = 10


class Stage(Enum):
    """How far a failed attempt got, which decides whether it may be retried."""

    # No connection to the pod: nothing of the request was written.
    CONNECT = "connect"
    # A pooled connection broke before the first response byte.
    STALE = "stale"
    # A new connection broke before the first response byte.
    SENT = "sent"
    # The pod did not send the next bytes within the read timeout.
    TIMEOUT = "timeout"
    # Anything else, such as a response that is not valid HTTP.
    OTHER = "other"


class Retry(Enum):
    """The target of a retry."""

    SAME_POD = "same_pod"
    OTHER_POD = "other_pod"


def plan_retry(
    stage: Stage, method: str, body_replayable: bool, attempts_left: int
) -> Retry | None:
    """Return where to send a failed request again, or None to fail it.

    `body_replayable` is True when the client's body can be sent again,
    because there is none, it was buffered, or none of it was read yet.
    """
    if attempts_left <= 0 or not body_replayable:
        return None
    if stage is Stage.CONNECT:
        return Retry.OTHER_POD
    if method not in RETRYABLE_METHODS:
        return None
    if stage is Stage.STALE:
        return Retry.SAME_POD
    if stage is Stage.SENT:
        return Retry.OTHER_POD
    return None


class BodySource(Protocol):
    """A request body stream: aiohttp's StreamReader or a wrapper of it."""

    async def readany(self) -> bytes: ...

    async def readexactly(self, size: int) -> bytes: ...


class RequestBody:
    """The client's request body for one or more attempts.

    A body of up to the service's ``retry_buffer_bytes``, with a
    Content-Length, is read whole before the first attempt, so it can be
    sent again. A larger or chunked body is streamed, and can be sent again
    only while none of it was read.
    """

    __slots__ = ("_buffered", "_content", "started")

    def __init__(
        self, content: BodySource | None = None, buffered: bytes | None = None
    ) -> None:
        self._content = content
        self._buffered = buffered
        # Set before the first read of a streamed body, so a read that
        # fails halfway also counts as started.
        self.started = False

    @property
    def replayable(self) -> bool:
        """Whether an attempt can send the whole body again."""
        return self._content is None or not self.started

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        """Return the body for one attempt, as aiohttp's ``data`` argument."""
        if self._content is None:
            return self._buffered
        return _StreamChunks(self, self._content)


class _StreamChunks:
    """The chunks of a streamed body, marking it started on the first read."""

    __slots__ = ("_body", "_content")

    def __init__(self, body: RequestBody, content: BodySource) -> None:
        self._body = body
        self._content = content

    def __aiter__(self) -> _StreamChunks:
        return self

    async def __anext__(self) -> bytes:
        self._body.started = True
        chunk = await self._content.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk


async def read_body(
    request: web.BaseRequest,
    buffer_bytes: int,
    retries: bool,
    content: BodySource | None = None,
) -> RequestBody:
    """Return the request's body, read whole when a retry could resend it.

    The body is read from `content`, or from ``request.content`` without it.

    The body is buffered only when `retries` is on, the method is in
    `RETRYABLE_METHODS` and the Content-Length is at most `buffer_bytes`.
    Only such a request can be retried after it was written. A request with
    ``Expect: 100-continue`` is streamed, because its client sends the body
    only after the pod's ``100 Continue`` is relayed. Raises
    `asyncio.IncompleteReadError` when the client ends the body early, and
    ConnectionError when the client connection is lost.
    """
    if not request.body_exists:
        return RequestBody()
    source: BodySource = request.content if content is None else content
    length = request.content_length
    expect = request.headers.get("Expect", "")
    if (
        expect.strip().lower() != "100-continue"
        and retries
        and request.method in RETRYABLE_METHODS
        and length is not None
        and length <= buffer_bytes
    ):
        return RequestBody(buffered=await source.readexactly(length))
    return RequestBody(content=source)


class RetryBudget:
    """The retries that one service may still send, over a sliding window.

    A retry is allowed while the retries in the window are fewer than
    ``max(percent / 100 * requests in the window, min_per_s * window_s)``.
    The floor lets a service with little traffic retry at all. The window
    moves in steps of a tenth of `window_s`.

    :param service: the service name, for the log.
    :param percent: share of the requests that may be retried, 0 to 100.
    :param window_s: length of the window in seconds.
    :param min_per_s: retries per second always allowed.
    :param clock: returns monotonic seconds.
    """

    __slots__ = (
        "_clock",
        "_floor",
        "_rejecting",
        "_requests",
        "_retries",
        "_share",
        "_slot_s",
        "_tick",
        "_window_requests",
        "_window_retries",
        "rejected",
        "requests",
        "retried",
        "service",
        "settings",
    )

    def __init__(
        self,
        service: str,
        percent: float,
        window_s: float,
        min_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"invalid window_s {window_s!r}: expected > 0")
        self.service = service
        self.settings = (percent, window_s, min_per_s)
        """The arguments percent, window_s and min_per_s, for comparison."""
        self._share = percent / 100
        self._floor = min_per_s * window_s
        self._slot_s = window_s / _WINDOW_SLOTS
        self._clock = clock
        self._requests = [0] * _WINDOW_SLOTS
        self._retries = [0] * _WINDOW_SLOTS
        self._window_requests = 0
        self._window_retries = 0
        self._tick = math.floor(clock() / self._slot_s)
        self._rejecting = False
        # Totals since start, for the admin API.
        self.requests = 0
        self.retried = 0
        self.rejected = 0

    def note_request(self) -> None:
        """Count one request that the proxy relays, retried or not."""
        slot = self._advance()
        self._requests[slot] += 1
        self._window_requests += 1
        self.requests += 1

    def try_spend(self) -> bool:
        """Count one retry and return True when the budget allows it.

        A rejected retry is counted in `rejected`. The first rejection after
        an allowed retry is logged as a WARNING, and the next allowed retry
        as INFO, so a burst logs two lines.
        """
        slot = self._advance()
        if self._window_retries >= self.limit():
            self.rejected += 1
            if not self._rejecting:
                self._rejecting = True
                logger.warning(
                    "retry budget of service=%s exhausted: %d retries for %d "
                    "requests in the window; failed requests are not retried",
                    self.service,
                    self._window_retries,
                    self._window_requests,
                )
            return False
        if self._rejecting:
            self._rejecting = False
            logger.info("retry budget of service=%s allows retries again", self.service)
        self._retries[slot] += 1
        self._window_retries += 1
        self.retried += 1
        return True

    def refund(self) -> None:
        """Take back one retry that `try_spend` allowed but that was not sent.

        A retry whose window slot has moved on stays counted in the window,
        which only makes the budget stricter.
        """
        slot = self._advance()
        self.retried -= 1
        if self._retries[slot] > 0:
            self._retries[slot] -= 1
            self._window_retries -= 1

    def limit(self) -> float:
        """Return the number of retries the current window allows."""
        return max(self._share * self._window_requests, self._floor)

    def window_counts(self) -> tuple[int, int]:
        """Return (requests, retries) in the current window."""
        self._advance()
        return self._window_requests, self._window_retries

    def _advance(self) -> int:
        """Empty the slots that left the window, and return the current slot."""
        tick = math.floor(self._clock() / self._slot_s)
        elapsed = tick - self._tick
        if elapsed > 0:
            for step in range(1, min(elapsed, _WINDOW_SLOTS) + 1):
                slot = (self._tick + step) % _WINDOW_SLOTS
                self._window_requests -= self._requests[slot]
                self._window_retries -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._tick = tick
        return tick % _WINDOW_SLOTS

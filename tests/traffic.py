"""Steady request traffic through a proxy, recorded for later checks.

The end-to-end tests that break Redis while requests flow use it: a
background task sends rounds of requests for a fixed set of users plus a
few new users each round, and keeps every reply.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from test_e2e import pod_headers, routing_headers

# Requests in flight at once, and the pause between two rounds.
CONCURRENCY = 16
ROUND_PAUSE_S = 0.05
# Stop after this many rounds even when the test never calls stop().
MAX_ROUNDS = 2000


@dataclass(frozen=True, slots=True)
class Outcome:
    """One reply: its status, the pod that responded and its X-Route-Reason."""

    uid: str
    round: int
    status: int
    pod: int | None
    reason: str | None


@dataclass
class Traffic:
    """Rounds of requests for `regular` users and `new_per_round` new ones.

    :param client: the HTTP session to send with.
    :param url: the proxy URL that every request goes to.
    :param regular: users requested in every round.
    :param new_per_round: users never seen before, added in each round.
    """

    client: aiohttp.ClientSession
    url: str
    regular: list[str]
    new_per_round: int = 2
    outcomes: list[Outcome] = field(default_factory=list)
    rounds: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish the current round and wait for the task. Safe to call twice."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def wait_rounds(self, count: int, timeout_s: float) -> None:
        """Wait until `count` more rounds are complete."""
        target = self.rounds + count
        async with asyncio.timeout(timeout_s):
            while self.rounds < target:
                assert self._task is not None
                if self._task.done():
                    self._task.result()
                    raise AssertionError("the traffic ended early")
                await asyncio.sleep(0.01)

    async def _run(self) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        while not self._stop.is_set() and self.rounds < MAX_ROUNDS:
            number = self.rounds
            newcomers = [f"new-{number}-{k}" for k in range(self.new_per_round)]
            await asyncio.gather(
                *(self._send(limit, uid, number) for uid in self.regular + newcomers)
            )
            self.rounds += 1
            await asyncio.sleep(ROUND_PAUSE_S)

    async def _send(self, limit: asyncio.Semaphore, uid: str, number: int) -> None:
        async with limit:
            self.outcomes.append(
                await request_outcome(self.client, self.url, uid, number)
            )

    def by_uid(self) -> dict[str, list[Outcome]]:
        grouped: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in self.outcomes:
            grouped[outcome.uid].append(outcome)
        return grouped

    def statuses(self) -> dict[int, int]:
        """Return how many replies had each status."""
        counts: dict[int, int] = defaultdict(int)
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return dict(counts)


async def request_outcome(
    client: aiohttp.ClientSession, url: str, uid: str, number: int = -1
) -> Outcome:
    """Send one request for `uid` and record its reply, with status 0 for none."""
    try:
        async with client.get(url, headers=routing_headers(uid)) as response:
            body = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(uid, number, 0, None, None)
    if status != 200 or not isinstance(body, dict) or "pod" not in body:
        return Outcome(uid, number, status, None, None)
    reason = pod_headers(body).get("X-Route-Reason")
    return Outcome(uid, number, status, int(body["pod"]), reason)

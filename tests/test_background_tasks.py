"""The log line of a background task that stops on an error."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from proxy.server import _log_failed_task


async def fail() -> None:
    raise RuntimeError("store record is not JSON")


async def test_failed_task_logged(caplog: pytest.LogCaptureFixture) -> None:
    task = asyncio.create_task(fail(), name="pod-publish")
    task.add_done_callback(_log_failed_task)

    with caplog.at_level(logging.ERROR):
        with contextlib.suppress(RuntimeError):
            await task
        # Done callbacks run in the loop's next iteration.
        await asyncio.sleep(0)

    assert "background task pod-publish stopped on an error" in caplog.text
    assert "store record is not JSON" in caplog.text


async def test_cancelled_task_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    task = asyncio.create_task(asyncio.sleep(10), name="rebalance")
    task.add_done_callback(_log_failed_task)
    await asyncio.sleep(0)

    task.cancel()
    with caplog.at_level(logging.ERROR):
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    assert "background task" not in caplog.text

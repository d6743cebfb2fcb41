"""Log formats, the access log, and the filter that counts repeated messages.

Two formats, chosen by ``log.format``:

- ``text``: one ``key=value`` line per record, values with spaces quoted::

    ts=2026-12-03T22:10:00.123Z level=INFO logger=stateful_route.server
    msg="stateful-route stopped"

  (one line in the log; wrapped here).

- ``json``: one JSON object per line with the keys ``ts``, ``level``,
  ``logger`` and ``msg``, plus ``error`` when an exception is attached.

The access log, on with ``log.access_log``, writes one record per request to
the logger ``stateful_route.access`` with method, path, status, pod, UID and
duration.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp.abc import AbstractAccessLogger

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest
    from aiohttp.web_response import StreamResponse

ACCESS_LOGGER = "stateful_route.access"
LOG_FORMATS = ("text", "json")

# Repeats of one message allowed per window before the filter counts them.
REPEATS_PER_WINDOW = 5
REPEAT_WINDOW_S = 10.0
# `extra` of a record that the repeat filter always lets through, such as
# the result of a reload, which an operator must see every time.
REPEAT_EXEMPT = {"repeat_exempt": True}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _quoted(value: str) -> str:
    if value and not any(char in value for char in ' "=\n\t'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """Formats a record as ``key=value`` pairs on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_quoted(value)}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(fields).decode()
        except TypeError:
            # A client value with bytes that are not UTF-8.
            safe = {name: json_text(value) for name, value in fields.items()}
            return orjson.dumps(safe).decode()


def json_text(text: str) -> str:
    """Return `text` as JSON can carry it, with U+FFFD for bytes that are not UTF-8.

    aiohttp decodes header values with the ``surrogateescape`` error
    handler, which keeps such bytes as lone surrogates that orjson rejects.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # A surrogate that no decoding with surrogateescape gives.
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


class RepeatFilter(logging.Filter):
    """Lets a message template through a few times per window, then counts it.

    Records are grouped by logger and unformatted message, so one failure
    repeated for many users is one group. When a group's window ends with
    suppressed records, the next record of the group carries their count.
    Records logged with ``extra=REPEAT_EXEMPT`` always pass.
    """

    def __init__(
        self,
        repeats: int = REPEATS_PER_WINDOW,
        window_s: float = REPEAT_WINDOW_S,
    ) -> None:
        super().__init__()
        self._repeats = repeats
        self._window_s = window_s
        # (logger, template) -> [window start, records seen, records suppressed]
        self._groups: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "repeat_exempt", False):
            return True
        key = (record.name, str(record.msg))
        group = self._groups.get(key)
        now = record.created
        if group is None or now - group[0] >= self._window_s:
            suppressed = 0 if group is None else int(group[2])
            self._groups[key] = [now, 1, 0]
            if len(self._groups) > 10_000:
                self._groups.clear()
            if suppressed:
                record.msg = f"{record.msg} (and {suppressed} similar messages)"
            return True
        group[1] += 1
        if group[1] <= self._repeats:
            return True
        group[2] += 1
        return False


class AccessLogger(AbstractAccessLogger):
    """Writes one record per request: method, path, status, pod, UID, duration.

    The pod comes from the routed-pod response header and the UID from the
    request's UID header, whose names the server passes in `log_format` as
    ``"<uid header>|<routed pod header>"``.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        uid_header, _, pod_header = self.log_format.partition("|")
        pod = response.headers.get(pod_header, "-") if pod_header else "-"
        self.logger.info(
            "method=%s path=%s status=%d pod=%s uid=%s duration_ms=%.1f",
            request.method,
            _quoted(request.raw_path[:200]),
            response.status,
            pod,
            _quoted(request.headers.get(uid_header, "-")[:128]),
            time * 1000,
        )


def setup_logging(
    level: str, log_format: str = "text", access_log: bool = False
) -> None:
    """Send the project's logs to standard error in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else KeyValueFormatter()
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    access.disabled = not access_log
    # aiohttp logs every error it handles; ours carry the ids, so keep only
    # its warnings and errors.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

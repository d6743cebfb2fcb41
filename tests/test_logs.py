from __future__ import annotations

import logging

import orjson

from proxy.logs import REPEAT_EXEMPT, JsonFormatter, KeyValueFormatter, RepeatFilter


def make_record(
    msg: str, *args: object, level: int = logging.INFO
) -> logging.LogRecord:
    return logging.LogRecord("stateful_route.test", level, __file__, 1, msg, args, None)


def test_key_value_line_quotes_spaces() -> None:
    line = KeyValueFormatter().format(make_record("moved uid=%s", "alice"))

    assert " level=INFO " in line
    assert " logger=stateful_route.test " in line
    assert line.endswith('msg="moved uid=alice"')


def test_key_value_line_escapes_quotes() -> None:
    line = KeyValueFormatter().format(make_record('say "hi"'))

    assert line.endswith('msg="say \\"hi\\""')


def test_json_line_has_documented_keys() -> None:
    line = JsonFormatter().format(make_record("pod=%d down", 2))

    record = orjson.loads(line)
    assert set(record) == {"ts", "level", "logger", "msg"}
    assert record["msg"] == "pod=2 down"
    assert record["ts"].endswith("Z")


def test_json_line_carries_bytes_not_utf8() -> None:
    # aiohttp keeps a header's bytes that are not UTF-8 as surrogates.
    value = b"g\xe9me".decode("utf-8", "surrogateescape")

    line = JsonFormatter().format(make_record("unknown service %s", value))

    assert orjson.loads(line)["msg"] == "unknown service g\ufffdme"


def test_repeat_filter_counts_repeated_warnings() -> None:
    repeat_filter = RepeatFilter(repeats=2, window_s=10)
    passed = []
    for number in range(6):
        record = make_record("cannot connect to pod %d", number, level=logging.WARNING)
        record.created = 100.0 + number
        passed.append(repeat_filter.filter(record))

    later = make_record("cannot connect to pod %d", 9, level=logging.WARNING)
    later.created = 111.0

    assert passed == [True, True, False, False, False, False]
    assert repeat_filter.filter(later) is True
    assert later.getMessage() == "cannot connect to pod 9 (and 4 similar messages)"


def test_repeat_filter_passes_info_records() -> None:
    repeat_filter = RepeatFilter(repeats=1, window_s=10)

    results = [repeat_filter.filter(make_record("linked uid=a")) for _ in range(5)]

    assert results == [True] * 5


def test_repeat_filter_passes_exempt_records() -> None:
    repeat_filter = RepeatFilter(repeats=2, window_s=10)
    passed = []
    for number in range(6):
        record = make_record("reload rejected: %d", number, level=logging.ERROR)
        record.__dict__.update(REPEAT_EXEMPT)
        record.created = 100.0 + number
        passed.append(repeat_filter.filter(record))

    assert passed == [True] * 6

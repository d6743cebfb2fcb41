from __future__ import annotations

import pytest

from proxy.statuses import StatusRanges


def test_range_contains_its_bounds() -> None:
    statuses = StatusRanges(["200-399"])

    assert 200 in statuses
    assert 399 in statuses
    assert 199 not in statuses
    assert 400 not in statuses


def test_single_status_and_ranges_combine() -> None:
    statuses = StatusRanges(["200-299", "404"])

    assert 404 in statuses
    assert 403 not in statuses
    assert str(statuses) == "200-299, 404"


@pytest.mark.parametrize(
    "entry", ["", "2xx", "399-200", "99", "600", "200-", "-300", "\uff12\uff10\uff10"]
)
def test_invalid_entry_is_rejected(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid status entry"):
        StatusRanges([entry])


def test_empty_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="no statuses"):
        StatusRanges([])

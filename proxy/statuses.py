"""Sets of HTTP statuses written as in the configuration: "200" or "200-399"."""

from __future__ import annotations

from collections.abc import Iterable

MIN_STATUS = 100
MAX_STATUS = 599


class StatusRanges:
    """The statuses of one or more inclusive ranges, such as 200-399 and 404.

    :param entries: each a status ("404") or a range ("200-399").

    Raises ValueError naming the first invalid entry.
    """

    __slots__ = ("_ranges", "text")

    def __init__(self, entries: Iterable[str]) -> None:
        ranges: list[tuple[int, int]] = []
        for entry in entries:
            ranges.append(_parse_entry(entry))
        if not ranges:
            raise ValueError("no statuses: expected at least one entry")
        self._ranges = tuple(ranges)
        self.text = ", ".join(
            str(low) if low == high else f"{low}-{high}" for low, high in ranges
        )

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and any(
            low <= status <= high for low, high in self._ranges
        )

    def __str__(self) -> str:
        return self.text


def _parse_entry(entry: str) -> tuple[int, int]:
    low_text, dash, high_text = entry.strip().partition("-")
    if not dash:
        high_text = low_text
    texts = (low_text.strip(), high_text.strip())
    if not all(text.isascii() and text.isdigit() for text in texts):
        raise ValueError(
            f"invalid status entry {entry!r}: expected a status such as '404' "
            "or a range such as '200-399'"
        )
    low, high = int(texts[0]), int(texts[1])
    if not MIN_STATUS <= low <= high <= MAX_STATUS:
        raise ValueError(
            f"invalid status entry {entry!r}: expected statuses from "
            f"{MIN_STATUS} to {MAX_STATUS}, the lower one first"
        )
    return low, high

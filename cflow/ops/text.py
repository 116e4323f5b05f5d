"""How the operator commands show times, durations and label-value rows."""

import datetime
from collections.abc import Iterable


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 03 min``: short and readable."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_time(epoch_seconds: float) -> str:
    """Local time, to the second."""
    return datetime.datetime.fromtimestamp(epoch_seconds).strftime("%Y-%m-%d %H:%M:%S")


def aligned(rows: Iterable[tuple[str, str]]) -> list[str]:
    """``label: value`` lines with the values in one column."""
    rows = list(rows)
    width = max(len(label) for label, _ in rows) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]

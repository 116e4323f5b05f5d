"""The demo's input: small CSV shards of a noisy linear relation.

Each shard has the columns x1,x2,x3,y with y = the linear function below of
the x's plus Gaussian noise, so the combined result of a demo run can be
checked (a least-squares fit recovers the coefficients).
"""

import random

HEADER = "x1,x2,x3,y"
# y = INTERCEPT + sum(COEFFICIENTS[i] * x_i) + noise
COEFFICIENTS = (1.5, -2.0, 0.5)
INTERCEPT = 3.0
NOISE_SD = 0.1
SHARD_DIR = "shards"


def shard_name(index, count):
    """The object name of shard ``index`` of ``count``, e.g. ``shards/part-007.csv``."""
    width = max(3, len(str(max(count, 1) - 1)))
    return f"{SHARD_DIR}/part-{index:0{width}d}.csv"


def make_shards(count=125, rows=400, seed=7):
    """Deterministic CSV shards for the demo.

    Args:
        count: number of shards.
        rows: data rows per shard (after the header line).
        seed: the same seed always gives the same bytes.
    Returns:
        ``{name: bytes}`` in shard order, names from ``shard_name``.
    """
    shards = {}
    for index in range(count):
        # One generator per shard, so a shard's bytes do not depend on how many come before it.
        rng = random.Random(seed * 1_000_003 + index)
        lines = [HEADER]
        for _ in range(rows):
            xs = [rng.uniform(-10.0, 10.0) for _ in COEFFICIENTS]
            y = INTERCEPT + sum(c * x for c, x in zip(COEFFICIENTS, xs)) + rng.gauss(0.0, NOISE_SD)
            lines.append(",".join(f"{value:.6f}" for value in (*xs, y)))
        shards[shard_name(index, count)] = ("\n".join(lines) + "\n").encode("ascii")
    return shards


def tasks_text(count=125):
    """The demo's tasks file: a comment header, then one shard name per line."""
    header = (
        "# CFlow work items: one item per line.\n"
        "# Each line's fields are split like a shell splits words (quotes and\n"
        "# backslashes work) but are never run by a shell; they are appended as\n"
        "# arguments to TASK_MODULE_CMD. Blank lines and lines starting with # are skipped.\n"
        "# The demo: one CSV shard per item, staged in the run's bucket.\n"
    )
    return header + "".join(shard_name(index, count) + "\n" for index in range(count))

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


def shard_name(index: int, count: int) -> str:
    """The object name of shard ``index`` of ``count``, e.g. ``shards/part-007.csv``."""
    width = max(3, len(str(max(count, 1) - 1)))
    return f"{SHARD_DIR}/part-{index:0{width}d}.csv"


def make_shards(count: int = 125, rows: int = 400, seed: int = 7) -> dict[str, bytes]:
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

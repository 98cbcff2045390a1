"""Curves for the dashboard: a job's metrics as columns, each series thinned on the server to at most N points.

Thinning is Largest-Triangle-Three-Buckets (Steinarsson, 2013): the first and last points stay, and from each of
N-2 buckets between them the point that makes the largest triangle with the point kept before it and the mean of
the next bucket. Unlike taking every k-th point, it keeps the spikes and the turns a person looks for in a loss
curve, at a fixed size whatever the length of the run.
"""

from __future__ import annotations

import math

MAX_POINTS = 2000

# split -> the figures charted for it
CHARTED = {
    "train": ("loss", "lr", "samples_per_s", "tokens_per_s"),
    "validation": ("loss", "accuracy", "macro_f1", "mse", "mae", "perplexity"),
}


def lttb(xs: list[float], ys: list[float], n: int) -> list[int]:
    """Indices of the points kept (in order) when thinning (xs, ys) to n points; all of them when there are no
    more than n. Points whose y is missing (None, NaN) are never chosen inside a bucket."""
    size = len(xs)
    if n >= size or size <= 2:
        return list(range(size))
    if n < 3:
        return [0, size - 1][:max(n, 1)]
    keep = [0]
    every = (size - 2) / (n - 2)
    a = 0
    for i in range(n - 2):
        lo, hi = int(i * every) + 1, int((i + 1) * every) + 1
        nlo, nhi = hi, min(int((i + 2) * every) + 1, size)
        nxt = [j for j in range(nlo, nhi) if _ok(ys[j])] or [size - 1]
        mx = sum(xs[j] for j in nxt) / len(nxt)
        my = sum(ys[j] for j in nxt if _ok(ys[j])) / max(1, sum(1 for j in nxt if _ok(ys[j]))) \
            if any(_ok(ys[j]) for j in nxt) else 0.0
        ax, ay = xs[a], ys[a] if _ok(ys[a]) else 0.0
        best, best_area = lo, -1.0
        for j in range(lo, hi):
            if not _ok(ys[j]):
                continue
            area = abs((ax - mx) * (ys[j] - ay) - (ax - xs[j]) * (my - ay))
            if area > best_area:
                best, best_area = j, area
        keep.append(best)
        a = best
    keep.append(size - 1)
    return keep


def _ok(y) -> bool:
    return y is not None and not (isinstance(y, float) and math.isnan(y))


def thin(columns: dict[str, list], max_points: int = MAX_POINTS) -> dict:
    """Each figure of `columns` ({"step": [...], key: [...]}) as its own series of at most max_points points:
    {key: {"step": [...], "value": [...], "points": total before thinning}}; figures never reported are left out."""
    steps = columns["step"]
    out = {}
    for key, values in columns.items():
        if key == "step":
            continue
        pairs = [(s, v) for s, v in zip(steps, values) if _ok(v)]
        if not pairs:
            continue
        xs, ys = [p[0] for p in pairs], [float(p[1]) for p in pairs]
        idx = lttb(xs, ys, max_points)
        out[key] = {"step": [xs[i] for i in idx], "value": [ys[i] for i in idx], "points": len(pairs)}
    return out

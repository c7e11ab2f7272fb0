"""Pareto front of objective vectors (all minimised), vectorised with numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def pareto_front(points: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Indices (ascending) of the rows of ``points`` that no other row dominates.

    Row a dominates b when a <= b in every column and a < b in one. Equal rows
    do not dominate each other, so duplicates of a front point are all kept.

    Peeling: the remaining row with the smallest column sum cannot be dominated
    by any remaining row, so it is on the front; every row it dominates is
    dropped (anything those rows would dominate, it dominates too). Cost is
    O(n x front size), and the first peel usually removes most rows. Columns
    are kept as separate contiguous arrays: row-wise reductions over a
    3-wide axis are several times slower in numpy.
    """
    n, m = points.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cols = [np.ascontiguousarray(points[:, j]) for j in range(m)]
    remaining = np.arange(n)
    sums = cols[0].copy()
    for c in cols[1:]:
        sums += c
    front: list[npt.NDArray[np.int64]] = []
    for _ in range(n):  # each pass removes at least one row
        if remaining.size == 0:
            break
        k = int(np.argmin(sums))
        # Rounding in the sums can hide a dominator; step to it until none is left.
        for _ in range(remaining.size):
            p = [c[k] for c in cols]
            le = cols[0] <= p[0]
            lt = cols[0] < p[0]
            for c, v in zip(cols[1:], p[1:], strict=True):
                le &= c <= v
                lt |= c < v
            better = le & lt
            if not better.any():
                break
            k = int(np.flatnonzero(better)[0])
        p = [c[k] for c in cols]
        dominated = cols[0] >= p[0]  # includes rows equal to p, which join the front
        equal = cols[0] == p[0]
        for c, v in zip(cols[1:], p[1:], strict=True):
            dominated &= c >= v
            equal &= c == v
        front.append(remaining[equal])
        keep = ~dominated
        remaining, sums = remaining[keep], sums[keep]
        cols = [c[keep] for c in cols]
    out = np.concatenate(front)
    out.sort()
    return out.astype(np.int64)

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
    O(n x front size) with whole-array steps, instead of O(n^2) pairs.
    """
    n = points.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    remaining = np.arange(n)
    pts = points
    sums = points.sum(axis=1)
    front: list[npt.NDArray[np.int64]] = []
    for _ in range(n):  # each pass removes at least one row
        if remaining.size == 0:
            break
        p = pts[int(np.argmin(sums))]
        # Rounding in the sums can hide a dominator; step to it until none is left.
        for _ in range(pts.shape[0]):
            le = (pts <= p).all(axis=1)
            better = le & (pts < p).any(axis=1)
            if not better.any():
                break
            p = pts[int(np.flatnonzero(better)[0])]
        equal = (pts == p).all(axis=1)
        front.append(remaining[equal])
        dominated = (pts >= p).all(axis=1)  # includes the equal rows, kept above
        keep = ~dominated
        remaining, pts, sums = remaining[keep], pts[keep], sums[keep]
    out = np.concatenate(front)
    out.sort()
    return out.astype(np.int64)

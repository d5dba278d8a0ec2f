"""abi layer: arithmetic on arrays of guest frame numbers (GFNs), shared by the engine and the firmware.

No I/O and no policy: the sorted, duplicate-free union the dirty-page bookkeeping needs on both sides of the
trust line, so neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["long_runs", "run_bounds", "sorted_union"]


def sorted_union(*parts: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The sorted, duplicate-free union of GFN arrays.

    Not ``np.unique``/``np.union1d``: their first call imports ``numpy.ma`` (≈12 ms here), which would land in
    the downtime of the first switchover a process runs.
    """
    merged = np.concatenate([np.asarray(p, dtype=np.uint64) for p in parts]) if parts else np.zeros(0, np.uint64)
    if len(merged) < 2:
        return merged
    merged.sort()
    keep = np.empty(len(merged), dtype=np.bool_)
    keep[0] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep]


def run_bounds(values: npt.NDArray[np.integer[Any]]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """``(starts, ends)``: index bounds of the maximal runs of consecutive values (``values[i + 1] == values[i] + 1``)
    in ``values``, in order; ``ends`` are exclusive."""
    count = len(values)
    if not count:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    breaks = np.flatnonzero(np.diff(values.astype(np.int64)) != 1) + 1
    return np.concatenate(([0], breaks)).astype(np.intp), np.concatenate((breaks, [count])).astype(np.intp)


def long_runs(
    values: npt.NDArray[np.integer[Any]], min_run: int
) -> tuple[list[tuple[int, int]], npt.NDArray[np.bool_]]:
    """The runs of consecutive values (``run_bounds``) at least ``min_run`` long, as ``(start, end)`` index bounds,
    and a mask of the values outside them: what is handled a run at a time and what all at once."""
    starts, ends = run_bounds(values)
    lengths = ends - starts
    long = lengths >= min_run
    return list(zip(starts[long].tolist(), ends[long].tolist(), strict=True)), ~np.repeat(long, lengths)

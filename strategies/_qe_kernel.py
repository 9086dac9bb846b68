"""MixQuant's QE on a CPU: one compiled loop per block of a row and bit-width (numba).

Imported only by :func:`qsearch.strategies._qe.qe_table` for CPU weights, so numba's
import (~0.3 s) and the first call's compilation (~1 s, cached on disk after that) are paid
only by a MixQuant search.
"""

from __future__ import annotations

import numba
import numpy as np

_BLOCK = 2048  # elements: a block stays in L1 across the bit-widths; float32 sums within it


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def residual_sq_sums(x: np.ndarray, inv_span: np.ndarray, levels: np.ndarray,
                     out: np.ndarray) -> None:
    """``out[r, k] = sum_j (t - rint(t))^2`` with ``t = x[r, j] x levels[k] x inv_span[r]``.

    This is the squared rounding residual of every element of row ``r`` on the grid of step
    span / L (see ``_asym_qe`` in _qe.py for why no clamp is needed). Each pass is
    multiply, round, subtract and fused multiply-add, vectorised by LLVM; a per-tensor QE
    passes the whole tensor as one row.
    """
    rows, d = x.shape
    out[:] = 0.0
    for r in range(rows):
        row = x[r]
        for j0 in range(0, d, _BLOCK):
            block = row[j0:j0 + _BLOCK]  # a slice, not min() in the bound: that stops SIMD
            for k in range(levels.shape[0]):
                c = levels[k] * inv_span[r]
                acc = np.float32(0.0)
                for j in range(block.shape[0]):
                    t = block[j] * c
                    g = t - np.rint(t)
                    acc += g * g
                out[r, k] += acc

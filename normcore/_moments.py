"""One-pass moments over any axes."""
import numbers

import numba
import numpy as np

from . import _cpu
from ._dtypes import stats_dtype
from ._plan import plan_moments
from ._norms import _input


def moments(x, axis=None, *, correction=0):
    """Mean and variance of x over ``axis`` (None: all axes; an int or a tuple), in one pass
    over memory (blocked Welford / Chan merges, float64 accumulation)::

        mean = sum(x) / n        var = sum((x - mean)**2) / (n - correction)

    Returns ``(mean, var)`` with the reduced axes removed, float32 (float64 for float64 input).

    >>> mean, var = moments(x, axis=(0, 2, 3))
    """
    x = _input("x", x)
    if isinstance(correction, bool) or not isinstance(correction, numbers.Real) \
            or not correction >= 0:
        raise ValueError(f"correction: expected a number >= 0, got {correction!r}")
    plan, perm = plan_moments(x.shape, axis, numba.get_num_threads())
    sdt = stats_dtype(x.dtype)
    n = plan.n
    if x.size == 0:
        shape = plan.stats_shape
        return np.full(shape, np.nan, sdt), np.full(shape, np.nan, sdt)
    xs = x.transpose(perm) if perm is not None else x
    mean, var = _cpu.moments(plan, np.ascontiguousarray(xs).reshape(-1))
    if correction:
        with np.errstate(divide="ignore", invalid="ignore"):
            var = var * (n / (n - correction)) if n > correction else np.full_like(var, np.nan)
    return (mean.astype(sdt).reshape(plan.stats_shape), var.astype(sdt).reshape(plan.stats_shape))

"""One-pass moments over any axes."""
import numbers

import numba

from ._dtypes import stats_dtype
from ._plan import plan_moments
from ._norms import _flat
from ._validate import check_input


def moments(x, axis=None, *, correction=0):
    """Mean and variance of x over ``axis`` (None: all axes; an int or a tuple), in one pass
    over memory (blocked Welford / Chan merges, float64 accumulation)::

        mean = sum(x) / n        var = sum((x - mean)**2) / (n - correction)

    Returns ``(mean, var)`` with the reduced axes removed, float32 (float64 for float64 input).

    >>> mean, var = moments(x, axis=(0, 2, 3))
    """
    be = check_input("x", x)
    xp = be.xp
    if isinstance(correction, bool) or not isinstance(correction, numbers.Real) \
            or not correction >= 0:
        raise ValueError(f"correction: expected a number >= 0, got {correction!r}")
    plan, mean, var = moments64(be, x, axis)
    sdt = stats_dtype(x.dtype)
    n = plan.n
    if x.size == 0:
        shape = plan.stats_shape
        return xp.full(shape, xp.nan, sdt), xp.full(shape, xp.nan, sdt)
    if correction:
        var = var * (n / (n - correction)) if n > correction else xp.full_like(var, xp.nan)
    return (mean.astype(sdt).reshape(plan.stats_shape), var.astype(sdt).reshape(plan.stats_shape))


def moments64(be, x, axis):
    """(plan, mean, biased var) over ``axis``: float64 vectors of the plan's statistics from
    the kernels, or (plan, None, None) for an empty x. Shared by moments and welford."""
    plan, perm = plan_moments(x.shape, axis, numba.config.NUMBA_NUM_THREADS)
    if x.size == 0:
        return plan, None, None
    xs = x.transpose(perm) if perm is not None else x
    mean, var = be.ops.moments(plan, _flat(be, xs))
    return plan, mean, var

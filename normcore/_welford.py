"""Statistics you can merge: (count, mean, m2) per statistic, and Chan's formula.

For a set of n values with mean ``mean`` and ``m2 = sum((x - mean)**2)``, two disjoint parts
a and b merge exactly (Chan, Golub & LeVeque 1979)::

    n     = n_a + n_b             delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    m2    = m2_a + m2_b + delta**2 * n_a * n_b / n
    var   = m2 / (n - correction)

so the moments of any split of a batch (across threads, processes, machines or batches in
time) merge into the moments of the whole. A part with n = 0 is the identity; for constant
data delta = 0 and the merge is exact. This is what synchronized BatchNorm needs: exchanging
(count, mean, m2) loses nothing, unlike (mean, invstd) or an unweighted average of means.
"""
import numbers
from dataclasses import dataclass

import array_api_compat

from ._backend import describe
from ._moments import moments64
from ._plan import _channel_axis
from ._validate import check_input


@dataclass(frozen=True)
class Moments:
    """Mergeable moments per statistic: ``count`` (an int, or an array broadcasting against
    ``mean``), ``mean`` and ``m2 = sum((x - mean)**2)`` (float64 arrays with the reduced axes
    removed). Merge two with :func:`merge_moments`; ``var(correction)`` is ``m2 / (count -
    correction)`` (NaN where count <= correction)."""

    count: object
    mean: object
    m2: object

    def var(self, correction=0):
        """Variance ``m2 / (count - correction)``: 0 is biased, 1 unbiased (Bessel)."""
        d = self.count - correction
        if isinstance(d, numbers.Number):
            return self.m2 / d if d > 0 else self.m2 * float("nan")
        xp = array_api_compat.array_namespace(self.m2, d)
        return xp.where(d > 0, self.m2 / xp.where(d > 0, d, 1), float("nan"))


def _fraction(num, den):
    """num / den, and 0 where den == 0 (den: an int or an array)."""
    if isinstance(den, numbers.Number):
        return num / den if den else 0.0
    xp = array_api_compat.array_namespace(den)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1), 0.0)


def merge_moments(a, b):
    """The :class:`Moments` of the union of two disjoint parts (Chan's formula, elementwise)::

        n = n_a + n_b    delta = mean_b - mean_a    mean = mean_a + delta * n_b / n
        m2 = m2_a + m2_b + delta**2 * n_a * n_b / n

    Either part may be empty (count 0). ``functools.reduce(merge_moments, parts)`` merges many.

    >>> total = merge_moments(welford(x[:10], axis=0), welford(x[10:], axis=0))
    """
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, Moments):
            raise TypeError(f"{name}: expected normcore.Moments, got {type(m).__name__}")
    n = a.count + b.count
    delta = b.mean - a.mean
    fb = _fraction(b.count, n)                       # n_b / n
    return Moments(n, a.mean + delta * fb, a.m2 + b.m2 + (delta * delta) * (a.count * fb))


def welford(x, axis=None):
    """Mergeable moments of x over ``axis`` (None: all axes; an int or a tuple), one pass over
    memory with the same kernels as :func:`normcore.moments`. Returns ``Moments(count, mean,
    m2)``: count an int (the values per statistic), mean and m2 float64 with the reduced axes
    removed. An empty reduction gives count 0, mean 0 and m2 0 (the merge's identity).

    >>> m = welford(x, axis=(0, 2, 3)); m.mean, m.var(correction=1)
    """
    be = check_input("x", x)
    xp = be.xp
    plan, mean, var = moments64(be, x, axis)
    shape = plan.stats_shape
    if mean is None:
        return Moments(plan.n, xp.zeros(shape), xp.zeros(shape))
    return Moments(plan.n, mean.reshape(shape), (var * plan.n).reshape(shape))


class PopulationStats:
    """Exact per-channel statistics over many batches, for inference (Ioffe & Szegedy 2015,
    Algorithm 2, steps 8-11): feed it training batches with the trained network frozen, then
    use ``running_mean`` / ``running_var`` with ``batch_norm(..., training=False)`` instead of
    the exponential moving average. Over all m values seen per channel::

        running_mean = sum(x) / m         running_var = sum((x - running_mean)**2) / (m - 1)

    (the pooled, unbiased variance; for equal-sized i.i.d. batches it estimates the same
    Var[x] as the paper's average of unbiased batch variances, with less noise). ``axis`` is
    the channel axis, as in :func:`normcore.batch_norm`; statistics are merged with
    :func:`merge_moments`, so batch sizes may differ. ``moments`` holds the merged Moments.

    >>> pop = PopulationStats(axis=1)
    >>> for x in batches: pop.update(x)
    >>> y = batch_norm(x, w, b, running_mean=pop.running_mean, running_var=pop.running_var,
    ...                training=False)
    """

    def __init__(self, axis=1):
        self.axis = axis
        self.moments = None

    def update(self, x):
        """Add a batch (channel axis ``self.axis``); returns self."""
        if not hasattr(x, "shape"):
            raise TypeError(f"x: expected an array, got {describe(x)}")
        shape = tuple(x.shape)
        ax = _channel_axis(shape, self.axis, "PopulationStats")
        if self.moments is not None and self.moments.mean.shape != (shape[ax],):
            raise ValueError(f"x: expected {self.moments.mean.shape[0]} channels along axis "
                             f"{self.axis} like the earlier batches, got shape {shape}")
        from . import welford as public_welford  # other array types dispatch there
        m = public_welford(x, axis=tuple(d for d in range(len(shape)) if d != ax))
        self.moments = m if self.moments is None else merge_moments(self.moments, m)
        return self

    def _merged(self):
        if self.moments is None:
            raise ValueError("PopulationStats: expected at least one update(x) before reading "
                             "the statistics, got none")
        return self.moments

    @property
    def running_mean(self):
        """Per-channel mean of every value seen (float64)."""
        return self._merged().mean

    @property
    def running_var(self):
        """Per-channel unbiased variance ``m2 / (m - 1)`` of every value seen (float64)."""
        return self._merged().var(correction=1)

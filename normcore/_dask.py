"""dask arrays: statistics merged in dask's tree reduction, BatchNorm chunk by chunk.

``welford`` / ``moments``: each chunk's Moments come from the Numba kernels (normcore.welford on
the chunk), and ``da.reduction`` merges them with merge_moments (Chan's formula) in its combine
and aggregate steps; the result stays lazy. ``batch_norm`` / ``batch_norm_forward``: the global
per-channel statistics as above, then ``map_blocks`` normalizes every chunk with them through
the kernels' eval-mode path (``y = (x - mean) * rstd * weight + bias``, rstd = 1 /
sqrt(var + eps)); y, mean and rstd are lazy.

Running statistics: NumPy (or CuPy) ``running_mean`` / ``running_var`` are updated in place,
as for NumPy input; that needs the statistics, so such a call computes them (one pass over x,
on the active scheduler or dask.distributed client) and y is then a lazy pass normalizing with
the computed values. dask running statistics are never computed: the call returns new lazy
ones in ``NormForward.running_mean`` / ``running_var``. dask is imported only here, when a
dask array arrives.
"""
import functools
import math
import numbers

import dask
import dask.array as da
import numpy as np

from ._backend import describe
from ._dtypes import CPU_DTYPES, stats_dtype
from ._norms import NormForward, _update_running
from ._plan import normalize_axis, plan_batch_norm
from ._validate import check_eps, check_momentum
from ._welford import Moments, merge_moments

# mean and m2 of one reduction, as one record array: a single lazy pass yields both
_RECORD = np.dtype([("mean", "f8"), ("m2", "f8")])


def _check_x(x):
    if not isinstance(x, da.Array):
        raise TypeError(f"x: expected a dask array like the other arguments, got {describe(x)}")
    if np.dtype(x.dtype) not in CPU_DTYPES:
        raise TypeError(f"x: expected a float16 or float32 or float64 array, got dtype "
                        f"{x.dtype}")


def _reduced_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else axis
    if not isinstance(axes, tuple):
        raise TypeError(f"axis: expected None, an int or a tuple of ints, got {axis!r}")
    reduced = tuple(sorted({normalize_axis(a, ndim) for a in axes}))
    if len(reduced) != len(axes):
        raise ValueError(f"axis: expected distinct axes, got {axis!r}")
    return reduced


# ------------------------------------------------------------ da.reduction's three steps


def _chunk_moments(x, axis, keepdims, computing_meta=False, **kw):
    """A chunk's Moments (kernels), reduced axes kept with length 1."""
    if computing_meta:
        return x
    from . import welford as public_welford
    m = public_welford(x, axis=axis)
    return Moments(m.count, np.expand_dims(m.mean, axis), np.expand_dims(m.m2, axis))


def _leaves(parts):
    if isinstance(parts, Moments):
        yield parts
    else:
        for p in parts:
            yield from _leaves(p)


def _combine(parts, axis, keepdims, computing_meta=False, **kw):
    return functools.reduce(merge_moments, _leaves(parts))


def _aggregate(parts, axis, keepdims, computing_meta=False, **kw):
    m = _combine(parts, axis, keepdims)
    out = np.empty(m.mean.shape if keepdims else np.squeeze(m.mean, axis).shape, _RECORD)
    out["mean"] = m.mean if keepdims else np.squeeze(m.mean, axis)
    out["m2"] = m.m2 if keepdims else np.squeeze(m.m2, axis)
    return out


def welford(x, axis=None):
    """:func:`normcore.welford` for a dask array: lazy mean and m2, an int count."""
    _check_x(x)
    reduced = _reduced_axes(axis, x.ndim)
    kept = x.ndim - len(reduced)
    r = da.reduction(x, _chunk_moments, _aggregate, combine=_combine, axis=reduced,
                     dtype=_RECORD, concatenate=False, meta=np.empty((0,) * kept, _RECORD))
    return Moments(math.prod(x.shape[d] for d in reduced), r["mean"], r["m2"])


def moments(x, axis=None, *, correction=0):
    """:func:`normcore.moments` for a dask array: lazy (mean, var)."""
    m = welford(x, axis)
    if isinstance(correction, bool) or not isinstance(correction, numbers.Real) \
            or not correction >= 0:
        raise ValueError(f"correction: expected a number >= 0, got {correction!r}")
    sdt = stats_dtype(x.dtype)
    mean = m.mean if m.count else m.mean * np.nan
    return mean.astype(sdt), m.var(correction).astype(sdt)


# ------------------------------------------------------------------------------ BatchNorm


def _per_channel(v, x, ax):
    """A (C,) vector as a dask array broadcasting over x's chunks along channel axis `ax`."""
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return da.asarray(v).reshape(shape).rechunk({ax: x.chunks[ax]})


def _normalize_block(x, mean, var, weight, bias, residual, *, eps, axis, activation):
    from . import batch_norm as public_batch_norm
    def vec(v):
        return None if v is None else v.reshape(-1)
    return public_batch_norm(x, vec(weight), vec(bias), running_mean=vec(mean),
                             running_var=vec(var), training=False, eps=eps, axis=axis,
                             activation=activation, residual=residual)


def _check_vector(name, v, C):
    if v is not None and tuple(v.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},), got {tuple(v.shape)}")


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                       residual=None, out=None):
    """:func:`normcore.batch_norm_forward` for a dask array (see the module docstring for when
    running statistics are computed)."""
    _check_x(x)
    plan = plan_batch_norm(tuple(x.shape), axis, 1)
    ax = normalize_axis(axis, x.ndim)
    C = x.shape[ax]
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vector(name, v, C)
    eps, momentum = check_eps(eps), check_momentum(momentum)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean: expected running_mean and running_var together, got "
                         "one of them")
    if out is not None:
        raise ValueError("out: expected None for a dask array (dask arrays are immutable), "
                         f"got {describe(out)}")
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual: expected shape {tuple(x.shape)} like x, got "
                         f"{tuple(residual.shape)}")
    if training:
        if plan.n <= 1:
            raise ValueError(f"x: expected more than 1 value per channel when training, got "
                             f"{plan.n} for x of shape {tuple(x.shape)}")
        m = welford(x, tuple(d for d in range(x.ndim) if d != ax))
        mean, var = m.mean, m.var()
        if running_mean is not None:
            unbiased = var * (m.count / (m.count - 1))
            if isinstance(running_mean, da.Array):
                running_mean = (1 - momentum) * running_mean + momentum * mean
                running_var = (1 - momentum) * running_var + momentum * unbiased
            else:
                mean, var, unbiased = dask.compute(mean, var, unbiased)
                _update_running(running_mean, running_var, mean, unbiased, momentum)
    elif running_mean is None:
        raise ValueError("running_mean: expected running statistics (running_mean and "
                         "running_var) in eval mode, got None")
    else:
        mean, var = running_mean, running_var
    if residual is not None:
        residual = da.asarray(residual).rechunk(x.chunks)
    vectors = [None if v is None else _per_channel(v, x, ax) for v in (mean, var, weight, bias)]
    y = da.map_blocks(_normalize_block, x, *vectors, residual, eps=eps, axis=ax,
                      activation=activation, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
    sdt = stats_dtype(x.dtype)
    rstd = 1.0 / da.sqrt(da.asarray(var).astype(np.float64) + eps)
    return NormForward(y, da.asarray(mean).astype(sdt), rstd.astype(sdt), running_mean,
                       running_var)


def batch_norm(x, weight=None, bias=None, **kwargs):
    """:func:`normcore.batch_norm` for a dask array: ``batch_norm_forward(...).y``."""
    return batch_norm_forward(x, weight, bias, **kwargs).y


_IMPLEMENTED = {"moments": moments, "welford": welford, "batch_norm": batch_norm,
                "batch_norm_forward": batch_norm_forward}


def call(name, bound):
    """Run public function `name` with dask arguments `bound` (an inspect.BoundArguments)."""
    if name not in _IMPLEMENTED:
        raise TypeError(f"x: dask arrays work with {', '.join(_IMPLEMENTED)}; {name} needs a "
                        f"NumPy, CuPy or other Array-API array")
    return _IMPLEMENTED[name](*bound.args, **bound.kwargs)

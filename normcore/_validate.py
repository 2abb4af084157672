"""Argument checks shared by the public functions. Each error names the argument, what was
expected and what came; the callers add the call's shapes where they matter."""
import math
import numbers

import numpy as np

from ._backend import backend_for, cpu_backend, describe
from ._dtypes import CPU_DTYPES


def check_input(name, x):
    """x: an array some backend serves, of a dtype it supports; returns that backend."""
    if type(x) is np.ndarray:
        # NumPy's own dtype objects: an identity test is the per-call fast path (a byte-swapped
        # or otherwise unusual but equal dtype takes the full checks)
        dt = x.dtype
        if dt is CPU_DTYPES[0] or dt is CPU_DTYPES[1] or dt is CPU_DTYPES[2]:
            return cpu_backend()
    be = backend_for(name, x)
    if np.dtype(x.dtype) not in be.dtypes:
        expected = " or ".join(d.name for d in be.dtypes)
        raise TypeError(f"{name}: expected a {expected} array, got dtype {x.dtype}")
    return be


def check_array(name, arr, be, x):
    """An array of x's type, on x's device."""
    if not isinstance(arr, be.array_type):
        raise TypeError(f"{name}: expected a {describe(x)} like x, got {describe(arr)}")
    if be.name == "cuda" and arr.device != x.device:
        raise ValueError(f"{name}: expected an array on x's device {x.device}, got one on "
                         f"{arr.device}")
    return arr


def plain_eps(eps):
    """eps when it is a float in (0, inf), the common case (without ABC checks), else None."""
    return eps if type(eps) is float and 0.0 < eps < math.inf else None


def plain_momentum(momentum):
    """momentum when it is a float in [0, 1], the common case (without ABC checks: 0.5 us),
    else None."""
    return momentum if type(momentum) is float and 0.0 <= momentum <= 1.0 else None


def check_eps(eps):
    if plain_eps(eps) is not None:
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum):
    if plain_momentum(momentum) is not None:
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    return float(momentum)


_F64 = np.dtype(np.float64)


class _Alias:
    """An __array_interface__ over a read-only NumPy array's memory that says it is writable;
    holds the array, so that the alias keeps it alive."""

    __slots__ = ("__array_interface__", "base")

    def __init__(self, a):
        face = dict(a.__array_interface__)
        face["data"] = (face["data"][0], False)
        self.__array_interface__, self.base = face, a


def writable(a):
    """A NumPy array as the CPU kernels take it: `a` itself, or where NumPy marks it read-only,
    a writable alias of its memory (the kernels only read it). Numba types a read-only array
    apart from a writable one and compiles every kernel afresh for it: a read-only x cost a
    BatchNorm forward 10 s of compilation on a machine where the writable one was cached."""
    if a.flags.writeable:
        return a
    return np.asarray(_Alias(a)) if a.size else np.empty_like(a)


def check_param(name, arr, shape, be, x, context, dtype=_F64):
    """weight / bias / statistics: None or a floating array of `shape` (a tuple) like x;
    returns it as a contiguous float64 vector (or None); NumPy arrays in `dtype` instead when
    given (the CPU kernels' compute dtype)."""
    if arr is None:
        return None
    if (type(arr) is np.ndarray and arr.shape == shape and arr.ndim == 1
            and be.array_type is np.ndarray and arr.flags.carray):
        # the common cases (carray: C-contiguous, aligned, writable): every check below passes;
        # nothing to convert, or a conversion
        if arr.dtype is dtype:
            return arr
        if arr.dtype.kind == "f":
            return arr.astype(dtype)
    check_array(name, arr, be, x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a real floating dtype, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} for {context}, got {arr.shape}")
    if be.name != "cpu":
        return be.xp.ascontiguousarray(arr, dtype=be.xp.float64).reshape(-1)
    vec = arr.astype(dtype, copy=False)      # per call: no copy when it has that dtype
    if vec.ndim != 1 or not vec.flags.c_contiguous:
        vec = np.ascontiguousarray(vec).reshape(-1)
    return writable(vec)


def _writable(arr):
    return getattr(arr.flags, "writeable", True)   # CuPy arrays have no read-only flag


def check_running(running_mean, running_var, shape, be, x, context, *, required, writable):
    """Both or neither running statistic; shapes `shape`; writable when they will be updated.
    Returns them as float64 vectors (or None, None)."""
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{missing}: expected an array together with {given}, got None")
    if running_mean is None:
        if required:
            raise ValueError("running_mean: expected running statistics (running_mean and "
                             "running_var) in eval mode, got None")
        return None, None
    mean = check_param("running_mean", running_mean, shape, be, x, context)
    var = check_param("running_var", running_var, shape, be, x, context)
    if writable:
        for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
            if not _writable(arr):
                raise ValueError(f"{name}: expected a writable array (updated in place), got a "
                                 f"read-only one")
    return mean, var


def check_out(name, out, be, x):
    """None or a writable array like x with x's shape and dtype."""
    if out is None:
        return None
    if (type(out) is np.ndarray and out.dtype is x.dtype and out.shape == x.shape
            and be.array_type is np.ndarray and out.flags.writeable):
        return out      # the common case: every check below passes
    check_array(name, out, be, x)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{name}: expected an array of shape {x.shape} and dtype {x.dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not _writable(out):
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return out


def check_like_x(name, arr, be, x):
    """dy: same array type, shape and dtype as x."""
    if type(arr) is type(x) is np.ndarray and arr.dtype is x.dtype and arr.shape == x.shape:
        return arr      # the common case: every check below passes
    check_array(name, arr, be, x)
    if arr.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} like x, got {arr.dtype}")
    if arr.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} like x, got {arr.shape}")
    return arr

"""Argument checks shared by the public functions. Each error names the argument, what was
expected and what came; the callers add the call's shapes where they matter."""
import math
import numbers

import numpy as np

from ._dtypes import check_input_dtype, check_real_floating


def _describe(obj):
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__name__


def is_cupy(obj):
    """True for a CuPy array, without importing CuPy."""
    return type(obj).__module__.split(".")[0] == "cupy"


def check_array(name, arr, like=None):
    """A NumPy array (TypeError otherwise); with `like`, of the same array type as `like`."""
    if not isinstance(arr, np.ndarray):
        if like is not None:
            raise TypeError(f"{name}: expected a {_describe(like)} like x, got {_describe(arr)}")
        raise TypeError(f"{name}: expected a NumPy array, got {_describe(arr)}")
    return arr


def check_input(name, arr):
    check_array(name, arr)
    check_input_dtype(name, arr.dtype)
    return arr


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    return float(momentum)


def check_param(name, arr, shape, x, context):
    """weight / bias / statistics: None or a floating NumPy array of `shape`; returns it as a
    contiguous float64 vector (or None)."""
    if arr is None:
        return None
    check_array(name, arr, like=x)
    check_real_floating(name, arr.dtype)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} for {context}, got "
                         f"{arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)


def check_running(running_mean, running_var, shape, x, context, *, required, writable):
    """Both or neither running statistic; shapes `shape`; writable when they will be updated."""
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ValueError(f"{missing}: expected an array together with {given}, got None")
    if running_mean is None:
        if required:
            raise ValueError("running_mean: expected running statistics (running_mean and "
                             "running_var) in eval mode, got None")
        return None, None
    mean = check_param("running_mean", running_mean, shape, x, context)
    var = check_param("running_var", running_var, shape, x, context)
    if writable:
        for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
            if not arr.flags.writeable:
                raise ValueError(f"{name}: expected a writable array (updated in place), got a "
                                 f"read-only one")
    return mean, var


def check_out(name, out, x):
    """None or a writable NumPy array with x's shape and dtype."""
    if out is None:
        return None
    check_array(name, out, like=x)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{name}: expected an array of shape {x.shape} and dtype {x.dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return out


def check_like_x(name, arr, x):
    """dy: same array type, shape and dtype as x."""
    check_array(name, arr, like=x)
    if arr.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} like x, got {arr.dtype}")
    if arr.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} like x, got {arr.shape}")
    return arr

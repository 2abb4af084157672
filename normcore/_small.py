"""Small and mid-sized LayerNorm and BatchNorm calls on NumPy arrays, on a path decided once
per (shape, dtype, axis).

A tiny call is all deciding: checking each argument, planning, choosing dtypes, buffers and
kernels took ~5 of the ~6 us of a LayerNorm (4, 64) forward, the kernel call ~1, and ~14 us
of a 39 us BatchNorm eval on (256, 1024). For the common call (C-contiguous NumPy arrays,
fresh outputs below the output cache's POOL_MIN or a contiguous out=, parameters and running
statistics as contiguous vectors, no epilogue) each of those decisions depends on x's shape
and dtype and the axis alone, so they are made once, by the general path's own planner, and
kept here. A call then only confirms that it is that common call (identity and shape tests
on the arrays it got) and goes to the kernels: a LayerNorm small enough for the calling
thread straight to its row kernel's serial twin, any other through _cpu's functions as the
general path does. For anything else these functions return None, having written nothing,
and the general path in _norms serves the call, checks included: nothing here raises for
bad input.
"""
import math

import numba
import numpy as np

from . import _cpu, _outputs
from ._cpu import _EMPTY
from ._dtypes import CPU_DTYPES, stats_dtype
from ._plan import plan_batch_norm, plan_layer_norm
from .kernels import cpu as K

_U16 = np.dtype(np.uint16)
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_EMPTY64 = _EMPTY[_F64]                     # no variance wanted
_MISSING = object()
# (norm, shape, dtype, axis) -> _Signature, or None for one the general path serves. Bounded:
# a program that sees ever new shapes starts again rather than grow it without end.
_signatures = {}
MAX_SIGNATURES = 512


class _Signature:
    """A call signature whose calls run the kernels' serial twins."""

    __slots__ = ("plan", "shape", "dtype", "bits", "compute", "dims", "param_shape",
                 "stats_shape", "flat_params", "flat_stats", "R", "ones", "zeros", "cells",
                 "none", "nbytes")

    def __init__(self, shape, dtype, plan):
        self.plan, self.shape, self.dtype = plan, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize
        self.bits = dtype.char == "e"       # float16 goes to the kernels as uint16 bits
        self.none = _EMPTY[_U16 if self.bits else dtype]   # an absent residual / y / dz
        self.compute = stats_dtype(dtype)   # the parameters' and saved statistics' dtype
        self.dims = (plan.O, plan.A, plan.C, plan.B, plan.P)
        self.param_shape, self.stats_shape = plan.param_shape, plan.stats_shape
        self.flat_params = len(plan.param_shape) == 1
        self.flat_stats = len(plan.stats_shape) == 1
        self.R = plan.O * plan.C
        self.cells = plan.C * plan.Q
        # weight / bias of None: the kernels only read them, so one pair serves every call
        self.ones = np.ones(self.cells, self.compute)
        self.zeros = np.zeros(self.cells, self.compute)


def _prepare(key):
    norm, shape, dtype, axis = key
    if not any(dtype == d for d in CPU_DTYPES):
        return None
    threads = numba.config.NUMBA_NUM_THREADS
    try:
        plan = (plan_layer_norm(shape, axis, threads) if norm == "layer"
                else plan_batch_norm(shape, axis, threads, dtype.itemsize))
    except (TypeError, ValueError):     # a bad axis: the general path says what is wrong
        return None
    if plan.O * plan.A * plan.C * plan.B == 0:
        return None
    if norm == "layer" and plan.serial and not plan.path == plan.backward_path == "rows":
        return None     # (the serial LayerNorm calls the row kernels itself)
    return _Signature(shape, dtype, plan)


def _signature(norm, x, axis):
    """x's prepared signature, or None."""
    key = (norm, x.shape, x.dtype, axis)
    try:
        rows = _signatures.get(key, _MISSING)
    except TypeError:                   # an unhashable axis (a list): the general path
        return None
    if rows is _MISSING:
        if len(_signatures) >= MAX_SIGNATURES:
            _signatures.clear()
        rows = _signatures[key] = _prepare(key)
    return rows


def _param(arr, rows):
    """weight / bias as the kernels take it (a contiguous vector in the compute dtype), or None
    when the general path must check it."""
    if not (type(arr) is np.ndarray and arr.shape == rows.param_shape
            and arr.flags.c_contiguous):
        return None
    if arr.dtype is not rows.compute:
        if arr.dtype.kind != "f":
            return None
        arr = arr.astype(rows.compute)
    return arr if rows.flat_params else arr.reshape(-1)


def _stat(arr, rows):
    """A saved statistic as the row backward reads it as is (the compute dtype), or None."""
    if not (type(arr) is np.ndarray and arr.dtype is rows.compute
            and arr.shape == rows.stats_shape and arr.flags.c_contiguous):
        return None
    return arr if rows.flat_stats else arr.reshape(-1)


def _output(out, rows):
    """A fresh output, `out` when the kernels can write it as it is, or None (the general
    path's)."""
    if out is None:
        # (POOL_MIN, which tests lower, and not the serial sizes, says what _outputs serves)
        return np.empty(rows.shape, rows.dtype) if rows.nbytes < _outputs.POOL_MIN else None
    if (type(out) is np.ndarray and out.dtype is rows.dtype and out.shape == rows.shape
            and out.flags.c_contiguous and out.flags.writeable):
        return out
    return None


def layer_norm_forward(x, weight, bias, axis, eps, out, result):
    """result(y, mean, rstd, None, None) for a common small call (x a NumPy array), or None."""
    rows = _signature("layer", x, axis)
    if rows is None or not x.flags.c_contiguous or not (type(eps) is float
                                                         and 0.0 < eps < math.inf):
        return None
    w = rows.ones if weight is None else _param(weight, rows)
    b = rows.zeros if bias is None else _param(bias, rows)
    y = _output(out, rows)
    if w is None or b is None or y is None:
        return None
    xf, yf = x.reshape(-1), y.reshape(-1)
    if rows.plan.serial:    # the tiny call, straight to the kernel (_cpu's layer is ~1 us)
        mean, rstd = np.empty(rows.R, rows.compute), np.empty(rows.R, rows.compute)
        if rows.bits:
            xf, yf = xf.view(_U16), yf.view(_U16)
        K.rows_forward.serial(xf, rows.none, False, True, *rows.dims, w, b, eps, yf, mean,
                              rstd, _EMPTY64, False)
    else:
        mean, rstd, _ = _cpu.forward_train(rows.plan, xf, yf, w, b, eps, rows.compute, False)
    if not rows.flat_stats:
        mean, rstd = mean.reshape(rows.stats_shape), rstd.reshape(rows.stats_shape)
    return result(y, mean, rstd, None, None)


def layer_norm_backward(dy, x, mean, rstd, weight, axis, dx_out, result):
    """result(dx, dweight, dbias) for a common small call (x a NumPy array) whose saved
    statistics have the dtype the forward gave them, or None."""
    rows = _signature("layer", x, axis)
    if (rows is None or type(dy) is not np.ndarray or dy.dtype is not x.dtype
            or dy.shape != x.shape or not (x.flags.c_contiguous and dy.flags.c_contiguous)):
        return None
    mean, rstd = _stat(mean, rows), _stat(rstd, rows)
    w = rows.ones if weight is None else _param(weight, rows)
    dx = _output(dx_out, rows)
    if mean is None or rstd is None or w is None or dx is None:
        return None
    dyf, xf, dxf = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    if rows.plan.serial:
        dbias, dweight = np.zeros((1, rows.cells)), np.zeros((1, rows.cells))
        if rows.bits:
            dyf, xf, dxf = dyf.view(_U16), xf.view(_U16), dxf.view(_U16)
        K.rows_backward.serial(dyf, rows.none, False, xf, *rows.dims, mean, rstd, w, False,
                               True, 1, dbias, dweight, dxf, rows.none, False)
        dweight, dbias = dweight[0], dbias[0]
    else:
        dweight, dbias = _cpu.backward(rows.plan, dyf, xf, dxf, mean, rstd, w, False)
    grad_dtype = rows.compute if weight is None else weight.dtype
    dweight, dbias = dweight.astype(grad_dtype), dbias.astype(grad_dtype)
    if not rows.flat_params:
        dweight, dbias = dweight.reshape(rows.param_shape), dbias.reshape(rows.param_shape)
    return result(dx, dweight, dbias)


def _running(running_mean, running_var, sig, update):
    """The running statistics in float64 for the kernels, or None when the general path must
    check them (or update them: the kernel writes contiguous float32 / float64 vectors that do
    not overlap)."""
    for r in (running_mean, running_var):
        if not (type(r) is np.ndarray and (r.dtype is _F32 or r.dtype is _F64)
                and r.shape == sig.param_shape and r.flags.c_contiguous
                and (r.flags.writeable or not update)):
            return None
    if update and np.may_share_memory(running_mean, running_var):
        return None
    return (running_mean if running_mean.dtype is _F64 else running_mean.astype(_F64),
            running_var if running_var.dtype is _F64 else running_var.astype(_F64))


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       axis, out, result):
    """result(y, mean, rstd, running_mean, running_var) for a common small call (x a NumPy
    array), the running statistics updated in training; or None, with nothing written."""
    sig = _signature("batch", x, axis)
    if (sig is None or not x.flags.c_contiguous or type(training) is not bool
            or not (type(eps) is float and 0.0 < eps < math.inf)
            or not (type(momentum) is float and 0.0 <= momentum <= 1.0)):
        return None
    w = sig.ones if weight is None else _param(weight, sig)
    b = sig.zeros if bias is None else _param(bias, sig)
    y = _output(out, sig)
    if w is None or b is None or y is None:
        return None
    plan = sig.plan
    if running_mean is None and running_var is None and training:
        old = None
    else:
        old = _running(running_mean, running_var, sig, training)
        if old is None:
            return None
    if not training:
        mean64, rstd64, mean, rstd = _cpu.frozen_stats(*old, eps, 1, sig.compute)
        _cpu.normalize(plan, x.reshape(-1), y.reshape(-1), mean64, rstd64, w, b)
        return result(y, mean, rstd, running_mean, running_var)
    n = plan.n
    if n <= 1:
        return None
    mean, rstd, var64 = _cpu.forward_train(plan, x.reshape(-1), y.reshape(-1), w, b, eps,
                                           sig.compute, old is not None)
    if old is not None and not _cpu.update_running(running_mean, running_var, old, mean,
                                                   var64, 1, n / (n - 1), momentum):
        return None         # not written: the general path computes it all again
    return result(y, mean, rstd, running_mean, running_var)


def batch_norm_backward(dy, x, mean, rstd, weight, training, axis, dx_out, result):
    """result(dx, dweight, dbias) for a common small call (x a NumPy array) whose saved
    statistics have the dtype the forward gave them, or None."""
    sig = _signature("batch", x, axis)
    if (sig is None or type(training) is not bool or type(dy) is not np.ndarray
            or dy.dtype is not x.dtype or dy.shape != x.shape
            or not (x.flags.c_contiguous and dy.flags.c_contiguous)):
        return None
    mean, rstd = _stat(mean, sig), _stat(rstd, sig)
    w = sig.ones if weight is None else _param(weight, sig)
    dx = _output(dx_out, sig)
    if mean is None or rstd is None or w is None or dx is None:
        return None
    dweight, dbias = _cpu.backward(sig.plan, dy.reshape(-1), x.reshape(-1), dx.reshape(-1),
                                   mean, rstd, w, not training)
    grad_dtype = sig.compute if weight is None else weight.dtype
    return result(dx, dweight.astype(grad_dtype), dbias.astype(grad_dtype))

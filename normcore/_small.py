"""Small and mid-sized normalization calls on NumPy arrays, on a path decided once per
(norm, shape, dtype, axis, groups).

A tiny call is all deciding: checking each argument, planning, choosing dtypes, buffers and
kernels took ~5 of the ~6 us of a LayerNorm (4, 64) forward, the kernel call ~1, and ~14 us
of a 39 us BatchNorm eval on (256, 1024). For the common call (C-contiguous NumPy arrays,
fresh outputs, from the output cache from its POOL_MIN up, or a contiguous out=, parameters
and running statistics as contiguous vectors, no epilogue) each of those decisions depends on
the norm, x's shape and dtype, the axis and the group count alone, so they are made once, by the
general path's own planner, and kept here. A call then only confirms that it is that common
call (identity and shape tests on the arrays it got) and goes to the kernels: a call small
enough for the calling thread whose plan takes the row kernels straight to their serial
twins, any other through _cpu's functions as the general path does. For anything else these
functions return None, having written nothing, and the general path in _norms serves the
call, checks included: nothing here raises for bad input.
"""
import math

import numba
import numpy as np

from . import _cpu, _outputs
from ._cpu import _EMPTY, _EMPTY64
from ._dtypes import CPU_DTYPES, stats_dtype
from ._plan import plan_batch_norm, plan_group_norm, plan_instance_norm, plan_layer_norm
from ._validate import plain_eps, plain_momentum, writable
from .kernels import cpu as K

_U16 = np.dtype(np.uint16)
_MISSING = object()
# (norm, shape, dtype, axis, num_groups) -> _Signature, or None for one the general path
# serves. Bounded: a program that sees ever new shapes starts again rather than grow it
# without end.
_signatures = {}
MAX_SIGNATURES = 512


class _Signature:
    """What the calls of one signature need, decided once."""

    __slots__ = ("plan", "shape", "dtype", "bits", "compute", "dims", "row_dims", "short_cells",
                 "param_shape", "stats_shape", "flat_params", "flat_stats", "R", "ones", "zeros",
                 "cells", "none", "nbytes", "direct", "direct_backward", "zero_stats", "rms_eps",
                 "rows_forward", "rows_backward", "forward_entry", "backward_entry")

    def __init__(self, shape, dtype, plan):
        self.plan, self.shape, self.dtype = plan, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize
        self.bits = dtype.char == "e"       # float16 goes to the kernels as uint16 bits
        self.none = _EMPTY[_U16 if self.bits else dtype]   # an absent residual / y / dz
        self.compute = stats_dtype(dtype)   # the parameters' and saved statistics' dtype
        self.dims = (plan.O, plan.A, plan.C, plan.B, plan.P)
        self.row_dims = self.dims[:4] + (_cpu.row_period(plan),)    # rows_forward's
        # the row kernels take the parameters repeated (_cpu.row_cells); kept here so that the
        # other calls skip two function calls
        self.short_cells = plan.short_cells
        self.param_shape, self.stats_shape = plan.param_shape, plan.stats_shape
        self.flat_params = len(plan.param_shape) == 1
        self.flat_stats = len(plan.stats_shape) == 1
        self.R = plan.O * plan.C
        self.cells = plan.C * plan.Q
        # weight / bias of None and RMSNorm's mean: the kernels only read them, so one array
        # serves every call (made by the first call that needs it: see _constant)
        self.ones = self.zeros = self.zero_stats = None
        self.rms_eps = float(np.finfo(dtype).eps)
        # a call for the calling thread on the row kernels calls their serial twins itself:
        # _cpu's layer cost ~1 us of a 4 us LayerNorm call
        self.direct = plan.serial and plan.path == "rows"
        self.direct_backward = plan.serial and plan.backward_path == "rows"
        # their serial twins (no residual, no ReLU)
        self.rows_forward = _cpu.rows_forward_kernel(
            plan.A, plan.B, self.row_dims[4], dtype.itemsize, False, False, 0).serial
        self.rows_backward = _cpu.rows_backward_kernel(
            plan.A, plan.C, plan.B, plan.P, False, False, plan.short_cells).serial
        # what the calls call: the compiled function each runs, from its first call on
        self.forward_entry = _compiled_on_first_call(self, "forward_entry", self.rows_forward)
        self.backward_entry = _compiled_on_first_call(self, "backward_entry",
                                                      self.rows_backward)


def _plan(norm, shape, dtype, axis, groups):
    threads = numba.config.NUMBA_NUM_THREADS
    if norm in ("layer", "rms"):
        return plan_layer_norm(shape, axis, threads)
    if norm == "batch":
        return plan_batch_norm(shape, axis, threads, dtype.itemsize)
    if norm == "instance":
        return plan_instance_norm(shape, axis, threads)
    return plan_group_norm(shape, groups, axis, threads, dtype.itemsize)


def _prepare(key):
    norm, shape, dtype, axis, groups = key
    if not any(dtype is d for d in CPU_DTYPES):     # (an equal dtype with metadata: general)
        return None
    try:
        plan = _plan(norm, shape, dtype, axis, groups)
    except (TypeError, ValueError):     # a bad axis: the general path says what is wrong
        return None
    if plan.O * plan.A * plan.C * plan.B == 0:
        return None
    return _Signature(shape, dtype, plan)


def _signature(norm, x, axis, groups=None):
    """x's prepared signature, or None. The axis an int or a tuple of ints and groups an int
    (or None), exactly: keys that compare equal to those (True, 1.0, np.int64(1)) are for the
    general path to accept or refuse."""
    if type(axis) is not int and not (type(axis) is tuple and _ints(axis)):
        return None
    if groups is not None and type(groups) is not int:
        return None
    key = (norm, x.shape, x.dtype, axis, groups)
    sig = _signatures.get(key, _MISSING)
    if sig is _MISSING:
        if len(_signatures) >= MAX_SIGNATURES:
            _signatures.clear()
        sig = _signatures[key] = _prepare(key)
    return sig if sig is not None and x.dtype is sig.dtype else None


def _ints(axes):
    for a in axes:
        if type(a) is not int:
            return False
    return True


def _constant(sig, name):
    """sig's shared ones / zeros (parameter cells) or zero_stats (statistics), made once."""
    arr = getattr(sig, name)
    if arr is None:
        arr = (np.zeros(sig.R, sig.compute) if name == "zero_stats"
               else np.full(sig.cells, name == "ones", sig.compute))
        setattr(sig, name, arr)
    return arr


def _param(arr, sig):
    """weight / bias as the kernels take it (a contiguous vector in the compute dtype), or None
    when the general path must check it."""
    if not (type(arr) is np.ndarray and arr.shape == sig.param_shape):
        return None
    if not arr.flags.carray:
        arr = _contiguous(arr)
        if arr is None:
            return None
    if arr.dtype is not sig.compute:
        if arr.dtype.kind != "f":
            return None
        arr = arr.astype(sig.compute)
    return arr if sig.flat_params else arr.ravel()


def _stat(arr, sig):
    """A saved statistic as the row backward reads it as is (the compute dtype), or None."""
    if not (type(arr) is np.ndarray and arr.dtype is sig.compute
            and arr.shape == sig.stats_shape):
        return None
    if not arr.flags.carray:
        arr = _contiguous(arr)
        if arr is None:
            return None
    return arr if sig.flat_stats else arr.ravel()


def _output(out, sig):
    """A fresh output, `out` when the kernels can write it as it is, or None (the general
    path's)."""
    if out is None:
        # (POOL_MIN, which tests lower, says what _outputs serves; np.empty itself below it
        # skips _outputs.empty's ~0.3 us of size arithmetic on tiny calls)
        if sig.nbytes < _outputs.POOL_MIN:
            return np.empty(sig.shape, sig.dtype)
        return _outputs.empty(sig.shape, sig.dtype)
    if (type(out) is np.ndarray and out.dtype is sig.dtype and out.shape == sig.shape
            and out.flags.carray):
        return out
    return None


def _running(running_mean, running_var, sig, update):
    """The running statistics as they are, or None when the general path must check them (or
    update them: the kernel writes contiguous float32 / float64 vectors that do not
    overlap)."""
    pair = (running_mean, running_var)
    if not (_cpu.updatable(*pair) if update else _cpu.kernel_vectors(*pair)):
        return None
    for r in pair:
        if r.shape != sig.param_shape:
            return None
    if running_mean.flags.writeable and running_var.flags.writeable:
        return pair
    return None if update else (writable(running_mean), writable(running_var))


def _shaped(sig, y, mean, rstd):
    """(y, mean, rstd), the statistics in their shape."""
    if sig.flat_stats:
        return y, mean, rstd
    return y, mean.reshape(sig.stats_shape), rstd.reshape(sig.stats_shape)


def _statistics(sig, x, y, w, b, eps, centered, want_var=False):
    """Batch statistics and y = normalize(x): (mean, rstd, var64 or None), flat."""
    # ravel, here and below, of arrays known C-contiguous: a view, as reshape(-1) gives, for
    # half its ~0.2 us
    xf, yf = x.ravel(), y.ravel()
    if not sig.direct:
        return _cpu.forward_train(sig.plan, xf, yf, w, b, eps, sig.compute, want_var,
                                  centered=centered)
    mean, rstd = np.empty(sig.R, sig.compute), np.empty(sig.R, sig.compute)
    var = np.empty(sig.R) if want_var else _EMPTY64
    if sig.bits:
        xf, yf = xf.view(_U16), yf.view(_U16)
    if sig.short_cells:
        w, b = _cpu.row_cells(sig.plan, w), _cpu.row_cells(sig.plan, b)
    sig.forward_entry(xf, sig.none, False, centered, *sig.row_dims, w, b, eps, yf, mean, rstd,
                      var, False)
    return mean, rstd, (var if want_var else None)


def _compiled_on_first_call(sig, name, kernel):
    """A stand-in for sig.<name> whose first call runs the Numba dispatcher `kernel` (which
    compiles or loads what the arguments need) and puts the compiled function it ran
    (_entry_point) in its own place."""
    def first_call(*args):
        result = kernel(*args)
        setattr(sig, name, _entry_point(kernel, args))
        return result
    return first_call


def _entry_point(kernel, args):
    """The compiled function that the Numba dispatcher `kernel` ran for `args`, for later calls
    of the same signature: the dispatcher types each of the row kernels' 17 arguments on every
    call (~0.7 us of a 10 us (4, 64) LayerNorm forward). Each argument's type is the same on
    every direct call of one signature: the dtype and shape decide the arrays' dtypes and
    dims, and the arrays are all C-contiguous, aligned and writable (_contiguous, _output),
    the scalars Python bools, ints and floats (plain_eps). `kernel` itself where it has no
    such function (NUMBA_DISABLE_JIT)."""
    try:
        return kernel.overloads[tuple(numba.typeof(a) for a in args)].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return kernel


def _contiguous(a):
    """A C-contiguous, aligned NumPy array as the kernels take it (a writable alias of a
    read-only one: normcore._validate.writable), or None. Called where a.flags.carray
    (C-contiguous, aligned and writable: one attribute, as cheap as c_contiguous) is false."""
    flags = a.flags
    return writable(a) if flags.c_contiguous and flags.aligned else None


def _operands(sig, x, weight, bias, out):
    """(x, w, b, y) as the kernels take them for a C-contiguous x, or None."""
    if not x.flags.carray:
        x = _contiguous(x)
        if x is None:
            return None
    w = _constant(sig, "ones") if weight is None else _param(weight, sig)
    b = _constant(sig, "zeros") if bias is None else _param(bias, sig)
    y = _output(out, sig)
    return None if w is None or b is None or y is None else (x, w, b, y)


def _forward(sig, x, weight, bias, eps, out, centered=True):
    """(y, mean, rstd) of a common call with batch statistics and no running ones, or None."""
    operands = None if sig is None or eps is None else _operands(sig, x, weight, bias, out)
    if operands is None:
        return None
    x, w, b, y = operands
    mean, rstd, _ = _statistics(sig, x, y, w, b, eps, centered)
    return _shaped(sig, y, mean, rstd)


def _forward_with_running(sig, x, weight, bias, running_mean, running_var, batch_stats,
                          momentum, eps, out):
    """(y, mean, rstd) of a common BatchNorm / InstanceNorm call, the running statistics
    updated when given with batch statistics; or None, with nothing written."""
    if (sig is None or type(batch_stats) is not bool or eps is None
            or plain_momentum(momentum) is None):
        return None
    operands = _operands(sig, x, weight, bias, out)
    if operands is None:
        return None
    x, w, b, y = operands
    plan = sig.plan
    if running_mean is None and running_var is None and batch_stats:
        old = None
    else:
        old = _running(running_mean, running_var, sig, batch_stats)
        if old is None:
            return None
    if not batch_stats:
        # the frozen statistics read float32 running statistics as they are (exactly, as
        # float64): two conversions fewer per call than the general path's
        xf, yf = x.ravel(), y.ravel()
        if not plan.serial:
            mean64, rstd64, mean, rstd = _cpu.frozen_stats(*old, eps, plan.O, sig.compute)
            _cpu.normalize(plan, xf, yf, mean64, rstd64, w, b)
            return _shaped(sig, y, mean, rstd)
        mean, rstd = np.empty(sig.R, sig.compute), np.empty(sig.R, sig.compute)
        if sig.bits:
            xf, yf = xf.view(_U16), yf.view(_U16)
        K.frozen_normalize(xf, plan.normalize_path == "columns", *sig.dims, plan.K, *old, eps, w,
                           b, yf, mean, rstd)
        return _shaped(sig, y, mean, rstd)
    n = plan.n
    if n <= 1:
        return None
    mean, rstd, var64 = _statistics(sig, x, y, w, b, eps, True, old is not None)
    if old is not None:
        # _running made sure before anything was written that the kernel can update them.
        # The kernel reads each channel's old values (exactly, as float64: what the general
        # path's float64 copies hold) before it writes the new ones, so the running statistics
        # are their own `old`: two conversions fewer per call.
        K.update_running(running_mean, running_var, running_mean, running_var, mean, var64,
                         plan.O, n / (n - 1), momentum)
    return _shaped(sig, y, mean, rstd)


def _backward(sig, dy, x, mean, rstd, weight, frozen, dx_out, centered=True):
    """(dx, dweight, dbias) of a common call whose saved statistics have the dtype the forward
    gave them, or None."""
    if (sig is None or type(frozen) is not bool or type(dy) is not np.ndarray
            or dy.dtype is not x.dtype or dy.shape != x.shape):
        return None
    if not x.flags.carray:
        x = _contiguous(x)
    if not dy.flags.carray:
        dy = _contiguous(dy)
    if x is None or dy is None:
        return None
    mean = _stat(mean, sig) if centered else _constant(sig, "zero_stats")
    rstd = _stat(rstd, sig)
    w = _constant(sig, "ones") if weight is None else _param(weight, sig)
    dx = _output(dx_out, sig)
    if mean is None or rstd is None or w is None or dx is None:
        return None
    dyf, xf, dxf = dy.ravel(), x.ravel(), dx.ravel()
    if sig.direct_backward:
        dbias, dweight = np.zeros((1, sig.cells)), np.zeros((1, sig.cells))
        if sig.bits:
            dyf, xf, dxf = dyf.view(_U16), xf.view(_U16), dxf.view(_U16)
        sig.backward_entry(dyf, sig.none, False, xf, *sig.dims, mean, rstd, w,
                           _cpu.row_cells(sig.plan, w) if sig.short_cells else w, frozen,
                           centered, 1, dbias, dweight, dxf, sig.none, False)
        dweight, dbias = dweight[0], dbias[0]
    else:
        dweight, dbias = _cpu.backward(sig.plan, dyf, xf, dxf, mean, rstd, w, frozen,
                                       centered=centered)
    grad_dtype = sig.compute if weight is None else weight.dtype
    dweight, dbias = dweight.astype(grad_dtype), dbias.astype(grad_dtype)
    if not sig.flat_params:
        dweight, dbias = dweight.reshape(sig.param_shape), dbias.reshape(sig.param_shape)
    return dx, dweight, dbias


# The calls _norms makes, x a NumPy array and no epilogue: the result, or None.

def layer_norm_forward(x, weight, bias, axis, eps, out):
    return _forward(_signature("layer", x, axis), x, weight, bias, plain_eps(eps), out)


def layer_norm_backward(dy, x, mean, rstd, weight, axis, dx_out):
    return _backward(_signature("layer", x, axis), dy, x, mean, rstd, weight, False, dx_out)


def rms_norm_forward(x, weight, axis, eps, out):
    sig = _signature("rms", x, axis)
    eps = plain_eps(eps) if eps is not None else sig.rms_eps if sig is not None else None
    return _forward(sig, x, weight, None, eps, out, centered=False)


def rms_norm_backward(dy, x, rstd, weight, axis, dx_out):
    return _backward(_signature("rms", x, axis), dy, x, None, rstd, weight, False, dx_out,
                     centered=False)


def group_norm_forward(x, num_groups, weight, bias, axis, eps, out):
    return _forward(_signature("group", x, axis, num_groups), x, weight, bias, plain_eps(eps), out)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight, axis, dx_out):
    return _backward(_signature("group", x, axis, num_groups), dy, x, mean, rstd, weight,
                     False, dx_out)


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       axis, out):
    return _forward_with_running(_signature("batch", x, axis), x, weight, bias, running_mean,
                                 running_var, training, momentum, plain_eps(eps), out)


def batch_norm_backward(dy, x, mean, rstd, weight, training, axis, dx_out):
    frozen = not training if type(training) is bool else None
    return _backward(_signature("batch", x, axis), dy, x, mean, rstd, weight, frozen, dx_out)


def instance_norm_forward(x, weight, bias, running_mean, running_var, use_input_stats,
                          momentum, eps, axis, out):
    return _forward_with_running(_signature("instance", x, axis), x, weight, bias,
                                 running_mean, running_var, use_input_stats, momentum,
                                 plain_eps(eps), out)


def instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats, axis, dx_out):
    frozen = not use_input_stats if type(use_input_stats) is bool else None
    return _backward(_signature("instance", x, axis), dy, x, mean, rstd, weight, frozen,
                     dx_out)

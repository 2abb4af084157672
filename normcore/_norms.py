"""BatchNorm, LayerNorm, InstanceNorm and GroupNorm: drop-ins and forward/backward pairs.

For one statistic (the elements sharing (o, c) in the canonical view, n of them)::

    mean  = sum(x) / n            var = sum((x - mean)**2) / n        (biased)
    rstd  = 1 / sqrt(var + eps)   xhat = (x - mean) * rstd
    y     = xhat * weight + bias

    dbias   = sum(dy)             dweight = sum(dy * xhat)    (over all but the parameter axes)
    dx      = rstd * (dy * weight - mean(dy * weight) - xhat * mean(dy * weight * xhat))
    dx      = rstd * dy * weight                    (frozen statistics: eval-mode BN / IN)

Running statistics (training BN, and IN when given): new = (1 - momentum) * old +
momentum * batch, with the batch variance made unbiased by n / (n - 1).

Fused epilogue (every drop-in and *_forward): ``y = relu(xhat * weight + bias + residual)``
with ``activation="relu"`` and ``residual=z``, in the same pass over memory. The matching
*_backward takes ``activation`` and the forward's output ``y`` (ReLU's gradient is y > 0) and,
with ``residual=True``, also returns the residual's gradient as ``grads.dresidual``.
"""
from collections import namedtuple

import numba
import numpy as np

from . import _outputs, _small
from ._dtypes import stats_dtype
from ._plan import (plan_batch_norm, plan_group_norm, plan_instance_norm, plan_layer_norm)
from ._validate import (check_eps, check_input, check_like_x, check_momentum, check_out,
                        check_param, check_running, writable)

_F64 = np.dtype(np.float64)

# (the small path builds it with tuple.__new__: namedtuple's own __new__ is a Python call,
# 0.2-0.5 us of a 5 us LayerNorm (4, 64))
NormForward = namedtuple("NormForward", "y mean rstd running_mean running_var")
NormForward.__doc__ = """Result of a *_forward call: the output y, the saved statistics mean and
rstd (float32, float64 for float64 input), and the running statistics (None when not given)."""


class NormBackward(namedtuple("NormBackward", "dx dweight dbias")):
    """Result of a *_backward call: gradients of x, weight and bias. Unpacks as
    ``dx, dweight, dbias``; ``dresidual`` is the residual's gradient when the backward was
    asked for it (``residual=True``), else None."""

    dresidual = None

    def __new__(cls, dx, dweight, dbias, dresidual=None):
        self = tuple.__new__(cls, (dx, dweight, dbias))     # not namedtuple's __new__: 0.3 us
        if dresidual is not None:
            self.dresidual = dresidual
        return self

    def __reduce__(self):
        return (NormBackward, (*self, self.dresidual))



def _threads():
    # The pool's size, not numba.get_num_threads(): that costs ~5 us a call, and a plan made
    # for more threads than a caller allows is only split finer.
    return numba.config.NUMBA_NUM_THREADS


def _cached(be, x):
    """Whether a fresh array like x comes from normcore._outputs' cache (large NumPy ones;
    smaller sizes are glibc's heap's, which reuses them already)."""
    return be.name == "cpu" and x.nbytes >= _outputs.POOL_MIN


def _empty(be, x):
    """A fresh array of x's shape and dtype."""
    return _outputs.empty(x.shape, x.dtype) if _cached(be, x) else be.xp.empty(x.shape, x.dtype)


def _flat(be, x):
    if type(x) is np.ndarray:           # without ascontiguousarray's 0.3 us
        flags = x.flags
        if flags.carray:                # C-contiguous, aligned and writable
            return x.reshape(-1)
        if flags.c_contiguous:
            return writable(x).reshape(-1)
    if _cached(be, x):
        # the contiguous copy of a large strided input lives for the call only: from the
        # output cache, it is not page-faulted in afresh every call
        copy = _outputs.empty(x.shape, x.dtype)
        np.copyto(copy, x)
        return copy.reshape(-1)
    flat = be.xp.ascontiguousarray(x).reshape(-1)    # a view of a read-only np.memmap stays so
    return writable(flat) if be.name == "cpu" else flat


def _output(be, out, x):
    """(result array, flat contiguous buffer the kernels write into)."""
    if out is None:
        res = _empty(be, x)
        return res, res.reshape(-1)
    if out.flags.c_contiguous:
        return out, out.reshape(-1)
    return out, be.xp.empty(x.size, x.dtype)


def _finish(be, res, buf):
    """Copy the kernels' buffer into a non-contiguous `out`; return the result."""
    if not res.flags.c_contiguous:
        be.xp.copyto(res, buf.reshape(res.shape))
    return res


def _param_dtype(be, x):
    """weight / bias go to the CPU kernels in their compute dtype: float32 for float16 and
    float32 data (one conversion per call instead of two); float64 elsewhere."""
    return stats_dtype(x.dtype) if be.name == "cpu" else _F64


def _affine(plan, be, x, weight, bias, context):
    dt = _param_dtype(be, x)
    w = check_param("weight", weight, plan.param_shape, be, x, context, dt)
    b = check_param("bias", bias, plan.param_shape, be, x, context, dt)
    if w is None or b is None:
        cells = plan.C * plan.Q
        w = be.xp.ones(cells, dt) if w is None else w
        b = be.xp.zeros(cells, dt) if b is None else b
    return w, b


class _context(tuple):
    """(x's shape, name, value, name, value, ...): the call's shapes for error messages,
    formatted only when an error is raised (a tuple: half the cost of an object per call)."""

    __slots__ = ()

    def __str__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in zip(self[1::2], self[2::2]))
        return f"x of shape {self[0]}" + (f" with {args}" if args else "")

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def _epilogue(activation, residual, be, x):
    """(relu, flat residual or None) from the activation / residual keywords."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    if residual is not None:
        check_like_x("residual", residual, be, x)
        residual = _flat(be, residual)
    return activation == "relu", residual


def _forward(plan, be, x, w, b, eps, out, frozen_stats=None, want_var=False,
             epilogue=(False, None), centered=True):
    """Shared forward: frozen_stats = (mean64, rstd64, mean, rstd) per statistic (float64 for
    the kernels, and the saved ones in the stats dtype), or None for batch stats. Returns
    (y, mean, rstd, var64) with saved stats in the stats dtype, shaped per plan."""
    xp = be.xp
    sdt = stats_dtype(x.dtype)
    relu, z = epilogue
    y, ybuf = _output(be, out, x)
    R = plan.O * plan.C
    if frozen_stats is not None:
        mean64, rstd64, mean, rstd = frozen_stats
        if x.size:
            be.ops.normalize(plan, _flat(be, x), ybuf, mean64, rstd64, w, b, z=z, relu=relu)
        var64 = None
    elif x.size:
        mean, rstd, var64 = be.ops.forward_train(plan, _flat(be, x), ybuf, w, b, eps, sdt,
                                                 want_var, z=z, relu=relu, centered=centered)
    else:  # statistics of empty sets
        mean = xp.full(R, xp.nan, sdt)
        rstd = xp.full(R, xp.nan, sdt)
        var64 = xp.full(R, xp.nan)
    if len(plan.stats_shape) != 1:      # else already (O * C,): a reshape is 0.1 us
        mean, rstd = mean.reshape(plan.stats_shape), rstd.reshape(plan.stats_shape)
    return (y if out is None else _finish(be, y, ybuf)), mean, rstd, var64


def _backward(plan, be, dy, x, mean, rstd, weight, frozen, dx_out, context, *,
              activation=None, y=None, residual=False, centered=True):
    check_like_x("dy", dy, be, x)
    check_out("dx_out", dx_out, be, x)
    relu = activation is not None and _epilogue(activation, None, be, x)[0]
    if relu:
        if y is None:
            raise ValueError("y: expected the forward's output (ReLU's gradient needs it) "
                             "with activation='relu', got None")
        check_like_x("y", y, be, x)
    dt = _param_dtype(be, x)
    # the saved statistics as they are when they have the parameter dtype (the CPU kernels'
    # compute dtype: float32 for float16 / float32 data), else in float64 (given in float64,
    # the part of the mean float32 cannot hold still reaches dx)
    sdt = dt if (getattr(rstd, "dtype", None) is dt
                 and (not centered or getattr(mean, "dtype", None) is dt)) else _F64
    rstd = check_param("rstd", rstd, plan.stats_shape, be, x, context, sdt)
    mean = (check_param("mean", mean, plan.stats_shape, be, x, context, sdt) if centered
            else be.xp.zeros(plan.O * plan.C, sdt))
    w = check_param("weight", weight, plan.param_shape, be, x, context, dt)
    if w is None:
        w = be.xp.ones(plan.C * plan.Q, dt)
    dx, dxbuf = _output(be, dx_out, x)
    dz = _empty(be, x) if residual and relu else None
    if x.size:
        dweight, dbias = be.ops.backward(
            plan, _flat(be, dy), _flat(be, x), dxbuf, mean, rstd, w, frozen,
            y=_flat(be, y) if relu else None, relu=relu,
            dz=None if dz is None else dz.reshape(-1), centered=centered)
    else:
        dweight, dbias = be.xp.zeros(w.size), be.xp.zeros(w.size)
        if dz is not None:
            dz[...] = 0
    if residual and not relu:
        dz = dy          # the residual enters y linearly
    gdt = weight.dtype if weight is not None else stats_dtype(x.dtype)
    dweight, dbias = dweight.astype(gdt), dbias.astype(gdt)
    if len(plan.param_shape) != 1:      # else already (C * Q,)
        dweight, dbias = dweight.reshape(plan.param_shape), dbias.reshape(plan.param_shape)
    return NormBackward(dx if dx_out is None else _finish(be, dx, dxbuf), dweight, dbias, dz)


def _forward_with_running(plan, be, x, weight, bias, running_mean, running_var, *, eps,
                          momentum, activation, residual, out, batch_stats, too_few, context):
    """BatchNorm / InstanceNorm forward: checks the arguments, then uses the batch statistics
    (updating the running ones, when given, with their average over the O samples) or the
    running statistics (frozen).

    too_few: what a statistic of fewer than 2 values lacks with batch statistics, for the
    error message (formatted only when raised).
    """
    w, b = _affine(plan, be, x, weight, bias, context)
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    rm, rv = check_running(running_mean, running_var, plan.param_shape, be, x, context,
                           required=not batch_stats, writable=batch_stats)
    epilogue = _epilogue(activation, residual, be, x)
    check_out("out", out, be, x)
    O = plan.O
    if batch_stats and rm is not None and O == 0:
        raise ValueError(f"x: expected at least one sample to update the running statistics "
                         f"with, got none for {context}")
    if not batch_stats:
        sdt = stats_dtype(x.dtype)
        if be.name == "cpu":    # one kernel call instead of five to seven array operations
            frozen = be.ops.frozen_stats(rm, rv, eps, O, sdt)
        else:
            rstd = 1.0 / be.xp.sqrt(rv + eps)
            mean64, rstd64 = (rm, rstd) if O == 1 else (be.xp.tile(rm, O), be.xp.tile(rstd, O))
            frozen = (mean64, rstd64, mean64.astype(sdt), rstd64.astype(sdt))
        y, mean, rstd, _ = _forward(plan, be, x, w, b, eps, out, frozen_stats=frozen,
                                    epilogue=epilogue)
        return NormForward(y, mean, rstd, running_mean, running_var)
    if plan.n <= 1:
        raise ValueError(f"x: expected more than 1 {too_few}, got {plan.n} for {context}")
    y, mean, rstd, var64 = _forward(plan, be, x, w, b, eps, out, want_var=rm is not None,
                                    epilogue=epilogue)
    if rm is not None:
        # written only now, after every check has passed: a call that raises modifies nothing
        n = plan.n
        unbias = n / (n - 1)
        if be.name == "cpu" and be.ops.update_running(running_mean, running_var, (rm, rv),
                                                      mean.reshape(-1), var64, O, unbias,
                                                      momentum):
            return NormForward(y, mean, rstd, running_mean, running_var)
        batch_mean = mean.astype(be.xp.float64).reshape(-1)          # InstanceNorm: (N, C)
        batch_var = var64 * unbias
        if O > 1:       # InstanceNorm: the average over the samples (a mean over one: 3.6 us)
            batch_mean = batch_mean.reshape(O, -1).mean(0)
            batch_var = batch_var.reshape(O, -1).mean(0)
        _update_running(running_mean, running_var, batch_mean, batch_var, momentum,
                        old=(rm, rv))
    return NormForward(y, mean, rstd, running_mean, running_var)


def _update_running(running_mean, running_var, batch_mean, batch_var_unbiased, momentum, *,
                    old=None):
    """new = (1 - momentum) * old + momentum * batch, in place, computed before writing.
    old: the running statistics already converted to batch_mean's dtype (check_running's
    float64 vectors), else converted here."""
    if old is None:
        old = (running_mean.astype(batch_mean.dtype), running_var.astype(batch_mean.dtype))
    keep = 1.0 - momentum
    new_mean = old[0] * keep        # a new array: old[0] may be running_mean itself
    new_mean += momentum * batch_mean
    new_var = old[1] * keep
    new_var += momentum * batch_var_unbiased
    running_mean[...] = new_mean
    running_var[...] = new_var


# ---------------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------------


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                       residual=None, out=None):
    """BatchNorm forward with saved statistics (``torch.ops.aten.native_batch_norm``).

    Statistics per channel (``x.shape[axis]``) over every other axis::

        mean = mean(x), var = mean((x - mean)**2), rstd = 1 / sqrt(var + eps)
        y = (x - mean) * rstd * weight + bias        [+ residual] [relu]

    Training (``training=True``) uses the batch statistics and, when ``running_mean`` /
    ``running_var`` are given, updates them in place: ``new = (1 - momentum) * old +
    momentum * batch`` with the unbiased batch variance. Eval (``training=False``) normalizes
    with the running statistics. ``axis=1`` is channels-first (N, C, *S), ``axis=-1``
    channels-last. Returns ``NormForward(y, mean, rstd, running_mean, running_var)``; mean and
    rstd have shape (C,).

    >>> f = batch_norm_forward(x, w, b, running_mean=rm, running_var=rv)
    """
    if type(x) is np.ndarray and activation is None and residual is None:
        f = _small.batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                                      momentum, eps, axis, out)
        if f is not None:
            return tuple.__new__(NormForward, f + (running_mean, running_var))
    be = check_input("x", x)
    plan = plan_batch_norm(x.shape, axis, _threads(), x.dtype.itemsize)
    return _forward_with_running(
        plan, be, x, weight, bias, running_mean, running_var, eps=eps, momentum=momentum,
        activation=activation, residual=residual, out=out, batch_stats=bool(training),
        too_few="value per channel when training", context=_context((x.shape, "axis", axis)))


def batch_norm(x, weight=None, bias=None, *, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, axis=1, activation=None, residual=None,
               out=None):
    """BatchNorm: ``batch_norm_forward(...).y``; see :func:`batch_norm_forward`.

    >>> y = batch_norm(x, w, b, running_mean=rm, running_var=rv, training=True)
    """
    return batch_norm_forward(x, weight, bias, running_mean=running_mean,
                              running_var=running_var, training=training, momentum=momentum,
                              eps=eps, axis=axis, activation=activation, residual=residual,
                              out=out).y


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, axis=1,
                        activation=None, y=None, residual=False, dx_out=None):
    """BatchNorm backward (``native_batch_norm_backward``) from the saved mean and rstd.

    With ``training=True`` the statistics depend on x::

        dx = rstd * (dy * w - mean(dy * w) - xhat * mean(dy * w * xhat))

    with ``training=False`` they are constants: ``dx = rstd * dy * w``. ``dweight =
    sum(dy * xhat)``, ``dbias = sum(dy)`` per channel. With ``activation="relu"`` pass the
    forward's output ``y``: dy is first masked by ``y > 0``. ``residual=True`` also returns the
    residual's gradient as ``.dresidual``. Returns ``NormBackward(dx, dweight, dbias)``.

    >>> dx, dweight, dbias = batch_norm_backward(dy, x, f.mean, f.rstd, w)
    """
    if type(x) is np.ndarray and activation is None and y is None and residual is False:
        grads = _small.batch_norm_backward(dy, x, mean, rstd, weight, training, axis, dx_out)
        if grads is not None:
            return NormBackward(*grads)
    be = check_input("x", x)
    plan = plan_batch_norm(x.shape, axis, _threads(), x.dtype.itemsize)
    return _backward(plan, be, dy, x, mean, rstd, weight, not training, dx_out,
                     _context((x.shape, "axis", axis)), activation=activation, y=y,
                     residual=residual)


# ---------------------------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------------------------


def instance_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, axis=1,
                          activation=None, residual=None, out=None):
    """InstanceNorm forward with saved statistics.

    Statistics per (sample, channel) over the spatial axes; ``y = (x - mean) * rstd * weight
    + bias`` with weight/bias per channel. With ``use_input_stats=True`` and running statistics
    given, these are updated in place with the batch average of the per-instance mean and
    unbiased variance (PyTorch's behaviour); ``use_input_stats=False`` normalizes with the
    running statistics. mean and rstd have shape (N, C).

    >>> f = instance_norm_forward(x, w, b)
    """
    if type(x) is np.ndarray and activation is None and residual is None:
        f = _small.instance_norm_forward(x, weight, bias, running_mean, running_var,
                                         use_input_stats, momentum, eps, axis, out)
        if f is not None:
            return tuple.__new__(NormForward, f + (running_mean, running_var))
    be = check_input("x", x)
    plan = plan_instance_norm(x.shape, axis, _threads())
    return _forward_with_running(
        plan, be, x, weight, bias, running_mean, running_var, eps=eps, momentum=momentum,
        activation=activation, residual=residual, out=out, batch_stats=bool(use_input_stats),
        too_few="spatial element per channel when using input statistics",
        context=_context((x.shape, "axis", axis)))


def instance_norm(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                  residual=None, out=None):
    """InstanceNorm: ``instance_norm_forward(...).y``; see :func:`instance_norm_forward`.

    >>> y = instance_norm(x, w, b)
    """
    return instance_norm_forward(x, weight, bias, running_mean=running_mean,
                                 running_var=running_var, use_input_stats=use_input_stats,
                                 momentum=momentum, eps=eps, axis=axis, activation=activation,
                                 residual=residual, out=out).y


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, use_input_stats=True, axis=1,
                           activation=None, y=None, residual=False, dx_out=None):
    """InstanceNorm backward; statistics are constants when ``use_input_stats=False``.
    ``activation`` / ``y`` / ``residual`` as in :func:`batch_norm_backward`.

    >>> dx, dweight, dbias = instance_norm_backward(dy, x, f.mean, f.rstd, w)
    """
    if type(x) is np.ndarray and activation is None and y is None and residual is False:
        grads = _small.instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats, axis,
                                              dx_out)
        if grads is not None:
            return NormBackward(*grads)
    be = check_input("x", x)
    plan = plan_instance_norm(x.shape, axis, _threads())
    return _backward(plan, be, dy, x, mean, rstd, weight, not use_input_stats, dx_out,
                     _context((x.shape, "axis", axis)), activation=activation, y=y,
                     residual=residual)


# ---------------------------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------------------------


def group_norm_forward(x, num_groups, weight=None, bias=None, *, eps=1e-5, axis=1,
                       activation=None, residual=None, out=None):
    """GroupNorm forward with saved statistics.

    The C channels split into ``num_groups`` groups of C / G consecutive channels; statistics
    per (sample, group) over the group's channels and the spatial axes; weight/bias per channel.
    mean and rstd have shape (N, G).

    >>> f = group_norm_forward(x, 32, w, b)
    """
    if type(x) is np.ndarray and activation is None and residual is None:
        f = _small.group_norm_forward(x, num_groups, weight, bias, axis, eps, out)
        if f is not None:
            return tuple.__new__(NormForward, f + (None, None))
    be = check_input("x", x)
    plan = plan_group_norm(x.shape, num_groups, axis, _threads(), x.dtype.itemsize)
    context = _context((x.shape, "num_groups", num_groups, "axis", axis))
    w, b = _affine(plan, be, x, weight, bias, context)
    eps = check_eps(eps)
    epilogue = _epilogue(activation, residual, be, x)
    check_out("out", out, be, x)
    y, mean, rstd, _ = _forward(plan, be, x, w, b, eps, out, epilogue=epilogue)
    return NormForward(y, mean, rstd, None, None)


def group_norm(x, num_groups, weight=None, bias=None, *, eps=1e-5, axis=1, activation=None,
               residual=None, out=None):
    """GroupNorm: ``group_norm_forward(...).y``; see :func:`group_norm_forward`.

    >>> y = group_norm(x, 32, w, b)
    """
    return group_norm_forward(x, num_groups, weight, bias, eps=eps, axis=axis,
                              activation=activation, residual=residual, out=out).y


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, axis=1, activation=None,
                        y=None, residual=False, dx_out=None):
    """GroupNorm backward. ``activation`` / ``y`` / ``residual`` as in
    :func:`batch_norm_backward`.

    >>> dx, dweight, dbias = group_norm_backward(dy, x, f.mean, f.rstd, 32, w)
    """
    if type(x) is np.ndarray and activation is None and y is None and residual is False:
        grads = _small.group_norm_backward(dy, x, mean, rstd, num_groups, weight, axis, dx_out)
        if grads is not None:
            return NormBackward(*grads)
    be = check_input("x", x)
    plan = plan_group_norm(x.shape, num_groups, axis, _threads(), x.dtype.itemsize)
    return _backward(plan, be, dy, x, mean, rstd, weight, False, dx_out,
                     _context((x.shape, "num_groups", num_groups, "axis", axis)),
                     activation=activation, y=y, residual=residual)


# ---------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm
# ---------------------------------------------------------------------------------------------


def layer_norm_forward(x, weight=None, bias=None, *, axis=-1, eps=1e-5, activation=None,
                       residual=None, out=None):
    """LayerNorm forward with saved statistics (``native_layer_norm``).

    Statistics per leading index over the trailing axes ``axis`` (an int or a tuple such as
    ``(-2, -1)``); weight/bias have the normalized shape. mean and rstd have x's shape with
    the normalized axes removed.

    >>> f = layer_norm_forward(x, w, b)
    """
    if type(x) is np.ndarray and activation is None and residual is None:
        f = _small.layer_norm_forward(x, weight, bias, axis, eps, out)
        if f is not None:
            return tuple.__new__(NormForward, f + (None, None))
    be = check_input("x", x)
    plan = plan_layer_norm(x.shape, axis, _threads())
    context = _context((x.shape, "axis", axis))
    w, b = _affine(plan, be, x, weight, bias, context)
    eps = check_eps(eps)
    epilogue = _epilogue(activation, residual, be, x)
    check_out("out", out, be, x)
    y, mean, rstd, _ = _forward(plan, be, x, w, b, eps, out, epilogue=epilogue)
    return NormForward(y, mean, rstd, None, None)


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, activation=None, residual=None,
               out=None):
    """LayerNorm: ``layer_norm_forward(...).y``; see :func:`layer_norm_forward`.

    >>> y = layer_norm(x, w, b)
    """
    return layer_norm_forward(x, weight, bias, axis=axis, eps=eps, activation=activation,
                              residual=residual, out=out).y


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, activation=None, y=None,
                        residual=False, dx_out=None):
    """LayerNorm backward (``native_layer_norm_backward``). ``activation`` / ``y`` /
    ``residual`` as in :func:`batch_norm_backward`.

    >>> dx, dweight, dbias = layer_norm_backward(dy, x, f.mean, f.rstd, w)
    """
    if type(x) is np.ndarray and activation is None and y is None and residual is False:
        grads = _small.layer_norm_backward(dy, x, mean, rstd, weight, axis, dx_out)
        if grads is not None:
            return NormBackward(*grads)
    be = check_input("x", x)
    plan = plan_layer_norm(x.shape, axis, _threads())
    return _backward(plan, be, dy, x, mean, rstd, weight, False, dx_out,
                     _context((x.shape, "axis", axis)), activation=activation, y=y,
                     residual=residual)


def _rms_eps(eps, x):
    return float(np.finfo(x.dtype).eps) if eps is None else check_eps(eps)


def rms_norm_forward(x, weight=None, *, axis=-1, eps=None, activation=None, residual=None,
                     out=None):
    """RMSNorm forward (``torch.nn.functional.rms_norm``) over the trailing axes ``axis``::

        rstd = 1 / sqrt(mean(x**2) + eps)      y = x * rstd * weight   [+ residual] [relu]

    ``eps=None`` is ``finfo(x.dtype).eps``, as in PyTorch. Returns ``NormForward(y, None, rstd,
    None, None)``: there is no mean.

    >>> f = rms_norm_forward(x, w)
    """
    if type(x) is np.ndarray and activation is None and residual is None:
        f = _small.rms_norm_forward(x, weight, axis, eps, out)
        if f is not None:
            return NormForward(f[0], None, f[2], None, None)
    be = check_input("x", x)
    plan = plan_layer_norm(x.shape, axis, _threads())
    context = _context((x.shape, "axis", axis))
    w, b = _affine(plan, be, x, weight, None, context)
    eps = _rms_eps(eps, x)
    epilogue = _epilogue(activation, residual, be, x)
    check_out("out", out, be, x)
    y, _, rstd, _ = _forward(plan, be, x, w, b, eps, out, epilogue=epilogue, centered=False)
    return NormForward(y, None, rstd, None, None)


def rms_norm(x, weight=None, *, axis=-1, eps=None, activation=None, residual=None, out=None):
    """RMSNorm: ``rms_norm_forward(...).y``; see :func:`rms_norm_forward`.

    >>> y = rms_norm(x, w)
    """
    return rms_norm_forward(x, weight, axis=axis, eps=eps, activation=activation,
                            residual=residual, out=out).y


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1, activation=None, y=None,
                      residual=False, dx_out=None):
    """RMSNorm backward with ``xhat = x * rstd``::

        dx = rstd * (dy * w - xhat * mean(dy * w * xhat))      dweight = sum(dy * xhat)

    Returns ``NormBackward(dx, dweight, None)`` (there is no bias).

    >>> dx, dweight, _ = rms_norm_backward(dy, x, f.rstd, w)
    """
    if type(x) is np.ndarray and activation is None and y is None and residual is False:
        grads = _small.rms_norm_backward(dy, x, rstd, weight, axis, dx_out)
        if grads is not None:
            return NormBackward(grads[0], grads[1], None)
    be = check_input("x", x)
    plan = plan_layer_norm(x.shape, axis, _threads())
    g = _backward(plan, be, dy, x, None, rstd, weight, False, dx_out,
                  _context((x.shape, "axis", axis)), activation=activation, y=y,
                  residual=residual, centered=False)
    return NormBackward(g.dx, g.dweight, None, g.dresidual)


# ---------------------------------------------------------------------------------------------
# Inference folding (Ioffe & Szegedy 2015, Algorithm 2, last step)
# ---------------------------------------------------------------------------------------------


def batch_norm_scale_shift(running_mean, running_var, weight=None, bias=None, *, eps=1e-5):
    """Per-channel ``(scale, shift)`` of eval-mode BatchNorm as ``y = scale * x + shift``::

        scale = weight / sqrt(running_var + eps)      shift = bias - running_mean * scale

    >>> scale, shift = batch_norm_scale_shift(rm, rv, w, b)
    """
    be = check_input("running_mean", running_mean)
    C = running_mean.shape
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean: expected a 1-d array, got shape {C}")
    context = f"running_mean of shape {C}"
    rv = check_param("running_var", running_var, C, be, running_mean, context)
    w = check_param("weight", weight, C, be, running_mean, context)
    b = check_param("bias", bias, C, be, running_mean, context)
    eps = check_eps(eps)
    scale = 1.0 / be.xp.sqrt(rv + eps)
    if w is not None:
        scale = scale * w
    shift = -running_mean.astype(be.xp.float64) * scale
    if b is not None:
        shift = shift + b
    return scale.astype(running_mean.dtype), shift.astype(running_mean.dtype)


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *,
                    eps=1e-5):
    """Fold eval-mode BatchNorm into the preceding linear / convolution layer.

    ``weight`` has the output channels along axis 0 (Linear: (out, in); Conv: (out, in, *k)),
    ``bias`` is (out,) or None. Returns ``(folded_weight, folded_bias)`` such that
    ``layer(x; folded) == batch_norm(layer(x; weight, bias), training=False)``::

        folded_weight = weight * scale[:, None, ...]
        folded_bias = (bias - running_mean) * scale + bn_bias

    >>> w2, b2 = fold_batch_norm(conv_w, conv_b, rm, rv, gamma, beta)
    """
    be = check_input("weight", weight)
    if weight.ndim < 1:
        raise ValueError(f"weight: expected output channels along axis 0, got shape "
                         f"{weight.shape}")
    scale, shift = batch_norm_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps=eps)
    if running_mean.shape != weight.shape[:1]:
        raise ValueError(f"running_mean: expected shape {weight.shape[:1]} (weight's output "
                         f"channels), got {running_mean.shape}")
    b = check_param("bias", bias, weight.shape[:1], be, weight, f"weight of shape {weight.shape}")
    scale64 = scale.astype(be.xp.float64)
    folded_weight = weight * scale64.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_bias = shift.astype(be.xp.float64) if b is None else b * scale64 + shift
    return folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)

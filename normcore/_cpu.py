"""Executes a Plan on NumPy arrays with the Numba CPU kernels.

Arrays arrive flat and C-contiguous (x, y, dy, dx) or as float64 parameter vectors of length
C * Q; small per-statistic arithmetic (O * C values) is done here in NumPy.
"""
import threading

import numba
import numpy as np

from .kernels import cpu as K

# numba's workqueue threading layer aborts when two threads enter parallel regions at once;
# with it, calls are serialized. The omp and tbb layers are safe to call concurrently.
_workqueue_lock = threading.Lock()
_layer = None


def _serialize_needed():
    global _layer
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet: the layer is not chosen
            return True
    return _layer == "workqueue"


class _Guard:
    """Holds the workqueue lock when the threading layer needs it."""

    def __enter__(self):
        self.locked = _serialize_needed()
        if self.locked:
            _workqueue_lock.acquire()

    def __exit__(self, *exc):
        if self.locked:
            _workqueue_lock.release()


guard = _Guard


def _column_maps(plan):
    """Statistic index c and parameter cell of each column j = c * B + b of the column view."""
    j = np.arange(plan.C * plan.B)
    c = j // plan.B
    return c, c * plan.Q + (j % plan.B) // plan.P


def moments(plan, x):
    """Biased moments per statistic: (mean, var), float64 arrays of O * C values."""
    O, A, C, B = plan.O, plan.A, plan.C, plan.B
    with guard():
        if plan.path == "rows":
            mean = np.empty(O * C)
            var = np.empty(O * C)
            K.rows_moments(x, O * C, B, mean, var)
            return mean, var
        mean = np.empty((O, C))
        var = np.empty((O, C))
        if plan.path == "flat":
            shape = (O, plan.K, C)
            count, pmean, pm2 = np.empty(shape), np.empty(shape), np.empty(shape)
            K.flat_moments(x, O, A, C, B, plan.K, count, pmean, pm2)
            K.merge_moments(count, pmean, pm2, 1, mean, var)
        else:
            shape = (O, plan.K, C * B)
            count, pmean, pm2 = np.empty(shape), np.empty(shape), np.empty(shape)
            K.column_moments(x, O, A, C * B, plan.K, count, pmean, pm2)
            K.merge_moments(count, pmean, pm2, B, mean, var)
    return mean.reshape(-1), var.reshape(-1)


def normalize(plan, x, y, mean, rstd, w, bias):
    """y = (x - mean) * rstd * w + bias with given float64 statistics (O * C values)."""
    O, A, C, B = plan.O, plan.A, plan.C, plan.B
    with guard():
        if plan.path == "columns":
            c, cell = _column_maps(plan)
            mean2 = mean.reshape(O, C)[:, c]
            scale = rstd.reshape(O, C)[:, c] * w[cell]
            shift = np.broadcast_to(bias[cell], scale.shape)
            K.column_normalize(x, O, A, C * B, plan.K, np.ascontiguousarray(mean2),
                               np.ascontiguousarray(scale), np.ascontiguousarray(shift), y)
        else:
            K.flat_normalize(x, O, A, C, B, plan.P, plan.K, mean, rstd, w, bias, y)


def forward_train(plan, x, y, w, bias, eps, stats_dtype, want_var):
    """Batch statistics + normalization. Returns saved (mean, rstd) in `stats_dtype` (shape
    O * C) and the float64 biased variance when `want_var` (else None)."""
    if plan.path == "rows":
        R = plan.O * plan.C
        mean = np.empty(R, stats_dtype)
        rstd = np.empty(R, stats_dtype)
        var = np.empty(R if want_var else 0)
        with guard():
            K.rows_forward(x, R, plan.C, plan.B, plan.P, w, bias, eps, y, mean, rstd, var)
        return mean, rstd, (var if want_var else None)
    mean64, var64 = moments(plan, x)
    rstd64 = 1.0 / np.sqrt(var64 + eps)
    normalize(plan, x, y, mean64, rstd64, w, bias)
    return mean64.astype(stats_dtype), rstd64.astype(stats_dtype), var64


def backward(plan, dy, x, dx, mean, rstd, w, frozen):
    """dx into `dx`; returns (dweight, dbias) as float64 vectors of C * Q cells.

    mean, rstd: float64 statistics (O * C values). With `frozen`, statistics are constants.
    """
    O, A, C, B, Q = plan.O, plan.A, plan.C, plan.B, plan.Q
    with guard():
        if plan.backward_path == "rows":
            shape = (plan.nblk, C * Q)
            dbias, dweight = np.zeros(shape), np.zeros(shape)
            K.rows_backward(dy, x, O * C, C, B, plan.P, mean, rstd, w, frozen, plan.nblk,
                            dbias, dweight, dx)
            return dweight.sum(0), dbias.sum(0)
        if plan.backward_path == "flat":
            shape = (O, plan.K, C * Q)
            sdy, sdyxhat = np.empty(shape), np.empty(shape)
            K.flat_backward_sums(dy, x, O, A, C, B, plan.P, plan.K, mean, rstd, w, sdy, sdyxhat)
            sdy, sdyxhat = sdy.sum(1), sdyxhat.sum(1)                      # (O, C * Q)
        else:
            J = C * B
            c, cell = _column_maps(plan)
            mean_j = np.ascontiguousarray(mean.reshape(O, C)[:, c])
            rstd_j = np.ascontiguousarray(rstd.reshape(O, C)[:, c])
            shape = (O, plan.K, J)
            sdy, sdyxhat = np.empty(shape), np.empty(shape)
            K.column_backward_sums(dy, x, O, A, J, plan.K, mean_j, rstd_j, sdy, sdyxhat)
            # columns -> parameter cells: j = (c * Q + q) * P + p
            sdy = sdy.sum(1).reshape(O, C * Q, plan.P).sum(2)
            sdyxhat = sdyxhat.sum(1).reshape(O, C * Q, plan.P).sum(2)
        n = A * B
        wq = w.reshape(C, Q)
        if frozen:
            c1 = c2 = np.zeros(O * C)
        else:
            c2 = (sdy.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n
            c1 = (sdyxhat.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n
        if plan.backward_path == "flat":
            K.flat_backward_dx(dy, x, O, A, C, B, plan.P, plan.K, mean, rstd, w, c1, c2, dx)
        else:
            a = rstd_j * w[cell]
            b = rstd_j * rstd_j * np.ascontiguousarray(c1.reshape(O, C)[:, c])
            cc = rstd_j * np.ascontiguousarray(c2.reshape(O, C)[:, c])
            K.column_backward_dx(dy, x, O, A, J, plan.K, mean_j, a, b, cc, dx)
    return sdyxhat.sum(0), sdy.sum(0)

"""Executes a Plan on device arrays with the Numba CUDA kernels (normcore.kernels.cuda).

The same four functions, arguments and results as normcore._cpu: arrays arrive flat and
C-contiguous (x, y, dy, dx), statistics and parameters as float64 vectors (mean, rstd: O * C
values; w, bias: C * Q cells). Scratch comes from the inputs' own namespace (`xp`: CuPy on a
GPU; NumPy under NUMBA_ENABLE_CUDASIM, where the kernels run in the simulator), kernels launch
on CuPy's current stream, and nothing is copied to the host or synchronized.

The GPU picks its own kernel family from the view (O, A, C, B) (see kernels/cuda.py); the
Plan's CPU work split (K, nblk, path) is not used. Block sizes and splits are the module
constants below, so tests can shrink them for the simulator.
"""
import math
import sys
from functools import lru_cache

import numpy as np

from ._backend import is_cupy

# Threads of the 1-D (row, run, merge, elementwise) blocks; a multiple of 32 on a GPU.
THREADS = 256
# (threads along the columns, threads along the rows) of the column kernels.
COLUMN_THREADS = (32, 8)
# Grid-stride kernels launch at most this many blocks.
MAX_BLOCKS = 4096
# A split reduction aims for this many blocks in all, so that a small C still fills the GPU.
TARGET_BLOCKS = 1024
# Smallest chunk of one statistic (elements) worth its own block in the split reductions.
MIN_CHUNK = 4096
# Rows a column-kernel chunk holds at least (one pass of the TY threads and then some).
MIN_COLUMN_ROWS = 64
# Runs (b-rows, parameter periods) shorter than this go to the column kernels.
RUN_MIN = 32
# Fewer rows than this, each longer than ROW_SPLIT, leave the GPU idle with a block per row:
# such rows take the split (runs) path instead.
FEW_ROWS = 256
ROW_SPLIT = 8192


def _module(name):
    """An already imported module, or None (normcore never imports CuPy itself)."""
    return sys.modules.get(name)


def _xp(a):
    return _module("cupy") if is_cupy(a) else np


@lru_cache(maxsize=1)
def _cuda_kernels():
    try:
        from numba import cuda
        from .kernels import cuda as kernels
    except ImportError as exc:  # numba-cuda missing
        raise ImportError(f"normcore's CUDA kernels need numba-cuda (pip install "
                          f"'normcore[cuda]'): {exc}") from exc
    if not kernels.SIM and not cuda.is_available():
        raise RuntimeError("normcore: no CUDA device is available to numba "
                           f"({cuda.cudadrv.driver.driver.initialization_error or 'no device'})")
    return cuda, kernels


def available():
    """True when the CUDA kernels can run: numba-cuda is installed and sees a device (or the
    simulator is on). Never raises."""
    try:
        _cuda_kernels()
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True


class _Launcher:
    """Kernels for one input dtype, launched on the current CuPy stream (default stream in
    the simulator), with device arrays handed over without numba's CAI stream sync."""

    def __init__(self, dtype, sample):
        cuda, kernels = _cuda_kernels()
        self.k = kernels.kernels_for(dtype)
        self.acc = kernels.ACCUMULATOR[np.dtype(dtype)]
        self.sim = kernels.SIM
        self.xp = _xp(sample)
        if self.sim:
            self.stream = 0
            # the simulator copies every array argument back after a launch
            self.wrap = lambda a: a if a.flags.writeable else a.copy()
        else:
            if THREADS % 32:
                raise ValueError(f"normcore._cuda.THREADS: expected a multiple of 32, got "
                                 f"{THREADS}")
            cupy = _module("cupy")
            self.stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
            # sync=False: numba would otherwise synchronize on the array's exported stream
            self.wrap = lambda a: cuda.as_cuda_array(a, sync=False)

    def __call__(self, name, blocks, threads, *args):
        args = [self.wrap(a) if hasattr(a, "shape") and a.ndim else a for a in args]
        self.k[name][max(1, min(blocks, MAX_BLOCKS)), threads, self.stream](*args)

    def cast(self, a):
        """A float64 vector as a contiguous vector of the accumulation type (on device)."""
        return self.xp.ascontiguousarray(a, dtype=self.acc)

    def empty(self, n, dtype=np.float64):
        return self.xp.empty(n, dtype)


@lru_cache(maxsize=1024)
def paths(plan):
    """(forward path, backward cell-sum kernel) for the GPU.

    forward: "rows" (A == 1, enough rows or short ones), "runs" (long b-runs) or "columns".
    cells: which kernel reduces dweight / dbias: "rows" (in the row kernel, long periods P),
    "runs" (view (O, A, C * Q, P), long P) or "columns" (short P).
    """
    O, A, C, B, P = plan.O, plan.A, plan.C, plan.B, plan.P
    few_long_rows = O * C < FEW_ROWS and B > ROW_SPLIT and P >= RUN_MIN
    if A == 1 and not few_long_rows:
        path = "rows"
    elif B >= RUN_MIN:
        path = "runs"
    else:
        path = "columns"
    if P >= RUN_MIN:
        cells = "rows" if path == "rows" else "runs"
    else:
        cells = "columns"
    return path, cells


def _split(units, n, floor):
    """Chunks per unit so that units * K ~ TARGET_BLOCKS, each chunk at least `floor` long."""
    return max(1, min(math.ceil(TARGET_BLOCKS / max(units, 1)), n // max(floor, 1)))


def _moments64(run, plan, x):
    """(mean, var) float64 per statistic (O * C) by partial moments and a merge."""
    O, A, C, B = plan.O, plan.A, plan.C, plan.B
    f64 = np.float64
    if paths(plan)[0] == "columns":
        J = C * B
        TX, TY = COLUMN_THREADS
        JT = -(-J // TX)
        K = _split(O * JT, A, MIN_COLUMN_ROWS)
        count, pmean, pm2 = (run.empty(O * K * J) for _ in range(3))
        run("columns_moments", O * K * JT, (TX, TY), x, O, A, J, K, count, pmean, pm2)
        Bp = B
    else:
        K = _split(O * C, A * B, MIN_CHUNK)
        count, pmean, pm2 = (run.empty(O * K * C) for _ in range(3))
        run("runs_moments", O * C * K, THREADS, x, O, A, C, B, K, count, pmean, pm2)
        Bp = 1
    mean, var = run.empty(O * C, f64), run.empty(O * C, f64)
    run("merge_moments", O * C, THREADS, count, pmean, pm2, O, K, C, Bp, mean, var)
    return mean, var


def _blocks(size):
    return -(-size // THREADS)


def moments(plan, x):
    """Biased moments per statistic: (mean, var), float64 arrays of O * C values."""
    return _moments64(_Launcher(x.dtype, x), plan, x)


def _none_like(a):
    """The empty array that tells a kernel an optional argument is absent."""
    return a[:0]


def normalize(plan, x, y, mean, rstd, w, bias, *, z=None, relu=False):
    """y = relu((x - mean) * rstd * w + bias + z) with given float64 statistics (O * C values);
    z (the residual, flat like x) is optional."""
    run = _Launcher(x.dtype, x)
    z = _none_like(x) if z is None else z
    run("normalize", _blocks(x.size), THREADS, x, z, bool(relu), y, plan.O, plan.A, plan.C,
        plan.B, plan.P, run.cast(mean), run.cast(rstd), run.cast(w), run.cast(bias))


def forward_train(plan, x, y, w, bias, eps, stats_dtype, want_var, *, z=None, relu=False,
                  centered=True):
    """Batch statistics + normalization (+ residual z, ReLU). Returns saved (mean, rstd) in
    `stats_dtype` (O * C values) and the float64 variance when `want_var` (else None).
    centered=False is RMSNorm: mean 0, var = mean(x**2)."""
    run = _Launcher(x.dtype, x)
    xp = run.xp
    if paths(plan)[0] == "rows":
        R = plan.O * plan.C
        mean, rstd = run.empty(R, run.acc), run.empty(R, run.acc)
        var = run.empty(R if want_var else 0)
        zz = _none_like(x) if z is None else z
        run("rows_forward", R, THREADS, x, zz, bool(relu), bool(centered), y, R, plan.C,
            plan.B, plan.P, run.cast(w), run.cast(bias), float(eps), mean, rstd, var)
        return (mean.astype(stats_dtype, copy=False), rstd.astype(stats_dtype, copy=False),
                var if want_var else None)
    mean64, var64 = _moments64(run, plan, x)
    if not centered:
        var64 = var64 + mean64 * mean64
        mean64 = xp.zeros_like(mean64)
    rstd64 = 1.0 / xp.sqrt(var64 + eps)
    normalize(plan, x, y, mean64, rstd64, w, bias, z=z, relu=relu)
    return mean64.astype(stats_dtype), rstd64.astype(stats_dtype), var64


def _column_sums(run, dy, y, relu, x, G, A, J, D, C, B, mean, rstd):
    """sum(dy), sum(dy * xhat) per (g, j) of the view (G, A, J): two (G, J) float64 arrays."""
    TX, TY = COLUMN_THREADS
    JT = -(-J // TX)
    K = _split(G * JT, A, MIN_COLUMN_ROWS)
    sdy, sdyxhat = run.empty(G * K * J), run.empty(G * K * J)
    run("columns_backward_sums", G * K * JT, (TX, TY), dy, y, relu, x, G, A, J, K, D, C, B,
        mean, rstd, sdy, sdyxhat)
    return sdy.reshape(G, K, J).sum(1), sdyxhat.reshape(G, K, J).sum(1)


def backward(plan, dy, x, dx, mean, rstd, w, frozen, *, y=None, relu=False, dz=None,
             centered=True):
    """dx into `dx` (and the residual's gradient into `dz` when given); returns (dweight,
    dbias) as float64 vectors of C * Q cells.

    mean, rstd: float64 statistics (O * C values); with `frozen` they are constants. With
    relu, y is the forward's output and dy is masked by y > 0. centered=False is RMSNorm.
    """
    O, A, C, B, P, Q = plan.O, plan.A, plan.C, plan.B, plan.P, plan.Q
    run = _Launcher(x.dtype, x)
    xp = run.xp
    relu = bool(relu)
    y = y if relu else _none_like(dy)
    dz = _none_like(dx) if dz is None else dz
    mean_a, rstd_a, w_a = run.cast(mean), run.cast(rstd), run.cast(w)
    path, cells = paths(plan)
    if path == "rows":
        R = O * C
        if cells == "rows":
            sdy, sdyxhat = run.empty(R * Q), run.empty(R * Q)
        else:
            sdy = sdyxhat = run.empty(0)
        run("rows_backward", R, THREADS, dy, y, relu, x, dx, dz, R, C, B, P, mean_a, rstd_a,
            w_a, bool(frozen), bool(centered), sdy, sdyxhat)
        if cells == "rows":
            return sdyxhat.reshape(O, C * Q).sum(0), sdy.reshape(O, C * Q).sum(0)
        # every row is its own statistic group: rows t = o, columns j = c * B + b
        sdy, sdyxhat = _column_sums(run, dy, y, relu, x, 1, O, C * B, 1, C, B, mean_a, rstd_a)
        return sdyxhat.reshape(C * Q, P).sum(1), sdy.reshape(C * Q, P).sum(1)
    # per-(o, cell) sums, then the per-statistic coefficients, then dx elementwise
    if cells == "runs":
        K = _split(O * C * Q, A * P, MIN_CHUNK)
        sdy, sdyxhat = run.empty(O * K * C * Q), run.empty(O * K * C * Q)
        run("runs_backward_sums", O * C * Q * K, THREADS, dy, y, relu, x, O, A, C * Q, P, Q, K,
            mean_a, rstd_a, sdy, sdyxhat)
        sdy = sdy.reshape(O, K, C * Q).sum(1)
        sdyxhat = sdyxhat.reshape(O, K, C * Q).sum(1)
    else:
        # columns j = (c * Q + q) * P + p
        sdy, sdyxhat = _column_sums(run, dy, y, relu, x, O, A, C * B, A, C, B, mean_a, rstd_a)
        sdy = sdy.reshape(O, C * Q, P).sum(2)
        sdyxhat = sdyxhat.reshape(O, C * Q, P).sum(2)
    if frozen:
        c1 = c2 = xp.zeros(O * C, run.acc)
    else:
        n = A * B
        wq = w.reshape(C, Q)
        c1 = run.cast((sdyxhat.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n)
        if centered:
            c2 = run.cast((sdy.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n)
        else:
            c2 = xp.zeros(O * C, run.acc)
    run("backward_dx", _blocks(x.size), THREADS, dy, y, relu, x, dx, dz, O, A, C, B, P, mean_a,
        rstd_a, w_a, c1, c2)
    return sdyxhat.sum(0), sdy.sum(0)

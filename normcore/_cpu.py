"""Executes a Plan on NumPy arrays with the Numba CPU kernels.

Arrays arrive flat and C-contiguous (x, y, dy, dx), weight / bias as vectors of C * Q cells in
the compute dtype (the front end converts them while checking them) and statistics in float64
(the row backward also takes float32 saved statistics as they are); small per-statistic
arithmetic (O * C values) is done here in NumPy or in small serial kernels. The elementwise
kernels compute in float32 for float16 / float32 data (see kernels/cpu.py).
"""
import threading

import numba
import numpy as np

from .kernels import cpu as K

# numba's workqueue threading layer aborts when two threads enter parallel regions at once;
# with it, calls are serialized. The omp and tbb layers are safe to call concurrently.
_workqueue_lock = threading.Lock()
_serialize = None      # known once the first parallel region has chosen the layer


def _serialize_needed():
    global _serialize
    if _serialize is None:
        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet: the layer is not chosen
            return True
        _serialize = layer == "workqueue"
    return _serialize


def _run(plan, kernel, *args):
    """kernel(*args) on the plan's terms: its serial twin for inputs too small to repay a
    parallel launch (the twins never enter a parallel region), else under the workqueue lock
    where the layer needs it. One call, not a lock context around the kernels: a `with` on a
    nullcontext is two more Python calls (~0.4 us of a 4 us call all told)."""
    if plan.serial:
        return kernel.serial(*args)
    if _serialize_needed():
        with _workqueue_lock:
            return kernel(*args)
    return kernel(*args)


def _bits(a):
    """float16 arrays go to the kernels as their uint16 bit patterns."""
    return a.view(np.uint16) if a.dtype.char == "e" else a


_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)
# Outputs of at least this many bytes are written with non-temporal stores where a kernel can
# (float32 / float64, no residual or ReLU; see kernels/cpu.py: affine_run): they would not
# stay in the 32 MiB L3 anyway, and skipping the read of each line before writing it saved
# ~20% on 64 MiB.
STREAM_MIN = 1 << 24
# Rows of LONG_ROW bytes or more (kernels/cpu.py) in inputs of this many bytes or more (those
# whose outputs stream) take rows_forward's streamed rows, which prefetch the next row into the
# L2 alone, rather than the fused rows (up to FUSED_ROW values; without an epilogue). Decided
# by size, not by whether the output streams, so that a call's kernel and statistics do not
# depend on where its out= starts. Same-process A/B on the 2-core AMD EPYC Zen 4 (32 KiB L1),
# LayerNorm forward into out= / fresh outputs / with caches swept: float32 (8192, 1024)
# 1.17x / 1.17x / 1.03x, (16384, 1024) 1.05-1.09x / 1.11x / 1.04x; float64 (8192, 1024)
# 1.09-1.15x / 1.12x, (16384, 1024) 1.14-1.17x / 1.18x, (8192, 512) 1.31-1.45x, (32768, 768)
# 1.25-1.32x. Float32 rows of 768 (3 KiB, every level) ran 0.92-0.99x: they stay fused.
# GroupNorm's rows of short cells (weights repeated per element) that now come here, (256,
# 512, 7, 7) float32 16 groups (rows of 6 KiB) and float64 32 groups: 0.98-1.08x.
LONG_ROWS_MIN = 1 << 24


def streams(out):
    """Whether a kernel may write `out` with non-temporal stores: STREAM_MIN bytes or more, and
    its data at a whole element's address (NumPy allows any byte offset, as np.frombuffer with
    an offset gives; the streamed windows find their line boundaries in whole elements, and a
    non-temporal store off its alignment faults). NumPy's aligned flag is that test for these
    dtypes (alignment = itemsize), and cheap: out.ctypes.data built a ctypes object through
    NumPy's Python layer, ~40 us of a call whose code the kernel's streams had evicted."""
    return out.nbytes >= STREAM_MIN and out.flags.aligned


# Empty arrays that tell a kernel an optional argument is absent (shared: never written).
_EMPTY = {np.dtype(t): np.empty(0, t) for t in (np.uint16, np.float32, np.float64)}
_EMPTY64 = _EMPTY[_F64]


def _none_like(a):
    """The empty array of a's dtype that tells a kernel an optional argument is absent."""
    return _EMPTY[a.dtype]


def moments(plan, x, narrow=False):
    """Biased moments per statistic: (mean, var), float64 arrays of O * C values. `narrow`:
    only as accurate as float32 statistics need (the column kernels then sum blocks of rows of
    float16 / float32 data in float32, the flat kernel float16 runs (kernels/cpu.py:
    HALF_RUN); the row kernels keep float64 sums for float32 data: a float32 two-pass per
    block measured 0.21 ns per value against 0.12 on rows of 1024, 0.105 against 0.138 on
    long runs)."""
    O, A, C, B = plan.O, plan.A, plan.C, plan.B
    x = _bits(x)
    if plan.path == "rows" and A == 1:
        mean = np.empty(O * C)
        var = np.empty(O * C)
        _run(plan, K.rows_moments, x, O, A, C, B, mean, var)
        return mean, var
    mean = np.empty((O, C))
    var = np.empty((O, C))
    if plan.path in ("rows", "flat"):
        # statistics of A > 1 runs too: rows_moments jumps from run to run of one statistic
        # (its forward keeps them in cache for the second pass, which moments lacks), the
        # flat kernel reads memory in order: moments over (0, 2, 3) of (32, 64, 56, 56)
        # 1.42x float32 / 1.46x float64 from memory, 1.02-1.03x from cache
        shape = (O, plan.K, C)
        count, pmean, pm2 = np.empty(shape), np.empty(shape), np.empty(shape)
        _run(plan, K.flat_moments, x, O, A, C, B, plan.K, narrow, count, pmean, pm2)
        K.merge_moments(count, pmean, pm2, 1, mean, var)
    else:
        shape = (O, plan.K, C * B)
        count, pmean, pm2 = np.empty(shape), np.empty(shape), np.empty(shape)
        _run(plan, K.column_moments, x, O, A, C * B, plan.K, narrow, count, pmean, pm2)
        K.merge_moments(count, pmean, pm2, B, mean, var)
    return mean.reshape(-1), var.reshape(-1)


def normalize_kernel(plan, stream, relu, residual):
    """The kernel of the normalize pass alone (see Plan.normalize_path), writing its output
    with non-temporal stores (`stream`) or not, with ReLU and a residual or not: on the flat
    path's runs of one cell each (P == B), short ones or streamed, a call per chunk of runs
    (flat_normalize_runs), else a call per run (flat_normalize); without ReLU or residual,
    kernels compiled without them (*_plain). One kernel per loop: one that chose at run time
    compiled every loop on its first call."""
    epilogue = relu or residual
    if plan.normalize_path == "columns":
        return K.column_normalize if epilogue else K.column_normalize_plain
    if plan.P == plan.B and (plan.B < K.STREAM_RUN or stream):
        return K.flat_normalize_runs if epilogue else K.flat_normalize_runs_plain
    return K.flat_normalize if epilogue else K.flat_normalize_plain


def flat_backward_kernels(plan, relu, residual):
    """The flat path's backward (sums, dx) kernels: on short runs of one cell each without
    ReLU, a call per chunk of runs (flat_backward_*_runs), else a call per run; the dx kernel
    without ReLU or residual compiled without their loops (flat_backward_dx_plain)."""
    if plan.P == plan.B and plan.B < K.STREAM_RUN and not relu:
        return K.flat_backward_sums_runs, K.flat_backward_dx_runs
    return (K.flat_backward_sums,
            K.flat_backward_dx if relu or residual else K.flat_backward_dx_plain)


def normalize(plan, x, y, mean, rstd, w, bias, *, z=None, relu=False):
    """y = relu((x - mean) * rstd * w + bias + z) with given float64 statistics (O * C values);
    z (the residual, flat like x) is optional."""
    O, A, C, B = plan.O, plan.A, plan.C, plan.B
    x, y = _bits(x), _bits(y)
    z = _none_like(x) if z is None else _bits(z)
    stream = streams(y)
    _run(plan, normalize_kernel(plan, stream, relu, z.size), x, z, relu, O, A, C, B, plan.P,
         plan.K, mean, rstd, w, bias, y, stream)


def row_cells(plan, w):
    """Parameter cells w as the row kernels' per-element passes take them: repeated per element
    for short cells (see Plan.short_cells), else w itself."""
    return np.repeat(w, plan.P) if plan.short_cells else w


def row_period(plan):
    """The parameter period P of row_cells' arrays."""
    return 1 if plan.short_cells else plan.P


def rows_forward_kernel(A, B, P, itemsize, relu, residual, nbytes):
    """The row kernel for the forward of rows of B values (A of them per statistic, parameter
    cells of P values; row_period's P), `itemsize` bytes per value, with ReLU and a residual
    or not. Rows of up to FUSED_ROW values normalized as their statistics are taken
    (rows_forward_fused), up to SHORT_ROW with a residual or ReLU (kernels/cpu.py: FUSED_ROW
    has the measurements); float16 rows and float32 rows under 64 values kept the blocks of
    rows (rows_forward_short; one at a time, float16 rows of 64 ran 0.82-0.88x, 128 0.98x,
    float32 rows of 49 0.91-1.0x); the rest rows_forward, and without an epilogue those of
    LONG_ROW bytes or more in inputs of `nbytes` >= LONG_ROWS_MIN. Without an epilogue, the
    fused and the general rows' kernels that compile none (rows_forward_fused_plain,
    rows_forward_plain)."""
    plain = not relu and not residual
    if A == 1 and P == 1 and not (plain and nbytes >= LONG_ROWS_MIN
                                  and B * itemsize >= K.LONG_ROW):
        fused = itemsize == 8 or itemsize == 4 and B >= 64
        if fused and plain and B <= K.FUSED_ROW:
            return K.rows_forward_fused_plain
        if fused and B <= K.SHORT_ROW:
            return K.rows_forward_fused
        if B <= K.SHORT_ROW:
            return K.rows_forward_short
    return K.rows_forward_plain if plain else K.rows_forward


def rows_backward_kernel(A, C, B, P, relu, residual, short_cells):
    """The row kernel for the backward of rows of B values (A of them per statistic, C
    statistics per o, parameter cells of P values; the plan's P), with ReLU and a residual or
    not, the parameters repeated per element (short_cells) or not: one loop per row for rows
    of a statistic each of up to FUSED_ROW values with a weight per element
    (rows_backward_short), and, without an epilogue, for rows of short cells or of one cell
    of up to ROW_CELL values (rows_backward_cells); the rest rows_backward. Without an
    epilogue, kernels that compile none (*_plain)."""
    plain = not relu and not residual
    if A == 1 and C == 1 and P == 1 and B <= K.FUSED_ROW:
        return K.rows_backward_short_plain if plain else K.rows_backward_short
    if A == 1 and P > 1 and plain and (short_cells or P == B <= K.ROW_CELL):
        return K.rows_backward_cells
    return K.rows_backward_plain if plain else K.rows_backward


def forward_train(plan, x, y, w, bias, eps, stats_dtype, want_var, *, z=None, relu=False,
                  centered=True):
    """Batch statistics + normalization (+ residual z, ReLU). Returns saved (mean, rstd) in
    `stats_dtype` (O * C values) and the float64 variance when `want_var` (else None).
    centered=False is RMSNorm: mean 0, var = mean(x**2)."""
    path = plan.path
    if path == "rows" or path == "columns_fused":
        R = plan.O * plan.C
        mean = np.empty(R, stats_dtype)
        rstd = np.empty(R, stats_dtype)
        var = np.empty(R) if want_var else _EMPTY64
        if x.dtype.char == "e":
            x, y = x.view(np.uint16), y.view(np.uint16)
        z = _none_like(x) if z is None else _bits(z)
        stream = streams(y)
        if path == "rows":
            P = row_period(plan)
            kernel = rows_forward_kernel(plan.A, plan.B, P, x.itemsize, relu, z.size, x.nbytes)
            _run(plan, kernel, x, z, relu, centered, plan.O, plan.A, plan.C, plan.B, P,
                 row_cells(plan, w), row_cells(plan, bias), eps, y, mean, rstd, var, stream)
        else:
            kernel = K.column_forward if relu or z.size else K.column_forward_plain
            _run(plan, kernel, x, z, relu, centered, plan.O, plan.A, plan.C, plan.B,
                 plan.P, plan.S, w, bias, eps, y, mean, rstd, var, stream and plan.S == 1)
        return mean, rstd, (var if want_var else None)
    if path == "columns" and plan.normalize_path == "columns":
        R = plan.O * plan.C
        mean = np.empty(R, stats_dtype)
        rstd = np.empty(R, stats_dtype)
        var = np.empty(R) if want_var else _EMPTY64
        x, y = _bits(x), _bits(y)
        z = _none_like(x) if z is None else _bits(z)
        kernel = K.column_forward_chunks if relu or z.size else K.column_forward_chunks_plain
        _run(plan, kernel, x, z, relu, centered, plan.O, plan.A, plan.C,
             plan.B, plan.P, plan.K, stats_dtype != np.float64, w, bias, eps, y, mean, rstd,
             var, streams(y))
        return mean, rstd, (var if want_var else None)
    mean64, var64 = moments(plan, x, narrow=stats_dtype != np.float64)
    if not centered:
        var64 = var64 + mean64 * mean64
        mean64 = np.zeros_like(mean64)
    rstd64 = 1.0 / np.sqrt(var64 + eps)
    normalize(plan, x, y, mean64, rstd64, w, bias, z=z, relu=relu)
    return mean64.astype(stats_dtype), rstd64.astype(stats_dtype), var64


def frozen_stats(running_mean, running_var, eps, O, stats_dtype):
    """Eval-mode statistics from the running ones ((C,) float64 vectors), in one kernel call:
    (mean64, rstd64) for the kernels, repeated for the O samples, and the saved (mean, rstd)
    in stats_dtype."""
    R = O * running_mean.size
    mean64, rstd64 = np.empty(R), np.empty(R)
    mean, rstd = np.empty(R, stats_dtype), np.empty(R, stats_dtype)
    K.frozen_stats(running_mean, running_var, eps, mean64, rstd64, mean, rstd)
    return mean64, rstd64, mean, rstd


def update_running(running_mean, running_var, old, mean, var, O, unbias, momentum):
    """The running statistics' update (see kernels/cpu.py: update_running) in one kernel call,
    when both are contiguous float32 / float64 NumPy vectors; returns whether it was done
    (else the caller's array formula does it). old: (mean, var) read from them in float64;
    mean: the batch means in the saved statistics' dtype, var: the biased variances in
    float64, O * C values each."""
    if not updatable(running_mean, running_var):
        return False
    K.update_running(running_mean, running_var, old[0], old[1], mean, var, O, unbias, momentum)
    return True


def updatable(running_mean, running_var):
    """Whether update_running's kernel can update these running statistics: kernel_vectors
    that do not overlap (the array formula computes both before writing either)."""
    return (kernel_vectors(running_mean, running_var)
            and not np.may_share_memory(running_mean, running_var))


def kernel_vectors(*arrays):
    """Whether the arrays are contiguous float32 / float64 NumPy vectors, as the statistics
    kernels (update_running, frozen_stats) take them."""
    for r in arrays:
        # NumPy's own float32 / float64 dtypes: a byte-swapped one would not type in Numba
        if not (type(r) is np.ndarray and r.ndim == 1 and (r.dtype is _F32 or r.dtype is _F64)
                and r.flags.c_contiguous):
            return False
    return True


def backward(plan, dy, x, dx, mean, rstd, w, frozen, *, y=None, relu=False, dz=None,
             centered=True):
    """dx into `dx` (and the residual's gradient into `dz` when given); returns (dweight,
    dbias) as float64 vectors of C * Q cells.

    mean, rstd: statistics (O * C values) in float64 or in the parameters' dtype w.dtype (the
    saved statistics' dtype: the row kernels read them as they are, the other paths convert
    them to float64); with `frozen` they are constants. With relu, y is the forward's output
    and dy is masked by y > 0. centered=False is RMSNorm.
    """
    O, A, C, B, P = plan.O, plan.A, plan.C, plan.B, plan.P
    Q = B // P
    if x.dtype.char == "e":
        dy, x, dx = dy.view(np.uint16), x.view(np.uint16), dx.view(np.uint16)
    y = _bits(y) if relu else _none_like(dy)
    dz = _none_like(dx) if dz is None else _bits(dz)
    if plan.backward_path == "rows":
        nblk = plan.nblk
        dbias, dweight = np.zeros((nblk, C * Q)), np.zeros((nblk, C * Q))
        kernel = rows_backward_kernel(A, C, B, P, relu, dz.size, plan.short_cells)
        _run(plan, kernel, dy, y, relu, x, O, A, C, B, P, mean, rstd, w, row_cells(plan, w),
             frozen, centered, nblk, dbias, dweight, dx, dz, streams(dx))
        if nblk == 1:
            return dweight[0], dbias[0]
        return dweight.sum(0), dbias.sum(0)
    mean, rstd = mean.astype(_F64, copy=False), rstd.astype(_F64, copy=False)
    if plan.backward_path.startswith("columns"):
        shape = (O, C * Q)
        dbias, dweight = np.empty(shape), np.empty(shape)
        if plan.backward_path == "columns_fused":
            kernel = K.column_backward if relu or dz.size else K.column_backward_plain
            _run(plan, kernel, dy, y, relu, x, O, A, C, B, P, plan.Sb, mean, rstd, w,
                 frozen, centered, dbias, dweight, dx, dz,
                 streams(dx) and plan.Sb == 1)
        else:
            kernel = (K.column_backward_chunks if relu or dz.size
                      else K.column_backward_chunks_plain)
            _run(plan, kernel, dy, y, relu, x, O, A, C, B, P, plan.K, mean,
                 rstd, w, frozen, centered, dbias, dweight, dx, dz, streams(dx))
        if O == 1:
            return dweight[0], dbias[0]
        return dweight.sum(0), dbias.sum(0)
    shape = (O, plan.K, C * Q)
    sdy, sdyxhat = np.empty(shape), np.empty(shape)
    sums_kernel, dx_kernel = flat_backward_kernels(plan, relu, dz.size)
    _run(plan, sums_kernel, dy, y, relu, x, O, A, C, B, plan.P, plan.K, mean, rstd, w,
         sdy, sdyxhat)
    sdy, sdyxhat = sdy.sum(1), sdyxhat.sum(1)                      # (O, C * Q)
    n = A * B
    wq = w.reshape(C, Q)
    zeros = np.zeros(O * C)
    c1 = zeros if frozen else (sdyxhat.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n
    c2 = zeros if frozen or not centered else (sdy.reshape(O, C, Q) * wq).sum(2).reshape(-1) / n
    _run(plan, dx_kernel, dy, y, relu, x, O, A, C, B, plan.P, plan.K, mean, rstd, w,
         c1, c2, dx, dz, streams(dx))
    return sdyxhat.sum(0), sdy.sum(0)

"""Plans are pure Python; every registered kernel is exercised for float32 and float64."""
import functools
import os
import platform
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import normcore as nc
from normcore import _cpu
from normcore._plan import (plan_batch_norm, plan_group_norm, plan_instance_norm,
                            plan_layer_norm, plan_moments)
from normcore.kernels import cpu

T = 2  # thread count the plans below are made for
_bn_float32 = functools.partial(plan_batch_norm, itemsize=4)
_bn_float16 = functools.partial(plan_batch_norm, itemsize=2)


@pytest.mark.parametrize("planner, args, view", [
    (plan_batch_norm, ((32, 64, 56, 56), 1), (1, 32, 64, 3136, 3136)),
    (plan_batch_norm, ((32, 56, 56, 64), -1), (1, 32 * 56 * 56, 64, 1, 1)),
    (plan_batch_norm, ((8, 5, 64, 7), 2), (1, 40, 64, 7, 7)),
    (plan_batch_norm, ((256, 1), 1), (1, 1, 1, 256, 256)),     # C == 1: one long run
    (plan_instance_norm, ((32, 64, 56, 56), 1), (32, 1, 64, 3136, 3136)),
    (plan_instance_norm, ((32, 56, 56, 64), -1), (32, 56 * 56, 64, 1, 1)),
    (plan_group_norm, ((32, 64, 56, 56), 32, 1), (32, 1, 32, 2 * 3136, 3136)),
    (plan_group_norm, ((32, 56, 56, 64), 32, -1), (32, 56 * 56, 32, 2, 1)),
    (plan_layer_norm, ((8, 16, 1024), -1), (128, 1, 1, 1024, 1)),
    (plan_layer_norm, ((8, 16, 32), (-2, -1)), (8, 1, 1, 512, 1)),
])
def test_canonical_views(planner, args, view):
    plan = planner(*args, T)
    assert (plan.O, plan.A, plan.C, plan.B, plan.P) == view
    assert plan.B % plan.P == 0
    assert plan.O * plan.A * plan.C * plan.B == int(np.prod(args[0]))


@pytest.mark.parametrize("planner, args, path, backward_path", [
    (plan_batch_norm, ((32, 64, 56, 56), 1), "rows", "rows"),     # a channel stays in cache
    (_bn_float32, ((32, 64, 56, 56), 1), "flat", "rows"),         # the forward streams x
    (_bn_float32, ((16, 32, 64, 64), 1), "rows", "rows"),         # below FLAT_FORWARD
    (_bn_float16, ((32, 64, 56, 56), 1), "flat", "flat"),
    (plan_batch_norm, ((32, 3, 224, 224), 1), "flat", "flat"),    # too few channels
    (plan_batch_norm, ((256, 256, 14, 14), 1), "flat", "flat"),   # short strided runs
    (plan_batch_norm, ((2048, 64, 32, 32), 1), "flat", "flat"),   # a channel is too large
    (plan_batch_norm, ((32, 56, 56, 64), -1), "columns", "columns"),
    (plan_layer_norm, ((8192, 1024), -1), "rows", "rows"),
    (plan_layer_norm, ((2, 1 << 20), -1), "flat", "rows"),        # few long rows
    (plan_instance_norm, ((2, 3, 1 << 20), 1), "flat", "flat"),
    (plan_instance_norm, ((32, 56, 56, 64), -1), "columns_fused", "columns_fused"),
    (plan_group_norm, ((32, 56, 56, 64), 32, -1), "columns_fused", "columns_fused"),
    (plan_instance_norm, ((1, 56, 56, 64), -1), "columns", "columns"),     # too few samples
    (plan_batch_norm, ((128, 1024), 1), "columns_fused", "columns_fused"),  # slices of C
    (plan_batch_norm, ((256, 1024), 1), "columns", "columns"),        # chunks of rows
    (_bn_float16, ((256, 1024), 1), "columns", "columns_fused"),      # its backward: slices
    (plan_batch_norm, ((256, 64, 4, 4), 1), "columns", "columns"),     # chunks, runs of 16
    (plan_group_norm, ((1, 32, 32, 256), 32, -1), "columns", "columns"),   # one sample
    (plan_batch_norm, ((8192, 1024), 1), "columns", "columns"),       # too large to slice
    (plan_batch_norm, ((4, 8, 16), 2), "columns_fused", "columns_fused"),   # serial
    # runs of 16-63 values: flat when the columns would be swept more than 2048 at a time
    (plan_batch_norm, ((64, 256, 7, 7), 1), "flat", "flat"),
    (plan_batch_norm, ((8, 64, 7, 7), 1), "flat", "flat"),                   # serial
    (plan_batch_norm, ((512, 128, 4, 4), 1), "columns", "columns"),          # 2048 columns
    (plan_batch_norm, ((32, 128, 7, 7), 1), "columns_fused", "columns_fused"),  # slices
    (plan_batch_norm, ((1024, 64, 3, 3), 1), "columns", "columns"),          # runs of 9
    (_bn_float16, ((64, 256, 7, 7), 1), "flat", "flat"),      # float16: from 8192 columns
    (_bn_float16, ((256, 64, 7, 7), 1), "columns", "columns"),
])
def test_paths(planner, args, path, backward_path):
    plan = planner(*args, T)
    assert (plan.path, plan.backward_path) == (path, backward_path)
    assert plan.K >= 1 and plan.nblk >= 1 and 1 <= plan.S <= plan.C


@pytest.mark.parametrize("shape, axis, normalize_path", [
    ((128, 64, 4, 4), 1, "columns"),    # 1024 columns
    ((32, 256, 4, 4), 1, "flat"),
    ((32, 128, 7, 7), 1, "flat"),       # fused columns for the training forward
    ((256, 64, 3, 3), 1, "columns"),    # runs of 9
    ((256, 1024), 1, "columns"),        # BatchNorm 2-D
    ((32, 64, 56, 56), 1, "flat"),      # long runs
])
def test_normalize_path(shape, axis, normalize_path):
    """The normalize pass alone (eval) goes flat for runs of 16 values or more unless the
    columns are few."""
    assert plan_batch_norm(shape, axis, T).normalize_path == normalize_path


@pytest.mark.parametrize("shape, groups, itemsize, short_cells", [
    ((64, 256, 7, 7), 32, 4, True),
    ((64, 256, 7, 7), 32, 2, True),
    ((64, 256, 7, 7), 32, 8, False),    # float64: each cell's loop vectorizes
    ((64, 256, 8, 8), 32, 4, True),     # cells of SHORT_CELL values
    ((32, 256, 4, 4), 32, 4, True),
    ((16, 256, 7, 7), 32, 4, False),    # too few samples to repay the repeat
    ((64, 128, 14, 14), 32, 4, False),  # 196
    ((64, 256, 7, 7), 256, 8, True),    # one cell per statistic, as InstanceNorm's
    ((64, 64, 1, 1), 16, 4, False),     # cells of one value: parameters per element already
])
def test_short_cells(shape, groups, itemsize, short_cells):
    """The row kernels take the parameters repeated per element for cells of <= 64 values
    and 32 samples or more: float16 / float32 GroupNorm, and every dtype where a cell is a
    whole statistic (InstanceNorm)."""
    plan = plan_group_norm(shape, groups, 1, T, itemsize)
    assert plan.path == "rows" and plan.short_cells == short_cells
    assert not plan_layer_norm((512, 768), -1, T).short_cells


@pytest.mark.parametrize("shape, short_cells", [
    ((64, 256, 7, 7), True), ((32, 64, 8, 8), True), ((64, 512, 4, 4), True),
    ((64, 128, 14, 14), False), ((16, 256, 7, 7), False)])
def test_short_instance_rows(shape, short_cells):
    plan = plan_instance_norm(shape, 1, T)
    assert plan.path == "rows" and plan.short_cells == short_cells


def _assert_moments_match_numpy(shape, axis, dtype, seed):
    """nc.moments over `axis` of a shifted normal sample equals NumPy's float64 mean and
    variance within 64 ulps of the dtype."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 3 + 7
    mean, var = nc.moments(x, axis=axis)
    x64 = x.astype(np.float64)
    tol = 64 * np.finfo(dtype).eps
    np.testing.assert_allclose(mean, x64.mean(axis=axis), rtol=tol)
    np.testing.assert_allclose(var, x64.var(axis=axis), rtol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_of_wide_short_runs_go_flat(dtype):
    """moments over (0, 2, 3) of channels-first maps of 16-63 values takes BatchNorm's rule
    (flat above 2048 columns), with NumPy's float64 mean and variance."""
    shape = (8, 96, 5, 5)
    plan, perm = plan_moments(shape, (0, 2, 3), T)
    assert perm is None and plan.path == "flat"
    _assert_moments_match_numpy(shape, (0, 2, 3), dtype, seed=5)


@pytest.mark.parametrize("shape", [(4, 8, 32, 32), (8, 16, 32, 32)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_of_statistics_over_several_runs_read_memory_in_order(shape, dtype):
    """moments over (0, 2, 3) of channels-first maps, whose plan is the forward's rows (a
    statistic's runs kept in cache for its second pass), sums with the flat kernel, which
    reads memory in order, and still gives NumPy's float64 mean and variance; the first shape
    runs on the calling thread, the second in chunks on the threads."""
    plan, perm = plan_moments(shape, (0, 2, 3), T)
    assert perm is None and plan.path == "rows" and plan.A > 1
    _assert_moments_match_numpy(shape, (0, 2, 3), dtype, seed=6)


def test_fused_column_slices():
    """Slices go round the threads, hold whole channels and are not too narrow."""
    plan = plan_batch_norm((128, 1024), 1, T)
    assert plan.S == 8 and plan.C * plan.B // plan.S >= 128
    assert plan.Sb == 2                                  # the backward's: 512 columns
    assert plan_batch_norm((64, 4096), 1, T).Sb == 8
    plan = plan_batch_norm((160, 256), 1, T)             # rows of 256: 2 slices of 128
    assert plan.S == 2 and plan.path == "columns_fused"
    plan = plan_group_norm((2, 256, 1024), 32, -1, T)    # O = 2: 4 slices each, of 8 groups
    assert (plan.O, plan.S, plan.C, plan.B) == (2, 4, 32, 32) and plan.path == "columns_fused"
    assert plan.Sb == 2
    plan = plan_batch_norm((4096, 64), 1, T)              # rows too short to slice
    assert plan.S == 1 and plan.path == "columns"
    # enough rows per thread (CHUNK_ROWS): chunks of whole rows instead, each >= CHUNK_ROWS
    plan = plan_batch_norm((256, 1024), 1, T)
    assert (plan.S, plan.path, plan.K) == (1, "columns", 2)
    assert plan_batch_norm((8192, 1024), 1, T).K == 8
    plan = plan_batch_norm((200, 32, 3, 3), 1, T)        # one MIN_ITEM: still one per thread
    assert (plan.S, plan.path, plan.K) == (1, "columns", T)
    assert plan_instance_norm((32, 56, 56, 64), -1, T).S == 1      # enough samples


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([16, 32, 48, 64]), st.integers(0, 3), st.integers(0, 150),
       st.sampled_from([np.float16, np.float32]), st.data())
def test_short_column_rows_moments_match_float64_with_an_outlier_first(J, lo, n, dtype, data):
    """The narrow column moments of whole rows of 1-4 windows (short_rows_column_moments: sums
    in float32 registers per block of BLOCK_ROWS rows, shifted by the first block's means) on
    rows [lo, lo + n) far from 0 whose first row lies 40 standard deviations off: NumPy's
    float64 mean and variance within 4 * sqrt(BLOCK_ROWS) float32 ulps, what centered sums
    of BLOCK_ROWS terms keep (the sweeps, shifted by each block's first row, were off by up
    to 121 ulps on such rows of 64). A NaN makes its own column's statistics NaN, in the
    first block or later."""
    rng = np.random.default_rng(J * 1000 + lo * 100 + n)
    N = lo + n + 2
    x = (1000 + rng.standard_normal((N, J))).astype(dtype)
    x[lo] += 40
    nan_row = data.draw(st.integers(lo, lo + n - 1)) if n else None
    nan_col = data.draw(st.integers(0, J - 1))
    if nan_row is not None and data.draw(st.booleans()):
        x[nan_row, nan_col] = np.nan
    else:
        nan_row = None
    flat = x.view(np.uint16) if dtype == np.float16 else x
    mean, m2 = np.full(J, 7.0), np.full(J, 7.0)
    count = cpu.rows_column_moments(flat.reshape(-1), J, 0, J, lo, lo + n, mean, m2, True)
    assert count == n
    if n == 0:
        assert (mean == 0).all() and (m2 == 0).all()
        return
    x64 = x[lo:lo + n].astype(np.float64)
    eps = np.finfo(np.float32).eps
    finite = np.ones(J, bool)
    if nan_row is not None:
        finite[nan_col] = False
        assert np.isnan(mean[nan_col]) and np.isnan(m2[nan_col])
    want_var = x64[:, finite].var(axis=0)
    scale = np.sqrt(want_var) + 1
    np.testing.assert_allclose(mean[finite], x64[:, finite].mean(axis=0),
                               rtol=0, atol=4 * eps * (1000 + scale.max()))
    np.testing.assert_allclose(m2[finite] / n, want_var, rtol=4 * np.sqrt(cpu.BLOCK_ROWS) * eps,
                               atol=eps * eps)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([16, 32, 48, 64, 40]), st.integers(0, 3), st.integers(0, 100),
       st.sampled_from([np.float16, np.float32, np.float64]), st.booleans())
def test_short_column_rows_gradient_sums_match_float64(J, r0, n, dtype, relu):
    """backward_column_sums on whole rows of 1-4 windows (window_gradient_sums*: the block's
    sums in registers) and on the rest (the sweeps: 40 columns, or behind a ReLU) adds sum(dy)
    and sum(dy * (x - mean)) per column onto s1, s2 within the compute dtype's rounding of
    sums of BLOCK_ROWS terms, against float64."""
    rng = np.random.default_rng(J * 1000 + r0 * 100 + n)
    N = r0 + n + 2
    x = (5 + rng.standard_normal((N, J))).astype(dtype)
    dy = rng.standard_normal((N, J)).astype(dtype)
    y = np.maximum(rng.standard_normal((N, J)), 0).astype(dtype) if relu else dy[:0]
    compute = np.float64 if dtype == np.float64 else np.float32
    mean = 5 + rng.standard_normal(J)
    hi = mean.astype(compute)
    lo = (mean - hi).astype(compute) if compute == np.float32 else np.zeros(J)
    s1, s2 = np.full(J, 0.5), np.full(J, -0.25)

    def bits(a):
        return a.view(np.uint16).reshape(-1) if dtype == np.float16 else a.reshape(-1)

    cpu.backward_column_sums(bits(dy), bits(y), relu, bits(x), J, 0, J, r0, r0 + n, hi, lo,
                             s1, s2)
    g = dy[r0:r0 + n].astype(np.float64)
    if relu:
        g = np.where(y[r0:r0 + n] > 0, g, 0.0)
    c = x[r0:r0 + n].astype(np.float64) - (hi.astype(np.float64) + lo)
    eps = np.finfo(compute).eps
    bound = 4 * np.sqrt(cpu.BLOCK_ROWS) * eps
    for got, start, terms in ((s1, 0.5, g), (s2, -0.25, g * c)):
        error = np.abs(got - (start + terms.sum(axis=0)))
        assert (error <= bound * (np.abs(terms).sum(axis=0) + 1)).all(), error


def test_plan_moments_views_without_copy_when_possible():
    plan, perm = plan_moments((3, 4, 5, 6), (1, 3), T)     # kept (0, 2): O, A, C, B
    assert perm is None and (plan.O, plan.A, plan.C, plan.B) == (3, 4, 5, 6)
    plan, perm = plan_moments((3, 4, 5, 6), (0, 2), T)     # kept (1, 3): A, C, B, C -> copy
    assert perm == (1, 3, 0, 2) and plan.stats_shape == (4, 6)


def test_plans_are_cached():
    assert plan_batch_norm((4, 8, 3), 1, T) is plan_batch_norm((4, 8, 3), 1, T)


def _exercise_every_path(dtype, rows):
    """Touch every kernel: `rows` chooses a small (serial twins) or large (parallel) input."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, 3, 96), dtype=np.float64).astype(dtype)
    dy = np.ones_like(x)
    for fwd, bwd in [(nc.batch_norm_forward, nc.batch_norm_backward),            # flat
                     (nc.instance_norm_forward, nc.instance_norm_backward)]:     # rows
        for activation in (None, "relu"):      # (flat: the ReLU's backward a call per run)
            f = fwd(x, activation=activation)
            bwd(dy, x, f.mean, f.rstd, activation=activation, y=f.y)
    # runs of STREAM_RUN values or more: the flat backward a call per run, without ReLU too
    xb = rng.standard_normal((max(2, rows // 8), 3, 1100)).astype(dtype)
    f = nc.batch_norm_forward(xb)
    nc.batch_norm_backward(np.ones_like(xb), xb, f.mean, f.rstd)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))                            # columns
    for activation in (None, "relu"):       # fused when small, else row chunks
        f = nc.batch_norm_forward(xl, axis=-1, activation=activation)
        nc.batch_norm_backward(np.ones_like(xl), xl, f.mean, f.rstd, axis=-1,
                               activation=activation, y=f.y)
    nc.batch_norm(xl, running_mean=f.mean, running_var=f.rstd, training=False, axis=-1)
    # the general path's eval (column_normalize; the small call's runs frozen_normalize)
    nc.batch_norm(xl, running_mean=f.mean, running_var=f.rstd, training=False, axis=-1,
                  activation="relu")
    # the row kernels' loops, one kernel each (normcore/_cpu.py: rows_forward_kernel), with
    # the ReLU epilogue and without; a few long rows: the flat kernels' run per call
    for shape in ((rows, 48), (rows, 96), (rows, 1100), (2, 8192 * max(1, rows // 16))):
        xr = rng.standard_normal(shape).astype(dtype)
        for activation in (None, "relu"):
            f = nc.layer_norm_forward(xr, activation=activation)
            nc.layer_norm_backward(np.ones_like(xr), xr, f.mean, f.rstd, activation=activation,
                                   y=f.y)
    nc.moments(xl, axis=(0, 1))                                                 # column_moments
    nc.moments(x, axis=-1)                                                      # rows_moments
    xi = rng.standard_normal((max(rows, 16), 96, 3)).astype(dtype)             # columns_fused
    rdt = np.float32 if dtype == np.float16 else dtype     # float16 ones take NumPy's formula
    rm, rv = np.zeros(3, rdt), np.ones(3, rdt)                                  # update_running
    nc.batch_norm(x, running_mean=rm, running_var=rv)
    nc.batch_norm(x, running_mean=rm, running_var=rv, training=False)           # frozen_stats
    for activation in (None, "relu"):
        f = nc.instance_norm_forward(xi, axis=-1, activation=activation)
        nc.instance_norm_backward(np.ones_like(xi), xi, f.mean, f.rstd, axis=-1,
                                  activation=activation, y=f.y)


# (kernel, dtype) pairs that the front end never calls: float16 rows never take the fused
# forward, float64 rows the short rows' blocks
NEVER_TAKEN = {("rows_forward_fused", "uint16"), ("rows_forward_fused_plain", "uint16"),
               ("rows_forward_short", "float64")}


@pytest.mark.parametrize("variant, rows", [("serial", 4), ("parallel", 1024)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_registered_kernel_runs(dtype, variant, rows):
    plan = plan_batch_norm((rows, 3, 96), 1, T)
    assert plan.serial == (variant == "serial") and plan.path == "flat"
    _exercise_every_path(dtype, rows)
    name = "uint16" if dtype == np.float16 else np.dtype(dtype).name   # float16 travels as bits
    for kernel_name, kernel in cpu.KERNELS.items():
        # serial-only kernels (the merge) have no twin; small column views are always fused,
        # so the row-chunk kernels' twins (and those of the kernels they call) never run
        if variant == "serial" and kernel_name.startswith(("column_forward_chunks",
                                                          "column_backward_chunks",
                                                          "column_gradient_sums",
                                                          "column_dx_chunks")):
            continue
        # the small-call path's eval on the calling thread (serial plans) only, and there
        # the plain column normalize only inside it (compiled with it, not when it comes
        # from the cache)
        if variant == "parallel" and kernel_name == "frozen_normalize":
            continue
        if variant == "serial" and kernel_name == "column_normalize_plain":
            continue
        if (kernel_name, name) in NEVER_TAKEN:
            continue
        kernel = getattr(kernel, "serial", kernel) if variant == "serial" else kernel
        signatures = [str(sig) for sig in kernel.signatures]
        assert signatures, f"{kernel_name} ({variant}) never compiled"
        # the merge and the running statistics' kernels take statistics, not data (float16
        # running statistics take the NumPy formula)
        if kernel_name not in ("merge_moments", "update_running", "frozen_stats"):
            assert any(name in sig for sig in signatures), (kernel_name, signatures)


def _streamed_and_plain(run, monkeypatch):
    """run()'s results with the outputs streamed where they may be, then with plain stores
    only (STREAM_MIN out of reach)."""
    streamed = run()
    monkeypatch.setattr(_cpu, "STREAM_MIN", 1 << 62)
    return streamed, run()


def _aligned_empty(like):
    """An empty array like `like` whose data start on a 64-byte boundary."""
    raw = np.empty(like.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + like.nbytes].view(like.dtype).reshape(like.shape)


@pytest.mark.parametrize("norm, shape, axis, dtype", [(*case, np.float32) for case in [
    ("instance", (2, 4, 524289), 1),      # rows, odd lengths
    ("instance", (1024, 4, 1025), 1),     # rows of one cell, the backward's short_cells_loop
    ("instance", (4096, 16, 8, 8), 1),    # short cells: blocks of short rows, whole lines
    ("batch", (64, 3, 32771), 1),         # flat
    ("batch", (128, 173, 14, 14), 1),     # flat, runs of 196: windows across two runs
    ("layer", (4099, 1025), -1),          # weight per element
    ("layer", (262144, 32), -1),          # short rows in blocks, each whole 64-byte lines
    ("layer", (1027, 4096), -1),          # rows of PAIR_ROW bytes, in pairs: whole windows
    ("layer", (1023, 4103), -1),          # and windows across each row's ends
    ("batch", (16, 37, 113, 64), -1),     # columns, channels-last
    ("batch", (4099, 1025), 1),           # columns, 2-D: rows of an odd length
    ("group", (64, 32, 33, 64), -1),      # columns fused per sample
]] + [pytest.param(*case, np.float64, id=f"{case[0]}-float64-{i}") for i, case in enumerate([
    # the row, column and run helpers stream float64 too
    ("batch", (8, 37, 113, 64), -1),      # columns, channels-last
    ("batch", (2051, 1025), 1),           # columns, 2-D
    ("group", (32, 32, 33, 64), -1),      # columns fused per sample
    ("batch", (64, 173, 14, 14), 1),      # flat, runs of 196
    ("instance", (2, 4, 262145), 1),
    ("instance", (512, 4, 1025), 1),
    ("layer", (2051, 1025), -1),
    ("group", (16, 32, 64, 65), 1),       # cells of 4160 values, two per row
    ("batch", (32, 3, 32771), 1),         # flat
])])
def test_streamed_outputs_equal_plain_ones(norm, shape, axis, dtype, monkeypatch):
    """y and dx of STREAM_MIN bytes and more use non-temporal stores (scalar head up to a
    window boundary, windows of LANES (y) or DX_LANES (dx) values, scalar tail): the plain
    loops' results, bit for bit up to contraction (_assert_equal_up_to_contraction)."""
    x = np.random.default_rng(4).standard_normal(shape, dtype=dtype)
    assert x.nbytes >= _cpu.STREAM_MIN
    w = np.linspace(0.5, 2, x.shape[-1], dtype=dtype)
    C = x.shape[axis]
    wc = np.linspace(0.5, 2, C, dtype=dtype)
    fwd, bwd = {
        "instance": (nc.instance_norm_forward, nc.instance_norm_backward),
        "batch": (lambda x: nc.batch_norm_forward(x, wc, wc - 1, axis=axis),
                  lambda dy, x, mean, rstd: nc.batch_norm_backward(dy, x, mean, rstd, wc,
                                                                   axis=axis)),
        "group": (lambda x: nc.group_norm_forward(x, 8, wc, wc - 1, axis=axis),
                  lambda dy, x, mean, rstd: nc.group_norm_backward(dy, x, mean, rstd, 8, wc,
                                                                   axis=axis)),
        # short rows stream only into 64-byte aligned outputs (NumPy's large arrays start
        # 16 bytes past a page)
        "layer": (lambda x: nc.layer_norm_forward(x, w, w - 1, out=_aligned_empty(x)),
                  lambda dy, x, mean, rstd: nc.layer_norm_backward(dy, x, mean, rstd, w))}[norm]
    dy = np.random.default_rng(5).standard_normal(shape, dtype=dtype)

    def run():
        f = fwd(x)         # runs of odd length: most start off a 64-byte boundary
        out = [f.y, bwd(dy, x, f.mean, f.rstd).dx]
        if norm == "batch":
            rm, rv = f.mean.astype(dtype) + 0.25, np.full(C, 2.0, dtype)
            out.append(nc.batch_norm(x, wc, wc - 1, running_mean=rm, running_var=rv,
                                     training=False, axis=axis))
        return out

    streamed, plain = _streamed_and_plain(run, monkeypatch)
    for got, want in zip(streamed, plain):
        _assert_equal_up_to_contraction(got, want)


def _at_page_offset(like, offset):
    """An empty array like `like` whose data start `offset` bytes past a 4 KiB boundary."""
    raw = np.empty(like.nbytes + 8192, np.uint8)
    start = -raw.ctypes.data % 4096 + offset
    return raw[start:start + like.nbytes].view(like.dtype).reshape(like.shape)


@pytest.mark.parametrize("past", [16, 48, 112, 176])
@pytest.mark.parametrize("norm, shape, axis, dtype", [
    ("instance", (2, 4, 524289), 1, np.float32),      # rows, odd lengths
    ("instance", (2, 4, 262147), 1, np.float64),
    ("group", (2, 4, 524289), 1, np.float32),         # rows of two cells (2 groups)
    ("batch", (64, 3, 32771), 1, np.float32),         # flat
    ("batch", (128, 173, 14, 14), 1, np.float32),     # flat, runs of 196: across two runs
    ("layer", (4099, 1025), -1, np.float32),          # rows: windows across the rows' ends
    ("layer", (1031, 4101), -1, np.float32),          # rows of LONG_ROW bytes and more
    ("batch", (16, 37, 113, 64), -1, np.float32),     # columns, channels-last
    ("batch", (4099, 1025), 1, np.float32),           # columns, 2-D: rows of an odd length
])
def test_streamed_outputs_just_past_x_equal_plain_ones(norm, shape, axis, dtype, past,
                                                       monkeypatch):
    """Outputs that start `past` bytes after x modulo 4 KiB (under a group of windows: 2 or 4
    windows of 32 to 128 bytes) take their streamed windows in groups, each group's upper
    window first (_window_loop, and the columns' dx in _streaming_columns): the plain loops'
    results, heads and tails included, bit for bit up to contraction."""
    x = _at_page_offset(np.empty(shape, dtype), 256)
    x[...] = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    dy = _at_page_offset(x, 256)
    dy[...] = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    assert x.nbytes >= _cpu.STREAM_MIN
    if shape == (1031, 4101):   # the long rows' own loop (prefetch_l2), in pairs
        assert shape[-1] * x.itemsize >= max(cpu.LONG_ROW, cpu.PAIR_ROW)
    C = x.shape[axis]
    w = np.linspace(0.5, 2, C, dtype=dtype)
    fwd, bwd = {
        "instance": (nc.instance_norm_forward, nc.instance_norm_backward),
        "batch": (nc.batch_norm_forward, nc.batch_norm_backward),
        "group": (lambda x, w, b, **k: nc.group_norm_forward(x, 2, w, b, **k),
                  lambda dy, x, mean, rstd, w, **k: nc.group_norm_backward(dy, x, mean, rstd,
                                                                           2, w, **k)),
        "layer": (nc.layer_norm_forward, nc.layer_norm_backward)}[norm]

    def run():
        y, dx = _at_page_offset(x, 256 + past), _at_page_offset(x, 256 + past)
        assert (y.ctypes.data - x.ctypes.data) % 4096 == past
        f = fwd(x, w, w - 1, axis=axis, out=y)
        bwd(dy, x, f.mean, f.rstd, w, axis=axis, dx_out=dx)
        return y, dx

    streamed, plain = _streamed_and_plain(run, monkeypatch)
    for got, want in zip(streamed, plain):
        _assert_equal_up_to_contraction(got, want)


def _assert_equal_up_to_contraction(got, want):
    """Bit for bit, or within the rounding that LLVM's fused multiply-adds leave: on the AMD
    EPYC (Zen) of session 27, InstanceNorm (512, 4, 1025) float64's dx, freshly compiled
    (not loaded from the cache), differed from the plain loop's in 2% of the values by about
    an ulp. A window or index off by one is off by far more than this."""
    if not np.array_equal(got, want):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * np.finfo(want.dtype).eps * scale)


@pytest.mark.parametrize("norm, shape, axis", [
    ("batch", (4, 3, 349527), 1),         # flat: runs of one cell, streamed run by run
    ("instance", (2, 4, 524289), 1),      # rows, odd lengths
    ("group", (8, 16, 32769), 1),         # rows of two cells
    ("layer", (4096, 1025), -1),          # long rows, seamed
    ("layer", (8192, 512), -1),           # short rows, seamed
    ("batch", (16, 37, 113, 64), -1),     # columns in chunks of rows, channels-last
    ("group", (64, 32, 33, 64), -1),      # columns fused per sample
])
def test_streamed_backward_behind_a_relu_equals_the_plain_one(norm, shape, axis, monkeypatch):
    """Behind a ReLU (activation="relu", y) and with the residual's gradient (residual=True),
    the backward streams dx (dy masked by y > 0 in the windows) and dz: bit for bit the plain
    loops' dx and dz."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    assert x.nbytes >= _cpu.STREAM_MIN
    C = x.shape[axis]
    wc = np.linspace(0.5, 2, C, dtype=np.float32)
    fwd, bwd = {
        "batch": (lambda **kw: nc.batch_norm_forward(x, wc, wc - 1, axis=axis, **kw),
                  lambda f, **kw: nc.batch_norm_backward(dy, x, f.mean, f.rstd, wc, axis=axis,
                                                         **kw)),
        "instance": (lambda **kw: nc.instance_norm_forward(x, wc, wc - 1, axis=axis, **kw),
                     lambda f, **kw: nc.instance_norm_backward(dy, x, f.mean, f.rstd, wc,
                                                               axis=axis, **kw)),
        "group": (lambda **kw: nc.group_norm_forward(x, 8, wc, wc - 1, axis=axis, **kw),
                  lambda f, **kw: nc.group_norm_backward(dy, x, f.mean, f.rstd, 8, wc,
                                                         axis=axis, **kw)),
        "layer": (lambda **kw: nc.layer_norm_forward(x, wc, wc - 1, **kw),
                  lambda f, **kw: nc.layer_norm_backward(dy, x, f.mean, f.rstd, wc, **kw))}[norm]
    f = fwd(activation="relu", residual=-x)     # y == 0 where x's normalized value is small
    assert (f.y == 0).any() and (f.y > 0).any()

    def run():
        masked = bwd(f, activation="relu", y=f.y)
        both = bwd(f, activation="relu", y=f.y, residual=True)
        return [masked.dx, both.dx, both.dresidual]

    streamed, plain = _streamed_and_plain(run, monkeypatch)
    for got, want in zip(streamed, plain):
        assert np.array_equal(got, want)
    assert np.array_equal(plain[2], np.where(f.y > 0, dy, 0))


@pytest.mark.parametrize("norm, shape, axis, dtype", [
    ("batch", (4, 3, 349527), 1, np.float32),      # flat: runs of one cell (affine_runs)
    ("batch", (128, 173, 14, 14), 1, np.float32),  # flat: windows across runs of 196
    ("batch", (16, 37, 113, 64), -1, np.float32),  # columns in chunks of rows
    ("group", (64, 32, 33, 64), -1, np.float32),   # columns fused per sample
    ("batch", (2, 3, 349527), 1, np.float64),      # float64 runs: ReLU alone streams
    ("group", (32, 32, 33, 64), -1, np.float64),
    ("layer", (65536, 64), -1, np.float32),        # short rows, fused (streamed_fused_rows)
    ("layer", (1023, 4103), -1, np.float32),       # long rows in pairs (_seamed_pair)
    ("layer", (16384, 257), -1, np.float64),
])
def test_streamed_forward_epilogue_equals_the_plain_one(norm, shape, axis, dtype, monkeypatch):
    """With a residual, ReLU or both, the BatchNorm runs, the column kernels and LayerNorm's
    short rows stream y (the epilogue in the windows; plain stores before the first window
    boundary of an `out=` 3 values past a line): bit for bit the plain loops' y."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape, dtype=dtype)
    z = rng.standard_normal(shape, dtype=dtype)
    assert x.nbytes >= _cpu.STREAM_MIN
    C = x.shape[axis]
    wc = np.linspace(0.5, 2, C, dtype=dtype)
    if norm == "batch":
        def norm_forward(**kw):
            return nc.batch_norm_forward(x, wc, wc - 1, axis=axis, **kw)
    elif norm == "layer":
        def norm_forward(**kw):
            return nc.layer_norm_forward(x, wc, wc - 1, **kw)
    else:
        def norm_forward(**kw):
            return nc.group_norm_forward(x, 8, wc, wc - 1, axis=axis, **kw)

    def fwd(**kw):
        buf, out = _offset_buffer(x.size, dtype, 3)
        norm_forward(out=out.reshape(shape), **kw)
        assert _untouched_around(buf, out)
        return out

    def run():
        return [fwd(activation="relu"), fwd(residual=z), fwd(activation="relu", residual=z)]

    streamed, plain = _streamed_and_plain(run, monkeypatch)
    for got, want in zip(streamed, plain):
        assert np.array_equal(got, want)
    assert (plain[0] == 0).any() and (plain[2] == 0).any()


@pytest.mark.parametrize("samples", [0, 1, 3])
def test_frozen_stats_writes_its_samples_only(samples):
    """The eval statistics' kernel, run as plain Python (py_func) so that NumPy checks every
    index: `samples` samples of C channels, nothing written without samples (InstanceNorm
    eval of an empty batch), bit for bit the float64 formula."""
    C = 5
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    mean, rstd = np.empty(samples * C), np.empty(samples * C)
    mean_out, rstd_out = np.empty(samples * C, np.float32), np.empty(samples * C, np.float32)
    cpu.frozen_stats.py_func(rm, rv, 1e-5, mean, rstd, mean_out, rstd_out)
    want = np.tile(1.0 / np.sqrt(rv + 1e-5), samples)
    assert np.array_equal(mean, np.tile(rm, samples)) and np.array_equal(rstd, want)
    assert np.array_equal(rstd_out, want.astype(np.float32))
    assert np.array_equal(mean_out, np.tile(rm, samples).astype(np.float32))
    x = np.ones((0, C, 4), np.float32)
    f = nc.instance_norm_forward(x, running_mean=rm, running_var=rv, use_input_stats=False)
    assert f.y.shape == x.shape and f.mean.shape == f.rstd.shape == (0, C)


@numba.njit
def _streamed_runs(x, d, ya, yd, B, b0, c0, coef):
    C = coef.shape[1]
    affine = cpu.stream_affine_runs(ya, (x,), B, b0, c0, C, (coef[0], coef[1], coef[2]))
    dx = cpu.stream_dx_scalar_runs(yd, (x, d), B, b0, c0, C,
                                   (coef[0], coef[1], coef[2], coef[3]))
    cpu.sfence()
    return affine, dx


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 70), st.integers(0, 69), st.integers(1, 5), st.integers(0, 4),
       st.integers(0, 300), st.integers(0, 15), st.sampled_from([np.float32, np.float64]))
def test_streamed_runs_equal_the_plain_loops(B, b0, C, c0, n, offset, dtype):
    """stream_affine_runs / stream_dx_scalar_runs over a chunk of runs of B values (windows
    inside a run, windows across a run's end, scalar head and tail, from any alignment),
    float32 or float64: bit for bit affine_runs' / dx_scalar_runs' plain loops; runs shorter
    than a window are refused (False), nothing written."""
    b0, c0 = b0 % B, c0 % C
    rng = np.random.default_rng(B * 1000 + n)
    x = rng.standard_normal(n).astype(dtype)
    d = rng.standard_normal(n).astype(dtype)
    coef = rng.standard_normal((4, C)).astype(dtype)
    ya, yd = (np.full(n + 16, np.nan, dtype)[offset:offset + n] for _ in range(2))
    affine, dx = _streamed_runs(x, d, ya, yd, B, b0, c0, coef)
    assert affine == (B >= cpu.LANES) and dx == (B >= cpu.DX_LANES)
    want_a, want_d = np.empty(n, dtype), np.empty(n, dtype)
    cpu.affine_runs(x, x[:0], want_a, False, B, b0, c0, C, coef[0], coef[1], coef[2])
    cpu.dx_scalar_runs(d, x, want_d, B, b0, c0, C, coef[0], coef[1], coef[2], coef[3])
    if affine:
        assert np.array_equal(ya, want_a)
    else:
        assert np.isnan(ya).all()
    if dx:
        assert np.array_equal(yd, want_d)
    else:
        assert np.isnan(yd).all()


def test_streaming_helpers_emit_non_temporal_stores():
    """The stream_* helpers compute the plain formulas and compile to vmovntps
    (x86-64): a silent fallback to ordinary stores would pass the test above."""
    import numba

    f32 = np.float32
    hi, lo, sc, sh = f32(0.5), f32(1e-8), f32(1.5), f32(0.25)

    J = 40    # rows of 40 columns: aligned windows of 16 span two rows
    B, b0, c0 = 17, 5, 38    # runs of 17 values of the J channels, from offset 5 of the 39th

    @numba.njit
    def runs(x, d, cols, y7, y8):
        streamed = cpu.stream_affine_runs(y7, (x,), B, b0, c0, J, (cols[0], cols[1], cols[2]))
        streamed_dx = cpu.stream_dx_scalar_runs(y8, (x, d), B, b0, c0, J,
                                                (cols[0], cols[1], cols[2], cols[3]))
        cpu.sfence()
        return streamed and streamed_dx

    @numba.njit
    def each(x, d, w, b, cols, y1, y2, y3, y4, y5, y6):
        cpu.stream_affine(y1, (x,), (hi, sc, sh))
        cpu.stream_normalize(y2, (x, w, b), (hi, lo, sc))
        cpu.stream_dx_scalar(y3, (x, d), (sc, hi, -sc, sh))
        cpu.stream_dx(y4, (x, d, w), (hi, lo, sc, sc, sh))
        h, a, s, t = (cpu.tile_columns(cols[0]), cpu.tile_columns(cols[1]),
                      cpu.tile_columns(cols[2]), cpu.tile_columns(cols[3]))
        cpu.stream_columns_affine(y5, (x,), (h, a, s), J)
        cpu.stream_columns_dx(y6, (x, d), (h, a, s, t), J)
        cpu.sfence()

    rng = np.random.default_rng(5)
    x, d, w, b = (rng.standard_normal(1001, dtype=np.float32)[1:] for _ in range(4))
    cols = rng.standard_normal((4, J), dtype=np.float32)
    ys = [np.empty(1001, np.float32)[1:] for _ in range(8)]
    each(x, d, w, b, cols, *ys[:6])
    assert runs(x, d, cols, ys[6], ys[7])
    # within an ulp or two of NumPy's (which rounds each product before the sum)
    h, a, s, t = (np.tile(c, 1000 // J) for c in cols)
    run = (c0 + (b0 + np.arange(1000)) // B) % J         # the channel of each value
    hr, ar, sr, tr = cols[0][run], cols[1][run], cols[2][run], cols[3][run]
    wants = [(x - hi) * sc + sh, ((x - hi) - lo) * (sc * w) + b, sc * d + ((x - hi) * -sc + sh),
             (sc * w) * d - sc * ((x - hi) - lo) - sh, (x - h) * a + s, a * d - s * (x - h) - t,
             (x - hr) * ar + sr, hr * d + ((x - ar) * sr + tr)]
    for got, want in zip(ys, wants):
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=1e-6)
    if platform.machine() in ("x86_64", "AMD64"):
        assert each.inspect_asm(each.signatures[0]).count("vmovntps") >= 6
        assert runs.inspect_asm(runs.signatures[0]).count("vmovntps") >= 2
        y = short_rows(x, w, b)
        assert short_rows.inspect_asm(short_rows.signatures[0]).count("vmovntps")
        rows = x[:128].reshape(2, 64)
        want = ((rows - f32(0.5)) - f32(0)) * (f32(1.5) * w[:64]) + b[:64]
        np.testing.assert_allclose(y.reshape(2, 64), want, rtol=3e-7, atol=1e-6)


@numba.njit
def _rows_ahead(x, d, w, b, ys, B, ahead, coefficients):
    """Each row of B values of x (and d) through the four row helpers, streamed, prefetching
    `ahead` values on (0: none); the last row's prefetches run past the arrays' end."""
    hi, lo, sc, sh = coefficients
    for r in range(x.size // B):
        xs, ds, wv, bv = x[r * B:(r + 1) * B], d[r * B:(r + 1) * B], w[:B], b[:B]
        ok = cpu.stream_affine(ys[0][r * B:(r + 1) * B], (xs,), (hi, sc, sh), (xs,), ahead)
        ok &= cpu.stream_normalize(ys[1][r * B:(r + 1) * B], (xs, wv, bv), (hi, lo, sc), (xs,),
                                   ahead)
        ok &= cpu.stream_dx_scalar(ys[2][r * B:(r + 1) * B], (xs, ds), (sc, hi, -sc, sh),
                                   (xs, ds), ahead)
        ok &= cpu.stream_dx(ys[3][r * B:(r + 1) * B], (xs, ds, wv), (hi, lo, sc, sc, sh),
                            (xs, ds), ahead)
        if not ok:
            return False
    cpu.sfence()
    return True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetching_rows_equal_the_plain_windows(dtype):
    """The row helpers stream float32 and float64 rows, and their prefetch of the next row
    (`ahead`, one line per window) changes no value: bit for bit the windows without it, on
    rows of odd length (heads and tails), within an ulp or two of NumPy's formulas; on x86-64
    they compile to prefetcht0 and non-temporal stores."""
    rng = np.random.default_rng(9)
    B = 1031
    x, d, w, b = (rng.standard_normal(4 * B + 1).astype(dtype)[1:] for _ in range(4))
    hi, lo, sc, sh = coefficients = tuple(dtype(v) for v in (0.5, 1e-8, 1.5, 0.25))
    got = [np.full(4 * B, np.nan, dtype) for _ in range(4)]
    want = [np.full(4 * B, np.nan, dtype) for _ in range(4)]
    assert _rows_ahead(x, d, w, b, tuple(got), B, B, coefficients)
    assert _rows_ahead(x, d, w, b, tuple(want), B, 0, coefficients)
    for g, v in zip(got, want):
        assert not np.isnan(g).any() and np.array_equal(g, v)
    wr, br = np.tile(w[:B], 4), np.tile(b[:B], 4)
    formulas = [(x - hi) * sc + sh, ((x - hi) - lo) * (sc * wr) + br,
                sc * d + ((x - hi) * -sc + sh), (sc * wr) * d - sc * ((x - hi) - lo) - sh]
    eps = np.finfo(dtype).eps
    for g, f in zip(got, formulas):
        np.testing.assert_allclose(g, f, rtol=4 * eps, atol=4 * eps)
    if platform.machine() in ("x86_64", "AMD64"):
        sig = [s for s in _rows_ahead.signatures if s[0].dtype == numba.from_dtype(dtype)][0]
        asm = _rows_ahead.inspect_asm(sig)
        assert asm.count("prefetcht0") >= 6
        assert asm.count("vmovntpd" if dtype == np.float64 else "vmovntps") >= 4


@numba.njit
def _columns_float64(x, d, cols, y1, y2, J):
    h, a, s, t = (cpu.tile_columns(cols[0]), cpu.tile_columns(cols[1]),
                  cpu.tile_columns(cols[2]), cpu.tile_columns(cols[3]))
    ok = cpu.stream_columns_affine(y1, (x,), (h, a, s), J)
    ok &= cpu.stream_columns_dx(y2, (x, d), (h, a, s, t), J)
    cpu.sfence()
    return ok


def test_column_helpers_stream_float64():
    """stream_columns_affine / stream_columns_dx take float64 blocks too (rows of 40 columns,
    windows across rows): NumPy's formulas within an ulp or two, vmovntpd on x86-64."""
    J = 40
    rng = np.random.default_rng(6)
    x, d = (rng.standard_normal(1001)[1:] for _ in range(2))
    cols = rng.standard_normal((4, J))
    y1, y2 = np.empty(1001)[1:], np.empty(1001)[1:]
    assert _columns_float64(x, d, cols, y1, y2, J)
    h, a, s, t = (np.tile(c, 1000 // J) for c in cols)
    np.testing.assert_allclose(y1, (x - h) * a + s, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(y2, a * d - s * (x - h) - t, rtol=1e-15, atol=1e-15)
    if platform.machine() in ("x86_64", "AMD64"):
        sig = _columns_float64.signatures[0]
        assert _columns_float64.inspect_asm(sig).count("vmovntpd") >= 2


@numba.njit
def short_rows(x, w, b):
    """Two rows of 64 values normalized by the short rows' helper with streaming asked for:
    its non-temporal stores come from stream_normalize (the equality test above cannot tell
    streamed rows from plain ones)."""
    f32 = np.float32
    y = np.empty(256, np.float32)
    y = y[(-y.ctypes.data) % 64 // 4:][:128]       # whole 64-byte lines
    cpu.short_rows_normalize(x[:128], x[:0], False, y, 0, 2, 1, 64, np.full(2, f32(0.5)),
                             np.zeros(2, f32), np.full(2, f32(1.5)), w[:64], b[:64], True)
    return y


VECTOR_SCRIPT = textwrap.dedent("""
    import re
    import numpy as np
    import normcore as nc
    from normcore.kernels import cpu as K
    rng = np.random.default_rng(0)
    # backward calls alone, on made-up statistics (the forward kernels would only add
    # compilation: this script compiles everything it runs afresh)
    for shape, axis in (((8, 3, 40), 1), ((8, 40, 3), -1)):       # columns
        x = rng.standard_normal(shape).astype(np.float16)
        C = shape[axis]
        mean, rstd = np.zeros(C, np.float32), np.ones(C, np.float32)
        for activation in (None, "relu"):
            nc.batch_norm_backward(x, x, mean, rstd, axis=axis, activation=activation, y=x)
    # a weight per element: long rows (the general row loop: dx_run, backward_sums_run),
    # then short rows
    for shape in ((2, 1100), (8, 40)):
        x = rng.standard_normal(shape).astype(np.float16)
        mean, rstd = np.zeros(shape[0], np.float32), np.ones(shape[0], np.float32)
        nc.layer_norm_backward(x, x, mean, rstd, activation="relu", y=x)
    # GroupNorm's short cells (short_cells_loop: short_row_dx)
    x = rng.standard_normal((32, 8, 4, 4)).astype(np.float16)
    mean, rstd = np.zeros((32, 4), np.float32), np.ones((32, 4), np.float32)
    nc.group_norm_backward(x, x, mean, rstd, 4)
    # the short rows' sums (cell_sums, inlined) are compiled inside short_rows_loop
    names = ("dx_run", "dx_scalar_run", "backward_sums_run", "backward_column_sums",
             "dx_columns", "dx_columns_plain", "short_rows_loop", "short_row_dx")
    for name in names:
        fn = getattr(K, name)
        asm = "".join(fn.inspect_asm(sig) for sig in fn.signatures if "uint16" in str(sig))
        # 8 halves into a ymm register (or 16 into a zmm), from a register or straight from
        # memory; vcvtph2psx where the CPU has AVX512-FP16 (Sapphire Rapids and later)
        print(name, len(re.findall(r"vcvtph2psx?\\s+[^\\n]*%[yz]mm", asm)))
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 assembly")
def test_backward_loops_vectorize_when_compiled_in_process(tmp_path):
    """A kernel compiled in the running process calls its helpers' own compiled code (one
    loaded from Numba's cache calls copies optimized inside it): with a load of y under the
    relu test in their loops, the helpers' own float16 code stayed scalar and every float16
    backward ran 10-30x slower in the process that compiled it. Each helper's own code must
    convert halves 8 at a time."""
    env = {**os.environ, "NORMCORE_DISABLE_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", VECTOR_SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(line.split() for line in done.stdout.split("\n") if line)
    assert len(counts) == 8 and all(int(n) > 0 for n in counts.values()), counts


def _saved_stats(R, dtype):
    """NaN-filled (mean, rstd, var) outputs for a row kernel, of the types the front end
    passes (normcore/_cpu.py: forward_train): mean and rstd float32 for float16 / float32 data,
    var float64. Other types would compile kernels that only the tests run."""
    saved = np.float64 if dtype == np.float64 else np.float32
    return np.full(R, np.nan, saved), np.full(R, np.nan, saved), np.full(R, np.nan)


def _equal_stats(a, b):
    return all(np.array_equal(u, v, equal_nan=True) for u, v in zip(a, b))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(64, cpu.SHORT_ROW),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.booleans())
def test_rows_one_at_a_time_equal_the_blocks(O, C, B, dtype, centered, want_var):
    """Short rows one at a time (rows_forward_fused: statistics and normalization row by
    row, in a kernel that reassociates its sums) give the blocks' results
    (rows_forward_short) bit for bit, with a residual or without (and without, the fused
    rows' kernel for that call: rows_forward_fused_plain): the same moments and, through
    exact_normalize, the elementwise loops' formula. float64 rows never take the blocks
    (NEVER_TAKEN): there the fused kernel against its plain twin, without a residual."""
    rng = np.random.default_rng(O * 7919 + C * 613 + B)
    R = O * C
    x = (3 + rng.standard_normal(R * B)).astype(dtype)
    w = rng.standard_normal(C * B).astype(dtype)
    bias = rng.standard_normal(C * B).astype(dtype)
    residual = rng.standard_normal(R * B).astype(dtype)
    for z in (x[:0], residual) if dtype == np.float32 else (x[:0],):
        results = []
        kernels = [cpu.rows_forward_fused] + ([cpu.rows_forward_short] if dtype == np.float32
                                              else [])
        for kernel in kernels + ([cpu.rows_forward_fused_plain] if z.size == 0 else []):
            y = np.full_like(x, np.nan)
            mean, rstd, var = _saved_stats(R, dtype)
            var = var if want_var else var[:0]
            kernel(x, z, False, centered, O, 1, C, B, 1, w, bias, 1e-5, y, mean, rstd, var,
                   False)
            results.append((y, (mean, rstd, var)))
        (y1, s1), *others = results
        assert not np.isnan(y1).any() and len(others) >= 1
        for y2, s2 in others:
            assert np.array_equal(y1, y2) and _equal_stats(s1, s2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, cpu.FUSED_ROW),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.integers(0, 15),
       st.booleans(), st.booleans())
# rows that end on a window boundary (their last window goes through the seam's code too)
@example(3, 2, 128, np.float32, True, 0, False, False)
@example(2, 3, 64, np.float32, False, 0, True, True)
@example(2, 2, 64, np.float64, True, 0, True, False)
@example(2, 2, 16, np.float64, True, 0, False, True)
def test_streamed_rows_equal_the_plain_ones_wherever_y_starts(O, C, B, dtype, centered,
                                                               offset, relu, residual):
    """short_rows_fused with non-temporal stores (streamed_fused_rows: windows on y's 64-byte
    lines that run across the rows' ends, each row's statistics in its own lanes, plain stores
    before a block's first line boundary and after its last), with a residual and ReLU or
    without, writes the plain stores' values and statistics bit for bit, `offset` values past
    a line, and nothing outside y; so does the kernel the front end takes for the rows
    (_cpu.rows_forward_kernel: the blocks below 64 float32 values, the long rows' loop above
    SHORT_ROW with an epilogue)."""
    rng = np.random.default_rng(O * 7919 + C * 613 + B + offset)
    R = O * C
    x = (3 + rng.standard_normal(R * B)).astype(dtype)
    z = rng.standard_normal(R * B).astype(dtype) if residual else x[:0]
    w = rng.standard_normal(C * B).astype(dtype)
    bias = rng.standard_normal(C * B).astype(dtype)

    def output():
        buf = np.full(R * B + 64, np.nan, dtype)
        start = (-buf.ctypes.data) % 64 // buf.itemsize + offset
        return buf, start, buf[start:start + R * B], _saved_stats(R, dtype)

    results = []
    kernel = _cpu.rows_forward_kernel(1, B, 1, x.itemsize, relu, residual, x.nbytes)
    for stream in (True, False):
        buf, start, y, stats = output()
        kernel(x, z, relu, centered, O, 1, C, B, 1, w, bias, 1e-5, y, stats[0], stats[1],
               stats[2], stream)
        assert np.isnan(buf[:start]).all() and np.isnan(buf[start + R * B:]).all()
        results.append((y, stats))
    (y1, s1), (y2, s2) = results
    assert not np.isnan(y1).any() and np.array_equal(y1, y2)
    assert _equal_stats(s1, s2)
    if relu:
        assert (y1 >= 0).all()
    if B >= cpu.LANES and (B <= cpu.SHORT_ROW or not (relu or residual)):
        # the streamed loop itself on the rows the front end gives it (with the epilogue, rows
        # of up to SHORT_ROW: longer ones take the long rows' loop, whose sums round otherwise),
        # on blocks of rows cut anywhere (blocks of one row, blocks from r0 > 0)
        k = int(rng.integers(0, R))
        bounds = sorted({0, R, k, min(k + 1, R), *rng.integers(0, R + 1, 2).tolist()})
        buf, start, y3, s3 = output()
        wt, bt = cpu.tile_columns(w), cpu.tile_columns(bias)
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            cpu.short_rows_fused(x, z, relu, centered, C, B, wt, bt, 1e-5, y3, s3[0], s3[1],
                                 s3[2], r0, r1, True)
        assert np.isnan(buf[:start]).all() and np.isnan(buf[start + R * B:]).all()
        assert np.array_equal(y3, y2) and _equal_stats(s3, s2)


def _relu_backward_inputs(rng, n, dtype, relu, residual):
    """y for a ReLU's backward (with zeros and a NaN, which ReLU's gradient masks), or empty;
    whether dz (the residual's gradient) is written: behind a ReLU only."""
    if not relu:
        return np.empty(0, dtype), False
    y = np.maximum(rng.standard_normal(n), 0).astype(dtype)
    y[rng.integers(0, n)] = np.nan
    return y, residual


def _offset_buffer(n, dtype, offset):
    """A NaN-filled buffer and its view of n values `offset` values past a 64-byte line."""
    buf = np.full(n + 64, np.nan, dtype)
    start = (-buf.ctypes.data) % 64 // buf.itemsize + offset
    return buf, buf[start:start + n]


def _untouched_around(buf, view):
    """Whether buf holds NaN everywhere outside its view (nothing written outside it)."""
    start = (view.ctypes.data - buf.ctypes.data) // buf.itemsize
    return np.isnan(buf[:start]).all() and np.isnan(buf[start + view.size:]).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, cpu.FUSED_ROW),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.booleans(),
       st.integers(0, 15), st.integers(0, 15), st.booleans(), st.booleans())
def test_streamed_short_rows_dx_equals_the_plain_one_wherever_dx_starts(
        R, B, dtype, centered, frozen, offset, dz_offset, relu, residual):
    """The short rows' backward with non-temporal stores for dx (streamed_short_rows_loop:
    windows from dx's first line boundary across the rows' ends, a row's last window once the
    next row's sums are taken) writes short_rows_loop's dx, `offset` values past a line, and
    nothing outside dx; the same dweight and dbias partials. Behind a ReLU (dy masked by
    y > 0) too, and with a residual, whose gradient dz streams on its own lines (`dz_offset`
    values past one) bit for bit. dx within a few ulps rather than bit for bit: the two
    loops' sums (cell_sums, in the compute precision) are compiled apart, and once, in a
    process that compiled them itself, they came out a last bit apart."""
    rng = np.random.default_rng(R * 7919 + B * 613 + offset)
    x = (3 + rng.standard_normal(R * B)).astype(dtype)
    dy = rng.standard_normal(R * B).astype(dtype)
    w = rng.standard_normal(B).astype(dtype)
    mean = (3 + 0.1 * rng.standard_normal(R)).astype(dtype)
    rstd = (1 + 0.1 * rng.random(R)).astype(dtype)
    y, with_dz = _relu_backward_inputs(rng, R * B, dtype, relu, residual)
    nblk = min(R, 4)
    results = []
    kernel = _cpu.rows_backward_kernel(1, 1, B, 1, relu, with_dz, False)    # (*_plain or not)
    for stream in (True, False):
        buf, dx = _offset_buffer(R * B, dtype, offset)
        zbuf, dz = _offset_buffer(R * B if with_dz else 0, dtype, dz_offset)
        parts = np.zeros((2, nblk, B))
        kernel(dy, y, relu, x, R, 1, 1, B, 1, mean, rstd, w, w, frozen, centered, nblk,
               parts[0], parts[1], dx, dz, stream)
        assert _untouched_around(buf, dx) and _untouched_around(zbuf, dz)
        results.append((dx, dz, parts))
    (dx1, dz1, p1), (dx2, dz2, p2) = results
    eps = np.finfo(dtype).eps
    scale = np.abs(dx2).max()
    assert not np.isnan(dx1).any()
    np.testing.assert_allclose(dx1, dx2, rtol=0, atol=8 * eps * scale)
    np.testing.assert_allclose(p1, p2, rtol=8 * eps, atol=8 * eps * np.abs(p2).max())
    assert np.array_equal(dz1, dz2) and not np.isnan(dz1).any()
    if B * x.itemsize >= 64:
        # the streamed loop itself, on blocks of rows cut anywhere (blocks of one row, blocks
        # from r0 > 0): dx and dz bit for bit; the partials add up in another order
        k = int(rng.integers(0, R))
        bounds = sorted({0, R, k, min(k + 1, R), *rng.integers(0, R + 1, 2).tolist()})
        buf, dx3 = _offset_buffer(R * B, dtype, offset)
        zbuf, dz3 = _offset_buffer(R * B if with_dz else 0, dtype, dz_offset)
        parts = np.zeros((2, B))
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            cpu.short_rows_backward(dy, y, relu, x, B, mean, rstd, w,
                                    cpu.tile_columns(w, cpu.DX_LANES), frozen, centered,
                                    parts[0], parts[1], dx3, dz3, r0, r1, True)
        assert _untouched_around(buf, dx3) and _untouched_around(zbuf, dz3)
        np.testing.assert_allclose(dx3, dx2, rtol=0, atol=8 * eps * scale)
        np.testing.assert_allclose(parts, p2.sum(axis=1), rtol=1e-4, atol=1e-3 * R)
        assert np.array_equal(dz3, dz2)


@numba.njit
def _seamed_blocks(x, z, relu, C, B, P, wt, bt, y, mean, rstd, bounds):
    """stream_seamed_row over the rows of each block [bounds[k], bounds[k + 1]), as
    rows_forward's loop calls it, from the saved statistics (float64)."""
    for k in range(bounds.size - 1):
        r0, r1 = bounds[k], bounds[k + 1]
        i = cpu.window_above(y, r0 * B, cpu.LANES)
        hi, lo = cpu.split(0.0, x)
        before = (hi, lo, cpu.narrow(0.0, x))
        for r in range(r0, r1):
            i, before = cpu.stream_seamed_row(x, z, relu, y, wt, bt, C, B, P, r, r % C,
                                              mean[r], rstd[r], i, before, r == r0, r == r1 - 1)
    cpu.sfence()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(cpu.LANES, 1200), st.integers(0, 3),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 15), st.data())
def test_streamed_long_rows_equal_the_plain_ones_wherever_y_starts(O, C, P, Q, dtype, offset,
                                                                  data):
    """rows_forward's rows of A == 1 that stream (stream_seamed_row: windows on y's lines
    across the ends of the rows and of their parameter cells, plain stores before a block's
    first line boundary and after its last) write the plain loop's values bit for bit,
    `offset` values past a line, and nothing outside y: LayerNorm rows (a weight per element,
    Q == 0) and rows of Q cells of P values (InstanceNorm, GroupNorm), with or without a
    residual and ReLU. The front end gives rows_forward rows over SHORT_ROW values (FUSED_ROW
    without an epilogue) with a weight per element; it streams those and cells of STREAM_RUN,
    and is driven here over shorter ones too; the helper itself on blocks of rows cut
    anywhere."""
    residual, relu = data.draw(st.booleans()), data.draw(st.booleans())
    B = P * max(Q, 1)
    if Q == 0:
        P = 1
    R = O * C
    rng = np.random.default_rng(O * 7919 + C * 613 + B + offset)
    x = (3 + rng.standard_normal(R * B)).astype(dtype)
    cells = C * B // P
    w = rng.standard_normal(cells).astype(dtype)
    bias = rng.standard_normal(cells).astype(dtype)
    z = rng.standard_normal(R * B).astype(dtype) if residual else x[:0]

    def output():
        buf = np.full(R * B + 64, np.nan, dtype)
        start = (-buf.ctypes.data) % 64 // buf.itemsize + offset
        return buf, start, buf[start:start + R * B]

    results = []
    # without an epilogue, the kernel compiled without one too
    kernels = [cpu.rows_forward] + ([] if relu or residual else [cpu.rows_forward_plain])
    for kernel in kernels:
        for stream in (True, False):
            buf, start, y = output()
            stats = np.full((3, R), np.nan)
            kernel(x, z, relu, True, O, 1, C, B, P, w, bias, 1e-5, y, stats[0], stats[1],
                   stats[2], stream)
            assert np.isnan(buf[:start]).all() and np.isnan(buf[start + R * B:]).all()
            results.append((y, stats))
    (y1, s1), (y2, s2) = results[:2]
    assert not np.isnan(y1).any() and np.array_equal(y1, y2) and np.array_equal(s1, s2)
    for y4, s4 in results[2:]:
        assert np.array_equal(y4, y1) and np.array_equal(s4, s1)
    cut = data.draw(st.lists(st.integers(0, R), max_size=3))
    bounds = np.array(sorted({0, R, *cut}))
    buf, start, y3 = output()
    wt, bt = (cpu.tile_columns(w), cpu.tile_columns(bias)) if P == 1 else (w, bias)
    _seamed_blocks(x, z, relu, C, B, P, wt, bt, y3, s2[0], s2[1], bounds)
    assert np.isnan(buf[:start]).all() and np.isnan(buf[start + R * B:]).all()
    assert np.array_equal(y3, y2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 2), st.integers(cpu.STREAM_RUN, 1300),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.booleans(),
       st.integers(0, 15), st.data())
def test_streamed_long_rows_dx_equals_the_plain_one_wherever_dx_starts(O, C, B, dtype, centered,
                                                                      frozen, offset, data):
    """The backward's rows of STREAM_RUN values or more with a weight per element (LayerNorm
    long rows: stream_seamed_dx_row, windows from dx's first line boundary across the rows'
    ends, plain stores before a block's first line boundary and after its last whole line)
    write the plain loop's dx bit for bit, `offset` values past a line, and nothing outside
    dx; the same dweight and dbias partials; blocks of any number of rows. Behind a ReLU
    too, and with a residual, whose gradient dz streams on its own lines."""
    R = O * C
    rng = np.random.default_rng(R * 7919 + B * 613 + offset)
    x = (3 + rng.standard_normal(R * B)).astype(dtype)
    dy = rng.standard_normal(R * B).astype(dtype)
    w = rng.standard_normal(C * B).astype(dtype)
    mean = (3 + 0.1 * rng.standard_normal(R)).astype(dtype)
    rstd = (1 + 0.1 * rng.random(R)).astype(dtype)
    relu = data.draw(st.booleans())
    y, with_dz = _relu_backward_inputs(rng, R * B, dtype, relu, data.draw(st.booleans()))
    dz_offset = data.draw(st.integers(0, 15))
    nblk = data.draw(st.integers(1, R))
    results = []
    for stream in (True, False):
        buf, dx = _offset_buffer(R * B, dtype, offset)
        zbuf, dz = _offset_buffer(R * B if with_dz else 0, dtype, dz_offset)
        parts = np.zeros((2, nblk, C * B))
        cpu.rows_backward(dy, y, relu, x, O, 1, C, B, 1, mean, rstd, w, w, frozen,
                          centered, nblk, parts[0], parts[1], dx, dz, stream)
        assert _untouched_around(buf, dx) and _untouched_around(zbuf, dz)
        results.append((dx, dz, parts))
    (dx1, dz1, p1), (dx2, dz2, p2) = results
    assert not np.isnan(dx1).any() and np.array_equal(dx1, dx2) and np.array_equal(p1, p2)
    assert not np.isnan(dz1).any() and np.array_equal(dz1, dz2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_prefetch_into_the_l2_and_change_no_value(dtype):
    """The seamed rows with a weight per element prefetch the next row into the L2 alone
    (prefetcht1 on x86-64) from rows of LONG_ROW bytes on, into every level (prefetcht0) when
    shorter; neither changes a value: the plain loop's, bit for bit."""
    rng = np.random.default_rng(3)
    E = np.dtype(dtype).itemsize
    for B in (cpu.LONG_ROW // E, cpu.LONG_ROW // 2 // E):
        R = 3
        x = rng.standard_normal(R * B).astype(dtype)
        w, b = (rng.standard_normal(B).astype(dtype) for _ in range(2))
        want = np.empty_like(x)
        stats = np.empty((3, R))
        cpu.rows_forward(x, x[:0], False, True, R, 1, 1, B, 1, w, b, 1e-5, want, stats[0],
                         stats[1], stats[2], False)
        buf = np.full(R * B + 64, np.nan, dtype)
        start = (-buf.ctypes.data) % 64 // buf.itemsize + 4
        y = buf[start:start + R * B]
        _seamed_blocks(x, x[:0], False, 1, B, 1, cpu.tile_columns(w), cpu.tile_columns(b), y,
                       stats[0], stats[1], np.array([0, R]))
        assert np.array_equal(y, want)
    if platform.machine() in ("x86_64", "AMD64"):
        sig = [s for s in _seamed_blocks.signatures if s[0].dtype == numba.from_dtype(dtype)][0]
        asm = _seamed_blocks.inspect_asm(sig)
        assert "prefetcht1" in asm and "prefetcht0" in asm


def _off_by_one_byte(like):
    """An array shaped and typed like `like`, its data one byte past an element's alignment
    (as np.frombuffer with an offset gives)."""
    buf = np.zeros(like.nbytes + 8, np.uint8)
    return buf[1:1 + like.nbytes].view(like.dtype).reshape(like.shape)


@pytest.mark.parametrize("norm, shape, axis", [
    ("layer", (2051, 2049), -1),          # rows
    ("group", (64, 32, 33, 64), -1),      # columns fused per sample
    ("batch", (48, 3, 32771), 1),         # flat
    ("batch", (16, 37, 113, 64), -1),     # columns in chunks
])
def test_outputs_off_their_alignment_are_written_plain(norm, shape, axis):
    """Outputs of STREAM_MIN bytes or more whose data is not at a whole element's address
    (NumPy allows that) are written with plain stores: the streamed windows' non-temporal
    stores fault there (a segmentation fault before). x off its alignment too; the values
    are those of aligned arrays, bit for bit."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    C = x.shape[axis]
    w = np.linspace(0.5, 2, C, dtype=np.float32)
    fwd, bwd = {
        "layer": (lambda x, out: nc.layer_norm_forward(x, w, w - 1, out=out),
                  lambda dy, x, f, out: nc.layer_norm_backward(dy, x, f.mean, f.rstd, w,
                                                               dx_out=out)),
        "group": (lambda x, out: nc.group_norm_forward(x, 8, w, w - 1, axis=axis, out=out),
                  lambda dy, x, f, out: nc.group_norm_backward(dy, x, f.mean, f.rstd, 8, w,
                                                               axis=axis, dx_out=out)),
        "batch": (lambda x, out: nc.batch_norm_forward(x, w, w - 1, axis=axis, out=out),
                  lambda dy, x, f, out: nc.batch_norm_backward(dy, x, f.mean, f.rstd, w,
                                                               axis=axis, dx_out=out))}[norm]
    assert x.nbytes >= _cpu.STREAM_MIN
    want_f = fwd(x, None)
    want_dx = bwd(dy, x, want_f, None).dx
    xo = _off_by_one_byte(x)
    xo[...] = x
    for xs in (x, xo):
        y, dx = _off_by_one_byte(x), _off_by_one_byte(x)
        assert not y.flags.aligned
        f = fwd(xs, y)
        assert f.y is y and np.array_equal(y, want_f.y)
        assert np.array_equal(bwd(dy, xs, f, dx).dx, want_dx)
    if norm == "batch":
        y = _off_by_one_byte(x)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        nc.batch_norm(xo, w, w - 1, running_mean=rm, running_var=rv, training=False, axis=axis,
                      out=y)
        want = nc.batch_norm(x, w, w - 1, running_mean=rm, running_var=rv, training=False,
                             axis=axis)
        assert np.array_equal(y, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_sums_prefetch_from_memory_and_change_no_value(dtype):
    """The column sums (rows_column_moments but for float64's exact two-pass,
    backward_column_sums) prefetch the rows ahead of them in inputs from memory, whole rows of
    up to PREFETCH_COLUMN_ROW bytes only; the same rows' moments and sums in a copy too small
    to prefetch are the same, bit for bit. Rows of 40 values: whole rows of 1-4 windows of
    LANES take the register sums, which do not prefetch."""
    E = np.dtype(dtype).itemsize
    J = 40
    assert cpu.short_column_windows(J, J) == 0
    N = cpu.FROM_MEMORY // (J * E) + 5
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(N * J) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(N * J).astype(dtype)
    assert cpu.column_rows_ahead(x, J, J) > 0
    small = x[:cpu.FROM_MEMORY // E - J]
    assert cpu.column_rows_ahead(small, J, J) == 0
    assert cpu.column_rows_ahead(x, J, J // 2) == 0          # slices of the rows
    assert cpu.column_rows_ahead(x, 4 * J, 4 * J) == 0        # rows of 1-2 KiB
    lo, hi = N - 1003, N                # the last rows: the prefetches run past x's end
    part = x[lo * J:hi * J].copy()
    dpart = dy[lo * J:hi * J].copy()
    for narrow in (True, False):
        got, want = np.empty((2, J)), np.empty((2, J))
        n = cpu.rows_column_moments(x, J, 0, J, lo, hi, got[0], got[1], narrow)
        m = cpu.rows_column_moments(part, J, 0, J, 0, hi - lo, want[0], want[1], narrow)
        assert n == m == hi - lo and np.array_equal(got, want)
    center = np.full(J, 1, dtype), np.zeros(J, dtype)
    got, want = np.zeros((2, J)), np.zeros((2, J))
    cpu.backward_column_sums(dy, x, False, x, J, 0, J, lo, hi, *center, got[0], got[1])
    cpu.backward_column_sums(dpart, part, False, part, J, 0, J, 0, hi - lo, *center, want[0],
                             want[1])
    assert np.array_equal(got, want) and np.abs(got).min() > 0
    if platform.machine() in ("x86_64", "AMD64"):
        # float64 moments take the exact two-pass, which does not prefetch
        kernels = ((cpu.rows_column_moments,) if dtype == np.float32 else ()) + (
            cpu.backward_column_sums,)
        for kernel in kernels:
            sig = [s for s in kernel.signatures if s[0].dtype == numba.from_dtype(dtype)][0]
            # compiled here: a kernel loaded from the cache keeps no assembly
            fresh = numba.njit(kernel.py_func)
            fresh.compile(sig)
            assert "prefetcht0" in fresh.inspect_asm(sig)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunks_from_memory_taken_last_first_are_each_normalized(dtype):
    """BatchNorm channels-last on an input from memory (FROM_MEMORY) takes its second pass's
    chunks last first (last_first): every chunk's y and dx are there, as the float64 oracle
    gives them."""
    import oracle
    from helpers import assert_close
    shape = (16, 37, 113, 64)
    x = np.random.default_rng(12).standard_normal(shape).astype(dtype) * 2 + 3
    dy = np.random.default_rng(13).standard_normal(shape).astype(dtype)
    assert x.nbytes >= cpu.FROM_MEMORY
    plan = plan_batch_norm(shape, 3, numba.get_num_threads(), x.itemsize)
    assert plan.path == plan.backward_path == "columns" and plan.K >= 2
    w = np.linspace(0.5, 2, 64).astype(dtype)
    y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
    f = nc.batch_norm_forward(x, w, w - 1, axis=-1, out=y)
    g = nc.batch_norm_backward(dy, x, f.mean, f.rstd, w, axis=-1, dx_out=dx)
    ref = oracle.batch_norm_forward(x, w, w - 1, axis=3)
    n = x.size // 64
    assert_close(y, ref[0], dtype=dtype, n=n, cond=3, what="y")
    rg = oracle.batch_norm_backward(dy, x, f.mean, f.rstd, w, axis=3)
    assert_close(dx, rg[0], dtype=dtype, n=n, cond=3, what="dx")
    assert_close(g.dweight, rg[1], dtype=dtype, n=n, cond=3, what="dweight")


def test_chunk_kernels_serial_twins_match_the_parallel_kernels():
    """column_forward_chunks / column_backward_chunks call parallel kernels; their `.serial`
    twins call those kernels' twins instead (the front end never takes them: serial plans are
    fused), in the same chunks, so they give the same bits."""
    A, C, K = 600, 48, 3
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(A * C) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(A * C).astype(np.float32)
    w = np.linspace(0.5, 2, C).astype(np.float32)
    bias = (w - 1).astype(np.float32)
    none = x[:0]
    results = []
    for pick in (lambda k: k, lambda k: k.serial):
        y = np.full_like(x, np.nan)
        mean, rstd, var = (np.full(C, np.nan, t) for t in (np.float32, np.float32, np.float64))
        pick(cpu.column_forward_chunks_plain)(x, none, False, True, 1, A, C, 1, 1, K, True, w,
                                              bias, 1e-5, y, mean, rstd, var, False)
        dx = np.full_like(x, np.nan)
        dbias, dweight = np.full((1, C), np.nan), np.full((1, C), np.nan)
        pick(cpu.column_backward_chunks_plain)(dy, none, False, x, 1, A, C, 1, 1, K,
                                               mean.astype(np.float64), rstd.astype(np.float64),
                                               w, False, True, dbias, dweight, dx, none, False)
        results.append((y, mean, rstd, var, dx, dbias, dweight))
    for parallel, serial in zip(*results):
        assert not np.isnan(parallel).any()
        np.testing.assert_array_equal(serial, parallel)
    # the backward twin's sums and dx went through their kernels' twins (nothing else calls
    # these; the forward's, column_moments and column_normalize_plain, have other callers)
    assert cpu.column_gradient_sums.serial.signatures
    assert cpu.column_dx_chunks_plain.serial.signatures

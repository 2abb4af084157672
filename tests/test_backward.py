"""Backward passes: against the float64 oracle (which was validated against torch autograd),
and against central finite differences of normcore's own forward in float64."""
import numpy as np
import oracle
import pytest
from helpers import (
    FLOATS,
    assert_close,
    check_backward,
    check_forward,
    nc_backward,
    nc_forward,
    param_shape,
    ref_backward,
    ref_forward,
    with_layout,
)

import normcore as nc

CASES = [  # (norm, shape, axis)
    ("batch", (6, 4), 1), ("batch", (6, 4), -1), ("batch", (5, 4, 7), 1),
    ("batch", (5, 7, 4), -1), ("batch", (3, 4, 5, 6), 1), ("batch", (3, 5, 6, 4), -1),
    ("batch", (3, 5, 4, 6), 2), ("batch", (2, 4, 3, 2, 3), 1), ("batch", (2, 3, 2, 3, 4), -1),
    ("instance", (5, 4, 7), 1), ("instance", (5, 7, 4), -1), ("instance", (3, 4, 5, 6), 1),
    ("instance", (3, 5, 6, 4), -1), ("instance", (3, 5, 4, 6), 2),
    ("instance", (2, 3, 2, 3, 4), -1),
    ("group", (6, 4), 1), ("group", (5, 4, 7), 1), ("group", (5, 7, 4), -1),
    ("group", (3, 4, 5, 6), 1), ("group", (3, 5, 6, 4), -1), ("group", (3, 5, 4, 6), 2),
    ("group", (2, 4, 3, 2, 3), 1), ("group", (2, 3, 2, 3, 4), -1),
    ("layer", (7,), -1), ("layer", (6, 5), -1), ("layer", (4, 3, 5), -1),
    ("layer", (4, 3, 5), (-2, -1)), ("layer", (2, 3, 4, 5), (-3, -2, -1)),
    ("layer", (2, 3, 4, 5), (-2, -1)),
]
IDS = [f"{c[0]}-{c[1]}-ax{c[2]}" for c in CASES]


def _kw(norm, shape, axis):
    kw = {"axis": axis}
    if norm == "group":
        kw["num_groups"] = 2
    return kw


def _inputs(rng, norm, shape, axis, dtype):
    x = (0.5 + 2 * rng.standard_normal(shape)).astype(dtype)
    pshape = param_shape(norm, shape, axis)
    w = (1 + 0.5 * rng.standard_normal(pshape)).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


def _n(norm, shape, kw):
    return oracle.reduction_length(norm, shape, kw["axis"], kw.get("num_groups"))


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm,shape,axis", CASES, ids=IDS)
def test_backward_batch_stats_matches_oracle(norm, shape, axis, dtype, with_weight, rng):
    x, w, b, dy = _inputs(rng, norm, shape, axis, dtype)
    w = w if with_weight else None
    kw = _kw(norm, shape, axis)
    f = nc_forward(norm, x, w, b, **kw)
    x0, dy0 = x.copy(), dy.copy()
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, **kw)
    ref = ref_backward(norm, dy, x, f.mean, f.rstd, w, **kw)
    check_backward(got, ref, x, dy, f.rstd, w, param_shape(norm, shape, axis),
                   n=_n(norm, shape, kw))
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0), "inputs were modified"


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm,shape,axis", [c for c in CASES if c[0] in ("batch", "instance")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] in ("batch", "instance")])
def test_backward_frozen_stats_matches_oracle(norm, shape, axis, dtype, with_weight, rng):
    x, w, b, dy = _inputs(rng, norm, shape, axis, dtype)
    w = w if with_weight else None
    C = shape[axis]
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    flag = "training" if norm == "batch" else "use_input_stats"
    f = nc_forward(norm, x, w, b, running_mean=rm, running_var=rv, axis=axis, **{flag: False})
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, axis=axis, **{flag: False})
    ref = ref_backward(norm, dy, x, f.mean, f.rstd, w, axis=axis, **{flag: False})
    check_backward(got, ref, x, dy, f.rstd, w, (C,), n=1)
    # frozen statistics: dx is exactly the elementwise dy * w * rstd (no batch coupling)
    batch = nc_backward(norm, dy, x, f.mean, f.rstd, w, axis=axis)
    assert not np.allclose(batch.dx, got.dx), "frozen and batch-stats gradients coincide"


@pytest.mark.parametrize("dx_layout", ["C", "F", "strided"])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_dx_out(norm, dx_layout, rng):
    shape = (3, 4, 5)
    axis = (-2, -1) if norm == "layer" else 1
    kw = _kw(norm, shape, axis)
    x, w, b, dy = _inputs(rng, norm, shape, axis, np.float64)
    f = nc_forward(norm, x, w, b, **kw)
    ref = ref_backward(norm, dy, x, f.mean, f.rstd, w, **kw)
    dx_out = with_layout(np.full(shape, 5.0), dx_layout)
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, dx_out=dx_out, **kw)
    assert got.dx is dx_out
    check_backward(got, ref, x, dy, f.rstd, w, param_shape(norm, shape, axis),
                   n=_n(norm, shape, kw))


@pytest.mark.parametrize("layout", ["F", "transposed", "strided", "negative", "readonly"])
@pytest.mark.parametrize("norm,shape,axis", [("batch", (3, 4, 5), 1), ("batch", (3, 5, 4), -1),
                                             ("instance", (3, 4, 5), 1),
                                             ("group", (3, 5, 4), -1),
                                             ("layer", (3, 4, 5), (-2, -1))])
def test_backward_layouts(norm, shape, axis, layout, rng):
    kw = _kw(norm, shape, axis)
    x0, w, b, dy0 = _inputs(rng, norm, shape, axis, np.float32)
    f = nc_forward(norm, x0, w, b, **kw)
    x, dy = with_layout(x0, layout, rng), with_layout(dy0, layout, rng)
    mean, rstd = with_layout(f.mean, layout), with_layout(f.rstd, layout)
    got = nc_backward(norm, dy, x, mean, rstd, with_layout(w, layout), **kw)
    ref = ref_backward(norm, dy0, x0, f.mean, f.rstd, w, **kw)
    check_backward(got, ref, x0, dy0, f.rstd, w, param_shape(norm, shape, axis),
                   n=_n(norm, shape, kw))


def test_backward_weight_none_equals_weight_ones(rng):
    x, _w, _b, dy = _inputs(rng, "group", (2, 6, 3), 1, np.float64)
    f = nc.group_norm_forward(x, 3)
    a = nc.group_norm_backward(dy, x, f.mean, f.rstd, 3, None)
    c = nc.group_norm_backward(dy, x, f.mean, f.rstd, 3, np.ones(6))
    for u, v in zip(a, c):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13)


# -------------------------------------------------------------------- finite differences
FD_CASES = [
    ("batch", (3, 2, 2), 1, True), ("batch", (4, 3), -1, True), ("batch", (2, 2, 3), -1, True),
    ("batch", (3, 2, 2), 1, False), ("batch", (2, 3, 2), -1, False),
    ("instance", (2, 2, 3), 1, True), ("instance", (2, 3, 2), -1, True),
    ("instance", (2, 2, 3), 1, False),
    ("group", (2, 4, 2), 1, True), ("group", (2, 2, 4), -1, True), ("group", (1, 4, 2, 2), 2, True),
    ("layer", (3, 4), -1, True), ("layer", (2, 2, 3), (-2, -1), True), ("layer", (5,), -1, True),
]


def _loss(norm, x, w, b, r, kw):
    return float(np.sum(nc_forward(norm, x, w, b, **kw).y * r))


@pytest.mark.parametrize("norm,shape,axis,batch_stats", FD_CASES,
                         ids=[f"{c[0]}-{c[1]}-ax{c[2]}-{'batch' if c[3] else 'frozen'}"
                              for c in FD_CASES])
def test_gradients_by_central_differences(norm, shape, axis, batch_stats, rng):
    x, w, b, r = _inputs(rng, norm, shape, axis, np.float64)
    kw = _kw(norm, shape, axis)
    if not batch_stats:
        C = shape[axis]
        kw.update(running_mean=rng.standard_normal(C), running_var=0.5 + rng.random(C))
        kw["training" if norm == "batch" else "use_input_stats"] = False
    f = nc_forward(norm, x, w, b, **kw)
    bkw = {k: v for k, v in kw.items() if k not in ("running_mean", "running_var")}
    g = nc_backward(norm, r, x, f.mean, f.rstd, w, **bkw)

    h = 1e-5

    def fd(arr):
        grad = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = _loss(norm, x, w, b, r, kw)
            arr[i] = old - h
            down = _loss(norm, x, w, b, r, kw)
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    # central differences: truncation O(h^2 |f'''|) ~ 1e-10, rounding ~ eps |L| / h ~ 1e-10
    for name, arr, got in (("dx", x, g.dx), ("dweight", w, g.dweight), ("dbias", b, g.dbias)):
        num = fd(arr)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-7, err_msg=name)


# Column views split into slices of channels, each a work item that reads its part of x (and
# dy) once: uneven slices (1000 channels in 7), GroupNorm slices of whole groups over two
# samples; or into chunks of whole rows (column_forward_chunks / column_backward_chunks):
# uneven chunks, BatchNorm runs of 9, GroupNorm channels-last with one sample (columns of
# groups, B = 8 / 16) and with two samples too large to fuse. ReLU + residual, frozen
# statistics.
COLUMN_VIEWS = [("batch", (160, 1000), 1, {}, "columns_fused"),
                ("batch", (40, 3, 1024), -1, {}, "columns_fused"),
                ("group", (2, 96, 512), -1, {"num_groups": 64}, "columns_fused"),
                ("batch", (150, 1300), 1, {}, "columns_fused"),  # the backward's slices: 3
                ("batch", (256, 1000), 1, {}, "columns"),
                ("batch", (1003, 100), 1, {}, "columns"),                       # 8 chunks
                ("batch", (9, 197, 64), -1, {}, "columns"),
                ("group", (1, 9000, 64), -1, {"num_groups": 8}, "columns"),
                ("batch", (200, 32, 3, 3), 1, {}, "columns"),          # runs of 9, 2 chunks
                ("group", (1, 30, 30, 256), -1, {"num_groups": 16}, "columns"),
                ("group", (2, 200, 200, 16), -1, {"num_groups": 4}, "columns")]  # O = 2


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm, shape, axis, kw, path", COLUMN_VIEWS)
def test_column_views_match_oracle(norm, shape, axis, kw, path, dtype, rng):
    from normcore._norms import _threads
    from normcore._plan import plan_batch_norm, plan_group_norm
    plan = (plan_batch_norm(shape, axis, _threads()) if norm == "batch" else
            plan_group_norm(shape, kw["num_groups"], axis, _threads()))
    assert plan.path == plan.backward_path == path and plan.normalize_path == "columns"
    assert plan.S > 1 if path == "columns_fused" else plan.K > 1
    kw = dict(kw, axis=axis)
    x, w, b, dy = _inputs(rng, norm, shape, axis, dtype)
    n = _n(norm, shape, kw)
    f = nc_forward(norm, x, w, b, **kw)
    check_forward(norm, f, ref_forward(norm, x, w, b, **kw), x, n=n)
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, **kw)
    check_backward(got, ref_backward(norm, dy, x, f.mean, f.rstd, w, **kw), x, dy, f.rstd, w,
                   param_shape(norm, shape, axis), n=n)
    # the fused epilogue: relu(y + z) and its gradient, against the plain results
    z = rng.standard_normal(shape).astype(dtype)
    fz = nc_forward(norm, x, w, b, activation="relu", residual=z, **kw)
    np.testing.assert_array_equal(fz.y, np.maximum(
        nc_forward(norm, x, w, b, residual=z, **kw).y, 0))
    gz = nc_backward(norm, dy, x, fz.mean, fz.rstd, w, activation="relu", y=fz.y,
                     residual=True, **kw)
    mask = (fz.y > 0).astype(dtype)
    ref = ref_backward(norm, dy * mask, x, fz.mean, fz.rstd, w, **kw)
    check_backward(gz, ref, x, dy, fz.rstd, w, param_shape(norm, shape, axis), n=n)
    np.testing.assert_array_equal(gz.dresidual, dy * mask)
    if norm == "batch":     # frozen statistics (eval-mode backward)
        g = nc_backward(norm, dy, x, f.mean, f.rstd, w, training=False, **kw)
        ref = ref_backward(norm, dy, x, f.mean, f.rstd, w, training=False, **kw)
        check_backward(g, ref, x, dy, f.rstd, w, param_shape(norm, shape, axis), n=1)


def _batch_matches_oracle(shape, dtype, rng):
    """Channels-first BatchNorm forward and backward against the oracle; returns the inputs
    (x, w, b, dy) and the reduction length."""
    x, w, b, dy = _inputs(rng, "batch", shape, 1, dtype)
    n = _n("batch", shape, {"axis": 1})
    f = nc_forward("batch", x, w, b, axis=1)
    check_forward("batch", f, ref_forward("batch", x, w, b, axis=1), x, n=n)
    got = nc_backward("batch", dy, x, f.mean, f.rstd, w, axis=1)
    check_backward(got, ref_backward("batch", dy, x, f.mean, f.rstd, w, axis=1), x, dy,
                   f.rstd, w, (shape[1],), n=n)
    return x, w, b, dy, n


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(31, 11, 15, 20), (13, 9, 700)])
def test_flat_chunks_of_short_runs_match_oracle(shape, dtype, rng):
    """Channels-first BatchNorm with runs of 64-1023 values: the flat kernels take a work
    item's chunk of runs in one call (normalize, backward sums, dx), chunks starting inside a
    run and channels with their own weights; the ReLU epilogue keeps the per-run kernels."""
    from normcore._norms import _threads
    from normcore._plan import plan_batch_norm
    plan = plan_batch_norm(shape, 1, _threads())
    assert plan.path == plan.backward_path == "flat" and not plan.serial
    assert 64 <= plan.B < 1024 and plan.P == plan.B
    L = plan.A * plan.C * plan.B
    assert any(k * L // plan.K % plan.B for k in range(plan.K))     # a chunk starts mid-run
    x, w, b, dy, n = _batch_matches_oracle(shape, dtype, rng)
    fz = nc_forward("batch", x, w, b, axis=1, activation="relu")
    gz = nc_backward("batch", dy, x, fz.mean, fz.rstd, w, axis=1, activation="relu", y=fz.y)
    mask = (fz.y > 0).astype(dtype)
    check_backward(gz, ref_backward("batch", dy * mask, x, fz.mean, fz.rstd, w, axis=1), x, dy,
                   fz.rstd, w, (shape[1],), n=n)


def test_large_narrow_batch_norm_forward_flat_backward_rows(rng):
    """float32 BatchNorm of 2**22+ elements with long runs: the flat forward (x streamed
    twice) and the rows backward (a channel kept in cache) of one plan (float16: see
    test_features.test_float16_matches_float32_compute)."""
    from normcore._norms import _threads
    from normcore._plan import FLAT_FORWARD, plan_batch_norm
    shape = (16, 64, 64, 64)
    plan = plan_batch_norm(shape, 1, _threads(), 4)
    assert np.prod(shape) >= FLAT_FORWARD
    assert (plan.path, plan.backward_path) == ("flat", "rows")
    _batch_matches_oracle(shape, np.float32, rng)


# Runs of 16-63 values (BatchNorm on 4 x 4 to 7 x 7 maps) whose column sweep would be wider
# than WIDE_COLUMNS: the flat kernels, training and eval; narrower sweeps keep the columns.
WIDE_SHORT_RUNS = [(160, 144, 5, 5),     # unfused columns (too large to slice): flat
                   (2, 96, 5, 5),        # serial, one slice of 2400 columns: flat
                   (2, 48, 5, 5)]        # 1200 columns: fused columns, eval normalizes flat


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", WIDE_SHORT_RUNS)
def test_wide_short_runs_match_oracle(shape, dtype, rng):
    from normcore._norms import _threads
    from normcore._plan import NORMALIZE_COLUMNS, WIDE_COLUMNS, plan_batch_norm
    plan = plan_batch_norm(shape, 1, _threads(), np.dtype(dtype).itemsize)
    C, B = shape[1], shape[2] * shape[3]
    wide = C * B > WIDE_COLUMNS
    assert (plan.path, plan.backward_path) == (("flat",) * 2 if wide else ("columns_fused",) * 2)
    assert C * B > NORMALIZE_COLUMNS and plan.normalize_path == "flat"
    x, w, b, dy, n = _batch_matches_oracle(shape, dtype, rng)
    rm = rng.standard_normal(C).astype(np.float32)
    rv = (rng.random(C) + 0.5).astype(np.float32)
    f = nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    ref = oracle.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    check_forward("batch", f, ref, x, n=1)


def _check_epilogues(norm, shape, kw, dtype, rng):
    """Forward and backward against the oracle: plain, with a residual, and with ReLU after it
    or alone (channels on axis 1)."""
    x, w, b, dy = _inputs(rng, norm, shape, kw["axis"], dtype)
    n = _n(norm, shape, kw)
    f = nc_forward(norm, x, w, b, **kw)
    ref = ref_forward(norm, x, w, b, **kw)
    check_forward(norm, f, ref, x, n=n)
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, **kw)
    check_backward(got, ref_backward(norm, dy, x, f.mean, f.rstd, w, **kw), x, dy, f.rstd,
                   w, (shape[1],), n=n)
    z = rng.standard_normal(shape).astype(dtype)
    expect = np.asarray(ref.y, np.float64) + z
    for residual in (None, z):
        plain = nc_forward(norm, x, w, b, residual=residual, **kw).y
        if residual is not None:
            assert_close(plain, expect, dtype=dtype, n=n, scale=float(np.max(np.abs(expect))),
                         what="y + residual")
        fr = nc_forward(norm, x, w, b, activation="relu", residual=residual, **kw)
        np.testing.assert_array_equal(fr.y, np.maximum(plain, 0))
        gr = nc_backward(norm, dy, x, fr.mean, fr.rstd, w, activation="relu", y=fr.y,
                         residual=residual is not None, **kw)
        mask = (fr.y > 0).astype(dtype)
        ref_dx = ref_backward(norm, dy * mask, x, fr.mean, fr.rstd, w, **kw)
        check_backward(gr, ref_dx, x, dy, fr.rstd, w, (shape[1],), n=n)


@pytest.mark.parametrize("norm, shape, groups", [
    ("group", (64, 64, 7, 7), 16), ("group", (32, 8, 3, 3), 4),      # rows of 196 / 18
    ("group", (64, 16, 12, 5), 2),                                    # rows of 480, cells of 60
    ("group", (32, 64, 8, 8), 4),                   # rows of 1024: the general row loop
    ("group", (32, 48, 7, 7), 16),                  # 3 cells a row: the last pairs with itself
    ("instance", (64, 32, 7, 7), 0), ("instance", (32, 8, 3, 3), 0),
    ("instance", (33, 24, 7, 7), 0),             # blocks of an odd count of rows in pairs
    ("instance", (16, 32, 14, 14), 0)])          # rows of one cell without the repeat
@pytest.mark.parametrize("dtype", FLOATS)
def test_short_cells_on_rows_match_oracle(norm, shape, groups, dtype, rng):
    """Cells of <= 64 values on the row kernels (parallel / serial), which take the
    parameters repeated per element (InstanceNorm: every dtype; GroupNorm: float32) for the
    normalize and dx passes and keep per-cell sums for dweight / dbias; the forward's rows of
    <= 512 values go one at a time (short_rows_fused, with a residual / ReLU too) or, float16
    or under 64 values, in blocks of rows (short_rows_forward), the backward's rows in one loop
    (short_cells_loop, which also takes InstanceNorm rows of up to 4096 values without the
    repeat; rows and cells go in pairs, run_sums_pair). Plain (the common call's direct
    path), and with a residual and ReLU (the general path, whose backward takes the per-row
    loop). float16: tests/test_features.py."""
    from normcore._norms import _threads
    from normcore._plan import plan_group_norm, plan_instance_norm
    if norm == "group":
        plan = plan_group_norm(shape, groups, 1, _threads(), np.dtype(dtype).itemsize)
        kw = {"num_groups": groups, "axis": 1}
    else:
        plan = plan_instance_norm(shape, 1, _threads())
        kw = {"axis": 1}
    assert plan.path == plan.backward_path == "rows"
    assert plan.short_cells == ((dtype == np.float32 or norm == "instance") and plan.P <= 64
                                and shape[0] >= 32)
    assert plan.serial == (shape[1] == 8)         # (32, 8, 3, 3): the serial twins
    _check_epilogues(norm, shape, kw, dtype, rng)


@pytest.mark.parametrize("dtype", FLOATS)
def test_short_group_cells_mid_chunk_match_oracle(dtype, rng):
    """GroupNorm cells of 49 values (7 x 7 maps) in a flat work item that starts mid-cell:
    the forward's and dx's cell loops, plain, with ReLU, and with ReLU and a residual."""
    from normcore._norms import _threads
    from normcore._plan import plan_group_norm
    shape = (1, 1365, 7, 7)
    plan = plan_group_norm(shape, 3, 1, _threads())
    assert plan.path == plan.backward_path == "flat" and 1 < plan.P < plan.B
    L = plan.A * plan.C * plan.B
    assert any(k * L // plan.K % plan.P for k in range(plan.K))     # a chunk starts mid-cell
    _check_epilogues("group", shape, {"num_groups": 3, "axis": 1}, dtype, rng)

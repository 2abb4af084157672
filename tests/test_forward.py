"""Forward passes against the float64 oracle: every norm, dtype, channel axis and layout."""
import numpy as np
import oracle
import pytest
from helpers import (
    FLOATS,
    LAYOUTS,
    assert_close,
    check_forward,
    nc_backward,
    nc_dropin,
    nc_forward,
    param_shape,
    ref_forward,
    stats_shape,
    with_layout,
)

import normcore as nc

# (shape, channel axis): 0, 1, 2 and 3 spatial dims; channels first, last and in the middle
CHANNEL_CASES = [
    ((6, 4), 1), ((6, 4), -1),
    ((5, 4, 7), 1), ((5, 7, 4), -1), ((5, 7, 4), 2),
    ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1), ((3, 5, 4, 6), 2), ((3, 5, 4, 6), -2),
    ((2, 4, 3, 2, 3), 1), ((2, 3, 2, 3, 4), -1), ((2, 3, 4, 2, 3), 2), ((2, 3, 2, 4, 3), 3),
]
# (shape, normalized axes) for LayerNorm: 1, 2 and 3 trailing axes, negative and positive
LAYER_CASES = [
    ((7,), -1), ((6, 5), -1), ((4, 3, 5), -1), ((4, 3, 5), (-1,)), ((4, 3, 5), (-2, -1)),
    ((2, 3, 4, 5), (-2, -1)), ((2, 3, 4, 5), (-3, -2, -1)), ((3, 2, 2, 3, 4), -1),
    ((5, 1), -1), ((4, 3, 5), 2), ((4, 3, 5), (1, 2)), ((2, 3, 4, 5), (2, 3)),
]
NORMS_CH = ("batch", "instance", "group")


def _ids(cases):
    return [f"{s}-ax{a}" for s, a in cases]


def _x(rng, shape, dtype, offset=0.5, std=2.0):
    return (offset + std * rng.standard_normal(shape)).astype(dtype)


def _params(rng, pshape, dtype):
    return ((1 + 0.5 * rng.standard_normal(pshape)).astype(dtype),
            rng.standard_normal(pshape).astype(dtype))


def _channel_kw(norm, shape, axis, groups=2):
    kw = {"axis": axis}
    if norm == "group":
        C = shape[axis]
        kw["num_groups"] = groups if C % groups == 0 else 1
    return kw


def _n(norm, shape, kw):
    return oracle.reduction_length(norm, shape, kw.get("axis", 1), kw.get("num_groups"))


# ----------------------------------------------------------------- all norms vs oracle
# weight-only / bias-only on the 3-D cases; InstanceNorm needs spatial dims
CHANNEL_GRID = [(norm, shape, axis, affine)
                for norm in NORMS_CH for shape, axis in CHANNEL_CASES
                for affine in ("none", "weight", "bias", "both")
                if not (norm == "instance" and len(shape) == 2)
                and (affine in ("none", "both") or len(shape) == 3)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm,shape,axis,affine", CHANNEL_GRID,
                         ids=[f"{n}-{s}-ax{a}-{f}" for n, s, a, f in CHANNEL_GRID])
def test_channel_norms_match_oracle(norm, shape, axis, dtype, affine, rng):
    x = _x(rng, shape, dtype)
    w, b = _params(rng, (shape[axis],), dtype)
    w = w if affine in ("weight", "both") else None
    b = b if affine in ("bias", "both") else None
    kw = _channel_kw(norm, shape, axis)
    x0 = x.copy()
    got = nc_forward(norm, x, w, b, **kw)
    ref = ref_forward(norm, x, w, b, **kw)
    check_forward(norm, got, ref, x, n=_n(norm, shape, kw))
    assert got.running_mean is None and got.running_var is None
    assert np.array_equal(x, x0), "x was modified"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape,axis", [((2, 6), 1), ((3, 6, 5), 1), ((3, 5, 6), -1),
                                        ((2, 6, 3, 4), 1), ((2, 3, 4, 6), -1),
                                        ((2, 3, 6, 4), 2), ((2, 6, 2, 3, 2), 1)])
def test_group_norm_every_group_count(shape, axis, num_groups, dtype, rng):
    x = _x(rng, shape, dtype)
    w, b = _params(rng, (6,), dtype)
    kw = {"axis": axis, "num_groups": num_groups}
    got = nc_forward("group", x, w, b, **kw)
    ref = ref_forward("group", x, w, b, **kw)
    assert got.mean.shape == (shape[0], num_groups)
    check_forward("group", got, ref, x, n=_n("group", shape, kw))


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", LAYER_CASES, ids=_ids(LAYER_CASES))
def test_layer_norm_matches_oracle(shape, axis, dtype, affine, rng):
    x = _x(rng, shape, dtype, offset=-1.0, std=3.0)
    w, b = _params(rng, param_shape("layer", shape, axis), dtype)
    w = w if affine in ("weight", "both") else None
    b = b if affine in ("bias", "both") else None
    got = nc.layer_norm_forward(x, w, b, axis=axis)
    ref = oracle.layer_norm_forward(x, w, b, axis=axis)
    assert got.mean.shape == stats_shape("layer", shape, axis)
    check_forward("layer", got, ref, x, n=_n("layer", shape, {"axis": axis}))
    assert got.running_mean is None and got.running_var is None


def test_layer_norm_single_value_rows_give_bias(rng):
    x = rng.standard_normal((5, 1))
    b = np.array([0.25])
    y = nc.layer_norm(x, None, b)
    assert np.array_equal(y, np.full((5, 1), 0.25))


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 3.0])
@pytest.mark.parametrize("norm", ("batch", "instance", "group", "layer"))
def test_eps_is_inside_the_square_root(norm, eps, rng):
    shape = (3, 4, 5)
    x = 0.01 * rng.standard_normal(shape)     # small variance: eps matters
    kw = {"axis": -1} if norm == "layer" else _channel_kw(norm, shape, 1)
    got = nc_forward(norm, x, eps=eps, **kw)
    ref = ref_forward(norm, x, eps=eps, **kw)
    check_forward(norm, got, ref, x, n=_n(norm, shape, kw))


# ------------------------------------------------------------------------- drop-ins
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm", ("batch", "instance", "group", "layer"))
def test_dropin_returns_y(norm, dtype, rng):
    shape, axis = ((3, 4, 5), -1) if norm == "layer" else ((3, 4, 5), 1)
    kw = {"axis": axis} if norm == "layer" else _channel_kw(norm, shape, axis)
    x = _x(rng, shape, dtype)
    w, b = _params(rng, param_shape(norm, shape, axis), dtype)
    y = nc_dropin(norm, x, w, b, **kw)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref_forward(norm, x, w, b, **kw).y, dtype=dtype, n=_n(norm, shape, kw))


def test_named_tuples():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4) % 5
    f = nc.batch_norm_forward(x)
    assert f._fields == ("y", "mean", "rstd", "running_mean", "running_var")
    y, mean, rstd, _rm, _rv = f
    assert y is f.y and mean is f.mean and rstd is f.rstd
    g = nc.batch_norm_backward(np.ones_like(x), x, f.mean, f.rstd)
    assert g._fields == ("dx", "dweight", "dbias")
    dx, dw, db = g
    assert dx is g.dx and dw is g.dweight and db is g.dbias


# ----------------------------------------------------------- BatchNorm running stats
@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_norm_running_stats_by_hand(dtype):
    # channel values (1, 3), (2, 6), (3, 11): means 2, 4, 7; unbiased vars 2, 8, 32
    x = np.array([[1, 2, 3], [3, 6, 11]], dtype=dtype)
    rm = np.zeros(3, dtype)
    rv = np.ones(3, dtype)
    f = nc.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.5)
    np.testing.assert_array_equal(rm, np.array([1, 2, 3.5], dtype))
    np.testing.assert_array_equal(rv, np.array([1.5, 4.5, 16.5], dtype))
    np.testing.assert_array_equal(f.running_mean, rm)
    np.testing.assert_array_equal(f.running_var, rv)
    # saved statistics are the biased ones
    assert_close(f.mean, [2, 4, 7], dtype=dtype, n=2)
    assert_close(f.rstd, 1 / np.sqrt(np.array([1, 4, 16]) + 1e-5), dtype=dtype, n=2)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 4, 5), 1), ((3, 5, 4), -1),
                                        ((2, 3, 4, 2), 2)])
def test_batch_norm_running_stats_update_in_place(shape, axis, dtype, momentum, rng):
    C = shape[axis]
    x = _x(rng, shape, dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    got = nc.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=momentum,
                                axis=axis)
    ref = oracle.batch_norm_forward(x, running_mean=rm0, running_var=rv0, momentum=momentum,
                                    axis=axis)
    n = x.size // C
    assert rm.dtype == dtype and rv.dtype == dtype
    if momentum == 0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    assert_close(rm, ref.running_mean, dtype=dtype, n=n, scale=np.max(np.abs(x)),
                 what="running_mean")
    assert_close(rv, ref.running_var, dtype=dtype, n=n, what="running_var")
    assert_close(got.running_mean, ref.running_mean, dtype=dtype, n=n,
                 scale=np.max(np.abs(x)), what="returned running_mean")
    assert_close(got.running_var, ref.running_var, dtype=dtype, n=n, what="returned running_var")
    check_forward("batch", got, ref, x, n=n)


@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_norm_running_var_is_unbiased(dtype, rng):
    x = _x(rng, (3, 2), dtype)
    rm, rv = np.zeros(2, dtype), np.zeros(2, dtype)
    nc.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0)
    assert_close(rv, np.var(x.astype(np.float64), axis=0, ddof=1), dtype=dtype, n=3)
    assert_close(rm, np.mean(x.astype(np.float64), axis=0), dtype=dtype, n=3,
                 scale=np.max(np.abs(x)))


def test_batch_norm_strided_running_stats_updated_in_place(rng):
    x = _x(rng, (4, 3, 5), np.float64)
    buf_m, buf_v = np.zeros(6), np.ones(6)
    rm, rv = buf_m[::2], buf_v[::2]
    ref = oracle.batch_norm_forward(x, running_mean=rm.copy(), running_var=rv.copy())
    nc.batch_norm(x, running_mean=rm, running_var=rv)
    assert_close(buf_m[::2], ref.running_mean, dtype=np.float64, n=20, scale=np.max(np.abs(x)))
    assert_close(buf_v[::2], ref.running_var, dtype=np.float64, n=20)
    assert np.array_equal(buf_m[1::2], np.zeros(3)) and np.array_equal(buf_v[1::2], np.ones(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_running_stats_kernel_equals_the_array_formula(norm, dtype, rng, monkeypatch):
    """Contiguous float32 / float64 running statistics are updated by one kernel, strided and
    byte-swapped ones by NumPy array operations: the same float64 arithmetic in the same
    order, bit for bit (InstanceNorm's kernel also averages over the samples)."""
    from normcore.kernels import cpu
    kernel, calls = cpu.update_running, []
    monkeypatch.setattr(cpu, "update_running", lambda *a: calls.append(1) or kernel(*a))
    x = _x(rng, (9, 7, 3), dtype)
    rm = rng.standard_normal(7).astype(dtype)
    rv = (0.5 + rng.random(7)).astype(dtype)
    buf_m, buf_v = np.zeros(14, dtype), np.zeros(14, dtype)
    buf_m[::2], buf_v[::2] = rm, rv
    swapped_m, swapped_v = rm.astype(rm.dtype.newbyteorder()), rv.astype(rv.dtype.newbyteorder())
    fwd = nc.batch_norm_forward if norm == "batch" else nc.instance_norm_forward
    fwd(x, running_mean=rm, running_var=rv, momentum=0.3)
    assert len(calls) == 1
    for m, v in ((buf_m[::2], buf_v[::2]), (swapped_m, swapped_v)):
        fwd(x, running_mean=m, running_var=v, momentum=0.3)
        np.testing.assert_array_equal(rm, m)
        np.testing.assert_array_equal(rv, v)
    assert len(calls) == 1


def test_instance_norm_running_stats_need_a_sample():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="at least one sample"):
        nc.instance_norm(np.zeros((0, 3, 4)), running_mean=rm, running_var=rv)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 4, 5), 1), ((3, 5, 4), -1),
                                        ((2, 3, 4, 2), 2), ((0, 3, 2), 1)])
def test_batch_norm_eval_uses_running_stats(shape, axis, dtype, rng):
    C = shape[axis]
    x = _x(rng, shape, dtype, offset=3.0)
    w, b = _params(rng, (C,), dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    got = nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False,
                                axis=axis, eps=1e-3)
    ref = oracle.batch_norm_forward(x, w, b, running_mean=rm0, running_var=rv0,
                                    training=False, axis=axis, eps=1e-3)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert got.mean.shape == (C,) and got.mean.dtype == dtype
    np.testing.assert_array_equal(got.mean, rm0)
    # the saved rstd is the float64 formula, rounded once
    rstd = 1.0 / np.sqrt(rv0.astype(np.float64) + 1e-3)
    np.testing.assert_array_equal(got.rstd, rstd.astype(dtype))
    check_forward("batch", got, ref, x, n=1)
    y = nc.batch_norm(x, w, b, running_mean=rm, running_var=rv, training=False, axis=axis,
                      eps=1e-3)
    assert_close(y, ref.y, dtype=dtype, n=1)


# ---------------------------------------------------------------------- InstanceNorm
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((3, 5, 4), -1), ((2, 4, 3, 2), 1),
                                        ((2, 3, 2, 4), -1), ((2, 3, 4, 2), 2),
                                        ((1, 2, 2), 1)])
def test_instance_norm_running_stats(shape, axis, dtype, momentum, rng):
    C = shape[axis]
    x = _x(rng, shape, dtype)
    w, b = _params(rng, (C,), dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    got = nc.instance_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                   momentum=momentum, axis=axis)
    ref = oracle.instance_norm_forward(x, w, b, running_mean=rm0, running_var=rv0,
                                       momentum=momentum, axis=axis)
    n = oracle.reduction_length("instance", shape, axis)
    check_forward("instance", got, ref, x, n=n)
    if momentum == 0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    assert_close(rm, ref.running_mean, dtype=dtype, n=x.size, scale=np.max(np.abs(x)),
                 what="running_mean")
    assert_close(rv, ref.running_var, dtype=dtype, n=x.size, what="running_var")
    assert_close(got.running_var, ref.running_var, dtype=dtype, n=x.size)


def test_instance_norm_running_var_by_hand():
    # two instances, one channel, two values each: (0, 2) and (1, 5)
    # means 1 and 3 -> batch mean 2; unbiased vars 2 and 8 -> batch var 5
    x = np.array([[[0.0, 2.0]], [[1.0, 5.0]]])
    rm, rv = np.zeros(1), np.ones(1)
    nc.instance_norm(x, running_mean=rm, running_var=rv, momentum=0.5)
    np.testing.assert_allclose(rm, [1.0], rtol=1e-15)
    np.testing.assert_allclose(rv, [3.0], rtol=1e-15)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((3, 5, 4), -1), ((2, 3, 4, 2), 2)])
def test_instance_norm_frozen_stats(shape, axis, dtype, rng):
    N, C = shape[0], shape[axis]
    x = _x(rng, shape, dtype)
    w, b = _params(rng, (C,), dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    got = nc.instance_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                   use_input_stats=False, axis=axis)
    ref = oracle.instance_norm_forward(x, w, b, running_mean=rm0, running_var=rv0,
                                       use_input_stats=False, axis=axis)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert got.mean.shape == (N, C) and got.rstd.shape == (N, C)
    np.testing.assert_array_equal(got.mean, np.broadcast_to(rm0, (N, C)))
    rstd = 1.0 / np.sqrt(rv0.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(got.rstd, np.broadcast_to(rstd.astype(dtype), (N, C)))
    check_forward("instance", got, ref, x, n=1)


# ----------------------------------------------------------------------------- out=
@pytest.mark.parametrize("out_layout", ["C", "F", "strided", "negative"])
@pytest.mark.parametrize("norm", ("batch", "instance", "group", "layer"))
def test_out_receives_y(norm, out_layout, rng):
    shape = (3, 4, 5)
    kw = {"axis": (-2, -1)} if norm == "layer" else _channel_kw(norm, shape, 1)
    x = _x(rng, shape, np.float32)
    w, b = _params(rng, param_shape(norm, shape, kw["axis"]), np.float32)
    ref = ref_forward(norm, x, w, b, **kw)
    n = _n(norm, shape, kw)
    out = with_layout(np.full(shape, 7.0, np.float32), out_layout)
    r = nc_dropin(norm, x, w, b, out=out, **kw)
    assert r is out
    assert_close(out, ref.y, dtype=np.float32, n=n)
    out2 = with_layout(np.full(shape, 7.0, np.float32), out_layout)
    f = nc_forward(norm, x, w, b, out=out2, **kw)
    assert f.y is out2
    assert_close(out2, ref.y, dtype=np.float32, n=n)


def test_out_may_alias_x_for_inplace_use(rng):
    """out=x is a writable array of the right shape and dtype, so it must work."""
    x = _x(rng, (4, 6), np.float64)
    ref = oracle.layer_norm_forward(x.copy())
    r = nc.layer_norm(x, out=x)
    assert r is x
    assert_close(x, ref.y, dtype=np.float64, n=6)


# ------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("norm,shape,axis", [
    ("batch", (3, 4, 5, 2), 1), ("batch", (3, 5, 2, 4), -1), ("batch", (6, 4), 1),
    ("instance", (3, 4, 5, 2), 1), ("instance", (3, 5, 2, 4), -1),
    ("group", (3, 4, 5, 2), 1), ("group", (3, 5, 2, 4), -1), ("group", (3, 5, 4, 2), 2),
    ("layer", (3, 4, 5, 2), -1), ("layer", (3, 4, 5, 2), (-2, -1)),
    ("layer", (3, 4, 5, 2), (-3, -2, -1)),
])
def test_layouts(norm, shape, axis, dtype, layout, rng):
    kw = {"axis": axis} if norm == "layer" else _channel_kw(norm, shape, axis)
    x0 = _x(rng, shape, dtype)
    x = with_layout(x0, layout, rng)
    assert np.array_equal(x, x0)
    w, b = _params(rng, param_shape(norm, shape, axis), dtype)
    if layout in ("strided", "negative", "readonly"):
        w, b = with_layout(w, layout), with_layout(b, layout)
    got = nc_forward(norm, x, w, b, **kw)
    ref = ref_forward(norm, x0, w, b, **kw)
    check_forward(norm, got, ref, x0, n=_n(norm, shape, kw))
    assert np.array_equal(x, x0), "x was modified"


@pytest.mark.parametrize("norm", ("batch", "instance", "group", "layer"))
def test_broadcast_input(norm, rng):
    """A zero-stride (read-only, broadcast) input is a valid strided input."""
    row = rng.standard_normal((1, 4, 6))
    x = np.broadcast_to(row, (3, 4, 6))
    kw = {"axis": -1} if norm == "layer" else _channel_kw(norm, x.shape, 1)
    got = nc_forward(norm, x, **kw)
    ref = ref_forward(norm, np.array(x), **kw)
    check_forward(norm, got, ref, np.array(x), n=_n(norm, x.shape, kw))


# ------------------------------------------------------------------------- moments
MOMENT_CASES = [((7,), None), ((7,), 0), ((7,), -1), ((4, 5), None), ((4, 5), 0), ((4, 5), 1),
                ((4, 5), (0, 1)), ((3, 4, 5), (0, 2)), ((3, 4, 5), (2, 0)), ((3, 4, 5), -2),
                ((3, 4, 5), (1, 2)), ((2, 3, 4, 5), (0, 2, 3)), ((2, 3, 4, 5), (-1, -3))]


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", MOMENT_CASES, ids=_ids(MOMENT_CASES))
def test_moments(shape, axis, dtype, correction, rng):
    x = _x(rng, shape, dtype, offset=2.0)
    m, v = nc.moments(x, axis, correction=correction)
    rm, rv = oracle.moments(x, axis, correction=correction)
    for got, name in ((m, "mean"), (v, "var")):
        assert np.shape(got) == rm.shape, f"{name} shape {np.shape(got)} != {rm.shape}"
        assert np.asarray(got).dtype == dtype, f"{name} dtype {np.asarray(got).dtype}"
    n = x.size // max(rm.size, 1)
    assert_close(m, rm, dtype=dtype, n=n, scale=np.max(np.abs(x)), what="mean")
    assert_close(v, rv, dtype=dtype, n=n, cond=2.0, what="var")


@pytest.mark.parametrize("layout", ["F", "transposed", "strided", "negative", "readonly"])
def test_moments_layouts(layout, rng):
    x0 = _x(rng, (3, 4, 5), np.float64)
    x = with_layout(x0, layout, rng)
    m, v = nc.moments(x, (0, 2), correction=1)
    rm, rv = oracle.moments(x0, (0, 2), correction=1)
    assert_close(m, rm, dtype=np.float64, n=15, scale=np.max(np.abs(x0)))
    assert_close(v, rv, dtype=np.float64, n=15)


def test_moments_correction_changes_var(rng):
    x = rng.standard_normal(10)
    _, v0 = nc.moments(x)
    _, v1 = nc.moments(x, correction=1)
    assert_close(np.asarray(v1), np.asarray(v0) * 10 / 9, dtype=np.float64, n=10)


def _kernel_signatures():
    """How many specializations each CPU kernel (and its serial twin) has compiled."""
    from normcore.kernels import cpu as K
    counts = {}
    for name in dir(K):
        for key, kernel in ((name, getattr(K, name)), (name + ".serial",
                                                       getattr(getattr(K, name), "serial", None))):
            if hasattr(kernel, "signatures"):
                counts[key] = len(kernel.signatures)
    return counts


def _read_only(*arrays):
    return tuple(with_layout(a, "readonly") for a in arrays)


@pytest.mark.parametrize("norm", ("batch", "batch_eval", "instance", "group", "layer"))
@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (8, 32, 40, 40)], ids=("small", "large"))
def test_read_only_inputs_use_the_writable_inputs_kernels(norm, shape, rng):
    """Numba types a read-only array apart from a writable one: read-only x, dy, weight, bias,
    saved and running statistics reach the kernels compiled for writable ones (no compilation),
    with results bit-equal to a writable call's, and stay unmodified."""
    x = _x(rng, shape, np.float32)
    name = "batch" if norm == "batch_eval" else norm
    kw = {"axis": -1} if norm == "layer" else _channel_kw(name, shape, 1)
    w, b = _params(rng, param_shape(name, shape, kw.get("axis", 1)), np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    if norm == "batch_eval":
        running = (rng.random(shape[1]).astype(np.float32),
                   rng.random(shape[1]).astype(np.float32) + 0.5)
        kw.update(running_mean=running[0], running_var=running[1], training=False)
    back_kw = {k: v for k, v in kw.items() if k not in ("running_mean", "running_var")}

    def both(x, w, b, dy, kw):
        y, mean, rstd = nc_forward(name, x, w, b, **dict(kw))[:3]
        return (y, mean, rstd) + tuple(nc_backward(name, dy, x, mean, rstd, w, **back_kw))

    want = both(x, w, b, dy, kw)
    compiled = _kernel_signatures()
    ro_kw = dict(kw)
    if norm == "batch_eval":
        ro_kw["running_mean"], ro_kw["running_var"] = _read_only(*running)
    ro = _read_only(x, w, b, dy)
    got = both(*ro, ro_kw)
    assert _kernel_signatures() == compiled, "a read-only input compiled new specializations"
    for g, e in zip(got, want):
        assert np.array_equal(g, e)
    for a, e in zip(ro, (x, w, b, dy)):
        assert not a.flags.writeable and np.array_equal(a, e)
    # the saved statistics read-only too
    mean, rstd = _read_only(*want[1:3])
    got = nc_backward(name, dy, x, mean, rstd, w, **back_kw)
    assert _kernel_signatures() == compiled
    for g, e in zip(got, want[3:]):
        assert np.array_equal(g, e)


def test_read_only_memmap_uses_the_writable_inputs_kernels(tmp_path, rng):
    """np.memmap(mode='r') is an ndarray subclass whose contiguous view stays read-only."""
    x = _x(rng, (6, 5, 7), np.float64)
    path = tmp_path / "x.bin"
    x.tofile(path)
    mapped = np.memmap(path, np.float64, mode="r", shape=x.shape)
    for call in (lambda a: nc.moments(a, (0, 2)), lambda a: nc.batch_norm_forward(a)):
        want = call(x)[:3]
        compiled = _kernel_signatures()
        got = call(mapped)[:3]
        assert _kernel_signatures() == compiled
        for g, e in zip(got, want):
            assert np.array_equal(np.asarray(g), np.asarray(e))

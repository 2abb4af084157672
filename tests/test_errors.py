"""Bad inputs raise the contract's exception type with a message naming the argument, and
modify nothing; NaNs stay in their own statistics group; zero variance and empty inputs."""
import types

import numpy as np
import oracle
import pytest
from helpers import assert_close, nc_backward, nc_dropin, nc_forward, ref_forward

import normcore as nc


def arg(name):
    """A regex that matches the argument's name as a word (so 'x' does not match 'max')."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


class ForeignArray:
    """A non-NumPy Array-API array (its own namespace, no __array__)."""

    def __init__(self, a):
        self._a = np.asarray(a)
        self.shape, self.dtype, self.ndim = self._a.shape, self._a.dtype, self._a.ndim
        self.device = "elsewhere"

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(__name__="foreign_array_api")


X3 = np.arange(2 * 4 * 3, dtype=np.float64).reshape(2, 4, 3) % 5 + 0.5


def _call(norm, x=X3, **kw):
    return nc_forward(norm, x, **kw)


def _default_kw(norm):
    return {"num_groups": 2} if norm == "group" else {}


# --------------------------------------------------------------------------- TypeError
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128, np.uint8])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_non_float_x_is_type_error(norm, dtype):
    x = X3.astype(dtype)
    with pytest.raises(TypeError, match=arg("x")):
        nc_forward(norm, x, **_default_kw(norm))
    with pytest.raises(TypeError, match=arg("x")):
        nc_dropin(norm, x, **_default_kw(norm))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_non_float_x_in_backward_is_type_error(norm):
    f = nc_forward(norm, X3, **_default_kw(norm))
    with pytest.raises(TypeError, match=arg("x")):
        nc_backward(norm, np.ones_like(X3), X3.astype(np.int64), f.mean, f.rstd,
                    **_default_kw(norm))


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_foreign_array_weight_is_type_error(norm, which):
    p = np.ones(3 if norm == "layer" else 4)
    kw = {which: ForeignArray(p)}
    with pytest.raises(TypeError, match=arg(which)):
        nc_forward(norm, X3, **kw, **_default_kw(norm))


def test_foreign_running_mean_is_type_error():
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(TypeError, match=arg("running_mean")):
        nc.batch_norm(X3, running_mean=ForeignArray(rm), running_var=rv)
    assert np.array_equal(rv, np.ones(4))


# ---------------------------------------------------------------------------- ValueError
def _bad_value_cases():
    C = 4
    ok_w = np.ones(C)
    rm, rv = np.zeros(C), np.ones(C)
    cases = []
    for norm in ("batch", "instance", "group"):
        kw0 = _default_kw(norm)
        cases += [
            (norm, dict(kw0, weight=np.ones(C + 1)), "weight"),
            (norm, dict(kw0, weight=np.ones((C, 1))), "weight"),
            (norm, dict(kw0, bias=np.ones(C - 1)), "bias"),
            (norm, dict(kw0, bias=np.ones((1, C))), "bias"),
            (norm, dict(kw0, eps=0.0), "eps"),
            (norm, dict(kw0, eps=-1e-5), "eps"),
            (norm, dict(kw0, eps=float("nan")), "eps"),
            (norm, dict(kw0, eps=float("inf")), "eps"),
            (norm, dict(kw0, axis=3), "axis"),
            (norm, dict(kw0, axis=-4), "axis"),
            (norm, dict(kw0, axis=0), "axis"),
            (norm, dict(kw0, axis=-3), "axis"),
            (norm, dict(kw0, weight=ok_w, out=np.empty((2, 4, 4))), "out"),
            (norm, dict(kw0, out=np.empty((2, 4, 3), np.float32)), "out"),
            (norm, dict(kw0, out=np.empty(24)), "out"),
        ]
    for norm in ("batch", "instance"):
        cases += [
            (norm, {"running_mean": np.zeros(C + 1), "running_var": rv}, "running_mean"),
            (norm, {"running_mean": rm, "running_var": np.ones(C - 1)}, "running_var"),
            (norm, {"running_mean": rm}, "running_var"),
            (norm, {"running_var": rv}, "running_mean"),
            (norm, {"running_mean": rm, "running_var": rv, "momentum": -0.1}, "momentum"),
            (norm, {"running_mean": rm, "running_var": rv, "momentum": 1.5}, "momentum"),
            (norm, {"running_mean": rm, "running_var": rv, "momentum": float("nan")}, "momentum"),
        ]
    cases += [
        ("batch", {"training": False}, "running_mean"),
        ("instance", {"use_input_stats": False}, "running_mean"),
        ("group", {"num_groups": 3}, "num_groups"),
        ("group", {"num_groups": 0}, "num_groups"),
        ("group", {"num_groups": -2}, "num_groups"),
        ("group", {"num_groups": 8}, "num_groups"),
        ("layer", {"weight": np.ones(4)}, "weight"),
        ("layer", {"weight": np.ones((4, 3)), "axis": -1}, "weight"),
        ("layer", {"bias": np.ones((4, 3))}, "bias"),
        ("layer", {"weight": np.ones(3), "axis": (-2, -1)}, "weight"),
        ("layer", {"axis": 0}, "axis"),
        ("layer", {"axis": 1}, "axis"),
        ("layer", {"axis": 3}, "axis"),
        ("layer", {"axis": -4}, "axis"),
        ("layer", {"axis": (-3, -1)}, "axis"),
        ("layer", {"axis": (0, 1)}, "axis"),
        ("layer", {"eps": 0.0}, "eps"),
        ("layer", {"eps": -1.0}, "eps"),
        ("layer", {"out": np.empty((2, 4, 2))}, "out"),
        ("layer", {"out": np.empty((2, 4, 3), np.float32)}, "out"),
    ]
    return cases


BAD = _bad_value_cases()


@pytest.mark.parametrize("norm,kw,name", BAD,
                         ids=[f"{n}-{nm}-{i}" for i, (n, _, nm) in enumerate(BAD)])
def test_bad_values_are_value_errors(norm, kw, name):
    kw = dict(kw)
    with pytest.raises(ValueError, match=arg(name)):
        nc_forward(norm, X3, **kw)
    with pytest.raises(ValueError, match=arg(name)):
        nc_dropin(norm, X3, **kw)


@pytest.mark.parametrize("x", [np.ones((1, 3)), np.ones((1, 3, 1)), np.ones((1, 3, 1, 1)),
                               np.ones((0, 3)), np.ones((0, 3, 4))],
                         ids=["1x3", "1x3x1", "1x3x1x1", "0x3", "0x3x4"])
def test_training_batch_norm_needs_two_values_per_channel(x):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"(?i)(?<![a-z_])x(?![a-z_])|value|training"):
        nc.batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("x", [np.ones(4), np.array(1.0)], ids=["1d", "0d"])
def test_channel_norms_need_two_dims(norm, x):
    with pytest.raises(ValueError, match=arg("x") + "|" + arg("axis")):
        nc_forward(norm, x, **({"num_groups": 1} if norm == "group" else {}))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_dx_out(norm, bad):
    f = nc_forward(norm, X3, **_default_kw(norm))
    dx_out = np.full((2, 4, 4), 3.0) if bad == "shape" else np.full(X3.shape, 3.0, np.float32)
    before = dx_out.copy()
    with pytest.raises(ValueError, match=arg("dx_out")):
        nc_backward(norm, np.ones_like(X3), X3, f.mean, f.rstd, dx_out=dx_out,
                    **_default_kw(norm))
    assert np.array_equal(dx_out, before)


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_backward_dy_shape_mismatch(norm):
    f = nc_forward(norm, X3, **_default_kw(norm))
    with pytest.raises(ValueError, match=arg("dy")):
        nc_backward(norm, np.ones((2, 4, 2)), X3, f.mean, f.rstd, **_default_kw(norm))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_backward_bad_weight_shape(norm):
    f = nc_forward(norm, X3, **_default_kw(norm))
    with pytest.raises(ValueError, match=arg("weight")):
        nc_backward(norm, np.ones_like(X3), X3, f.mean, f.rstd, np.ones(5),
                    **_default_kw(norm))


# ------------------------------------------------------------ a call that raises changes nothing
FAILING_WITH_STATE = [
    ("batch", {"momentum": 2.0}),
    ("batch", {"eps": -1.0}),
    ("batch", {"bias": np.ones(5)}),
    ("batch", {"weight": np.ones(3)}),
    ("batch", {"out_bad": "shape"}),
    ("batch", {"out_bad": "dtype"}),
    ("instance", {"momentum": -1.0}),
    ("instance", {"bias": np.ones(5)}),
    ("instance", {"out_bad": "shape"}),
    ("instance", {"out_bad": "dtype"}),
]


@pytest.mark.parametrize("norm,bad", FAILING_WITH_STATE,
                         ids=[f"{n}-{'-'.join(b)}" for n, b in FAILING_WITH_STATE])
def test_failed_call_modifies_nothing(norm, bad, rng):
    x = rng.standard_normal((3, 4, 5))
    rm, rv = rng.standard_normal(4), 0.5 + rng.random(4)
    bad = dict(bad)
    out_bad = bad.pop("out_bad", None)
    out = np.full((3, 4, 5), 9.0)           # a good out unless out_bad makes it bad
    if out_bad == "shape":
        out = np.full((3, 4, 6), 9.0)
    elif out_bad == "dtype":
        out = np.full((3, 4, 5), 9.0, np.float32)
    copies = [a.copy() for a in (x, rm, rv, out)]
    with pytest.raises(ValueError):
        nc_forward(norm, x, running_mean=rm, running_var=rv, out=out, **bad)
    for a, c in zip((x, rm, rv, out), copies):
        assert np.array_equal(a, c), "a failing call modified its arguments"


def test_type_error_modifies_nothing(rng):
    rm, rv = rng.standard_normal(4), 0.5 + rng.random(4)
    copies = rm.copy(), rv.copy()
    with pytest.raises(TypeError):
        nc.batch_norm(X3, ForeignArray(np.ones(4)), running_mean=rm, running_var=rv)
    assert np.array_equal(rm, copies[0]) and np.array_equal(rv, copies[1])


# -------------------------------------------------------------------------------- NaN
# The oracle's np.mean/np.var put NaN exactly in the poisoned statistics group and in every
# y of that group; assert_close demands the same NaN positions and closeness elsewhere.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_nan_stays_in_its_batch_norm_channel(axis, dtype, rng):
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    idx = (2, 1, 3) if axis == 1 else (2, 3, 1)
    x[idx] = np.nan
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    f = nc.batch_norm_forward(x, running_mean=rm, running_var=rv, axis=axis)
    ref = oracle.batch_norm_forward(x, running_mean=np.zeros(3), running_var=np.ones(3),
                                    axis=axis)
    assert np.isnan(ref.mean[1]) and np.isfinite(ref.mean[[0, 2]]).all()
    assert_close(f.y, ref.y, dtype=dtype, n=20, what="y")
    assert_close(f.mean, ref.mean, dtype=dtype, n=20, scale=5.0, what="mean")
    assert_close(f.rstd, ref.rstd, dtype=dtype, n=20, what="rstd")
    assert_close(rm, ref.running_mean, dtype=dtype, n=20, scale=5.0, what="running_mean")
    assert_close(rv, ref.running_var, dtype=dtype, n=20, what="running_var")


@pytest.mark.parametrize("norm,shape,axis,idx", [
    ("layer", (4, 6), -1, (1, 2)),
    ("layer", (3, 4, 5), (-2, -1), (2, 0, 1)),
    ("layer", (3, 4, 5), -1, (2, 0, 1)),
    ("instance", (2, 3, 5), 1, (1, 2, 0)),
    ("instance", (2, 5, 3), -1, (0, 4, 1)),
    ("group", (2, 4, 3), 1, (1, 3, 2)),
    ("group", (2, 3, 4), -1, (0, 1, 0)),
    ("group", (2, 3, 4, 2), 2, (1, 0, 3, 1)),
])
def test_nan_stays_in_its_group(norm, shape, axis, idx, rng):
    x = rng.standard_normal(shape)
    x[idx] = np.nan
    kw = {"axis": axis}
    if norm == "group":
        kw["num_groups"] = 2
    f = nc_forward(norm, x, **kw)
    ref = ref_forward(norm, x, **kw)
    assert np.isnan(ref.mean).sum() == 1 and np.isfinite(ref.y).sum() > 0
    n = oracle.reduction_length(norm, shape, axis, kw.get("num_groups"))
    assert_close(f.y, ref.y, dtype=np.float64, n=n, what="y")
    assert_close(f.mean, ref.mean, dtype=np.float64, n=n, scale=5.0, what="mean")
    assert_close(f.rstd, ref.rstd, dtype=np.float64, n=n, what="rstd")


# ---------------------------------------------------------------------- zero variance
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm,shape,axis", [
    ("batch", (5, 3), 1), ("batch", (7, 3, 9), 1), ("batch", (7, 9, 3), -1),
    ("instance", (2, 3, 7), 1), ("instance", (2, 7, 3), -1),
    ("group", (2, 3, 7), 1), ("layer", (3, 7), -1), ("layer", (2, 3, 7), (-2, -1)),
])
def test_zero_variance_gives_bias_exactly(norm, shape, axis, dtype, rng):
    C = shape[axis] if norm != "layer" else None
    if norm == "layer":
        lead = shape[: len(shape) - (1 if np.isscalar(axis) else len(axis))]
        consts = np.array([0.1, -3.7, 1e3 + 0.3, 7.0, 0.0, 1 / 3])[: int(np.prod(lead))]
        x = np.broadcast_to(consts.reshape(lead + (1,) * (len(shape) - len(lead))), shape)
        pshape = shape[len(lead):]
    else:
        consts = np.array([0.1, -3.7, 1e3 + 0.3])[:C]
        bshape = [1] * len(shape)
        bshape[axis] = C
        if norm == "instance":   # constant per (n, c): vary with n too
            bshape[0] = shape[0]
            consts = np.outer([1.0, 2.5], consts)[: shape[0]]
        x = np.broadcast_to(consts.reshape(bshape), shape)
        pshape = (C,)
        if norm == "group":
            x = np.broadcast_to(np.float64(0.1), shape)
    x = np.ascontiguousarray(x, dtype=dtype)
    w = (1 + rng.random(pshape)).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype)
    kw = {"axis": axis}
    if norm == "group":
        kw["num_groups"] = 3
    f = nc_forward(norm, x, w, b, **kw)
    expected = np.broadcast_to(b if norm == "layer" else
                               b.reshape([C if i == axis % len(shape) else 1
                                          for i in range(len(shape))]), shape)
    assert not np.isnan(f.y).any() and not np.isnan(f.rstd).any()
    assert np.array_equal(f.y, expected), "zero-variance input must give y == bias exactly"
    y0 = nc_forward(norm, x, None, None, **kw).y
    assert np.array_equal(y0, np.zeros(shape)), "zero-variance input must give y == 0"
    assert_close(f.rstd, np.full(f.rstd.shape, 1 / np.sqrt(1e-5)), dtype=dtype, n=x.size)


# ------------------------------------------------------------------------------ empty
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm,shape,axis,stats", [
    ("layer", (0, 5), -1, (0,)), ("layer", (2, 0, 4), -1, (2, 0)),
    ("layer", (0, 3, 4), (-2, -1), (0,)),
    ("group", (0, 4, 3), 1, (0, 2)), ("instance", (0, 3, 4), 1, (0, 3)),
    ("instance", (0, 4, 3), -1, (0, 3)),
])
def test_empty_inputs_give_empty_outputs(norm, shape, axis, stats, dtype):
    x = np.empty(shape, dtype)
    kw = {"axis": axis}
    if norm == "group":
        kw["num_groups"] = 2
    f = nc_forward(norm, x, **kw)
    assert f.y.shape == shape and f.y.dtype == dtype
    assert f.mean.shape == stats and f.rstd.shape == stats
    y = nc_dropin(norm, x, **kw)
    assert y.shape == shape
    pshape = shape[-1:] if (norm == "layer" and np.isscalar(axis)) else (
        shape[-2:] if norm == "layer" else (shape[axis],))
    g = nc_backward(norm, np.empty(shape, dtype), x, f.mean, f.rstd, np.ones(pshape, dtype),
                    **kw)
    assert g.dx.shape == shape
    assert np.array_equal(g.dweight, np.zeros(pshape)) and g.dweight.shape == pshape
    assert np.array_equal(g.dbias, np.zeros(pshape))


def test_empty_eval_batch_norm():
    x = np.empty((0, 3, 4))
    f = nc.batch_norm_forward(x, running_mean=np.zeros(3), running_var=np.ones(3),
                              training=False)
    assert f.y.shape == (0, 3, 4) and f.mean.shape == (3,)

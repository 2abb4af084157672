"""Hypothesis over shapes, channel axes, LayerNorm axes, layouts and dtypes: forward and
backward against the oracle, and layout invariances."""
import numpy as np
import oracle
from helpers import (
    assert_close,
    check_backward,
    check_forward,
    make_inputs,
    nc_backward,
    nc_forward,
    norm_cases,
    param_shape,
    ref_backward,
    ref_forward,
    with_layout,
)
from hypothesis import given
from hypothesis import strategies as st

import normcore as nc


def _n(case):
    kw = case["kw"]
    return oracle.reduction_length(case["norm"], case["shape"], kw["axis"],
                                   kw.get("num_groups"))


def _cond(case):
    return max(1.0, abs(case["offset"]) / case["std"])


@given(norm_cases())
def test_forward_matches_oracle(case):
    norm, kw = case["norm"], dict(case["kw"], eps=case["eps"])
    x, w, b, _ = make_inputs(case)
    x0 = np.array(x)
    got = nc_forward(norm, x, w, b, **kw)
    ref = ref_forward(norm, x0, w, b, **kw)
    check_forward(norm, got, ref, x0, n=_n(case), cond=_cond(case))
    assert np.array_equal(x, x0)


@given(norm_cases())
def test_backward_matches_oracle(case):
    norm, kw = case["norm"], dict(case["kw"], eps=case["eps"])
    x, w, b, dy = make_inputs(case)
    f = nc_forward(norm, x, w, b, **kw)
    bkw = {k: v for k, v in kw.items() if k != "eps"}
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, **bkw)
    ref = ref_backward(norm, np.array(dy), np.array(x), f.mean, f.rstd, w, **bkw)
    check_backward(got, ref, np.array(x), np.array(dy), f.rstd, w,
                   param_shape(norm, case["shape"], kw["axis"]), n=_n(case))


@given(norm_cases(norms=("batch", "instance", "group"), sizes="cached"))
def test_cache_resident_kernels_match_oracle(case):
    """Shapes large enough for the row kernels over a statistic's strided runs (channels-first
    BatchNorm) and the fused per-sample column kernels (channels-last IN / GN)."""
    norm, kw = case["norm"], dict(case["kw"], eps=case["eps"])
    x, w, b, dy = make_inputs(case)
    x0, dy0 = np.array(x), np.array(dy)
    f = nc_forward(norm, x, w, b, **kw)
    check_forward(norm, f, ref_forward(norm, x0, w, b, **kw), x0, n=_n(case), cond=_cond(case))
    bkw = {k: v for k, v in kw.items() if k != "eps"}
    got = nc_backward(norm, dy, x, f.mean, f.rstd, w, **bkw)
    ref = ref_backward(norm, dy0, x0, f.mean, f.rstd, w, **bkw)
    check_backward(got, ref, x0, dy0, f.rstd, w, param_shape(norm, case["shape"], kw["axis"]),
                   n=_n(case))


def test_cached_sizes_reach_the_cache_resident_paths():
    """The strategy above does reach the paths it is for."""
    from normcore._plan import plan_batch_norm, plan_group_norm, plan_instance_norm
    assert plan_batch_norm((8, 8, 32, 32), 1, 2).path == "rows"
    assert plan_batch_norm((8, 8, 32, 32), 1, 2).A == 8
    assert plan_instance_norm((8, 8, 8, 8), -1, 2).path == "columns_fused"
    assert plan_group_norm((8, 8, 8, 12), 4, -1, 2).path == "columns_fused"


@given(norm_cases(norms=("batch", "instance")))
def test_running_stats_match_oracle(case):
    norm, kw = case["norm"], dict(case["kw"], eps=case["eps"])
    x, w, b, _ = make_inputs(case)
    C = case["shape"][kw["axis"]]
    rng = np.random.default_rng(case["seed"] + 1)
    dtype = case["dtype"]
    rm, rv = rng.standard_normal(C).astype(dtype), (0.5 + rng.random(C)).astype(dtype)
    ref = ref_forward(norm, np.array(x), w, b, running_mean=rm.copy(), running_var=rv.copy(),
                      momentum=0.25, **kw)
    nc_forward(norm, x, w, b, running_mean=rm, running_var=rv, momentum=0.25, **kw)
    n = int(np.prod(case["shape"]))
    cond = _cond(case)
    assert_close(rm, ref.running_mean, dtype=dtype, n=n, cond=cond,
                 scale=np.max(np.abs(x)), what="running_mean")
    assert_close(rv, ref.running_var, dtype=dtype, n=n, cond=cond, what="running_var")


@given(norm_cases(layouts=("C",)), st.sampled_from(["F", "transposed", "strided", "negative"]))
def test_layout_does_not_change_the_result(case, layout):
    """The same values in another memory layout give the same answer (within rounding:
    a different traversal order may round differently)."""
    norm, kw = case["norm"], case["kw"]
    x, w, b, _ = make_inputs(case)
    a = nc_forward(norm, x, w, b, **kw)
    c = nc_forward(norm, with_layout(x, layout, np.random.default_rng(case["seed"])), w, b, **kw)
    for name in ("y", "mean", "rstd"):
        assert_close(getattr(c, name), getattr(a, name).astype(np.float64),
                     dtype=case["dtype"], n=_n(case), cond=_cond(case),
                     scale=np.max(np.abs(x)) if name == "mean" else None, what=name)


@given(norm_cases(norms=("batch", "instance", "group")))
def test_channel_axis_position_is_a_relabeling(case):
    """Moving the channel axis (and passing the new axis) moves y and keeps the statistics."""
    norm, kw = case["norm"], dict(case["kw"])
    x, w, b, _ = make_inputs(case)
    a = nc_forward(norm, x, w, b, **kw)
    ax = kw["axis"] % x.ndim
    new = x.ndim - 1 if ax != x.ndim - 1 else 1
    kw["axis"] = new
    c = nc_forward(norm, np.moveaxis(x, ax, new), w, b, **kw)
    n, dt = _n(case), case["dtype"]
    assert_close(c.y, np.moveaxis(a.y, ax, new).astype(np.float64), dtype=dt, n=n,
                 cond=_cond(case), what="y")
    assert_close(c.mean, a.mean.astype(np.float64), dtype=dt, n=n, cond=_cond(case),
                 scale=np.max(np.abs(x)), what="mean")
    assert_close(c.rstd, a.rstd.astype(np.float64), dtype=dt, n=n, cond=_cond(case),
                 what="rstd")


@st.composite
def moment_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-ndim, ndim - 1))
    else:
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        axis = tuple(a - ndim if draw(st.booleans()) else a for a in axes)
    return {"shape": shape, "axis": axis,
            "dtype": draw(st.sampled_from([np.float32, np.float64])),
            "correction": draw(st.sampled_from([0, 1])),
            "seed": draw(st.integers(0, 2**32 - 1)),
            "layout": draw(st.sampled_from(["C", "F", "transposed", "strided", "negative"]))}


@given(moment_cases())
def test_moments_match_oracle(case):
    rng = np.random.default_rng(case["seed"])
    x0 = (1.5 + rng.standard_normal(case["shape"])).astype(case["dtype"])
    x = with_layout(x0, case["layout"], rng)
    rm, rv = oracle.moments(x0, case["axis"], correction=case["correction"])
    n = x0.size // max(rm.size, 1)
    m, v = nc.moments(x, case["axis"], correction=case["correction"])
    assert np.shape(m) == rm.shape and np.shape(v) == rv.shape
    assert_close(m, rm, dtype=case["dtype"], n=n, scale=np.max(np.abs(x0)), what="mean")
    if n - case["correction"] > 0:
        assert_close(v, rv, dtype=case["dtype"], n=n, cond=2.5, what="var")

"""Shared test helpers: the one tolerance rule, array layouts, calls into normcore and the
oracle by norm name, and the hypothesis strategy for shapes/axes/layouts."""
from __future__ import annotations

import numpy as np
import oracle
from hypothesis import strategies as st

FLOATS = (np.float32, np.float64)

# ------------------------------------------------------------------------ the tolerance
# Error model for a normalization computed in a dtype with unit roundoff eps, checked
# against the float64 oracle of the same (already rounded) input:
#   * sqrt(n): the statistics and gradient reductions add n rounding errors; for any sane
#     order of summation (sequential, blocked, pairwise, Welford/Chan) they behave like a
#     random walk, so the typical error grows like eps * sqrt(n) (the worst case n * eps
#     is reached only by adversarial data, not by the random inputs used here);
#   * cond: the conditioning of the data, |mean| / std. Subtracting a mean of size
#     cond * std loses log2(cond) bits, even with the correctly rounded mean; it adds, not
#     multiplies, because a one-pass shifted/Welford or two-pass algorithm accumulates
#     centred terms. cond = 1 covers the final elementwise rounding of well-scaled data.
# The bound is normwise: each element may be off by tol * (|expected| + scale), with
# scale = max|expected| by default (or the magnitude of the summed terms when the caller
# knows better, e.g. max|x| for a mean), so elements that cancel to ~0 are not held to a
# relative error they cannot have. TOL_FACTOR = 8 leaves room for a few ulps of rounding
# in each of mean, rstd and the affine step. For float64 the bound is ~1e-13 at n ~ 1e3,
# tight enough to see eps in the wrong place or a biased/unbiased variance mix-up; for
# the float32 hard-numerics cases (cond 1e4, n = 2**21) it is ~1e-2, while E[x^2]-E[x]^2
# or a float32 running sum is off by > 1 there (test_numerics checks that it fails).
TOL_FACTOR = 8.0


def tolerance(dtype, n, cond=1.0):
    eps = float(np.finfo(dtype).eps)
    return TOL_FACTOR * eps * (np.sqrt(max(int(n), 1)) + float(cond))


def assert_close(actual, expected, *, dtype, n, cond=1.0, scale=None, what="value"):
    """Assert ``actual`` matches the float64 ``expected`` within the dtype/length tolerance.

    NaNs must sit at the same positions in both; shapes must match exactly.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}")
    a = actual.astype(np.float64)
    nan_a, nan_e = np.isnan(a), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), (
        f"{what}: NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()} differs from expected")
    a, e = a[~nan_e], expected[~nan_e]
    if e.size == 0:
        return
    assert np.array_equal(np.isinf(a), np.isinf(e)) and np.array_equal(a[np.isinf(e)],
                                                                       e[np.isinf(e)]), (
        f"{what}: infinities differ")
    fin = np.isfinite(e)
    a, e = a[fin], e[fin]
    if e.size == 0:
        return
    tol = tolerance(dtype, n, cond)
    s = float(np.max(np.abs(e))) if scale is None else float(scale)
    s = max(s, float(np.finfo(dtype).tiny))
    err = np.abs(a - e)
    bound = tol * (np.abs(e) + s)
    bad = ~(err <= bound)
    if bad.any():
        i = int(np.argmax(np.where(bad, err / bound, 0)))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.size} elements off (dtype={np.dtype(dtype).name}, "
            f"n={n}, cond={cond}, tol={tol:.3g}, scale={s:.3g}); worst: got {a[i]!r}, "
            f"expected {e[i]!r}, |err|={err[i]:.3g} > bound {bound[i]:.3g}")


# ------------------------------------------------------------------------------ layouts
LAYOUTS = ("C", "F", "transposed", "strided", "negative", "readonly")


def with_layout(a, layout, rng=None):
    """An array equal to ``a`` (same shape, dtype, values) with the given memory layout."""
    a = np.asarray(a)
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":          # a view of a contiguous block in another axis order
        perm = np.arange(a.ndim)[::-1] if rng is None else rng.permutation(a.ndim)
        base = np.ascontiguousarray(np.transpose(a, perm))
        return np.transpose(base, np.argsort(perm))
    if layout == "strided":             # every other element along every axis
        big = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative":            # negative strides on every axis
        base = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        return base[tuple(slice(None, None, -1) for _ in a.shape)]
    if layout == "readonly":
        r = np.array(a, copy=True)
        r.flags.writeable = False
        return r
    raise ValueError(layout)


# ---------------------------------------------------------------- calls by norm name
def nc_forward(norm, x, weight=None, bias=None, **kw):
    import normcore as nc
    if norm == "group":
        g = kw.pop("num_groups")
        return nc.group_norm_forward(x, g, weight, bias, **kw)
    return getattr(nc, f"{norm}_norm_forward")(x, weight, bias, **kw)


def nc_dropin(norm, x, weight=None, bias=None, **kw):
    import normcore as nc
    if norm == "group":
        g = kw.pop("num_groups")
        return nc.group_norm(x, g, weight, bias, **kw)
    return getattr(nc, f"{norm}_norm")(x, weight, bias, **kw)


def nc_backward(norm, dy, x, mean, rstd, weight=None, **kw):
    import normcore as nc
    if norm == "group":
        g = kw.pop("num_groups")
        return nc.group_norm_backward(dy, x, mean, rstd, g, weight, **kw)
    return getattr(nc, f"{norm}_norm_backward")(dy, x, mean, rstd, weight, **kw)


def ref_forward(norm, x, weight=None, bias=None, **kw):
    kw.pop("out", None)
    if norm == "group":
        g = kw.pop("num_groups")
        return oracle.group_norm_forward(x, g, weight, bias, **kw)
    return getattr(oracle, f"{norm}_norm_forward")(x, weight, bias, **kw)


def ref_backward(norm, dy, x, mean, rstd, weight=None, **kw):
    kw.pop("dx_out", None)
    if norm == "group":
        g = kw.pop("num_groups")
        return oracle.group_norm_backward(dy, x, mean, rstd, g, weight, **kw)
    return getattr(oracle, f"{norm}_norm_backward")(dy, x, mean, rstd, weight, **kw)


def param_shape(norm, shape, axis):
    if norm == "layer":
        axes = (axis,) if np.isscalar(axis) else tuple(axis)
        return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    return (shape[axis],)


def stats_shape(norm, shape, axis, num_groups=None):
    nd = len(shape)
    if norm == "batch":
        return (shape[axis],)
    if norm == "instance":
        return (shape[0], shape[axis])
    if norm == "group":
        return (shape[0], num_groups)
    red = oracle._ln_axes(nd, axis)
    return tuple(s for i, s in enumerate(shape) if i not in red)


def check_forward(norm, got, ref, x, *, n, cond=1.0):
    """Compare a normcore NormForward with the oracle's, including shapes and dtypes."""
    dtype = x.dtype
    assert isinstance(got.y, np.ndarray) and got.y.shape == x.shape and got.y.dtype == dtype
    assert_close(got.y, ref.y, dtype=dtype, n=n, cond=cond, what="y")
    for name in ("mean", "rstd"):
        g, r = getattr(got, name), getattr(ref, name)
        assert isinstance(g, np.ndarray), f"{name} is {type(g)}"
        assert g.shape == r.shape, f"{name} shape {g.shape} != {r.shape}"
        assert g.dtype == dtype, f"{name} dtype {g.dtype} != {dtype}"
    xm = float(np.max(np.abs(x[np.isfinite(x)]))) if x.size else 1.0
    # a mean is off by rounding of terms of size max|x|, whatever the mean's own size
    assert_close(got.mean, ref.mean, dtype=dtype, n=n, cond=cond, scale=xm, what="mean")
    assert_close(got.rstd, ref.rstd, dtype=dtype, n=n, cond=cond, what="rstd")


def check_backward(got, ref, x, dy, rstd, weight, weight_shape, *, n):
    """Compare a normcore NormBackward with the oracle's, including shapes and dtypes."""
    dtype = x.dtype
    assert isinstance(got.dx, np.ndarray) and got.dx.shape == x.shape and got.dx.dtype == dtype
    big_dy = float(np.max(np.abs(dy))) if dy.size else 1.0
    big_w = max(float(np.max(np.abs(weight))), 1.0) if weight is not None and weight.size else 1.0
    big_r = float(np.max(np.abs(rstd))) if np.size(rstd) else 1.0
    # dx = rstd * (g - E[g] - xhat E[g xhat]) may cancel to ~0 (e.g. two values per group),
    # so its error is measured against the size of the terms, rstd * |dy * w|
    assert_close(got.dx, ref.dx, dtype=dtype, n=n, scale=max(big_r * big_dy * big_w,
                 float(np.max(np.abs(ref.dx))) if ref.dx.size else 0.0), what="dx")
    m = max(x.size // max(int(np.prod(weight_shape)), 1), 1)   # terms in each sum
    for name in ("dweight", "dbias"):
        g, r = getattr(got, name), getattr(ref, name)
        assert isinstance(g, np.ndarray), f"{name} is {type(g)}"
        assert g.shape == tuple(weight_shape), f"{name} shape {g.shape} != {weight_shape}"
        assert g.dtype == dtype, f"{name} dtype {g.dtype} != {dtype}"
        # a sum of m terms |dy * xhat| <~ 4 |dy| that may cancel: scale sqrt(m) * 4 max|dy|
        sc = max(float(np.max(np.abs(r))) if r.size else 0.0, np.sqrt(m) * 4 * big_dy)
        assert_close(g, r, dtype=dtype, n=max(n, m), scale=sc, what=name)


# ------------------------------------------------------------------ hypothesis strategy
@st.composite
def norm_cases(draw, norms=oracle.NORMS, dtypes=FLOATS, layouts=LAYOUTS, sizes="small"):
    """A dict describing one call: norm, shape, axis (and num_groups), dtype, layout, seed,
    affine flags, value offset/scale. Values come from a NumPy RNG seeded by ``seed``
    (fast), bounded to |offset| <= 3 and 0.25 <= std <= 4 so the default cond holds.

    sizes="small": tiny extents (1-4 samples, 1-6 channels, spatial 1-4), which the plans send
    to the flat, column and short-row kernels. sizes="cached": 8-12 samples and channels and
    spatial extents 8-20 or 32-34 (1 or 2 dims), which reach the kernels that keep a statistic
    (rows with A > 1, runs of 1024 and more) or a sample (fused columns) in cache."""
    norm = draw(st.sampled_from(norms))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(layouts))
    small = sizes == "small"
    n_spatial = draw(st.integers(0, 3) if small else st.integers(1, 2))
    if norm == "instance":
        n_spatial = max(n_spatial, 1)
    N = draw(st.integers(1, 4) if small else st.integers(8, 12))
    C = draw(st.integers(1, 6) if small else st.sampled_from([8, 9, 12]))
    extent = st.integers(1, 4) if small else st.one_of(st.integers(8, 20), st.integers(32, 34))
    spatial = draw(st.lists(extent, min_size=n_spatial, max_size=n_spatial))
    case = {"norm": norm, "dtype": dtype, "layout": layout,
            "seed": draw(st.integers(0, 2**32 - 1)),
            "affine": draw(st.sampled_from(["none", "weight", "bias", "both"])),
            "offset": draw(st.floats(-3, 3)), "std": draw(st.floats(0.25, 4))}
    kw = {}
    if norm == "layer":
        shape = (N, C, *spatial)
        k = draw(st.integers(1, len(shape)))
        form = draw(st.sampled_from(["neg", "pos"]))
        axes = tuple(range(len(shape) - k, len(shape)))
        if form == "neg":
            axes = tuple(a - len(shape) for a in axes)
        kw["axis"] = axes[0] if (k == 1 and draw(st.booleans())) else axes
    else:
        if norm == "instance" and int(np.prod(spatial)) < 2:
            spatial[0] = 2                          # two values per instance
        if norm == "batch" and N * int(np.prod(spatial)) < 2:
            N = 2                                   # training needs two values per channel
        pos = draw(st.integers(1, n_spatial + 1))   # channel axis position among 1..ndim-1
        shape = [N, *spatial]
        shape.insert(pos, C)
        shape = tuple(shape)
        kw["axis"] = pos if draw(st.booleans()) else pos - len(shape)
        if norm == "group":
            kw["num_groups"] = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    case["shape"] = shape
    case["kw"] = kw
    case["eps"] = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return case


def make_inputs(case):
    """x (with the case's layout), weight, bias and dy from the case's seed."""
    rng = np.random.default_rng(case["seed"])
    dtype, shape, norm = case["dtype"], case["shape"], case["norm"]
    x = (case["offset"] + case["std"] * rng.standard_normal(shape)).astype(dtype)
    pshape = param_shape(norm, shape, case["kw"]["axis"])
    w = (1 + 0.5 * rng.standard_normal(pshape)).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    aff = case["affine"]
    w = w if aff in ("weight", "both") else None
    b = b if aff in ("bias", "both") else None
    return with_layout(x, case["layout"], rng), w, b, with_layout(dy, case["layout"], rng)

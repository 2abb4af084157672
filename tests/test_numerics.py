"""Hard numerics: large offsets (|mean| / std = 1e4) over 2**21 values, a statistics group of
more than 2**22 values, all-equal inputs. Every tolerance is helpers.tolerance; the sanity
tests below compute the naive float32 answers (E[x^2] - E[x]^2, a float32 running sum,
sum(dy * x) - mean * sum(dy)) and show the same checks reject them, and that an honest
float32 two-pass passes them."""
import numpy as np
import oracle
import pytest
from helpers import assert_close

import normcore as nc

pytestmark = pytest.mark.slow

OFFSET, STD = 1e4, 1.0
COND = OFFSET / STD
BIG = 2**21


def _offset_data(shape, seed, dtype=np.float32, offset=OFFSET, std=STD):
    rng = np.random.default_rng(seed)
    return (dtype(offset) + dtype(std) * rng.standard_normal(shape, dtype=np.float32)
            .astype(dtype)).astype(dtype)


def check_stats(mean, rstd, y, ref, *, n, dtype=np.float32, cond=COND):
    """mean in units of the std (its size, 1e4, is no excuse for being 1e-2 std off),
    rstd relative, y normwise; all from the one tolerance rule."""
    mean, ref_mean = np.asarray(mean, np.float64), np.asarray(ref.mean)
    std = 1 / np.asarray(ref.rstd)
    assert_close((mean - ref_mean) / std, np.zeros(ref_mean.shape), dtype=dtype, n=n,
                 cond=cond, scale=1.0, what="mean error / std")
    assert_close(rstd, ref.rstd, dtype=dtype, n=n, cond=cond, what="rstd")
    assert_close(y, ref.y, dtype=dtype, n=n, cond=cond, what="y")


# ------------------------------------------------------------------ the naive answers
def naive_sums(x, axis):
    """E[x^2] - E[x]^2 with float32 running sums (np.cumsum is sequential)."""
    n = x.shape[axis]
    s = np.take(np.cumsum(x, axis=axis, dtype=np.float32), -1, axis=axis)
    s2 = np.take(np.cumsum(x * x, axis=axis, dtype=np.float32), -1, axis=axis)
    mean = s / np.float32(n)
    return mean, s2 / np.float32(n) - mean * mean


def naive_pairwise(x, axis):
    """E[x^2] - E[x]^2 with NumPy's pairwise float32 sums (better summation, same formula)."""
    mean = x.mean(axis=axis, dtype=np.float32)
    return mean, (x * x).mean(axis=axis, dtype=np.float32) - mean * mean


def running_sum_mean_twopass(x, axis):
    """A float32 running sum for the mean, then an exact centred variance."""
    n = x.shape[axis]
    mean = np.take(np.cumsum(x, axis=axis, dtype=np.float32), -1, axis=axis) / np.float32(n)
    var = ((x - np.expand_dims(mean, axis)).astype(np.float64) ** 2).mean(axis=axis)
    return mean, var.astype(np.float32)


def honest_twopass(x, axis):
    """Pairwise float32 mean, then pairwise float32 centred variance."""
    mean = x.mean(axis=axis, dtype=np.float32)
    d = x - np.expand_dims(mean, axis)
    return mean, (d * d).mean(axis=axis, dtype=np.float32)


def _as_forward(x, mean, var, axis, eps=1e-5):
    with np.errstate(invalid="ignore"):
        rstd = np.float32(1) / np.sqrt(var + np.float32(eps))
    y = (x - np.expand_dims(mean, axis)) * np.expand_dims(rstd, axis)
    return mean, rstd, y


@pytest.fixture(scope="module")
def rows():
    x = _offset_data((2, BIG), seed=11)
    return x, oracle.layer_norm_forward(x)


@pytest.mark.parametrize("method", [naive_sums, naive_pairwise, running_sum_mean_twopass])
def test_sanity_naive_float32_fails_these_checks(rows, method):
    x, ref = rows
    mean, rstd, y = _as_forward(x, *method(x, -1), -1)
    with pytest.raises(AssertionError):
        check_stats(mean, rstd, y, ref, n=BIG)


def test_sanity_honest_float32_passes_these_checks(rows):
    x, ref = rows
    check_stats(*_as_forward(x, *honest_twopass(x, -1), -1), ref, n=BIG)


def test_sanity_centred_backward_passes_naive_fails(rows):
    """sum(dy * xhat) over a row of 2**21: centred passes, sum(dy*x) - mean*sum(dy) fails,
    with pairwise and with running float32 sums. Backward gets mean and rstd as inputs and
    the oracle uses the same float32 values, so x - mean is exact (Sterbenz) and a centred
    backward has no conditioning loss: cond = 1."""
    x, ref = rows
    dy = np.random.default_rng(3).standard_normal(x.shape, dtype=np.float32)
    mean = ref.mean.astype(np.float32)[:, None]
    rstd = ref.rstd.astype(np.float32)[:, None]
    exact = np.sum(dy.astype(np.float64) * (x - mean.astype(np.float64))
                   * rstd.astype(np.float64), axis=1)
    centred = np.sum(dy * ((x - mean) * rstd), axis=1, dtype=np.float32)
    naive = (np.sum(dy * x, axis=1, dtype=np.float32)
             - mean[:, 0] * np.sum(dy, axis=1, dtype=np.float32)) * rstd[:, 0]
    naive_seq = (np.cumsum(dy * x, axis=1, dtype=np.float32)[:, -1]
                 - mean[:, 0] * np.cumsum(dy, axis=1, dtype=np.float32)[:, -1]) * rstd[:, 0]
    kw = {"dtype": np.float32, "n": BIG, "cond": 1.0, "scale": np.sqrt(BIG)}
    assert_close(centred, exact, **kw, what="centred")
    for bad in (naive, naive_seq):
        with pytest.raises(AssertionError):
            assert_close(bad, exact, **kw, what="naive")


# ------------------------------------------------------------- normcore, large offset
def test_layer_norm_large_offset(rows):
    x, ref = rows
    f = nc.layer_norm_forward(x)
    check_stats(f.mean, f.rstd, f.y, ref, n=BIG)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_batch_norm_large_offset(layout):
    if layout == "channels_first":
        x, axis = _offset_data((2**10, 2, 2**11), seed=5), 1
    else:
        x, axis = _offset_data((2**10, 2**11, 2), seed=6), -1
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    f = nc.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0, axis=axis)
    ref = oracle.batch_norm_forward(x, running_mean=np.zeros(2), running_var=np.ones(2),
                                    momentum=1.0, axis=axis)
    check_stats(f.mean, f.rstd, f.y, ref, n=BIG)
    assert_close((rm - ref.running_mean) * ref.rstd, np.zeros(2), dtype=np.float32, n=BIG,
                 cond=COND, scale=1.0, what="running_mean error / std")
    assert_close(rv, ref.running_var, dtype=np.float32, n=BIG, cond=COND, what="running_var")


def test_batch_norm_backward_large_offset():
    x = _offset_data((2**10, 2, 2**11), seed=7)
    dy = np.random.default_rng(8).standard_normal(x.shape, dtype=np.float32)
    f = nc.batch_norm_forward(x)
    g = nc.batch_norm_backward(dy, x, f.mean, f.rstd)
    ref = oracle.batch_norm_backward(dy, x, f.mean, f.rstd)
    # dweight, dbias: sums of 2**21 terms of size ~1 that grow like sqrt(n); the stats are
    # inputs shared with the oracle, so cond = 1 (see the sanity test above)
    kw = {"dtype": np.float32, "n": BIG, "cond": 1.0, "scale": np.sqrt(BIG)}
    assert_close(g.dweight, ref.dweight, **kw, what="dweight")
    assert_close(g.dbias, ref.dbias, **kw, what="dbias")
    assert_close(g.dx, ref.dx, dtype=np.float32, n=BIG, cond=1.0, what="dx")


def test_float64_large_offset():
    """float64 with |mean| / std = 1e8: float64's E[x^2] - E[x]^2 is off by ~1 there."""
    rng = np.random.default_rng(9)
    x = 1e8 + rng.standard_normal((2**19, 2))
    f = nc.batch_norm_forward(x, axis=-1)
    ref = oracle.batch_norm_forward(x, axis=-1)
    check_stats(f.mean, f.rstd, f.y, ref, n=2**19, dtype=np.float64, cond=1e8)
    naive_mean = x.mean(axis=0)
    naive_var = (x * x).mean(axis=0) - naive_mean**2
    with pytest.raises(AssertionError):
        check_stats(*_as_forward(x, naive_mean, naive_var, 0), ref, n=2**19,
                    dtype=np.float64, cond=1e8)


# A float32 mean of 1e4 is half an ulp (5e-4) from the float64 one: the kernels subtract it
# as hi + lo, so y keeps no trace of the offset and is held to cond = 1 (losing lo fails it).
SHORT_OFFSET_CASES = [
    ("layer", (4096, 128), {}),                                 # short rows, one at a time
    ("layer", (4096, 128), {"activation": "relu"}),             # short rows in blocks
    ("layer", (4096, 96), {"residual": True}),
    ("layer", (64, 1000), {}),                                  # a row per normalize_run
    ("instance", (32, 64, 7, 7), {"axis": 1}),                  # short cells, C per sample
    ("group", (32, 64, 7, 7), {"axis": 1, "num_groups": 8}),
    ("batch", (64, 256, 7, 7), {"axis": 1}),                    # flat: a channel's short runs
    ("batch", (31, 11, 15, 20), {"axis": 1}),                   # ... in chunks from mid-run
]


@pytest.mark.parametrize("norm,shape,kw", SHORT_OFFSET_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{'-'.join(c[2]) or 'plain'}"
                              for c in SHORT_OFFSET_CASES])
def test_offset_costs_rows_nothing(norm, shape, kw):
    x = _offset_data(shape, seed=len(shape) * 31 + shape[-1])
    rng = np.random.default_rng(shape[-1])
    axis = kw.get("axis", -1)
    pshape = shape[-1:] if norm == "layer" else (shape[axis],)
    w = (1 + 0.25 * rng.standard_normal(pshape)).astype(np.float32)
    b = rng.standard_normal(pshape).astype(np.float32)
    kw = dict(kw)
    z = None
    if kw.pop("residual", False):
        z = rng.standard_normal(shape).astype(np.float32)
        kw["residual"] = z
    groups = kw.pop("num_groups", None)
    call = {k: v for k, v in kw.items() if k != "activation" and k != "residual"}
    if norm == "group":
        f = nc.group_norm_forward(x, groups, w, b, **kw)
        ref = oracle.group_norm_forward(x, groups, w, b, **call)
    else:
        f = getattr(nc, f"{norm}_norm_forward")(x, w, b, **kw)
        ref = getattr(oracle, f"{norm}_norm_forward")(x, w, b, **call)
    y = ref.y + (z if z is not None else 0)
    if kw.get("activation") == "relu":
        y = np.maximum(y, 0)
    n = oracle.reduction_length(norm, shape, axis, groups)
    assert_close(f.y, y, dtype=np.float32, n=n, cond=1.0, what="y")
    assert_close((f.mean - ref.mean) * ref.rstd, np.zeros(ref.mean.shape), dtype=np.float32,
                 n=n, cond=COND, scale=1.0, what="mean error / std")
    assert_close(f.rstd, ref.rstd, dtype=np.float32, n=n, cond=1.0, what="rstd")


# ------------------------------------------------------ one group of more than 2**22
def test_layer_norm_one_huge_row():
    n = 2**22 + 3
    x = _offset_data((1, n), seed=12)
    f = nc.layer_norm_forward(x)
    check_stats(f.mean, f.rstd, f.y, oracle.layer_norm_forward(x), n=n)


def test_group_norm_one_huge_group():
    n = 4 * (2**20 + 1)
    x = _offset_data((1, 2**20 + 1, 4), seed=13)
    w = np.array([1.0, 2.0, 0.5, -1.0], np.float32)
    f = nc.group_norm_forward(x, 1, w, None, axis=-1)
    check_stats(f.mean, f.rstd, f.y, oracle.group_norm_forward(x, 1, w, None, axis=-1), n=n)


def test_instance_norm_one_huge_instance():
    n = 2**22 + 5
    x = _offset_data((1, 1, n), seed=14, offset=-3e3, std=0.5)
    f = nc.instance_norm_forward(x)
    check_stats(f.mean, f.rstd, f.y, oracle.instance_norm_forward(x), n=n, cond=6e3)


# ------------------------------------------------------------------------- all equal
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_all_equal_large(norm, dtype):
    consts = np.array([1e4 + 0.5, 0.1, -3.3e-3], dtype)
    b = np.array([0.5, -2.0, 0.0], dtype)
    if norm == "batch":          # 2**20 values per channel, channels last
        x = np.ascontiguousarray(np.broadcast_to(consts, (2**20, 3)))
        f = nc.batch_norm_forward(x, None, b, axis=-1)
        expected = np.broadcast_to(b, x.shape)
    elif norm == "layer":        # 3 rows of 2**20
        x = np.ascontiguousarray(np.broadcast_to(consts[:, None], (3, 2**20)))
        f = nc.layer_norm_forward(x, None, None)
        expected = np.zeros(x.shape)
    else:                        # one group per instance, (3, 2, 2**19)
        x = np.ascontiguousarray(np.broadcast_to(consts[:, None, None], (3, 2, 2**19)))
        f = nc.group_norm_forward(x, 1, None, b[:2])
        expected = np.broadcast_to(b[:2, None], x.shape)
    assert np.array_equal(f.y, expected)
    assert_close(f.rstd, np.full(f.rstd.shape, 1 / np.sqrt(1e-5)), dtype=dtype, n=1)
    assert np.isin(f.mean, consts).all(), "the mean of equal values is that value"


@pytest.mark.parametrize("norm, shape, axis", [
    ("batch", (64, 4, 512), 1),        # rows, scalar weight per run
    ("batch", (4, 64, 2048), 1),       # flat
    ("batch", (512, 64, 4), -1),       # columns
    ("layer", (64, 2048), -1),         # rows, a weight per element
])
def test_backward_uses_the_float64_mean_beyond_float32(norm, shape, axis):
    """The float32 kernels split a float64 mean into hi + lo; the part lo that float32 cannot
    hold (up to half an ulp of 1e4 here, 5e-4 std) must still reach dx. dy ~ xhat makes
    c1 = mean(dy * xhat) ~ 1, so a lost or mis-signed lo moves dx by ~rstd**2 * lo ~ 5e-4
    against a bound of ~1e-5 on terms of size ~1 (scale=1)."""
    x = _offset_data(shape, seed=11)
    x64 = x.astype(np.float64)
    c = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != c) if norm == "batch" else (x.ndim - 1,)
    mean = x64.mean(axis=red, keepdims=True)
    # shift the mean off the float32 grid by a quarter ulp: lo != 0 for every statistic
    mean = mean + np.spacing(np.float32(OFFSET)) / 4
    rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=red, keepdims=True) + 1e-5)
    rng = np.random.default_rng(12)
    dy = ((x64 - mean) * rstd + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    stat_shape = (x.shape[c],) if norm == "batch" else x.shape[:-1]
    mean_s, rstd_s = mean.reshape(stat_shape), rstd.reshape(stat_shape)
    if norm == "batch":
        g = nc.batch_norm_backward(dy, x, mean_s, rstd_s, axis=axis)
        ref = oracle.batch_norm_backward(dy, x, mean_s, rstd_s, axis=axis)
    else:
        g = nc.layer_norm_backward(dy, x, mean_s, rstd_s)
        ref = oracle.layer_norm_backward(dy, x, mean_s, rstd_s)
    n = x.size // mean.size
    assert_close(g.dx, ref.dx, dtype=np.float32, n=n, scale=1.0, what="dx")


@pytest.mark.parametrize("norm, shape, axis", [
    ("layer", (256, 128), -1),          # rows of a weight per element (cell_sums)
    ("layer", (64, 100), -1),           # ... and a last partial window
    ("layer", (64, 4096), -1),
    ("instance", (8, 64, 7, 7), 1),     # rows in pairs (run_sums_pair)
    ("instance", (4, 16, 28, 28), 1),   # rows of one cell (run_sums)
    ("group", (32, 64, 7, 7), 1),       # short cells in pairs
    ("group", (8, 64, 28, 28), 1),
    ("batch", (512, 64, 4), -1),        # column sweeps
    ("batch", (256, 1024), -1),
    ("batch", (8, 256, 7, 7), 1),       # fused column slices
])
def test_backward_sums_use_the_float64_mean_beyond_float32(norm, shape, axis):
    """The backward's sums, sum(dy) and sum(dy * xhat), take xhat with the mean's part lo
    that float32 cannot hold: with dy of mean 1, sum(dy) ~ n, and an xhat that dropped lo
    (LLVM reassociating (x - hi) - lo into x - (hi + lo), which rounds to x - hi) moved
    dweight by ~rstd * lo * n, up to 0.44 of max |dweight| here, and dx by 3-5e-3, against
    bounds of ~1e-5."""
    x = _offset_data(shape, seed=21)
    rng = np.random.default_rng(22)
    dy = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    C = shape[axis]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    groups = (8,) if norm == "group" else ()
    kw = {} if norm == "layer" else {"axis": axis}
    f = getattr(oracle, norm + "_norm_forward")(x, *groups, w, w, **kw)
    # a quarter ulp off the float32 grid: lo != 0 for every statistic
    mean = np.asarray(f.mean, np.float64) + np.spacing(np.float32(OFFSET)) / 4
    rstd = np.asarray(f.rstd, np.float64)
    g = getattr(nc, norm + "_norm_backward")(dy, x, mean, rstd, *groups, w, **kw)
    ref = getattr(oracle, norm + "_norm_backward")(dy, x, mean, rstd, *groups, w, **kw)
    n = x.size // mean.size
    assert_close(g.dx, ref.dx, dtype=np.float32, n=n, scale=1.0, what="dx")
    for name in ("dweight", "dbias"):
        assert_close(getattr(g, name), getattr(ref, name), dtype=np.float32, n=x.size // C,
                     what=name)


@pytest.mark.parametrize("shape, axis", [((64, 4, 512), 1), ((512, 64, 4), -1), ((512, 64), 1)])
def test_eval_uses_the_float64_running_mean_beyond_float32(shape, axis):
    """Eval BatchNorm with a float64 running mean a quarter ulp off the float32 grid near 1e4:
    dropping the part float32 cannot hold moves y by 2.4e-4, against a bound of ~6e-6."""
    x = _offset_data(shape, seed=13)
    C = x.shape[axis]
    rm = OFFSET + np.spacing(np.float32(OFFSET)) / 4 + np.linspace(-0.5, 0.5, C)
    rv = np.linspace(0.5, 2.0, C)
    y = nc.batch_norm(x, running_mean=rm, running_var=rv, training=False, axis=axis)
    ref = oracle.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False,
                                    axis=axis)
    assert_close(y, ref.y, dtype=np.float32, n=1, what="y")

"""The CUDA kernels, run by numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before Python
starts), through normcore._cuda's backend functions with NumPy arrays, against the float64
oracle: every norm, both layouts, every GPU path, forward (batch and frozen statistics),
backward (batch and frozen), float32 / float64 / float16, and run-to-run determinism.
"""
import numpy as np
import pytest

numba = pytest.importorskip("numba")
if not numba.config.ENABLE_CUDASIM:
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 set before Python starts", allow_module_level=True)
pytest.importorskip("numba.cuda")

import cuda_helpers as ch  # noqa: E402
from helpers import assert_close, ref_backward, ref_forward  # noqa: E402

from normcore import _cuda  # noqa: E402
from normcore._plan import plan_moments  # noqa: E402

DTYPES = (np.float32, np.float64, np.float16)
CASE_IDS = [c[0] for c in ch.CASES]
FROZEN_CASES = [c for c in ch.CASES if c[1] in ("batch", "instance")]


@pytest.fixture(autouse=True)
def sim_config(monkeypatch):
    for name, value in ch.SIM_CONFIG.items():
        monkeypatch.setattr(_cuda, name, value)
    _cuda.paths.cache_clear()
    yield
    _cuda.paths.cache_clear()


def _inputs(shape, param_shape, dtype, seed, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 2.0, param_shape)
    bias = rng.standard_normal(param_shape)
    return x, dy, weight, bias


def _kw(norm, kw, **extra):
    return {**kw, **extra}


def _check_stats(got_mean, got_rstd, ref, x, n, cond=3.0):
    xm = float(np.max(np.abs(x.astype(np.float64))))
    assert_close(got_mean, ref.mean, dtype=x.dtype, n=n, cond=cond, scale=xm, what="mean")
    assert_close(got_rstd, ref.rstd, dtype=x.dtype, n=n, cond=cond, what="rstd")


def _check_backward(got, ref, x, dy, rstd, weight, n):
    dx, dweight, dbias = got
    assert dx.dtype == x.dtype
    big_dy = float(np.max(np.abs(dy.astype(np.float64))))
    scale = float(np.max(np.abs(rstd))) * big_dy * float(np.max(np.abs(weight)))
    assert_close(dx, ref.dx, dtype=x.dtype, n=n, scale=scale, what="dx")
    m = x.size // weight.size            # terms in each parameter-cell sum
    for name, g, r in (("dweight", dweight, ref.dweight), ("dbias", dbias, ref.dbias)):
        assert_close(g, r, dtype=x.dtype, n=max(n, m), scale=np.sqrt(m) * 4 * big_dy, what=name)


def test_available_under_the_simulator():
    assert _cuda.available()


@pytest.mark.parametrize("case", ch.CASES, ids=CASE_IDS)
def test_cases_cover_every_gpu_path(case):
    _, norm, shape, kw, expected = case
    assert _cuda.paths(ch.plan_for(norm, shape, kw)) == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ch.CASES, ids=CASE_IDS)
def test_forward_batch_statistics(case, dtype):
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, _, weight, bias = _inputs(shape, plan.param_shape, dtype, len(name))
    y, mean, rstd, var = ch.forward_train(_cuda, plan, x, weight, bias, want_var=True)
    ref = ref_forward(norm, x, weight, bias, **kw)
    assert y.dtype == x.dtype and mean.dtype == rstd.dtype == ch.stats_dtype(dtype)
    assert_close(y, ref.y, dtype=dtype, n=plan.n, cond=3.0, what="y")
    _check_stats(mean, rstd, ref, x, plan.n)
    ref_var = 1.0 / ref.rstd.astype(np.float64) ** 2 - 1e-5
    assert_close(np.asarray(var).reshape(plan.stats_shape), ref_var, dtype=dtype, n=plan.n,
                 cond=3.0, what="var")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", FROZEN_CASES, ids=[c[0] for c in FROZEN_CASES])
def test_forward_frozen_statistics(case, dtype):
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, _, weight, bias = _inputs(shape, plan.param_shape, dtype, len(name))
    rng = np.random.default_rng(1)
    rm, rv = rng.uniform(2, 4, weight.shape), rng.uniform(0.5, 2, weight.shape)
    mode = {"training": False} if norm == "batch" else {"use_input_stats": False}
    ref = ref_forward(norm, x, weight, bias, running_mean=rm, running_var=rv, **mode, **kw)
    y = ch.normalize(_cuda, plan, x, ref.mean, ref.rstd, weight, bias)
    assert_close(y, ref.y, dtype=dtype, n=plan.n, cond=3.0, what="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ch.CASES, ids=CASE_IDS)
def test_backward_batch_statistics(case, dtype):
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, dy, weight, _ = _inputs(shape, plan.param_shape, dtype, len(name))
    fwd = ref_forward(norm, x, weight, None, **kw)
    sdt = ch.stats_dtype(dtype)
    mean, rstd = fwd.mean.astype(sdt), fwd.rstd.astype(sdt)   # what a forward saved
    got = ch.backward(_cuda, plan, dy, x, mean, rstd, weight, frozen=False)
    ref = ref_backward(norm, dy, x, mean, rstd, weight, **kw)
    _check_backward(got, ref, x, dy, rstd, weight, plan.n)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", FROZEN_CASES, ids=[c[0] for c in FROZEN_CASES])
def test_backward_frozen_statistics(case, dtype):
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, dy, weight, _ = _inputs(shape, plan.param_shape, dtype, len(name))
    rng = np.random.default_rng(2)
    mean = rng.uniform(2, 4, plan.stats_shape)
    rstd = rng.uniform(0.5, 2, plan.stats_shape)
    got = ch.backward(_cuda, plan, dy, x, mean, rstd, weight, frozen=True)
    mode = {"training": False} if norm == "batch" else {"use_input_stats": False}
    ref = ref_backward(norm, dy, x, mean, rstd, weight, **mode, **kw)
    _check_backward(got, ref, x, dy, rstd, weight, plan.n)


@pytest.mark.parametrize("shape, axis", [((3, 4, 5), (0, 2)), ((3, 4, 5), 2), ((6, 5), 0),
                                         ((2, 3, 4), None)])
def test_moments(shape, axis):
    plan, perm = plan_moments(shape, axis, 1)
    x = np.random.default_rng(3).standard_normal(shape) + 5.0
    xt = x if perm is None else np.transpose(x, perm)
    mean, var = _cuda.moments(plan, np.ascontiguousarray(xt).reshape(-1))
    assert_close(mean.reshape(plan.stats_shape), x.mean(axis=axis), dtype=np.float64,
                 n=plan.n, cond=5.0, scale=6.0, what="mean")
    assert_close(var.reshape(plan.stats_shape), x.var(axis=axis), dtype=np.float64, n=plan.n,
                 cond=5.0, what="var")


@pytest.mark.parametrize("case", [ch.CASES[i] for i in (0, 1, 3, 7, 10)],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 7, 10)])
def test_deterministic(case):
    """Two runs give bitwise identical results (fixed reduction orders, no atomics)."""
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, dy, weight, bias = _inputs(shape, plan.param_shape, np.float32, len(name))

    def once():
        y, mean, rstd, _ = ch.forward_train(_cuda, plan, x, weight, bias)
        grads = ch.backward(_cuda, plan, dy, x, mean, rstd, weight, frozen=False)
        return (y, mean, rstd) + grads

    for a, b in zip(once(), once()):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", [ch.CASES[i] for i in (0, 1, 10)],
                         ids=[CASE_IDS[i] for i in (0, 1, 10)])
def test_float32_large_mean_small_std(case):
    """|mean| / std = 1e4 in float32: E[x^2] - E[x]^2 would lose every digit of var."""
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, _, weight, bias = _inputs(shape, plan.param_shape, np.float32, 7, offset=1e4)
    y, mean, rstd, _ = ch.forward_train(_cuda, plan, x, weight, bias)
    ref = ref_forward(norm, x, weight, bias, **kw)
    assert_close(y, ref.y, dtype=np.float32, n=plan.n, cond=1e4, what="y")
    _check_stats(mean, rstd, ref, x, plan.n, cond=1e4)


@pytest.mark.parametrize("case", [ch.CASES[i] for i in (0, 2, 6)],
                         ids=[CASE_IDS[i] for i in (0, 2, 6)])
def test_constant_input_gives_bias_exactly(case):
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x = np.full(shape, 0.3, np.float32)
    _, _, weight, bias = _inputs(shape, plan.param_shape, np.float32, 5)
    y, mean, rstd, _ = ch.forward_train(_cuda, plan, x, weight, bias)
    expected = ref_forward(norm, x, weight, bias, **kw).y.astype(np.float32)
    assert np.array_equal(y, expected)
    assert np.all(mean == np.float32(0.3))


@pytest.mark.parametrize("dtype", (np.float32, np.float16), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [ch.CASES[i] for i in (0, 1, 3, 9, 10)],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 9, 10)])
def test_residual_relu_epilogue(case, dtype):
    """y = relu(norm(x) + z); backward masks dy by y > 0 and returns dz = masked dy."""
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, dy, weight, bias = _inputs(shape, plan.param_shape, dtype, len(name))
    z = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    flat = lambda a: np.ascontiguousarray(a).reshape(-1)      # noqa: E731
    w, b = weight.reshape(-1).astype(np.float64), bias.reshape(-1).astype(np.float64)
    y = np.empty(x.size, dtype)
    mean, rstd, _ = _cuda.forward_train(plan, flat(x), y, w, b, 1e-5, ch.stats_dtype(dtype),
                                        False, z=flat(z), relu=True)
    ref = ref_forward(norm, x, weight, bias, **kw)
    assert_close(y.reshape(shape), np.maximum(ref.y + z.astype(np.float64), 0), dtype=dtype,
                 n=plan.n, cond=3.0, scale=float(np.max(np.abs(ref.y))) + 3, what="y")
    dx, dz = np.empty(x.size, dtype), np.empty(x.size, dtype)
    dweight, dbias = _cuda.backward(plan, flat(dy), flat(x), dx, mean.astype(np.float64),
                                    rstd.astype(np.float64), w, False, y=y, relu=True, dz=dz)
    dy_eff = np.where(y.reshape(shape) > 0, dy, 0).astype(dtype)
    assert np.array_equal(dz.reshape(shape), dy_eff)
    refb = ref_backward(norm, dy_eff, x, mean, rstd, weight, **kw)
    got = (dx.reshape(shape), dweight.reshape(weight.shape), dbias.reshape(weight.shape))
    _check_backward(got, refb, x, dy_eff, rstd, weight, plan.n)


@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [ch.CASES[i] for i in (0, 10, 11)],
                         ids=[CASE_IDS[i] for i in (0, 10, 11)])
def test_uncentred_rms_norm(case, dtype):
    """centered=False: mean := 0, var := mean(x**2) (RMSNorm), and c2 = 0 in the backward."""
    name, norm, shape, kw, _ = case
    plan = ch.plan_for(norm, shape, kw)
    x, dy, weight, bias = _inputs(shape, plan.param_shape, dtype, len(name), offset=0.5)
    xv = np.ascontiguousarray(x).reshape(plan.O, plan.A, plan.C, plan.B).astype(np.float64)
    dyv = np.ascontiguousarray(dy).reshape(xv.shape).astype(np.float64)
    cells = lambda a: a.reshape(-1).astype(np.float64).reshape(plan.C, plan.Q)     # noqa: E731
    wv = np.repeat(cells(weight), plan.P, axis=1)[None, None]     # (1, 1, C, B)
    bv = np.repeat(cells(bias), plan.P, axis=1)[None, None]
    rstd_ref = 1 / np.sqrt((xv ** 2).mean(axis=(1, 3), keepdims=True) + 1e-5)
    xhat = xv * rstd_ref
    g = dyv * wv
    dx_ref = rstd_ref * (g - xhat * (g * xhat).mean(axis=(1, 3), keepdims=True))

    y = np.empty(x.size, dtype)
    mean, rstd, _ = _cuda.forward_train(plan, x.reshape(-1), y, weight.reshape(-1) * 1.0,
                                        bias.reshape(-1) * 1.0, 1e-5, ch.stats_dtype(dtype),
                                        False, centered=False)
    assert np.all(mean == 0)
    assert_close(rstd, rstd_ref.reshape(-1), dtype=dtype, n=plan.n, what="rstd")
    assert_close(y, (xhat * wv + bv).reshape(-1), dtype=dtype, n=plan.n, what="y")
    dx = np.empty(x.size, dtype)
    _cuda.backward(plan, dy.reshape(-1), x.reshape(-1), dx, mean.astype(np.float64),
                   rstd.astype(np.float64), weight.reshape(-1) * 1.0, False, centered=False)
    assert_close(dx, dx_ref.reshape(-1), dtype=dtype, n=plan.n,
                 scale=float(np.max(np.abs(rstd_ref))) * float(np.max(np.abs(g))), what="dx")

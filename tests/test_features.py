"""Kernel features beyond the four plain norms: the fused residual + ReLU epilogue, RMSNorm,
float16 on the CPU and BatchNorm folding for inference."""
import numpy as np
import oracle
import pytest
from helpers import assert_close, nc_backward, nc_forward, param_shape, tolerance

import normcore as nc

# (norm, shape, axis, extra kwargs): every kernel path (rows, flat, columns) for every norm
CASES = [
    ("batch", (4, 6, 5, 3), 1, {}),                 # flat
    ("batch", (4, 3, 100), 1, {}),                  # flat, runs of one cell per call chunk
    ("batch", (4, 5, 3, 6), -1, {}),                # columns
    ("instance", (3, 4, 200), 1, {}),               # rows, P = B
    ("instance", (2, 7, 3), -1, {}),                # columns
    ("group", (2, 6, 30), 1, {"num_groups": 3}),    # rows, P < B
    ("group", (2, 30, 6), -1, {"num_groups": 3}),   # columns, B > 1
    ("layer", (6, 10), -1, {}),                     # rows, P = 1
    ("layer", (2, 70000), -1, {}),                  # few long rows: flat forward
    ("layer", (3, 4, 5), (-2, -1), {}),
]


def _inputs(rng, shape, axis, norm, dtype):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    w = (1 + rng.random(param_shape(norm, shape, axis))).astype(dtype)
    b = rng.standard_normal(w.shape).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm, shape, axis, kw", CASES)
def test_fused_relu_residual_equals_unfused(norm, shape, axis, kw, dtype, rng):
    x, w, b = _inputs(rng, shape, axis, norm, dtype)
    z = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    plain = nc_forward(norm, x, w, b, axis=axis, **kw)
    fused = nc_forward(norm, x, w, b, axis=axis, activation="relu", residual=z, **kw)
    pre = plain.y.astype(np.float64) + z
    n = x.size
    assert_close(fused.y, np.maximum(pre, 0), dtype=dtype, n=n, what="y")
    assert (fused.y >= 0).all() and (fused.y[pre < -tolerance(dtype, n) * 10] == 0).all()
    np.testing.assert_array_equal(fused.mean, plain.mean)
    np.testing.assert_array_equal(fused.rstd, plain.rstd)

    mask = fused.y > 0
    unfused = nc_backward(norm, (dy * mask).astype(dtype), x, plain.mean, plain.rstd, w,
                          axis=axis, **kw)
    grads = nc_backward(norm, dy, x, fused.mean, fused.rstd, w, axis=axis, activation="relu",
                        y=fused.y, residual=True, **kw)
    dx, dweight, dbias = grads                      # still unpacks as three
    for got, want, what in ((dx, unfused.dx, "dx"), (dweight, unfused.dweight, "dweight"),
                            (dbias, unfused.dbias, "dbias")):
        assert_close(got, want, dtype=dtype, n=n, what=what)
    np.testing.assert_array_equal(grads.dresidual, (dy * mask).astype(dtype))


@pytest.mark.parametrize("norm, shape, axis, kw", CASES[:7:2])
def test_residual_without_activation_passes_dy_through(norm, shape, axis, kw, rng):
    x, w, b = _inputs(rng, shape, axis, norm, np.float64)
    z, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    f = nc_forward(norm, x, w, b, axis=axis, residual=z, **kw)
    assert_close(f.y, nc_forward(norm, x, w, b, axis=axis, **kw).y + z, dtype=np.float64,
                 n=x.size)
    g = nc_backward(norm, dy, x, f.mean, f.rstd, w, axis=axis, residual=True, **kw)
    assert g.dresidual is dy
    assert nc_backward(norm, dy, x, f.mean, f.rstd, w, axis=axis, **kw).dresidual is None


def _loss_and_grads(norm, x, w, b, z, r, axis, kw):
    f = nc_forward(norm, x, w, b, axis=axis, activation="relu", residual=z, **kw)
    g = nc_backward(norm, r, x, f.mean, f.rstd, w, axis=axis, activation="relu", y=f.y,
                    residual=True, **kw)
    return float((f.y * r).sum()), g


@pytest.mark.parametrize("norm, shape, axis, kw", [c for c in CASES if np.prod(c[1]) < 500])
def test_fused_gradients_match_finite_differences(norm, shape, axis, kw, rng):
    x, w, b = _inputs(rng, shape, axis, norm, np.float64)
    z = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    _, g = _loss_and_grads(norm, x, w, b, z, r, axis, kw)
    h = 1e-6
    for name, arr, grad in (("x", x, g.dx), ("z", z, g.dresidual), ("weight", w, g.dweight),
                            ("bias", b, g.dbias)):
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 12), replace=False):
            keep = flat[i]
            flat[i] = keep + h
            up, _ = _loss_and_grads(norm, x, w, b, z, r, axis, kw)
            flat[i] = keep - h
            down, _ = _loss_and_grads(norm, x, w, b, z, r, axis, kw)
            flat[i] = keep
            numeric = (up - down) / (2 * h)
            assert abs(grad.reshape(-1)[i] - numeric) < 1e-6 * (1 + abs(numeric)), (name, i)


def test_activation_and_y_are_validated(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match="activation"):
        nc.layer_norm(x, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        nc.layer_norm(x, residual=np.zeros((4, 4)))
    with pytest.raises(TypeError, match="residual"):
        nc.layer_norm(x, residual=np.zeros((4, 3), np.float32))
    f = nc.layer_norm_forward(x, activation="relu")
    with pytest.raises(ValueError, match="y"):
        nc.layer_norm_backward(x, x, f.mean, f.rstd, activation="relu")


# ------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((6, 10), -1), ((3, 4, 5), (-2, -1)),
                                         ((2, 70000), -1), ((500, 64), -1)])
def test_rms_norm_matches_oracle(shape, axis, dtype, rng):
    x = (rng.standard_normal(shape) + 0.5).astype(dtype)
    w = rng.standard_normal(param_shape("layer", shape, axis)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    f = nc.rms_norm_forward(x, w, axis=axis, eps=1e-6)
    ref = oracle.rms_norm_forward(x, w, axis=axis, eps=1e-6)
    n = int(np.prod(w.shape))
    assert f.mean is None and f.rstd.dtype == np.dtype(dtype)
    assert_close(f.y, ref.y, dtype=dtype, n=n, what="y")
    assert_close(f.rstd, ref.rstd, dtype=dtype, n=n, what="rstd")
    g = nc.rms_norm_backward(dy, x, f.rstd, w, axis=axis)
    gref = oracle.rms_norm_backward(dy, x, f.rstd, w, axis=axis)
    assert g.dbias is None
    assert_close(g.dx, gref.dx, dtype=dtype, n=n, what="dx")
    assert_close(g.dweight, gref.dweight, dtype=dtype, n=x.size, what="dweight")


def test_rms_norm_defaults_follow_pytorch(rng):
    x = rng.standard_normal((8, 16)).astype(np.float32)
    f = nc.rms_norm_forward(x)                      # eps = finfo(float32).eps, no weight
    ref = oracle.rms_norm_forward(x, eps=float(np.finfo(np.float32).eps))
    assert_close(f.y, ref.y, dtype=np.float32, n=16)
    assert_close(f.rstd, ref.rstd, dtype=np.float32, n=16)
    np.testing.assert_array_equal(nc.rms_norm(x), f.y)


def test_rms_norm_gradients_match_finite_differences(rng):
    x, w, r = rng.standard_normal((3, 7)), rng.standard_normal(7), rng.standard_normal((3, 7))

    def loss():
        return float((nc.rms_norm(x, w, eps=1e-3) * r).sum())

    f = nc.rms_norm_forward(x, w, eps=1e-3)
    g = nc.rms_norm_backward(r, x, f.rstd, w)
    h = 1e-6
    for arr, grad in ((x, g.dx), (w, g.dweight)):
        flat = arr.reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + h
            up = loss()
            flat[i] = keep - h
            down = loss()
            flat[i] = keep
            assert abs(grad.reshape(-1)[i] - (up - down) / (2 * h)) < 1e-7


# ------------------------------------------------------------------------------- float16
@pytest.mark.parametrize("norm, shape, axis, kw", CASES + [
    ("batch", (16, 64, 64, 64), 1, {}),             # flat forward, rows backward
    ("group", (64, 64, 7, 7), 1, {"num_groups": 16}),    # short cells on the row kernels
    ("group", (32, 8, 3, 3), 1, {"num_groups": 4}),      # ... their serial twins
    ("instance", (64, 32, 7, 7), 1, {}),            # rows of one short cell
    ("batch", (256, 1000), 1, {}),                  # column row chunks forward, slices backward
    ("batch", (1003, 100), 1, {}),                  # column row chunks both ways
    ("group", (1, 30, 30, 256), -1, {"num_groups": 16}),     # one sample's groups
    ("layer", (64, 2500), -1, {})])                 # rows of more than one HALF_CHUNK
def test_float16_matches_float32_compute(norm, shape, axis, kw, rng):
    """float16 loads and stores only: the same float16 inputs computed in float32 and
    rounded once to float16 must agree to a float16 rounding or two. The statistics are
    float32 ones of the same values: float16 data sum in float32 where float32 data sum in
    float64 (kernels/cpu.py: half_block_moments, the column kernels' blocks of rows)."""
    x, w, b = _inputs(rng, shape, axis, norm, np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    f16 = nc_forward(norm, x, w, b, axis=axis, **kw)
    f32 = nc_forward(norm, x.astype(np.float32), w, b, axis=axis, **kw)
    assert f16.y.dtype == np.float16 and f16.mean.dtype == np.float32
    n = x.size // f32.mean.size
    assert_close(f16.mean, f32.mean, dtype=np.float32, n=n, scale=np.abs(x).max(), what="mean")
    assert_close(f16.rstd, f32.rstd, dtype=np.float32, n=n, what="rstd")
    # a float16 ulp of each value, and as much as those statistics may move it normwise
    # (values near 0 have ulps far finer than a float32 error of the mean)
    ulp = np.spacing(np.abs(f32.y).astype(np.float16)).astype(np.float32)
    slack = tolerance(np.float32, n) * np.abs(f32.y).max()
    assert (np.abs(f16.y.astype(np.float32) - f32.y) <= ulp + slack).all()
    g16 = nc_backward(norm, dy, x, f16.mean, f16.rstd, w, axis=axis, **kw)
    g32 = nc_backward(norm, dy.astype(np.float32), x.astype(np.float32), f32.mean, f32.rstd, w,
                      axis=axis, **kw)
    assert g16.dx.dtype == np.float16 and g16.dweight.dtype == np.float16
    half_ulp = np.spacing(np.abs(g32.dx).astype(np.float16)).astype(np.float32)
    assert (np.abs(g16.dx.astype(np.float32) - g32.dx) <= half_ulp).all()
    assert_close(g16.dweight, g32.dweight, dtype=np.float16, n=1)


def test_float16_loads_and_stores_every_value_exactly():
    """Eval BN with mean 0 and rstd 1 is the identity: every finite float16 comes back."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(np.float16)
    x = x[np.isfinite(x)].reshape(-1, 1)
    C = np.ones(1)
    y = nc.batch_norm(x, running_mean=0 * C, running_var=C - 1e-5, training=False, eps=1e-5)
    assert y.dtype == np.float16
    nonzero = x != 0          # -0.0 comes back as +0.0: (x - 0) * 1 + 0 is +0 in IEEE
    np.testing.assert_array_equal(y.view(np.uint16)[nonzero], x.view(np.uint16)[nonzero])
    assert (y[~nonzero] == 0).all()


@pytest.mark.parametrize("first", [0.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("B", [256, 1000, 2500])
def test_float16_rows_with_an_outlier_first(first, B, rng):
    """The forward sums float16 rows in float32 about their first value (half_block_moments):
    an outlier there must not cost the statistics their float32 accuracy, nor y its float16
    rounding (summed about the first value alone, rows of 1000 starting at 100 had rstd off
    by 3e-5 and values near 0 off by up to 10 float16 ulps)."""
    x = rng.standard_normal((64, B)).astype(np.float16)
    x[:, 0] = first
    f = nc.layer_norm_forward(x)
    ref = oracle.layer_norm_forward(x)
    assert_close(f.mean, ref.mean, dtype=np.float32, n=B, scale=np.abs(x).max(), what="mean")
    assert_close(f.rstd, ref.rstd, dtype=np.float32, n=B, what="rstd")
    ulp = np.spacing(np.abs(ref.y).astype(np.float16)).astype(np.float64)
    assert (np.abs(f.y.astype(np.float64) - ref.y) <= 1.5 * ulp).all()


def test_float16_weight_none_gradients_do_not_overflow(rng):
    x = (rng.standard_normal((4096, 8)) * 30).astype(np.float16)
    f = nc.batch_norm_forward(x)
    g = nc.batch_norm_backward(x, x, f.mean, f.rstd)      # sum(dy) over 4096 values of ~30
    assert g.dbias.dtype == np.float32 and np.isfinite(g.dweight).all()


# -------------------------------------------------------------------------------- folding
def _conv2d(x, weight, bias):
    """Plain 'valid' convolution, (N, I, H, W) * (O, I, kh, kw) -> (N, O, H', W')."""
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return np.einsum("nihwkl,oikl->nohw", windows, weight) + bias[:, None, None]


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_conv_equals_conv_then_eval_batch_norm(with_bias, rng):
    x = rng.standard_normal((2, 3, 6, 5))
    weight, bias = rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.2
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    conv_bias = bias if with_bias else np.zeros(4)
    expected = nc.batch_norm(_conv2d(x, weight, conv_bias), gamma, beta, running_mean=rm,
                             running_var=rv, training=False)
    fw, fb = nc.fold_batch_norm(weight, bias if with_bias else None, rm, rv, gamma, beta)
    assert fw.shape == weight.shape and fb.shape == (4,)
    np.testing.assert_allclose(_conv2d(x, fw, fb), expected, rtol=1e-12, atol=1e-12)


def test_folded_linear_and_scale_shift(rng):
    x = rng.standard_normal((16, 5)).astype(np.float32)
    weight, bias = rng.standard_normal((3, 5)), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    h = x @ weight.T + bias
    expected = nc.batch_norm(h, running_mean=rm, running_var=rv, training=False)
    fw, fb = nc.fold_batch_norm(weight, bias, rm, rv)
    np.testing.assert_allclose(x @ fw.T + fb, expected, rtol=1e-12, atol=1e-12)
    scale, shift = nc.batch_norm_scale_shift(rm, rv)
    np.testing.assert_allclose(h * scale + shift, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="running_mean"):
        nc.fold_batch_norm(weight, bias, rm[:2], rv[:2])

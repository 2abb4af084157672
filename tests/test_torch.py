"""Cross-check against PyTorch (skipped where torch is not installed, as in CI): forward
outputs, saved statistics, running statistics and autograd gradients."""
import numpy as np
import pytest
from helpers import assert_close

import normcore as nc

torch = pytest.importorskip("torch")
F = torch.nn.functional

TDTYPE = {np.float32: torch.float32, np.float64: torch.float64}
CASES = [((4, 3), 1), ((4, 3, 5), 1), ((4, 5, 3), -1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1),
         ((2, 3, 2, 2, 3), 1)]


def _t(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(grad)


def _cf(a, axis):
    """numpy array in normcore's layout -> channels-first, as torch wants it."""
    return np.ascontiguousarray(np.moveaxis(a, axis, 1))


def _grads(y, dy_cf, *ts):
    y.backward(_t(dy_cf))
    return [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape,axis", CASES)
def test_channel_norms_match_torch(norm, shape, axis, dtype, rng):
    if norm == "instance" and len(shape) == 2:
        pytest.skip("torch's instance_norm needs spatial dims")
    C = shape[axis]
    x = (0.3 + 2 * rng.standard_normal(shape)).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), (0.5 + rng.random(C)).astype(dtype)
    trm, trv = _t(rm.copy()), _t(rv.copy())
    X, W, B = _t(_cf(x, axis), True), _t(w, True), _t(b, True)
    # (torch's fused x * scale + shift loses digits on one-value groups: keep groups >= 2)
    G = 3 if C % 3 == 0 and x.size // (shape[0] * 3) >= 2 else 1
    if norm == "batch":
        ty = F.batch_norm(X, trm, trv, W, B, True, 0.2, 1e-4)
        f = nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, momentum=0.2,
                                  eps=1e-4, axis=axis)
        g = nc.batch_norm_backward(dy, x, f.mean, f.rstd, w, axis=axis)
        n = x.size // C
    elif norm == "instance":
        ty = F.instance_norm(X, trm, trv, W, B, True, 0.2, 1e-4)
        f = nc.instance_norm_forward(x, w, b, running_mean=rm, running_var=rv, momentum=0.2,
                                     eps=1e-4, axis=axis)
        g = nc.instance_norm_backward(dy, x, f.mean, f.rstd, w, axis=axis)
        n = x.size // (C * shape[0])
    else:
        ty = F.group_norm(X, G, W, B, 1e-4)
        f = nc.group_norm_forward(x, G, w, b, eps=1e-4, axis=axis)
        g = nc.group_norm_backward(dy, x, f.mean, f.rstd, G, w, axis=axis)
        n = x.size // (G * shape[0])
    dx, dw, db = _grads(ty, _cf(dy, axis), X, W, B)
    # torch computes in the input dtype too: both sides carry rounding, hence 2x the tolerance
    kw = {"dtype": dtype, "n": 4 * n}
    assert_close(f.y, np.moveaxis(ty.detach().numpy(), 1, axis), **kw, what="y")
    assert_close(g.dx, np.moveaxis(dx, 1, axis), **kw,
                 scale=float(np.max(np.abs(dy)) * np.max(np.abs(w)) * np.max(f.rstd)),
                 what="dx")
    s = np.sqrt(n) * 4 * float(np.max(np.abs(dy)))
    assert_close(g.dweight, dw, **kw, scale=s, what="dweight")
    assert_close(g.dbias, db, **kw, scale=s, what="dbias")
    if norm != "group":
        assert_close(rm, trm.numpy(), **kw, scale=float(np.max(np.abs(x))), what="running_mean")
        assert_close(rv, trv.numpy(), **kw, what="running_var")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((3, 4, 5), -1), ((3, 4, 5), (-2, -1)),
                                        ((2, 3, 4, 5), (-3, -2, -1))])
def test_layer_norm_matches_torch(shape, axis, dtype, rng):
    k = 1 if np.isscalar(axis) else len(axis)
    ns = shape[-k:]
    x = (0.3 + 2 * rng.standard_normal(shape)).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(ns)).astype(dtype)
    b = rng.standard_normal(ns).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    X, W, B = _t(x, True), _t(w, True), _t(b, True)
    ty = F.layer_norm(X, ns, W, B, 1e-4)
    _, tm, tr = torch.ops.aten.native_layer_norm(_t(x), list(ns), _t(w), _t(b), 1e-4)
    f = nc.layer_norm_forward(x, w, b, axis=axis, eps=1e-4)
    g = nc.layer_norm_backward(dy, x, f.mean, f.rstd, w, axis=axis)
    dx, dw, db = _grads(ty, dy, X, W, B)
    n = int(np.prod(ns))
    kw = {"dtype": dtype, "n": 4 * n}
    assert_close(f.y, ty.detach().numpy(), **kw, what="y")
    assert_close(f.mean, tm.numpy().reshape(f.mean.shape), **kw,
                 scale=float(np.max(np.abs(x))), what="mean")
    assert_close(f.rstd, tr.numpy().reshape(f.rstd.shape), **kw, what="rstd")
    assert_close(g.dx, dx, **kw, scale=float(np.max(np.abs(dy)) * np.max(np.abs(w))
                                             * np.max(f.rstd)), what="dx")
    s = np.sqrt(x.size // n) * 4 * float(np.max(np.abs(dy)))
    assert_close(g.dweight, dw, **kw, scale=s, what="dweight")
    assert_close(g.dbias, db, **kw, scale=s, what="dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_saved_stats_match_native(dtype, rng):
    x = rng.standard_normal((5, 3, 4)).astype(dtype)
    _, tm, tr = torch.ops.aten.native_batch_norm(_t(x), None, None, None, None, True, 0.1, 1e-5)
    f = nc.batch_norm_forward(x)
    assert_close(f.mean, tm.numpy(), dtype=dtype, n=80, scale=float(np.max(np.abs(x))))
    assert_close(f.rstd, tr.numpy(), dtype=dtype, n=80)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_batch_norm_gradient_matches_torch(dtype, rng):
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    w, b = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    rm, rv = rng.standard_normal(3).astype(dtype), (0.5 + rng.random(3)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    X, W, B = _t(x, True), _t(w, True), _t(b, True)
    ty = F.batch_norm(X, _t(rm), _t(rv), W, B, False)
    dx, dw, db = _grads(ty, dy, X, W, B)
    f = nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    g = nc.batch_norm_backward(dy, x, f.mean, f.rstd, w, training=False)
    kw = {"dtype": dtype, "n": 80}
    assert_close(f.y, ty.detach().numpy(), **kw)
    assert_close(g.dx, dx, **kw)
    assert_close(g.dweight, dw, **kw, scale=np.sqrt(20) * 4 * float(np.max(np.abs(dy))))
    assert_close(g.dbias, db, **kw, scale=np.sqrt(20) * 4 * float(np.max(np.abs(dy))))

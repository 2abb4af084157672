"""The public API on CuPy arrays, on a real GPU: results against the NumPy path, outputs stay
CuPy arrays on the input's device, running statistics are updated on the device, and a call
neither synchronizes nor copies to the host (it returns while an earlier kernel on the same
stream is still running). Skipped without CuPy or a CUDA device."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception as exc:  # noqa: BLE001 - no driver, no runtime, ...
    pytest.skip(f"no CUDA device: {exc}", allow_module_level=True)

import normcore as nc  # noqa: E402

# (norm, shape, keywords): both layouts, each GPU path at real launch sizes
CASES = [
    ("batch", (8, 16, 33, 7), dict(axis=1)),
    ("batch", (8, 33, 7, 16), dict(axis=-1)),
    ("batch", (1000, 5), dict(axis=1)),
    ("instance", (4, 6, 129), dict(axis=1)),
    ("instance", (4, 129, 6), dict(axis=-1)),
    ("group", (4, 8, 65), dict(axis=1, num_groups=4)),
    ("group", (4, 65, 8), dict(axis=-1, num_groups=2)),
    ("layer", (37, 1001), dict(axis=-1)),
    ("layer", (3, 5, 40000), dict(axis=-1)),
]
TOL = {np.float16: 2e-2, np.float32: 2e-4, np.float64: 1e-10}


def _call(kind, norm, *args, **kw):
    if norm == "group":
        g = kw.pop("num_groups")
        args = (args[0], g) + args[1:] if kind == "forward" else args[:4] + (g,) + args[4:]
    return getattr(nc, f"{norm}_norm_{kind}")(*args, **kw)


def _close(got, ref, dtype, what):
    assert isinstance(got, cupy.ndarray), f"{what} is {type(got)}"
    assert got.device.id == cupy.cuda.Device().id
    g, r = cupy.asnumpy(got).astype(np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
    assert np.max(np.abs(g - r), initial=0) <= TOL[dtype] * scale, what


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("norm, shape, kw", CASES)
def test_forward_backward_match_numpy(norm, shape, kw, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pshape = shape[-1:] if norm == "layer" else (shape[kw["axis"]],)
    w, b = rng.uniform(0.5, 2, pshape).astype(np.float32), rng.standard_normal(pshape)
    ref_dtype = np.float32 if dtype == np.float16 else dtype   # the CPU path has no float16
    xr, dyr = x.astype(ref_dtype), dy.astype(ref_dtype)
    ref = _call("forward", norm, xr, w, b, **dict(kw))
    got = _call("forward", norm, cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), **dict(kw))
    assert got.y.dtype == dtype
    for name in ("y", "mean", "rstd"):
        _close(getattr(got, name), getattr(ref, name), dtype, name)
    refb = _call("backward", norm, dyr, xr, ref.mean, ref.rstd, w, **dict(kw))
    gotb = _call("backward", norm, cupy.asarray(dy), cupy.asarray(x), got.mean, got.rstd,
                 cupy.asarray(w), **dict(kw))
    for name in ("dx", "dweight", "dbias"):
        _close(getattr(gotb, name), getattr(refb, name), dtype, name)


def test_batch_norm_running_stats_update_on_device():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8, 9)).astype(np.float32)
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    rm_d, rv_d = cupy.asarray(rm), cupy.asarray(rv)
    ptr = rm_d.data.ptr
    f = nc.batch_norm_forward(cupy.asarray(x), running_mean=rm_d, running_var=rv_d)
    nc.batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert f.running_mean is rm_d and rm_d.data.ptr == ptr        # updated in place
    _close(rm_d, rm, np.float32, "running_mean")
    _close(rv_d, rv, np.float32, "running_var")


_SPIN = r'''
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
'''


@pytest.mark.parametrize("norm, shape, kw", [CASES[0], CASES[1], CASES[7]])
def test_calls_neither_synchronize_nor_copy_to_host(norm, shape, kw):
    """Queue a ~0.5 s spin kernel on a stream, then a forward and a backward on that stream:
    both calls must return before the spin kernel finishes."""
    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
    pshape = shape[-1:] if norm == "layer" else (shape[kw["axis"]],)
    w = cupy.ones(pshape, np.float32)
    _call("forward", norm, x, w, None, **dict(kw))           # compile outside the timed window
    f = _call("forward", norm, x, w, None, **dict(kw))
    _call("backward", norm, dy, x, f.mean, f.rstd, w, **dict(kw))
    spin = cupy.RawKernel(_SPIN, "spin")
    rate = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["clockRate"]  # kHz
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        spin((1,), (1,), (np.int64(rate * 500),))             # ~0.5 s
        f = _call("forward", norm, x, w, None, **dict(kw))
        g = _call("backward", norm, dy, x, f.mean, f.rstd, w, **dict(kw))
        assert not stream.done, "a call waited for the stream (synchronize or host copy)"
    stream.synchronize()
    assert isinstance(f.y, cupy.ndarray) and isinstance(g.dx, cupy.ndarray)

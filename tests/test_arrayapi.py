"""Arrays other than NumPy and CuPy: every public function on array_api_strict arrays (and torch
CPU tensors when torch is installed), through both routes (the kernels on DLPack views, and
the pure Array-API backend), against the NumPy path; results keep the array type and device;
running statistics and out= are updated in place, or returned for immutable arrays."""
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_close

import normcore as nc
import normcore._arrayapi as arrayapi
from normcore import NormBackward, NormForward

xs = pytest.importorskip("array_api_strict")


def _strict(device=None):
    dev = xs.Device(device) if device else None
    return {"to": lambda a: xs.asarray(a, device=dev),
            "back": lambda a: np.from_dlpack(a), "type": type(xs.asarray(0.0)),
            "device": dev or xs.Device("CPU_DEVICE")}


def _torch():
    torch = pytest.importorskip("torch")
    return {"to": lambda a: torch.from_numpy(np.array(a)),
            "back": lambda a: a.detach().numpy(), "type": torch.Tensor,
            "device": torch.device("cpu")}


LIBS = {"strict": _strict, "strict-device1": lambda: _strict("device1"), "torch": _torch}


@pytest.fixture(params=list(LIBS))
def lib(request):
    return LIBS[request.param]()


@pytest.fixture(params=["kernels", "arrayapi"])
def route(request, monkeypatch):
    monkeypatch.setattr(arrayapi, "use_kernels", request.param == "kernels")
    return request.param


def _inputs(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 6, 5, 3)) * 2 + 1).astype(dtype)
    return {"x": x, "dy": rng.standard_normal(x.shape).astype(dtype),
            "z": rng.standard_normal(x.shape).astype(dtype),
            "w": (1 + rng.random(6)).astype(dtype), "b": rng.standard_normal(6).astype(dtype),
            "wl": (1 + rng.random((5, 3))).astype(dtype),
            "bl": rng.standard_normal((5, 3)).astype(dtype),
            "rm": rng.standard_normal(6).astype(dtype), "rv": (rng.random(6) + 0.5).astype(dtype),
            "conv": rng.standard_normal((6, 2, 3)).astype(dtype)}


def _bn_backward(a):
    f = nc.batch_norm_forward(a["x"], a["w"], a["b"], activation="relu", residual=a["z"])
    return nc.batch_norm_backward(a["dy"], a["x"], f.mean, f.rstd, a["w"], activation="relu",
                                  y=f.y, residual=True)


def _backward(forward, backward):
    def call(a):
        f = forward(a)
        return backward(a, f)
    return call


CASES = {
    "batch_forward": lambda a: nc.batch_norm_forward(a["x"], a["w"], a["b"],
                                                     running_mean=a["rm"], running_var=a["rv"]),
    "batch_eval": lambda a: nc.batch_norm_forward(a["x"], a["w"], a["b"], running_mean=a["rm"],
                                                  running_var=a["rv"], training=False, axis=1),
    "batch_last": lambda a: nc.batch_norm(a["x"], None, a["bl"][0, :3], axis=-1),
    "batch_backward": _bn_backward,
    "batch_backward_eval": lambda a: nc.batch_norm_backward(a["dy"], a["x"], a["rm"], a["rv"],
                                                            a["w"], training=False),
    "instance_forward": lambda a: nc.instance_norm_forward(a["x"], a["w"], a["b"],
                                                           running_mean=a["rm"],
                                                           running_var=a["rv"]),
    "instance_backward": _backward(lambda a: nc.instance_norm_forward(a["x"], a["w"]),
                                   lambda a, f: nc.instance_norm_backward(
                                       a["dy"], a["x"], f.mean, f.rstd, a["w"])),
    "group_forward": lambda a: nc.group_norm_forward(a["x"], 3, a["w"], a["b"]),
    "group_backward": _backward(lambda a: nc.group_norm_forward(a["x"], 2, a["w"], a["b"]),
                                lambda a, f: nc.group_norm_backward(a["dy"], a["x"], f.mean,
                                                                    f.rstd, 2, a["w"])),
    "layer_forward": lambda a: nc.layer_norm_forward(a["x"], a["wl"], a["bl"], axis=(-2, -1)),
    "layer_backward": _backward(lambda a: nc.layer_norm_forward(a["x"], axis=-1),
                                lambda a, f: nc.layer_norm_backward(a["dy"], a["x"], f.mean,
                                                                    f.rstd, axis=-1)),
    "rms_forward": lambda a: nc.rms_norm_forward(a["x"], a["wl"], axis=(-2, -1)),
    "rms_backward": _backward(lambda a: nc.rms_norm_forward(a["x"], a["wl"][0, :], axis=-1),
                              lambda a, f: nc.rms_norm_backward(a["dy"], a["x"], f.rstd,
                                                                a["wl"][0, :], axis=-1)),
    "moments": lambda a: nc.moments(a["x"], axis=(0, 2), correction=1),
    "moments_all": lambda a: nc.moments(a["x"]),
    "welford": lambda a: nc.welford(a["x"], axis=(0, 2, 3)),
    "scale_shift": lambda a: nc.batch_norm_scale_shift(a["rm"], a["rv"], a["w"], a["b"]),
    "fold": lambda a: nc.fold_batch_norm(a["conv"], a["b"], a["rm"], a["rv"], a["w"]),
}


def _leaves(r):
    """The arrays of a result, in order."""
    if isinstance(r, NormBackward):
        return [*_leaves(tuple(r)), *_leaves((r.dresidual,))]
    if isinstance(r, nc.Moments):
        return _leaves((r.mean, r.m2))
    if isinstance(r, tuple):
        return [v for item in r for v in _leaves(item)]
    return [] if r is None else [r]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_every_function_matches_numpy(case, dtype, lib, route):
    inputs = _inputs(dtype)
    expected = _leaves(CASES[case]({k: v.copy() for k, v in inputs.items()}))
    got = _leaves(CASES[case]({k: lib["to"](v) for k, v in inputs.items()}))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert isinstance(g, lib["type"]), f"result {i} is {type(g)}"
        assert g.device == lib["device"], f"result {i} on {g.device}"
        g = lib["back"](g)
        assert g.shape == e.shape and g.dtype == e.dtype, f"result {i}: {g.dtype} {g.shape}"
        assert_close(g, e, dtype=dtype, n=inputs["x"].size, what=f"{case} result {i}")


def test_running_statistics_and_out_are_updated_in_place(lib, route):
    inputs = _inputs(np.float32)
    rm, rv = inputs["rm"].copy(), inputs["rv"].copy()
    ref = nc.batch_norm_forward(inputs["x"], running_mean=rm, running_var=rv)
    a = {k: lib["to"](v) for k, v in inputs.items()}
    out = lib["to"](np.zeros_like(inputs["x"]))
    f = nc.batch_norm_forward(a["x"], running_mean=a["rm"], running_var=a["rv"], out=out)
    assert f.running_mean is a["rm"] and f.running_var is a["rv"] and f.y is out
    assert_close(lib["back"](a["rm"]), rm, dtype=np.float32, n=120)
    assert_close(lib["back"](a["rv"]), rv, dtype=np.float32, n=120)
    assert_close(lib["back"](out), ref.y, dtype=np.float32, n=120)


def test_immutable_arrays_return_running_statistics(monkeypatch):
    """An array type without item assignment (JAX's, say) gets the new running statistics
    only through the result; its arrays are left as they were."""
    monkeypatch.setattr(arrayapi, "use_kernels", False)

    def immutable(self, key, value):
        raise TypeError("this array type is immutable")

    monkeypatch.setattr(type(xs.asarray(0.0)), "__setitem__", immutable)
    inputs = _inputs(np.float64)
    rm, rv = inputs["rm"].copy(), inputs["rv"].copy()
    nc.batch_norm_forward(inputs["x"], running_mean=rm, running_var=rv)
    a = {k: xs.asarray(v) for k, v in inputs.items()}
    f = nc.batch_norm_forward(a["x"], running_mean=a["rm"], running_var=a["rv"])
    assert isinstance(f, NormForward) and f.running_mean is not a["rm"]
    assert np.array_equal(np.from_dlpack(a["rm"]), inputs["rm"])
    assert_close(np.from_dlpack(f.running_mean), rm, dtype=np.float64, n=120)
    assert_close(np.from_dlpack(f.running_var), rv, dtype=np.float64, n=120)


def test_mixed_array_types_and_bad_dtypes_raise():
    x = xs.ones((4, 3))
    with pytest.raises(TypeError, match="weight: expected a array_api_strict.*like x, got "
                                        "numpy.ndarray"):
        nc.batch_norm(x, np.ones(3))
    with pytest.raises(TypeError, match="weight: expected a numpy.ndarray like x"):
        nc.batch_norm(np.ones((4, 3)), xs.ones(3))
    with pytest.raises(ValueError, match="weight: expected an array on x's device"):
        nc.batch_norm(x, xs.ones(3, device=xs.Device("device1")))
    with pytest.raises(TypeError, match="x: expected a float16 or float32 or float64 array, "
                                        "got dtype int64"):
        nc.layer_norm(xs.ones((4, 3), dtype=xs.int64))
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        nc.batch_norm(x, xs.ones(4))


def test_torch_tensor_that_requires_grad_takes_the_array_api_route():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    y = nc.batch_norm(x)
    assert isinstance(y, torch.Tensor)
    expected = nc.batch_norm(x.detach().numpy())
    assert_close(y.detach().numpy(), expected, dtype=np.float64, n=20)


def test_import_loads_no_optional_library(tmp_path):
    code = ("import sys, json, numpy as np, normcore as nc\n"
            "nc.batch_norm(np.ones((4, 3))); nc.welford(np.ones(3))\n"
            "print(json.dumps([m for m in ('dask', 'torch', 'array_api_strict', 'distributed')"
            " if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_public_functions_keep_their_parameters_and_pass_every_argument():
    """The wrappers (arrayapi._numpy_first) have their functions' parameters, defaults and
    keyword-only marks, and pass every argument on, by position or by keyword, to the NumPy
    function as to the Array-API route."""
    for name in nc.__all__:
        f = getattr(nc, name)
        if hasattr(f, "__wrapped__"):
            assert inspect.signature(f) == inspect.signature(f.__wrapped__), name
            assert f.__module__ == "normcore" and f.__doc__ == f.__wrapped__.__doc__
    x = np.random.default_rng(1).standard_normal((3, 4, 5))
    w, b = np.full(5, 2.0), np.full(5, 0.5)
    with pytest.raises(TypeError):
        nc.layer_norm_forward(x, w, b, -1)      # axis is keyword-only
    want = ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 0.25)) * w + b
    out = np.empty_like(x)
    got = nc.layer_norm_forward(x=x, bias=b, weight=w, eps=0.25, axis=-1, out=out)
    assert got.y is out
    assert_close(out, want, dtype=np.float64, n=5)
    got = nc.layer_norm_forward(xs.asarray(x), xs.asarray(w), xs.asarray(b), eps=0.25)
    assert_close(np.from_dlpack(got.y), want, dtype=np.float64, n=5)

"""The implementations the bench times side by side, and the plain NumPy one.

A peer's ``prepare(case, op, inputs)`` gives (thunk, outputs): the thunk takes no
arguments, runs the op once (waiting for the device, on a GPU) and returns what the op
returns; ``outputs`` turns that into named NumPy arrays (y, mean, rstd, running_mean,
running_var or dx, dweight, dbias), for validation.

    PEERS = normcore (fresh outputs), normcore (out= / dx_out=), NumPy, PyTorch CPU,
            normcore on CuPy arrays, PyTorch CUDA        (the last two skip without a GPU)

NumPy peer, the maths of every norm (PyTorch's semantics), with the mean over the
reduction set written mean_r:
    mean = mean_r(x)        var = mean_r((x - mean)**2)        rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd                                     y = xhat * weight + bias
    backward, batch statistics:  dx = rstd * (dy*w - mean_r(dy*w) - xhat * mean_r(dy*w * xhat))
    backward, fixed statistics:  dx = rstd * dy*w
    dweight = sum(dy * xhat), dbias = sum(dy), both over every axis but the weight's.
Each norm is then a view of x and two sets of axes (``_layout``): the reduction set and
the axes the weight varies along.
"""
import importlib
from collections import namedtuple

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
NormForward = namedtuple("NormForward", "y mean rstd running_mean running_var")
NormBackward = namedtuple("NormBackward", "dx dweight dbias")


# ----------------------------------------------------------------------------- NumPy peer

def _layout(x, norm, axis, groups=0):
    """(view of x, reduction axes, weight axes) for one norm."""
    nd = x.ndim
    if norm == "layer":
        red = tuple(range(nd - len(np.atleast_1d(axis)), nd))
        return x, red, red
    axis %= nd
    if norm == "batch":
        return x, tuple(i for i in range(nd) if i != axis), (axis,)
    if norm == "instance":
        return x, tuple(i for i in range(nd) if i not in (0, axis)), (axis,)
    # group: split channels C into (groups, C // groups); statistics per (n, group)
    c = x.shape[axis]
    xv = x.reshape(x.shape[:axis] + (groups, c // groups) + x.shape[axis + 1:])
    return xv, tuple(i for i in range(nd + 1) if i not in (0, axis)), (axis, axis + 1)


def _along(v, xv, axes):
    """v (a weight or saved statistics) shaped to broadcast against xv along ``axes``."""
    return v.reshape([n if i in axes else 1 for i, n in enumerate(xv.shape)])


def _stats_dtype(x):
    return np.float64 if x.dtype == np.float64 else np.float32


def _forward(x, norm, axis, groups, weight, bias, eps, mean=None, var=None):
    """y, mean, var, rstd (statistics of the statistics shape); batch statistics unless given."""
    xv, red, wax = _layout(x, norm, axis, groups)
    keep = tuple(i for i in range(xv.ndim) if i not in red)
    if mean is None:
        mean = xv.mean(axis=red, dtype=_stats_dtype(x))
        var = xv.var(axis=red, dtype=_stats_dtype(x))
    rstd = (1 / np.sqrt(var + eps)).astype(_stats_dtype(x))
    y = (xv - _along(mean, xv, keep)) * _along(rstd, xv, keep)
    if weight is not None:
        y = y * _along(weight, xv, wax)
    if bias is not None:
        y = y + _along(bias, xv, wax)
    return y.astype(x.dtype, copy=False).reshape(x.shape), mean, var, rstd


def _backward(dy, x, mean, rstd, norm, axis, groups, weight, batch_stats):
    xv, red, wax = _layout(x, norm, axis, groups)
    dyv = dy.reshape(xv.shape)
    keep = tuple(i for i in range(xv.ndim) if i not in red)
    rest = tuple(i for i in range(xv.ndim) if i not in wax)
    rstd = _along(rstd, xv, keep)
    xhat = (xv - _along(mean, xv, keep)) * rstd
    dyw = dyv if weight is None else dyv * _along(weight, xv, wax)
    if batch_stats:
        dx = rstd * (dyw - dyw.mean(axis=red, keepdims=True)
                     - xhat * (dyw * xhat).mean(axis=red, keepdims=True))
    else:
        dx = rstd * dyw
    dweight = (dyv * xhat).sum(axis=rest)
    dbias = dyv.sum(axis=rest, dtype=dweight.dtype)
    if norm == "group":  # (groups, C // groups) -> (C,)
        dweight, dbias = dweight.reshape(-1), dbias.reshape(-1)
    return NormBackward(dx.astype(x.dtype, copy=False).reshape(x.shape), dweight, dbias)


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=MOMENTUM, eps=EPS, axis=1):
    if not training:
        y, mean, _, rstd = _forward(x, "batch", axis, 0, weight, bias, eps,
                                    running_mean, running_var)
        return NormForward(y, mean, rstd, running_mean, running_var)
    y, mean, var, rstd = _forward(x, "batch", axis, 0, weight, bias, eps)
    if running_mean is not None:
        n = x.size // x.shape[axis]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    return NormForward(y, mean, rstd, running_mean, running_var)


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, axis=1):
    return _backward(dy, x, mean, rstd, "batch", axis, 0, weight, training)


def layer_norm_forward(x, weight=None, bias=None, *, axis=-1, eps=EPS):
    y, mean, _, rstd = _forward(x, "layer", axis, 0, weight, bias, eps)
    return NormForward(y, mean, rstd, None, None)


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1):
    return _backward(dy, x, mean, rstd, "layer", axis, 0, weight, True)


def instance_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=MOMENTUM, eps=EPS, axis=1):
    if not use_input_stats:
        shape = (x.shape[0], running_mean.size)
        y, mean, _, rstd = _forward(x, "instance", axis, 0, weight, bias, eps,
                                    np.broadcast_to(running_mean, shape),
                                    np.broadcast_to(running_var, shape))
        return NormForward(y, mean, rstd, running_mean, running_var)
    y, mean, var, rstd = _forward(x, "instance", axis, 0, weight, bias, eps)
    if running_mean is not None:
        n = x.size // (x.shape[0] * x.shape[axis])
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean.mean(axis=0)
        running_var[...] = ((1 - momentum) * running_var
                            + momentum * (var * n / (n - 1)).mean(axis=0))
    return NormForward(y, mean, rstd, running_mean, running_var)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, use_input_stats=True, axis=1):
    return _backward(dy, x, mean, rstd, "instance", axis, 0, weight, use_input_stats)


def group_norm_forward(x, num_groups, weight=None, bias=None, *, eps=EPS, axis=1):
    y, mean, _, rstd = _forward(x, "group", axis, num_groups, weight, bias, eps)
    return NormForward(y, mean, rstd, None, None)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, axis=1):
    return _backward(dy, x, mean, rstd, "group", axis, num_groups, weight, True)


# ----------------------------------------------------------------------------- the peers

def _numpy_peer():
    return importlib.import_module(__name__)


def _normcore():
    nc = importlib.import_module("normcore")
    nc.layer_norm_forward  # noqa: B018 -- an empty package is "not yet usable"
    return nc


def _waiting(call, peer):
    """The thunk itself on the CPU; on a GPU, one that also waits for the device."""
    if peer.device == "cpu":
        return call

    def call_and_wait():
        result = call()
        peer.sync()
        return result
    return call_and_wait


class ApiPeer:
    """A library with normcore's API: normcore itself, on NumPy or CuPy arrays, or the
    NumPy peer above. ``out=True`` passes preallocated ``out=`` / ``dx_out=`` buffers."""

    def __init__(self, name, load, *, out=False, xp="numpy"):
        self.name, self._load, self.out, self._xp = name, load, out, xp
        self.device = "cuda" if xp == "cupy" else "cpu"
        self.is_normcore = load is _normcore

    def unavailable(self):
        """None when usable, else the reason why not."""
        try:
            self.lib, self.xp = self._load(), importlib.import_module(self._xp)
        except Exception as e:  # ImportError, or a package that is not usable yet
            return f"{type(e).__name__}: {e}"
        return None

    def sync(self):
        if self.device == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def to_numpy(self, a):
        return a.get() if self.device == "cuda" else np.asarray(a)

    def outputs(self, result):
        return {k: self.to_numpy(v) for k, v in result._asdict().items() if v is not None}

    def prepare(self, case, op, inputs):
        lib, xp = self.lib, self.xp
        d = {k: xp.asarray(v).copy() for k, v in inputs.items()}
        x, w, b, dy = d["x"], d["weight"], d["bias"], d["dy"]
        groups = (case.groups,) if case.norm == "group" else ()
        forward = getattr(lib, f"{case.norm}_norm_forward")
        backward = getattr(lib, f"{case.norm}_norm_backward")
        kw = {"axis": case.axis}
        if case.norm == "batch" or op == "fwd_eval":  # training BN updates them in place
            kw.update(running_mean=d["running_mean"], running_var=d["running_var"])
        if case.norm == "batch":
            kw["training"] = op != "fwd_eval"
        if case.norm == "instance":
            kw["use_input_stats"] = op != "fwd_eval"
        if op != "bwd":
            out = {"out": xp.empty_like(x)} if self.out else {}
            call = lambda: forward(x, *groups, w, b, **kw, **out)
        else:
            f = forward(x, *groups, w, b, **kw)
            out = {"dx_out": xp.empty_like(x)} if self.out else {}
            call = lambda: backward(dy, x, f.mean, f.rstd, *groups, w, axis=case.axis, **out)
        return _waiting(call, self), self.outputs


class _Ops:
    """torch's ops by name, each by its fastest Python entry (see TorchPeer)."""

    def __init__(self, torch):
        self.torch = torch

    def __getattr__(self, name):
        return getattr(self.torch, name, None) or getattr(self.torch.ops.aten, name).default


class TorchPeer:
    """PyTorch's own kernels, called as autograd would: native_batch_norm, native_layer_norm,
    native_group_norm and their backward ops; instance norm as F.instance_norm does it, a
    batch norm over a (1, N*C, *S) view. Each by its C++ binding (torch.native_layer_norm)
    where torch has one, else as the op's default overload (torch.ops.aten.X.default): the
    Python dispatch of torch.ops.aten.X cost ~2 us a call more (LayerNorm (4, 64) forward
    5.7 us against 3.5). Channels-last cases run on the NCHW view of the same memory
    (torch's channels_last format)."""

    def __init__(self, device="cpu"):
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        self.device, self.is_normcore = device, False

    def unavailable(self):
        try:
            self.torch = importlib.import_module("torch")
        except ImportError as e:
            return f"ImportError: {e}"
        if self.device == "cuda" and not self.torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def prepare(self, case, op, inputs):
        torch = self.torch
        aten = _Ops(torch)
        nd = len(case.shape)
        # channels-last (N, *S, C) -> torch's (N, C, *S) view of the same memory, and back
        to_nc = case.norm != "layer" and nd > 2 and case.channel_axis == nd - 1
        from_nc = (0, *range(2, nd), 1)
        # torch wants float32 parameters and statistics with float16 input
        pdtype = torch.float32 if inputs["x"].dtype == np.float16 else None

        def t(name, nc=False):
            v = torch.from_numpy(inputs[name].copy()).to(self.device)
            v = v.to(pdtype) if pdtype is not None and name not in ("x", "dy") else v
            return v.permute(0, nd - 1, *range(1, nd - 1)) if nc and to_nc else v

        x, dy = t("x", nc=True), t("dy", nc=True)
        w, b, rm, rv = t("weight"), t("bias"), t("running_mean"), t("running_var")
        n, c = x.shape[0], x.shape[1]
        mask = [True, True, True]
        if case.norm == "batch":
            train = op != "fwd_eval"
            fwd = lambda: aten.native_batch_norm(x, w, b, rm, rv, train, MOMENTUM, EPS)
            bwd = lambda m, r: aten.native_batch_norm_backward(dy, x, w, rm, rv, m, r, True,
                                                               EPS, mask)
        elif case.norm == "layer":
            shape = list(x.shape[case.axis:])
            fwd = lambda: aten.native_layer_norm(x, shape, w, b, EPS)
            bwd = lambda m, r: aten.native_layer_norm_backward(dy, x, shape, m, r, w, b, mask)
        elif case.norm == "group":
            hw, g = x[0, 0].numel(), case.groups
            fwd = lambda: aten.native_group_norm(x, w, b, n, c, hw, g, EPS)
            bwd = lambda m, r: aten.native_group_norm_backward(dy, x, m, r, w, n, c, hw, g, mask)
        else:
            stats = dict(running_mean=rm, running_var=rv) if op == "fwd_eval" else {}
            if op != "bwd":
                fwd = lambda: (torch.nn.functional.instance_norm(
                    x, weight=w, bias=b, use_input_stats=op == "fwd", momentum=MOMENTUM,
                    eps=EPS, **stats),)
            else:
                x1, dy1 = x.reshape(1, n * c, -1), dy.reshape(1, n * c, -1)
                w1, b1 = w.repeat(n), b.repeat(n)
                fwd = lambda: aten.native_batch_norm(x1, w1, b1, None, None, True, 0.0, EPS)

                def bwd(m, r):
                    dx, dw, db = aten.native_batch_norm_backward(dy1, x1, w1, None, None, m, r,
                                                                 True, EPS, mask)
                    return dx.view(x.shape), dw.view(n, c).sum(0), db.view(n, c).sum(0)
        if op == "bwd":
            _, m, r = fwd()
            call = lambda: bwd(m, r)
        else:
            call = fwd
        names = ("dx", "dweight", "dbias") if op == "bwd" else ("y", "mean", "rstd")
        running = (rm, rv) if case.norm == "batch" and op == "fwd" else ()

        def outputs(result):
            out = {}
            for name, v in zip(names, result):
                if v.numel() == 0:  # eval-mode batch norm saves no statistics
                    continue
                if name in ("y", "dx") and to_nc:
                    v = v.permute(from_nc)
                out[name] = v.detach().cpu().numpy()
            for name, v in zip(("running_mean", "running_var"), running):
                out[name] = v.cpu().numpy()
            return out
        return _waiting(call, self), outputs


NUMPY = ApiPeer("numpy", _numpy_peer)
PEERS = [
    ApiPeer("normcore", _normcore),
    ApiPeer("normcore[out]", _normcore, out=True),
    NUMPY,
    TorchPeer("cpu"),
    ApiPeer("normcore-cupy", _normcore, xp="cupy"),
    ApiPeer("normcore-cupy[out]", _normcore, xp="cupy", out=True),
    TorchPeer("cuda"),
]

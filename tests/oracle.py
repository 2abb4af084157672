"""Independent float64 reference for normcore's four norms, written plainly from the math.

Nothing here imports normcore. Every function casts its inputs to float64, works on the
caller's layout with ``np.mean``/``np.var`` over explicit axes (``keepdims=True`` so the
statistics broadcast back), and returns float64 results:

    mean = E[x]                       over the reduction set
    var  = E[(x - mean)**2]           biased
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * weight + bias

    dweight = sum(dy * xhat), dbias = sum(dy)   over every axis but the parameter's
    dx (batch statistics)  = rstd * (g - E[g] - xhat * E[g * xhat]),  g = dy * weight
    dx (frozen statistics) = g * rstd

Reduction sets: BatchNorm per channel over all other axes; InstanceNorm per (n, c) over the
spatial axes; GroupNorm per (n, group) over the group's channels and the spatial axes;
LayerNorm per leading index over the normalized trailing axes.
"""
from __future__ import annotations

import warnings
from collections import namedtuple

import numpy as np

Forward = namedtuple("Forward", "y mean rstd running_mean running_var")
Backward = namedtuple("Backward", "dx dweight dbias")


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _channel_shape(ndim, axis, size):
    """Shape that broadcasts a (C,) vector along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def _affine(xhat, weight, bias, pshape):
    y = xhat
    if weight is not None:
        y = y * _f64(weight).reshape(pshape)
    if bias is not None:
        y = y + _f64(bias).reshape(pshape)
    return y


def _batch_grad(dy, xhat, rstd, g, red):
    """dx with the statistics depending on x (means over the reduction axes ``red``)."""
    return rstd * (g - g.mean(axis=red, keepdims=True)
                   - xhat * (g * xhat).mean(axis=red, keepdims=True))


def mean_var(x, axis, ddof=0):
    """Mean and variance (keepdims) by a corrected two-pass: np.mean reduces a strided axis
    by plain sequential addition, whose error (~ eps * sqrt(n) * |mean|) is too large for
    float64 inputs with |mean| / std = 1e8; one correction pass over x - m0 (exact where
    x is near m0) brings the mean to within an ulp or so."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # empty sets, n - ddof <= 0
        m0 = x.mean(axis=axis, keepdims=True)
        if not np.all(np.isfinite(m0)):                   # NaN/inf: plain formulas
            return m0, x.var(axis=axis, keepdims=True, ddof=ddof)
        mean = m0 + (x - m0).mean(axis=axis, keepdims=True)
        n = x.size // max(mean.size, 1)
        var = ((x - mean) ** 2).sum(axis=axis, keepdims=True) / (n - ddof)
    return mean, var


def moments(x, axis=None, correction=0):
    x = _f64(x)
    if isinstance(axis, list):
        axis = tuple(axis)
    mean, var = mean_var(x, axis, correction)
    return mean.squeeze(axis), var.squeeze(axis)


# ----------------------------------------------------------------------------- BatchNorm
def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1):
    x = _f64(x)
    c = axis % x.ndim
    C = x.shape[c]
    red = tuple(i for i in range(x.ndim) if i != c)
    pshape = _channel_shape(x.ndim, c, C)
    new_rm, new_rv = _f64(running_mean), _f64(running_var)
    if training:
        mean, var = mean_var(x, red)
        n = x.size // C
        if new_rm is not None:
            new_rm = (1 - momentum) * new_rm + momentum * mean.reshape(C)
            new_rv = (1 - momentum) * new_rv + momentum * var.reshape(C) * n / (n - 1)
    else:
        mean = new_rm.reshape(pshape)
        var = new_rv.reshape(pshape)
    rstd = 1.0 / np.sqrt(var + eps)
    y = _affine((x - mean) * rstd, weight, bias, pshape)
    return Forward(y, mean.reshape(C), rstd.reshape(C), new_rm, new_rv)


def batch_norm_backward(dy, x, mean, rstd, weight=None, training=True, axis=1):
    dy, x = _f64(dy), _f64(x)
    c = axis % x.ndim
    C = x.shape[c]
    red = tuple(i for i in range(x.ndim) if i != c)
    pshape = _channel_shape(x.ndim, c, C)
    mean, rstd = _f64(mean).reshape(pshape), _f64(rstd).reshape(pshape)
    w = np.ones(pshape) if weight is None else _f64(weight).reshape(pshape)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = _batch_grad(dy, xhat, rstd, g, red) if training else g * rstd
    return Backward(dx, (dy * xhat).sum(axis=red), dy.sum(axis=red))


# -------------------------------------------------------------------------- InstanceNorm
def instance_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, axis=1):
    x = _f64(x)
    c = axis % x.ndim
    N, C = x.shape[0], x.shape[c]
    spatial = tuple(i for i in range(1, x.ndim) if i != c)
    pshape = _channel_shape(x.ndim, c, C)
    nc_shape = [1] * x.ndim            # (N, C) statistics broadcast along axes 0 and c
    nc_shape[0], nc_shape[c] = N, C
    new_rm, new_rv = _f64(running_mean), _f64(running_var)
    if use_input_stats:
        mean, var = mean_var(x, spatial)
        if new_rm is not None:
            n = int(np.prod([x.shape[i] for i in spatial]))
            unbiased = var.reshape(N, C) * n / (n - 1)
            new_rm = (1 - momentum) * new_rm + momentum * mean.reshape(N, C).mean(axis=0)
            new_rv = (1 - momentum) * new_rv + momentum * unbiased.mean(axis=0)
    else:
        mean = np.broadcast_to(new_rm.reshape(pshape), nc_shape)
        var = np.broadcast_to(new_rv.reshape(pshape), nc_shape)
    rstd = 1.0 / np.sqrt(var + eps)
    y = _affine((x - mean) * rstd, weight, bias, pshape)
    mean_nc = np.moveaxis(mean, c, 1).reshape(N, C)     # axis 0 stays first, c moves to 1
    rstd_nc = np.moveaxis(rstd, c, 1).reshape(N, C)
    return Forward(y, mean_nc, rstd_nc, new_rm, new_rv)


def instance_norm_backward(dy, x, mean, rstd, weight=None, use_input_stats=True, axis=1):
    dy, x = _f64(dy), _f64(x)
    c = axis % x.ndim
    N, C = x.shape[0], x.shape[c]
    spatial = tuple(i for i in range(1, x.ndim) if i != c)
    pshape = _channel_shape(x.ndim, c, C)
    nc_shape = [1] * x.ndim
    nc_shape[0], nc_shape[c] = N, C
    # (N, C) -> broadcastable along axes 0 and c (c > 0, so the order N, C is kept)
    mean = _f64(mean).reshape(nc_shape)
    rstd = _f64(rstd).reshape(nc_shape)
    w = np.ones(pshape) if weight is None else _f64(weight).reshape(pshape)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = _batch_grad(dy, xhat, rstd, g, spatial) if use_input_stats else g * rstd
    red = tuple(i for i in range(x.ndim) if i != c)
    return Backward(dx, (dy * xhat).sum(axis=red), dy.sum(axis=red))


# ----------------------------------------------------------------------------- GroupNorm
def _to_groups(a, c, G):
    """(..C at axis c..) -> (N, G, C // G, *spatial) with the channel axis moved to 1."""
    a = np.moveaxis(a, c, 1)
    N, C = a.shape[:2]
    return a.reshape((N, G, C // G) + a.shape[2:])


def _from_groups(a, c):
    N, G, Cg = a.shape[:3]
    return np.moveaxis(a.reshape((N, G * Cg) + a.shape[3:]), 1, c)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1):
    x = _f64(x)
    c = axis % x.ndim
    N, C = x.shape[0], x.shape[c]
    G = num_groups
    xg = _to_groups(x, c, G)
    red = tuple(range(2, xg.ndim))
    mean, var = mean_var(xg, red)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = _from_groups((xg - mean) * rstd, c)
    y = _affine(xhat, weight, bias, _channel_shape(x.ndim, c, C))
    return Forward(y, mean.reshape(N, G), rstd.reshape(N, G), None, None)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, axis=1):
    dy, x = _f64(dy), _f64(x)
    c = axis % x.ndim
    C = x.shape[c]
    G = num_groups
    xg, dyg = _to_groups(x, c, G), _to_groups(dy, c, G)
    red = tuple(range(2, xg.ndim))
    gshape = xg.shape[:2] + (1,) * (xg.ndim - 2)
    wshape = (1, G, C // G) + (1,) * (xg.ndim - 3)
    mean, rstd = _f64(mean).reshape(gshape), _f64(rstd).reshape(gshape)
    w = np.ones(wshape) if weight is None else _f64(weight).reshape(wshape)
    xhat = (xg - mean) * rstd
    g = dyg * w
    dx = _from_groups(_batch_grad(dyg, xhat, rstd, g, red), c)
    pred = (0,) + tuple(range(3, xg.ndim))
    dweight = (dyg * xhat).sum(axis=pred).reshape(C)
    dbias = dyg.sum(axis=pred).reshape(C)
    return Backward(dx, dweight, dbias)


# ----------------------------------------------------------------------------- LayerNorm
def _ln_axes(ndim, axis):
    axes = (axis,) if np.isscalar(axis) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def layer_norm_forward(x, weight=None, bias=None, axis=-1, eps=1e-5):
    x = _f64(x)
    red = _ln_axes(x.ndim, axis)
    lead = tuple(s for i, s in enumerate(x.shape) if i not in red)
    pshape = tuple(x.shape[i] for i in red)   # trailing, so it broadcasts as is
    mean, var = mean_var(x, red)
    rstd = 1.0 / np.sqrt(var + eps)
    y = _affine((x - mean) * rstd, weight, bias, pshape)
    return Forward(y, mean.reshape(lead), rstd.reshape(lead), None, None)


def layer_norm_backward(dy, x, mean, rstd, weight=None, axis=-1):
    dy, x = _f64(dy), _f64(x)
    red = _ln_axes(x.ndim, axis)
    lead_axes = tuple(i for i in range(x.ndim) if i not in red)
    kshape = tuple(1 if i in red else s for i, s in enumerate(x.shape))
    pshape = tuple(x.shape[i] for i in red)
    mean, rstd = _f64(mean).reshape(kshape), _f64(rstd).reshape(kshape)
    w = np.ones(pshape) if weight is None else _f64(weight).reshape(pshape)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = _batch_grad(dy, xhat, rstd, g, red)
    return Backward(dx, (dy * xhat).sum(axis=lead_axes), dy.sum(axis=lead_axes))


# ------------------------------------------------------------------ one table for all four
NORMS = ("batch", "instance", "group", "layer")


def reduction_length(norm, shape, axis=1, num_groups=None):
    """Number of values in one statistics group (the ``n`` that tolerances scale with)."""
    nd = len(shape)
    if norm == "layer":
        return int(np.prod([shape[i] for i in _ln_axes(nd, axis)]))
    c = axis % nd
    if norm == "batch":
        return int(np.prod(shape)) // shape[c]
    spatial = int(np.prod([shape[i] for i in range(1, nd) if i != c]))
    if norm == "instance":
        return spatial
    return spatial * shape[c] // num_groups


# ------------------------------------------------------------------------------- RMSNorm
def rms_norm_forward(x, weight=None, axis=-1, eps=None):
    x = _f64(x)
    red = _ln_axes(x.ndim, axis)
    lead = tuple(s for i, s in enumerate(x.shape) if i not in red)
    pshape = tuple(x.shape[i] for i in red)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=red, keepdims=True) + eps)
    y = _affine(x * rstd, weight, None, pshape)
    return Forward(y, None, rstd.reshape(lead), None, None)


def rms_norm_backward(dy, x, rstd, weight=None, axis=-1):
    """d/dx of y = x * rstd * w with rstd = (mean(x**2) + eps)**-1/2."""
    dy, x = _f64(dy), _f64(x)
    red = _ln_axes(x.ndim, axis)
    lead_axes = tuple(i for i in range(x.ndim) if i not in red)
    kshape = tuple(1 if i in red else s for i, s in enumerate(x.shape))
    pshape = tuple(x.shape[i] for i in red)
    rstd = _f64(rstd).reshape(kshape)
    w = np.ones(pshape) if weight is None else _f64(weight).reshape(pshape)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(axis=red, keepdims=True))
    return Backward(dx, (dy * xhat).sum(axis=lead_axes), None)

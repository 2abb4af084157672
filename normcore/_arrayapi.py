"""Arrays other than NumPy and CuPy: PyTorch tensors, array_api_strict arrays and the others
array-api-compat knows. `dispatch` wraps every public function that takes arrays and picks,
per call, one of two routes:

- kernels: when NumPy can view every array argument through DLPack (CPU memory: torch CPU
  tensors), the NumPy function runs on those views and its results come back through
  ``xp.from_dlpack``, both without copies; in-place updates (running statistics, ``out=``)
  land in the caller's memory.
- pure Array API: otherwise (another device, a tensor that refuses DLPack such as one that
  requires grad), the same front end runs on `Array` handles and the ops below compute on the
  canonical (O, A, C, B) view with array-API calls only (the math of kernels/cpu.py)::

      mean  = mean(x, axes (1, 3))     var = mean((x - mean)**2, axes (1, 3))
      rstd  = 1 / sqrt(var + eps)      xhat = (x - mean) * rstd
      y     = relu(xhat * w + bias + z)       w, bias: parameter cell c * Q + b // P
      g     = dy * (y > 0) with relu, else dy
      dx    = rstd * (g * w - c2 - xhat * c1)    c1 = mean(g * w * xhat), c2 = mean(g * w)
      dweight = sum(g * xhat), dbias = sum(g)    per cell: over (o, a) and b within the cell

Results have x's array type and device. Arguments a call updates (running statistics, ``out=``,
``dx_out=``) are written back in place where the array type allows it and are returned through
the result (``NormForward.running_mean`` / ``running_var``), the only way for immutable arrays.
dask arrays go to normcore._dask.
"""
import functools
import inspect
import math

import numpy as np

from ._backend import Backend, describe, is_cupy
from ._dtypes import CPU_DTYPES

# Set False to send CPU arrays through the pure Array-API route too (the tests compare the two).
use_kernels = True


def _namespace(a):
    import array_api_compat
    return array_api_compat.array_namespace(a)


def _device(a):
    import array_api_compat
    return array_api_compat.device(a)


def _is_array(v):
    if v is None or isinstance(v, (bool, int, float, complex, str)):
        return False
    import array_api_compat
    return array_api_compat.is_array_api_obj(v)


def _np_dtype(dtype):
    return np.dtype(str(dtype).rsplit(".", 1)[-1])


# ---------------------------------------------------------------------------------------------
# Handles: the NumPy names the front end uses, on top of an array-API array
# ---------------------------------------------------------------------------------------------


class _Store:
    """The array behind a handle and every reshape of it; `written` once replaced."""

    def __init__(self, value):
        self.value = value
        self.written = False


class _Flags:
    c_contiguous = True
    writeable = True       # writes replace the stored array, so every handle takes them


class Array:
    """A NumPy-flavoured handle on an array-API array, so the front end (written with NumPy's
    names) runs unchanged on it. Reshapes share the store, as NumPy views do; ``h[...] = v``
    replaces the stored array (array-API arrays need not be mutable)."""

    flags = _Flags()

    def __init__(self, value, xp, store=None, shape=None):
        self.xp = xp
        self.store = store if store is not None else _Store(value)
        self.shape = tuple(value.shape) if shape is None else shape

    @property
    def value(self):
        v = self.store.value
        return v if tuple(v.shape) == self.shape else self.xp.reshape(v, self.shape)

    def __setitem__(self, key, new):
        if key is not Ellipsis:
            raise NotImplementedError("Array handles take whole-array writes only")
        xp, v = self.xp, self.store.value
        new = _value(new)
        if isinstance(new, (int, float)):
            new = xp.full(self.shape, new, dtype=v.dtype, device=_device(v))
        new = xp.broadcast_to(xp.astype(new, v.dtype), self.shape)
        self.store.value = xp.reshape(new, tuple(v.shape))
        self.store.written = True

    @property
    def dtype(self):
        return _np_dtype(self.store.value.dtype)

    @property
    def device(self):
        return _device(self.store.value)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    def backend(self):
        """The pure Array-API backend (normcore._backend.backend_for asks for it)."""
        import sys
        return Backend("arrayapi", _Namespace(self.xp, self.device), sys.modules[__name__],
                       CPU_DTYPES, Array)

    def _new(self, value):
        return Array(value, self.xp)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        return Array(None, self.xp, self.store, tuple(shape))

    def transpose(self, perm):
        return self._new(self.xp.permute_dims(self.value, tuple(perm)))

    def astype(self, dtype):
        return self._new(self.xp.astype(self.value, _xp_dtype(self.xp, dtype)))

    def mean(self, axis=None):
        return self._new(self.xp.mean(self.value, axis=axis))

    def _op(self, other, op):
        return self._new(op(self.value, _value(other)))

    def __add__(self, o): return self._op(o, lambda a, b: a + b)
    def __radd__(self, o): return self._op(o, lambda a, b: b + a)
    def __sub__(self, o): return self._op(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._op(o, lambda a, b: b - a)
    def __mul__(self, o): return self._op(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._op(o, lambda a, b: b * a)
    def __truediv__(self, o): return self._op(o, lambda a, b: a / b)
    def __rtruediv__(self, o): return self._op(o, lambda a, b: b / a)
    def __neg__(self): return self._new(-self.value)


def _value(v):
    return v.value if isinstance(v, Array) else v


def _xp_dtype(xp, dtype):
    return getattr(xp, np.dtype(dtype).name)


class _Namespace:
    """The NumPy functions the front end calls, for handles of one array namespace / device."""
    float64 = np.float64
    nan = np.nan

    def __init__(self, xp, device):
        self.xp, self.device = xp, device

    def _make(self, fill, shape, dtype=np.float64):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        xp = self.xp
        return Array(xp.full(shape, fill, dtype=_xp_dtype(xp, dtype), device=self.device), xp)

    def empty(self, shape, dtype=np.float64):
        return self._make(0.0, shape, dtype)

    def zeros(self, shape, dtype=np.float64):
        return self._make(0.0, shape, dtype)

    def ones(self, shape, dtype=np.float64):
        return self._make(1.0, shape, dtype)

    def full(self, shape, fill, dtype=np.float64):
        return self._make(fill, shape, dtype)

    def full_like(self, a, fill):
        return self._make(fill, a.shape, a.dtype)

    def ascontiguousarray(self, a, dtype=None):
        return a if dtype is None else a.astype(dtype)

    def copyto(self, dst, src):
        dst[...] = src

    def sqrt(self, a):
        return a._new(self.xp.sqrt(a.value))

    def tile(self, a, reps):
        return a._new(self.xp.tile(a.value, (reps,)))


# ---------------------------------------------------------------------------------------------
# Ops: the interface of normcore._cpu, in array-API calls on the (O, A, C, B) view
# ---------------------------------------------------------------------------------------------


def _view(plan, h):
    """A flat handle as the float64 (O, A, C, B) view."""
    xp = h.xp
    return xp.astype(xp.reshape(h.value, (plan.O, plan.A, plan.C, plan.B)), xp.float64)


def _stat(plan, h):
    """Per-statistic values (O * C) broadcast over the view."""
    return h.xp.reshape(_value(h), (plan.O, 1, plan.C, 1))


def _cells(plan, h):
    """Parameter cells (C * Q): element (o, a, c, b) takes cell c * Q + b // P."""
    xp, C, Q, P = h.xp, plan.C, plan.Q, plan.P
    w = xp.broadcast_to(xp.reshape(h.value, (C, Q, 1)), (C, Q, P))
    return xp.reshape(w, (1, 1, C, plan.B))


def _cell_sums(plan, xp, t):
    """Sums of t over (o, a) and b within each parameter cell: C * Q values."""
    t = xp.reshape(t, (plan.O, plan.A, plan.C, plan.Q, plan.P))
    return xp.reshape(xp.sum(t, axis=(0, 1, 4)), (-1,))


def _flat(xp, a):
    return xp.reshape(a, (-1,))


def moments(plan, x):
    """Biased moments per statistic: (mean, var), float64 handles of O * C values."""
    xp, v = x.xp, _view(plan, x)
    mean = xp.mean(v, axis=(1, 3), keepdims=True)
    var = xp.mean((v - mean) ** 2, axis=(1, 3))
    return Array(_flat(xp, mean), xp), Array(_flat(xp, var), xp)


def _normalized(plan, x, mean, rstd, w, bias, z, relu):
    xp = x.xp
    y = (_view(plan, x) - mean) * rstd * _cells(plan, w) + _cells(plan, bias)
    if z is not None:
        y = y + _view(plan, z)
    return xp.where(y < 0, 0.0, y) if relu else y


def normalize(plan, x, y, mean, rstd, w, bias, *, z=None, relu=False):
    """y = relu((x - mean) * rstd * w + bias + z) with given float64 statistics."""
    y[...] = _flat(x.xp, _normalized(plan, x, _stat(plan, mean), _stat(plan, rstd), w, bias,
                                     z, relu))


def forward_train(plan, x, y, w, bias, eps, stats_dtype, want_var, *, z=None, relu=False,
                  centered=True):
    """Batch statistics + normalization; returns saved (mean, rstd) in `stats_dtype` and the
    float64 variance when `want_var`. centered=False is RMSNorm: mean 0, var = mean(x**2)."""
    xp, v = x.xp, _view(plan, x)
    if centered:
        mean = xp.mean(v, axis=(1, 3), keepdims=True)
        var = xp.mean((v - mean) ** 2, axis=(1, 3), keepdims=True)
    else:
        mean = xp.zeros_like(v[:, :1, :, :1])
        var = xp.mean(v * v, axis=(1, 3), keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    y[...] = _flat(xp, _normalized(plan, x, mean, rstd, w, bias, z, relu))
    sdt = _xp_dtype(xp, stats_dtype)
    return (Array(xp.astype(_flat(xp, mean), sdt), xp), Array(xp.astype(_flat(xp, rstd), sdt), xp),
            Array(_flat(xp, var), xp) if want_var else None)


def backward(plan, dy, x, dx, mean, rstd, w, frozen, *, y=None, relu=False, dz=None,
             centered=True):
    """dx into `dx` (and the residual's gradient into `dz` when given); returns float64
    (dweight, dbias) handles of C * Q cells."""
    xp = x.xp
    g = _view(plan, dy)
    if relu:
        g = xp.where(_view(plan, y) > 0, g, 0.0)
    rstd4 = _stat(plan, rstd)
    xhat = (_view(plan, x) - _stat(plan, mean)) * rstd4
    gw = g * _cells(plan, w)
    if frozen:
        dx[...] = _flat(xp, rstd4 * gw)
    else:
        n = plan.A * plan.B
        c1 = xp.sum(gw * xhat, axis=(1, 3), keepdims=True) / n
        c2 = xp.sum(gw, axis=(1, 3), keepdims=True) / n if centered else 0.0
        dx[...] = _flat(xp, rstd4 * (gw - c2 - xhat * c1))
    if dz is not None:
        dz[...] = _flat(xp, g)
    return (Array(_cell_sums(plan, xp, g * xhat), xp), Array(_cell_sums(plan, xp, g), xp))


# ---------------------------------------------------------------------------------------------
# The public functions' wrapper
# ---------------------------------------------------------------------------------------------


def _native(v):
    return isinstance(v, (np.ndarray, np.generic)) or is_cupy(v)


def _is_dask(v):
    return type(v).__module__.split(".")[0] == "dask"


def _numpy_view(a):
    """A NumPy array sharing a's memory (DLPack on the CPU), or None."""
    if not use_kernels or not hasattr(a, "__dlpack_device__") or a.__dlpack_device__()[0] != 1:
        return None
    try:
        return np.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


def _convert(r, f):
    """Apply f to every array in a result (NormForward / NormBackward / Moments / tuple)."""
    from ._norms import NormBackward
    from ._welford import Moments
    if isinstance(r, NormBackward):
        return NormBackward(*(_convert(v, f) for v in r), _convert(r.dresidual, f))
    if isinstance(r, Moments):
        return Moments(_convert(r.count, f), _convert(r.mean, f), _convert(r.m2, f))
    if isinstance(r, tuple):
        items = [_convert(v, f) for v in r]
        return type(r)(*items) if hasattr(r, "_fields") else tuple(items)
    return r if r is None or isinstance(r, (int, float)) else f(r)


def _check_alike(arrays):
    """Every array argument of the first one's type and device (first name, first array)."""
    (lead_name, lead), *rest = arrays.items()
    for name, a in rest:
        if type(a) is not type(lead):
            raise TypeError(f"{name}: expected a {describe(lead)} like {lead_name}, got "
                            f"{describe(a)}")
        if _device(a) != _device(lead):
            raise ValueError(f"{name}: expected an array on {lead_name}'s device "
                             f"{_device(lead)}, got one on {_device(a)}")
    for name, a in arrays.items():
        try:
            _np_dtype(a.dtype)
        except TypeError:
            raise TypeError(f"{name}: expected a float16, float32 or float64 array, got dtype "
                            f"{a.dtype}") from None


def _through_kernels(func, bound, arrays, views):
    lead = next(iter(arrays.values()))
    xp, device = _namespace(lead), _device(lead)
    originals = {id(views[name]): a for name, a in arrays.items()}
    bound.arguments.update(views)

    def back(r):
        if id(r) in originals:
            return originals[id(r)]
        try:
            r = xp.from_dlpack(r)
        except (BufferError, TypeError, ValueError):   # e.g. a read-only result
            r = xp.asarray(np.array(r))
        # a simulated device (array_api_strict's) shares CPU memory but is another device
        return r if _device(r) == device else r.to_device(device)

    return _convert(func(*bound.args, **bound.kwargs), back)


def _through_arrayapi(func, bound, arrays):
    xp = _namespace(next(iter(arrays.values())))
    handles = {name: Array(a, xp) for name, a in arrays.items()}
    bound.arguments.update(handles)
    result = func(*bound.args, **bound.kwargs)
    returned = {}                                   # store -> what the caller gets for it
    for name, h in handles.items():
        returned[id(h.store)] = arrays[name]
        if h.store.written:
            try:
                arrays[name][...] = h.store.value   # in place, like NumPy and CuPy
            except (TypeError, ValueError, NotImplementedError, AttributeError):
                returned[id(h.store)] = h.store.value   # immutable: only the result has it
    return _convert(result, lambda h: returned.get(id(h.store), h.value)
                    if isinstance(h, Array) else h)


def dispatch(func):
    """Wrap a public function so that any Array-API array (and a dask array, where
    normcore._dask implements the function) works as it does for NumPy; NumPy and CuPy calls
    go straight through, a NumPy first argument through a wrapper with func's own parameters
    (see _numpy_first)."""
    signature = inspect.signature(func)

    def call(*args, **kwargs):
        lead = args[0] if args else next(iter(kwargs.values()), None)
        if type(lead) is np.ndarray or _native(lead):
            return func(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arrays = {k: v for k, v in bound.arguments.items() if _is_array(v) or _is_dask(v)}
        if not arrays or _native(next(iter(arrays.values()))):
            return func(*args, **kwargs)            # the front end says what is wrong
        if any(_is_dask(a) for a in arrays.values()):
            from . import _dask
            return _dask.call(func.__name__, bound)
        _check_alike(arrays)
        views = {k: _numpy_view(a) for k, a in arrays.items()}
        if all(v is not None for v in views.values()):
            return _through_kernels(func, bound, arrays, views)
        return _through_arrayapi(func, bound, arrays)

    wrapper = functools.update_wrapper(_numpy_first(func, signature, call), func)
    wrapper.__module__ = "normcore"   # pickled by reference as normcore.<name> (multiprocessing)
    return wrapper


def _numpy_first(func, signature, call):
    """A function with func's parameters and defaults that passes a NumPy first argument
    straight to func, anything else to `call`. Built from source: `call`'s own (*args,
    **kwargs) and the search for the lead argument cost a (4, 64) LayerNorm forward ~1 us of
    its 10 (0.45 us this way)."""
    params, passed, env = [], [], {"_func": func, "_call": call, "_ndarray": np.ndarray}
    star = False
    for k, p in enumerate(signature.parameters.values()):
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return functools.wraps(func)(call)
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if p.default is p.empty:
            params.append(p.name)
        else:
            env[f"_default{k}"] = p.default
            params.append(f"{p.name}=_default{k}")
        passed.append(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else f"{p.name}={p.name}")
    first = next(iter(signature.parameters))
    args = ", ".join(passed)
    source = (f"def {func.__name__}({', '.join(params)}):\n"
              f"    if type({first}) is _ndarray:\n"
              f"        return _func({args})\n"
              f"    return _call({args})\n")
    exec(source, env)
    return env[func.__name__]

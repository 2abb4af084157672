"""Which kernels serve an array: NumPy -> the Numba CPU kernels, CuPy -> the Numba CUDA kernels
(imported on the first CuPy array, never before). Array types are told apart without importing
anything; other Array-API arrays go to the pure Array-API backend in normcore._arrayapi."""
import sys
from typing import NamedTuple

import numpy as np

from ._dtypes import CPU_DTYPES, CUDA_DTYPES


class Backend(NamedTuple):
    name: str
    xp: object              # the array namespace (numpy or cupy)
    ops: object             # module with moments / normalize / forward_train / backward
    dtypes: tuple           # supported input dtypes
    array_type: type


def describe(obj):
    """The type of `obj`, for error messages."""
    kind = type(obj)
    if kind.__module__ == "builtins":
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def is_cupy(obj):
    return type(obj).__module__.split(".")[0] == "cupy"


_CPU = None


def cpu_backend():
    global _CPU
    if _CPU is None:
        from . import _cpu
        _CPU = Backend("cpu", np, _cpu, CPU_DTYPES, np.ndarray)
    return _CPU


def _cuda_backend():
    cupy = sys.modules["cupy"]
    try:
        from . import _cuda
    except ImportError as exc:
        raise TypeError("x: CuPy arrays need normcore's CUDA kernels (pip install "
                        f"'normcore[cuda]'): {exc}") from exc
    return Backend("cuda", cupy, _cuda, CUDA_DTYPES, cupy.ndarray)


def backend_for(name, x):
    """The backend for array `x` (TypeError for anything else). Other Array-API arrays reach
    the front end as normcore._arrayapi.Array handles (the public functions wrap them)."""
    if isinstance(x, (np.ndarray, np.generic)):   # a NumPy scalar is a 0-d array here
        return cpu_backend()
    if is_cupy(x):
        return _cuda_backend()
    if type(x).__module__ == "normcore._arrayapi":
        return x.backend()
    raise TypeError(f"{name}: expected a NumPy, CuPy or other Array-API array, got "
                    f"{describe(x)}")

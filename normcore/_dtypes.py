"""The one dtype policy of normcore.

- Inputs x (and dy): float32 or float64. Outputs y / dx have the input's dtype.
- Statistics accumulate in float64 inside the kernels, whatever the input dtype.
- Saved statistics (mean, rstd) are float32, or float64 for float64 input.
- weight / bias / running statistics: any real floating dtype; they are read as float64 and
  dweight / dbias come back in the weight's dtype (the input's dtype when weight is None).
"""
import numpy as np

SUPPORTED = (np.dtype(np.float32), np.dtype(np.float64))


def _name(dtype):
    return getattr(dtype, "name", str(dtype))


def check_input_dtype(name, dtype):
    """Raise TypeError unless `dtype` is a supported input dtype."""
    if np.dtype(dtype) not in SUPPORTED:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {_name(dtype)}")


def check_real_floating(name, dtype):
    """Raise TypeError unless `dtype` is a real floating dtype (parameters, running statistics)."""
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"{name}: expected a real floating dtype, got dtype {_name(dtype)}")


def stats_dtype(dtype):
    """dtype of the saved statistics for an input of `dtype`."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)

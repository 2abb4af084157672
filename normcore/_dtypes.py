"""The one dtype policy of normcore.

- Inputs x (and dy): float16, float32 or float64 (float16 loads and stores only: the CPU
  kernels see its uint16 bit patterns and convert with the CPU's half instructions).
  Outputs y / dx have the input's dtype.
- Statistics and parameter gradients accumulate in float64 inside the CPU kernels (float32 at
  least on CUDA); for float16 / float32 data, short blocks add up in float32 first where
  only float32 results depend on them (kernels/cpu.py says which), and the elementwise
  passes compute in float32 with the mean split as hi + lo.
- Saved statistics (mean, rstd) are float32, or float64 for float64 input.
- weight / bias / running statistics: any real floating dtype; they are read as float64 (the
  CPU kernels get weight / bias in their compute dtype: float32 for float16 / float32 data) and
  dweight / dbias come back in the weight's dtype (the saved statistics' dtype when weight
  is None: a float16 sum over a batch overflows easily).
"""
import numpy as np

CPU_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
CUDA_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def stats_dtype(dtype):
    """dtype of the saved statistics for an input of `dtype`."""
    return _FLOAT64 if dtype == _FLOAT64 else _FLOAT32

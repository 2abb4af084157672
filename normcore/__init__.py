"""normcore: BatchNorm, LayerNorm, InstanceNorm and GroupNorm as fused Numba kernels.

Drop-ins (``batch_norm``, ``layer_norm``, ``instance_norm``, ``group_norm``) return y;
``*_forward`` returns ``NormForward(y, mean, rstd, running_mean, running_var)`` and
``*_backward`` returns ``NormBackward(dx, dweight, dbias)``; ``moments`` gives a one-pass
mean and variance over any axes, ``welford`` / ``merge_moments`` statistics that merge across
splits, ``PopulationStats`` exact statistics for inference. NumPy arrays run on the CPU
kernels, CuPy arrays on the CUDA kernels, other Array-API arrays and dask arrays as
normcore._arrayapi and normcore._dask describe. See each function's docstring for the math.
"""
from ._moments import moments
from ._norms import (NormBackward, NormForward, batch_norm,
                     batch_norm_backward, batch_norm_forward, batch_norm_scale_shift,
                     fold_batch_norm, group_norm, group_norm_backward, group_norm_forward,
                     instance_norm, instance_norm_backward, instance_norm_forward, layer_norm,
                     layer_norm_backward, layer_norm_forward, rms_norm, rms_norm_backward,
                     rms_norm_forward)
from ._outputs import set_output_cache
from ._welford import Moments, PopulationStats, merge_moments, welford
from ._arrayapi import dispatch as _dispatch

__version__ = "0.1.0"

__all__ = [
    "NormForward", "NormBackward", "moments",
    "Moments", "welford", "merge_moments", "PopulationStats",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "batch_norm_scale_shift", "fold_batch_norm", "set_output_cache",
]

# Every function that takes arrays also takes other Array-API arrays (and dask arrays where
# normcore._dask has it); NumPy and CuPy calls go straight through.
for _name in __all__:
    if _name not in ("NormForward", "NormBackward", "Moments", "PopulationStats",
                     "merge_moments", "set_output_cache"):
        globals()[_name] = _dispatch(globals()[_name])
del _name

"""The benchmark's cases and its model of the bytes each op must move.

One table (``CASES``) drives the timing run, ``--quick`` and ``--validate``.

Ops:
  fwd       forward with batch statistics (training BN; IN with use_input_stats=True; LN; GN)
  fwd_eval  forward with running statistics (BN training=False; IN use_input_stats=False)
  bwd       backward through the batch statistics (the full gradient)
"""
from dataclasses import dataclass

import numpy as np

NORMS = ("batch", "layer", "instance", "group")
OPS = ("fwd", "fwd_eval", "bwd")


@dataclass(frozen=True)
class Case:
    name: str
    norm: str                  # one of NORMS
    shape: tuple
    axis: int = 1              # channel axis (BN/IN/GN) or the normalized trailing axis (LN)
    groups: int = 0            # GroupNorm only
    quick: bool = True         # part of --quick
    named: bool = True         # one of issue 4's named cases (the geomean it sets a target for)

    @property
    def ops(self):
        return OPS if self.norm in ("batch", "instance") else ("fwd", "bwd")

    @property
    def channel_axis(self):
        return self.axis % len(self.shape)

    def resized(self, cap_other, cap_channel):
        """The same case on a smaller array: channel (or normalized) axis capped at
        ``cap_channel`` (kept a multiple of ``groups``), every other axis at ``cap_other``."""
        shape = []
        for i, n in enumerate(self.shape):
            if i == self.channel_axis:
                n = min(n, cap_channel)
                n -= n % max(self.groups, 1)
            else:
                n = min(n, cap_other)
            shape.append(n)
        return Case(self.name, self.norm, tuple(shape), self.axis, self.groups, self.quick,
                    self.named)


CASES = [
    Case("bn_nchw_resnet", "batch", (32, 64, 56, 56), axis=1),
    Case("bn_nchw_deep", "batch", (256, 256, 14, 14), axis=1, quick=False),
    Case("bn_nhwc_resnet", "batch", (32, 56, 56, 64), axis=-1),
    Case("bn_2d_small", "batch", (256, 1024), axis=1),
    Case("bn_2d_large", "batch", (8192, 1024), axis=1, quick=False),
    Case("ln_bert", "layer", (8192, 1024), axis=-1),
    Case("ln_wide", "layer", (4096, 4096), axis=-1, quick=False),
    Case("ln_narrow", "layer", (65536, 128), axis=-1),
    Case("ln_gpt", "layer", (16384, 1024), axis=-1, quick=False),
    Case("gn32_nchw", "group", (32, 64, 56, 56), axis=1, groups=32),
    Case("gn32_nhwc", "group", (32, 56, 56, 64), axis=-1, groups=32),
    Case("in_nchw", "instance", (32, 64, 56, 56), axis=1),
    Case("ln_tiny", "layer", (4, 64), axis=-1),
    # beyond the named cases: the last stage of a ResNet (7 x 7 maps), where runs are short
    Case("bn_nchw_7x7", "batch", (64, 256, 7, 7), axis=1, quick=False, named=False),
    Case("gn32_nchw_7x7", "group", (64, 256, 7, 7), axis=1, groups=32, quick=False,
         named=False),
    Case("in_nchw_7x7", "instance", (64, 256, 7, 7), axis=1, quick=False, named=False),
]
NAMED = {c.name for c in CASES if c.named}


def min_bytes(norm, op, numel, itemsize):
    """Bytes an op must move at least (DESIGN.md, "Speed"): read x once and write y once
    (2E per element); training BN reads x twice, since its statistics span the whole
    tensor (3E); a backward reads x and dy and writes dx (3E), training BN twice over (5E)."""
    per_element = {
        ("batch", "fwd"): 3,
        ("batch", "bwd"): 5,
    }.get((norm, op), 3 if op == "bwd" else 2)
    return per_element * numel * itemsize


def select(cases, names=None, norms=None, quick=False):
    """Cases whose name contains any of ``names`` and whose norm is in ``norms``."""
    out = []
    for c in cases:
        if quick and not c.quick:
            continue
        if names and not any(s in c.name for s in names):
            continue
        if norms and c.norm not in norms:
            continue
        out.append(c)
    return out


def make_inputs(case, dtype, seed=0):
    """x, dy, affine parameters and running statistics for one case (NumPy arrays).
    Parameters and running statistics have the statistics dtype (float64 for float64 input,
    float32 otherwise: mixed precision keeps float16 models' parameters in float32, and
    PyTorch's CPU kernels take no other), so that every peer gets the same arrays."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    c = case.shape[case.channel_axis]
    pshape = (c,)
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
    return dict(
        x=x,
        dy=dy,
        weight=(1 + 0.1 * rng.standard_normal(pshape)).astype(stats_dtype),
        bias=(0.1 * rng.standard_normal(pshape)).astype(stats_dtype),
        running_mean=(0.5 + 0.1 * rng.standard_normal(c)).astype(stats_dtype),
        running_var=rng.uniform(3.0, 5.0, c).astype(stats_dtype),
    )

"""Fused epilogue against the unfused sequence, forward and backward.

    python bench/fused.py [--quick] [--json PATH]

Forward: ``y = relu(norm(x) * w + b + z)`` in one normcore call (``activation="relu",
residual=z``) against the norm followed by ``y += z`` and ``np.maximum(y, 0, out=y)``.
Backward: one call with ``activation="relu", y=y, residual=True`` against the mask
``dy * (y > 0)`` followed by the plain backward. All outputs go to preallocated buffers, every
result is checked against the unfused one before timing, and the two are timed round-robin.
Bytes model (E per element): fused forward reads x and z and writes y (3E), the unfused one
moves 2E + 3E + 2E; fused backward reads dy, x and y and writes dx and dz (5E on top of the
norm's own backward), the unfused one adds a mask pass (3E).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import normcore as nc

RESULTS = Path(__file__).resolve().parent / "results"

CASES = [   # (name, norm, shape, axis, extra keyword arguments)
    ("ln_bert", "layer", (8192, 1024), -1, {}),
    ("bn_nchw_resnet", "batch", (32, 64, 56, 56), 1, {}),
    ("bn_nhwc_resnet", "batch", (32, 56, 56, 64), -1, {}),
    ("gn32_nchw", "group", (32, 64, 56, 56), 1, {"num_groups": 32}),
    ("in_nchw", "instance", (32, 64, 56, 56), 1, {}),
    ("rms_llama", "rms", (8192, 1024), -1, {}),
]


def _calls(norm):
    """(forward, backward) taking (x, w, b, axis, kw, **epilogue)."""
    if norm == "rms":
        def forward(x, w, b, axis, kw, **epi):
            return nc.rms_norm_forward(x, w, axis=axis, **epi)

        def backward(dy, x, f, w, axis, kw, **epi):
            return nc.rms_norm_backward(dy, x, f.rstd, w, axis=axis, **epi)
        return forward, backward
    prefix = f"{norm}_norm"
    fwd, bwd = getattr(nc, prefix + "_forward"), getattr(nc, prefix + "_backward")
    if norm == "group":
        def forward(x, w, b, axis, kw, **epi):
            return fwd(x, kw["num_groups"], w, b, axis=axis, **epi)

        def backward(dy, x, f, w, axis, kw, **epi):
            return bwd(dy, x, f.mean, f.rstd, kw["num_groups"], w, axis=axis, **epi)
        return forward, backward

    def forward(x, w, b, axis, kw, **epi):
        return fwd(x, w, b, axis=axis, **epi)

    def backward(dy, x, f, w, axis, kw, **epi):
        return bwd(dy, x, f.mean, f.rstd, w, axis=axis, **epi)
    return forward, backward


def _median_pair(a, b, repeats):
    """Round-robin medians of two thunks (seconds)."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for thunk, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            thunk()
            times.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def run_case(name, norm, shape, axis, kw, repeats):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    z = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    channels = shape[axis] if norm not in ("layer", "rms") else shape[-1]
    w = np.ones(channels, np.float32)
    b = None if norm == "rms" else np.zeros(channels, np.float32)
    forward, backward = _calls(norm)
    y_fused, y_plain = np.empty_like(x), np.empty_like(x)
    dx_fused, dx_plain, masked = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def fused_forward():
        return forward(x, w, b, axis, kw, activation="relu", residual=z, out=y_fused)

    def plain_forward():
        f = forward(x, w, b, axis, kw, out=y_plain)
        np.add(y_plain, z, out=y_plain)
        np.maximum(y_plain, 0, out=y_plain)
        return f

    f = fused_forward()
    g = plain_forward()
    np.testing.assert_allclose(y_fused, y_plain, rtol=1e-5, atol=1e-5)

    def fused_backward():
        return backward(dy, x, f, w, axis, kw, activation="relu", y=y_fused, residual=True,
                        dx_out=dx_fused)

    def plain_backward():
        # the fused y's mask: y_plain rounds norm(x) before adding z, so an element whose
        # pre-activation is within a rounding of 0 may fall on the other side of the ReLU
        np.multiply(dy, y_fused > 0, out=masked)
        return backward(masked, x, g, w, axis, kw, dx_out=dx_plain)

    fused_backward(), plain_backward()
    np.testing.assert_allclose(dx_fused, dx_plain, rtol=1e-4, atol=1e-4)
    t_ff, t_pf = _median_pair(fused_forward, plain_forward, repeats)
    t_fb, t_pb = _median_pair(fused_backward, plain_backward, repeats)
    return {"case": name, "shape": list(shape), "forward_fused_s": t_ff,
            "forward_unfused_s": t_pf, "backward_fused_s": t_fb, "backward_unfused_s": t_pb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases, fewer repeats")
    parser.add_argument("--json", type=Path, default=RESULTS / "fused.json")
    args = parser.parse_args(argv)
    cases = CASES[:2] if args.quick else CASES
    repeats = 5 if args.quick else 15
    rows = []
    print(f"{'case':16} {'shape':18} {'fwd fused':>10} {'unfused':>10} {'speedup':>8} "
          f"{'bwd fused':>10} {'unfused':>10} {'speedup':>8}")
    for case in cases:
        r = run_case(*case, repeats)
        rows.append(r)
        print(f"{r['case']:16} {'x'.join(map(str, r['shape'])):18} "
              f"{r['forward_fused_s'] * 1e3:8.2f}ms {r['forward_unfused_s'] * 1e3:8.2f}ms "
              f"{r['forward_unfused_s'] / r['forward_fused_s']:7.2f}x "
              f"{r['backward_fused_s'] * 1e3:8.2f}ms {r['backward_unfused_s'] * 1e3:8.2f}ms "
              f"{r['backward_unfused_s'] / r['backward_fused_s']:7.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())

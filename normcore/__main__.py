"""``python -m normcore``: normalize arrays with each norm, check the result against a plain NumPy
implementation and time both (first call, with JIT compile, reported apart)."""
import argparse
import time

import numba
import numpy as np

import normcore as nc


def _numpy_norm(x, reduce_axes, weight, bias, eps=1e-5):
    mean = x.mean(axis=reduce_axes, keepdims=True)
    var = x.var(axis=reduce_axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _cases(rng, scale):
    n = 8 * scale
    x4 = rng.standard_normal((n, 64, 56, 56), dtype=np.float32) * 3 + 1
    w64, b64 = rng.standard_normal(64, dtype=np.float32), rng.standard_normal(64, dtype=np.float32)
    x2 = rng.standard_normal((1024 * scale, 1024), dtype=np.float32)
    w1k = rng.standard_normal(1024, dtype=np.float32)
    b1k = rng.standard_normal(1024, dtype=np.float32)
    per_channel = (w64[:, None, None], b64[:, None, None])
    grouped = x4.reshape(n, 32, 2, 56, 56)
    return [
        ("batch_norm", x4.shape, lambda: nc.batch_norm(x4, w64, b64),
         lambda: _numpy_norm(x4, (0, 2, 3), *per_channel)),
        ("batch_norm channels-last", (n, 56, 56, 64),
         lambda: nc.batch_norm(np.moveaxis(x4, 1, -1), w64, b64, axis=-1),
         lambda: _numpy_norm(np.moveaxis(x4, 1, -1), (0, 1, 2), w64, b64)),
        ("layer_norm", x2.shape, lambda: nc.layer_norm(x2, w1k, b1k),
         lambda: _numpy_norm(x2, -1, w1k, b1k)),
        ("instance_norm", x4.shape, lambda: nc.instance_norm(x4, w64, b64),
         lambda: _numpy_norm(x4, (2, 3), *per_channel)),
        ("group_norm (32 groups)", x4.shape, lambda: nc.group_norm(x4, 32, w64, b64),
         lambda: _numpy_norm(grouped, (2, 3, 4), 1, 0).reshape(x4.shape) * per_channel[0]
         + per_channel[1]),
    ]


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m normcore", description=__doc__)
    parser.add_argument("--scale", type=int, default=1, help="batch-size multiplier")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"normcore {nc.__version__}, numba {numba.__version__} ({numba.get_num_threads()} "
          f"threads), numpy {np.__version__}")
    print(f"{'norm':26} {'shape':20} {'max |err|':>10} {'first call':>11} {'normcore':>10} "
          f"{'numpy':>10} {'speedup':>8}")
    for name, shape, ours, reference in _cases(rng, args.scale):
        t0 = time.perf_counter()
        y = ours()
        first = time.perf_counter() - t0
        err = float(np.max(np.abs(y.astype(np.float64) - reference())))
        t_ours = _median_time(ours, args.repeats)
        t_ref = _median_time(reference, args.repeats)
        print(f"{name:26} {str(shape):20} {err:10.2e} {first * 1e3:9.0f}ms "
              f"{t_ours * 1e3:8.2f}ms {t_ref * 1e3:8.2f}ms {t_ref / t_ours:7.1f}x")
    print("first call includes JIT compilation (cached on disk for the next process);"
          " times are medians of", args.repeats, "calls with fresh outputs.")


if __name__ == "__main__":
    main()

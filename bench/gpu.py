"""Time normcore's CUDA kernels on CuPy arrays (the cases of bench/cases.py) against the GPU's
own copy bandwidth and, when installed with CUDA, torch.

    python bench/gpu.py                        # every case, float32 / float16 / float64
    python bench/gpu.py --quick                # quick cases, float32
    python bench/gpu.py --case ln_ --dtype float16 --json out.json

Every (case, dtype, op) is first checked against normcore's NumPy path on the same input
(float32 for float16), then timed with CUDA events around ``number`` back-to-back calls on
the current stream (median of ``repeats`` samples). GB/s is cases.min_bytes over that time;
"copy" is it as a fraction of a device-to-device copy between two 256 MiB buffers (bytes read
+ written), measured in the same run. "host us" is the wall time per call of a tiny input
with no synchronization: the launch overhead a small-batch user pays.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as cs  # noqa: E402

TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2}   # max |err| / max(1, |ref|)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="quick cases, float32, 5 repeats")
    p.add_argument("--case", action="append", default=[], help="keep cases containing this")
    p.add_argument("--dtype", action="append", default=[],
                   choices=["float32", "float16", "float64"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def gpu_time(fn, number, repeats, cupy):
    """Median seconds per call, CUDA events around `number` calls on the current stream."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(number):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3 / number)
    return statistics.median(samples)


def calls_per_sample(fn, cupy, target_s=2e-3):
    """Back-to-back calls so that a sample lasts about `target_s`."""
    t = gpu_time(fn, 1, 3, cupy)
    return max(1, min(1000, int(target_s / max(t, 1e-7))))


def copy_bandwidth(cupy, repeats):
    """Device-to-device copy GB/s (bytes read + written) between two 256 MiB buffers."""
    n = 256 << 20
    a, b = cupy.empty(n, np.uint8), cupy.empty(n, np.uint8)
    a.fill(1)
    t = gpu_time(lambda: cupy.copyto(b, a), 5, repeats, cupy)
    return 2 * n / t / 1e9


def normcore_ops(nc, case, d, device_inputs):
    """{op: zero-argument callable} for normcore on device arrays."""
    x, dy, w, b = (device_inputs[k] for k in ("x", "dy", "weight", "bias"))
    axis = case.axis
    if case.norm == "group":
        fwd = lambda: nc.group_norm_forward(x, case.groups, w, b, axis=axis)  # noqa: E731
        f = fwd()
        bwd = lambda: nc.group_norm_backward(dy, x, f.mean, f.rstd, case.groups, w,  # noqa: E731
                                             axis=axis)
        return {"fwd": fwd, "bwd": bwd}
    forward = getattr(nc, f"{case.norm}_norm_forward")
    backward = getattr(nc, f"{case.norm}_norm_backward")
    kw = {"axis": axis}
    fwd = lambda: forward(x, w, b, **kw)  # noqa: E731
    f = fwd()
    ops = {"fwd": fwd, "bwd": lambda: backward(dy, x, f.mean, f.rstd, w, **kw)}
    if case.norm == "batch":
        rm, rv = device_inputs["running_mean"], device_inputs["running_var"]
        ops["fwd_eval"] = lambda: forward(x, w, b, running_mean=rm, running_var=rv,
                                          training=False, **kw)
    elif case.norm == "instance":
        rm, rv = device_inputs["running_mean"], device_inputs["running_var"]
        ops["fwd_eval"] = lambda: forward(x, w, b, running_mean=rm, running_var=rv,
                                          use_input_stats=False, **kw)
    return ops


def torch_ops(torch, case, d, device_inputs):
    """{op: callable} for torch CUDA on the same device memory (DLPack, no copy)."""
    F = torch.nn.functional
    t = {k: torch.from_dlpack(v) for k, v in device_inputs.items()}
    x, w, b = t["x"], t["weight"], t["bias"]
    if case.channel_axis != 1 and case.norm != "layer":
        return {}                       # torch's BN/IN/GN are channels-first only
    if case.norm == "layer":
        fn = lambda xx: F.layer_norm(xx, x.shape[-1:], w, b)  # noqa: E731
    elif case.norm == "batch":
        fn = lambda xx: F.batch_norm(xx, None, None, w, b, training=True)  # noqa: E731
    elif case.norm == "instance":
        fn = lambda xx: F.instance_norm(xx, weight=w, bias=b)  # noqa: E731
    else:
        fn = lambda xx: F.group_norm(xx, case.groups, w, b)  # noqa: E731
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)
    dy = t["dy"]
    return {"fwd": lambda: fn(x),
            "bwd": lambda: torch.autograd.grad(y, (xg,), dy, retain_graph=True)}


def host_overhead_us(fn, calls=2000):
    """Wall time per call with no synchronization (tiny input: launch-bound)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def max_rel_err(got, ref):
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(g - r), initial=0) / max(1.0, float(np.max(np.abs(r), initial=0))))


def main(argv=None):
    args = parse_args(argv)
    import cupy
    import normcore as nc
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    dtypes = args.dtype or (["float32"] if args.quick else ["float32", "float16", "float64"])
    repeats = args.repeats or (5 if args.quick else 15)
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    copy_gbs = copy_bandwidth(cupy, repeats)
    print(f"# {props['name'].decode()}  copy {copy_gbs:.0f} GB/s (read + write)"
          f"{'  torch ' + torch.__version__ if torch else '  (no torch CUDA)'}")
    print(f"{'case':16} {'dtype':8} {'op':8} {'us':>9} {'GB/s':>7} {'copy':>6} "
          f"{'torch us':>9} {'vs torch':>8} {'host us':>8}")
    rows = []
    for case in cs.select(cs.CASES, args.case or None, quick=args.quick):
        for dtype in dtypes:
            host = cs.make_inputs(case, dtype)
            dev_in = {k: cupy.asarray(v) for k, v in host.items()}
            ops = normcore_ops(nc, case, dtype, dev_in)
            ref_in = {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                      for k, v in host.items()}
            ref_ops = normcore_ops(nc, case, dtype, ref_in)
            tops = torch_ops(torch, case, dtype, dev_in) if torch else {}
            tiny = cs.make_inputs(case.resized(2, max(8, case.groups)), dtype)
            tiny_ops = normcore_ops(nc, case, dtype, {k: cupy.asarray(v) for k, v in tiny.items()})
            for op, fn in ops.items():
                got, ref = fn(), ref_ops[op]()
                err = max(max_rel_err(cupy.asnumpy(g), r) for g, r in zip(got, ref)
                          if g is not None and r is not None)
                if err > TOLERANCE[dtype]:
                    print(f"{case.name:16} {dtype:8} {op:8} WRONG: max rel err {err:.2e}")
                    continue
                t = gpu_time(fn, calls_per_sample(fn, cupy), repeats, cupy)
                gbs = cs.min_bytes(case.norm, op, host["x"].size, host["x"].itemsize) / t / 1e9
                tt = None
                if op in tops:
                    tfn = tops[op]
                    tt = gpu_time(tfn, calls_per_sample(tfn, cupy), repeats, cupy)
                host_us = host_overhead_us(tiny_ops[op])
                cupy.cuda.get_current_stream().synchronize()
                rows.append(dict(case=case.name, shape=case.shape, dtype=dtype, op=op,
                                 seconds=t, gbs=gbs, copy_fraction=gbs / copy_gbs,
                                 torch_seconds=tt, host_us=host_us, max_rel_err=err))
                print(f"{case.name:16} {dtype:8} {op:8} {t * 1e6:9.1f} {gbs:7.0f} "
                      f"{gbs / copy_gbs:6.2f} "
                      f"{(f'{tt * 1e6:9.1f}' if tt else '        -')} "
                      f"{(f'{tt / t:8.2f}' if tt else '       -')} {host_us:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(dict(device=props["name"].decode(), copy_gbs=copy_gbs,
                                             rows=rows), indent=1, default=str))


if __name__ == "__main__":
    main()

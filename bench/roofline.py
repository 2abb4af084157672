"""Where each case's time goes: the op on the case, against the same op with its arrays in cache.

    python bench/roofline.py                        # float32, every case issue 4 names
    python bench/roofline.py --case ln_,bn_2d --dtype float32,float64 --op bwd

For each case, op and dtype, normcore (with out= / dx_out= buffers) is timed on the case and
on the case with its leading axis cut so that x is IN_CACHE bytes or less. Rows, runs and
channels stay as they are, so the same kernels run on the same kind of view; the small case's
arrays stay in the L3 between calls, so its time per value is the kernels' arithmetic and cache
traffic alone, without memory's. The two are timed in the same interleaved rounds (bench/run.py's
`measure`), so that both see the machine in the same state (the speed of this shared machine
drifts by up to 2x between minutes); a sample of the in-cache case is 2 ms of back-to-back
calls, of which the first finds its arrays evicted by the case. GB/s counts cases.min_bytes
(as bench/run.py does); % copy is over the copy bandwidth measured just before each case.

Reading the table: an op that runs in cache at no more than the copy bandwidth cannot run at
the copy bandwidth from memory, however well its loads are scheduled; "in cache / time" is the
share of the case's time that the in-cache run of as many values takes (near 1: the time is
the arithmetic's, and only faster arithmetic makes it faster; well below 1: memory's).
Results in bench/results/roofline.json.

The in-cache rate is a lower bound on the arithmetic's speed, from both sides: a smaller x
pays more of the per-call cost (front end, parallel launch: LayerNorm (256, 1024) forward
0.23 ns per value against 0.17 on (1024, 1024)), a larger one spills out of the L3, which
this machine's other tenants share (--in-cache 0.5 / 1 / 4 MiB on (8192, 1024): LayerNorm
forward 29 / 35 / 36 GB/s in cache, BatchNorm 2-D 29 / 41 / 53). A kernel's own loop, timed
on one thread in the L2, is the sharper figure where one is needed.
"""
import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cases as cs  # noqa: E402
import peers as pr  # noqa: E402
import run  # noqa: E402

# x of the in-cache case: small enough that x, dy, dx and y (16 MiB at most) stay in the
# 32 MiB L3 of the 2-core AMD EPYC, large enough that the per-call overhead (5-10 us) is a
# few percent of its time
IN_CACHE = 4 << 20


def in_cache(case, itemsize, nbytes=IN_CACHE):
    """The case with its leading axis cut so that x holds `nbytes` or less."""
    numel = math.prod(case.shape)
    cut = max(1, math.ceil(numel * itemsize / nbytes))
    lead = max(1, case.shape[0] // cut)
    return replace(case, shape=(lead,) + tuple(case.shape[1:]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="", help="cases whose name contains one of these (comma)")
    p.add_argument("--op", default="", help="fwd, fwd_eval, bwd (comma; default all)")
    p.add_argument("--dtype", default="float32", help="float16, float32, float64 (comma)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--in-cache", type=float, default=IN_CACHE / 2**20,
                   help="MiB of x in the in-cache case")
    p.add_argument("--json", type=Path, default=HERE / "results" / "roofline.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    threads = run.set_threads()
    peer = pr.ApiPeer("normcore", pr._normcore, out=True)
    why = peer.unavailable()
    if why:
        raise SystemExit(f"normcore: {why}")
    cache_bytes = int(args.in_cache * 2**20)
    names = [s for s in args.case.split(",") if s]
    todo = [c for c in cs.select(cs.CASES, names) if names or c.named]
    # only cases whose float32 x is twice the in-cache size or more (not ln_tiny)
    todo = [c for c in todo if math.prod(c.shape) * 4 > 2 * cache_bytes]
    ops = [s for s in args.op.split(",") if s]
    info = {"machine": run.machine_info(threads), "argv": sys.argv[1:],
            "in_cache_bytes": cache_bytes, "results": []}
    print(f"{'case':<15} {'shape':<15} {'op':<8} {'dtype':<8} {'time':>9} {'GB/s':>6} "
          f"{'copy':>5} {'in-cache shape':<15} {'GB/s':>6} {'copy':>5} {'in cache / time':>15}")
    for case in todo:
        for dtype in args.dtype.split(","):
            itemsize = np.dtype(dtype).itemsize
            small = in_cache(case, itemsize, cache_bytes)
            big_in, small_in = cs.make_inputs(case, dtype), cs.make_inputs(small, dtype)
            for op in case.ops:
                if ops and op not in ops:
                    continue
                copy_gbps = run.copy_bandwidth(repeats=5)
                thunks = {"case": peer.prepare(case, op, big_in)[0],
                          "in_cache": peer.prepare(small, op, small_in)[0]}
                samples = run.measure(thunks, args.repeats, args.max_seconds)[0]
                t = {name: float(np.median(v)) for name, v in samples.items()}
                numel, numel_small = math.prod(case.shape), math.prod(small.shape)
                nbytes = cs.min_bytes(case.norm, op, numel, itemsize)
                gbps = nbytes / t["case"] / 1e9
                gbps_cache = cs.min_bytes(case.norm, op, numel_small, itemsize) \
                    / t["in_cache"] / 1e9
                share = t["in_cache"] * numel / numel_small / t["case"]
                rec = {"case": case.name, "shape": list(case.shape), "op": op, "dtype": dtype,
                       "median_s": t["case"], "gbps": gbps, "frac_copy": gbps / copy_gbps,
                       "in_cache_shape": list(small.shape), "in_cache_s": t["in_cache"],
                       "in_cache_gbps": gbps_cache, "in_cache_frac_copy": gbps_cache / copy_gbps,
                       "in_cache_share": share, "copy_gbps": copy_gbps}
                info["results"].append(rec)
                print(f"{case.name:<15} {'x'.join(map(str, case.shape)):<15} {op:<8} "
                      f"{dtype:<8} {run.fmt_time(t['case']):>9} {gbps:6.1f} "
                      f"{gbps / copy_gbps:5.0%} {'x'.join(map(str, small.shape)):<15} "
                      f"{gbps_cache:6.1f} {gbps_cache / copy_gbps:5.0%} {share:15.2f}",
                      flush=True)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1) + "\n")
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

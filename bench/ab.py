"""A/B: normcore at another commit against the working tree, in one process.

    python bench/ab.py HEAD~1                              # every case, float32
    python bench/ab.py 2a452bc --case ln_narrow,bn_2d_small --dtype float32,float64
    python bench/ab.py HEAD --norm layer --shape 2048x128 --op bwd --fresh
    python bench/ab.py HEAD --case ln_narrow --cold       # every call with empty caches

Both versions get the same inputs and are timed interleaved by bench/run.py's `measure`
(rounds rotate the order; rounds during which other processes held the CPU are dropped), with
`out=` / `dx_out=` buffers unless --fresh. Prints each version's median and old / new (> 1:
the working tree is faster). Timings on a shared machine swing between runs; a ratio measured
this way, side by side, is the figure to quote. The copy bandwidth measured before and after
(bench/run.py's reference) says which state of the machine the rounds met.

The old version is `git archive REV normcore kernels`, unpacked under ~/.cache/normcore-ab as
the package `normcore_<commit>`; its Numba cache stays there, so only the first run for a
commit compiles its kernels.
"""
import argparse
import importlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cases as cs  # noqa: E402
import peers as pr  # noqa: E402
import run  # noqa: E402

CACHE = Path.home() / ".cache" / "normcore-ab"


def old_normcore(rev):
    """normcore at `rev`, imported under another name."""
    root = HERE.parent
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    name = f"normcore_{sha[:12]}"
    where = CACHE / sha
    package = where / name
    if not package.exists():
        tar = subprocess.run(["git", "archive", sha, "normcore", "kernels"], cwd=root,
                             capture_output=True, check=True).stdout
        staging = where / "staging"
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(staging, **safe)
        (staging / "kernels").rename(staging / "normcore" / "kernels")  # as installed
        for path in (staging / "normcore").rglob("*.py"):
            text = path.read_text()
            # absolute imports of the package itself; strings naming modules stay as they are
            text = re.sub(r"^(\s*)(from|import) normcore\b", rf"\1\2 {name}", text, flags=re.M)
            path.write_text(text)
        (staging / "normcore").rename(package)
        staging.rmdir()
    sys.path.insert(0, str(where))
    return importlib.import_module(name), sha


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev", help="the commit to compare the working tree with (HEAD, HEAD~1, ...)")
    p.add_argument("--case", default="", help="cases whose name contains one of these (comma)")
    p.add_argument("--norm", choices=cs.NORMS, help="only this norm; with --shape, its norm")
    p.add_argument("--shape", help="a shape of your own instead of the cases, e.g. 2048x128")
    p.add_argument("--axis", type=int, help="with --shape: the channel / normalized axis")
    p.add_argument("--groups", type=int, default=32, help="with --shape and group: groups")
    p.add_argument("--op", default="", help="fwd, fwd_eval, bwd (comma; default all)")
    p.add_argument("--dtype", default="float32", help="float16, float32, float64 (comma)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--fresh", action="store_true", help="fresh outputs instead of out=")
    p.add_argument("--cold", action="store_true",
                   help="sweep the caches before every call (run.py --cold's CacheSweep)")
    return p.parse_args(argv)


def chosen_cases(args):
    if args.shape:
        if not args.norm:
            raise SystemExit("--shape needs --norm")
        shape = tuple(int(n) for n in args.shape.split("x"))
        axis = args.axis if args.axis is not None else (-1 if args.norm == "layer" else 1)
        return [cs.Case("custom", args.norm, shape, axis,
                        args.groups if args.norm == "group" else 0)]
    names = [s for s in args.case.split(",") if s]
    return cs.select(cs.CASES, names, [args.norm] if args.norm else None)


def main(argv=None):
    args = parse_args(argv)
    import numba
    numba.get_num_threads()     # the thread pool first (see run.set_threads)
    old, sha = old_normcore(args.rev)
    versions = [pr.ApiPeer("old", lambda: old, out=not args.fresh),
                pr.ApiPeer("new", pr._normcore, out=not args.fresh)]
    for v in versions:
        why = v.unavailable()
        if why:
            raise SystemExit(f"{v.name}: {why}")
    ops = [s for s in args.op.split(",") if s]
    sweep = run.CacheSweep() if args.cold else None
    print(f"# old: {sha[:12]} ({args.rev}); new: the working tree; "
          f"{'fresh outputs' if args.fresh else 'out= buffers'}; "
          f"{'caches swept before every call; ' if sweep else ''}medians of up to "
          f"{args.repeats} interleaved rounds")
    # the shared machine has run in two states, copies at ~40 and ~80 GB/s, and which one an
    # A/B met changes its ratios (memory-bound ops gain nothing from code in the slow one)
    print(f"# copy bandwidth before: {run.copy_bandwidth():.1f} GB/s", flush=True)
    for case in chosen_cases(args):
        for dtype in args.dtype.split(","):
            inputs = cs.make_inputs(case, dtype)
            for op in case.ops:
                if ops and op not in ops:
                    continue
                thunks = {v.name: v.prepare(case, op, inputs)[0] for v in versions}
                samples, _, _, _ = run.measure(thunks, args.repeats, args.max_seconds,
                                               before=sweep)
                t_old, t_new = (float(np.median(samples[n])) for n in ("old", "new"))
                print(f"{case.name:<15} {'x'.join(map(str, case.shape)):<16} {op:<8} {dtype:<8}"
                      f" old {run.fmt_time(t_old)}  new {run.fmt_time(t_new)}"
                      f"  x{t_old / t_new:5.2f}", flush=True)
    print(f"# copy bandwidth after: {run.copy_bandwidth():.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

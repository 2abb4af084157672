"""What a new install pays before its first result: each norm's first forward and backward call
in a fresh process with an empty Numba cache (JIT compilation of every kernel the call reaches),
then the same calls in a second fresh process on the cache the first one wrote (loading it).

    python bench/first_call.py [--case layer,batch_nchw,...] [--dtype float32] [--json PATH]
                            [--print]

Each case gets a cache directory of its own (NUMBA_CACHE_DIR), so its figures are those of a
user who calls that norm alone: kernels that several norms share count in each. Float32; the
shapes are small, as the kernels compiled do not depend on them beyond the path the plan takes
(bench/run.py's figures never include compilation). The backward is timed after the forward,
in the same process: what it compiles beyond the forward's kernels. Results:
``bench/results/first_call.json`` and a table written between <!-- first-call:start --> and
<!-- first-call:end --> in README.md; with --print, or with some of the cases only, the table is
printed and neither file is written (unless --json names one).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- first-call:start -->", "<!-- first-call:end -->"
# name: (norm, shape, description); the channel axis is 1 unless the name says channels-last
CASES = {
    "layer": ("layer", (256, 1024), "layer_norm (256, 1024)"),
    "layer_tiny": ("layer", (4, 64), "layer_norm (4, 64), the small-call path"),
    "batch_nchw": ("batch", (32, 64, 28, 28), "batch_norm (32, 64, 28, 28)"),
    "batch_nhwc": ("batch", (32, 28, 28, 64), "batch_norm channels-last (32, 28, 28, 64)"),
    "group": ("group", (32, 64, 28, 28), "group_norm (32, 64, 28, 28), 32 groups"),
    "instance": ("instance", (32, 64, 28, 28), "instance_norm (32, 64, 28, 28)"),
}


def _calls(name, dtype):
    """The case's forward and backward as thunks (the backward takes the forward's result)."""
    import numpy as np

    import normcore as nc
    norm, shape, _ = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    axis = -1 if name.endswith("nhwc") else 1
    C = shape[axis] if norm != "layer" else shape[-1]
    w, b = np.ones(C, dtype), np.zeros(C, dtype)
    if norm == "layer":
        fwd = lambda: nc.layer_norm_forward(x, w, b)   # noqa: E731
        bwd = lambda f: nc.layer_norm_backward(x, x, f.mean, f.rstd, w)  # noqa: E731
    elif norm == "batch":
        fwd = lambda: nc.batch_norm_forward(x, w, b, axis=axis)     # noqa: E731
        bwd = lambda f: nc.batch_norm_backward(x, x, f.mean, f.rstd, w, axis=axis)  # noqa: E731
    elif norm == "group":
        fwd = lambda: nc.group_norm_forward(x, 32, w, b)   # noqa: E731
        bwd = lambda f: nc.group_norm_backward(x, x, f.mean, f.rstd, 32, w)  # noqa: E731
    else:
        fwd = lambda: nc.instance_norm_forward(x, w, b)    # noqa: E731
        bwd = lambda f: nc.instance_norm_backward(x, x, f.mean, f.rstd, w)  # noqa: E731
    return fwd, bwd


def worker(name, dtype):
    """In a fresh process: seconds to import normcore, then for the first forward and the
    first backward call; one JSON line on stdout."""
    t = time.perf_counter()
    import normcore  # noqa: F401
    imported = time.perf_counter() - t
    fwd, bwd = _calls(name, dtype)
    t = time.perf_counter()
    f = fwd()
    forward = time.perf_counter() - t
    t = time.perf_counter()
    bwd(f)
    backward = time.perf_counter() - t
    print(json.dumps({"import_s": imported, "forward_s": forward, "backward_s": backward}))


def _run(name, dtype, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    done = subprocess.run([sys.executable, __file__, "--worker", name, "--dtype", dtype],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result):
    m = result["machine"]
    lines = [f"| first call ({result['dtype']}) | forward, compiling | backward, compiling (after "
             "the forward) | forward, from the cache | backward, from the cache |",
             "|---|--:|--:|--:|--:|"]
    for r in result["results"]:
        lines.append(f"| {r['case']} | {r['cold']['forward_s']:.1f} s | "
                     f"{r['cold']['backward_s']:.1f} s | {r['warm']['forward_s']:.2f} s | "
                     f"{r['warm']['backward_s']:.2f} s |")
    lines += ["", f"Each case in fresh processes on an empty cache of its own; {m['cpu']}, "
                  f"{m['logical_cpus']} cores, Python {m['versions']['python']}, Numba "
                  f"{m['versions']['numba']}, at {m['commit']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="results file (default: bench/results/first_call.json for "
                    "a run of every case)")
    ap.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.dtype)
    import numba

    from report import ROOT, update_readme
    from run import machine_info
    names = args.case.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"--case: unknown {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    every = set(names) == set(CASES)
    if args.json is None and every:
        args.json = str(RESULTS / "first_call.json")
    rows = []
    print(f"{'case':45s} {'cold fwd':>9s} {'cold bwd':>9s} {'warm fwd':>9s} {'warm bwd':>9s}")
    for name in names:
        with tempfile.TemporaryDirectory(prefix="normcore-first-call-") as cache:
            cold = _run(name, args.dtype, cache)
            warm = _run(name, args.dtype, cache)
        rows.append({"case": CASES[name][2], "name": name, "cold": cold, "warm": warm})
        print(f"{CASES[name][2]:45s} {cold['forward_s']:8.1f}s {cold['backward_s']:8.1f}s "
              f"{warm['forward_s']:8.2f}s {warm['backward_s']:8.2f}s", flush=True)
    result = {"machine": machine_info(numba.config.NUMBA_NUM_THREADS), "dtype": args.dtype,
              "results": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json}")
    table = markdown(result)
    if args.print or not every or not update_readme(table, ROOT / "README.md", START, END):
        print(table, end="")
    else:
        print(f"# updated {ROOT / 'README.md'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

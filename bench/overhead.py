"""Per-call cost of tiny calls, where the arithmetic is negligible: normcore against PyTorch's
own CPU ops (``native_*``, as autograd calls them; by their C++ bindings where torch has them,
see bench/peers.py: TorchPeer), and where normcore's time goes: the Numba kernels (their
compiled functions: argument unboxing and the work) against the rest, the Python front end
(validation, plan lookup, allocation, Numba's dispatch where a call goes through it).

    python bench/overhead.py [--rounds 21] [--json PATH] [--print]

Timed by bench/run.py's measure (samples of >= 2 ms, interleaved rounds in a rotated order,
rounds while other processes held the CPU dropped); medians of the per-call times. The
kernel-call share comes from replaying, in the same rounds, the compiled kernels' calls that
one call made, with the same arguments. Results: ``bench/results/overhead.json``, and a table
written between <!-- overhead:start --> and <!-- overhead:end --> in README.md (printed with
--print).
"""
import argparse
import json
import platform
import sys
from pathlib import Path

import numba
import numpy as np

import normcore as nc
from normcore import _small
from normcore.kernels import cpu as K
from peers import _Ops
from report import ROOT, update_readme
from run import measure

RESULTS = Path(__file__).resolve().parent / "results"
F32 = np.float32
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"


def _inputs(shape, C, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=F32)
    dy = rng.standard_normal(shape, dtype=F32)
    w, b = rng.random(C, dtype=F32) + 0.5, rng.random(C, dtype=F32)
    return x, dy, w, b


def cases(torch):
    """(name, normcore thunk, torch thunk or None)."""
    out = []
    x, dy, w, b = _inputs((4, 64), 64)
    f = nc.layer_norm_forward(x, w, b)
    m, r = f.mean, f.rstd
    out.append(("layer_norm (4, 64) forward", lambda: nc.layer_norm_forward(x, w, b), None))
    out.append(("layer_norm (4, 64) backward", lambda: nc.layer_norm_backward(dy, x, m, r, w),
                None))
    xb, dyb, wb, bb = _inputs((16, 64), 64, seed=1)
    rm, rv = np.zeros(64, F32), np.ones(64, F32)
    fb = nc.batch_norm_forward(xb, wb, bb)
    out.append(("batch_norm (16, 64) forward, training",
                lambda: nc.batch_norm_forward(xb, wb, bb, running_mean=rm, running_var=rv), None))
    out.append(("batch_norm (16, 64) forward, eval",
                lambda: nc.batch_norm_forward(xb, wb, bb, running_mean=rm, running_var=rv,
                                              training=False), None))
    out.append(("batch_norm (16, 64) backward",
                lambda: nc.batch_norm_backward(dyb, xb, fb.mean, fb.rstd, wb), None))
    if torch is None:
        return out
    aten = _Ops(torch)
    t = {k: torch.from_numpy(v) for k, v in dict(x=x, dy=dy, w=w, b=b, m=m.reshape(4, 1),
                                                   r=r.reshape(4, 1), xb=xb, dyb=dyb, wb=wb,
                                                   bb=bb, rm=rm.copy(), rv=rv.copy(),
                                                   mb=fb.mean, rb=fb.rstd).items()}
    mask = [True, True, True]
    peers = [
        lambda: aten.native_layer_norm(t["x"], [64], t["w"], t["b"], 1e-5),
        lambda: aten.native_layer_norm_backward(t["dy"], t["x"], [64], t["m"], t["r"], t["w"],
                                                t["b"], mask),
        lambda: aten.native_batch_norm(t["xb"], t["wb"], t["bb"], t["rm"], t["rv"], True, 0.1,
                                       1e-5),
        lambda: aten.native_batch_norm(t["xb"], t["wb"], t["bb"], t["rm"], t["rv"], False, 0.1,
                                       1e-5),
        lambda: aten.native_batch_norm_backward(t["dyb"], t["xb"], t["wb"], t["rm"], t["rv"],
                                                t["mb"], t["rb"], True, 1e-5, mask),
    ]
    return [(name, call, peer) for (name, call, _), peer in zip(out, peers)]


def kernel_calls(call):
    """A thunk replaying the kernel calls (parallel kernels and their serial twins, each
    compiled kernel of normcore.kernels.cpu.KERNELS) that one `call` makes, with the same
    arguments, each through its compiled function (normcore._small._entry_point): the
    kernel's argument unboxing and work, while Numba's dispatch (typing the arguments, which
    the small path's later calls skip) counts with the front end."""
    recorded = []
    saved = {name: getattr(K, name) for name in K.KERNELS}

    def recording(kernel):
        def record(*args):
            recorded.append((kernel, args))
            return kernel(*args)
        return record

    for name, kernel in saved.items():
        stand_in = recording(kernel)
        if hasattr(kernel, "serial"):
            stand_in.serial = recording(kernel.serial)
        setattr(K, name, stand_in)
    # the small-call path's signatures keep the kernels they call: made afresh under the
    # stand-ins, then again without them
    _small._signatures.clear()
    try:
        call()
    finally:
        for name, kernel in saved.items():
            setattr(K, name, kernel)
        _small._signatures.clear()

    compiled = [(_small._entry_point(kernel, args), args) for kernel, args in recorded]

    def replay():
        for kernel, args in compiled:
            kernel(*args)
    return replay


def markdown(result):
    m = result["machine"]
    lines = ["| call (float32) | normcore | kernel calls | front end | torch | ×torch |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in result["results"]:
        torch_cells = (f"{r['torch_us']:.1f} µs | {r['x_torch']:.2f}×" if r["torch_us"]
                       else "- | -")
        lines.append(f"| {r['call']} | {r['normcore_us']:.1f} µs | {r['kernels_us']:.1f} µs | "
                     f"{r['front_end_us']:.1f} µs | {torch_cells} |")
    lines += ["", f"Medians of up to {result['rounds']} interleaved rounds, samples of >= 2 ms; "
                  f"{m['threads']} threads, Python {m['python']}, NumPy {m['numpy']}, Numba "
                  f"{m['numba']}, torch {m['torch']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="per call, at least 3 rounds")
    ap.add_argument("--json", default=str(RESULTS / "overhead.json"))
    ap.add_argument("--print", action="store_true", help="leave README.md alone")
    args = ap.parse_args(argv)
    numba.get_num_threads()     # the thread pool first, as bench/run.py does
    try:
        import torch
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    except ImportError:
        torch = None
    rows = []
    print(f"{'call':40s} {'normcore':>9s} {'kernels':>8s} {'front end':>9s} {'torch':>8s} "
          f"{'×torch':>7s}")
    for name, call, peer in cases(torch):
        thunks = {"normcore": call, "kernels": kernel_calls(call)}
        if peer is not None:
            thunks["torch"] = peer
        samples = measure(thunks, args.rounds, args.max_seconds)[0]
        t = {k: float(np.median(v)) for k, v in samples.items()}
        row = {"call": name, "normcore_us": t["normcore"] * 1e6, "kernels_us": t["kernels"] * 1e6,
               "front_end_us": (t["normcore"] - t["kernels"]) * 1e6,
               "torch_us": t["torch"] * 1e6 if "torch" in t else None}
        row["x_torch"] = row["torch_us"] / row["normcore_us"] if peer is not None else None
        rows.append(row)
        torch_s = f"{row['torch_us']:7.2f}  {row['x_torch']:6.2f}×" if peer else "      -        -"
        print(f"{name:40s} {row['normcore_us']:7.2f}µs {row['kernels_us']:6.2f}µs "
              f"{row['front_end_us']:7.2f}µs {torch_s}")
    result = {"machine": {"python": sys.version.split()[0], "numpy": np.__version__,
                          "numba": numba.__version__, "cpu": platform.processor(),
                          "threads": numba.config.NUMBA_NUM_THREADS,
                          "torch": torch.__version__ if torch else None},
              "rounds": args.rounds, "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"# wrote {args.json}")
    if not args.print and update_readme(markdown(result), ROOT / "README.md", START, END):
        print(f"# updated {ROOT / 'README.md'}")


if __name__ == "__main__":
    main()

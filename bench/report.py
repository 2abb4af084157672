"""Make the README's performance table from a bench/run.py results file.

    python bench/report.py [bench/results/latest.json] [--keep bench/results/keep.json]
                           [--cold bench/results/cold.json] [--print]

The second file, when there (a run with --malloc keep), adds each peer's ratio measured
without page faults on fresh outputs; the third (a run with --cold) adds a table of its own,
every call starting with empty caches. Rewrites the text between <!-- bench:start --> and
<!-- bench:end --> in README.md when both markers are there, else (or with --print) prints
the table. Every number comes from the JSON files.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as cs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NOISY = 0.1  # rows measured while other processes used more of the CPU than this
# cases moving fewer bytes than this (ln_tiny) are about per-call cost, not bandwidth
PER_CALL = 1 << 20
OP_NAMES = {"fwd": "forward", "fwd_eval": "forward (eval)", "bwd": "backward"}


def fmt_time(s):
    if s is None:
        return "–"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}×"


def _groups(results):
    groups = {}
    for r in results:
        groups.setdefault((r["case"], r["op"], r["dtype"]), {})[r["impl"]] = r
    return groups


def _speedups(rows, ours, peers):
    """Each peer's median over normcore's (fresh outputs) in one group, None when missing."""
    mine = [rows[n] for n in ours if n in rows]
    return [mine[0]["speedup"].get(n) if mine else None for n in peers]


def device_table(results, kept=()):
    """One row per (case, op, dtype): normcore's times (fresh outputs, then out=), GB/s and
    % copy of its fastest variant, each peer's time, and each peer's time over normcore's
    (then the same ratio from the --malloc keep run `kept`, for the peers it has)."""
    ours = list(dict.fromkeys(r["impl"] for r in results if "speedup" in r))
    peers = list(dict.fromkeys(r["impl"] for r in results if "speedup" not in r))
    kept_groups = _groups(kept)
    kept_peers = [n for n in peers if any(r["impl"] == n for r in kept)]
    head = (["case", "shape", "op", "dtype"] + [f"`{n}`" for n in ours] + ["GB/s", "% copy"]
            + [f"`{n}`" for n in peers] + [f"×{n}" for n in peers]
            + [f"×{n} keep" for n in kept_peers])
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "--:|" * (len(head) - 4)]
    for key, rows in _groups(results).items():
        case, op, dtype = key
        mine = [rows[n] for n in ours if n in rows]
        best = min(mine, key=lambda r: r["median_s"]) if mine else None
        ratios = _speedups(rows, ours, peers)
        ratios += _speedups(kept_groups.get(key, {}), ours, kept_peers)
        invalid = " ⚠ invalid" if any(not r.get("valid", True) for r in rows.values()) else ""
        invalid += " †" if mine and mine[0]["other_load"] > NOISY else ""
        cells = ([case + invalid, "×".join(map(str, next(iter(rows.values()))["shape"])),
                  OP_NAMES[op], dtype]
                 + [fmt_time(rows[n]["median_s"] if n in rows else None) for n in ours]
                 + ([f"{best['gbps']:.1f}", f"{best['frac_copy']:.0%}"] if best else ["–", "–"])
                 + [fmt_time(rows[n]["median_s"] if n in rows else None) for n in peers]
                 + [fmt_ratio(x) for x in ratios])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(results, label):
    """Per peer and dtype: geomean of normcore's speedup (fresh outputs) and rows below 1.5x,
    over issue 4's named cases (its target), then over the others."""
    fresh = next((r["impl"] for r in results if "speedup" in r), None)
    ratios = {}
    for r in results:
        if r["impl"] == fresh:
            named = r["case"] in cs.NAMED
            for peer, x in r["speedup"].items():
                ratios.setdefault((named, peer, r["dtype"]), []).append(x)
    others = ", ".join(dict.fromkeys(r["case"] for r in results if r["case"] not in cs.NAMED))
    return [f"{label} ×{peer} {dtype}{'' if named else f' ({others}, beyond the issue)'}: "
            f"geomean {np.exp(np.mean(np.log(v))):.2f}, {sum(x < 1.5 for x in v)} of {len(v)} "
            f"below 1.5×"
            for (named, peer, dtype), v in sorted(ratios.items(), key=lambda kv: not kv[0][0])
            if peer != "numpy"]


def shortfalls(results, label, peer="torch", dtype="float32", target=1.5):
    """The named cases of `dtype` where normcore (fresh outputs) is below `target` x `peer`,
    each with the share of the copy bandwidth that `target` x the peer's speed takes (target x
    the peer's own % copy: above 100%, out of reach for any code that moves the minimum bytes
    at the copy bandwidth) and normcore's share (its faster variant, as in the table)."""
    out = []
    for (case, op, dt), rows in _groups(results).items():
        mine = [r for r in rows.values() if "speedup" in r]
        if dt != dtype or case not in cs.NAMED or peer not in rows or not mine:
            continue
        ratio = mine[0]["speedup"].get(peer)
        if ratio is None or ratio >= target:
            continue
        if rows[peer].get("bytes", PER_CALL) < PER_CALL:
            out.append(f"{case} {OP_NAMES[op]} {ratio:.2f}× (per-call cost)")
            continue
        need = target * rows[peer]["frac_copy"]
        best = min(mine, key=lambda r: r["median_s"])
        out.append(f"{case} {OP_NAMES[op]} {ratio:.2f}× (needs {need:.0%}, at "
                   f"{best['frac_copy']:.0%})")
    if not out:
        return []
    return [f"{label} below {target}×{peer} ({dtype}; the share of the copy bandwidth "
            f"{target}× {peer}'s speed needs, and normcore's): " + ", ".join(out)]


def copy_range(data):
    """How the run's per-case copy bandwidth varied (runs before per-case copies: nothing)."""
    spans = data.get("copy_gbps_range", {})
    if not spans:
        return ""
    text = ", ".join(f"{d} {lo:.1f}-{hi:.1f} GB/s" for d, (lo, hi) in spans.items())
    return (f" measured again just before each case (the machine's speed drifts within a run; "
            f"{text} over this one)")


def keep_note(keep):
    """What the ×peer keep columns are, from the --malloc keep run's own record."""
    command = " ".join(["python bench/run.py"] + keep["argv"])
    bandwidth = ", ".join(f"{g:.1f} GB/s" for g in keep["copy_gbps"].values())
    return (f"; ×peer keep is the same ratio from `{command}` (copy bandwidth {bandwidth}), "
            f"a run under GLIBC_TUNABLES={keep['machine'].get('glibc_tunables', '?')}, where "
            "glibc keeps what the process frees and no peer page-faults its fresh outputs: "
            "the kernels' and the calls' own speed.")


def cpu_text(m):
    """What tells the run's CPU from others of its model name (family / model, vector
    extension, per-core L1d / L2), where the run recorded them, ending in "; "; else ""."""
    d = m.get("cpu_details") or {}
    parts = [f"family {d['family']} model {d['model']}"] if d.get("family") else []
    parts += [d["vector"]] if d.get("vector") else []
    caches = [f"{name} {d[key]}" for key, name in (("l1d", "L1d"), ("l2", "L2")) if d.get(key)]
    parts += [" and ".join(caches) + " per core"] if caches else []
    return ", ".join(parts) + "; " if parts else ""


def cache_text(m):
    """The L3 where the run recorded it, else /proc/cpuinfo's "cache size" (L3 on Intel, the
    L2 of a core on AMD): the bench's 64 MiB cases fit in some machines' L3."""
    if m.get("l3"):
        return f"L3 {m['l3']}"
    return f"cache size {m['cache']} (/proc/cpuinfo)" if m.get("cache") else "cache not recorded"


def cold_section(cold):
    """The --cold run's table and summary: the memory-bound regime, on any L3."""
    m = cold["machine"]
    command = " ".join(["python bench/run.py"] + cold["argv"])
    bandwidth = ", ".join(f"{d} {g:.1f} GB/s" for d, g in cold["copy_gbps"].items())
    lines = [
        "", "**Memory-bound: caches swept before every call**", "",
        f"Measured with `{command}` at `{m['commit']}`, {m['date'][:10]} (copy bandwidth "
        f"{bandwidth}{copy_range(cold)}). Before every timed call of every peer, one thread "
        f"reads {cold['cold_sweep_bytes'] >> 20} MiB (at least twice the L3, {cache_text(m)}; "
        f"not timed), so that each call finds x, dy and its outputs in memory, as on a machine "
        f"whose L3 is smaller than the case. The table above is the other regime: there what "
        f"of a case's arrays fits in this machine's caches stays in them between calls, for "
        f"every peer alike.", ""]
    lines += device_table(cold["results"])
    lines += [""] + [line + "." for line in summary(cold["results"], "Caches swept:")
                     + shortfalls(cold["results"], "Caches swept:")]
    return lines


def markdown(data, keep=None, cold=None):
    m, v = data["machine"], data["machine"]["versions"]
    threads = ", ".join(f"{k} {n}" for k, n in m["threads"].items())
    bw = ", ".join(f"{d} {g:.1f} GB/s" for d, g in data["copy_gbps"].items())
    runtimes = ", ".join(f"`{Path(r).name}`" for r in m["openmp_runtimes"]) \
        if "openmp_runtimes" in m else "not recorded"
    lines = [
        f"Measured with `{' '.join(['python bench/run.py'] + data['argv'])}` "
        f"on {m['cpu']} ({cpu_text(m)}{m['usable_cpus']} cores; {cache_text(m)}; "
        f"threads: {threads}; OpenMP wait policy {m.get('omp_wait_policy', 'not recorded')}; "
        f"OpenMP runtimes: {runtimes}), "
        f"NumPy {v['numpy']}, Numba {v['numba']}, "
        f"PyTorch {v.get('torch', 'not installed')}, normcore {v.get('normcore', '?')} at "
        f"`{m['commit']}`, {m['date'][:10]}. Copy bandwidth (the fastest of np.copyto and "
        f"copies on all threads with plain and with non-temporal stores, between two 256 MiB "
        f"arrays, bytes read + written): {bw}.",
        "",
        "Times are medians over interleaved rounds; normcore is timed with fresh outputs and "
        "with `out=`/`dx_out=` buffers. GB/s counts the minimum bytes an op must move (E bytes "
        "per element: forward 2E, training BatchNorm forward 3E, backward 3E, training "
        "BatchNorm backward 5E), for normcore's faster variant; % copy is that over the copy "
        f"bandwidth{copy_range(data)}. ×peer is the peer's median time over normcore's with "
        "fresh outputs (> 1: normcore is faster)" + (keep_note(keep) if keep else "."),
    ]
    for device in data["copy_gbps"]:
        results = [r for r in data["results"] if r["device"] == device]
        if results:
            lines += ["", f"**{device.upper()}**" if len(data["copy_gbps"]) > 1 else ""]
            kept = [r for r in keep["results"] if r["device"] == device] if keep else []
            lines += device_table(results, kept)
    lines += [""] + [line + "." for line in summary(data["results"], "With glibc's defaults:")
                     + shortfalls(data["results"], "With glibc's defaults:")]
    if keep:
        lines += [line + "." for line in summary(keep["results"], "Keeping freed memory:")
                  + shortfalls(keep["results"], "Keeping freed memory:")]
    first = [f["first_call_s"] for f in data.get("first_calls", []) if f["impl"] == "normcore"]
    if first:
        lines += ["", f"First normcore call per case, op and dtype on a small array (JIT "
                      f"compile, or loading Numba's cache), not included above: median "
                      f"{np.median(first):.2f} s, max {max(first):.2f} s, "
                      f"total {sum(first):.1f} s."]
    noisy = [r for r in data["results"] if r["other_load"] > NOISY]
    if noisy:
        lines += ["", f"† measured while other processes used more than {NOISY:.0%} of the "
                      f"CPU (rounds that did were dropped for up to twice the time budget, "
                      f"then kept): on {m['usable_cpus']} cores this stalls parallel code, "
                      f"PyTorch's more than normcore's; {data['other_load']:.0%} over the "
                      f"whole run."]
    if cold:
        lines += cold_section(cold)
    return "\n".join(line for i, line in enumerate(lines)
                     if line or not (i and lines[i - 1] == "")) + "\n"


def update_readme(table, readme, start=START, end=END):
    """Replace the text between the markers; False when the markers are missing."""
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{start}\n{table}{end}", text, count=1))
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="?", type=Path,
                   default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--keep", type=Path, default=ROOT / "bench" / "results" / "keep.json",
                   help="results of a --malloc keep run, when the file is there")
    p.add_argument("--cold", type=Path, default=ROOT / "bench" / "results" / "cold.json",
                   help="results of a --cold run, when the file is there")
    p.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    args = p.parse_args(argv)
    path = args.json
    keep = json.loads(args.keep.read_text()) if args.keep.exists() else None
    cold = json.loads(args.cold.read_text()) if args.cold.exists() else None
    table = markdown(json.loads(path.read_text()), keep, cold)
    readme = ROOT / "README.md"
    if not args.print and update_readme(table, readme):
        print(f"updated {readme} from {path}")
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time normcore against its peers on the cases of bench/cases.py.

    python bench/run.py                       # every case, float32/float64/float16, 5-10 min
    python bench/run.py --quick               # fewer cases, float32, fewer repeats, < 1 min
    python bench/run.py --case ln_ --op fwd --dtype float32
    python bench/run.py --validate            # check every peer against NumPy, no timing
    python bench/run.py --malloc keep --impl normcore,torch   # no page faults for anyone

For each (case, dtype, op): every peer first runs once on a small version of the case and
is checked against the NumPy peer run in float64 (the first normcore call there, the JIT
compile or cache load, is reported on its own); then every peer is warmed up on the real
case and timed, round-robin over the peers within each repeat. A sample is the mean of
``number`` back-to-back calls, ``number`` chosen so that a sample lasts >= 2 ms.
GB/s is cases.min_bytes over the median; "copy" is that as a fraction of the bandwidth of a
copy between two 256 MiB arrays (bytes read + written; the fastest of np.copyto and copies on
all threads with plain and with streaming stores), measured in the same run.

Allocator: with glibc's defaults every allocation of 32 MiB or more is a fresh mapping, so a
peer returning fresh outputs pays a page fault per 4 KiB of them on every call (PyTorch's
LayerNorm (8192, 1024) forward: 14-16 ms, 3.0-3.4 ms without; normcore keeps its own freed
outputs, see normcore._outputs). ``--malloc keep`` re-runs this script with GLIBC_TUNABLES set
so that glibc keeps and reuses what the process frees: no peer pays those faults, and the
times compare the kernels and per-call work alone (results in bench/results/keep.json).

Caches: a case's arrays stay in the caches between calls when they fit, and the L3 differs
between this project's machines (32 MiB on an AMD EPYC, 480 MiB on an Intel Xeon, where the
64 MiB cases never leave it). ``--cold`` reads a buffer twice the L3's size, on one thread,
before every timed call (the read is not timed), so that every peer starts each call with x,
dy and the outputs in memory, not in cache: the memory-bound regime the % copy targets are
about, on any L3 (results in bench/results/cold.json; only cases whose x is COLD_MIN_BYTES or
more, the ones that are about bandwidth).
"""
import argparse
import collections
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as cs  # noqa: E402
import peers as pr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2}  # max |err| / max(1, max |ref|)
MIN_SAMPLE_S = 2e-3
# glibc keeps freed blocks below 1 GiB on its heap (and never trims below 4 GiB): see --malloc
# --cold: cases smaller than this (bn_2d_small, the 7 x 7 maps, ln_tiny) are about per-call
# and in-cache speed, and are left out; a sweep smaller than this cannot empty any L3 we use
COLD_MIN_BYTES = 8 << 20
COLD_SWEEP_MIN = 512 << 20
KEEP_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="cases marked quick, float32 only, 5 repeats (< 1 min)")
    p.add_argument("--validate", action="store_true",
                   help="only check each peer against the NumPy peer on small arrays")
    p.add_argument("--case", action="append", default=[],
                   help="keep cases whose name contains this (repeatable or comma-separated)")
    p.add_argument("--norm", action="append", default=[], choices=cs.NORMS)
    p.add_argument("--op", action="append", default=[], choices=cs.OPS)
    p.add_argument("--dtype", action="append", default=[],
                   choices=["float32", "float64", "float16"])
    p.add_argument("--impl", action="append", default=[],
                   help="keep peers whose name contains this (normcore, numpy, torch, ...; "
                        "repeatable or comma-separated)")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default 15, quick 5)")
    p.add_argument("--max-seconds", type=float,
                   help="stop adding rounds to a case after this long (default 2, quick 0.5)")
    p.add_argument("--wait-quiet", type=float,
                   help="seconds the run may spend, in all, waiting for other processes to go "
                        "idle before each case (at most 30 s at a time; default 60, quick 5)")
    p.add_argument("--malloc", choices=["default", "keep"], default="default",
                   help="keep: run under GLIBC_TUNABLES=" + KEEP_TUNABLES + " (no page faults on "
                        "fresh outputs for any peer; default results file keep.json)")
    p.add_argument("--cold", action="store_true",
                   help="sweep the caches before every timed call (cases whose x is 8 MiB or "
                        "more; default results file cold.json)")
    p.add_argument("--json", type=Path,
                   help="results file (default bench/results/latest.json; quick.json with "
                        "--quick, keep.json with --malloc keep, cold.json with --cold)")
    a = p.parse_args(argv)
    a.case = [s for c in a.case for s in c.split(",") if s]
    a.impl = [s for c in a.impl for s in c.split(",") if s]
    a.dtype = a.dtype or (["float32"] if a.quick else ["float32", "float64", "float16"])
    a.repeats = a.repeats or (5 if a.quick else 15)
    # a cold round spends ~60 ms per call on the sweep here: more time for the same rounds
    a.max_seconds = a.max_seconds or (0.5 if a.quick else 6.0 if a.cold else 2.0)
    a.wait_quiet = (5.0 if a.quick else 60.0) if a.wait_quiet is None else a.wait_quiet
    a.json = a.json or RESULTS / ("quick.json" if a.quick else "cold.json" if a.cold else
                                  "keep.json" if a.malloc == "keep" else "latest.json")
    return a


# ----------------------------------------------------------------------------- machine

def source_commit(where):
    """The commit measured, with "-dirty" when tracked files other than the results and the
    README (which a run's earlier steps rewrite) differ from it; "" outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=where).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # paths from the top of the checkout: run.py asks from bench/
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                      ":(top,exclude)bench/results", ":(top,exclude)README.md")
    except OSError:
        return ""
    return commit + "-dirty" if commit and changed else commit


def cpuinfo(text):
    """The first processor's fields of /proc/cpuinfo's text."""
    cpu = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break
        cpu.setdefault(key.strip(), value.strip())
    return cpu


def cpu_details(cpu):
    """What tells this machine's CPU from others of the same model name ("AMD EPYC" has named
    Zen 1, Zen 3 and Zen 4 VMs here, whose tables differ): family and model, the widest
    vector extension, and the per-core L1d and L2 (sysfs)."""
    flags = cpu.get("flags", "").split()
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                           ("avx", "AVX")) if flag in flags), None)
    return {"family": cpu.get("cpu family"), "model": cpu.get("model"), "vector": vector,
            "l1d": cache_size(1, "Data"), "l2": cache_size(2)}


def machine_info(threads):
    try:
        cpu = cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = {}
    import numba
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "numba": numba.__version__}
    for name in ("torch", "normcore", "cupy"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    commit = source_commit(Path(__file__).parent)
    return {"cpu": cpu.get("model name", platform.processor()), "cache": cpu.get("cache size"),
            "cpu_details": cpu_details(cpu), "l3": l3_size(),
            "openmp_runtimes": openmp_runtimes(),
            "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "platform": platform.platform(), "versions": versions,
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cache_size(level, kind="Unified"):
    """The size of cpu0's cache of this level and type (Data, Instruction, Unified) as sysfs
    gives it ("491520K"), or None."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if ((index / "level").read_text().strip() == str(level)
                    and (index / "type").read_text().strip() == kind):
                return (index / "size").read_text().strip()
        except OSError:
            pass
    return None


def l3_size():
    """The L3's size ("491520K"), or None: the 64 MiB cases stream from memory on a 32 MiB L3
    and partly from cache on a 480 MiB one."""
    return cache_size(3)


def l3_bytes():
    """l3_size() in bytes, or None."""
    size = l3_size()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (TypeError, ValueError, IndexError):
        return None


class CacheSweep:
    """Empties the caches of what the last call left there: a read of a buffer twice the L3's
    size (COLD_SWEEP_MIN at least). One thread and NumPy: a sweep on Numba's thread pool
    would leave its threads spinning into the next peer's call (torch's, say), and a read
    leaves nothing dirty behind. Measured on the 480 MiB Xeon, LayerNorm (65536, 128) forward
    into out=: 1.7 ms back to back, 3.1 ms after a 512 MiB read, 3.3 ms after 960 MiB or
    1920 MiB reads (58 / 121 ms each), 3.0 ms after the 256 MiB copy on all threads."""

    def __init__(self, l3=None):
        self.nbytes = self.size(l3 or l3_bytes())
        self.buffer = np.ones(self.nbytes // 8)

    @staticmethod
    def size(l3):
        """Bytes to read for an L3 of `l3` bytes (None: unknown)."""
        return max(2 * (l3 or 0), COLD_SWEEP_MIN)

    def __call__(self):
        self.buffer.sum()


def openmp_runtimes():
    """The OpenMP runtimes mapped into this process (Linux). Numba's omp layer links
    libgomp.so.1.0.0 by file name and torch's wheel bundles its own libgomp.so.1: with torch
    imported first, both load, and two pools of spinning threads share the cores."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "libgomp" in line or "libiomp" in line})
    except OSError:
        return []


def set_threads():
    """Give torch numba's thread count; return both. numba's thread pool starts first, so that
    torch, imported after it, uses the same libgomp (see openmp_runtimes)."""
    import numba
    threads = {"numba": numba.get_num_threads()}
    try:
        import torch
        torch.set_num_threads(threads["numba"])
        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return threads


def _streaming_store():
    """An intrinsic dst[i:i + 8] = src[i:i + 8] (float64, i a multiple of 8, dst 64-byte
    aligned at i) with non-temporal stores: a whole cache line, no read-for-ownership."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def stream_line(typingctx, dst, src, i):
        def codegen(context, builder, signature, args):
            vec = ir.VectorType(ir.DoubleType(), 4).as_pointer()
            arrty = signature.args[0]
            d = context.make_array(arrty)(context, builder, args[0])
            s = context.make_array(arrty)(context, builder, args[1])
            meta = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
            for half in (0, 4):
                j = builder.add(args[2], ir.Constant(args[2].type, half))
                sp = cgutils.get_item_pointer(context, builder, arrty, s, [j], wraparound=False)
                dp = cgutils.get_item_pointer(context, builder, arrty, d, [j], wraparound=False)
                value = builder.load(builder.bitcast(sp, vec), align=8)
                builder.store(value, builder.bitcast(dp, vec), align=32).set_metadata(
                    "nontemporal", meta)
            return context.get_dummy_value()

        return types.none(dst, src, i), codegen

    return stream_line


def _parallel_copies():
    """Copies on all of Numba's threads: np.copyto uses one core, and one core does not
    saturate this machine's memory (measured ~17 GB/s against ~25 GB/s with two); with plain
    stores, and with non-temporal stores (~36-42 GB/s here: the destination is never read)."""
    import numba

    @numba.njit(parallel=True)
    def copy(dst, src, chunks):
        n = src.size
        for k in numba.prange(chunks):
            s = src[k * n // chunks:(k + 1) * n // chunks]
            d = dst[k * n // chunks:(k + 1) * n // chunks]
            for i in range(s.size):
                d[i] = s[i]

    stream_line = _streaming_store()

    @numba.njit(parallel=True)
    def stream_copy(dst, src, chunks):
        # chunks of whole 64-byte lines; dst's first line starts where dst does
        head = (64 - dst.ctypes.data % 64) % 64 // 8
        dst[:head] = src[:head]
        lines = (src.size - head) // 8
        for k in numba.prange(chunks):
            for line in range(k * lines // chunks, (k + 1) * lines // chunks):
                stream_line(dst, src, head + 8 * line)
        dst[head + 8 * lines:] = src[head + 8 * lines:]

    return [lambda dst, src: copy(dst, src, 64), lambda dst, src: stream_copy(dst, src, 64)]


def copy_bandwidth(xp=np, sync=lambda: None, nbytes=256 << 20, repeats=11):
    """Median GB/s of a copy between two preallocated arrays, counting read + write: the
    fastest of xp.copyto and, on the CPU, copies on all threads with plain and streaming
    stores."""
    src, dst = xp.ones(nbytes // 8), xp.zeros(nbytes // 8)
    copies = [xp.copyto] + (_parallel_copies() if xp is np else [])
    best = 0.0
    for copy in copies:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            copy(dst, src)
            sync()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * nbytes / float(np.median(times[1:])) / 1e9)
    return best


class OtherLoad:
    """Fraction of the machine's CPU time that other processes used while this one ran:
    with 2 cores, another busy process stalls every parallel region (numba's and torch's
    threads wait for the one that lost its core), so timings with a load > ~0.05 are suspect."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now():
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def fraction(self):
        (w0, b0, o0), (w1, b1, o1) = self.start, self._now()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / ((w1 - w0) * os.cpu_count()))


def wait_for_quiet(max_wait, threshold=0.05, window=0.25):
    """Sleep until other processes use < threshold of the CPU over a window (at most
    max_wait seconds); returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait - window:
        load = OtherLoad()
        time.sleep(window)
        if load.fraction() < threshold:
            break
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- validate

def reference(case, op, inputs):
    """The NumPy peer's outputs in float64, on float64 copies of the inputs."""
    wide = {k: v.astype(np.float64) for k, v in inputs.items()}
    pr.NUMPY.unavailable()  # loads it; it is always available
    call, outputs = pr.NUMPY.prepare(case, op, wide)
    return outputs(call())


def compare(got, ref, dtype):
    """(max scaled error, names compared, failure or None)."""
    err, names = 0.0, []
    for name, r in ref.items():
        if name not in got:
            continue
        g = np.asarray(got[name], dtype=np.float64)
        if g.size != r.size:
            return err, names, f"{name}: {g.size} values, expected {r.size}"
        g = g.reshape(r.shape)
        if not np.array_equal(np.isnan(g), np.isnan(r)):
            return err, names, f"{name}: NaNs where the reference has none"
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        err = max(err, float(np.max(np.abs(g - r), initial=0.0)) / scale)
        names.append(name)
    if not {"y", "dx"} & set(names):
        return err, names, "neither y nor dx was returned"
    if err > TOLERANCE[dtype]:
        return err, names, f"error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    return err, names, None


def validate(peers, case, op, dtype):
    """Run each peer once on a small version of the case: records with the check and the
    first call's time (for normcore, the JIT compile or the cache load)."""
    small = case.resized(cap_other=7, cap_channel=100 if case.norm == "layer" else 64)
    inputs = cs.make_inputs(small, dtype, seed=1)
    ref = reference(small, op, inputs)
    records = []
    for p in peers:
        rec = {"impl": p.name, "shape": list(small.shape), "normcore": p.is_normcore}
        try:
            call, outputs = p.prepare(small, op, inputs)
            t0 = time.perf_counter()
            result = call()
            rec["first_call_s"] = time.perf_counter() - t0
            rec["error"], rec["compared"], rec["failure"] = compare(outputs(result), ref, dtype)
        except Exception as e:  # noqa: BLE001 -- a peer that raises is reported, not fatal
            rec["exception"] = f"{type(e).__name__}: {e}"
        records.append(rec)
    return records


def unsupported_float16(rec, dtype):
    """normcore refusing float16 with a TypeError: a skip, not a failure."""
    return (dtype == "float16" and rec["normcore"]
            and rec.get("exception", "").startswith("TypeError"))


# ----------------------------------------------------------------------------- timing

def measure(thunks, repeats, max_seconds, busy=0.1, before=None):
    """Per-call seconds of each sample, interleaved over the thunks: each round times every
    thunk once, in a rotated order. A round during which other processes used more than
    ``busy`` of the CPU is dropped (until 2 * max_seconds have passed): on a shared 2-core
    machine one busy process stalls every parallel region. ``before``, when given, runs
    before every call, untimed (a CacheSweep), and a sample is then one call."""
    numbers = {}
    for name, f in thunks.items():
        f()  # warm-up: caches, page faults, lazy initialisation
        t0 = time.perf_counter()
        f()
        numbers[name] = 1 if before else max(
            1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    names, samples, loads, dropped = list(thunks), {name: [] for name in thunks}, [], 0
    start = time.perf_counter()
    gc.disable()
    try:
        while len(loads) < repeats:
            elapsed = time.perf_counter() - start
            if len(loads) >= 3 and elapsed > max_seconds:
                break
            k = (len(loads) + dropped) % len(names)
            load, times = OtherLoad(), {}
            for name in names[k:] + names[:k]:
                f, n = thunks[name], numbers[name]
                if before:
                    before()
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                times[name] = (time.perf_counter() - t0) / n
            other = load.fraction()
            if other > busy and elapsed < 2 * max_seconds:
                dropped += 1
                continue
            loads.append(other)
            for name, t in times.items():
                samples[name].append(t)
    finally:
        gc.enable()
    return samples, numbers, float(np.mean(loads)), dropped


def time_combo(peers, case, op, dtype, args, copy_gbps):
    inputs = cs.make_inputs(case, dtype)
    thunks, skipped = {}, []
    for p in peers:
        try:
            thunks[p.name], _ = p.prepare(case, op, inputs)
        except Exception as e:  # noqa: BLE001
            skipped.append({"impl": p.name, "reason": f"{type(e).__name__}: {e}"})
    if not thunks:
        return [], skipped
    waited = wait_for_quiet(min(30.0, args.wait_quiet))
    args.wait_quiet -= waited
    samples, numbers, other_load, dropped = measure(thunks, args.repeats, args.max_seconds,
                                                    before=args.sweep)
    nbytes = cs.min_bytes(case.norm, op, inputs["x"].size, inputs["x"].itemsize)
    rows = []
    for p in peers:
        if p.name not in samples:
            continue
        s = samples[p.name]
        median = float(np.median(s))
        rows.append({
            "case": case.name, "norm": case.norm, "shape": list(case.shape), "axis": case.axis,
            "groups": case.groups, "op": op, "dtype": dtype, "impl": p.name, "device": p.device,
            "median_s": median, "min_s": min(s), "max_s": max(s), "samples": len(s),
            "number": numbers[p.name], "bytes": nbytes, "gbps": nbytes / median / 1e9,
            "frac_copy": nbytes / median / 1e9 / copy_gbps[p.device],
            "copy_gbps": copy_gbps[p.device], "other_load": other_load,
            "dropped_rounds": dropped, "waited_s": waited,
        })
    ours = {p.name for p in peers if p.is_normcore}
    for row in rows:  # normcore's speedup over each peer on the same device
        if row["impl"] in ours:
            row["speedup"] = {o["impl"]: o["median_s"] / row["median_s"] for o in rows
                              if o["impl"] not in ours and o["device"] == row["device"]}
    return rows, skipped


# ----------------------------------------------------------------------------- output

def fmt_time(s):
    return f"{s * 1e6:8.1f} us" if s < 1e-3 else f"{s * 1e3:8.2f} ms"


HEADER = (f"{'case':<15} {'shape':<18} {'op':<8} {'dtype':<7} {'impl':<14} {'median':>11} "
          f"{'min':>11} {'max':>11} {'GB/s':>6} {'copy':>5}  speedup")


def fmt_row(r):
    speed = " ".join(f"{k} x{v:.2f}" for k, v in r.get("speedup", {}).items())
    flag = "" if r.get("valid", True) else "  INVALID"
    flag += f"  (other load {r['other_load']:.0%})" if r["other_load"] > 0.05 else ""
    shape = "x".join(map(str, r["shape"]))
    return (f"{r['case']:<15} {shape:<18} {r['op']:<8} {r['dtype']:<7} {r['impl']:<14} "
            f"{fmt_time(r['median_s'])} {fmt_time(r['min_s'])} {fmt_time(r['max_s'])} "
            f"{r['gbps']:6.1f} {r['frac_copy']:5.0%}  {speed}{flag}")


def cold_cases(chosen, dtypes):
    """(cases --cold times, names of those it leaves out): x under COLD_MIN_BYTES in the
    narrowest of `dtypes`."""
    itemsize = min(np.dtype(d).itemsize for d in dtypes)
    small = [c.name for c in chosen if np.prod(c.shape) * itemsize < COLD_MIN_BYTES]
    return [c for c in chosen if c.name not in small], small


def validate_only(peers, todo):
    failures = skips = 0
    for case, dtype, op in todo:
        for rec in validate(peers, case, op, dtype):
            if unsupported_float16(rec, dtype):
                skips += 1
                continue
            bad = rec.get("failure") or rec.get("exception")
            failures += bool(bad)
            print(f"{case.name:<15} {op:<8} {dtype:<7} {rec['impl']:<14} "
                  f"{'FAIL' if bad else 'ok':<4} {rec.get('error', float('nan')):9.2e}  "
                  f"{bad or ','.join(rec['compared'])}")
    if skips:
        print(f"# {skips} skipped: normcore raises TypeError for float16")
    print(f"# {failures} failure(s)")
    return 1 if failures else 0


def keep_memory(argv):
    """Re-execute this script with KEEP_TUNABLES (glibc reads them only at process start)."""
    if os.environ.get("GLIBC_TUNABLES") == KEEP_TUNABLES:
        return
    env = dict(os.environ, GLIBC_TUNABLES=KEEP_TUNABLES)
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def main(argv=None):
    args = parse_args(argv)
    if args.malloc == "keep":
        keep_memory(argv)
    threads = set_threads()
    peers = []
    for p in pr.PEERS:
        if args.impl and not any(s in p.name for s in args.impl):
            continue
        why = p.unavailable()
        if why:
            print(f"# {p.name}: unavailable ({why})")
        else:
            peers.append(p)
    chosen = cs.select(cs.CASES, args.case, args.norm, args.quick)
    args.sweep = None
    if args.cold:
        chosen, small = cold_cases(chosen, args.dtype)
        if small:
            print(f"# --cold leaves out {', '.join(small)}: x under {COLD_MIN_BYTES >> 20} MiB")
        if not args.validate:
            args.sweep = CacheSweep()
    todo = [(c, d, op) for c in chosen
            for d in args.dtype for op in c.ops if not args.op or op in args.op]
    info = {"machine": machine_info(threads), "argv": sys.argv[1:], "repeats": args.repeats,
            "peers": [p.name for p in peers],
            "cold_sweep_bytes": args.sweep.nbytes if args.sweep else 0}

    if args.validate:
        return validate_only(peers, todo)
    wait_for_quiet(min(30.0, args.wait_quiet))
    copy_gbps = {"cpu": copy_bandwidth()}
    if any(p.device == "cuda" for p in peers):
        import cupy
        copy_gbps["cuda"] = copy_bandwidth(cupy, cupy.cuda.get_current_stream().synchronize)
    info["copy_gbps"] = copy_gbps
    print(f"# {info['machine']['cpu']}, threads {threads}, copy bandwidth "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in copy_gbps.items())
          + (f"; caches swept ({args.sweep.nbytes >> 20} MiB read) before every call"
             if args.sweep else ""))
    print(HEADER)
    results, first_calls, skipped = [], [], []
    t_start, load = time.perf_counter(), OtherLoad()
    # the machine's speed drifts within a run (copy 37-45 GB/s minutes apart here), so each
    # case's % copy is over a copy measured just before it; the run's first copy stays the
    # headline figure, the range is recorded. Not inside the case's rounds: a copy there sweeps
    # the caches for whichever peer follows it, and on a 480 MiB L3, which holds a case's
    # arrays between calls, a rotation of normcore, torch and the copy left normcore cold in 2
    # of 3 rounds and torch in 1 of 3 (BatchNorm / InstanceNorm eval forwards: x torch
    # 1.09-1.34 without the copy in the rounds, 1.26-1.42 with it, in one process).
    copies = {"cpu": [copy_gbps["cpu"]]}
    last_case = None
    for case, dtype, op in todo:
        where = {"case": case.name, "op": op, "dtype": dtype}
        if case.name != last_case and last_case is not None:
            copies["cpu"].append(copy_bandwidth(repeats=5))
        last_case = case.name
        here = {**copy_gbps, "cpu": copies["cpu"][-1]}
        records = validate(peers, case, op, dtype)
        timed, invalid = [], set()
        for rec in records:
            exc = rec.get("exception")
            if rec["normcore"] and "first_call_s" in rec:
                first_calls.append({**where, "impl": rec["impl"], "shape": rec["shape"],
                                    "first_call_s": rec["first_call_s"]})
            if exc:
                skipped.append({**where, "impl": rec["impl"], "reason": exc})
                continue
            if rec["failure"]:
                invalid.add(rec["impl"])
                print(f"# {rec['impl']} {case.name} {op} {dtype}: INVALID ({rec['failure']})")
            timed.append(next(p for p in peers if p.name == rec["impl"]))
        if any(unsupported_float16(rec, dtype) for rec in records):
            continue  # nothing to compare normcore with
        rows, skips = time_combo(timed, case, op, dtype, args, here)
        skipped += [{**where, **s} for s in skips]
        for row in rows:
            row["valid"] = row["impl"] not in invalid
            print(fmt_row(row), flush=True)
        results += rows
    info["copy_gbps_range"] = {d: [min(v), max(v)] for d, v in copies.items()}
    info.update(results=results, first_calls=first_calls, skipped=skipped,
                wall_s=time.perf_counter() - t_start, other_load=load.fraction())

    if first_calls:
        print("\n# first normcore call per case/op/dtype on a small array (JIT compile or "
              "cache load; normcore[out] in the JSON)")
        for f in first_calls:
            if f["impl"] == "normcore":
                print(f"{f['case']:<15} {f['op']:<8} {f['dtype']:<7} {f['first_call_s']:8.3f} s")
    reasons = collections.Counter((s["impl"], s["reason"]) for s in skipped)
    for (impl, reason), n in reasons.items():
        print(f"# skipped {impl} {n}x: {reason}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1) + "\n")
    print(f"# wrote {args.json} ({info['wall_s']:.0f} s; other processes used "
          f"{info['other_load']:.0%} of the CPU meanwhile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why long LayerNorm rows stream slower per byte than rows of 1024: a probe of the streamed
forward's loop alone, outside normcore's kernels, on 64 MiB of float32.

    python bench/probe_rows.py [--rows 1024,4096] [--variants row,w1024,w16,pairs] [--rounds 21]

Two threads each take half of the rows. Per row: its sum and sum of squares (registers, read
from the L2 where the last row's loop prefetched it), then y = (x * a + c) * w + b one window
of 16 values at a time with non-temporal stores, each window prefetching x one row on into the
L2 (prefetcht1), as normcore's seamed rows do (kernels/cpu.py: _seamed_row, row_windows_l2).
Variants:

    row     a row at a time, w and b of the row's length
    w1024   the same with w and b indexed modulo 1024 (their L1 footprint of rows of 1024)
    w16     modulo 16 (no w / b traffic to speak of)
    pairs   two rows' statistics, then their windows in strips of 512 values, the first row's
            strip and then the second's (kernels/cpu.py: _seamed_pair), prefetching two rows on

Prints each (variant, row length)'s median over interleaved rounds in one process. On the
2-core AMD EPYC Zen 4 of session 37, four runs: row's rows of 4096 took 1.25-1.33x as long as
its rows of 1024; w1024's rows of 4096 0.88-1.15x as long as row's rows of 1024; pairs ran rows
of 4096 1.08-1.16x faster than row. The y it writes is not checked: the probe times memory
traffic, not normcore's arithmetic.
"""
import argparse
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
STRIP = 512
TOTAL = 16 << 20        # float32 values: 64 MiB, twice the L3 of the machines measured


def _vector_ptr(context, builder, arrty, arr, index, vec):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [index], inbounds=True), vec.as_pointer())


def _window_loop(stats, wmod=0):
    """An intrinsic (y, x, s, n, w, b, a, c, acc, ahead) over the n windows from x's flat
    index s: with `stats`, acc[:16] += x, acc[16:] += x * x; else y = (x * a + c) * w + b
    (w, b from index 0, modulo `wmod` when set) with a non-temporal store, prefetching x
    `ahead` values on into the L2."""

    @intrinsic
    def loop(typingctx, y, x, s, n, w, b, a, c, acc, ahead):
        def codegen(context, builder, sig, args):
            y_, x_, s_, n_, w_, b_, a_, c_, acc_, ahead_ = args
            ty = sig.args
            vec = ir.VectorType(ir.FloatType(), LANES)
            i64, i32 = ir.IntType(64), ir.IntType(32)

            def splat(v):
                u = ir.Constant(vec, None)
                for lane in range(LANES):
                    u = builder.insert_element(u, v, ir.Constant(i32, lane))
                return u

            av, cv = splat(a_), splat(c_)
            sums = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
            squares = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
            i8p = ir.IntType(8).as_pointer()
            fetch = builder.module.declare_intrinsic(
                "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
            with cgutils.for_range(builder, n_) as it:
                off = builder.mul(it.index, ir.Constant(i64, LANES))
                i = builder.add(s_, off)
                v = builder.load(_vector_ptr(context, builder, ty[1], x_, i, vec), align=4)
                if stats:
                    builder.store(builder.fadd(builder.load(sums), v), sums)
                    builder.store(builder.fadd(builder.load(squares), builder.fmul(v, v)),
                                  squares)
                else:
                    p = _vector_ptr(context, builder, ty[1], x_, builder.add(i, ahead_), vec)
                    builder.call(fetch, [builder.bitcast(p, i8p), ir.Constant(i32, 0),
                                         ir.Constant(i32, 2), ir.Constant(i32, 1)])
                    k = builder.and_(off, ir.Constant(i64, wmod - 1)) if wmod else off
                    wv = builder.load(_vector_ptr(context, builder, ty[4], w_, k, vec), align=4)
                    bv = builder.load(_vector_ptr(context, builder, ty[5], b_, k, vec), align=4)
                    out = builder.fadd(builder.fmul(builder.fadd(builder.fmul(v, av), cv), wv),
                                       bv)
                    store = builder.store(out, _vector_ptr(context, builder, ty[0], y_, i, vec),
                                          align=64)
                    store.set_metadata("nontemporal", builder.module.add_metadata(
                        [ir.Constant(i32, 1)]))
            if stats:
                for k, total in enumerate((sums, squares)):
                    builder.store(builder.load(total), _vector_ptr(
                        context, builder, ty[8], acc_, ir.Constant(i64, k * LANES), vec), align=4)
            return context.get_dummy_value()

        return types.void(y, x, s, n, w, b, a, c, acc, ahead), codegen

    return loop


row_stats = _window_loop(True)
_normalize = _window_loop(False)
NORMALIZE = {"row": _normalize, "pairs": _normalize,
             "w1024": _window_loop(False, 1024), "w16": _window_loop(False, LANES)}


@njit(boundscheck=False)
def _coefficients(y, x, w, b, s, L, acc):
    """(a, c): y = x * a + c normalizes the row of L values at s."""
    row_stats(y, x, s, L // LANES, w, b, np.float32(1), np.float32(0), acc, 0)
    total = 0.0
    squares = 0.0
    for lane in range(LANES):
        total += acc[lane]
        squares += acc[LANES + lane]
    mean = total / L
    rstd = 1.0 / np.sqrt(max(squares / L - mean * mean, 0.0) + 1e-5)
    return np.float32(rstd), np.float32(-mean * rstd)


def _rows_kernel(normalize):
    @njit(boundscheck=False)
    def rows(y, x, w, b, L, r0, r1, acc):
        for r in range(r0, r1):
            a, c = _coefficients(y, x, w, b, r * L, L, acc)
            normalize(y, x, r * L, L // LANES, w, b, a, c, acc, L)
    return rows


def _pairs_kernel(normalize):
    @njit(boundscheck=False)
    def pairs(y, x, w, b, L, r0, r1, acc):
        for r in range(r0, r1 - 1, 2):
            a0, c0 = _coefficients(y, x, w, b, r * L, L, acc)
            a1, c1 = _coefficients(y, x, w, b, (r + 1) * L, L, acc)
            for j in range(0, L, STRIP):
                n = min(STRIP, L - j) // LANES
                normalize(y, x, r * L + j, n, w[j:], b[j:], a0, c0, acc, 2 * L)
                normalize(y, x, (r + 1) * L + j, n, w[j:], b[j:], a1, c1, acc, 2 * L)
    return pairs


def _parallel(body):
    @njit(parallel=True)
    def run(y, x, w, b, L):
        R = x.size // L
        for t in prange(2):
            body(y, x, w, b, L, t * R // 2, (t + 1) * R // 2, np.empty(2 * LANES, np.float32))
    return run


KERNELS = {name: _parallel(_pairs_kernel(f) if name == "pairs" else _rows_kernel(f))
           for name, f in NORMALIZE.items()}


def _aligned(n, align=1 << 21):
    raw = np.empty(n * 4 + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n * 4].view(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1024,4096", help="row lengths (multiples of 512)")
    p.add_argument("--variants", default="row,w1024,w16,pairs")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args(argv)
    lengths = [int(v) for v in args.rows.split(",")]
    variants = args.variants.split(",")
    x = _aligned(TOTAL)
    x[:] = np.random.default_rng(0).standard_normal(TOTAL, dtype=np.float32)
    y = _aligned(TOTAL)
    params = {L: (np.linspace(0.5, 2, L, dtype=np.float32), np.zeros(L, np.float32))
              for L in lengths}
    cases = [(v, L) for v in variants for L in lengths]
    for v, L in cases:      # compile, and touch y
        KERNELS[v](y, x, *params[L], L)
    times = {case: [] for case in cases}
    for r in range(args.rounds):
        for v, L in (cases if r % 2 else cases[::-1]):
            t = time.perf_counter()
            KERNELS[v](y, x, *params[L], L)
            times[v, L].append(time.perf_counter() - t)
    for v, L in cases:
        print(f"{v:6s} rows of {L:5d}  {np.median(times[v, L]) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()

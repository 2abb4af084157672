"""Numba CPU kernels for normalization over the canonical view (O, A, C, B).

Every norm is "statistics per (o, c) over the axes a and b" of a C-contiguous array viewed as
(O, A, C, B) (see DESIGN.md). Kernels take that array flattened to 1-D (so every slice is a
contiguous run that LLVM vectorizes) plus the four extents, and fill caller-allocated outputs.
They know nothing of axes, dtype policy or array libraries.

Math (n = A * B elements per statistic, w / bias indexed by the parameter cell c * Q + b // P,
Q = B // P)::

    mean  = sum(x) / n                          one pass: blocked, shifted two-pass + Chan merge
    var   = sum((x - mean)**2) / n              biased
    rstd  = 1 / sqrt(var + eps)
    xhat  = (x - mean) * rstd
    y     = xhat * w + bias

    backward, per statistic:
    g1    = sum(dy * w)          g2 = sum(dy * w * xhat)
    c2    = g1 / n               c1 = g2 / n
    dx    = rstd * (dy * w - c2 - xhat * c1)     (c1 = c2 = 0 with frozen statistics)
    per parameter cell: dbias = sum(dy), dweight = sum(dy * xhat)

Fused epilogue and its backward (optional, per call): residual z and ReLU::

    y = relu(xhat * w + bias + z)           dy_eff = dy * (y > 0)   (ReLU's gradient from y)
    dz = dy_eff                             the formulas above use dy_eff for dy

RMSNorm is the uncentred case: mean := 0 and var := mean(x**2), so c2 = 0.

Statistics and the backward's sums accumulate in float64 whatever the input dtype (for
float16 / float32 data, statistics that only normalize and gradient partials add short
blocks in float32 first: rows_column_moments' `narrow`, backward_column_sums, cell_sums,
run_sums).
The elementwise passes (normalize, dx) compute in the input's precision, float32 for float16
and float32 data: a float64 formula ran at 0.29 ns per element against 0.14 in float32 on
one core here, and these passes overlap little with the memory traffic. So that x - mean
stays exact when |mean| >> std, the mean goes in as two float32 parts, hi + lo, and x - hi
is taken first (or lo moves into the shift, see fold). The per-column and per-cell arrays of
the elementwise kernels (weight, bias, scale, shift, the mean's hi part) come in that compute
dtype from the caller. float16 arrays arrive as their uint16 bit patterns (Numba's CPU target
has no float16) and go through `load` / `loadc` / `store`. Optional arrays (z, saved y, dz)
are passed as empty arrays when absent, so that their presence is a branch LLVM hoists out
of the loop rather than another compiled signature.
"""
import os
import platform
import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

# Elements per in-cache block of the shifted two-pass (16 KiB of float64 scratch-free reads).
BLOCK = 2048
# Blocks of statistics of rows_forward (per block: one fence after non-temporal stores), of at
# least ROW_BLOCK_MIN elements each: a block allocates its scratch, and LayerNorm (4, 64) in 4
# blocks took 2.4 us against 1.0 in one.
ROW_BLOCKS = 64
ROW_BLOCK_MIN = 1 << 12
# Shortest run written with non-temporal stores: LayerNorm (65536, 128) streamed its rows of
# 128 values 2x slower than with plain stores (8192 rows of 1024: 1.24x faster).
STREAM_RUN = 1024
# Rows of a column block are chosen so that one block spans about this many elements.
COLUMN_BLOCK = 8192
# Rows whose float16 / float32 column sums add up in float32 before they go to float64.
BLOCK_ROWS = 32
# The forward's float16 runs of HALF_RUN values or more take their moments in float32
# (half_block_moments): float32 lanes widened to float64 every HALF_CHUNK values, the run
# summed again about its mean where sum(d * d) exceeds m2 HALF_RESHIFT times. Same process,
# float16 forward into out=, against float64 sums (2-core AMD EPYC Zen 4): LayerNorm (16384,
# 1024) 1.12-1.31x, (4096, 4096) 0.99-1.07x, in cache (2048, 1024) 1.14-1.17x, (4096, 256)
# 1.05-1.09x; InstanceNorm (32, 64, 56, 56) 1.16-1.27x; GroupNorm 1.08-1.23x; BatchNorm (32,
# 64, 56, 56) 1.09-1.35x. Rows of 128 lost (0.86-0.88x), and keep the float64 sums.
HALF_CHUNK = 512
# half_sums' windows at a time (as _ordered_sums' ways): float16 rows in the L1 / L2 of one
# Zen 4 core, 128 / 256 / 1024 / 4096 values, 0.19 / 0.14 / 0.086 / 0.076 ns per value four
# at a time, 0.13 / 0.094 / 0.074 / 0.068 two.
HALF_WAYS = 2
HALF_RESHIFT = 16.0
HALF_RUN = 256
# Rows of at most SHORT_ROW values go through the short-row forward, SHORT_BLOCK at a time.
SHORT_ROW = 512
SHORT_BLOCK = 128
# Rows of at most FUSED_ROW values with a weight per element (at most SHORT_ROW with a residual
# or ReLU) take short_rows_fused's forward (float32 from 64 values on). Against the long rows'
# loop (stat_moments, then normalize_run) into NumPy's out=, LayerNorm float32 (8192, 1024)
# 1.18-1.28x with caches swept and 1.09-1.21x without, (16384, 1024) 1.23-1.27x, (32768, 768)
# 1.59x, float64 (8192, 1024) 1.25-1.32x; into fresh (aligned) outputs (8192, 1024) 0.97-1.02x;
# in cache, rows of 1024 0.90-0.98x, of 768 1.07x; GroupNorm 32 groups on (64, 512, 7, 7) (rows
# of 784) 1.07x float32, 1.01x float64, (256, 512, 7, 7) streamed with caches swept 1.48x. Plain
# rows of up to SHORT_ROW only would leave the statistics of rows in between a last bit apart
# with and without streamed stores (the two loops' sums vectorize differently). Float32 rows of
# 2048 0.84-1.00x, of 4096 0.86-0.97x. With a residual or ReLU, against SHORT_BLOCK rows'
# statistics and then their normalization (streamed from 512 bytes a row, in plain stores
# below), caches swept, relu / residual / both: float32 (65536, 128) 1.68 / 1.53 / 1.48x,
# (16384, 512) 1.31 / 1.43 / 1.43x, (262144, 64) 1.26 / 1.49 / 1.49x, float64 (65536, 128) 1.18
# / 1.30 / 1.26x; in cache 1.04-1.20x; rows of 1024 in cache 0.84-0.88x (hence SHORT_ROW), from
# memory 0.99-1.04x. The backward's rows of up to FUSED_ROW values go through
# short_rows_backward: against the long rows' loop, caches swept, (8192, 1024) float32 1.24x,
# float64 1.19x, float16 1.23x (warm), (16384, 1024) 1.48x; fresh outputs 1.05x, in cache (256,
# 1024) 1.00x, with ReLU or a residual (not streamed) 0.99-1.02x; rows of 2048 0.78-0.93x, 4096
# 0.97-1.01x. Since the long rows prefetch into the L2 from LONG_ROW bytes, the forward's rows
# of LONG_ROW bytes or more in inputs that stream take them instead (on the Zen 4 1.05-1.45x;
# normcore/_cpu.py: LONG_ROWS_MIN); the backward's stay here (the long rows' loop ran
# 0.70-0.81x on (8192, 1024) and (16384, 1024)).
FUSED_ROW = 1024
# InstanceNorm rows of up to this many values take short_cells_loop's backward.
ROW_CELL = 4096
# and those of up to PAIRED_ROW values its pairs of rows (instance_rows_loop). Against a row at
# a time (bench/ab.py, Xeon with AVX-512), float32 / float64: (64, 256, 7, 7) 1.21-1.35x /
# 1.00x, (64, 512, 4, 4) 1.60-1.85x / 1.26-1.41x, (1024, 512, 7, 7) 1.50x / 1.22x, rows of 196
# 0.98-1.06x, of 784 0.92-1.02x, of 1023 0.88-0.93x. The two dx in one loop as well made float32
# rows of 784 0.80x. Rows that can stream (STREAM_RUN) must not come here: the dx coefficients,
# reassociated inline in this loop, differ in the last bit from dx_scalar_run's (computed by a
# call of their own, rows of 16 values took 1.5x as long).
PAIRED_ROW = 256
# The short-row loops prefetch the row PREFETCH_BYTES on for float32 rows of PREFETCH_ROW
# bytes or more (rows_ahead)
PREFETCH_BYTES = 2048
PREFETCH_ROW = 512
# ... and the column sums (column_rows_ahead) for whole rows of at most PREFETCH_COLUMN_ROW bytes
# in inputs read from memory
PREFETCH_COLUMN_ROW = 512
# Inputs of this many bytes or more come from memory (larger than this machine's 8 MiB L3)
FROM_MEMORY = 1 << 23
# Rows of LONG_ROW bytes or more with a weight per element prefetch the next row into the L2
# only as they stream (_seamed_row; the float32 dx: stream_seamed_dx_row): the row, its
# weight and bias (48 KiB for float32 rows of 4096) and the next row overfill the L1. On an
# Intel Xeon (48 KiB L1), from 16 KiB: LayerNorm forward into out=, caches swept, float32
# (4096, 4096) 1.03-1.06x (1.09x warm, 1.02x into fresh outputs), (2048, 8192) 1.05x,
# float64 (4096, 4096) 1.12x; float32 (8192, 2048) 0.98x, and the rows of 1024 that then
# came here 0.92-0.94x. On the 2-core AMD EPYC Zen 4 (32 KiB L1), from 4 KiB against 16 KiB
# (same process, out= / dx_out=): float32 (8192, 2048) forward 1.04-1.30x (seven runs),
# backward 1.07-1.16x; (11000, 1536) 1.07-1.12x / 1.06-1.08x; float64 (5461, 1536) forward
# 1.11-1.24x, backward 0.99-1.01x (its dx keeps every level). Shorter rows with a weight per
# element take the fused rows (FUSED_ROW), but for float32 rows of 513-1023 values behind a
# ReLU or a residual, which come here and prefetch into every level.
LONG_ROW = 1 << 12
# Streamed float32 LayerNorm / RMSNorm rows (a weight per element; with or without ReLU and a
# residual) of PAIR_ROW bytes or more are normalized two at a time in strips of PAIR_STRIP values
# (_seamed_pair): a row, its weight and its bias outgrow the 32 KiB L1 together (48 KiB for rows
# of 4096), so that each window loads three lines from the L2 while the next row's prefetches from
# memory are in flight. A probe of that loop alone (bench/probe_rows.py) on the 2-core AMD EPYC
# Zen 4, 64 MiB: rows of 4096 took 1.19-1.61x as long as rows of 1024 (twelve runs), 0.88-1.17x
# with the weight and bias cut to 1024 values. Same-process A/B against a row at a time, LayerNorm
# forward: (4096, 4096) 1.02-1.11x into out= (seven runs; 1.09x into fresh outputs, 1.15x with
# caches swept), (2048, 8192) 1.06-1.11x, (1031, 4101) 1.06x; strips of 256 / 1024 / 2048 no
# better. Rows of 2048 lost (0.95-0.96x; 3072: 1.01-1.03x), and so did float64 rows of 2048
# (0.95x; 4096: 1.00-1.02x). With ReLU / a residual (stream_seamed_pair): (4096, 4096) 1.03-1.09x
# / 1.01-1.02x, (2048, 8192) 1.05-1.07x / 1.06-1.08x (control (16384, 1024) 0.96-1.03x). The
# backward's rows paired the same way (their sums a BLOCK at a time, dx in strips): (4096, 4096)
# 0.99-1.13x, (2048, 8192) 0.98-1.10x, not kept.
PAIR_ROW = 1 << 14
PAIR_STRIP = 512
# Runs of parameter cells (InstanceNorm / GroupNorm rows, BatchNorm's runs in the row
# kernels) prefetch RUN_AHEAD bytes on as they stream, not the whole next run: on the 2-core
# AMD EPYC (32 KiB L1) a run of 12-25 KiB ahead (x, and dy in the backward) pushed the run
# being read out of the L1. Against a run ahead, out= at several page offsets (float32 /
# float64): GroupNorm (32, 64, 56, 56) forward 1.24-1.28x / 1.21x, backward 1.14-1.16x /
# 1.19x; InstanceNorm forward 1.20-1.25x / 1.19x, backward 0.98-0.99x; BatchNorm backward
# 1.06-1.09x / 1.13x, forward 0.99-1.00x; float16 (not streamed) and 7 x 7 maps unchanged.
RUN_AHEAD = 2048
# Parameter cells of at least this many values that backward_sums_run adds up (the rows
# backward: BatchNorm / InstanceNorm runs, GroupNorm cells; the flat backward's runs with
# ReLU) sum their terms in the compute precision, BLOCK values at a time (shorter ones in
# float64: no faster in float32 on GroupNorm's cells of 49, slower on cells of 7).
NARROW_CELL = 64

# 'reassoc' lets LLVM vectorize the reductions; no 'nnan'/'ninf' because a NaN must stay a NaN
# in its own statistic.
_REDUCE = {"reassoc", "contract", "nsz", "arcp"}
# Elementwise loops vectorize without reassociation; keeping it off preserves (x - mean) exactly.
_ELEMENTWISE = {"contract"}


def _cache_enabled():
    return os.environ.get("NORMCORE_DISABLE_CACHE", "") in ("", "0")


def _compile(func, parallel, fastmath, inline="never"):
    """njit with on-disk caching when some cache directory is writable, plain njit otherwise."""
    options = dict(parallel=parallel, fastmath=fastmath, nogil=True, error_model="numpy",
                   inline=inline)
    if _cache_enabled():
        try:
            return numba.njit(cache=True, **options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            pass
    return numba.njit(cache=False, **options)(func)


def _jit(*, parallel=False, fastmath=_REDUCE, inline="never"):
    """Compile `func`; a parallel kernel also gets `.serial`, the same loops on the calling
    thread, for inputs too small to repay waking the thread pool (measured: 1.6 us against
    12.6 us for a (4, 64) LayerNorm). The twin is a copy of the function under another name,
    so that the two never share an on-disk cache entry.

    inline="always" inlines `func` into its callers in Numba's IR, where its body then takes
    the caller's fastmath flags: only for functions whose callers all have the same flags
    (an elementwise loop inlined into a reduction kernel would lose (x - hi) - lo to
    reassociation). Inlined elementwise loops also lost their vectorization (dx_run: LayerNorm
    (65536, 128) backward 3.6x slower), so only the reduction helpers use it (the moments,
    cell_sums, run_sums, row_scalars) and loops whose formulas carry their own flags
    (exact_normalize, exact_dx_scalar: fused_rows, exact_dx_scalar_row), each inlined into
    callers compiled with _REDUCE like itself; and a few tests and counts the row kernels
    make before their prange (row_blocks, streams_rows, streamable_dz)."""

    def decorate(func):
        kernel = _compile(func, parallel, fastmath, inline)
        if parallel:
            twin = pytypes.FunctionType(func.__code__, func.__globals__, func.__name__ + "_serial",
                                        func.__defaults__, func.__closure__)
            twin.__qualname__ = func.__qualname__ + "_serial"
            twin.__doc__ = func.__doc__
            kernel.serial = _compile(twin, False, fastmath)
        return kernel

    return decorate


def _variants(factory, **options):
    """(kernel, kernel_plain): factory(True) compiled as is and factory(False) as
    `<name>_plain`, the same loops for calls without a residual or ReLU. `epilogue` is a
    constant of the factory's closure, and Numba prunes a branch on it before typing, so the
    plain kernel compiles none of the epilogue's callees; a bool argument would not (a literal
    passed from jit code only gives a second overload, every branch still typed). Each kernel
    keeps its own name, and so its own on-disk cache entry."""
    kernels = []
    for epilogue in (True, False):
        func = factory(epilogue)
        func.__name__ = func.__qualname__ = func.__name__ + ("" if epilogue else "_plain")
        kernels.append(_jit(**options)(func))
    return tuple(kernels)


# ---------------------------------------------------------------------------------------------
# Element access: float16 as uint16 bits, converted with the CPU's half instructions
# ---------------------------------------------------------------------------------------------


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    # float64 -> half would need a runtime library call that Numba does not link; rounding
    # through float32 is what PyTorch's float32-compute float16 kernels do as well.
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


# Lanes of a streamed window: 16 float32 (a whole 64-byte line per non-temporal store) for the
# forward's formulas, which read one streamed array (A/B against windows of 8, in one process:
# LayerNorm (16384, 1024) forward 1.08x, InstanceNorm (32, 64, 56, 56) eval 1.16x, BatchNorm
# (8192, 1024) eval 1.00-1.09x); 8 for the dx formulas, which read two (x and dy): at 16 the
# LayerNorm (16384, 1024) backward took 1.12-1.18x as long in three runs of four. float64
# rows take the same counts of lanes: windows of two lines and of one.
LANES = 16
DX_LANES = 8
# Whole rows of at most this many values (four windows) take short_rows_column_moments
SHORT_COLUMN_ROW = 4 * LANES
# Windows per descending group (float32, float64) where the output starts just past the input
# modulo 4 KiB (see _window_loop): the dx windows' and the seamed rows' (_seamed_row)
DX_GROUPS = (4, 2)
SEAMED_GROUPS = (4, 2)
# and the channels-last (columns) windows', forward and dx: y 16-80 bytes past x took BatchNorm
# (32, 56, 56, 64) forward 1.2-1.5x as long, GroupNorm channels-last 1.3-1.8x, dx 1.7-2.3x.
# Pairs fixed the forward (groups of 4: 0.71-0.73x at 128-192 bytes, so pairs), groups of 4
# the dx; float64 in order (pairs there: BatchNorm (8192, 1024) backward 0.76-0.91x)
COLUMNS_GROUPS = (2, 1)
COLUMNS_DX_GROUPS = (4, 1)


def _float_run(a, dtype=types.float32):
    """A contiguous 1-d array type of `dtype` (read-only or not)."""
    return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == 1 and a.layout == "C"


def _streamable(ys, arrays):
    """Whether the array type ys and those of the tuple `arrays` share a float32 or float64
    dtype: what the streamed windows take (typing time)."""
    dtype = getattr(ys, "dtype", None)
    return dtype in (types.float32, types.float64) and all(a.dtype == dtype for a in arrays)


def _window_type(dtype, lanes):
    """The LLVM vector type of `lanes` values of the float32 or float64 `dtype`."""
    return ir.VectorType(ir.DoubleType() if dtype == types.float64 else ir.FloatType(), lanes)


def _bytes(vec):
    """The size of an element of the float vector type `vec`."""
    return 8 if isinstance(vec.element, ir.DoubleType) else 4


def _splat(builder, value, vec):
    """`value` in every lane of the vector type `vec` (LLVM IR)."""
    v = builder.insert_element(ir.Constant(vec, ir.Undefined), value,
                               ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vec.count),
                                              [0] * vec.count))


def _vector_at(context, builder, arrty, arr, index, vec):
    """A pointer to the vector `vec` at arr[index] (LLVM IR)."""
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [index], inbounds=True), vec.as_pointer())


def _load_windows(context, builder, tuple_type, arrays, index, vec):
    """The vectors `vec` at [index, index + lanes) of each array of the tuple `arrays`."""
    return [builder.load(_vector_at(context, builder, t, builder.extract_value(arrays, k),
                                    index, vec), align=_bytes(vec))
            for k, t in enumerate(tuple_type)]


def _splat_each(builder, tuple_type, scalars, vec):
    """Each scalar of the tuple `scalars` in every lane of `vec`."""
    return [_splat(builder, builder.extract_value(scalars, k), vec)
            for k in range(len(tuple_type))]


def _write_window(context, builder, arrty, arr, index, value):
    """arr[index:index + lanes] = the float vector `value`, a non-temporal store (the
    address must be aligned to the vector's size)."""
    store = builder.store(value, _vector_at(context, builder, arrty, arr, index, value.type),
                          align=_bytes(value.type) * value.type.count)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32),
                                                                                1)]))


def _stream_window(formula, lanes=LANES):
    """An intrinsic (ys, i, arrays, p, columns, scalars): ys[i:i + lanes] = formula(builder,
    vectors of the arrays at [i, i + lanes) then of the columns at [p, p + lanes), the scalars
    splat to `lanes` lanes), all float32 or all float64, with a non-temporal store (ys + i
    must be aligned to the window's bytes). arrays, columns, scalars: tuples. The intrinsic's
    `.lanes` tells the streaming helpers its width."""

    @intrinsic
    def stream_window(typingctx, ys, i, arrays, p, columns, scalars):
        every = tuple(arrays) + tuple(columns)
        if not (_streamable(ys, every) and all(_float_run(a, ys.dtype) for a in (ys,) + every)
                and ys.mutable and all(t == ys.dtype for t in scalars)):
            return None
        vec = _window_type(ys.dtype, lanes)

        def codegen(context, builder, signature, args):
            vecs = (_load_windows(context, builder, signature.args[2], args[2], args[1], vec)
                    + _load_windows(context, builder, signature.args[4], args[4], args[3], vec))
            sc = _splat_each(builder, signature.args[5], args[5], vec)
            _write_window(context, builder, signature.args[0], args[0], args[1],
                          formula(builder, vecs, sc))
            return context.get_dummy_value()

        return types.void(ys, i, arrays, p, columns, scalars), codegen

    stream_window.lanes = lanes
    return stream_window


def _relu_mask_vector(b, d, y):
    """d where ReLU let the value through (y > 0), else 0, lane by lane (relu_dy's select)."""
    zero = ir.Constant(d.type, None)
    return b.select(b.fcmp_ordered(">", y, zero), d, zero)


# (x - hi) * sc + sh
def _affine_window_formula(b, v, s):
    return b.fadd(b.fmul(b.fsub(v[0], s[0]), s[1]), s[2])


_affine_window = _stream_window(_affine_window_formula)
# ((x - hi) - lo) * (rs * w) + bias
def _normalize_window_formula(b, v, s):
    return b.fadd(b.fmul(b.fsub(b.fsub(v[0], s[0]), s[1]), b.fmul(s[2], v[1])), v[2])


_normalize_window = _stream_window(_normalize_window_formula)
# a * dy + ((x - hi) * nb + sh) on vectors x, dy; on x, dy, y (a ReLU's backward), dy masked
# by ReLU's gradient first
def _dx_scalar_window_formula(b, v, s):
    d = _relu_mask_vector(b, v[1], v[2]) if len(v) == 3 else v[1]
    return b.fadd(b.fmul(s[0], d), b.fadd(b.fmul(b.fsub(v[0], s[1]), s[2]), s[3]))


_dx_scalar_window = _stream_window(_dx_scalar_window_formula, DX_LANES)
# (rs * w) * dy - b * ((x - hi) - lo) - cc on vectors x, dy, w; on vectors x, dy, y, w (the
# arrays (x, dy, y) of a ReLU's backward), dy masked by ReLU's gradient first
def _dx_window_formula(b, v, s):
    if len(v) == 4:
        v = [v[0], _relu_mask_vector(b, v[1], v[2]), v[3]]
    return b.fsub(b.fsub(b.fmul(b.fmul(s[2], v[2]), v[1]),
                         b.fmul(s[3], b.fsub(b.fsub(v[0], s[0]), s[1]))), s[4])


_dx_window = _stream_window(_dx_window_formula, DX_LANES)
# columns: (x - hi) * scale + shift; vectors x, hi, scale, shift
def _columns_affine_window_formula(b, v, s):
    return b.fadd(b.fmul(b.fsub(v[0], v[1]), v[2]), v[3])


# columns: a * dy - b * (x - hi) - c; vectors x, dy, hi, a, b, c; or x, dy, y, hi, a, b, c
# (a ReLU's backward), dy masked by ReLU's gradient first
def _columns_dx_window_formula(b, v, s):
    if len(v) == 7:
        v = [v[0], _relu_mask_vector(b, v[1], v[2])] + list(v[3:])
    return b.fsub(b.fsub(b.fmul(v[3], v[1]), b.fmul(v[4], b.fsub(v[0], v[2]))), v[5])


_columns_dx_window = _stream_window(_columns_dx_window_formula, DX_LANES)
# dz = dy masked by ReLU's gradient (the residual's): vectors dy, y
_dz_window = _stream_window(lambda b, v, s: _relu_mask_vector(b, v[0], v[1]), DX_LANES)


def _runs_window(formula, lanes=LANES):
    """An intrinsic (ys, i, arrays, p, columns, first, c0, c1): as _stream_window's, with the
    scalars per lane: a window of a chunk of runs (one cell each) spans at most two of them
    when runs hold `lanes` values or more, so its lanes below `first` take the coefficients
    c0 (a tuple) of the first run and the others c1 of the next: a compare and a select per
    coefficient per window, instead of a scalar loop at every run's edge."""

    index = ir.VectorType(ir.IntType(64), lanes)

    @intrinsic
    def runs_window(typingctx, ys, i, arrays, p, columns, first, c0, c1):
        every = tuple(arrays) + tuple(columns)
        if not (_streamable(ys, every)
                and all(_float_run(a, ys.dtype) for a in (ys,) + every)
                and ys.mutable and isinstance(first, types.Integer)
                and all(t == ys.dtype for t in tuple(c0) + tuple(c1))):
            return None
        vec = _window_type(ys.dtype, lanes)

        def codegen(context, builder, signature, args):
            edge = _splat(builder, context.cast(builder, args[5], signature.args[5],
                                                types.int64), index)
            low = builder.icmp_signed("<", ir.Constant(index, list(range(lanes))), edge)
            coefficients = [builder.select(low, here, after) for here, after in zip(
                _splat_each(builder, signature.args[6], args[6], vec),
                _splat_each(builder, signature.args[7], args[7], vec))]
            vecs = (_load_windows(context, builder, signature.args[2], args[2], args[1], vec)
                    + _load_windows(context, builder, signature.args[4], args[4], args[3], vec))
            _write_window(context, builder, signature.args[0], args[0], args[1],
                          formula(builder, vecs, coefficients))
            return context.get_dummy_value()

        return types.void(ys, i, arrays, p, columns, first, c0, c1), codegen

    runs_window.lanes = lanes
    return runs_window


# runs: (x - hi) * sc + sh; vectors x; coefficients hi, sc, sh
_runs_affine_window = _runs_window(_affine_window_formula)
# runs: a * dy + ((x - hi) * nb + sh); vectors x, dy; coefficients a, hi, nb, sh
_runs_dx_scalar_window = _runs_window(_dx_scalar_window_formula, DX_LANES)
# rows: ((x - hi) - lo) * (rs * w) + bias; vectors x, w, bias; coefficients hi, lo, rs
_runs_normalize_window = _runs_window(_normalize_window_formula)
# rows: (rs * w) * dy - b * ((x - hi) - lo) - cc; vectors x, dy, w; coefficients hi, lo, rs,
# b, cc
_runs_dx_window = _runs_window(_dx_window_formula, DX_LANES)


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@intrinsic
def sfence(typingctx):
    """Order this thread's non-temporal stores before whatever follows: sfence on x86 (the
    fence its manuals name for them), a sequentially consistent fence elsewhere."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence",
                                                  fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _prefetcher(locality):
    """An intrinsic (arrays, i): a hint to bring the cache line of element i of each array of
    the tuple `arrays` into cache, for reading; locality 3: every level (prefetcht0 on x86),
    2: the L2 and beyond (prefetcht1). i may run past an array's end into the data that
    follows it, the next row of the array it is a slice of: a prefetch never faults."""

    @intrinsic
    def prefetch(typingctx, arrays, i):
        if not (isinstance(arrays, types.BaseTuple) and isinstance(i, types.Integer)
                and all(isinstance(a, types.Array) for a in arrays)):
            return None

        def codegen(context, builder, signature, args):
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
                ir.VoidType(), [i8p, i32, i32, i32]))
            index = context.cast(builder, args[1], signature.args[1], types.intp)
            for k, t in enumerate(signature.args[0]):
                a = context.make_array(t)(context, builder, builder.extract_value(args[0], k))
                # read, the locality, data cache
                builder.call(fn, [builder.bitcast(builder.gep(a.data, [index]), i8p),
                                  ir.Constant(i32, 0), ir.Constant(i32, locality),
                                  ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(arrays, i), codegen

    return prefetch


prefetch = _prefetcher(3)
# for rows of LONG_ROW bytes or more, whose next row would push the row itself, its weight
# and its bias out of the L1 (_seamed_row; float32 dx: stream_seamed_dx_row)
prefetch_l2 = _prefetcher(2)


def _lanes_of(context, builder, arrty, arr, index, vec):
    """The values at arr[index:index + lanes] in the float vector `vec` of `lanes` lanes (LLVM
    IR): float16 bits widened, float32 / float64 widened or rounded to vec's."""
    kind = {types.uint16: ir.IntType(16), types.float32: ir.FloatType(),
            types.float64: ir.DoubleType()}[arrty.dtype]
    v = builder.load(_vector_at(context, builder, arrty, arr, index,
                                ir.VectorType(kind, vec.count)),
                     align=arrty.dtype.bitwidth // 8)
    if arrty.dtype == types.uint16:
        v = builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), vec.count)),
                          ir.VectorType(ir.FloatType(), vec.count))
    return _convert(builder, v, vec)


def _sum_rows_in_registers(builder, n, step, windows, vec, terms, store):
    """LLVM IR: for each of the `windows` windows, the two sums over the rows r of [0, n) of
    terms(r)[w] (a pair of vectors `vec`), held in registers: `step` rows at a time, added as
    a pairwise tree ((t0 + t1) + (t2 + t3)), then the last n % step rows one at a time; then
    store(w, k, value) for sum k of window w."""
    zero = ir.Constant(vec, None)
    acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(windows)]

    def add(a, b):
        return builder.fadd(a, b, flags=("contract",))

    def tree(values):
        while len(values) > 1:
            values = [add(values[k], values[k + 1]) for k in range(0, len(values), 2)]
        return values[0]

    def accumulate(rows):
        for w in range(windows):
            for k in range(2):
                total = tree([row[w][k] for row in rows])
                builder.store(add(builder.load(acc[w][k]), total), acc[w][k])

    size = ir.Constant(n.type, step)
    steps = builder.sdiv(n, size)
    with cgutils.for_range(builder, steps) as loop:
        r = builder.mul(loop.index, size)
        accumulate([terms(builder.add(r, ir.Constant(r.type, j))) for j in range(step)])
    done = builder.mul(steps, size)
    with cgutils.for_range(builder, builder.sub(n, done)) as loop:
        accumulate([terms(builder.add(done, loop.index))])
    for w in range(windows):
        for k in range(2):
            store(w, k, builder.load(acc[w][k]))


def _window_column_sums(windows):
    """An intrinsic (x, i, J, n, shift, s, q): over the n rows r of the values d =
    x[i + r * J:i + r * J + windows * LANES] - shift[:windows * LANES], s[:windows * LANES] =
    the sum of d and q the sum of d * d, in float32 lanes kept in registers from the first row
    to the last (x float16 bits, float32 or float64; shift, s, q float32 runs), the rows added
    four at a time, ((d0 + d1) + (d2 + d3)), as rows_column_moments' sweeps add them."""

    @intrinsic
    def window_column_sums(typingctx, x, i, J, n, shift, s, q):
        if not (isinstance(x, types.Array) and x.ndim == 1
                and x.dtype in (types.uint16, types.float32, types.float64)
                and all(isinstance(t, types.Integer) for t in (i, J, n))
                and all(_float_run(a) for a in (shift, s, q)) and s.mutable and q.mutable):
            return None

        def codegen(context, builder, signature, args):
            xt = signature.args[0]
            i, J, n = (context.cast(builder, args[k], signature.args[k], types.intp)
                       for k in (1, 2, 3))
            vec = ir.VectorType(ir.FloatType(), LANES)
            at = [ir.Constant(i.type, w * LANES) for w in range(windows)]
            h = [builder.load(_vector_at(context, builder, signature.args[4], args[4], a, vec),
                              align=4) for a in at]

            def terms(r):
                start = builder.add(i, builder.mul(r, J))
                out = []
                for w, a in enumerate(at):
                    d = builder.fsub(_lanes_of(context, builder, xt, args[0],
                                               builder.add(start, a), vec), h[w])
                    out.append((d, builder.fmul(d, d, flags=("contract",))))
                return out

            def store(w, k, value):
                builder.store(value, _vector_at(context, builder, signature.args[5 + k],
                                                args[5 + k], at[w], vec), align=4)

            _sum_rows_in_registers(builder, n, 4, windows, vec, terms, store)
            return context.get_dummy_value()

        return types.void(x, i, J, n, shift, s, q), codegen

    return window_column_sums


window_column_sums1, window_column_sums2, window_column_sums3, window_column_sums4 = (
    _window_column_sums(w) for w in (1, 2, 3, 4))


def _window_gradient_sums(windows):
    """An intrinsic (dy, x, i, J, n, hi, lo, t1, t2): over the n rows r, for the `windows`
    windows of LANES columns from column 0, t1 = the sum of dy and t2 = the sum of dy * ((x -
    hi) - lo) (x - hi for float64, see center), dy and x at [i + r * J, ...), hi, lo, t1, t2
    runs of the compute dtype (float32 for float16 / float32 data); the sums in lanes kept in
    registers, two rows at a time as backward_column_sums' sweeps add them."""

    @intrinsic
    def window_gradient_sums(typingctx, dy, x, i, J, n, hi, lo, t1, t2):
        compute = getattr(t1, "dtype", None)
        if not (compute in (types.float32, types.float64)
                and all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype in (
                    types.uint16, types.float32, types.float64) for a in (dy, x))
                and all(isinstance(t, types.Integer) for t in (i, J, n))
                and all(_float_run(a, compute) for a in (hi, lo, t1, t2))
                and t1.mutable and t2.mutable):
            return None

        def codegen(context, builder, signature, args):
            i, J, n = (context.cast(builder, args[k], signature.args[k], types.intp)
                       for k in (2, 3, 4))
            vec = _window_type(compute, LANES)
            at = [ir.Constant(i.type, w * LANES) for w in range(windows)]
            hs, ls = ([builder.load(_vector_at(context, builder, signature.args[k], args[k], a,
                                                vec), align=_bytes(vec)) for a in at]
                      for k in (5, 6))

            def terms(r):
                start = builder.add(i, builder.mul(r, J))
                out = []
                for w, a in enumerate(at):
                    index = builder.add(start, a)
                    g = _lanes_of(context, builder, signature.args[0], args[0], index, vec)
                    v = _lanes_of(context, builder, signature.args[1], args[1], index, vec)
                    c = builder.fsub(v, hs[w], flags=("contract",))
                    if compute == types.float32:
                        c = builder.fsub(c, ls[w], flags=("contract",))
                    out.append((g, builder.fmul(g, c, flags=("contract",))))
                return out

            def store(w, k, value):
                builder.store(value, _vector_at(context, builder, signature.args[7 + k],
                                                args[7 + k], at[w], vec), align=_bytes(vec))

            _sum_rows_in_registers(builder, n, 2, windows, vec, terms, store)
            return context.get_dummy_value()

        return types.void(dy, x, i, J, n, hi, lo, t1, t2), codegen

    return window_gradient_sums


window_gradient_sums1, window_gradient_sums2, window_gradient_sums3, window_gradient_sums4 = (
    _window_gradient_sums(w) for w in (1, 2, 3, 4))


def _ordered_sums(context, builder, at, arrs, vec, nsums, terms, ways=2):
    """LLVM IR: sums over the values i of [0, n) of the runs arrs (tuple types at; n the
    first's size) of terms(get, splat), a list of `nsums` values in vec's element type, each
    sum in an order written out, every operation flagged 'contract' alone (Numba's fast-math
    pass leaves flagged instructions as they are): `ways` (2 or 4) windows of vec.count
    values at a time into as many accumulators per sum, then the last whole windows (fewer
    than `ways`) into the first accumulators, a last partial window into the last one (the
    window that ends the run, lanes it shares with the one before masked off), the
    accumulators added as a pairwise tree, ((a0 + a1) + (a2 + a3)), and so its lanes
    (_tree_sum); a run shorter than a window value by value.
    get(j): the values of arrs[j] (float16 bits, float32 or float64) at the window or value,
    in vec's element type; splat(s): a scalar as those values. terms also returns [(j, v)]:
    arrs[j] += v there, in arrs[j]'s dtype (element-wise partials). Returns the sums (LLVM
    values).

    A loop that LLVM vectorizes under 'reassoc' may add otherwise each time it is optimized,
    and Numba optimizes a helper's code again inside each kernel that calls it: a kernel
    compiled in this process and the same kernel loaded from the cache gave dx that differed
    in the last bits (README: Semantics).

    Two ways, not four: one thread in the L1 / L2 of the 2-core AMD EPYC Zen 4, rows of 49 /
    128 / 1024 / 3136 values, ns per value four ways against two: float32 gradient_cell_sums
    0.50 / 0.26 / 0.20 / 0.23 against 0.42 / 0.19 / 0.16 / 0.20, gradient_sums 0.35 / 0.17 /
    0.12 / 0.09 against 0.26 / 0.11 / 0.09 / 0.08, float64 1.07-1.46x and 1.12-1.49x;
    ordered_shifted_sums of float32 rows 0.29 / 0.19 / 0.14 / 0.14 against 0.23 / 0.15 / 0.12
    / 0.12, of float64 1.39-1.64x. Two rows of one weight vector through one loop, their
    partials loaded and stored once for both, ran slower than either (0.21 / 0.22 ns per
    value on rows of 1024 / 128)."""
    f = ("contract",)
    n = context.make_array(at[0])(context, builder, arrs[0]).nitems
    lanes = ir.Constant(n.type, vec.count)
    zero = ir.Constant(vec, None)
    acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(ways)]
           for _ in range(nsums)]

    def window(index, k, keep=None):
        # keep: the lanes to count (a bool vector), the others' terms and partials taken as 0
        def get(j):
            return _lanes_of(context, builder, at[j], arrs[j], index, vec)

        def masked(v):
            return v if keep is None else builder.select(keep, v, ir.Constant(v.type, None))

        values, partials = terms(get, lambda s: _splat(builder, s, vec))
        for a, t in zip(acc, values):
            builder.store(builder.fadd(builder.load(a[k]), masked(t), flags=f), a[k])
        for j, p in partials:
            kind = _window_type(at[j].dtype, vec.count)
            ptr = _vector_at(context, builder, at[j], arrs[j], index, kind)
            builder.store(builder.fadd(builder.load(ptr, align=_bytes(kind)),
                                       masked(_convert(builder, p, kind)), flags=f), ptr,
                          align=_bytes(kind))

    step = ir.Constant(n.type, ways * vec.count)
    blocks = builder.sdiv(n, step)
    with cgutils.for_range(builder, blocks) as loop:
        start = builder.mul(loop.index, step)
        for k in range(ways):
            window(builder.add(start, ir.Constant(n.type, k * vec.count)), k)
    done = builder.mul(blocks, step)
    # the last whole windows (fewer than `ways`) into accumulators of their own, and the last
    # values of a run of a window or more as the window that ends the run, its lanes counted
    # before masked off: chains apart, no values one at a time (runs of 49 and such)
    rest = builder.sdiv(builder.sub(n, done), lanes)
    for k in range(ways - 1):
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(n.type, k))):
            window(builder.add(done, ir.Constant(n.type, k * vec.count)), k)
    tail = builder.add(done, builder.mul(rest, lanes))
    left = builder.sub(n, tail)
    overlap = builder.and_(builder.icmp_signed(">", left, ir.Constant(n.type, 0)),
                           builder.icmp_signed(">=", n, lanes))
    with builder.if_then(overlap):
        index = ir.VectorType(n.type, vec.count)
        first = _splat(builder, builder.sub(lanes, left), index)
        keep = builder.icmp_signed(">=", ir.Constant(index, list(range(vec.count))), first)
        window(builder.sub(n, lanes), ways - 1, keep)
    tail = builder.select(overlap, n, tail)
    sums = []
    for a in acc:
        v = _pairwise_sum(builder, [builder.load(p) for p in a])
        sums.append(cgutils.alloca_once_value(builder, _tree_sum(builder, v)))
    with cgutils.for_range(builder, builder.sub(n, tail)) as loop:
        i = builder.add(tail, loop.index)

        def at_i(j):
            return builder.gep(context.make_array(at[j])(context, builder, arrs[j]).data, [i],
                               inbounds=True)

        def get(j):
            return _value_as(builder, builder.load(at_i(j)), at[j].dtype, vec.element)

        values, partials = terms(get, lambda s: s)
        for p, t in zip(sums, values):
            builder.store(builder.fadd(builder.load(p), t, flags=f), p)
        for j, p in partials:
            v = builder.load(at_i(j))
            builder.store(builder.fadd(v, _convert(builder, p, v.type), flags=f), at_i(j))
    return [builder.load(p) for p in sums]


def _pairwise_sum(builder, values):
    """values (a power of two of them) added as a pairwise tree, ((v0 + v1) + (v2 + v3)),
    flagged 'contract' alone (LLVM IR)."""
    while len(values) > 1:
        values = [builder.fadd(values[k], values[k + 1], flags=("contract",))
                  for k in range(0, len(values), 2)]
    return values[0]


def _value_as(builder, v, dtype, kind):
    """An element v of an array of `dtype` (float16 bits, float32, float64) as the float type
    `kind` (LLVM IR)."""
    if dtype == types.uint16:
        v = builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return _convert(builder, v, kind)


def _convert(builder, v, kind):
    """The float32 / float64 value or vector v as the float (vector) type `kind`."""
    def wide(t):
        return isinstance(getattr(t, "element", t), ir.DoubleType)

    if wide(kind) and not wide(v.type):
        return builder.fpext(v, kind)
    if wide(v.type) and not wide(kind):
        return builder.fptrunc(v, kind)
    return v


def _sums_window(compute, width=64):
    """The vector type of _ordered_sums' windows of `width` bytes for the compute dtype."""
    return _window_type(compute, width // (4 if compute == types.float32 else 8))


def _data_runs(arrays):
    """Whether the types `arrays` are all contiguous 1-d runs of float16 bits, float32 or
    float64 (typing time)."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
               and a.dtype in (types.uint16, types.float32, types.float64) for a in arrays)


def _tuple_args(context, builder, tuple_type, value):
    """The elements of a tuple argument (LLVM values) and their types."""
    types_ = tuple(tuple_type)
    return [builder.extract_value(value, k) for k in range(len(types_))], types_


def _run_gradient_sums(runs, relu, cells, width=64, ways=2):
    """An intrinsic (arrays, scalars) -> (s1, s2) per run, in float64: over `runs` runs of one
    length, s1 = sum(dy) and s2 = sum(dy * xhat), xhat = (x - hi) * rs - lo * rs ((x - hi) *
    rs for float64, see center), added up in the scalars' dtype, the compute precision (float32 for
    float16 / float32 data), in _ordered_sums' order. arrays: (dy, x) per run, (dy, x, y) with
    `relu` (dy where y > 0, else 0); with `cells` (one run), then (w, dbias, dweight), runs of
    the compute dtype (w) and float32 / float64 (the partials dbias, dweight): s1 = sum(dy * w),
    s2 = sum(dy * w * xhat), and dbias += dy, dweight += dy * xhat element by element.
    scalars: (hi, lo, rs) per run. width: the bytes of a window; ways: see _ordered_sums."""
    per_run = 3 if relu else 2
    data = runs * per_run
    f = ("contract",)

    @intrinsic
    def gradient_sums(typingctx, arrays, scalars):
        if not (isinstance(arrays, types.BaseTuple) and isinstance(scalars, types.BaseTuple)
                and len(arrays) == data + (3 if cells else 0) and len(scalars) == 3 * runs):
            return None
        arrays_t, scalars_t = tuple(arrays), tuple(scalars)
        compute = scalars_t[0]
        if not (compute in (types.float32, types.float64)
                and all(s == compute for s in scalars_t) and _data_runs(arrays_t[:data])):
            return None
        if cells and not (_float_run(arrays_t[data], compute)
                          and all(_float_run(a, a.dtype) and a.mutable
                                  and a.dtype in (types.float32, types.float64)
                                  for a in arrays_t[data + 1:])):
            return None
        vec = _sums_window(compute, width)

        def codegen(context, builder, signature, args):
            arrs, at = _tuple_args(context, builder, signature.args[0], args[0])
            sc, _ = _tuple_args(context, builder, signature.args[1], args[1])
            # xhat = (x - hi) * rs - lo * rs, one rounding where contracted to a fused
            # multiply-add, rather than ((x - hi) - lo) * rs
            coefficients = [(hi, rs, builder.fneg(builder.fmul(lo, rs, flags=f), flags=f))
                            for hi, lo, rs in zip(sc[::3], sc[1::3], sc[2::3])]

            def terms(get, splat):
                values, partials = [], []
                zero = splat(ir.Constant(vec.element, 0.0))
                for r in range(runs):
                    dy, x = get(r * per_run), get(r * per_run + 1)
                    if relu:
                        y = get(r * per_run + 2)
                        dy = builder.select(builder.fcmp_ordered(">", y, zero), dy, zero)
                    hi, rs, shift = (splat(s) for s in coefficients[r])
                    xhat = builder.fmul(builder.fsub(x, hi, flags=f), rs, flags=f)
                    if compute == types.float32:
                        xhat = builder.fadd(xhat, shift, flags=f)
                    if cells:
                        dw = builder.fmul(dy, get(data), flags=f)
                        values += [dw, builder.fmul(dw, xhat, flags=f)]
                        partials += [(data + 1, dy),
                                     (data + 2, builder.fmul(dy, xhat, flags=f))]
                    else:
                        values += [dy, builder.fmul(dy, xhat, flags=f)]
                return values, partials

            sums = _ordered_sums(context, builder, at, arrs, vec, 2 * runs, terms, ways)
            return context.make_tuple(builder, signature.return_type,
                                      [_convert(builder, v, ir.DoubleType()) for v in sums])

        return types.UniTuple(types.float64, 2 * runs)(arrays, scalars), codegen

    return gradient_sums


gradient_sums, gradient_sums_relu, gradient_sums_pair = (
    _run_gradient_sums(1, False, False), _run_gradient_sums(1, True, False),
    _run_gradient_sums(2, False, False, 32, 2))
gradient_cell_sums, gradient_cell_sums_relu = (_run_gradient_sums(1, False, True),
                                               _run_gradient_sums(1, True, True))


def _ordered_moments(linear, square):
    """An intrinsic (x, shifts) -> (sum(d),) with `linear`, then (sum(d * d),) with `square`,
    d = (x - shifts[0]) - shifts[1] ... (shifts a tuple of float64), in float64 lanes (x a run
    of float16 bits, float32 or float64), in _ordered_sums' order."""

    @intrinsic
    def moment_sums(typingctx, x, shifts):
        if not (_data_runs((x,)) and isinstance(shifts, types.BaseTuple)
                and all(s == types.float64 for s in tuple(shifts))):
            return None
        vec = _sums_window(types.float64)
        k = int(linear) + int(square)

        def codegen(context, builder, signature, args):
            subtract, _ = _tuple_args(context, builder, signature.args[1], args[1])

            def terms(get, splat):
                d = get(0)
                for s in subtract:
                    d = builder.fsub(d, splat(s), flags=("contract",))
                return ([d] if linear else []) + (
                    [builder.fmul(d, d, flags=("contract",))] if square else []), []

            sums = _ordered_sums(context, builder, (signature.args[0],), (args[0],), vec, k,
                                 terms)
            return context.make_tuple(builder, signature.return_type, sums)

        return types.UniTuple(types.float64, k)(x, shifts), codegen

    return moment_sums


shifted_sum, shifted_square_sum, ordered_shifted_sums = (
    _ordered_moments(True, False), _ordered_moments(False, True), _ordered_moments(True, True))


@intrinsic
def borrow(typingctx, arr):
    """arr without its reference count: the same data, shape and strides, no meminfo. Numba
    counts references to an array's memory with an atomic add and subtract for every slice
    made and dropped; the kernels slice the data arrays row by row, and those locked
    instructions took 36% of the LayerNorm (2048, 128) backward on one thread. The top-level
    kernels borrow the caller's data arrays, which outlive the call, so that their slices
    need no count."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, value=args[0])
        dst = context.make_array(signature.return_type)(context, builder)
        populate_array(dst, data=src.data, shape=src.shape, strides=src.strides,
                       itemsize=src.itemsize, meminfo=None)
        return dst._getvalue()

    return arr(arr), codegen


def load(element):
    """An array element as float64 (jit only)."""
    raise NotImplementedError


def store(value, arr):
    """float64 `value` as an element of `arr` (jit only)."""
    raise NotImplementedError


@overload(load, jit_options={"fastmath": True})
def _load(element):
    if element == types.uint16:
        return lambda element: np.float64(_half_bits_to_float32(element))
    if isinstance(element, types.Float):
        return lambda element: np.float64(element)
    return None


@overload(store)
def _store(value, arr):
    if arr.dtype == types.uint16:
        return lambda value, arr: _float32_to_half_bits(np.float32(value))
    return lambda value, arr: value


def loadc(element):
    """An array element in the compute precision of its array: float32 for float16 / float32
    data, float64 for float64 (jit only)."""
    raise NotImplementedError


def narrow(value, arr):
    """A float64 scalar in the compute precision of `arr`'s elements (jit only)."""
    raise NotImplementedError


def center(v, hi, lo):
    """v - mean for a mean split as hi + lo (jit only): (v - hi) - lo in float32, where lo
    carries what float32 could not hold of the mean; float64 holds it in hi alone."""
    raise NotImplementedError


def zero(v):
    """0 of v's type (jit only): a float64 literal in a float32 formula would widen it."""
    raise NotImplementedError


@overload(loadc, jit_options={"fastmath": True})
def _loadc(element):
    if element == types.uint16:
        return lambda element: _half_bits_to_float32(element)
    if isinstance(element, types.Float):
        return lambda element: element
    return None


@overload(narrow)
def _narrow(value, arr):
    if arr.dtype == types.float64:
        return lambda value, arr: np.float64(value)
    return lambda value, arr: np.float32(value)


@overload(center)
def _center(v, hi, lo):
    if v == types.float64:
        return lambda v, hi, lo: v - hi
    return lambda v, hi, lo: (v - hi) - lo


@overload(zero)
def _zero(v):
    if v == types.float32:
        return lambda v: np.float32(0.0)
    return lambda v: np.float64(0.0)


def _exact_center(builder, signature, v, hi, lo):
    """(v - hi) - lo, or v - hi for float64, with 'contract' alone (see exact_normalize)."""
    d = builder.fsub(v, hi, flags=("contract",))
    if signature.args[0] == types.float32:
        d = builder.fsub(d, lo, flags=("contract",))
    return d


@intrinsic
def exact_center(typingctx, v, hi, lo):
    """center's (v - hi) - lo (v - hi for float64) with 'contract' alone, for the loops
    compiled with reassociation (see exact_normalize): there LLVM folded it into v - (hi +
    lo), which rounds to v - hi, and the column sums of dy * (x - mean) lost the mean's low
    part (BatchNorm (512, 64, 4) channels-last, |mean| / std = 1e4, dy of mean 1: dweight 0.44
    off)."""
    def codegen(context, builder, signature, args):
        return _exact_center(builder, signature, *args)

    return v(v, hi, lo), codegen


@intrinsic
def exact_normalize(typingctx, v, hi, lo, a, b):
    """((v - hi) - lo) * a + b (v - hi for float64, whose mean is hi alone) with LLVM's
    'contract' flag alone, in a kernel compiled with reassociation: Numba's fast-math pass
    leaves an instruction that already carries flags as it is, so LLVM can neither fold lo into
    hi (a float32 mean's low part lost: 4e-5 off on rows of mean 1000, std 1) nor reorder the
    products, and the result is the elementwise loops' bit for bit."""
    def codegen(context, builder, signature, args):
        v, hi, lo, a, b = args
        d = _exact_center(builder, signature, v, hi, lo)
        return builder.fadd(builder.fmul(d, a, flags=("contract",)), b, flags=("contract",))

    return v(v, hi, lo, a, b), codegen


@intrinsic
def exact_add(typingctx, a, b):
    """a + b with 'contract' alone, after exact_normalize: the residual's sum as the
    elementwise loops add it."""
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("contract",))

    return a(a, b), codegen


@intrinsic
def exact_dx(typingctx, v, hi, lo, a, d, b, c):
    """a * d - b * ((v - hi) - lo) - c, short_row_dx's formula, kept as exact_normalize keeps
    its own in a kernel that reassociates its sums."""
    def codegen(context, builder, signature, args):
        v, hi, lo, a, d, b, c = args
        f = ("contract",)
        t = builder.fmul(b, _exact_center(builder, signature, v, hi, lo), flags=f)
        return builder.fsub(builder.fsub(builder.fmul(a, d, flags=f), t, flags=f), c, flags=f)

    return v(v, hi, lo, a, d, b, c), codegen


@intrinsic
def exact_dx_scalar(typingctx, v, hi, nb, sh, a, d):
    """a * d + ((v - hi) * nb + sh), dx_scalar_row's formula, kept as exact_normalize keeps
    its own in a kernel that reassociates its sums."""
    def codegen(context, builder, signature, args):
        v, hi, nb, sh, a, d = args
        f = ("contract",)
        t = builder.fadd(builder.fmul(builder.fsub(v, hi, flags=f), nb, flags=f), sh, flags=f)
        return builder.fadd(builder.fmul(a, d, flags=f), t, flags=f)

    return v(v, hi, nb, sh, a, d), codegen


def split(mean, arr):
    """(hi, lo) of a float64 mean in the compute precision of arr (jit only)."""
    raise NotImplementedError


def fold(mean, scale, shift, arr):
    """(hi, scale, shift - lo * scale) in the compute precision of arr, for a float64 mean =
    hi + lo, scale and shift (jit only): (x - mean) * scale + shift is then
    (x - hi) * scale + shift', one subtraction and one stream fewer than (x - hi - lo) (2x on
    channels-last rows of 64 values); the correction lo * scale, up to half an ulp of the
    mean times the scale, still reaches the output through shift'."""
    raise NotImplementedError


@overload(fold)
def _fold(mean, scale, shift, arr):
    def impl(mean, scale, shift, arr):
        hi, lo = split(mean, arr)
        return hi, narrow(scale, arr), narrow(shift - np.float64(lo) * scale, arr)

    return impl


@overload(split)
def _split(mean, arr):
    if arr.dtype == types.float64:
        return lambda mean, arr: (np.float64(mean), np.float64(0.0))

    def impl(mean, arr):
        hi = np.float32(mean)
        return hi, np.float32(mean - np.float64(hi))

    return impl


# ---------------------------------------------------------------------------------------------
# Statistics helpers (serial, called from the parallel kernels)
# ---------------------------------------------------------------------------------------------


# Strict IEEE arithmetic: reassociating the merge costs the exactness of a constant input
# (mean == the constant, m2 == 0) and it is scalar code anyway.
@_jit(fastmath=False)
def chan_merge(n, mean, m2, nb, meanb, m2b):
    """Merge the moments (n, mean, m2) of two disjoint sets (Chan et al.)."""
    if nb == 0:
        return n, mean, m2
    nn = n + nb
    delta = meanb - mean
    mean = mean + delta * (nb / nn)
    m2 = m2 + m2b + delta * delta * (n * nb / nn)
    return nn, mean, m2


def _holds(dtype, doc):
    """A predicate on arrays, jit only and a compile-time constant: whether the array's
    elements are `dtype`."""

    def predicate(arr):
        raise NotImplementedError

    predicate.__doc__ = doc

    @overload(predicate)
    def _predicate(arr):
        answer = arr.dtype == dtype
        return lambda arr: answer

    return predicate


# float16 / float32 data carry 11 / 24 bits; block_moments' shifted sums accumulate in 53, so
# their cancellation (a factor 1 + (first - mean)**2 / var) costs nothing visible unless a
# block's first value sits ~2**14 standard deviations off. float64 data have no such headroom
# and keep the exact two-pass.
exact_two_pass = _holds(types.float64, "Whether blocks of `arr` take the exact two-pass.")
half_bits = _holds(types.uint16, "Whether `arr` holds float16 bits.")


def _tree_sum(builder, vec):
    """The lanes of the float vector `vec` added as a pairwise tree, halves first (LLVM IR)."""
    i32 = ir.IntType(32)
    while vec.type.count > 1:
        half = vec.type.count // 2
        low = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half),
                                                           list(range(half))))
        high = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half),
                                                            list(range(half, 2 * half))))
        vec = builder.fadd(low, high, flags=("contract",))
    return builder.extract_element(vec, ir.Constant(i32, 0))


@intrinsic
def half_sums(typingctx, x, shift):
    """(sum(d), sum(d * d)) in float64 with d = x - shift in float32, over the float16 bits
    of the contiguous run x: HALF_WAYS windows of LANES lanes at a time into float32 lanes, which
    are widened into float64 lanes every HALF_CHUNK values; the last values one at a time in
    float64. The order is written out (no reassociation), so that every compile of it adds
    the same way, and a lane's float32 sum never holds more than HALF_CHUNK / LANES terms.
    float32 / float64 runs type as well (block_moments' dead branch for them)."""
    if not (_data_runs((x,)) and shift == types.float32):
        return None
    ways = HALF_WAYS

    def codegen(context, builder, signature, args):
        xt = signature.args[0]
        arr, shift = args
        a = context.make_array(xt)(context, builder, arr)
        n = a.nitems
        f32, f64 = ir.FloatType(), ir.DoubleType()
        v32, v64 = ir.VectorType(f32, LANES), ir.VectorType(f64, LANES)
        sh = _splat(builder, shift, v32)
        h = [cgutils.alloca_once_value(builder, ir.Constant(v32, None))
             for _ in range(2 * ways)]
        wide = [cgutils.alloca_once_value(builder, ir.Constant(v64, None)) for _ in range(2)]
        flags = ("contract",)

        def add_window(index, k):
            d = builder.fsub(_lanes_of(context, builder, xt, arr, index, v32), sh,
                             flags=flags)
            builder.store(builder.fadd(builder.load(h[k]), d, flags=flags), h[k])
            square = builder.fmul(d, d, flags=flags)
            builder.store(builder.fadd(builder.load(h[ways + k]), square, flags=flags),
                          h[ways + k])

        def widen():
            for j in range(2):
                part = _pairwise_sum(builder, [builder.load(h[ways * j + k])
                                               for k in range(ways)])
                builder.store(builder.fadd(builder.load(wide[j]), builder.fpext(part, v64),
                                           flags=flags),
                              wide[j])
                for k in range(ways):
                    builder.store(ir.Constant(v32, None), h[ways * j + k])

        def add_block(start):
            for k in range(ways):
                add_window(builder.add(start, ir.Constant(n.type, k * LANES)), k)

        step = ir.Constant(n.type, ways * LANES)
        chunk = ir.Constant(n.type, HALF_CHUNK)
        chunks = builder.sdiv(n, chunk)
        per_chunk = ir.Constant(n.type, HALF_CHUNK // (ways * LANES))
        with cgutils.for_range(builder, chunks) as outer:
            base = builder.mul(outer.index, chunk)
            with cgutils.for_range(builder, per_chunk) as loop:
                add_block(builder.add(base, builder.mul(loop.index, step)))
            widen()
        chunked = builder.mul(chunks, chunk)
        blocks = builder.sdiv(builder.sub(n, chunked), step)
        with cgutils.for_range(builder, blocks) as loop:
            add_block(builder.add(chunked, builder.mul(loop.index, step)))
        done = builder.add(chunked, builder.mul(blocks, step))
        lanes = ir.Constant(n.type, LANES)
        rest = builder.sdiv(builder.sub(n, done), lanes)
        with cgutils.for_range(builder, rest) as loop:
            add_window(builder.add(done, builder.mul(loop.index, lanes)), 0)
        widen()
        s, q = (_tree_sum(builder, builder.load(w)) for w in wide)
        s_acc, q_acc = (cgutils.alloca_once_value(builder, v) for v in (s, q))
        tail = builder.add(done, builder.mul(rest, lanes))
        with cgutils.for_range(builder, builder.sub(n, tail)) as loop:
            ptr = builder.gep(a.data, [builder.add(tail, loop.index)], inbounds=True)
            d = builder.fsub(_value_as(builder, builder.load(ptr), xt.dtype, f32), shift,
                             flags=flags)
            builder.store(builder.fadd(builder.load(s_acc), builder.fpext(d, f64), flags=flags),
                          s_acc)
            builder.store(builder.fadd(builder.load(q_acc),
                                       builder.fpext(builder.fmul(d, d, flags=flags), f64),
                                       flags=flags), q_acc)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.load(s_acc), builder.load(q_acc)])

    return types.UniTuple(types.float64, 2)(x, shift), codegen


@_jit(inline="always")
def half_block_moments(xb):
    """block_moments of float16 bits for statistics saved in float32: the shifted sums in
    float32 (half_sums), as the float64 ones convert twice the vectors (the moments of rows
    of 1024 in L2, one Zen 4 core: 12.0-12.7 against 7.4-7.7 Gel/s). Their rounding errors
    are relative to sum(d) and sum(d * d), which exceeds m2 by the factor 1 + (first -
    mean)**2 / var: past HALF_RESHIFT, the block is summed again about its mean (without,
    standard normal rows of 1000 starting at 100 had rstd off by 3e-5 and values near 0 off
    by up to 10 float16 ulps)."""
    n = xb.size
    shift = np.float32(loadc(xb[0]))    # (float32 already: the cast types the dead branches)
    s, q = half_sums(xb, shift)
    if q > HALF_RESHIFT * (q - s * s / n):
        shift = np.float32(shift + s / n)
        s, q = half_sums(xb, shift)
    return shifted_moments(shift, s, q, n)


@_jit(inline="always")
def shifted_sums(xb, shift):
    """(sum(d), sum(d * d)) in float64 with d = x - shift (ordered_shifted_sums)."""
    return ordered_shifted_sums(xb, (np.float64(shift),))


@_jit(inline="always")
def shifted_moments(shift, s, q, n):
    """(mean, m2) of n values from their shifted sums s = sum(x - shift) and q =
    sum((x - shift)**2)."""
    return shift + s / n, max(q - s * s / n, 0.0)


@_jit(inline="always")
def block_moments(xb, narrow):
    """Moments (mean, m2) of a block that fits in L1, shifted by its first element.

    The shift keeps the sums small when |mean| >> std and makes a constant block give
    mean == that constant and m2 == 0 exactly. float64 blocks: exact two-pass; narrower
    inputs: one pass of shifted sums, m2 = sum(d**2) - sum(d)**2 / n with d = x - shift, in
    float64 (measured 1.7x faster on channels-last columns); float16 blocks of statistics
    saved in float32 (`narrow`, a constant) in float32 (half_block_moments).
    """
    if narrow and half_bits(xb) and xb.size >= HALF_RUN:
        return half_block_moments(xb)
    shift = load(xb[0])
    if exact_two_pass(xb):
        dmean = shifted_sum(xb, (shift,))[0] / xb.size
        return shift + dmean, shifted_square_sum(xb, (shift, dmean))[0]
    s, q = shifted_sums(xb, shift)
    return shifted_moments(shift, s, q, xb.size)


@_jit(inline="always")
def run_moments(xs, narrow):
    """(n, mean, m2) of a contiguous run, one pass over memory (`narrow`: see
    block_moments)."""
    if 0 < xs.size <= BLOCK:
        # one block, as merging it into empty moments would return it: the merge's divisions
        # cost LayerNorm (65536, 128) a third of its statistics' time
        bmean, bm2 = block_moments(xs, narrow)
        return np.float64(xs.size), bmean, bm2
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for b0 in range(0, xs.size, BLOCK):
        xb = xs[b0:b0 + BLOCK]
        bmean, bm2 = block_moments(xb, narrow)
        n, mean, m2 = chan_merge(n, mean, m2, xb.size, bmean, bm2)
    return n, mean, m2


@_jit(fastmath=_ELEMENTWISE)
def activate(v, relu):
    """ReLU when asked (NaN stays NaN)."""
    return zero(v) if relu and v < 0.0 else v


@_jit(fastmath=_ELEMENTWISE)
def relu_dy(dys, ys, i):
    """dy in its compute precision where ReLU let the value through (y > 0), else 0."""
    d = loadc(dys[i])
    return d if loadc(ys[i]) > 0.0 else zero(d)


@_jit(fastmath=_ELEMENTWISE)
def dz_run(dys, ys, relu, dzs):
    """dz = dy (masked by ReLU's gradient with relu): the residual's gradient."""
    if relu:
        for i in range(dzs.size):
            dzs[i] = store(relu_dy(dys, ys, i), dzs)
    else:
        for i in range(dzs.size):
            dzs[i] = store(loadc(dys[i]), dzs)


# The elementwise loops below are written once per presence of the optional array (z, dz)
# and, in the backward, once per relu: LLVM hoists one loop-invariant branch (relu) out of a
# loop, but with two it could keep both in the loop and leave it scalar. That happened to a
# freshly compiled rows_forward (10x slower than the same kernel loaded from the cache) and
# to every serial twin (15x). A function compiled in the running process calls its callees'
# own compiled code, and a kernel loaded from the cache the copies optimized once more inside
# it: a load of y under the relu test (dy's mask) kept the callees' own loops scalar, and
# every float16 backward ran 10-30x slower in the process that compiled it. So no loop reads
# y under a test: the ReLU loops read it always (relu_dy), the others never.


def _group(groups, ys):
    """The group size of `groups` (float32, float64) for the output type ys."""
    return groups[0] if ys.dtype.bitwidth == 32 else groups[1]


@_jit(inline="always")
def descending(ys, x, G, W):
    """Whether windows of W bytes go in descending groups of G (see _window_loop): ys starts
    less than G windows' bytes past x modulo 4 KiB."""
    past = (np.int64(ys.ctypes.data % 4096) - np.int64(x.ctypes.data % 4096)) % 4096
    return G > 1 and 0 < past < G * W


def _window_loop(stream_window, fetch=None, groups=(2, 2)):
    """A jit-only helper (ys, i, end, arrays, p, columns, scalars, lead=(), ahead=0) -> the
    index after the last window: stream_window(ys, j, arrays, p + j - i, columns, scalars)
    for the windows from i (a window boundary of ys) while they end by `end`, each
    prefetching the arrays of the tuple `lead` `ahead` values on when ahead > 0 (through
    `fetch`, by default prefetch).

    The windows go up the addresses, but in groups of G (groups: G for float32, for float64),
    each group's windows downwards, where ys starts less than G windows' bytes past
    arrays[0] modulo 4 KiB. There a window's non-temporal store matches, in the 12 address
    bits a load is first checked against the stores still queued, the lines the next windows
    read, and on the AMD EPYC (Zen) each such load waited for the store. Going down a group,
    the stores alias lines the group has read already. Consecutive arrays of one size on
    glibc's heap lie 16-32 bytes apart modulo 4 KiB, so that an out= made just after x lands
    there: into y 16-80 bytes past x, GroupNorm / InstanceNorm (32, 64, 56, 56) forward took
    1.6-1.7x as long (2.4 -> 3.9-4.2 ms) before their seamed rows came here. Groups of 4
    against pairs: seamed rows and cells (SEAMED_GROUPS) 1.4-1.7x at 16-80 bytes, 1.2x at
    128, and dx (DX_GROUPS) 1.1-1.4x; but BatchNorm NCHW runs and short LayerNorm rows forward
    0.80-0.96x (so pairs), and float64 long rows (prefetch_l2) 0.85x in pairs (so none).
    Always in groups, the outputs just before x (NumPy's 16-byte-aligned inputs, the output
    cache's page-aligned blocks) lost 10%: their stores overlap the lower windows' loads."""

    def helper(ys, i, end, arrays, p, columns, scalars, lead=(), ahead=0):
        raise NotImplementedError

    L = stream_window.lanes
    fetch = prefetch if fetch is None else fetch

    # inlined in Numba's IR: called, LayerNorm (8192, 1024) backward lost 4-9% (two A/Bs)
    @overload(helper, inline="always", jit_options={"fastmath": _ELEMENTWISE})
    def _helper(ys, i, end, arrays, p, columns, scalars, lead=(), ahead=0):
        W = ys.dtype.bitwidth // 8 * L
        G = _group(groups, ys)

        def impl(ys, i, end, arrays, p, columns, scalars, lead=(), ahead=0):
            if descending(ys, arrays[0], G, W):
                while i + G * L <= end:
                    if ahead:
                        for k in range(G):
                            fetch(lead, i + k * L + ahead)
                    for k in range(G - 1, -1, -1):
                        stream_window(ys, i + k * L, arrays, p + k * L, columns, scalars)
                    i += G * L
                    p += G * L
            if ahead:   # a loop of its own: the test inside the one loop below cost LayerNorm
                # (8192, 1024) forward and BatchNorm NCHW backward 0.88-0.89x (one A/B)
                while i + L <= end:
                    fetch(lead, i + ahead)
                    stream_window(ys, i, arrays, p, columns, scalars)
                    i += L
                    p += L
            while i + L <= end:
                stream_window(ys, i, arrays, p, columns, scalars)
                i += L
                p += L
            return i

        return impl

    return helper


def _streaming(stream_window, element, groups=(2, 2)):
    """A jit-only helper (ys, arrays, scalars, lead=(), ahead=0) -> bool that writes ys[j] =
    element(j, arrays, scalars) for every j with non-temporal stores: a scalar head up to a
    window boundary of ys (`lanes` values' bytes), stream_window on its `lanes` values at a
    time, a scalar tail. False (nothing written) unless ys and the arrays are all float32 or
    all float64. With ahead > 0, each window also prefetches the arrays of the tuple `lead`
    `ahead` values on: the next row, which a row's statistics read next (LayerNorm
    (16384, 1024) float32 forward 1.26-1.31x in one process; the hardware's prefetchers do
    not cross a 4 KiB page, and such a row spans two)."""

    def helper(ys, arrays, scalars, lead=(), ahead=0):
        raise NotImplementedError

    L = stream_window.lanes
    windows = _window_loop(stream_window, groups=groups)

    @overload(helper, jit_options={"fastmath": _ELEMENTWISE})
    def _helper(ys, arrays, scalars, lead=(), ahead=0):
        if not _streamable(ys, arrays):
            return lambda ys, arrays, scalars, lead=(), ahead=0: False
        E = ys.dtype.bitwidth // 8

        def impl(ys, arrays, scalars, lead=(), ahead=0):
            n = ys.size
            head = min(n, (-ys.ctypes.data) % (E * L) // E)
            for j in range(head):
                ys[j] = element(j, arrays, scalars)
            i = windows(ys, head, n, arrays, head, (), scalars, lead, ahead)
            for j in range(i, n):
                ys[j] = element(j, arrays, scalars)
            return True

        return impl

    return helper


def _streaming_columns(stream_window, element, groups=(1, 1)):
    """As _streaming for a block of whole rows of J >= lanes columns, flat: ys[j] =
    element(j, j % J, arrays, columns), where the arrays run with ys and the columns
    (per-column coefficients) are tiled, J + lanes values long (see tile_columns), so that the
    columns of any aligned window are contiguous even where it spans two rows. A block
    streams as one run: a row of 64 values would be 12 scalar values, 3 windows and 4 scalar
    values on NumPy's 16-byte-aligned buffers, and plain stores to lines that non-temporal
    ones also write cost more than they save. Where ys starts just past arrays[0] modulo
    4 KiB, the windows go in descending groups of `groups` windows (float32, float64) as in
    _window_loop (1: in order)."""

    def helper(ys, arrays, columns, J):
        raise NotImplementedError

    L = stream_window.lanes

    @overload(helper, jit_options={"fastmath": _ELEMENTWISE})
    def _helper(ys, arrays, columns, J):
        if not _streamable(ys, tuple(arrays) + tuple(columns)):
            return lambda ys, arrays, columns, J: False
        E = ys.dtype.bitwidth // 8
        G = _group(groups, ys)

        def impl(ys, arrays, columns, J):
            n = ys.size
            head = min(n, (-ys.ctypes.data) % (E * L) // E)
            for j in range(head):
                ys[j] = element(j, j % J, arrays, columns)
            i = head
            p = head % J
            if descending(ys, arrays[0], G, E * L):
                while i + G * L <= n:
                    top = p         # the group's upper window's first column
                    for k in range(G - 1):
                        top += L
                        while top >= J:
                            top -= J
                    q = top
                    for k in range(G - 1, -1, -1):
                        stream_window(ys, i + k * L, arrays, q, columns, ())
                        q -= L
                        while q < 0:
                            q += J
                    i += G * L
                    p = top + L
                    while p >= J:
                        p -= J
            while i + L <= n:
                stream_window(ys, i, arrays, p, columns, ())
                i += L
                p += L
                while p >= J:
                    p -= J
            for j in range(i, n):
                ys[j] = element(j, j % J, arrays, columns)
            return True

        return impl

    return helper


@_jit()
def tile_columns(column, lanes=LANES):
    """column followed by its first `lanes` values (J >= lanes): any `lanes` columns from p < J,
    in order."""
    J = column.size
    tiled = np.empty(J + lanes, column.dtype)
    tiled[:J] = column
    tiled[J:] = column[:lanes]
    return tiled


# Each formula twice, once per value and once per window (the same operations in the same
# order, so streamed and plain results agree bit for bit).
@_jit(fastmath=_ELEMENTWISE)
def _affine1(j, v, s):
    return (v[0][j] - s[0]) * s[1] + s[2]


@_jit(fastmath=_ELEMENTWISE)
def _normalize1(j, v, s):
    return ((v[0][j] - s[0]) - s[1]) * (s[2] * v[1][j]) + v[2][j]


def _dx_scalar1(j, v, s):
    """_dx_scalar_window's formula on element j of the arrays v: (x, dy) or (x, dy, y), dy
    then masked by ReLU's gradient (jit only)."""
    raise NotImplementedError


@overload(_dx_scalar1, jit_options={"fastmath": _ELEMENTWISE})
def _dx_scalar1_impl(j, v, s):
    if len(v) == 3:
        return lambda j, v, s: s[0] * relu_dy(v[1], v[2], j) + ((v[0][j] - s[1]) * s[2] + s[3])
    return lambda j, v, s: s[0] * v[1][j] + ((v[0][j] - s[1]) * s[2] + s[3])


@_jit(fastmath=_ELEMENTWISE)
def _dz1(j, v, s):
    return relu_dy(v[0], v[1], j)


def _dx1(j, v, s):
    """_dx_window's formula on element j of the arrays v: (x, dy, w) or (x, dy, y, w), dy
    then masked by ReLU's gradient (jit only)."""
    raise NotImplementedError


@overload(_dx1, jit_options={"fastmath": _ELEMENTWISE})
def _dx1_impl(j, v, s):
    if len(v) == 4:
        return lambda j, v, s: ((s[2] * v[3][j]) * relu_dy(v[1], v[2], j)
                                - s[3] * ((v[0][j] - s[0]) - s[1]) - s[4])
    return lambda j, v, s: (s[2] * v[2][j]) * v[1][j] - s[3] * ((v[0][j] - s[0]) - s[1]) - s[4]


def _columns_dx1(j, p, v, c):
    """_columns_dx_window's formula on element j (column p) of the arrays v: (x, dy) or
    (x, dy, y), dy then masked by ReLU's gradient (jit only)."""
    raise NotImplementedError


@overload(_columns_dx1, jit_options={"fastmath": _ELEMENTWISE})
def _columns_dx1_impl(j, p, v, c):
    if len(v) == 3:
        return lambda j, p, v, c: (c[1][p] * relu_dy(v[1], v[2], j)
                                   - c[2][p] * (v[0][j] - c[0][p]) - c[3][p])
    return lambda j, p, v, c: c[1][p] * v[1][j] - c[2][p] * (v[0][j] - c[0][p]) - c[3][p]


# ys = ((x - hi) - lo) * (rs * w) + bias: arrays (x, w, bias), scalars (hi, lo, rs)
stream_normalize = _streaming(_normalize_window, _normalize1)
# dx = a * dy + ((x - hi) * nb + sh): arrays (x, dy) or (x, dy, y) (dy masked by ReLU's
# gradient), scalars (a, hi, nb, sh)
stream_dx_scalar = _streaming(_dx_scalar_window, _dx_scalar1, DX_GROUPS)
# dz = dy masked by ReLU's gradient: arrays (dy, y), no scalars
stream_dz = _streaming(_dz_window, _dz1)
# dx = (rs * w) * dy - b * ((x - hi) - lo) - cc: arrays (x, dy, w), scalars (hi, lo, rs, b, cc)
stream_dx = _streaming(_dx_window, _dx1, DX_GROUPS)
# dx = a * dy - b * (x - hi) - c: arrays (x, dy) or (x, dy, y) (dy masked by ReLU's gradient),
# columns (hi, a, b, c), tiled
stream_columns_dx = _streaming_columns(_columns_dx_window, _columns_dx1, COLUMNS_DX_GROUPS)


def _affine_epilogue(relu, columns):
    """A streaming helper for y = activate((x - hi) * sc + sh + z) with ReLU when `relu`:
    _streaming's on arrays (x,) or (x, z) and scalars (hi, sc, sh), or with `columns`
    _streaming_columns' on columns (hi, scale, shift); + z when the arrays hold z. The
    formulas of affine_run's and normalize_rows' plain loops, in their order."""
    vectors = 4 if columns else 1       # the window's vectors without z
    affine = _columns_affine_window_formula if columns else _affine_window_formula

    def formula(b, v, s):
        return _epilogue_formula(affine, len(v) > vectors, relu)(b, v, s)

    if columns:
        def element(j, p, v, c):
            raise NotImplementedError

        @overload(element, jit_options={"fastmath": _ELEMENTWISE})
        def _element(j, p, v, c):
            if len(v) == 2:     # (x, z)
                return lambda j, p, v, c: activate(
                    (v[0][j] - c[0][p]) * c[1][p] + c[2][p] + v[1][j], relu)
            return lambda j, p, v, c: activate((v[0][j] - c[0][p]) * c[1][p] + c[2][p], relu)
    else:
        def element(j, v, s):
            raise NotImplementedError

        @overload(element, jit_options={"fastmath": _ELEMENTWISE})
        def _element(j, v, s):
            if len(v) == 2:
                return lambda j, v, s: _cell_value(v[0], v[1], j, s, True, relu)
            return lambda j, v, s: _cell_value(v[0], v[0], j, s, False, relu)

    if columns:
        return _streaming_columns(_stream_window(formula), element, COLUMNS_GROUPS)
    return _streaming(_stream_window(formula), element)


# ys = (x - hi) * sc + sh (+ z): arrays (x,) or (x, z), scalars (hi, sc, sh); then ReLU
stream_affine, stream_affine_relu = _affine_epilogue(False, False), _affine_epilogue(True, False)
# ys = (x - hi) * scale + shift (+ z): arrays (x,) or (x, z), columns (hi, scale, shift),
# tiled; then ReLU
stream_columns_affine = _affine_epilogue(False, True)
stream_columns_affine_relu = _affine_epilogue(True, True)


def _streaming_runs(runs_window, window, element, groups=(2, 2)):
    """A jit-only helper (ys, arrays, B, b, c, C, coefficients) -> bool that writes, over a
    chunk of consecutive runs of B values (one cell each; the first from offset b of channel
    c's run), ys[j] = element(j, arrays, the coefficients of j's channel) with non-temporal
    stores: a scalar head up to a window boundary of ys, then the windows wholly inside a run
    through `window` (a _stream_window of the same formula, the run's coefficients as its
    scalars), the one across each run's end through runs_window, a scalar tail.
    coefficients: a tuple of per-channel (C,) arrays. False (nothing written) unless
    everything is float32, or everything float64, and B >= the windows' lanes (a window then
    spans at most two runs). Every window through runs_window, with its compare and selects
    and its coefficients loaded again, ran no faster than plain stores on runs of 196 (BatchNorm
    (256, 256, 14, 14) eval; 1.39x faster this way, the same values bit for bit)."""

    def helper(ys, arrays, B, b, c, C, coefficients):
        raise NotImplementedError

    L = runs_window.lanes
    assert window.lanes == L
    windows = _window_loop(window, groups=groups)

    @overload(helper, jit_options={"fastmath": _ELEMENTWISE})
    def _helper(ys, arrays, B, b, c, C, coefficients):
        if not _streamable(ys, tuple(arrays) + tuple(coefficients)):
            return lambda ys, arrays, B, b, c, C, coefficients: False
        E = ys.dtype.bitwidth // 8

        def impl(ys, arrays, B, b, c, C, coefficients):
            if B < L:
                return False
            n = ys.size
            head = min(n, (-ys.ctypes.data) % (E * L) // E)
            i = 0
            while i < n:
                here = tuple_of(coefficients, c)
                if i < head or i + L > n:       # the scalar head and tail
                    ys[i] = element(i, arrays, here)
                    step = 1
                elif b + L <= B:                # the whole windows inside run c
                    step = min(B - b, n - i) // L * L
                    windows(ys, i, i + step, arrays, 0, (), here)
                else:                           # the window across run c's end
                    c1 = c + 1 if c + 1 < C else 0
                    runs_window(ys, i, arrays, 0, (), B - b, here, tuple_of(coefficients, c1))
                    step = L
                i += step
                b += step
                if b >= B:      # (step <= B: one run's end at most)
                    b -= B
                    c = c + 1 if c + 1 < C else 0
            return True

        return impl

    return helper


def tuple_of(arrays, c):
    """(arrays[0][c], arrays[1][c], ...) for a tuple of 2 to 4 arrays, c an index or a slice
    (jit only)."""
    raise NotImplementedError


@overload(tuple_of)
def _tuple_of(arrays, c):
    if len(arrays) == 2:
        return lambda arrays, c: (arrays[0][c], arrays[1][c])
    if len(arrays) == 3:
        return lambda arrays, c: (arrays[0][c], arrays[1][c], arrays[2][c])
    if len(arrays) == 4:
        return lambda arrays, c: (arrays[0][c], arrays[1][c], arrays[2][c], arrays[3][c])
    return None


# affine_runs, streamed: ys = (x - hi) * sc + sh; arrays (x,), coefficients (hi, sc, sh)
stream_affine_runs = _streaming_runs(_runs_affine_window, _affine_window, _affine1)
# dx_scalar_runs, streamed: dx = a * dy + ((x - hi) * nb + sh); arrays (x, dy), coefficients
# (a, hi, nb, sh)
stream_dx_scalar_runs = _streaming_runs(_runs_dx_scalar_window, _dx_scalar_window, _dx_scalar1,
                                       DX_GROUPS)


def _affine_run(epilogue):
    """affine_run, or without `epilogue` affine_run_plain: no residual or ReLU (zs empty,
    relu False), so none of their loops compile (see _rows_forward)."""

    def affine_run(xs, zs, ys, relu, mean, scale, shift, stream=False, ahead=0):
        """ys = relu((xs - mean) * scale + shift + zs) with float64 scalars mean, scale, shift,
        computed in the precision of xs as (xs - hi) * scale + (shift - lo * scale): the part lo
        of the mean that its compute-dtype hi cannot hold moves into the shift (see fold).
        ahead: as normalize_run's. stream: with the residual and ReLU too (plain stores before:
        BatchNorm (32, 64, 56, 56) float32 forward with ReLU 1.35x, a residual 1.20x, both
        1.26x, caches swept; float64 with ReLU 1.30-1.35x)."""
        hi, sc, sh = fold(mean, scale, shift, xs)
        # outputs far larger than the caches: non-temporal stores skip reading each line before
        # writing it (IN / BN forward on 64 MiB: ~20% faster), but leave y out of the cache
        # float64 with a residual streamed at 0.94-0.95x (BatchNorm (32, 64, 56, 56), caches
        # swept): it keeps plain stores
        if stream and xs.size >= STREAM_RUN and not (zs.size and xs.itemsize == 8):
            if not epilogue:
                done = stream_affine(ys, (xs,), (hi, sc, sh), (xs,), ahead)
            elif relu and zs.size:
                done = stream_affine_relu(ys, (xs, zs), (hi, sc, sh), (xs, zs), ahead)
            elif relu:
                done = stream_affine_relu(ys, (xs,), (hi, sc, sh), (xs,), ahead)
            elif zs.size:
                done = stream_affine(ys, (xs, zs), (hi, sc, sh), (xs, zs), ahead)
            else:
                done = stream_affine(ys, (xs,), (hi, sc, sh), (xs,), ahead)
            if done:
                return
        if epilogue and zs.size:
            for i in range(xs.size):
                v = (loadc(xs[i]) - hi) * sc + sh + loadc(zs[i])
                ys[i] = store(activate(v, relu), ys)
        else:
            for i in range(xs.size):
                ys[i] = store(activate((loadc(xs[i]) - hi) * sc + sh, relu), ys)

    return affine_run


affine_run, affine_run_plain = _variants(_affine_run, fastmath=_ELEMENTWISE)


def _affine_runs(epilogue):
    """affine_runs, or without `epilogue` affine_runs_plain: the same loops for chunks
    without a residual or ReLU (zs empty, relu False), whose streamed windows then compile
    without the epilogue's variants (see _rows_forward)."""

    def affine_runs(xs, zs, ys, relu, B, b, c, C, hi, sc, sh, stream=False):
        """affine_run over a chunk of consecutive runs of B values (one parameter cell each), the
        first from offset b of channel c's run, with per-channel hi, sc, sh (C,) from fold: one
        call per chunk instead of one per run (BatchNorm channels-first runs of 196). Each run
        is sliced and looped from 0: `for i in range(pos, pos + e)` over the whole chunk compiled
        to AVX-512 masked stores here and ran 5x slower. stream: non-temporal stores, the chunk
        as one run of windows (see stream_affine_runs; the caller fences): BatchNorm
        (256, 256, 14, 14) eval 1.2-1.3x and training forward 1.1-1.2x faster than with plain
        stores (in one process), bit for bit the same values. With the residual and ReLU too
        (float64 with a residual: plain, as in affine_run), against plain stores on runs of 196
        and a run streamed at a time on runs of 3136, float32 forward with caches swept:
        (256, 256, 14, 14) 1.23-1.27x (relu / residual / both; in cache 1.35-1.53x), float64 with
        ReLU 1.27x; (32, 64, 56, 56) 1.03-1.06x, both 1.06-1.15x."""
        if stream and xs.size >= STREAM_RUN and not (zs.size and xs.itemsize == 8):
            coefficients = (hi, sc, sh)
            if not epilogue:
                done = stream_affine_runs(ys, (xs,), B, b, c, C, coefficients)
            elif relu and zs.size:
                done = stream_affine_runs_both(ys, (xs, zs), B, b, c, C, coefficients)
            elif relu:
                done = stream_affine_runs_relu(ys, (xs,), B, b, c, C, coefficients)
            elif zs.size:
                done = stream_affine_runs_residual(ys, (xs, zs), B, b, c, C, coefficients)
            else:
                done = stream_affine_runs(ys, (xs,), B, b, c, C, coefficients)
            if done:
                return
        n = xs.size
        pos = 0
        while pos < n:
            e = min(n - pos, B - b)
            h = hi[c]
            s = sc[c]
            t = sh[c]
            xr, yr = xs[pos:pos + e], ys[pos:pos + e]
            if zs.size:
                zr = zs[pos:pos + e]
                for i in range(e):
                    v = (loadc(xr[i]) - h) * s + t + loadc(zr[i])
                    yr[i] = store(activate(v, relu), yr)
            else:
                for i in range(e):
                    yr[i] = store(activate((loadc(xr[i]) - h) * s + t, relu), yr)
            pos += e
            b = 0
            c = c + 1 if c + 1 < C else 0

    return affine_runs


affine_runs, affine_runs_plain = _variants(_affine_runs, fastmath=_ELEMENTWISE)


def _normalize_run(epilogue):
    """normalize_run, or without `epilogue` normalize_run_plain (affine_run_plain)."""

    def normalize_run(xs, zs, ys, relu, mean, rstd, w, bias, c, b0, B, P, stream=False, ahead=0):
        """y = relu((x - mean) * rstd * w + bias + z) on the piece [b0, b0 + len) of channel c's
        run; zs is empty without a residual. w, bias: parameter cells in the compute dtype.
        ahead: where streamed, prefetch x this many values on (the next run, when it follows
        this one in memory: 0 for none)."""
        e = xs.size
        if P == 1:
            wv = w[c * B + b0:c * B + b0 + e]
            bv = bias[c * B + b0:c * B + b0 + e]
            hi, lo = split(mean, xs)
            rs = narrow(rstd, xs)
            if (stream and e >= STREAM_RUN and not relu and not zs.size
                    and stream_normalize(ys, (xs, wv, bv), (hi, lo, rs), (xs,), ahead)):
                return
            if epilogue and zs.size:
                for i in range(e):
                    v = center(loadc(xs[i]), hi, lo) * (rs * wv[i]) + bv[i] + loadc(zs[i])
                    ys[i] = store(activate(v, relu), ys)
            else:
                for i in range(e):
                    v = center(loadc(xs[i]), hi, lo) * (rs * wv[i]) + bv[i]
                    ys[i] = store(activate(v, relu), ys)
            return
        if P == B:      # one cell per run: no division per piece (BatchNorm NCHW runs of 196)
            if epilogue:
                affine_run(xs, zs, ys, relu, mean, rstd * w[c], bias[c], stream, ahead)
            else:
                affine_run_plain(xs, zs, ys, False, mean, rstd * w[c], bias[c], stream, ahead)
            return
        Q = B // P
        s = b0
        if P < STREAM_RUN:
            # short cells (GroupNorm on 7 x 7 maps: P = 49): affine_run's loops inline; a call
            # per cell cost ~15 ns, as much as the normalize itself on (64, 256, 7, 7)
            q = s // P
            while s < b0 + e:
                t = min(b0 + e, (q + 1) * P)
                hi, sc, sh = fold(mean, rstd * w[c * Q + q], bias[c * Q + q], xs)
                xq, yq = xs[s - b0:t - b0], ys[s - b0:t - b0]
                if epilogue and zs.size:
                    zq = zs[s - b0:t - b0]
                    for i in range(t - s):
                        v = (loadc(xq[i]) - hi) * sc + sh + loadc(zq[i])
                        yq[i] = store(activate(v, relu), yq)
                else:
                    for i in range(t - s):
                        yq[i] = store(activate((loadc(xq[i]) - hi) * sc + sh, relu), yq)
                s = t
                q += 1
            return
        while s < b0 + e:
            q = s // P
            t = min(b0 + e, (q + 1) * P)
            if epilogue:
                zq = zs[s - b0:t - b0] if zs.size else zs
                affine_run(xs[s - b0:t - b0], zq, ys[s - b0:t - b0], relu, mean,
                           rstd * w[c * Q + q], bias[c * Q + q], stream, ahead)
            else:
                affine_run_plain(xs[s - b0:t - b0], zs, ys[s - b0:t - b0], False, mean,
                                 rstd * w[c * Q + q], bias[c * Q + q], stream, ahead)
            s = t

    return normalize_run


normalize_run, normalize_run_plain = _variants(_normalize_run, fastmath=_ELEMENTWISE)


@_jit(inline="always")
def cell_sums(dys, ys, relu, xs, hi, lo, rs, wv, dbv, dwv):
    """backward_sums_run's per-element-cell loop on a block, in the compute precision: (sum(dy
    * w), sum(dy * w * xhat)) in float64, dbv += dy and dwv += dy * xhat (gradient_cell_sums,
    in an order that every compile keeps)."""
    if relu:
        return gradient_cell_sums_relu((dys, xs, ys, wv, dbv, dwv), (hi, lo, rs))
    return gradient_cell_sums((dys, xs, wv, dbv, dwv), (hi, lo, rs))


@_jit(inline="always")
def run_sums(dys, ys, relu, xs, hi, lo, rs):
    """(sum(dy), sum(dy * xhat)) of a block of one parameter cell, added up in the compute
    precision (xhat = (x - mean) * rstd with mean = hi + lo and rstd = rs in it, as in
    cell_sums: xhat is O(1), so the products keep dy's range), returned in float64
    (gradient_sums)."""
    if relu:
        return gradient_sums_relu((dys, xs, ys), (hi, lo, rs))
    return gradient_sums((dys, xs), (hi, lo, rs))


@_jit(inline="always")
def run_sums_pair(dys, xs, hi, lo, rs, dyt, xt, hj, lj, rt):
    """run_sums (without ReLU) of two blocks of one length in one loop: two short rows
    (InstanceNorm) or two cells of a row (GroupNorm), each with its own mean and rstd. Their
    four independent chains give the loop twice the work per iteration and per trip through
    its last window and values."""
    return gradient_sums_pair((dys, xs, dyt, xt), (hi, lo, rs, hj, lj, rt))


@_jit()
def backward_sums_run(dys, ys, relu, xs, mean, rstd, w, dbias, dweight, c, b0, B, P):
    """Add sum(dy) and sum(dy * xhat) of the piece [b0, b0 + len) of channel c's run to the
    parameter cells in dbias / dweight; return its (g1, g2) = (sum(dy * w), sum(dy * w * xhat)).
    ys (the saved output) is read only with relu.

    Per-element cells (P == 1, LayerNorm) are computed in the precision of xs: g1 and g2 add
    up per BLOCK values in it before they go to float64, and dbias / dweight may be partials
    in the compute dtype (rows_backward flushes them to float64 every BLOCK_ROWS rows). In
    float64 this loop cost 0.28-0.32 ns per value here (two read-modify-write float64 arrays
    at half vector width). Cells of NARROW_CELL values or more add their sums up the same way
    (run_sums); shorter ones in float64."""
    e = xs.size
    g1 = 0.0
    g2 = 0.0
    if P == 1:
        lo = c * B + b0
        wv = w[lo:lo + e]
        dbv = dbias[lo:lo + e]
        dwv = dweight[lo:lo + e]
        hi, mlo = split(mean, xs)
        rs = narrow(rstd, xs)
        for s0 in range(0, e, BLOCK):
            s1 = min(s0 + BLOCK, e)
            h1, h2 = cell_sums(dys[s0:s1], ys[s0:s1] if relu else ys, relu, xs[s0:s1], hi, mlo,
                               rs, wv[s0:s1], dbv[s0:s1], dwv[s0:s1])
            g1 += h1
            g2 += h2
        return g1, g2
    Q = B // P
    hi, mlo = split(mean, xs)
    rs = narrow(rstd, xs)
    s = b0
    while s < b0 + e:
        q = s // P
        t = min(b0 + e, (q + 1) * P)
        dq = dys[s - b0:t - b0]
        yq = ys[s - b0:t - b0] if relu else ys
        xq = xs[s - b0:t - b0]
        sdy = 0.0
        sdyx = 0.0
        if P >= NARROW_CELL:
            # blocks of the cell in the compute precision, as cell_sums (float64 sums take a
            # conversion and half-width vectors): BatchNorm (32, 64, 56, 56) backward
            # 1.09-1.27x in three A/B runs; InstanceNorm's 0.82-1.02
            for s0 in range(0, t - s, BLOCK):
                s1 = min(s0 + BLOCK, t - s)
                h1, h2 = run_sums(dq[s0:s1], yq[s0:s1] if relu else yq, relu, xq[s0:s1], hi,
                                  mlo, rs)
                sdy += h1
                sdyx += h2
        else:
            # float64 lanes: xhat = (x - mean) * 1.0, then the rstd
            sdy, sdyx = run_sums(dq, yq, relu, xq, mean, 0.0, 1.0)
            sdyx *= rstd
        cell = c * Q + q
        dbias[cell] += sdy
        dweight[cell] += sdyx
        g1 += w[cell] * sdy
        g2 += w[cell] * sdyx
        s = t
    return g1, g2


@_jit()
def scalar_sums_runs(dys, xs, B, b, c, C, mean, sdy, sdyx):
    """Add sum(dy) and sum(dy * (x - mean)) of each run of a chunk of consecutive runs of B
    values (one cell each, the first from offset b of channel c's run) to sdy[c], sdyx[c]
    (float64, per channel; mean (C,) float64): one call per chunk (see affine_runs)."""
    n = xs.size
    pos = 0
    while pos < n:
        e = min(n - pos, B - b)
        m = mean[c]
        xr, gr = xs[pos:pos + e], dys[pos:pos + e]
        s1, s2 = gradient_sums((gr, xr), (m, 0.0, 1.0))     # float64 lanes
        sdy[c] += s1
        sdyx[c] += s2
        pos += e
        b = 0
        c = c + 1 if c + 1 < C else 0


@_jit(inline="always")
def dx_scalar_coefficients(mean, rstd, wq, c1, c2, arr):
    """(a, hi, nb, sh) of dx = a * dy + ((x - hi) * nb + sh) for a scalar weight wq (see
    dx_scalar_run), in the compute dtype of arr."""
    hi, nb, sh = fold(mean, -(rstd * rstd * c1), -(rstd * c2), arr)
    return narrow(rstd * wq, arr), hi, nb, sh


def _dx_scalar_run(epilogue):
    """dx_scalar_run, or without `epilogue` dx_scalar_run_plain: no ReLU or residual (relu
    False, dzs empty), so none of their loops compile (see _rows_forward)."""

    def dx_scalar_run(dys, ys, relu, xs, dxs, dzs, mean, rstd, wq, c1, c2, stream=False, ahead=0):
        """dx = rstd * (dy * wq - c2 - xhat * c1) with a scalar weight wq, computed as
        a * dy - b * (x - mean) - cc in the precision of xs; dz = dy (after ReLU's mask) when dzs
        is not empty. stream: dx with non-temporal stores, and dz behind a ReLU (the mask in the
        windows; plain stores before: BatchNorm / InstanceNorm / GroupNorm (32, 64, 56, 56)
        backward with activation="relu", residual=True 1.33-1.51x, caches swept)."""
        # a * dy + (x - mean) * nb + sh with nb = -b, sh = -cc, the mean's low part folded into sh
        a, hi, nb, sh = dx_scalar_coefficients(mean, rstd, wq, c1, c2, xs)
        if stream and xs.size >= STREAM_RUN:
            if not epilogue or not relu:
                if not dzs.size and stream_dx_scalar(dxs, (xs, dys), (a, hi, nb, sh), (xs, dys),
                                                     ahead):
                    return
            elif (streamable_dz(dxs, dzs, relu)
                  and stream_dx_scalar(dxs, (xs, dys, ys), (a, hi, nb, sh), (xs, dys, ys), ahead)):
                if dzs.size:
                    stream_dz(dzs, (dys, ys), ())
                return
        if epilogue and relu:
            for i in range(xs.size):
                dxs[i] = store(a * relu_dy(dys, ys, i) + ((loadc(xs[i]) - hi) * nb + sh), dxs)
        else:
            dx_scalar_row(dys, xs, dxs, a, hi, nb, sh)
        if epilogue and dzs.size:
            dz_run(dys, ys, relu, dzs)

    return dx_scalar_run


dx_scalar_run, dx_scalar_run_plain = _variants(_dx_scalar_run, fastmath=_ELEMENTWISE)


@_jit(fastmath=_ELEMENTWISE)
def dx_scalar_row(dys, xs, dxs, a, hi, nb, sh):
    """dx = a * dy + ((x - hi) * nb + sh): dx_scalar_run's loop without ReLU, alone (in it,
    dx_scalar_run's other branches, or the weight repeated per element, made short_cells_loop's
    InstanceNorm (64, 256, 7, 7) backward 1.16-1.26x slower; the row loops compiled with
    _REDUCE inline the same formula as exact_dx_scalar_row)."""
    for i in range(xs.size):
        dxs[i] = store(a * loadc(dys[i]) + ((loadc(xs[i]) - hi) * nb + sh), dxs)


@_jit(fastmath=_ELEMENTWISE)
def dx_scalar_runs(dys, xs, dxs, B, b, c, C, a, hi, nb, sh, stream=False):
    """dx_scalar_run (no ReLU, no residual) over a chunk of consecutive runs of B values, the
    first from offset b of channel c's run, with per-channel a, hi, nb, sh (C,): one call per
    chunk instead of one per run, each run sliced and looped from 0 (see affine_runs).
    stream: non-temporal stores, as affine_runs' (the caller fences)."""
    if (stream and xs.size >= STREAM_RUN
            and stream_dx_scalar_runs(dxs, (xs, dys), B, b, c, C, (a, hi, nb, sh))):
        return
    n = xs.size
    pos = 0
    while pos < n:
        e = min(n - pos, B - b)
        ac = a[c]
        h = hi[c]
        s = nb[c]
        t = sh[c]
        xr, gr, dr = xs[pos:pos + e], dys[pos:pos + e], dxs[pos:pos + e]
        for i in range(e):
            dr[i] = store(ac * loadc(gr[i]) + ((loadc(xr[i]) - h) * s + t), dr)
        pos += e
        b = 0
        c = c + 1 if c + 1 < C else 0


def _dx_run(epilogue):
    """dx_run, or without `epilogue` dx_run_plain (dx_scalar_run_plain)."""

    def dx_run(dys, ys, relu, xs, dxs, dzs, mean, rstd, w, c1, c2, c, b0, B, P, stream=False,
               ahead=0):
        """dx = rstd * (dy * w - c2 - xhat * c1) on the piece [b0, b0 + len) of channel c's run;
        dz = dy (after ReLU's mask) when dzs is not empty. ahead: where streamed, prefetch x and
        dy this many values on (see normalize_run)."""
        e = xs.size
        if P == 1:
            wv = w[c * B + b0:c * B + b0 + e]
            hi, lo = split(mean, xs)
            rs = narrow(rstd, xs)
            b = narrow(rstd * rstd * c1, xs)
            cc = narrow(rstd * c2, xs)
            if (stream and e >= STREAM_RUN and not relu and not dzs.size
                    and stream_dx(dxs, (xs, dys, wv), (hi, lo, rs, b, cc), (xs, dys), ahead)):
                return
            if epilogue and relu:
                for i in range(e):
                    d = relu_dy(dys, ys, i)
                    dxs[i] = store((rs * wv[i]) * d - b * center(loadc(xs[i]), hi, lo) - cc, dxs)
            else:
                for i in range(e):
                    d = loadc(dys[i])
                    dxs[i] = store((rs * wv[i]) * d - b * center(loadc(xs[i]), hi, lo) - cc, dxs)
            if epilogue and dzs.size:
                dz_run(dys, ys, relu, dzs)
            return
        if P == B:
            if epilogue:
                dx_scalar_run(dys, ys, relu, xs, dxs, dzs, mean, rstd, w[c], c1, c2, stream,
                              ahead)
            else:
                dx_scalar_run_plain(dys, ys, False, xs, dxs, dzs, mean, rstd, w[c], c1, c2, stream,
                                    ahead)
            return
        Q = B // P
        s = b0
        if P < STREAM_RUN and not dzs.size:
            # short cells: dx_scalar_run's loops inline (see normalize_run)
            q = s // P
            while s < b0 + e:
                t = min(b0 + e, (q + 1) * P)
                a, hi, nb, sh = dx_scalar_coefficients(mean, rstd, w[c * Q + q], c1, c2, xs)
                xq, gq, dq = xs[s - b0:t - b0], dys[s - b0:t - b0], dxs[s - b0:t - b0]
                if epilogue and relu:
                    yq = ys[s - b0:t - b0]
                    for i in range(t - s):
                        dq[i] = store(a * relu_dy(gq, yq, i) + ((loadc(xq[i]) - hi) * nb + sh), dq)
                else:
                    for i in range(t - s):
                        dq[i] = store(a * loadc(gq[i]) + ((loadc(xq[i]) - hi) * nb + sh), dq)
                s = t
                q += 1
            return
        while s < b0 + e:
            q = s // P
            t = min(b0 + e, (q + 1) * P)
            if epilogue:
                yq = ys[s - b0:t - b0] if relu else ys
                dzq = dzs[s - b0:t - b0] if dzs.size else dzs
                dx_scalar_run(dys[s - b0:t - b0], yq, relu, xs[s - b0:t - b0], dxs[s - b0:t - b0],
                              dzq, mean, rstd, w[c * Q + q], c1, c2, stream, ahead)
            else:
                dx_scalar_run_plain(dys[s - b0:t - b0], ys, False, xs[s - b0:t - b0],
                                    dxs[s - b0:t - b0], dzs, mean, rstd, w[c * Q + q], c1, c2,
                                    stream, ahead)
            s = t

    return dx_run


dx_run, dx_run_plain = _variants(_dx_run, fastmath=_ELEMENTWISE)


# ---------------------------------------------------------------------------------------------
# Rows: one thread per statistic (o, c), over its A runs of B (one contiguous row when
# A == 1: LayerNorm, InstanceNorm and GroupNorm channels-first; A strided runs of 1024 values
# or more for BatchNorm channels-first, see _plan.RUN_ROWS; its float16 / float32 forward
# goes flat from _plan.FLAT_FORWARD values). The statistic's values stay in cache between the
# passes, so the forward reads x from memory once (2E, not 3E) and the backward reads x and
# dy once (3E, not 5E). Short LayerNorm rows go in blocks of rows.
# ---------------------------------------------------------------------------------------------


@_jit(inline="always")
def stat_moments(x, o, c, A, C, B, narrow):
    """(n, mean, m2) of statistic (o, c): the runs x[o, a, c, :] for a < A (`narrow`: see
    block_moments)."""
    if A == 1:
        base = (o * C + c) * B
        return run_moments(x[base:base + B], narrow)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for a in range(A):
        base = ((o * A + a) * C + c) * B
        nb, mb, m2b = run_moments(x[base:base + B], narrow)
        n, mean, m2 = chan_merge(n, mean, m2, nb, mb, m2b)
    return n, mean, m2


@_jit()
def short_rows_moments(x, r0, r1, B, mean, m2):
    """Moments of the rows [r0, r1) of length B <= BLOCK of the flat view x into mean / m2
    (r1 - r0,) float64: a block of rows per call, so that LLVM sees the rows' loops together
    rather than one call per row of 128 values."""
    if B >= HALF_RUN:
        for r in range(r0, r1):
            mean[r - r0], m2[r - r0] = block_moments(x[r * B:(r + 1) * B], True)
    else:   # rows that keep the float64 sums, in a loop without half_sums' code
        for r in range(r0, r1):
            mean[r - r0], m2[r - r0] = block_moments(x[r * B:(r + 1) * B], False)


@_jit(fastmath=_ELEMENTWISE)
def short_rows_streamed(x, y, r0, r1, C, B, hi, lo, rs, w, bias):
    """short_rows_normalize's rows with non-temporal stores (no residual, no ReLU)."""
    c = r0 % C
    for r in range(r0, r1):
        stream_normalize(y[r * B:(r + 1) * B], (x[r * B:(r + 1) * B], w[c * B:(c + 1) * B],
                                                bias[c * B:(c + 1) * B]),
                         (hi[r - r0], lo[r - r0], rs[r - r0]))
        c = c + 1 if c + 1 < C else 0


@_jit(fastmath=_ELEMENTWISE)
def short_rows_normalize(x, z, relu, y, r0, r1, C, B, hi, lo, rs, w, bias, stream):
    """y = relu((x - mean) * rstd * w + bias + z) on the rows [r0, r1) of length B, with a
    weight and bias per element, row r's at [c * B, (c + 1) * B) for c = r % C (LayerNorm:
    C == 1), and per-row hi, lo, rs (r1 - r0,) in the compute dtype (see normalize_run).
    stream: the rows are whole windows (see short_rows_stream), without z or ReLU; their
    values go out with non-temporal stores."""
    if stream:
        # in a loop of its own: with the streamed call inside the row loop below, even when
        # not taken, LLVM left the plain loops 2.3x slower (rows of 128 in cache, Zen 3)
        short_rows_streamed(x, y, r0, r1, C, B, hi, lo, rs, w, bias)
        return
    c = r0 % C
    for r in range(r0, r1):
        xs, ys = x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]
        wv, bv = w[c * B:(c + 1) * B], bias[c * B:(c + 1) * B]
        c = c + 1 if c + 1 < C else 0
        h, low, rsr = hi[r - r0], lo[r - r0], rs[r - r0]
        if z.size:
            zs = z[r * B:(r + 1) * B]
            for i in range(B):
                v = center(loadc(xs[i]), h, low) * (rsr * wv[i]) + bv[i] + loadc(zs[i])
                ys[i] = store(activate(v, relu), ys)
        else:
            for i in range(B):
                v = center(loadc(xs[i]), h, low) * (rsr * wv[i]) + bv[i]
                ys[i] = store(activate(v, relu), ys)


@_jit(parallel=True)
def rows_moments(x, O, A, C, B, mean_out, var_out):
    """mean and biased var (float64, (O * C,)) of every statistic."""
    x = borrow(x)
    for r in prange(O * C):
        n, mean, m2 = stat_moments(x, r // C, r % C, A, C, B, False)
        mean_out[r] = mean
        var_out[r] = m2 / n


@_jit()
def short_rows_stream(ys, B, lanes):
    """Whether short rows of B values of ys can stream: every row whole windows of `lanes`
    values from a 64-byte line boundary on, so that each line is written by non-temporal
    stores alone (a line written partly by plain stores as well costs more than it saves)."""
    return B % (64 // ys.itemsize) == 0 and B % lanes == 0 and ys.ctypes.data % 64 == 0


@_jit(inline="always")
def save_stats(n, mean, m2, centered, eps, r, mean_out, rstd_out, var_out):
    """(mean, rstd) of statistic r from its moments over n values (centered=False, RMSNorm:
    mean 0 and var = mean(x**2)), saved into mean_out / rstd_out and, unless it is empty,
    the variance into var_out."""
    var = m2 / n
    if not centered:
        var += mean * mean
        mean = 0.0
    rstd = 1.0 / np.sqrt(var + eps)
    mean_out[r] = mean
    rstd_out[r] = rstd
    if var_out.size:
        var_out[r] = var
    return mean, rstd


@_jit(inline="always")
def row_coefficients(x, o, A, C, B, centered, eps, r, mean_out, rstd_out, var_out):
    """Statistic r = (o, 0)'s moments (stat_moments) saved (save_stats), returned as a seamed
    row's window coefficients (hi, lo, rstd) in x's compute precision (_seamed_pair)."""
    n, mean, m2 = stat_moments(x, o, 0, A, C, B, True)
    mean, rstd = save_stats(n, mean, m2, centered, eps, r, mean_out, rstd_out, var_out)
    hi, lo = split(mean, x)
    return hi, lo, narrow(rstd, x)


@_jit(inline="always")
def rows_ahead(x, B):
    """How far ahead (in values, whole rows of B) the short-row loops prefetch x's rows:
    PREFETCH_BYTES or more, float32 rows of PREFETCH_ROW bytes or more only (0: none).
    float64 LayerNorm (65536, 128) forward ran 0.86-0.90x with 1-8 KiB ahead, and float32
    rows of 64 values 0.92x on (16384, 64) (in the cores' L2), though 1.09-1.15x on
    (262144, 64)."""
    if x.itemsize != 4 or B * x.itemsize < PREFETCH_ROW:
        return 0
    return max(1, PREFETCH_BYTES // (B * x.itemsize)) * B


@_jit(inline="always")
def run_ahead(x, B):
    """How far on (in values) the loops over runs or rows of B values prefetch the data that
    follows: RUN_AHEAD bytes, at most the next run or row whole."""
    return min(B, RUN_AHEAD // x.itemsize)


@_jit(inline="always")
def prefetch_row(arrays, s, ahead, B):
    """Prefetch the lines of values [s + ahead, s + ahead + B) of each array of the tuple
    `arrays` (of one element size), unless ahead is 0. The short-row loops read a row of
    256-512 bytes at a time, and the hardware's prefetchers stop at each 4 KiB page."""
    if ahead:
        for i in range(s + ahead, s + ahead + B, 64 // arrays[0].itemsize):
            prefetch(arrays, i)


@_jit(inline="always")
def from_memory(x):
    """Whether x is FROM_MEMORY bytes or more: too large to stay in the caches."""
    return x.size * x.itemsize >= FROM_MEMORY


@_jit(inline="always")
def short_column_windows(J, W):
    """The windows of LANES values in a row, where the column sums take whole rows (W == J)
    of 1-4 whole windows in registers (short_rows_column_moments, window_gradient_sums*);
    else 0."""
    return J // LANES if W == J <= SHORT_COLUMN_ROW and J % LANES == 0 else 0


@_jit(inline="always")
def column_rows_ahead(x, J, W):
    """How far on (in values) the column loops that sum several rows per sweep prefetch the
    flat (N, J) view x they read: PREFETCH_BYTES where whole rows (W == J) of at most
    PREFETCH_COLUMN_ROW bytes lie end to end in an x of FROM_MEMORY bytes or more;
    else 0 (none). The hardware's prefetchers stop at each 4 KiB page. Same-process A/B
    against none, float32: BatchNorm channels-last (32, 56, 56, 64) forward 1.12-1.20x,
    backward 1.09-1.16x; GroupNorm channels-last forward 1.14-1.37x, backward 1.21-1.25x;
    float64 backward 1.06-1.10x. Rows of 1-4 KiB lost (sweeps of 4 such rows read 4 streams at
    once, and a burst of prefetches for the next rows ran ahead of them): (8192, 1024)
    backward 0.86-0.92x, (25088, 256) 0.93x; and in cache (4096, 64) 0.94-0.95x. (Those
    measurements were of the sweeps on a Zen 1; whole rows of 1-4 windows now take the
    register sums, short_column_windows, which do not prefetch.)"""
    if W < J or J * x.itemsize > PREFETCH_COLUMN_ROW or not from_memory(x):
        return 0
    return PREFETCH_BYTES // x.itemsize


@_jit(inline="always")
def row_scalars(x, r, B, mu, m2, centered, eps, mean_out, rstd_out, var_out):
    """Row r's statistics from its moments over B values, saved, and what its normalization
    takes: the mean split as (hi, lo) and rstd, in the compute precision."""
    mu, rstd = save_stats(B, mu, m2, centered, eps, r, mean_out, rstd_out, var_out)
    hi, lo = split(mu, x)
    return hi, lo, narrow(rstd, x)


@_jit(inline="always")
def window_above(a, j, lanes):
    """The first flat index from j on whose element of `a` starts a window of `lanes` values
    (lanes * itemsize bytes from a's address 0; a's data at a whole element's address)."""
    return j + (-(a.ctypes.data // a.itemsize + j)) % lanes


@_jit(inline="always")
def window_below(a, j, lanes):
    """The last flat index up to j whose element of `a` starts such a window."""
    return j - (a.ctypes.data // a.itemsize + j) % lanes


@_jit(inline="always")
def fused_start(x, B, C, r0):
    """What the fused rows' loops start from: the prefetch distance (rows_ahead), row r0's
    cell, and (hi, lo, rs) in the compute precision, zeros until the first row's replace
    them."""
    hi, lo = split(0.0, x)
    return rows_ahead(x, B), r0 % C, hi, lo, narrow(0.0, x)


@_jit(inline="always")
def fused_rows(xz, relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out, r0, r1):
    """short_rows_fused's loop with plain stores, pipelined: row r + 1's sums come before
    row r's normalization, which leaves the chain of divisions and a square root of its
    statistics time to finish before they are needed (against a row's sums, statistics and
    normalization in turn, float32 LayerNorm through bench/ab.py: (2048, 128) 1.04-1.11x,
    (16384, 128) 1.09x, (16384, 64) 1.09-1.12x; a standalone copy on one thread, (2048, 128)
    1.29x, and on two (65536, 128) in L3 1.16x, rows of 512 from memory 0.99x). The loop
    starts a row early, to take row r0's sums: a copy of the sums before it would be
    vectorized on its own and could round them otherwise (1 ulp of a variance, against
    short_rows_forward's). xz: (x,) or (x, z), the residual (added by exact_add: see
    exact_normalize); relu: ReLU last."""
    if r0 >= r1:
        return
    x = xz[0]
    ahead, c, hi, lo, rs = fused_start(x, B, C, r0)
    for r in range(r0 - 1, r1):
        # the last row takes its own sums again (its statistics saved twice, equal) rather
        # than a test around them in every row
        n = min(r + 1, r1 - 1)
        prefetch_row(xz, n * B, ahead, B)
        mu, m2 = block_moments(x[n * B:(n + 1) * B], True)
        if r >= r0:
            xs, ys = x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]
            wv, bv = w[c * B:(c + 1) * B], bias[c * B:(c + 1) * B]
            if len(xz) == 2:
                zs = xz[-1][r * B:(r + 1) * B]     # (xz[1] fails to type on (x,))
                for i in range(B):
                    v = exact_add(exact_normalize(loadc(xs[i]), hi, lo, rs * wv[i], bv[i]),
                                  loadc(zs[i]))
                    ys[i] = store(activate(v, relu), ys)
            else:
                for i in range(B):
                    v = exact_normalize(loadc(xs[i]), hi, lo, rs * wv[i], bv[i])
                    ys[i] = store(activate(v, relu), ys)
            c = c + 1 if c + 1 < C else 0
        hi, lo, rs = row_scalars(x, n, B, mu, m2, centered, eps, mean_out, rstd_out, var_out)


def _streamed_fused_rows(residual, relu):
    """A jit-only helper (x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out, r0,
    r1): fused_rows with non-temporal stores, wherever y starts, + z when `residual`, then
    ReLU when `relu`: windows of LANES values (whole 64-byte lines) from y's
    first window boundary on run across the rows' ends, where a window takes each row's
    statistics in its own lanes (a _runs_window), so that every line is written by
    non-temporal stores alone; plain stores only before the block's first window boundary
    and after its last. wt, bt: the weight and bias cells tiled (tile_columns), for a window
    past the last cell's end. Each window prefetches x (and z) rows_ahead past the next row
    (whose sums come next), rather than a row's lines at once as fused_rows does: LayerNorm
    (65536, 128) 1.04-1.07x with caches swept. The windows go in loops of their own
    (elementwise flags, see exact_normalize), as in short_rows_normalize. float32 / float64
    arrays of one dtype."""
    window, seam = _row_windows(residual, relu)
    window_loop = _window_loop(window)

    def windows(y, x, z, wt, bt, i, end, p, here, ahead):
        raise NotImplementedError

    @overload(windows, jit_options={"fastmath": _ELEMENTWISE})
    def _windows(y, x, z, wt, bt, i, end, p, here, ahead):
        # y's windows from i while they end by `end`, weight and bias from p; returns where
        # the next window starts. ahead > 0: each window prefetches that many values on.
        def impl(y, x, z, wt, bt, i, end, p, here, ahead):
            xz = (x, z) if residual else (x,)
            return window_loop(y, i, end, xz, p, (wt, bt), here, xz, ahead)

        return impl

    def seam_at(y, x, z, wt, bt, i, p, first, here, after):
        raise NotImplementedError

    @overload(seam_at, jit_options={"fastmath": _ELEMENTWISE})
    def _seam_at(y, x, z, wt, bt, i, p, first, here, after):
        # the window at i across a row's end: its lanes below `first` with `here`, the
        # others with the next row's coefficients, `after`
        return lambda y, x, z, wt, bt, i, p, first, here, after: seam(
            y, i, (x, z) if residual else (x,), p, (wt, bt), first, here, after)

    def values(y, x, z, wt, bt, j0, j1, p, here):
        raise NotImplementedError

    @overload(values, jit_options={"fastmath": _ELEMENTWISE})
    def _values(y, x, z, wt, bt, j0, j1, p, here):
        # y[j0:j1] in plain stores, weight and bias from p
        def impl(y, x, z, wt, bt, j0, j1, p, here):
            n = j1 - j0
            ys, xs, wv, bv = y[j0:j1], x[j0:j1], wt[p:p + n], bt[p:p + n]
            zs = z[j0:j1] if residual else z
            for j in range(n):
                ys[j] = _row_value(xs, zs, wv, bv, j, j, here, residual, relu)

        return impl

    def helper(x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out, r0, r1):
        raise NotImplementedError

    @overload(helper, jit_options={"fastmath": _REDUCE})
    def _helper(x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out, r0, r1):
        if not _streamable(y, (x, z, wt, bt)):
            def unstreamable(x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out,
                             r0, r1):
                raise TypeError("streamed_fused_rows: float32 or float64 arrays of one dtype")

            return unstreamable

        def impl(x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out, r0, r1):
            if r0 >= r1:
                return
            ahead, c, hi, lo, rs = fused_start(x, B, C, r0)
            i = window_above(y, r0 * B, LANES)
            for r in range(r0 - 1, r1):     # from r0 - 1, as in fused_rows
                n = min(r + 1, r1 - 1)
                mu, m2 = block_moments(x[n * B:(n + 1) * B], True)
                end = (r + 1) * B
                if r >= r0:
                    # a row that ends on a window boundary leaves its last window to seam_at
                    # as well (all of its lanes this row's), after the next row's statistics:
                    # rows written whole between the windows' prefetches ran slower (into
                    # 64-byte aligned outputs, the output cache's among them, LayerNorm
                    # (65536, 128) float32 1.24-1.37x faster this way in cache, 1.14x with
                    # caches swept; unchanged elsewhere; without the prefetches, both ran
                    # alike, and slower)
                    stop = end - LANES if n != r and window_above(y, end, LANES) == end else end
                    i = windows(y, x, z, wt, bt, i, stop, c * B + i - r * B, (hi, lo, rs),
                                B + ahead if ahead else 0)
                h, low, rsn = row_scalars(x, n, B, mu, m2, centered, eps, mean_out, rstd_out,
                                          var_out)
                if r < r0:          # row r0's values before the first line boundary
                    values(y, x, z, wt, bt, r0 * B, i, c * B, (h, low, rsn))
                elif n == r:        # the last row's values after the last one
                    values(y, x, z, wt, bt, i, end, c * B + i - r * B, (hi, lo, rs))
                elif i < end:
                    seam_at(y, x, z, wt, bt, i, c * B + i - r * B, end - i, (hi, lo, rs),
                            (h, low, rsn))
                    i += LANES
                if r >= r0:
                    c = c + 1 if c + 1 < C else 0
                hi, lo, rs = h, low, rsn
            sfence()

        return impl

    return helper



def _relu_vector(b, v):
    """max(v, 0) lane by lane, NaN staying NaN (activate's select)."""
    zero = ir.Constant(v.type, None)
    return b.select(b.fcmp_ordered("<", v, zero), zero, v)


def _epilogue_formula(formula, residual, relu):
    """A window formula on vectors (x, others...): formula, then + z (with `residual`, the
    vector after x) and ReLU (with `relu`), in activate's order."""
    def with_epilogue(b, v, s):
        out = formula(b, [v[0]] + list(v[2:]), s) if residual else formula(b, v, s)
        if residual:
            out = b.fadd(out, v[1])
        return _relu_vector(b, out) if relu else out

    return with_epilogue


def _row_windows(residual, relu):
    """The rows' streamed window and the window across a row's end (a _stream_window and a
    _runs_window): ((x - hi) - lo) * (rs * w) + bias on vectors x, (z,) w, bias, then + z
    with `residual` and ReLU with `relu`."""
    if not (residual or relu):
        return _normalize_window, _runs_normalize_window
    row = _epilogue_formula(_normalize_window_formula, residual, relu)
    return _stream_window(row), _runs_window(row)


def _cell_windows(residual, relu):
    """The cells' (or runs') streamed window and the window across a cell's end:
    (x - hi) * sc + sh on vectors x (, z), then + z with `residual` and ReLU with `relu`."""
    if not (residual or relu):
        return _affine_window, _runs_affine_window
    cell = _epilogue_formula(_affine_window_formula, residual, relu)
    return _stream_window(cell), _runs_window(cell)


def _affine_runs_epilogue(residual, relu):
    """stream_affine_runs with + z (`residual`: arrays (x, z)) and then ReLU (`relu`)."""
    window, seam = _cell_windows(residual, relu)

    def element(j, v, s):
        raise NotImplementedError

    @overload(element, jit_options={"fastmath": _ELEMENTWISE})
    def _element(j, v, s):
        return lambda j, v, s: _cell_value(v[0], v[-1], j, s, residual, relu)

    return _streaming_runs(seam, window, element)


# affine_runs' epilogues, streamed: arrays (x,) or (x, z), coefficients (hi, sc, sh)
stream_affine_runs_relu = _affine_runs_epilogue(False, True)
stream_affine_runs_residual = _affine_runs_epilogue(True, False)
stream_affine_runs_both = _affine_runs_epilogue(True, True)


# (x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out, var_out, r0, r1); z empty
# without the residual
streamed_fused_rows = _streamed_fused_rows(False, False)
streamed_fused_rows_relu = _streamed_fused_rows(False, True)
streamed_fused_rows_residual = _streamed_fused_rows(True, False)
streamed_fused_rows_both = _streamed_fused_rows(True, True)


def _seamed_row(residual, relu):
    """A jit-only helper (x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last)
    -> (i, before): rows_forward's row r (channel c) of B values, A == 1, its statistics
    (float64 mean, rstd) known, with non-temporal stores wherever y starts, plus the residual
    z (`residual`) and ReLU (`relu`): the windows of LANES values on y's window boundaries from
    i (where the last row's windows stopped) through the last one inside this row. The window
    across the end of a run (a row, or a parameter cell of P >= STREAM_RUN values) is written
    once the next run's coefficients are known: its lanes take each run's in turn (a
    _runs_window), so that every line but the block's first and last is written by
    non-temporal stores alone. before: the coefficients of the run that ends at i's window;
    first / last: the block's first row (its values before i are written plain) and its last
    (its values after its last window). Returns the next i and this row's last coefficients.
    P == 1: weight and bias per element, tiled in wt, bt; otherwise the cells (C * B // P,).
    Each window prefetches x (and z) on: rows with a weight per element a row on, into the L2
    alone from LONG_ROW bytes (prefetch_l2); rows of cells RUN_AHEAD bytes on (a row on,
    GroupNorm (32, 64, 56, 56)'s rows of 25 KiB ran 1.24-1.28x slower; into the L2 alone
    0.94-0.95x that). float32 / float64 arrays of one dtype."""
    row_window, row_seam = _row_windows(residual, relu)
    cell_window, cell_seam = _cell_windows(residual, relu)
    row_windows = _window_loop(row_window, groups=SEAMED_GROUPS)
    row_windows_l2 = _window_loop(row_window, prefetch_l2, (SEAMED_GROUPS[0], 1))
    cell_windows = _window_loop(cell_window, groups=SEAMED_GROUPS)

    def helper(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last):
        raise NotImplementedError

    @overload(helper, jit_options={"fastmath": _ELEMENTWISE})
    def _helper(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last):
        if not _streamable(y, (x, z, wt, bt)):
            def unstreamable(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first,
                             last):
                if r >= 0:
                    raise TypeError("stream_seamed_row: float32 or float64 arrays of one dtype")
                return i, before

            return unstreamable

        def impl(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last):
            s = r * B
            # the windows' arrays, also prefetched (`residual` is a constant of this helper)
            xz = (x, z) if residual else (x,)
            if P == 1:
                hi, lo = split(mean, x)
                here = (hi, lo, narrow(rstd, x))
                p = c * B - s       # wt's index of x's flat index s + k is p + s + k
                if first:
                    for j in range(s, i):
                        y[j] = _row_value(x, z, wt, bt, j, p + j, here, residual, relu)
                elif i < s:     # the last row's cell ends where this one's starts, or at C * B
                    row_seam(y, i, xz, (c if c else C) * B - (s - i), (wt, bt), s - i, before,
                             here)
                    i += LANES
                # (a loop per case: a test inside the loop cost stream_normalize 0.88x)
                if B * y.itemsize >= LONG_ROW:
                    i = row_windows_l2(y, i, s + B, xz, p + i, (wt, bt), here, xz, B)
                else:
                    i = row_windows(y, i, s + B, xz, p + i, (wt, bt), here, xz, B)
                if last:
                    for j in range(i, s + B):
                        y[j] = _row_value(x, z, wt, bt, j, p + j, here, residual, relu)
                return i, here
            Q = B // P
            ahead = run_ahead(x, B)
            for q in range(Q):
                here = fold(mean, rstd * wt[c * Q + q], bt[c * Q + q], x)
                t = s + q * P
                if first and q == 0:
                    for j in range(t, i):
                        y[j] = _cell_value(x, z, j, here, residual, relu)
                elif i < t:
                    cell_seam(y, i, xz, 0, (), t - i, before, here)
                    i += LANES
                i = cell_windows(y, i, t + P, xz, 0, (), here, xz, ahead)
                if last and q == Q - 1:
                    for j in range(i, t + P):
                        y[j] = _cell_value(x, z, j, here, residual, relu)
                before = here
            return i, before

        return impl

    return helper


@_jit(fastmath=_ELEMENTWISE, inline="always")
def _row_value(x, z, wt, bt, j, p, here, residual, relu):
    """A seamed row's value at x's flat index j, its weight and bias at p, plain: the
    windows' formula (_normalize1's, + z, ReLU)."""
    v = ((x[j] - here[0]) - here[1]) * (here[2] * wt[p]) + bt[p]
    if residual:
        v = v + z[j]
    return activate(v, relu)


@_jit(fastmath=_ELEMENTWISE, inline="always")
def _cell_value(x, z, j, here, residual, relu):
    """A seamed cell's value at x's flat index j, plain: _affine1's formula, + z, ReLU."""
    v = (x[j] - here[0]) * here[1] + here[2]
    if residual:
        v = v + z[j]
    return activate(v, relu)


_seamed_plain, _seamed_relu = _seamed_row(False, False), _seamed_row(False, True)
_seamed_residual, _seamed_both = _seamed_row(True, False), _seamed_row(True, True)


def _seamed_pair(residual, relu):
    """A jit-only helper (x, z, y, wt, bt, B, s, here0, here1, i, before) -> (i, before): two
    rows of B values with a weight per element, LayerNorm's (C == 1), starting at s and s + B,
    both statistics known, neither the first nor the last of their block (_seamed_row's
    `first` / `last`), plus the residual z (`residual`) and ReLU (`relu`): _seamed_row's
    helper on each, but the windows in strips of PAIR_STRIP values, the first row's strip and
    then the second's, so that each strip of wt and bt is read from the L1 twice; the window
    across the two rows' seam last. The next pair's rows are prefetched into the L2 as the
    windows stream. The same values as _seamed_row's, bit for bit."""
    row_window, row_seam = _row_windows(residual, relu)
    row_windows_l2 = _window_loop(row_window, prefetch_l2, (SEAMED_GROUPS[0], 1))

    def helper(x, z, y, wt, bt, B, s, here0, here1, i, before):
        raise NotImplementedError

    @overload(helper, jit_options={"fastmath": _ELEMENTWISE})
    def _helper(x, z, y, wt, bt, B, s, here0, here1, i, before):
        if not _streamable(y, (x, z, wt, bt)):  # float16 bits: the caller never comes here
            def unstreamable(x, z, y, wt, bt, B, s, here0, here1, i, before):
                if s >= 0:
                    raise TypeError("_seamed_pair: float32 or float64 arrays of one dtype")
                return i, before

            return unstreamable

        def impl(x, z, y, wt, bt, B, s, here0, here1, i, before):
            xz = (x, z) if residual else (x,)
            cols = (wt, bt)
            if i < s:       # the window across the last row's end and the first row's start
                row_seam(y, i, xz, B - (s - i), cols, s - i, before, here0)
                i += LANES
            s1 = s + B
            e0 = i + (s1 - i) // LANES * LANES          # the first row's whole windows end
            a1 = e0 + LANES if e0 < s1 else e0          # and the second row's start
            e1 = a1 + (s1 + B - a1) // LANES * LANES
            for t in range(0, max(e0 - i, e1 - a1), PAIR_STRIP):
                # one call site for both rows: a second inlined copy of the window loop in one
                # function failed Numba's IR checks (NumbaIRAssumptionWarning)
                for k in range(2):
                    j, end, here = (i + t, e0, here0) if k == 0 else (a1 + t, e1, here1)
                    if j < end:
                        row_windows_l2(y, j, min(j + PAIR_STRIP, end), xz, j - s - k * B, cols,
                                       here, xz, 2 * B)
            if e0 < s1:
                row_seam(y, e0, xz, B - (s1 - e0), cols, s1 - e0, here0, here1)
            return e1, here1

        return impl

    return helper


_pair_plain, _pair_relu = _seamed_pair(False, False), _seamed_pair(False, True)
_pair_residual, _pair_both = _seamed_pair(True, False), _seamed_pair(True, True)


@_jit(inline="always")
def stream_seamed_pair(x, z, relu, y, wt, bt, B, s, here0, here1, i, before):
    """_seamed_pair's helper for the residual z (empty: none) and ReLU asked (jit only)."""
    if z.size:
        if relu:
            return _pair_both(x, z, y, wt, bt, B, s, here0, here1, i, before)
        return _pair_residual(x, z, y, wt, bt, B, s, here0, here1, i, before)
    if relu:
        return _pair_relu(x, z, y, wt, bt, B, s, here0, here1, i, before)
    return _pair_plain(x, z, y, wt, bt, B, s, here0, here1, i, before)


@_jit(inline="always")
def stream_seamed_row(x, z, relu, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first,
                      last):
    """_seamed_row's helper for the residual z (empty: none) and ReLU asked (jit only).
    Against a streamed run per row, its head and tail in plain stores that shared a line
    with the next row's, into NumPy's out= with caches swept: LayerNorm float32 (4096, 4096)
    1.19x, (16384, 1536) 1.25x, (8192, 2048) 1.10x; into page-aligned outputs 1.03x;
    InstanceNorm / GroupNorm (32, 64, 56, 56) 1.00-1.03x."""
    if z.size:
        if relu:
            return _seamed_both(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first,
                                last)
        return _seamed_residual(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first,
                                last)
    if relu:
        return _seamed_relu(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last)
    return _seamed_plain(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before, first, last)


@_jit()
def short_rows_fused(x, z, relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                     r0, r1, stream):
    """rows_forward's rows of up to FUSED_ROW values with a weight per element, one row at a
    time: its statistics and at once its normalization; z: the residual, or empty; ReLU last
    when `relu`.
    Reading the next row while the last one is written kept memory busier than a block's
    reads and then its writes (bench/ab.py against the blocks, float32 / float64): LayerNorm
    (65536, 128) forward 1.15 / 1.05-1.14x, (16384, 64) 1.40 / 1.33x, (65536, 100) 1.31x;
    GroupNorm (64, 256, 7, 7) 32 groups 1.22 / 1.09x, 128 groups 1.35 / 1.05x. The
    normalization keeps the elementwise loops' formula exactly (exact_normalize; the streamed
    windows compute the same), though this kernel reassociates its sums.
    stream: non-temporal stores (streamed_fused_rows), with w and bias tiled. LayerNorm
    forward into NumPy's out= (16 bytes past a line), caches swept before each call / not:
    float32 (65536, 128) 1.39 / 1.45x, (16384, 512) 1.60x, (131072, 256) 2.10x against
    plain stores and no pipelining; then against the pipelined plain stores, float32
    (262144, 64) 1.08 / 1.04x, (65536, 100) 1.08 / 1.07x, float64 (65536, 128) 1.22 / 1.26x,
    (16384, 256) 1.54x, (131072, 64) 1.31x. A call of stream_normalize per row instead, its
    plain head and tail on each row's partial lines, ran 0.68x on rows of 128 16 bytes off
    a line, 0.86x on float64 rows of 128 aligned."""
    if not relu and not z.size:
        short_rows_fused_plain(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out,
                               var_out, r0, r1, stream)
    elif stream and z.size and relu:
        streamed_fused_rows_both(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out,
                                 var_out, r0, r1)
    elif stream and z.size:
        streamed_fused_rows_residual(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out,
                                     var_out, r0, r1)
    elif stream:
        streamed_fused_rows_relu(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out,
                                 var_out, r0, r1)
    elif z.size:
        fused_rows((x, z), relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                   r0, r1)
    else:
        fused_rows((x,), relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out, r0,
                   r1)


@_jit()
def short_rows_fused_plain(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                           r0, r1, stream):
    """short_rows_fused without a residual or ReLU (z empty), in a function of its own: the
    plain call's kernel (rows_forward_fused_plain) compiles these loops alone."""
    if stream:
        streamed_fused_rows(x, z, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                            r0, r1)
    else:
        fused_rows((x,), False, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                   r0, r1)


@_jit()
def short_rows_forward(x, z, relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out, var_out,
                       r0, r1, stream):
    """rows_forward on the rows [r0, r1) of length B <= SHORT_ROW with an affine parameter per
    element (LayerNorm, RMSNorm; InstanceNorm / GroupNorm short cells repeated per element:
    C statistics per sample): float16 rows and float32 rows under 64 values (the others:
    short_rows_fused), SHORT_BLOCK rows at a time: their statistics, then
    their normalization, one call each (two calls per row made the LayerNorm (65536, 128)
    forward 1.2-1.7x slower)."""
    # two allocations rather than five: each took ~40 ns of a ~4 us LayerNorm (4, 64) call
    n = min(SHORT_BLOCK, r1 - r0)
    moments = np.empty((2, n))
    mean, m2 = moments[0], moments[1]
    scalars = np.empty((3, n), w.dtype)
    hi, lo, rs = scalars[0], scalars[1], scalars[2]
    for b0 in range(r0, r1, SHORT_BLOCK):
        b1 = min(b0 + SHORT_BLOCK, r1)
        short_rows_moments(x, b0, b1, B, mean, m2)
        for i in range(b1 - b0):
            mu, rstd = save_stats(B, mean[i], m2[i], centered, eps, b0 + i, mean_out,
                                  rstd_out, var_out)
            hi[i], lo[i] = split(mu, x)
            rs[i] = rstd
        short_rows_normalize(x, z, relu, y, b0, b1, C, B, hi, lo, rs, w, bias, stream)
    if stream:
        sfence()


@_jit(inline="always")
def row_blocks(R, n):
    """Blocks of statistics for R statistics of n values (contiguous per thread, as a prange
    over the statistics would split them), so that the fence after streamed stores comes once
    per block: once per row of 128 made LayerNorm (65536, 128) 2.7x slower."""
    return max(1, min(R, ROW_BLOCKS, R * n // ROW_BLOCK_MIN))


@_jit(inline="always")
def streams_rows(y, B, stream):
    """Whether rows of B values may stream into y: a window or more per row (one spans two
    rows at most), y's lines of whole values."""
    return stream and B >= LANES and y.ctypes.data % y.itemsize == 0


# The row kernels come one per loop, and the most common ones again without the ReLU /
# residual epilogue (*_plain), the front end choosing (normcore/_cpu.py: rows_forward_kernel,
# rows_backward_kernel): a kernel that chose at run time compiled every loop for each
# signature, those its inputs never take included (a fresh process's first LayerNorm (4, 64)
# forward + backward compiled ~2x as long). They take the same arguments.

def _rows_forward(epilogue):
    """rows_forward, or without `epilogue` rows_forward_plain: the same kernel for calls
    without a residual or ReLU (z empty, relu False), which compiles none of their streamed
    loops (rows_forward_rows_plain). `epilogue` is a constant of the closure, and the branch
    on it goes before Numba types the kernel."""

    def rows_forward(x, z, relu, centered, O, A, C, B, P, w, bias, eps, y, mean_out, rstd_out,
                     var_out, stream):
        """Fused statistics + normalize + affine (+ residual, ReLU), one statistic at a time:
        any rows (rows_forward_rows).

        x, y (and z, or empty): the flat (O, A, C, B) view; statistic r = o * C + c.
        centered=False gives RMSNorm: mean 0 and var = mean(x**2).
        w, bias: (C * B // P,) parameter cells in the compute dtype.
        mean_out, rstd_out: (O * C,) saved statistics; var_out: (O * C,) float64 variance for
        the running statistics, or an empty array when the caller needs none.
        stream: non-temporal stores where affine_run can use them (outputs far larger than
        L3). Contiguous rows (A == 1) with a weight per element or cells of STREAM_RUN values
        or more stream across their ends (stream_seamed_row): against a streamed run per row,
        its head and tail in plain stores, into NumPy's out= with caches swept, LayerNorm
        float32 (4096, 4096) 1.19x, (16384, 1536) 1.25x, (8192, 2048) 1.10x; into
        page-aligned outputs 1.03x; float64 (4096, 4096) 0.99x; InstanceNorm / GroupNorm
        (32, 64, 56, 56) 1.00-1.03x.
        """
        x, z, y, w, bias = borrow(x), borrow(z), borrow(y), borrow(w), borrow(bias)
        R = O * C
        nblk = row_blocks(R, A * B)
        seamed = streams_rows(y, B, stream) and A == 1 and x.itemsize >= 4 and (
            P == 1 or P >= STREAM_RUN)
        wt = tile_columns(w) if seamed and P == 1 else w
        bt = tile_columns(bias) if seamed and P == 1 else bias
        for k in prange(nblk):
            r0, r1 = k * R // nblk, (k + 1) * R // nblk
            if epilogue:
                rows_forward_rows(x, z, relu, centered, A, C, B, P, w, bias, wt, bt, eps, y,
                                  mean_out, rstd_out, var_out, seamed, stream, r0, r1)
            else:
                rows_forward_rows_plain(x, z, relu, centered, A, C, B, P, w, bias, wt, bt, eps,
                                        y, mean_out, rstd_out, var_out, seamed, stream, r0, r1)

    return rows_forward


rows_forward, rows_forward_plain = _variants(_rows_forward, parallel=True)


def _rows_forward_fused(epilogue):
    """rows_forward_fused, or without `epilogue` rows_forward_fused_plain (short_rows_fused_plain:
    see _rows_forward)."""

    def rows_forward_fused(x, z, relu, centered, O, A, C, B, P, w, bias, eps, y, mean_out,
                           rstd_out, var_out, stream):
        """rows_forward on contiguous rows (A == 1) of float32 / float64 values with a weight
        per element (P == 1), each row's statistics and normalization at once
        (short_rows_fused)."""
        x, z, y, w, bias = borrow(x), borrow(z), borrow(y), borrow(w), borrow(bias)
        R = O * C
        nblk = row_blocks(R, B)
        stream = streams_rows(y, B, stream)
        wt = tile_columns(w) if stream else w
        bt = tile_columns(bias) if stream else bias
        for k in prange(nblk):
            r0, r1 = k * R // nblk, (k + 1) * R // nblk
            if epilogue:
                short_rows_fused(x, z, relu, centered, C, B, wt, bt, eps, y, mean_out, rstd_out,
                                 var_out, r0, r1, stream)
            else:
                short_rows_fused_plain(x, z, centered, C, B, wt, bt, eps, y, mean_out, rstd_out,
                                       var_out, r0, r1, stream)

    return rows_forward_fused


rows_forward_fused, rows_forward_fused_plain = _variants(_rows_forward_fused, parallel=True)


@_jit(parallel=True)
def rows_forward_short(x, z, relu, centered, O, A, C, B, P, w, bias, eps, y, mean_out,
                       rstd_out, var_out, stream):
    """rows_forward on contiguous rows (A == 1) of up to SHORT_ROW values with a weight per
    element (P == 1) in blocks of rows (short_rows_forward)."""
    x, z, y, w, bias = borrow(x), borrow(z), borrow(y), borrow(w), borrow(bias)
    R = O * C
    nblk = row_blocks(R, B)
    stream = stream and not relu and not z.size and short_rows_stream(y, B, LANES)
    for k in prange(nblk):
        short_rows_forward(x, z, relu, centered, C, B, w, bias, eps, y, mean_out, rstd_out,
                           var_out, k * R // nblk, (k + 1) * R // nblk, stream)


def _rows_forward_rows(epilogue):
    """rows_forward_rows, or without `epilogue` rows_forward_rows_plain (see _rows_forward)."""

    def rows_forward_rows(x, z, relu, centered, A, C, B, P, w, bias, wt, bt, eps, y, mean_out,
                          rstd_out, var_out, seamed, stream, r0, r1):
        """rows_forward's rows of any length, [r0, r1): the statistic's moments, then its runs
        normalized (streamed across the rows' ends when `seamed`)."""
        o, c = r0 // C, r0 % C      # then stepped: two divisions per row of 128 cost ~15%
        i = window_above(y, r0 * B, LANES)
        h0, l0 = split(0.0, x)
        before = (h0, l0, narrow(0.0, x))
        pairs = seamed and C == 1 and P == 1 and x.itemsize == 4 and B * 4 >= PAIR_ROW
        r = r0
        while r < r1:
            if pairs and r > r0 and r + 2 < r1:     # (C == 1: statistic r is o = r's)
                here0 = row_coefficients(x, o, A, C, B, centered, eps, r, mean_out, rstd_out,
                                         var_out)
                here1 = row_coefficients(x, o + 1, A, C, B, centered, eps, r + 1, mean_out,
                                         rstd_out, var_out)
                if epilogue:
                    i, before = stream_seamed_pair(x, z, relu, y, wt, bt, B, r * B, here0,
                                                   here1, i, before)
                else:
                    i, before = _pair_plain(x, z, y, wt, bt, B, r * B, here0, here1, i,
                                            before)
                o += 2
                r += 2
                continue
            n, mean, m2 = stat_moments(x, o, c, A, C, B, True)
            mean, rstd = save_stats(n, mean, m2, centered, eps, r, mean_out, rstd_out, var_out)
            if seamed and epilogue:
                i, before = stream_seamed_row(x, z, relu, y, wt, bt, C, B, P, r, c, mean, rstd,
                                              i, before, r == r0, r == r1 - 1)
            elif seamed:
                i, before = _seamed_plain(x, z, y, wt, bt, C, B, P, r, c, mean, rstd, i, before,
                                          r == r0, r == r1 - 1)
            # the next statistic's runs follow this one's by B values, except from the last
            # channel of an o with A > 1: their first RUN_AHEAD bytes are prefetched
            ahead = run_ahead(x, B) if A == 1 or c + 1 < C else 0
            for a in range(0 if seamed else A):
                lo = ((o * A + a) * C + c) * B
                if epilogue:
                    zs = z[lo:lo + B] if z.size else z
                    normalize_run(x[lo:lo + B], zs, y[lo:lo + B], relu, mean, rstd, w, bias, c,
                                  0, B, P, stream, ahead)
                else:
                    normalize_run_plain(x[lo:lo + B], z, y[lo:lo + B], False, mean, rstd, w,
                                        bias, c, 0, B, P, stream, ahead)
            c += 1
            if c == C:
                o, c = o + 1, 0
            r += 1
        if stream:
            sfence()

    return rows_forward_rows


rows_forward_rows, rows_forward_rows_plain = _variants(_rows_forward_rows)


@_jit(fastmath=_ELEMENTWISE)
def short_row_dx(dys, ys, relu, xs, dxs, dzs, hi, lo, rs, b, c, w):
    """dx_run on one row with a parameter cell per element: dx = rs * w * dy - b * (x - mean)
    - c with the mean as hi + lo, b = rstd**2 * c1 and c = rstd * c2, all in the compute dtype;
    dz = dy (after ReLU's mask) when dzs is not empty."""
    if relu:
        for i in range(xs.size):
            d = relu_dy(dys, ys, i)
            dxs[i] = store((rs * w[i]) * d - b * center(loadc(xs[i]), hi, lo) - c, dxs)
    else:
        for i in range(xs.size):
            d = loadc(dys[i])
            dxs[i] = store((rs * w[i]) * d - b * center(loadc(xs[i]), hi, lo) - c, dxs)
    if dzs.size:
        dz_run(dys, ys, relu, dzs)


@_jit()
def short_rows_backward(dy, y, relu, x, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                        dweight_part, dx, dz, r0, r1, stream):
    """rows_backward on the rows [r0, r1) of length B <= FUSED_ROW with a parameter cell per
    element (LayerNorm, RMSNorm). relu reaches the row loop as a constant (two compiled
    loops): passed through as a run-time flag, the row helpers took 1.3x as long. stream:
    dx (and dz behind a ReLU) with non-temporal stores (streamed_short_rows_loop), wt: w
    tiled."""
    if not relu:
        short_rows_backward_plain(dy, y, x, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                                  dweight_part, dx, dz, r0, r1, stream)
    elif stream:
        streamed_short_rows_loop((x, dy, y), B, mean, rstd, w, wt, frozen, centered,
                                 dbias_part, dweight_part, dx, dz, r0, r1)
    else:
        short_rows_loop(dy, y, True, x, B, mean, rstd, w, frozen, centered, dbias_part,
                        dweight_part, dx, dz, r0, r1)


@_jit()
def short_rows_backward_plain(dy, y, x, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                              dweight_part, dx, dz, r0, r1, stream):
    """short_rows_backward without ReLU (y and dz empty), in a function of its own: the
    plain call's kernel (rows_backward_short_plain) compiles these loops alone."""
    if stream:
        streamed_short_rows_loop((x, dy), B, mean, rstd, w, wt, frozen, centered, dbias_part,
                                 dweight_part, dx, dz, r0, r1)
    else:
        short_rows_loop(dy, y, False, x, B, mean, rstd, w, frozen, centered, dbias_part,
                        dweight_part, dx, dz, r0, r1)


@_jit(inline="always")
def row_dx_coefficients(dys, ys, relu, xs, r, B, mean, rstd, w, frozen, centered, dbias,
                        dweight):
    """Row r's sums (cell_sums, into the parameter partials dbias / dweight) and the
    coefficients of its dx = (rs * w) * dy - bq * ((x - hi) - lo) - cq: (hi, lo, rs, bq, cq)
    in the compute precision."""
    rstd_r = np.float64(rstd[r])
    hi, lo = split(np.float64(mean[r]), xs)
    rs = narrow(rstd_r, xs)
    g1, g2 = cell_sums(dys, ys, relu, xs, hi, lo, rs, w, dbias, dweight)
    c1 = 0.0 if frozen else g2 / B
    c2 = 0.0 if frozen or not centered else g1 / B
    return hi, lo, rs, narrow(rstd_r * rstd_r * c1, xs), narrow(rstd_r * c2, xs)


@_jit()
def short_rows_loop(dy, y, relu, x, B, mean, rstd, w, frozen, centered, dbias_part,
                    dweight_part, dx, dz, r0, r1):
    """short_rows_backward's loop: a row's sums, then its dx while the row is in L1 (32 rows
    of sums, then their dx from L2, took 1.3-1.6x as long); the float32 parameter partials
    are flushed every BLOCK_ROWS rows as in the row-by-row loop. The sums (cell_sums) are
    inlined here: as a call per row of 128 values they made the LayerNorm backward 1.22x as
    long on (2048, 128), (65536, 128) and (4096, 512) (A/B in one process, float32). So is
    the dx (short_row_dx's loop through exact_dx, which keeps its formula under this loop's
    reassociating flags): against a call per row, LayerNorm backward 1.45x float16 on
    (65536, 128), (16384, 49), (131072, 64), float32 1.02-1.31x, float64 0.98-1.04x. (The
    same in short_cells_loop's GroupNorm cells: 1.02-1.18x there, InstanceNorm rows
    0.96-0.99x: not taken.)"""
    w = borrow(w)
    dbias = np.zeros(dbias_part.size, w.dtype)
    dweight = np.zeros(dweight_part.size, w.dtype)
    ahead = rows_ahead(x, B)
    for r in range(r0, r1):
        if (r - r0) % BLOCK_ROWS == 0 and r > r0:
            flush(dbias, dbias_part)
            flush(dweight, dweight_part)
        s = r * B
        prefetch_row((x, dy), s, ahead, B)
        xs, dys = x[s:s + B], dy[s:s + B]
        ys = y[s:s + B] if relu else y
        hi, lo, rs, bq, cq = row_dx_coefficients(dys, ys, relu, xs, r, B, mean, rstd, w, frozen,
                                                 centered, dbias, dweight)
        dxs = dx[s:s + B]
        if relu:
            for i in range(B):
                dxs[i] = store(exact_dx(loadc(xs[i]), hi, lo, rs * w[i], relu_dy(dys, ys, i),
                                        bq, cq), dxs)
        else:
            for i in range(B):
                dxs[i] = store(exact_dx(loadc(xs[i]), hi, lo, rs * w[i], loadc(dys[i]), bq, cq),
                               dxs)
        if dz.size:
            dz_run(dys, ys, relu, dz[s:s + B])
    flush(dbias, dbias_part)
    flush(dweight, dweight_part)


@_jit(fastmath=_ELEMENTWISE)
def dx_piece(dx, arrays, j0, j1, wt, p, hi, lo, rs, b, cc):
    """dx[j0:j1] = (rs * w) * dy - b * ((x - hi) - lo) - cc with plain stores, on a piece of
    one row whose weights start at wt[p]; arrays: (x, dy), or (x, dy, y) for dy masked by
    ReLU's gradient (y > 0)."""
    n = j1 - j0
    pieces = tuple_of(arrays, slice(j0, j1)) + (wt[p:p + n],)
    for j in range(n):
        dx[j0 + j] = _dx1(j, pieces, (hi, lo, rs, b, cc))


_dx_windows = _window_loop(_dx_window, groups=DX_GROUPS)
# float32 rows of LONG_ROW bytes or more (stream_seamed_dx_row, as _seamed_row's windows)
_dx_windows_l2 = _window_loop(_dx_window, fetch=prefetch_l2, groups=DX_GROUPS)


@_jit(fastmath=_ELEMENTWISE)
def stream_dx_piece(dx, arrays, wt, i, end, p, hi, lo, rs, b, cc, ahead):
    """dx_piece's values streamed, DX_LANES at a time from the flat index i (on a window
    boundary of dx) while the windows end by `end`; returns where the next one starts.
    ahead > 0: each window prefetches the arrays that many values on."""
    return _dx_windows(dx, i, end, arrays, p, (wt,), (hi, lo, rs, b, cc), arrays, ahead)


@_jit(fastmath=_ELEMENTWISE)
def stream_dx_seam(dx, arrays, wt, i, p, first, here, after):
    """The streamed dx window at i across a row's end (as _streamed_fused_rows): its lanes below
    `first` with the row's (hi, lo, rs, b, cc), `here`, the others with the next row's."""
    _runs_dx_window(dx, i, arrays, p, (wt,), first, here, after)


@_jit(fastmath=_ELEMENTWISE)
def dz_piece(dz, dy, y, j0, j1):
    """dz[j0:j1] = dy masked by ReLU's gradient, plain stores."""
    for j in range(j0, j1):
        dz[j] = store(relu_dy(dy, y, j), dz)


def stream_dz_piece(dz, dy, y, i, end):
    """dz_piece's values streamed, DX_LANES at a time from the flat index i (on a window
    boundary of dz) while the windows end by `end`; returns where the next one starts. dz
    depends on no statistic: a row's windows need no seam, and dz's own line boundaries
    need not be dx's. float32 / float64 arrays of one dtype (jit only)."""
    raise NotImplementedError


@overload(stream_dz_piece, jit_options={"fastmath": _ELEMENTWISE})
def _stream_dz_piece(dz, dy, y, i, end):
    if not _streamable(dz, (dy, y)):
        def unstreamable(dz, dy, y, i, end):
            if i >= 0:
                raise TypeError("stream_dz_piece: float32 or float64 arrays of one dtype")
            return i

        return unstreamable

    def impl(dz, dy, y, i, end):
        while i + DX_LANES <= end:
            _dz_window(dz, i, (dy, y), 0, (), ())
            i += DX_LANES
        return i

    return impl


def streamed_short_rows_loop(arrays, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                             dweight_part, dx, dz, r0, r1):
    """short_rows_loop with dx streamed wherever it starts (as streamed_fused_rows): windows
    of DX_LANES values from dx's first 64-byte line boundary run across the rows' ends; a
    row's windows follow its sums, but the one across its end waits for the next row's,
    which give the coefficients of its last lanes. Plain stores before the first line
    boundary and after the last. Each window prefetches the arrays rows_ahead on, rather than
    a row's lines at once (LayerNorm backward, caches swept, (65536, 128) 1.06-1.10x,
    (8192, 1024) 1.14-1.19x, (16384, 1024) 1.12-1.23x; a row further on: 0.96-1.06x against
    that). arrays: (x, dy), or (x, dy, y) behind a ReLU, whose dz (the residual's gradient,
    or empty) streams too, on its own line boundaries. float32 / float64 arrays of one dtype
    (jit only)."""
    raise NotImplementedError


@overload(streamed_short_rows_loop, jit_options={"fastmath": _REDUCE})
def _streamed_short_rows_loop(arrays, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                              dweight_part, dx, dz, r0, r1):
    if not _streamable(dx, tuple(arrays) + (wt, dz)):
        def unstreamable(arrays, B, mean, rstd, w, wt, frozen, centered, dbias_part,
                         dweight_part, dx, dz, r0, r1):
            raise TypeError("streamed_short_rows_loop: float32 or float64 arrays of one dtype")

        return unstreamable
    relu = len(arrays) == 3

    def impl(arrays, B, mean, rstd, w, wt, frozen, centered, dbias_part, dweight_part, dx, dz,
             r0, r1):
        if r0 >= r1:
            return
        w = borrow(w)
        x, dy = arrays[0], arrays[1]
        if relu:    # a constant of this overload: the loop below is compiled for one case
            y = arrays[2]
        else:
            y = dy
        dbias = np.zeros(dbias_part.size, w.dtype)
        dweight = np.zeros(dweight_part.size, w.dtype)
        ahead = rows_ahead(x, B)
        line = 64 // dx.itemsize
        i = window_above(dx, r0 * B, line)
        iz = window_above(dz, r0 * B, line) if dz.size else 0
        if dz.size:
            dz_piece(dz, dy, y, r0 * B, iz)
        hi, lo = split(0.0, x)
        rs = bq = cq = narrow(0.0, x)
        for r in range(r0, r1):
            if (r - r0) % BLOCK_ROWS == 0 and r > r0:
                flush(dbias, dbias_part)
                flush(dweight, dweight_part)
            s = r * B
            xs, dys, ys = x[s:s + B], dy[s:s + B], y[s:s + B]
            h, low, rsn, bn, cn = row_dx_coefficients(dys, ys, relu, xs, r, B, mean, rstd, w,
                                                      frozen, centered, dbias, dweight)
            if r == r0:         # row r0's values before the first line boundary
                dx_piece(dx, arrays, s, i, wt, 0, h, low, rsn, bn, cn)
            elif i < s:
                stream_dx_seam(dx, arrays, wt, i, i - s + B, s - i, (hi, lo, rs, bq, cq),
                               (h, low, rsn, bn, cn))
                i += DX_LANES
            hi, lo, rs, bq, cq = h, low, rsn, bn, cn
            # the last row's windows stop at a line boundary: a line half streamed and half
            # written by plain stores costs more than it saves
            end = s + B if r + 1 < r1 else window_below(dx, s + B, line)
            i = stream_dx_piece(dx, arrays, wt, i, end, i - s, hi, lo, rs, bq, cq, ahead)
            if dz.size:
                iz = stream_dz_piece(dz, dy, y, iz, window_below(dz, s + B, line))
        dx_piece(dx, arrays, i, r1 * B, wt, i - (r1 - 1) * B, hi, lo, rs, bq, cq)
        if dz.size:
            dz_piece(dz, dy, y, iz, r1 * B)
        flush(dbias, dbias_part)
        flush(dweight, dweight_part)
        sfence()

    return impl


def stream_seamed_dx_row(arrays, dx, wt, C, B, r, c, mean, rstd, c1, c2, i, before, first,
                         last):
    """dx of row r (channel c) of B values with a weight per element (tiled in wt, see
    tile_columns(w, DX_LANES)), A == 1, from its float64 mean, rstd and dx coefficients
    c1, c2, streamed wherever dx starts, as stream_seamed_row streams y: windows of DX_LANES
    values from dx's first line boundary on, the one across the row's end once the next
    row's coefficients are known. The block's first row writes its values before i plain,
    its last one those after its last whole line (a line half streamed and half written by
    plain stores costs more than it saves). before: the coefficients of the row that ends
    in i's window. Returns the next i and this row's coefficients. arrays: (x, dy), or
    (x, dy, y) behind a ReLU. float32 / float64 arrays of one dtype (jit only). Against a
    streamed run per row, its head and tail in plain stores, into NumPy's dx_out= with caches
    swept: LayerNorm float32 (4096, 4096) 1.03-1.18x (1.07x warm), (8192, 2048) 1.14x.
    The windows prefetch the next row as they go; float32 rows of LONG_ROW bytes or more
    into the L2 alone, since the row being read (x and dy) and the next one would overfill
    the L1 (32 KiB on the 2-core AMD EPYC Zen 4): against every level, same process,
    dx_out=, LayerNorm (4096, 4096) 1.05-1.27x (seven runs), (2048, 8192) 1.16-1.17x,
    (1024, 16384) 1.07-1.21x, (8192, 2048) 0.99-1.16x (eight runs), (11000, 1536)
    1.06-1.08x; float64 (4096, 4096) 0.96-1.00x and (5461, 1536) 0.99-1.01x, so float64
    keeps every level.
    GroupNorm's and InstanceNorm's cells of STREAM_RUN
    values or more, streamed this way, measured 0.94-0.98x and 0.99x on (32, 64, 56, 56):
    they keep a streamed run per cell (dx_scalar_run)."""
    raise NotImplementedError


@overload(stream_seamed_dx_row, jit_options={"fastmath": _ELEMENTWISE})
def _stream_seamed_dx_row(arrays, dx, wt, C, B, r, c, mean, rstd, c1, c2, i, before, first,
                          last):
    if not _streamable(dx, tuple(arrays) + (wt,)):
        def unstreamable(arrays, dx, wt, C, B, r, c, mean, rstd, c1, c2, i, before, first,
                         last):
            if r >= 0:
                raise TypeError("stream_seamed_dx_row: float32 or float64 arrays of one dtype")
            return i, before

        return unstreamable
    narrow_rows = dx.dtype == types.float32     # a constant: float64 compiles one loop

    def impl(arrays, dx, wt, C, B, r, c, mean, rstd, c1, c2, i, before, first, last):
        s = r * B
        x = arrays[0]
        hi, lo = split(mean, x)
        here = (hi, lo, narrow(rstd, x), narrow(rstd * rstd * c1, x), narrow(rstd * c2, x))
        p = c * B - s       # wt's index of x's flat index s + k is p + s + k
        if first:
            dx_piece(dx, arrays, s, i, wt, p + s, *here)
        elif i < s:         # the last row's cell ends where this one's starts, or at C * B
            stream_dx_seam(dx, arrays, wt, i, (c if c else C) * B - (s - i), s - i, before,
                           here)
            i += DX_LANES
        end = window_below(dx, s + B, 64 // dx.itemsize) if last else s + B
        if narrow_rows and B * dx.itemsize >= LONG_ROW:     # see stream_seamed_dx_row
            i = _dx_windows_l2(dx, i, end, arrays, p + i, (wt,), here, arrays, B)
        else:
            i = stream_dx_piece(dx, arrays, wt, i, end, p + i, *here, B)
        if last:
            dx_piece(dx, arrays, i, s + B, wt, p + i, *here)
        return i, here

    return impl


@_jit()
def short_cells_loop(dy, y, x, C, B, P, mean, rstd, w, w_dx, frozen, centered, dbias_part,
                     dweight_part, dx, stream, r0, r1):
    """rows_backward without ReLU or residual on the rows [r0, r1) of length B made of cells of
    P values, in one loop as short_rows_loop: a row's per-cell sums (run_sums, inlined), then
    its dx while the row is in cache, with the weights repeated per element (w_dx: GroupNorm
    short cells; plain stores, as the short LayerNorm rows') or, for rows of one cell
    (InstanceNorm rows of up to ROW_CELL values), their scalar weight (exact_dx_scalar_row,
    inlined: 1.05-1.14x on (64, 256, 7, 7) float16 / float32 against a
    call per row; dx_scalar_run where streamed). A call per row to each of backward_sums_run
    and dx_run cost ~100 ns a row of 49 values: InstanceNorm (64, 256, 7, 7) backward 2.4-2.8x,
    (64, 512, 4, 4) 3.3-3.8x, (32, 128, 14, 14) 1.7x, (16, 64, 28, 28) 1.1-1.2x faster in one
    process here, GroupNorm (64, 256, 7, 7) 1.5-1.6x, (64, 512, 7, 7) (rows of 784) 1.35x.
    GroupNorm's cells add up their sums two at a time (run_sums_pair: 1.00-1.06x float32 /
    float64, 1.04-1.12x float16 on (64, 256, 7, 7)), and InstanceNorm rows of up to
    PAIRED_ROW values go two at a time (instance_rows_loop)."""
    if P == B <= PAIRED_ROW:
        instance_rows_loop(dy, x, C, B, mean, rstd, w, frozen, centered, dbias_part,
                           dweight_part, dx, r0, r1)
        return
    Q = B // P
    dbias = np.zeros(dbias_part.size)
    dweight = np.zeros(dweight_part.size)
    c = r0 % C
    for r in range(r0, r1):
        s = r * B
        xs, dys = x[s:s + B], dy[s:s + B]
        rstd_r = np.float64(rstd[r])
        hi, lo = split(np.float64(mean[r]), x)
        rs = narrow(rstd_r, x)
        g1 = 0.0
        g2 = 0.0
        if Q > 1:       # GroupNorm's cells (P <= SHORT_CELL) in pairs, an odd last one with
            # itself (added once)
            for q in range(0, Q, 2):
                u = min(q + 1, Q - 1)
                h1, h2, k1, k2 = run_sums_pair(dys[q * P:(q + 1) * P], xs[q * P:(q + 1) * P],
                                               hi, lo, rs, dys[u * P:(u + 1) * P],
                                               xs[u * P:(u + 1) * P], hi, lo, rs)
                cell = c * Q + q
                dbias[cell] += h1
                dweight[cell] += h2
                g1 += w[cell] * h1
                g2 += w[cell] * h2
                if u > q:
                    dbias[cell + 1] += k1
                    dweight[cell + 1] += k2
                    g1 += w[cell + 1] * k1
                    g2 += w[cell + 1] * k2
        else:           # a row of one cell, BLOCK values at a time (backward_sums_run's)
            h1 = 0.0
            h2 = 0.0
            for s0 in range(0, B, BLOCK):
                a1, a2 = run_sums(dys[s0:s0 + BLOCK], y, False, xs[s0:s0 + BLOCK], hi, lo, rs)
                h1 += a1
                h2 += a2
            dbias[c] += h1
            dweight[c] += h2
            g1 += w[c] * h1
            g2 += w[c] * h2
        c1 = 0.0 if frozen else g2 / B
        c2 = 0.0 if frozen or not centered else g1 / B
        if Q > 1:       # GroupNorm's short cells: w_dx repeats the weights per element
            short_row_dx(dys, y, False, xs, dx[s:s + B], y, hi, lo, rs,
                         narrow(rstd_r * rstd_r * c1, x), narrow(rstd_r * c2, x),
                         w_dx[c * B:(c + 1) * B])
        elif stream:    # a row of one cell (InstanceNorm), its scalar weight: streamed,
            # prefetching RUN_AHEAD bytes on (the next row whole: InstanceNorm (32, 64, 56, 56)
            # backward 1.17-1.25x slower float32 / float64)
            dx_scalar_run_plain(dys, y, False, xs, dx[s:s + B], y, np.float64(mean[r]), rstd_r,
                                w[c], c1, c2, stream, run_ahead(x, B))
        else:           # the same, plain
            a, hq, nb, sh = dx_scalar_coefficients(np.float64(mean[r]), rstd_r, w[c], c1, c2, x)
            exact_dx_scalar_row(dys, xs, dx[s:s + B], a, hq, nb, sh)
        c = c + 1 if c + 1 < C else 0
    if stream:
        sfence()
    flush(dbias, dbias_part)
    flush(dweight, dweight_part)


@_jit(inline="always")
def exact_dx_scalar_row(dys, xs, dxs, a, hi, nb, sh):
    """dx_scalar_row's loop through exact_dx_scalar, for the rows loops compiled with _REDUCE
    (short_cells_loop, instance_rows_loop): inlined, because a call per row of 49 values cost
    1.05-1.14x on InstanceNorm (64, 256, 7, 7), and exact, because those kernels reassociate."""
    for i in range(xs.size):
        dxs[i] = store(exact_dx_scalar(loadc(xs[i]), hi, nb, sh, a, loadc(dys[i])), dxs)


@_jit(inline="always")
def scalar_dx_terms(mean, rstd, wc, h1, h2, n, frozen, centered, arr):
    """dx_scalar_coefficients of a statistic over n values with a scalar weight wc, from its
    sums h1 = sum(dy), h2 = sum(dy * xhat)."""
    c1 = 0.0 if frozen else wc * h2 / n
    c2 = 0.0 if frozen or not centered else wc * h1 / n
    return dx_scalar_coefficients(mean, rstd, wc, c1, c2, arr)


@_jit()
def instance_rows_loop(dy, x, C, B, mean, rstd, w, frozen, centered, dbias_part, dweight_part,
                       dx, r0, r1):
    """short_cells_loop's rows of one cell (InstanceNorm) of up to PAIRED_ROW values (plain
    stores), two rows at a time (an odd last one paired with itself): their sums in one loop
    (run_sums_pair), then each one's dx."""
    dbias = np.zeros(dbias_part.size)
    dweight = np.zeros(dweight_part.size)
    c = r0 % C
    for r in range(r0, r1, 2):
        t = min(r + 1, r1 - 1)
        ct = c if t == r else c + 1 if c + 1 < C else 0
        xs, dys, dxs = x[r * B:(r + 1) * B], dy[r * B:(r + 1) * B], dx[r * B:(r + 1) * B]
        xt, dyt, dxt = x[t * B:(t + 1) * B], dy[t * B:(t + 1) * B], dx[t * B:(t + 1) * B]
        mean_r, rstd_r = np.float64(mean[r]), np.float64(rstd[r])
        mean_t, rstd_t = np.float64(mean[t]), np.float64(rstd[t])
        hi, lo = split(mean_r, x)
        hj, lj = split(mean_t, x)
        h1, h2, k1, k2 = run_sums_pair(dys, xs, hi, lo, narrow(rstd_r, x), dyt, xt, hj, lj,
                                       narrow(rstd_t, x))
        dbias[c] += h1
        dweight[c] += h2
        if t > r:
            dbias[ct] += k1
            dweight[ct] += k2
        a, hq, nb, sh = scalar_dx_terms(mean_r, rstd_r, w[c], h1, h2, B, frozen, centered, x)
        at, hr, nt, st = scalar_dx_terms(mean_t, rstd_t, w[ct], k1, k2, B, frozen, centered, x)
        exact_dx_scalar_row(dys, xs, dxs, a, hq, nb, sh)
        exact_dx_scalar_row(dyt, xt, dxt, at, hr, nt, st)
        c = ct + 1 if ct + 1 < C else 0
    flush(dbias, dbias_part)
    flush(dweight, dweight_part)


def _rows_backward(epilogue):
    """rows_backward, or without `epilogue` rows_backward_plain, which compiles only the
    ReLU-less row loop (see _rows_forward)."""

    def rows_backward(dy, y, relu, x, O, A, C, B, P, mean, rstd, w, w_dx, frozen, centered,
                      nblk, dbias_part, dweight_part, dx, dz, stream):
        """Fused backward, one statistic at a time: its sums, then dx (and dz) from cache; any
        rows (rows_backward_block).

        mean, rstd: (O * C,) saved statistics (float32 or float64, used as float64).
        w: (C * B // P,) parameter cells in the compute dtype; w_dx: the same array, or w repeated
        per element (C * B values) for the dx pass, which then runs over a statistic's cells as
        one loop (short cells, see normcore/_plan.py: SHORT_CELL).
        dbias_part, dweight_part: (nblk, C * B // P) zeroed partial sums, one row per block of
        statistics, summed by the caller; each block adds BLOCK_ROWS statistics at a time in the
        compute dtype (w's) first.
        y: the saved output (read with relu only); dz: the residual's gradient, or empty.
        stream: non-temporal stores for dx where dx_run can use them (see rows_forward).
        """
        dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
        R = O * C
        for k in prange(nblk):
            r0, r1 = k * R // nblk, (k + 1) * R // nblk
            if epilogue and relu:   # a constant for the helpers (see short_rows_backward)
                rows_backward_block(dy, y, True, x, A, C, B, P, mean, rstd, w, w_dx, frozen,
                                    centered, dbias_part[k], dweight_part[k], dx, dz, stream,
                                    r0, r1)
            elif epilogue:
                rows_backward_block(dy, y, False, x, A, C, B, P, mean, rstd, w, w_dx, frozen,
                                    centered, dbias_part[k], dweight_part[k], dx, dz, stream,
                                    r0, r1)
            else:
                rows_backward_block_plain(dy, y, False, x, A, C, B, P, mean, rstd, w, w_dx,
                                          frozen, centered, dbias_part[k], dweight_part[k], dx,
                                          dz, stream, r0, r1)

    return rows_backward


rows_backward, rows_backward_plain = _variants(_rows_backward, parallel=True)


def _rows_backward_short(epilogue):
    """rows_backward_short, or without `epilogue` rows_backward_short_plain
    (short_rows_backward_plain: see _rows_forward)."""

    def rows_backward_short(dy, y, relu, x, O, A, C, B, P, mean, rstd, w, w_dx, frozen,
                            centered, nblk, dbias_part, dweight_part, dx, dz, stream):
        """rows_backward on contiguous rows (A == 1, C == 1) of up to FUSED_ROW values with a
        weight per element (P == 1): a row's sums and dx in one loop (short_rows_backward)."""
        dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
        R = O * C
        # float32 / float64 (the windows' types), rows of a line or more
        stream = (stream and dx.itemsize >= 4 and B * dx.itemsize >= 64
                  and streamable_dz(dx, dz, relu))
        wt = tile_columns(w, DX_LANES) if stream else w
        for k in prange(nblk):
            r0, r1 = k * R // nblk, (k + 1) * R // nblk
            if epilogue:
                short_rows_backward(dy, y, relu, x, B, mean, rstd, w, wt, frozen, centered,
                                    dbias_part[k], dweight_part[k], dx, dz, r0, r1, stream)
            else:
                short_rows_backward_plain(dy, y, x, B, mean, rstd, w, wt, frozen, centered,
                                          dbias_part[k], dweight_part[k], dx, dz, r0, r1,
                                          stream)

    return rows_backward_short


rows_backward_short, rows_backward_short_plain = _variants(_rows_backward_short, parallel=True)


@_jit(parallel=True)
def rows_backward_cells(dy, y, relu, x, O, A, C, B, P, mean, rstd, w, w_dx, frozen, centered,
                        nblk, dbias_part, dweight_part, dx, dz, stream):
    """rows_backward on contiguous rows (A == 1) of cells of P > 1 values, without ReLU or
    residual, w_dx repeated per element or rows of one cell of up to ROW_CELL values: a row's
    sums and dx in one loop (short_cells_loop)."""
    dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
    R = O * C
    for k in prange(nblk):
        short_cells_loop(dy, y, x, C, B, P, mean, rstd, w, w_dx, frozen, centered,
                         dbias_part[k], dweight_part[k], dx, stream, k * R // nblk,
                         (k + 1) * R // nblk)


def _rows_backward_block(epilogue):
    """rows_backward_block, or without `epilogue` rows_backward_block_plain (dx_run_plain),
    which compiles none of the ReLU / residual loops (see _rows_forward)."""

    def rows_backward_block(dy, y, relu, x, A, C, B, P, mean, rstd, w, w_dx, frozen, centered,
                            dbias_part, dweight_part, dx, dz, stream, r0, r1):
        """rows_backward's statistics [r0, r1) (of the flattened (o, c)), their parameter sums
        into dbias_part / dweight_part."""
        n = A * B
        P_dx = 1 if w_dx.size == C * B else P
        dbias = np.zeros(dbias_part.size, w.dtype)
        dweight = np.zeros(dweight_part.size, w.dtype)
        o, c = r0 // C, r0 % C      # then stepped, as in rows_forward
        # contiguous rows streamed across their ends (stream_seamed_dx_row)
        seamed = (stream and A == 1 and P_dx == 1 and B >= STREAM_RUN and dx.itemsize >= 4
                  and streamable_dz(dx, dz, relu))
        wt = tile_columns(w_dx, DX_LANES) if seamed else w_dx
        line = 64 // dx.itemsize
        i = window_above(dx, r0 * B, line)
        iz = window_above(dz, r0 * B, line) if epilogue and seamed and dz.size else 0
        if epilogue and seamed and dz.size:
            dz_piece(dz, dy, y, r0 * B, iz)
        h0, l0 = split(0.0, x)
        z0 = narrow(0.0, x)
        before = (h0, l0, z0, z0, z0)
        for r in range(r0, r1):
            if (r - r0) % BLOCK_ROWS == 0 and r > r0:
                flush(dbias, dbias_part)
                flush(dweight, dweight_part)
            mean_r, rstd_r = np.float64(mean[r]), np.float64(rstd[r])
            ahead = run_ahead(x, B) if A == 1 or c + 1 < C else 0  # rows_forward
            g1 = 0.0
            g2 = 0.0
            for a in range(A):
                lo = ((o * A + a) * C + c) * B
                ys = y[lo:lo + B] if relu else y
                s1, s2 = backward_sums_run(dy[lo:lo + B], ys, relu, x[lo:lo + B], mean_r, rstd_r, w,
                                           dbias, dweight, c, 0, B, P)
                g1 += s1
                g2 += s2
            c1 = 0.0 if frozen else g2 / n
            c2 = 0.0 if frozen or not centered else g1 / n
            if seamed:
                if epilogue and relu:
                    i, before = stream_seamed_dx_row((x, dy, y), dx, wt, C, B, r, c, mean_r, rstd_r,
                                                     c1, c2, i, before, r == r0, r == r1 - 1)
                else:
                    i, before = stream_seamed_dx_row((x, dy), dx, wt, C, B, r, c, mean_r, rstd_r,
                                                     c1, c2, i, before, r == r0, r == r1 - 1)
                if epilogue and dz.size:
                    s = r * B
                    iz = stream_dz_piece(dz, dy, y, iz, s + B if r + 1 < r1
                                         else window_below(dz, s + B, line))
                    if r == r1 - 1:
                        dz_piece(dz, dy, y, iz, s + B)
            for a in range(0 if seamed else A):
                lo = ((o * A + a) * C + c) * B
                if epilogue:
                    ys = y[lo:lo + B] if relu else y
                    dzs = dz[lo:lo + B] if dz.size else dz
                    dx_run(dy[lo:lo + B], ys, relu, x[lo:lo + B], dx[lo:lo + B], dzs, mean_r,
                           rstd_r, w_dx, c1, c2, c, 0, B, P_dx, stream, ahead)
                else:
                    dx_run_plain(dy[lo:lo + B], y, False, x[lo:lo + B], dx[lo:lo + B], dz, mean_r,
                                 rstd_r, w_dx, c1, c2, c, 0, B, P_dx, stream, ahead)
            c += 1
            if c == C:
                o, c = o + 1, 0
        if stream:
            sfence()
        flush(dbias, dbias_part)
        flush(dweight, dweight_part)

    return rows_backward_block


rows_backward_block, rows_backward_block_plain = _variants(_rows_backward_block)


@_jit(inline="always")
def streamable_dz(dx, dz, relu):
    """Whether the streamed backward loops can write dx (and dz, which they take behind a
    ReLU only, its mask): data at whole elements' addresses."""
    return (dx.ctypes.data % dx.itemsize == 0
            and (not dz.size or relu and dz.ctypes.data % dz.itemsize == 0))


@_jit()
def flush(part, total):
    """total += part (float64); part = 0."""
    for i in range(part.size):
        total[i] += part[i]
        part[i] = 0.0


# ---------------------------------------------------------------------------------------------
# Flat: any (O, A, C, B) with long runs B. Work item (o, k) streams the contiguous chunk k of
# sample o's A * C * B elements, cut into runs of one channel each.
# ---------------------------------------------------------------------------------------------


@_jit()
def flat_chunk(item, K, L, C, B):
    """(o, pos, end, c, b): work item `item`'s sample o and its chunk [pos, end) of the
    sample's L = A * C * B elements, and the channel c and the offset b in its run of the
    chunk's first element. The kernels then step c and b from run to run: divisions per run of
    196 values cost ~40%."""
    o = item // K
    k = item % K
    pos = k * L // K
    r = pos % (C * B)
    c = r // B
    return o, pos, (k + 1) * L // K, c, r - c * B


@_jit(parallel=True)
def flat_moments(x, O, A, C, B, K, narrow, count, mean, m2):
    """Partial moments per (o, k, c) over chunk k of sample o. count/mean/m2: (O, K, C).
    narrow: see block_moments (runs shorter than HALF_RUN in a loop without half_sums' code:
    with it, BatchNorm (64, 256, 7, 7) float16 forward took 1.13x as long)."""
    x = borrow(x)
    for item in prange(O * K):
        if narrow and B >= HALF_RUN:
            flat_chunk_moments(x, O, A, C, B, K, True, count, mean, m2, item)
        elif exact_two_pass(x) or B > BLOCK:
            flat_chunk_moments(x, O, A, C, B, K, False, count, mean, m2, item)
        else:
            flat_chunk_sums(x, O, A, C, B, K, count, mean, m2, item)


@_jit(inline="always")
def flat_chunk_sums(x, O, A, C, B, K, count, mean, m2, item):
    """flat_chunk_moments for float16 / float32 runs of at most BLOCK values: a channel's
    runs in the chunk all shifted by its first value and summed in float64 (block_moments'
    shifted sums, which float16 / float32 data cannot cancel: see exact_two_pass), so that a
    run costs no division: against a mean and a Chan merge per run, same process, BatchNorm
    (64, 256, 7, 7) forward 1.04-1.06x float32, 1.09-1.15x float16; (256, 256, 14, 14)
    0.99-1.04x. (The two walks in one function, the way chosen by a constant, made the
    float16 runs of (32, 64, 56, 56) 0.75-0.96x.)"""
    L = A * C * B
    o, pos, hi, c, b = flat_chunk(item, K, L, C, B)
    k = item % K
    for j in range(C):
        count[o, k, j] = 0.0
        mean[o, k, j] = 0.0     # the shift until the end
        m2[o, k, j] = 0.0       # sum(d * d) until the end
    sums = np.zeros(C)
    while pos < hi:
        e = min(hi - pos, B - b)
        xs = x[o * L + pos:o * L + pos + e]
        if count[o, k, c] == 0.0:
            mean[o, k, c] = load(xs[0])
        s, q = shifted_sums(xs, mean[o, k, c])
        count[o, k, c] += e
        sums[c] += s
        m2[o, k, c] += q
        pos += e
        b = 0
        c = c + 1 if c + 1 < C else 0
    for j in range(C):
        if count[o, k, j] > 0.0:
            mean[o, k, j], m2[o, k, j] = shifted_moments(mean[o, k, j], sums[j], m2[o, k, j],
                                                         count[o, k, j])


@_jit(inline="always")
def flat_chunk_moments(x, O, A, C, B, K, narrow, count, mean, m2, item):
    """flat_moments' chunk `item`."""
    L = A * C * B
    o, pos, hi, c, b = flat_chunk(item, K, L, C, B)
    k = item % K
    for j in range(C):
        count[o, k, j] = 0.0
        mean[o, k, j] = 0.0
        m2[o, k, j] = 0.0
    while pos < hi:
        e = min(hi - pos, B - b)
        base = o * L + pos
        n, mu, q = run_moments(x[base:base + e], narrow)
        count[o, k, c], mean[o, k, c], m2[o, k, c] = chan_merge(
            count[o, k, c], mean[o, k, c], m2[o, k, c], n, mu, q)
        pos += e
        b = 0
        c = c + 1 if c + 1 < C else 0


def _flat_normalize(epilogue):
    """flat_normalize, or without `epilogue` flat_normalize_plain (normalize_run_plain)."""

    def flat_normalize(x, z, relu, O, A, C, B, P, K, mean, rstd, w, bias, y, stream):
        """y = relu((x - mean) * rstd * w + bias + z); mean, rstd: (O * C,) float64; z may be
        empty; stream: see rows_forward. A call per run (runs of one cell each, short or
        streamed: flat_normalize_runs; the front end chooses, normcore/_cpu.py:
        normalize_kernel)."""
        x, z, y = borrow(x), borrow(z), borrow(y)
        L = A * C * B
        for item in prange(O * K):
            o, pos, hi, c, b = flat_chunk(item, K, L, C, B)
            while pos < hi:
                e = min(hi - pos, B - b)
                base = o * L + pos
                if epilogue:
                    zs = z[base:base + e] if z.size else z
                    normalize_run(x[base:base + e], zs, y[base:base + e], relu, mean[o * C + c],
                                  rstd[o * C + c], w, bias, c, b, B, P, stream)
                else:
                    normalize_run_plain(x[base:base + e], z, y[base:base + e], False,
                                        mean[o * C + c], rstd[o * C + c], w, bias, c, b, B, P,
                                        stream)
                pos += e
                b = 0
                c = c + 1 if c + 1 < C else 0
            if stream:
                sfence()

    return flat_normalize


flat_normalize, flat_normalize_plain = _variants(_flat_normalize, parallel=True)


def _flat_normalize_runs(epilogue):
    """flat_normalize_runs, or without `epilogue` flat_normalize_runs_plain (calls without a
    residual or ReLU: affine_runs_plain; see _rows_forward)."""

    def flat_normalize_runs(x, z, relu, O, A, C, B, P, K, mean, rstd, w, bias, y, stream):
        """flat_normalize on runs of one cell each (P == B), short or streamed: a call per chunk.
        Short runs, which a call per run cost more than their values; streamed long ones too
        (with the epilogue too), as one run of windows across the runs' ends (affine_runs): a
        run streamed alone wrote its partial first and last lines plain, and into NumPy's out=
        (16 bytes past a line) with caches swept, BatchNorm / InstanceNorm (32, 64, 56, 56)
        float32 eval ran 1.10 / 1.07-1.13x faster this way (aligned: 1.00)."""
        x, z, y = borrow(x), borrow(z), borrow(y)
        L = A * C * B
        for item in prange(O * K):
            o, pos, end, c, b = flat_chunk(item, K, L, C, B)
            hic = np.empty(C, w.dtype)
            scc = np.empty(C, w.dtype)
            shc = np.empty(C, w.dtype)
            for j in range(C):
                hic[j], scc[j], shc[j] = fold(mean[o * C + j], rstd[o * C + j] * w[j], bias[j], x)
            lo, hi = o * L + pos, o * L + end
            if epilogue:
                affine_runs(x[lo:hi], z[lo:hi] if z.size else z, y[lo:hi], relu, B, b, c, C, hic,
                            scc, shc, stream)
            else:
                affine_runs_plain(x[lo:hi], z, y[lo:hi], False, B, b, c, C, hic, scc, shc, stream)
            if stream:
                sfence()

    return flat_normalize_runs


flat_normalize_runs, flat_normalize_runs_plain = _variants(_flat_normalize_runs, parallel=True)


@_jit(parallel=True)
def flat_backward_sums(dy, y, relu, x, O, A, C, B, P, K, mean, rstd, w, dbias_part,
                       dweight_part):
    """Partial sum(dy) and sum(dy * xhat) per (o, k, parameter cell): (O, K, C * B // P). A
    call per run (short runs of one cell each without ReLU: flat_backward_sums_runs)."""
    dy, y, x = borrow(dy), borrow(y), borrow(x)
    L = A * C * B
    for item in prange(O * K):
        o, pos, hi, c, b = flat_chunk(item, K, L, C, B)
        dbias = dbias_part[o, item % K]
        dweight = dweight_part[o, item % K]
        dbias[:] = 0.0
        dweight[:] = 0.0
        while pos < hi:
            e = min(hi - pos, B - b)
            base = o * L + pos
            ys = y[base:base + e] if relu else y
            backward_sums_run(dy[base:base + e], ys, relu, x[base:base + e], mean[o * C + c],
                              rstd[o * C + c], w, dbias, dweight, c, b, B, P)
            pos += e
            b = 0
            c = c + 1 if c + 1 < C else 0


@_jit(parallel=True)
def flat_backward_sums_runs(dy, y, relu, x, O, A, C, B, P, K, mean, rstd, w, dbias_part,
                            dweight_part):
    """flat_backward_sums on short runs of one cell each (P == B < STREAM_RUN), without ReLU:
    a call per chunk (as in flat_normalize_runs)."""
    dy, x = borrow(dy), borrow(x)
    L = A * C * B
    for item in prange(O * K):
        o, pos, end, c, b = flat_chunk(item, K, L, C, B)
        dbias = dbias_part[o, item % K]
        dweight = dweight_part[o, item % K]
        dbias[:] = 0.0
        dweight[:] = 0.0
        lo, hi = o * L + pos, o * L + end
        scalar_sums_runs(dy[lo:hi], x[lo:hi], B, b, c, C, mean[o * C:(o + 1) * C], dbias,
                         dweight)
        for j in range(C):
            dweight[j] *= rstd[o * C + j]


def _flat_backward_dx(epilogue):
    """flat_backward_dx, or without `epilogue` flat_backward_dx_plain (no ReLU or residual:
    dx_run_plain)."""

    def flat_backward_dx(dy, y, relu, x, O, A, C, B, P, K, mean, rstd, w, c1, c2, dx, dz,
                         stream):
        """dx = rstd * (dy * w - c2 - xhat * c1); mean, rstd, c1, c2: (O * C,) float64; stream:
        see rows_backward. A call per run (short runs of one cell each without ReLU:
        flat_backward_dx_runs)."""
        dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
        L = A * C * B
        for item in prange(O * K):
            o, pos, hi, c, b = flat_chunk(item, K, L, C, B)
            while pos < hi:
                e = min(hi - pos, B - b)
                base = o * L + pos
                oc = o * C + c
                if epilogue:
                    ys = y[base:base + e] if relu else y
                    dzs = dz[base:base + e] if dz.size else dz
                    dx_run(dy[base:base + e], ys, relu, x[base:base + e], dx[base:base + e], dzs,
                           mean[oc], rstd[oc], w, c1[oc], c2[oc], c, b, B, P, stream)
                else:
                    dx_run_plain(dy[base:base + e], y, False, x[base:base + e],
                                 dx[base:base + e], dz, mean[oc], rstd[oc], w, c1[oc], c2[oc], c,
                                 b, B, P, stream)
                pos += e
                b = 0
                c = c + 1 if c + 1 < C else 0
            if stream:
                sfence()

    return flat_backward_dx


flat_backward_dx, flat_backward_dx_plain = _variants(_flat_backward_dx, parallel=True)


@_jit(parallel=True)
def flat_backward_dx_runs(dy, y, relu, x, O, A, C, B, P, K, mean, rstd, w, c1, c2, dx, dz,
                          stream):
    """flat_backward_dx on short runs of one cell each (P == B < STREAM_RUN), without ReLU or
    residual: coefficients per channel, a call per chunk (as in flat_normalize_runs)."""
    dy, x, dx = borrow(dy), borrow(x), borrow(dx)
    L = A * C * B
    for item in prange(O * K):
        o, pos, end, c, b = flat_chunk(item, K, L, C, B)
        a = np.empty(C, w.dtype)
        hic = np.empty(C, w.dtype)
        nbc = np.empty(C, w.dtype)
        shc = np.empty(C, w.dtype)
        for j in range(C):
            oc = o * C + j
            a[j], hic[j], nbc[j], shc[j] = dx_scalar_coefficients(mean[oc], rstd[oc], w[j],
                                                                  c1[oc], c2[oc], x)
        lo, hi = o * L + pos, o * L + end
        dx_scalar_runs(dy[lo:hi], x[lo:hi], dx[lo:hi], B, b, c, C, a, hic, nbc, shc, stream)
        if stream:
            sfence()


# ---------------------------------------------------------------------------------------------
# Columns: short runs (channels-last, 2-D BatchNorm, GroupNorm channels-last). The view is
# (O, A, J) with J = C * B columns; work item (o, k) takes a chunk of the A rows and keeps
# per-column accumulators, so the inner loop runs along contiguous columns. The fused kernels
# (column_forward, column_backward) give a work item all the rows of sample o for a slice of
# its channels instead, so that it finishes its statistics itself. Each helper below loops
# over its rows itself: a call per row of J = 64 values cost 0.70-0.80 ns per value here,
# against 0.16 for the same loop nested inside one function.
# ---------------------------------------------------------------------------------------------


@_jit(fastmath=False)
def merge_columns(mean, m2, n, nb, shift, dmean, q):
    """Chan merge of a block of nb rows (column means shift + dmean, m2 q) into the running
    (mean, m2) of n rows, column by column. Strict IEEE like chan_merge, but one vectorized
    loop: a call per column cost as much as the pass over the data."""
    nn = n + nb
    ratio = nb / nn
    cross = n * nb / nn
    for j in range(mean.size):
        delta = (shift[j] + dmean[j]) - mean[j]
        mean[j] += delta * ratio
        m2[j] += q[j] + delta * delta * cross


@_jit()
def rows_column_moments(x, J, j0, j1, lo, hi, mean, m2, narrow):
    """Moments of columns [j0, j1) over rows [lo, hi) of the flat (N, J) view x into mean / m2
    (j1 - j0,) float64, in blocks of rows that stay in L1; returns the row count.

    With `narrow` (statistics for normalizing float16 / float32 data, which keeps them in
    float32), the shifted sums of a block of at most BLOCK_ROWS rows add up in float32 (at
    most 32 terms per sum: a few float32 ulps of the block's m2) and the blocks merge in
    float64; 1.6x faster than float64 sums, which need a conversion and half-width vectors.
    Without it (moments, welford: float64 results) the sums are float64. Whole rows of 1-4
    windows of LANES values take short_rows_column_moments.
    """
    W = j1 - j0
    exact = exact_two_pass(x)
    narrow = narrow and not exact
    if narrow and short_column_windows(J, W):
        return short_rows_column_moments(x, J, lo, hi, mean, m2)
    ahead = column_rows_ahead(x, J, W)
    # the exact two-pass reads its block twice: keep it in L1
    rows_per_block = BLOCK_ROWS if narrow else max(1, COLUMN_BLOCK // max(W, 1))
    shift = np.empty(W)
    s = np.empty(W)
    q = np.empty(W)
    shift32 = np.empty(W, np.float32)
    s32 = np.empty(W, np.float32)
    q32 = np.empty(W, np.float32)
    mean[:] = 0.0
    m2[:] = 0.0
    cnt = 0.0
    for r0 in range(lo, hi, rows_per_block):
        r1 = min(r0 + rows_per_block, hi)
        nb = r1 - r0
        first = x[r0 * J + j0:r0 * J + j1]
        if not narrow:
            for j in range(W):
                shift[j] = load(first[j])
                s[j] = 0.0
                q[j] = 0.0
        if exact:
            for r in range(r0, r1):     # (prefetching: float64 forward 0.98-1.03x)
                row = x[r * J + j0:r * J + j1]
                for j in range(W):
                    s[j] += load(row[j]) - shift[j]
            for j in range(W):
                s[j] /= nb
            for r in range(r0, r1):
                row = x[r * J + j0:r * J + j1]
                for j in range(W):
                    d = (load(row[j]) - shift[j]) - s[j]
                    q[j] += d * d
        elif not narrow:    # shifted sums, as in block_moments
            for r in range(r0, r1):
                prefetch_row((x,), r * J, ahead, J)
                row = x[r * J + j0:r * J + j1]
                for j in range(W):
                    d = load(row[j]) - shift[j]
                    s[j] += d
                    q[j] += d * d
            for j in range(W):
                s[j] /= nb
                q[j] = max(q[j] - s[j] * s[j] * nb, 0.0)
        else:   # the same in float32
            for j in range(W):
                shift32[j] = loadc(first[j])
                s32[j] = 0.0
                q32[j] = 0.0
            # four rows per sweep: a quarter of the loads and stores of the sums, which
            # bounded the loop (BatchNorm channels-last rows of 64 values: 1.5x in cache)
            r = r0
            while r + 4 <= r1:
                prefetch_row((x,), r * J, ahead, 4 * J)
                row0 = x[r * J + j0:r * J + j1]
                row1 = x[(r + 1) * J + j0:(r + 1) * J + j1]
                row2 = x[(r + 2) * J + j0:(r + 2) * J + j1]
                row3 = x[(r + 3) * J + j0:(r + 3) * J + j1]
                for j in range(W):
                    d0 = loadc(row0[j]) - shift32[j]
                    d1 = loadc(row1[j]) - shift32[j]
                    d2 = loadc(row2[j]) - shift32[j]
                    d3 = loadc(row3[j]) - shift32[j]
                    s32[j] += (d0 + d1) + (d2 + d3)
                    q32[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                r += 4
            for rr in range(r, r1):
                row = x[rr * J + j0:rr * J + j1]
                for j in range(W):
                    d = loadc(row[j]) - shift32[j]
                    s32[j] += d
                    q32[j] += d * d
            for j in range(W):
                shift[j] = shift32[j]
                s[j] = s32[j] / nb
                q[j] = max(q32[j] - s[j] * s[j] * nb, 0.0)
        merge_columns(mean, m2, cnt, nb, shift, s, q)
        cnt += nb
    return cnt


@_jit()
def short_rows_column_moments(x, J, lo, hi, mean, m2):
    """rows_column_moments `narrow` on whole rows of 1-4 windows of LANES values (rows [lo, hi)
    of the flat (N, J) view x): the sums of d = x - shift over each block of at most
    BLOCK_ROWS rows in float32, the sums of the blocks in float64. The shift is the first
    block's column means (in float32), so that d is centered and sum(d * d) - sum(d)**2 / n
    cancels nothing; against each block's first row (a row 5 standard deviations off loses a
    factor 26) the variance of BatchNorm (100352, 64) came 4x closer to float64's. The whole
    windows of LANES columns sum over a block in registers, the block's rows in order
    (window_column_sums*); no software prefetch (measured on the 2-core AMD EPYC Zen 4, 32 MiB
    L3; the sweeps' prefetch had paid on a Zen 1 with an 8 MiB L3). Against the sweeps (sums
    in arrays, each block merged in float64) in one process, the moments of float32 (100352,
    64) (in the L3) 1.69-1.96x, (401408, 64) (from memory) 1.38-1.80x, (100352, 48) 2.04x; with
    the sweeps' prefetch (2 KiB ahead) 1.01-1.08x. Rows with columns past the last whole window
    keep the sweeps: (100352, 40) took 1.2x as long with those columns a row at a time, and
    rows of 128 values (two groups of four windows) ran no faster (0.96x)."""
    W = J
    if hi <= lo:
        mean[:] = 0.0
        m2[:] = 0.0
        return 0.0
    windows = short_column_windows(J, W)
    shift32 = np.empty(W, np.float32)
    s32 = np.empty(W, np.float32)
    q32 = np.empty(W, np.float32)
    S = np.zeros(W)
    Q = np.zeros(W)
    first = min(lo + BLOCK_ROWS, hi)
    for r in range(lo, first):
        row = x[r * J:(r + 1) * J]
        for j in range(W):
            S[j] += loadc(row[j])
    for j in range(W):
        shift32[j] = S[j] / (first - lo)
        S[j] = 0.0
    for r0 in range(lo, hi, BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, hi)
        nb = r1 - r0
        if windows == 4:
            window_column_sums4(x, r0 * J, J, nb, shift32, s32, q32)
        elif windows == 3:
            window_column_sums3(x, r0 * J, J, nb, shift32, s32, q32)
        elif windows == 2:
            window_column_sums2(x, r0 * J, J, nb, shift32, s32, q32)
        elif windows == 1:
            window_column_sums1(x, r0 * J, J, nb, shift32, s32, q32)
        for j in range(W):
            S[j] += s32[j]
            Q[j] += q32[j]
    n = hi - lo
    for j in range(W):
        dmean = S[j] / n
        mean[j] = shift32[j] + dmean
        v = Q[j] - S[j] * dmean
        m2[j] = 0.0 if v < 0.0 else v   # a NaN stays
    return np.float64(n)


def _normalize_rows(epilogue):
    """normalize_rows, or without `epilogue` normalize_rows_plain: no residual or ReLU (z
    empty, relu False), so none of their loops compile (see _rows_forward)."""

    def normalize_rows(x, z, relu, y, J, j0, j1, r0, r1, hi, scale, shift, stream):
        """y = relu((x - hi) * scale + shift + z) on columns [j0, j1) of rows [r0, r1) of the
        flat (N, J) view, with per-column hi, scale, shift (j1 - j0,) in the compute dtype (the
        mean's low part folded into shift, see fold); z may be empty. stream (whole rows only):
        as in affine_run (the caller fences), with the residual and ReLU too (plain stores
        before: channels-last (32, 56, 56, 64) float32 forward, caches swept, BatchNorm 1.30-1.34x,
        GroupNorm 1.31-1.50x; float64 GroupNorm 1.32-1.68x)."""
        W = j1 - j0
        if stream and W == J and (r1 - r0) * J >= STREAM_RUN and J >= LANES:
            span = slice(r0 * J, r1 * J)
            columns = (tile_columns(hi), tile_columns(scale), tile_columns(shift))
            if not epilogue:
                done = stream_columns_affine(y[span], (x[span],), columns, J)
            elif relu and z.size:
                done = stream_columns_affine_relu(y[span], (x[span], z[span]), columns, J)
            elif relu:
                done = stream_columns_affine_relu(y[span], (x[span],), columns, J)
            elif z.size:
                done = stream_columns_affine(y[span], (x[span], z[span]), columns, J)
            else:
                done = stream_columns_affine(y[span], (x[span],), columns, J)
            if done:
                return
        if epilogue and z.size:
            for r in range(r0, r1):
                lo = r * J + j0
                row, zrow, out = x[lo:lo + W], z[lo:lo + W], y[lo:lo + W]
                for j in range(W):
                    v = (loadc(row[j]) - hi[j]) * scale[j] + shift[j] + loadc(zrow[j])
                    out[j] = store(activate(v, relu), out)
        else:
            for r in range(r0, r1):
                lo = r * J + j0
                row, out = x[lo:lo + W], y[lo:lo + W]
                for j in range(W):
                    v = (loadc(row[j]) - hi[j]) * scale[j] + shift[j]
                    out[j] = store(activate(v, relu), out)

    return normalize_rows


normalize_rows, normalize_rows_plain = _variants(_normalize_rows, fastmath=_ELEMENTWISE)


@_jit(inline="always")
def chunk_rows(o, k, A, K):
    """The rows [r0, r1) of chunk k of sample o's A rows, of K chunks (the row-chunk kernels'
    work items)."""
    return o * A + k * A // K, o * A + (k + 1) * A // K


@_jit()
def chunk_moments(x, A, J, K, narrow, item, count, mean, m2):
    """Partial moments of work item o * K + k: sample o's J columns over the rows of its chunk
    k, into count / mean / m2 [o, k] (see column_moments)."""
    o = item // K
    k = item % K
    r0, r1 = chunk_rows(o, k, A, K)
    cnt = rows_column_moments(x, J, 0, J, r0, r1, mean[o, k], m2[o, k], narrow)
    count[o, k, :] = cnt


@_jit(parallel=True)
def column_moments(x, O, A, J, K, narrow, count, mean, m2):
    """Partial moments per (o, k, j) over the rows of chunk k. count/mean/m2: (O, K, J);
    narrow: see rows_column_moments."""
    x = borrow(x)
    for item in prange(O * K):
        chunk_moments(x, A, J, K, narrow, item, count, mean, m2)


@_jit()
def channel_slice(item, S, C, B):
    """Sample o and channels [c0, c1) of work item `item` of a fused column kernel: S slices
    of the channels per sample; a slice's columns [c0 * B, c1 * B) hold all of its
    statistics' values and parameter cells."""
    o = item // S
    s = item % S
    return o, s * C // S, (s + 1) * C // S


def _column_forward(epilogue):
    """column_forward, or without `epilogue` column_forward_plain (normalize_rows_plain)."""

    def column_forward(x, z, relu, centered, O, A, C, B, P, S, w, bias, eps, y, mean_out,
                       rstd_out, var_out, stream):
        """Fused statistics + normalize (+ residual, ReLU) of the column view (O, A, J = C * B),
        one slice of the channels of one sample per work item (see channel_slice), small enough
        to stay in cache, so that x is read from memory once: InstanceNorm / GroupNorm
        channels-last, BatchNorm 2-D / channels-last on small batches. Statistic c merges the
        moments of its B columns.

        w, bias: (C * B // P,) parameter cells in the compute dtype; mean_out, rstd_out (O * C,)
        saved statistics; var_out (O * C,) float64 variance, or empty. stream: see affine_run
        (whole rows only: S == 1).
        """
        x, z, y = borrow(x), borrow(z), borrow(y)
        J = C * B
        for item in prange(O * S):
            o, c0, c1 = channel_slice(item, S, C, B)
            j0 = c0 * B
            W = (c1 - c0) * B
            mu = np.empty(W)
            acc = np.empty(W)
            cnt = rows_column_moments(x, J, j0, j0 + W, o * A, (o + 1) * A, mu, acc, True)
            mean_s = np.empty(c1 - c0)
            rstd_s = np.empty(c1 - c0)
            for c in range(c0, c1):
                n = 0.0
                mean = 0.0
                m2 = 0.0
                for b in range(B):
                    j = (c - c0) * B + b
                    n, mean, m2 = chan_merge(n, mean, m2, cnt, mu[j], acc[j])
                mean, rstd = save_stats(n, mean, m2, centered, eps, o * C + c, mean_out,
                                        rstd_out, var_out)
                mean_s[c - c0] = mean
                rstd_s[c - c0] = rstd
            hi = np.empty(W, w.dtype)
            scale = np.empty(W, w.dtype)
            shift = np.empty(W, w.dtype)
            fold_columns(mean_s, rstd_s, w, bias, c0, c1, B, P, hi, scale, shift, x)
            if epilogue:
                normalize_rows(x, z, relu, y, J, j0, j0 + W, o * A, (o + 1) * A, hi, scale, shift,
                               stream)
            else:
                normalize_rows_plain(x, z, False, y, J, j0, j0 + W, o * A, (o + 1) * A, hi, scale,
                                     shift, stream)
            if stream:
                sfence()

    return column_forward


column_forward, column_forward_plain = _variants(
    _column_forward, parallel=True, fastmath=_ELEMENTWISE)


@_jit(inline="always")
def last_first(item, O, K, x):
    """(o, k) of work item `item` of a second pass over the O * K chunks of x: for an x read from
    memory (FROM_MEMORY), the last chunk first, so that each thread starts on the chunk a
    thread of the first pass read last, still in the L3 (the first pass goes in chunk order,
    each thread its share in turn): BatchNorm channels-last (32, 56, 56, 64) forward
    1.02-1.10x (four A/Bs), backward 0.99-1.01x (its chunks of x and dy, twice the bytes,
    outgrow the L3). In order otherwise: each thread's chunks are then in its own L2
    (reversed, BatchNorm (256, 1024) 0.95-0.99x)."""
    i = np.int64(item)      # the parallel loop's index may be unsigned
    if from_memory(x):
        i = O * K - 1 - i
    return i // K, i % K


@_jit()
def fold_columns(mean, rstd, w, bias, c0, c1, B, P, hi, scale, shift, arr):
    """hi, scale, shift (see fold) of the columns [c0 * B, c1 * B) of the column view, for
    channels c0 <= c < c1 with float64 statistics mean[c - c0], rstd[c - c0] and the parameter
    cells c * (B // P) + b // P (in the compute dtype of arr)."""
    if B == 1:      # BatchNorm / InstanceNorm: cell c, a loop LLVM vectorizes
        ws, bs = w[c0:c1], bias[c0:c1]
        for i in range(c1 - c0):
            hi[i], scale[i], shift[i] = fold(mean[i], rstd[i] * ws[i], np.float64(bs[i]), arr)
        return
    # cell c * Q + b // P, stepped: a division per column cost as much as the fold
    j = 0
    for c in range(c0, c1):
        cell = c * (B // P)
        p = 0
        for b in range(B):
            hi[j], scale[j], shift[j] = fold(mean[c - c0], rstd[c - c0] * w[cell],
                                             np.float64(bias[cell]), arr)
            j += 1
            p += 1
            if p == P:
                p = 0
                cell += 1


def _column_normalize(epilogue):
    """column_normalize, or without `epilogue` column_normalize_plain (normalize_rows_plain)."""

    def column_normalize(x, z, relu, O, A, C, B, P, K, mean, rstd, w, bias, y, stream):
        """y = relu((x - mean) * rstd * w + bias + z) on the column view (O, A, J = C * B) with
        float64 statistics mean, rstd (O * C,) and parameter cells w, bias (C * B // P,) in the
        compute dtype; z may be empty. Each work item folds its sample's J columns itself (see
        fold): in NumPy that took ~10 calls of 1-2 us each, as long as the kernel on (256, 1024).
        Chunks from memory go last first (last_first: column_forward_chunks' second pass).
        stream: see affine_run."""
        x, z, y = borrow(x), borrow(z), borrow(y)
        J = C * B
        for item in prange(O * K):
            o, k = last_first(item, O, K, x)
            folded = np.empty((3, J), w.dtype)     # one allocation: see short_rows_forward
            hi, scale, shift = folded[0], folded[1], folded[2]
            fold_columns(mean[o * C:(o + 1) * C], rstd[o * C:(o + 1) * C], w, bias, 0, C, B, P, hi,
                         scale, shift, x)
            r0, r1 = chunk_rows(o, k, A, K)
            if epilogue:
                normalize_rows(x, z, relu, y, J, 0, J, r0, r1, hi, scale, shift, stream)
            else:
                normalize_rows_plain(x, z, False, y, J, 0, J, r0, r1, hi, scale, shift, stream)
            if stream:
                sfence()

    return column_normalize


column_normalize, column_normalize_plain = _variants(
    _column_normalize, parallel=True, fastmath=_ELEMENTWISE)


def _twin(kernel, serial):
    """The parallel `kernel`, or with `serial` its twin on the calling thread."""
    return kernel.serial if serial else kernel


def _chunks_variants(factory, **options):
    """_variants(factory) whose kernels are not parallel themselves but call parallel
    kernels: each gets `.serial`, factory(epilogue, serial=True), which calls their twins."""
    kernels = _variants(factory, **options)
    for kernel, epilogue in zip(kernels, (True, False)):
        twin = factory(epilogue, serial=True)
        twin.__name__ = twin.__qualname__ = kernel.py_func.__name__ + "_serial"
        kernel.serial = _jit(**options)(twin)
    return kernels


def _column_forward_chunks(epilogue, serial=False):
    """column_forward_chunks, or without `epilogue` column_forward_chunks_plain
    (column_normalize_plain); `serial`: the twin that calls the kernels' serial twins."""
    moments = _twin(column_moments, serial)
    normalize = _twin(column_normalize if epilogue else column_normalize_plain, serial)

    def column_forward_chunks(x, z, relu, centered, O, A, C, B, P, K, narrow, w, bias, eps, y,
                              mean_out, rstd_out, var_out, stream):
        """Statistics + normalize (+ residual, ReLU) of the column view (O, A, J = C * B) over
        chunks of whole rows in one call: each chunk's partial moments (column_moments), their
        merge on the calling thread, then each chunk's normalize (column_normalize; x read
        twice). For views whose samples are too few to go round the threads (BatchNorm 2-D /
        channels-last): splitting a sample's channels instead (column_forward's slices) had
        both cores work on parts of the same rows, and on a 2-core Xeon that was slower than
        one core (BatchNorm (256, 1024) forward: slices 94-109 us, chunks of rows through three
        kernel calls and NumPy glue 60).

        Not itself parallel: its two parallel loops are those kernels'. Written as two prange
        loops in this function, the second loop ran slower on two threads (the same on one;
        the cause not found) while this shared 2-core Zen 4 was in its fast state (GroupNorm
        (32, 64, 56, 56) forward 1.0 ms, 1.8 ms in its slow one): BatchNorm forward into out=,
        back-to-back calls, (100352, 64) 1.28-1.64x, (8192, 1024) 1.14-1.23x, (4096, 1024)
        1.43x, (256, 1024) 0.97-1.02x; rounds interleaved with the old kernel (bench/ab.py)
        0.94-1.26x. In the slow state, 0.96-1.06x either way.

        w, bias: (C * B // P,) parameter cells in the compute dtype; narrow: see
        rows_column_moments; mean_out, rstd_out (O * C,) saved statistics; var_out (O * C,)
        float64 variance, or empty. stream: see affine_run.
        """
        J = C * B
        count = np.empty((O, K, J))
        pmean = np.empty((O, K, J))
        pm2 = np.empty((O, K, J))
        moments(x, O, A, J, K, narrow, count, pmean, pm2)
        mean = np.empty((O, C))
        var = np.empty((O, C))
        merge_moments(count, pmean, pm2, B, mean, var)
        mean = mean.reshape(O * C)
        var = var.reshape(O * C)
        rstd = np.empty(O * C)
        for i in range(O * C):
            # the merge's biased variance: the moments of one value with m2 = var
            mean[i], rstd[i] = save_stats(1.0, mean[i], var[i], centered, eps, i, mean_out,
                                          rstd_out, var_out)
        normalize(x, z, relu, O, A, C, B, P, K, mean, rstd, w, bias, y, stream)

    return column_forward_chunks


column_forward_chunks, column_forward_chunks_plain = _chunks_variants(
    _column_forward_chunks, fastmath=_ELEMENTWISE)


@_jit()
def backward_column_sums(dy, y, relu, x, J, j0, j1, r0, r1, hi, lo, s1, s2):
    """s1 += dy, s2 += dy * (x - mean) per column of [j0, j1) over rows [r0, r1) of the flat
    (N, J) views (dy masked by ReLU's gradient when relu); mean = hi + lo in the compute
    dtype; s1, s2: (j1 - j0,) float64. Each block of BLOCK_ROWS rows adds up in the compute
    dtype first (as in rows_column_moments); on whole rows of 1-4 windows without ReLU, in
    registers (window_gradient_sums*, no prefetch), against the sweeps in one process on the
    Zen 4 (see short_rows_column_moments): BatchNorm channels-last (32, 56, 56, 64) backward
    float32 1.10-1.21x, float64 1.04-1.11x, float16 1.01-1.05x; GroupNorm channels-last
    float32 1.07-1.32x, float64 1.15x."""
    W = j1 - j0
    ahead = column_rows_ahead(x, J, W)
    t1 = np.empty(W, hi.dtype)
    t2 = np.empty(W, hi.dtype)
    # whole rows of 1-4 windows: their sums in registers (window_gradient_sums*)
    windows = 0 if relu else short_column_windows(J, W)
    for b0 in range(r0, r1, BLOCK_ROWS):
        b1 = min(b0 + BLOCK_ROWS, r1)
        if windows:
            if windows == 4:
                window_gradient_sums4(dy, x, b0 * J, J, b1 - b0, hi, lo, t1, t2)
            elif windows == 3:
                window_gradient_sums3(dy, x, b0 * J, J, b1 - b0, hi, lo, t1, t2)
            elif windows == 2:
                window_gradient_sums2(dy, x, b0 * J, J, b1 - b0, hi, lo, t1, t2)
            else:
                window_gradient_sums1(dy, x, b0 * J, J, b1 - b0, hi, lo, t1, t2)
            for j in range(W):
                s1[j] += t1[j]
                s2[j] += t2[j]
            continue
        t1[:] = 0.0
        t2[:] = 0.0
        r = b0
        # four rows per sweep, then two: a quarter of the loads and stores of t1, t2, hi and
        # lo against a row at a time; against two rows per sweep, same process on the Zen 4,
        # float32 BatchNorm (8192, 1024) backward 0.99-1.07x (five runs), channels-last
        # (16, 28, 28, 256) 1.04-1.06x, float64 (256, 1024) 1.01-1.25x
        while not relu and r + 4 <= b1:
            prefetch_row((x, dy), r * J, ahead, 4 * J)
            s0, s1_, s2_, s3_ = (r * J + j0, (r + 1) * J + j0, (r + 2) * J + j0,
                                 (r + 3) * J + j0)
            x0, x1, g0, g1 = x[s0:s0 + W], x[s1_:s1_ + W], dy[s0:s0 + W], dy[s1_:s1_ + W]
            x2, x3, g2, g3 = x[s2_:s2_ + W], x[s3_:s3_ + W], dy[s2_:s2_ + W], dy[s3_:s3_ + W]
            for j in range(W):
                d0 = loadc(g0[j])
                d1 = loadc(g1[j])
                d2 = loadc(g2[j])
                d3 = loadc(g3[j])
                h = hi[j]
                low = lo[j]
                t1[j] += (d0 + d1) + (d2 + d3)
                t2[j] += ((d0 * exact_center(loadc(x0[j]), h, low)
                           + d1 * exact_center(loadc(x1[j]), h, low))
                          + (d2 * exact_center(loadc(x2[j]), h, low)
                             + d3 * exact_center(loadc(x3[j]), h, low)))
            r += 4
        while not relu and r + 2 <= b1:
            prefetch_row((x, dy), r * J, ahead, 2 * J)
            s0, s1_ = r * J + j0, (r + 1) * J + j0
            x0, x1, g0, g1 = x[s0:s0 + W], x[s1_:s1_ + W], dy[s0:s0 + W], dy[s1_:s1_ + W]
            for j in range(W):
                d0 = loadc(g0[j])
                d1 = loadc(g1[j])
                t1[j] += d0 + d1
                t2[j] += (d0 * exact_center(loadc(x0[j]), hi[j], lo[j])
                          + d1 * exact_center(loadc(x1[j]), hi[j], lo[j]))
            r += 2
        for rr in range(r, b1):
            start = rr * J + j0
            row, drow = x[start:start + W], dy[start:start + W]
            if relu:
                prefetch_row((x, dy, y), rr * J, ahead, J)
                yrow = y[start:start + W]
                for j in range(W):
                    d = relu_dy(drow, yrow, j)
                    t1[j] += d
                    t2[j] += d * exact_center(loadc(row[j]), hi[j], lo[j])
            else:
                for j in range(W):
                    d = loadc(drow[j])
                    t1[j] += d
                    t2[j] += d * exact_center(loadc(row[j]), hi[j], lo[j])
        for j in range(W):
            s1[j] += t1[j]
            s2[j] += t2[j]


def _dx_columns(epilogue):
    """dx_columns, or without `epilogue` dx_columns_plain: no ReLU or residual (relu
    False, dz empty), so none of their loops compile (see _rows_forward)."""

    def dx_columns(dy, y, relu, x, dx, dz, J, j0, j1, r0, r1, hi, a, b, c, stream):
        """dx = a * dy - b * (x - hi) - c per column of [j0, j1) over rows [r0, r1) of the flat
        (N, J) views (the mean's low part folded into c, see fold); dz = dy (after ReLU's mask)
        when dz is not empty. One loop per case: with ReLU's mask inside, the float16 loop stayed
        scalar (3.7 ms against 0.12 on 256 x 1024). stream (whole rows only): as in affine_run
        (the caller fences); behind a ReLU, dz too (plain stores before: BatchNorm / GroupNorm
        channels-last (32, 56, 56, 64) backward, caches swept, with activation="relu" 1.16x /
        1.20x, with residual=True too 1.08x / 1.26x)."""
        W = j1 - j0
        if stream and W == J and (r1 - r0) * J >= STREAM_RUN and J >= DX_LANES:
            span = slice(r0 * J, r1 * J)
            columns = (tile_columns(hi, DX_LANES), tile_columns(a, DX_LANES),
                       tile_columns(b, DX_LANES), tile_columns(c, DX_LANES))
            if not epilogue or not relu:
                if not dz.size and stream_columns_dx(dx[span], (x[span], dy[span]), columns, J):
                    return
            elif (streamable_dz(dx, dz, relu)
                  and stream_columns_dx(dx[span], (x[span], dy[span], y[span]), columns, J)):
                if dz.size:
                    stream_dz(dz[span], (dy[span], y[span]), ())
                return
        for r in range(r0, r1):
            lo = r * J + j0
            row, drow, out = x[lo:lo + W], dy[lo:lo + W], dx[lo:lo + W]
            if epilogue and relu:
                yrow = y[lo:lo + W]
                for j in range(W):
                    d = relu_dy(drow, yrow, j)
                    out[j] = store(a[j] * d - b[j] * (loadc(row[j]) - hi[j]) - c[j], out)
            else:
                for j in range(W):
                    xc = loadc(row[j]) - hi[j]
                    out[j] = store(a[j] * loadc(drow[j]) - b[j] * xc - c[j], out)
            if epilogue and dz.size:
                dz_run(drow, y[lo:lo + W] if relu else y, relu, dz[lo:lo + W])

    return dx_columns


dx_columns, dx_columns_plain = _variants(_dx_columns, fastmath=_ELEMENTWISE)


@_jit()
def cell_coefficients(s1, s2, rstd, w, lo, o, C, c0, c1, B, P, n, frozen, centered, dbias_out,
                      dweight_out, a, bcoef, ccoef):
    """The backward's per-cell results and dx coefficients of sample o's channels [c0, c1),
    from the column sums s1 = sum(dy), s2 = sum(dy * (x - mean)) of its columns
    (c - c0) * B + b: dbias_out / dweight_out cells c * Q + b // P (written whole), and
    a = rstd * w, bcoef = rstd**2 * c1, ccoef = rstd * c2 - bcoef * lo per column (see
    dx_columns; lo: the mean's low part)."""
    Q = B // P
    for c in range(c0, c1):
        rs = rstd[o * C + c]
        for q in range(c * Q, (c + 1) * Q):
            dbias_out[o, q] = 0.0
            dweight_out[o, q] = 0.0
        g1 = 0.0
        g2 = 0.0
        for b in range(B):
            j = (c - c0) * B + b
            cell = c * Q + b // P
            sdyxhat = s2[j] * rs
            dbias_out[o, cell] += s1[j]
            dweight_out[o, cell] += sdyxhat
            g1 += s1[j] * w[cell]
            g2 += sdyxhat * w[cell]
        k1 = 0.0 if frozen else g2 / n
        k2 = 0.0 if frozen or not centered else g1 / n
        bc = rs * rs * k1
        for b in range(B):
            j = (c - c0) * B + b
            a[j] = rs * w[c * Q + b // P]
            bcoef[j] = bc
            ccoef[j] = rs * k2 - bc * lo[j]      # see fold


def _column_backward(epilogue):
    """column_backward, or without `epilogue` column_backward_plain (dx_columns_plain)."""

    def column_backward(dy, y, relu, x, O, A, C, B, P, S, mean, rstd, w, frozen, centered,
                        dbias_out, dweight_out, dx, dz, stream):
        """Fused backward of the column view, one slice of the channels of one sample per work
        item (as column_forward): the slice's sums, then dx (and dz) from cache, so dy and x are
        read from memory once.

        mean, rstd: (O * C,) saved statistics (float64); w: (C * B // P,) parameter cells in the
        compute dtype; dbias_out, dweight_out: (O, C * B // P) float64, every cell written (the
        caller sums over o). y: the saved output (read with relu only); dz: the residual's
        gradient, or empty. stream: non-temporal stores for dx (whole rows only: S == 1), as in
        column_forward (before, plain stores always: against them, caches swept, GroupNorm 32
        groups channels-last (32, 56, 56, 64) float32 1.15-1.25x (1.28x warm), float64 1.39x,
        InstanceNorm channels-last 1.29x).
        """
        dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
        J = C * B
        n = A * B
        for item in prange(O * S):
            o, c0, c1 = channel_slice(item, S, C, B)
            j0 = c0 * B
            W = (c1 - c0) * B
            hi = np.empty(W, w.dtype)
            lo = np.empty(W, w.dtype)
            for c in range(c0, c1):
                h, low = split(mean[o * C + c], x)
                for b in range(B):
                    hi[(c - c0) * B + b] = h
                    lo[(c - c0) * B + b] = low
            s1 = np.zeros(W)
            s2 = np.zeros(W)
            backward_column_sums(dy, y, relu, x, J, j0, j0 + W, o * A, (o + 1) * A, hi, lo, s1, s2)
            a = np.empty(W, w.dtype)
            bcoef = np.empty(W, w.dtype)
            ccoef = np.empty(W, w.dtype)
            if B == 1:
                # a statistic and a cell per column (BatchNorm 2-D / channels-last): one loop over
                # the columns, the general one's arithmetic without its per-channel loops and
                # divisions by P
                for j in range(W):
                    c = c0 + j
                    rs = rstd[o * C + c]
                    sdyxhat = s2[j] * rs
                    dbias_out[o, c] = 0.0 + s1[j]
                    dweight_out[o, c] = 0.0 + sdyxhat
                    c1 = 0.0 if frozen else (0.0 + sdyxhat * w[c]) / n
                    c2 = 0.0 if frozen or not centered else (0.0 + s1[j] * w[c]) / n
                    bc = rs * rs * c1
                    a[j] = rs * w[c]
                    bcoef[j] = bc
                    ccoef[j] = rs * c2 - bc * lo[j]
            else:
                cell_coefficients(s1, s2, rstd, w, lo, o, C, c0, c1, B, P, n, frozen, centered,
                                  dbias_out, dweight_out, a, bcoef, ccoef)
            if epilogue:
                dx_columns(dy, y, relu, x, dx, dz, J, j0, j0 + W, o * A, (o + 1) * A, hi, a, bcoef,
                           ccoef, stream)
            else:
                dx_columns_plain(dy, y, False, x, dx, dz, J, j0, j0 + W, o * A, (o + 1) * A, hi, a,
                                 bcoef, ccoef, stream)
            if stream:
                sfence()

    return column_backward


column_backward, column_backward_plain = _variants(_column_backward, parallel=True)


@_jit(parallel=True)
def column_gradient_sums(dy, y, relu, x, O, A, J, K, hi, lo, s1, s2):
    """s1, s2 (O, K, J) float64: backward_column_sums of each chunk k of sample o's rows (as
    column_moments' chunks); hi, lo (O, J): each column's mean split in the compute dtype."""
    dy, y, x = borrow(dy), borrow(y), borrow(x)
    for item in prange(O * K):
        o = item // K
        k = item % K
        r0, r1 = chunk_rows(o, k, A, K)
        backward_column_sums(dy, y, relu, x, J, 0, J, r0, r1, hi[o], lo[o], s1[o, k], s2[o, k])


def _column_dx_chunks(epilogue):
    """column_dx_chunks, or without `epilogue` column_dx_chunks_plain (dx_columns_plain)."""

    def column_dx_chunks(dy, y, relu, x, dx, dz, O, A, J, K, hi, coefs, stream):
        """dx (and dz) of each chunk of sample o's rows (dx_columns) with the coefficients
        coefs[o] (3, J) of cell_coefficients; chunks from memory last first (last_first)."""
        dy, y, x, dx, dz = borrow(dy), borrow(y), borrow(x), borrow(dx), borrow(dz)
        for item in prange(O * K):
            o, k = last_first(item, O, K, x)
            r0, r1 = chunk_rows(o, k, A, K)
            if epilogue:
                dx_columns(dy, y, relu, x, dx, dz, J, 0, J, r0, r1, hi[o], coefs[o, 0],
                           coefs[o, 1], coefs[o, 2], stream)
            else:
                dx_columns_plain(dy, y, False, x, dx, dz, J, 0, J, r0, r1, hi[o], coefs[o, 0],
                                 coefs[o, 1], coefs[o, 2], stream)
            if stream:
                sfence()

    return column_dx_chunks


column_dx_chunks, column_dx_chunks_plain = _variants(
    _column_dx_chunks, parallel=True, fastmath=_ELEMENTWISE)


def _column_backward_chunks(epilogue, serial=False):
    """column_backward_chunks, or without `epilogue` column_backward_chunks_plain
    (column_dx_chunks_plain); `serial`: the twin that calls the kernels' serial twins."""
    sums = _twin(column_gradient_sums, serial)
    dx_chunks = _twin(column_dx_chunks if epilogue else column_dx_chunks_plain, serial)

    def column_backward_chunks(dy, y, relu, x, O, A, C, B, P, K, mean, rstd, w, frozen, centered,
                               dbias_out, dweight_out, dx, dz, stream):
        """Backward of the column view over chunks of whole rows in one call, as
        column_forward_chunks (and not parallel itself, for the same reason): each chunk's
        partial sums (column_gradient_sums), their reduction and the dx coefficients on the
        calling thread, then each chunk's dx and dz (column_dx_chunks).

        mean, rstd: (O * C,) saved statistics (float64); w: (C * B // P,) parameter cells in the
        compute dtype; dbias_out, dweight_out: (O, C * B // P) float64, every cell written (the
        caller sums over o). y: the saved output (read with relu only); dz: the residual's
        gradient, or empty. stream: see affine_run.
        """
        J = C * B
        n = A * B
        hi = np.empty((O, J), w.dtype)
        lo = np.empty((O, J), w.dtype)
        for o in range(O):
            for c in range(C):
                h, low = split(mean[o * C + c], x)
                for b in range(B):
                    hi[o, c * B + b] = h
                    lo[o, c * B + b] = low
        s1 = np.zeros((O, K, J))
        s2 = np.zeros((O, K, J))
        sums(dy, y, relu, x, O, A, J, K, hi, lo, s1, s2)
        coefs = np.empty((O, 3, J), w.dtype)
        for o in range(O):
            # the chunks' partials, added in chunk order (deterministic for a given plan)
            t1 = s1[o, 0]
            t2 = s2[o, 0]
            for k in range(1, K):
                for j in range(J):
                    t1[j] += s1[o, k, j]
                    t2[j] += s2[o, k, j]
            cell_coefficients(t1, t2, rstd, w, lo[o], o, C, 0, C, B, P, n, frozen, centered,
                              dbias_out, dweight_out, coefs[o, 0], coefs[o, 1], coefs[o, 2])
        dx_chunks(dy, y, relu, x, dx, dz, O, A, J, K, hi, coefs, stream)

    return column_backward_chunks


column_backward_chunks, column_backward_chunks_plain = _chunks_variants(_column_backward_chunks)


# ---------------------------------------------------------------------------------------------
# Merge of partial moments
# ---------------------------------------------------------------------------------------------


@_jit(fastmath=False)
def merge_moments(count, mean, m2, B, mean_out, var_out):
    """Merge partials (O, K, C * B) over k and over the B columns of each statistic c into
    mean_out / var_out (O, C) float64; var is biased (m2 / n), NaN for an empty set.

    Chan's merge, vectorized along c (strict IEEE, as chan_merge). Serial: the partials are
    small, and a parallel launch costs more than merging them.
    """
    O, K, J = count.shape
    C = J // B
    n = np.empty(C)
    for o in range(O):
        mu = mean_out[o]
        q = var_out[o]
        n[:] = 0.0
        mu[:] = 0.0
        q[:] = 0.0
        for k in range(K):
            for b in range(B):
                for c in range(C):
                    j = c * B + b
                    nb = count[o, k, j]
                    nn = n[c] + nb
                    ratio = nb / nn if nn > 0 else 0.0
                    delta = mean[o, k, j] - mu[c]
                    mu[c] += delta * ratio
                    q[c] += m2[o, k, j] + delta * delta * (n[c] * ratio)
                    n[c] = nn
        for c in range(C):
            if n[c] > 0:
                q[c] /= n[c]
            else:
                mu[c] = np.nan
                q[c] = np.nan


@_jit(fastmath=False)
def update_running(running_mean, running_var, old_mean, old_var, mean, var, O, unbias,
                   momentum):
    """running = (1 - momentum) * old + momentum * batch per channel c < C: the batch
    statistics are mean[o * C + c] and the unbiased unbias * var[o * C + c], averaged over the
    O >= 1 samples (InstanceNorm; O == 1 for BatchNorm). running_*: (C,) float32 / float64,
    not overlapping; old_*: the running statistics (read as float64, which holds float32
    exactly), possibly running_* themselves (a channel's old values are read before its new
    ones are written). Float64 arithmetic in the order of the NumPy formula it replaces,
    which took ten array operations (BatchNorm over 1024 channels: 15.7 us with their checks;
    this loop 0.8 us, 3.1 without the O == 1 branch that LLVM vectorizes); the samples add up
    in order, where NumPy's mean over a single channel (C == 1) pairs them, which can differ
    in the last bit.
    """
    C = running_mean.size
    keep = 1.0 - momentum
    if O == 1:
        for c in range(C):
            new_mean = old_mean[c] * keep + momentum * np.float64(mean[c])
            new_var = old_var[c] * keep + momentum * (var[c] * unbias)
            running_mean[c] = new_mean
            running_var[c] = new_var
        return
    for c in range(C):
        m = 0.0
        v = 0.0
        for o in range(O):
            m += np.float64(mean[o * C + c])
            v += var[o * C + c] * unbias
        new_mean = old_mean[c] * keep + momentum * (m / O)
        new_var = old_var[c] * keep + momentum * (v / O)
        running_mean[c] = new_mean
        running_var[c] = new_var


@_jit(fastmath=False)
def frozen_stats(running_mean, running_var, eps, mean, rstd, mean_out, rstd_out):
    """Eval-mode statistics from the running ones (C,) float64: mean = running_mean and
    rstd = 1 / sqrt(running_var + eps) per channel c, repeated for the O samples of
    mean / rstd (O * C,) float64, and the same in mean_out / rstd_out (O * C,) in their dtype
    (the saved statistics). Strict IEEE: bit for bit the NumPy formula it replaces, which
    took five to seven array operations. The channels go first in a loop of their own, which
    LLVM vectorizes (sqrt and division are exact in vector form): with the samples' copies
    inside it the loop stayed scalar, 5.0 us for 1024 channels (now 1.5) and 38 us for 8
    samples of them (now 12). No samples (InstanceNorm eval of N == 0): nothing to write."""
    C = running_mean.size
    if mean.size == 0:
        return
    for c in range(C):
        mean[c] = running_mean[c]
        rstd[c] = 1.0 / np.sqrt(running_var[c] + eps)
    for c in range(C):
        mean_out[c] = mean[c]
        rstd_out[c] = rstd[c]
    for i in range(C, mean.size):
        mean[i] = mean[i - C]
        rstd[i] = rstd[i - C]
        mean_out[i] = mean_out[i - C]
        rstd_out[i] = rstd_out[i - C]


column_normalize_plain_serial = column_normalize_plain.serial
flat_normalize_plain_serial = flat_normalize_plain.serial
flat_normalize_runs_plain_serial = flat_normalize_runs_plain.serial


@_jit()
def frozen_normalize(x, columns, O, A, C, B, P, K, running_mean, running_var, eps, w, bias, y,
                     mean_out, rstd_out):
    """Eval mode on the calling thread in one call: frozen_stats, then the normalize pass
    (column_normalize's loops with `columns`, else flat_normalize's). The small-call path's
    BatchNorm / InstanceNorm eval: the two calls and the float64 statistics' allocations it
    made in Python took ~1 us of a ~6 us BatchNorm (16, 64) eval."""
    stats = np.empty((2, O * C))
    mean, rstd = stats[0], stats[1]
    frozen_stats(running_mean, running_var, eps, mean, rstd, mean_out, rstd_out)
    if columns:
        column_normalize_plain_serial(x, x[:0], False, O, A, C, B, P, K, mean, rstd, w, bias, y,
                                      False)
    elif P == B and B < STREAM_RUN:     # (normcore/_cpu.py: normalize_kernel)
        flat_normalize_runs_plain_serial(x, x[:0], False, O, A, C, B, P, K, mean, rstd, w, bias,
                                         y, False)
    else:
        flat_normalize_plain_serial(x, x[:0], False, O, A, C, B, P, K, mean, rstd, w, bias, y,
                                    False)


# One registry of the compiled kernels: the front end looks kernels up here, and a test checks
# that every entry compiles for every supported dtype.
KERNELS = {
    "rows_moments": rows_moments,
    "rows_forward": rows_forward,
    "rows_forward_plain": rows_forward_plain,
    "rows_forward_fused": rows_forward_fused,
    "rows_forward_fused_plain": rows_forward_fused_plain,
    "rows_forward_short": rows_forward_short,
    "rows_backward": rows_backward,
    "rows_backward_plain": rows_backward_plain,
    "rows_backward_short": rows_backward_short,
    "rows_backward_short_plain": rows_backward_short_plain,
    "rows_backward_cells": rows_backward_cells,
    "flat_moments": flat_moments,
    "flat_normalize": flat_normalize,
    "flat_normalize_plain": flat_normalize_plain,
    "flat_normalize_runs": flat_normalize_runs,
    "flat_normalize_runs_plain": flat_normalize_runs_plain,
    "flat_backward_sums": flat_backward_sums,
    "flat_backward_sums_runs": flat_backward_sums_runs,
    "flat_backward_dx": flat_backward_dx,
    "flat_backward_dx_plain": flat_backward_dx_plain,
    "flat_backward_dx_runs": flat_backward_dx_runs,
    "column_moments": column_moments,
    "column_forward": column_forward,
    "column_forward_plain": column_forward_plain,
    "column_normalize": column_normalize,
    "column_normalize_plain": column_normalize_plain,
    "column_backward": column_backward,
    "column_backward_plain": column_backward_plain,
    "column_forward_chunks": column_forward_chunks,
    "column_forward_chunks_plain": column_forward_chunks_plain,
    "column_backward_chunks": column_backward_chunks,
    "column_backward_chunks_plain": column_backward_chunks_plain,
    "column_gradient_sums": column_gradient_sums,
    "column_dx_chunks": column_dx_chunks,
    "column_dx_chunks_plain": column_dx_chunks_plain,
    "merge_moments": merge_moments,
    "update_running": update_running,
    "frozen_stats": frozen_stats,
    "frozen_normalize": frozen_normalize,
}

"""Pure-Python planning: map a call's shape and axes to the canonical view (O, A, C, B).

Statistics are per (o, c) over (a, b) of the C-contiguous input reshaped to (O, A, C, B); the
affine parameter of element (o, a, c, b) is cell c * Q + b // P with Q = B // P. Plans are
cached on (shape, axes, thread count) and hold only ints, so they are testable without arrays.
"""
import math
import os
from dataclasses import dataclass
from functools import lru_cache

# A row longer than this (elements) no longer fits in L2 for the fused row kernels.
ROW_MAX = 1 << 16
# Runs shorter than this go to the column kernels (per-run overhead would dominate).
RUN_MIN = 64
# ... unless they are at least FLAT_RUN values long, one parameter cell each (BatchNorm), and
# the column kernels would sweep more than WIDE_COLUMNS columns at once: the column kernels
# keep per-column accumulators and coefficients (scale, shift, the mean's hi part), 12-56
# bytes a column, that stop fitting in L1 / L2 as a sweep widens, while runs of 16 values or
# more fill whole vectors of the flat kernels with per-channel scalars. float32 BatchNorm
# training forward / backward, columns / flat in one process, on runs of 49 (7 x 7 maps):
# (128, 256, 7, 7) 1.90 / 1.68, (256, 64, 7, 7) 1.80 / 2.23, (16, 2048, 7, 7) 24 / 6.1,
# serial (8, 64, 7, 7) 1.74 / 1.33; (128, 512, 4, 4) 1.76 / 1.76; but (512, 128, 4, 4) (2048
# columns) 0.70 / 1.32, (1024, 32, 7, 7) (1568) 0.84 / 1.13, (256, 256, 3, 3) 0.51 / 0.81,
# and sweeps split into slices of <= 800 columns (parallel columns_fused: (32, 256, 5, 5),
# (32, 128, 7, 7)) 0.64-0.84 / 0.96-1.06. float64 gains more: 4.4 / 3.6 on (64, 256, 7, 7).
# The same views of `moments` over (0, 2, 3) take the rule too: 1.9-5.8x on those shapes in
# float32 and float64, 22-30x on (16, 2048, 7, 7).
FLAT_RUN = 16
WIDE_COLUMNS = 2048
# float16 converts each value in the flat kernels' short loops, so it goes flat later: the
# same (64, 256, 7, 7) 2.1 / 2.0, but (256, 64, 7, 7) 0.88 / 0.88, (128, 512, 4, 4) 0.72 / 0.65.
FLAT_RUN_HALF = 32
WIDE_COLUMNS_HALF = 8192
# The normalize pass alone (eval, and the second pass of the unfused column path) goes flat
# above NORMALIZE_COLUMNS columns (runs of FLAT_RUN values or more, every dtype): float32
# columns / flat 3.5 on (64, 256, 7, 7), 9.8 on (16, 2048, 7, 7), 1.46 on (128, 64, 5, 5)
# (1600 columns), 1.75 on (32, 256, 4, 4); but 0.80 on (128, 64, 4, 4) (1024 columns) and
# 0.23-0.41 on runs of 4 and 9. float16 gains as well: 2.9 on (64, 256, 7, 7), 1.4-1.5 on
# (256, 64, 7, 7), 1.8-2.5 on (8, 64, 7, 7), 0.98-1.03 on (128, 512, 4, 4).
NORMALIZE_COLUMNS = 1024
# Strided runs shorter than this go flat rather than one statistic at a time: a statistic's
# short runs, far apart, are latency-bound reads (BatchNorm (256, 256, 14, 14): rows forward
# 10.5-11.2 ms, flat 6.0-6.4; backward 16-17 against 12; runs of 784: 6.8-7.1 / 5.4-6.1).
RUN_ROWS = 1024
# ... and float16 / float32 inputs of at least FLAT_FORWARD elements take the flat forward even
# with long runs (the float32 backward keeps the rows): streaming x twice beat the rows
# forward's one read, rows / flat 1.16-1.42 float32 and 1.15-1.50 float16 on BatchNorm
# (32, 64, 56, 56), (16, 128, 56, 56), (128, 64, 32, 32) (one exception: (8, 256, 64, 64)
# float32, 0.91), while the flat backward was 0.66-1.01 in float32 (1.02-1.54 in float16: its
# backward goes flat too); float64 stays on the rows (flat forward 0.86 on (32, 64, 56, 56)).
# Below 2**22 elements the two are within noise.
FLAT_FORWARD = 1 << 22
# The row kernels take parameter cells of at most SHORT_CELL values (GroupNorm and InstanceNorm
# channels-first on maps of up to 8 x 8) repeated per element, so that the normalize pass and
# the backward's dx pass run over a statistic's cells as one loop rather than a loop of P
# values per cell, and rows of up to FUSED_ROW values (kernels/cpu.py) go as LayerNorm's rows
# do (short_rows_fused, a residual and ReLU included; float16 and float32 rows under 64 values
# in blocks of rows up to SHORT_ROW values): a call per row of 49 values cost more than its
# arithmetic. The backward's
# sums stay per cell (per-element partials of dbias / dweight cost more than they saved:
# GroupNorm (8, 512, 7, 7) 74 / 179 us), in one loop over the rows (short_cells_loop). The
# repeat is a sample's worth of parameters per call, so it pays from SHORT_CELL_SAMPLES samples
# on; float64 GroupNorm (8 lanes: each cell's loop vectorizes) lost with it, 0.59-0.91x
# forward. bench/ab.py against the per-cell loops, one process, forward / backward:
# InstanceNorm (64, 256, 7, 7) 1.6 / 2.8x float32, 1.6 / 2.4x float64, 2.0 / 2.0x float16;
# (64, 512, 4, 4) 2.0-2.8 / 3.1-3.8x; (32, 64, 8, 8) 1.3-1.8 / 1.9-2.4x; GroupNorm
# (64, 256, 7, 7) 0.95-1.07 / 1.5-1.6x, (64, 256, 4, 4) 1.25 / 2.3x, (64, 512, 7, 7) (rows of
# 784, then not blocked) 1.0 / 1.35x. Above 64 values the cells' own loops are long enough:
# per-element parameters gained nothing on (32, 256, 10, 10) or (16, 128, 14, 14) and lost
# on (32, 64, 28, 28) (0.91x forward).
SHORT_CELL = 64
SHORT_CELL_SAMPLES = 32
# Smallest chunk (elements) worth a parallel work item.
MIN_ITEM = 1 << 15
# Work items per thread, for load balance.
ITEMS_PER_THREAD = 4
# Elements of one statistic (rows) or one sample (fused columns) that the kernels expect to
# find still in cache on their second pass: 2 MiB of float32, out of a core's L2 but well
# inside its share of the 32 MiB L3, which still serves it several times faster than memory.
STAT_CACHE = 1 << 19
# The fused column kernels split a sample's rows into slices of channels only for inputs of at
# most SLICE_MAX elements (small enough to stay in cache), slices at least SLICE_MIN wide. A
# slice's rows are short strided runs that the prefetchers serve poorly from L3 or memory:
# BatchNorm (2048, 1024) forward 1.3 ms in 8 slices, 0.69 in row chunks, while (256, 1024)
# took 101 us against 130 (one launch instead of three, no partial moments to merge).
SLICE_MAX = 1 << 19
SLICE_MIN = 128
# ... and only for fewer than CHUNK_ROWS rows per thread when a sample is all there is (O == 1:
# BatchNorm, GroupNorm / InstanceNorm channels-last on one sample). With more, chunks of whole
# rows (column_forward_chunks: x read twice, from cache) beat slices on a 2-core Xeon, where two
# cores working on parts of the same rows ran slower than one: kernel times, slices / chunks,
# forward (256, 1024) 94-121 / 54 us, (512, 1024) 238 / 95, (1024, 256) 100 / 44, (192, 1024)
# 52 / 36, BatchNorm (256, 64, 4, 4) 88 / 55, (512, 32, 5, 5) 96 / 73, GroupNorm channels-last
# (1, 32, 32, 256) 122 / 43, (1, 28, 28, 512) 132 / 58; backward 115 / 83, 253 / 175, 130 / 67,
# 62 / 55, 89 / 72, 200 / 115, 159 / 67, 187 / 101 (one loss: BatchNorm (192, 128, 3, 3)
# forward 40 / 49, backward 91 / 61). With fewer rows a chunk's per-column work (sums, merges,
# folds) is not repaid: (128, 512) 14.5 / 18.7, (128, 4096) 117 / 130, (64, 4096) 62 / 72,
# backward 71 / 118, BatchNorm (32, 128, 7, 7) 53 / 114; (128, 1024) was mixed (45 / 32
# forward, 44 / 48 backward). float16's backward keeps the slices (it converts every value,
# and the chunks read dy and x twice): (256, 1024) 71-81 / 77-88 us. Views whose normalize
# pass goes flat (NORMALIZE_COLUMNS) keep the slices too: their unfused forward is two calls.
CHUNK_ROWS = 96
# The fused column backward's slices are about this many columns wide (still one per thread
# at least): its row loops cost more per row than the forward's, and BatchNorm 2-D backward
# kernels took, in slices of 128 / 512 columns, (256, 1024) 93 / 82 us, (512, 1024) 293 /
# 195, (1024, 512) 343 / 272 (256 columns); (64, 4096) 150 in slices of 512 (173 in 2048).
BACKWARD_SLICE = 512
# Inputs of at most this many elements run on the calling thread. The break-even point depends
# on how libgomp's threads wait between launches, which the process environment decides (and
# which normcore leaves alone: PyTorch shares the same libgomp). Spinning (the default), a
# launch costs ~3 us and two threads beat one from ~2**15 elements: (n / 1024, 1024) float32
# BatchNorm forward, parallel / serial, 44 / 47 us at n = 2**16, 79 / 111 at 2**18. With
# OMP_WAIT_POLICY=PASSIVE a launch wakes sleeping threads, ~60 us here: BatchNorm forward
# 219 / 111 us and backward 256 / 165 at 2**18, LayerNorm forward 259 / 299 at 2**20.
PASSIVE_WAIT = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
SERIAL_MAX = 1 << 18 if PASSIVE_WAIT else 1 << 15


@dataclass(frozen=True)
class Plan:
    O: int
    A: int
    C: int
    B: int
    P: int                 # parameter period along b (P divides B)
    path: str              # forward path: "rows" | "flat" | "columns" | "columns_fused"
    backward_path: str     # "rows" | "flat" | "columns" | "columns_fused"
    normalize_path: str    # the normalize pass alone (eval; unfused columns): "flat" | "columns"
    K: int                 # work items per o for the flat / column kernels
    S: int                 # channel slices per o for the fused column kernels
    Sb: int                # ... for the fused column backward
    nblk: int              # row blocks for rows_backward
    short_cells: bool      # the row kernels take weight / bias repeated per element
    serial: bool           # small enough for the kernels' serial twins
    stats_shape: tuple     # shape of the saved mean / rstd
    param_shape: tuple     # shape of weight / bias

    @property
    def Q(self):
        return self.B // self.P if self.P else 0

    @property
    def n(self):
        """Elements per statistic."""
        return self.A * self.B


@lru_cache(maxsize=1024)
def canonical(O, A, C, B, P, stats_shape, param_shape, threads, itemsize=8):
    """Choose kernels and work split for the view (O, A, C, B) of data with elements of
    `itemsize` bytes."""
    if C == 1 and P == B:
        # one statistic and one parameter cell per o: the (a, b) axes are one long run
        A, B, P = 1, A * B, max(A * B, 1)
    stats = O * C
    items = ITEMS_PER_THREAD * threads
    per_o = A * C * B
    serial = O * A * C * B <= SERIAL_MAX
    S = Sb = 1
    rows_backward = False
    chunked_backward = True
    if A == 1:      # one contiguous row per statistic; a few long rows go flat for parallelism
        path = "rows" if stats >= items or B <= 4096 else "flat"
    elif B >= RUN_MIN:
        # a statistic's A runs of B stay in cache between its passes when they are few enough
        rows = stats >= items and A * B <= STAT_CACHE and B >= RUN_ROWS
        large = O * A * C * B >= FLAT_FORWARD
        path = "rows" if rows and not (large and itemsize <= 4) else "flat"
        rows_backward = rows and not (large and itemsize <= 2)
    else:
        # short runs: the column kernels. A slice of a sample's channels (all its columns:
        # whole statistics) that fits in cache is normalized right after its statistics (x
        # read once; the backward's dx right after its sums) when there are enough slices to
        # go round (one per thread at least), unless chunks of whole rows are long enough
        # (CHUNK_ROWS).
        if not serial and O < items and O * A * C * B <= SLICE_MAX:
            S = min(math.ceil(items / O), C, max(1, C * B // SLICE_MIN))
        fused = (serial or O * S >= threads) and A * math.ceil(C / S) * B <= STAT_CACHE
        path = "columns_fused" if fused else "columns"
        S = S if fused else 1
        if fused and S > 1:
            Sb = min(C, max(math.ceil(threads / O), math.ceil(C * B / BACKWARD_SLICE)))
            Sb = Sb if A * math.ceil(C / Sb) * B <= STAT_CACHE else S
            if (O == 1 and A >= CHUNK_ROWS * threads      # chunks of whole rows instead,
                    and not (P == B >= FLAT_RUN and C * B > NORMALIZE_COLUMNS)):   # in one call
                path, S = "columns", 1
                chunked_backward = itemsize > 2
                Sb = 1 if chunked_backward else Sb
        half = itemsize <= 2
        if (P == B >= (FLAT_RUN_HALF if half else FLAT_RUN)
                and math.ceil(C / S) * B > (WIDE_COLUMNS_HALF if half else WIDE_COLUMNS)):
            path, S, Sb, chunked_backward = "flat", 1, 1, True
    # The row backward keeps per-block partials of the parameter cells; with P == 1 the cells
    # are per element, so the flat backward (partials per (o, chunk)) would cost more memory.
    backward_path = "rows" if path == "rows" or rows_backward or (A == 1 and P == 1) else path
    if path == "columns" and not chunked_backward:
        backward_path = "columns_fused"
    columns = path.startswith("columns") and not (P == B >= FLAT_RUN
                                                  and C * B > NORMALIZE_COLUMNS)
    normalize_path = "columns" if columns else "flat"
    short_cells = (path == "rows" and A == 1 and 1 < P <= SHORT_CELL
                   and (itemsize <= 4 or P == B) and O >= SHORT_CELL_SAMPLES)
    if serial:      # no split: one chunk per sample, one block of partial sums
        K, nblk = 1, 1
    else:
        K = max(1, min(math.ceil(items / max(O, 1)), per_o // MIN_ITEM or 1))
        if "columns" in (path, backward_path):
            # chunks of at least CHUNK_ROWS rows (see column_forward_chunks): each chunk
            # sums, merges and folds every column once; one per thread at least (they
            # replace slices on inputs too small for more than one item of MIN_ITEM)
            K = min(max(K, math.ceil(threads / O)), max(threads, A // CHUNK_ROWS), A)
        nblk = max(1, min(stats, items))
    return Plan(O, A, C, B, P, path, backward_path, normalize_path, K, S, Sb, nblk, short_cells,
                serial, stats_shape, param_shape)


def _prod(dims):
    return math.prod(dims)


def normalize_axis(axis, ndim, name="axis"):
    """An int axis in range for `ndim` dims, as a non-negative int (ValueError otherwise)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: expected an axis in [{-ndim}, {ndim}) for a {ndim}-d input, "
                         f"got {axis}")
    return axis % ndim


def _channel_axis(shape, axis, what):
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"x: {what} needs at least 2 dims (batch and channel), got shape "
                         f"{shape}")
    ax = normalize_axis(axis, ndim)
    if ax == 0:
        raise ValueError(f"axis: the channel axis cannot be the batch axis 0 (shape {shape}), "
                         f"got {axis}")
    return ax


# typed=True: an axis or group count of True or 1.0 is refused, even after a call with 1
@lru_cache(maxsize=512, typed=True)
def plan_batch_norm(shape, axis, threads, itemsize=8):
    ax = _channel_axis(shape, axis, "batch_norm")
    C = shape[ax]
    B = _prod(shape[ax + 1:])
    return canonical(1, _prod(shape[:ax]), C, B, max(B, 1), (C,), (C,), threads, itemsize)


@lru_cache(maxsize=512, typed=True)
def plan_instance_norm(shape, axis, threads):
    ax = _channel_axis(shape, axis, "instance_norm")
    N, C = shape[0], shape[ax]
    B = _prod(shape[ax + 1:])
    return canonical(N, _prod(shape[1:ax]), C, B, max(B, 1), (N, C), (C,), threads)


@lru_cache(maxsize=512, typed=True)
def plan_group_norm(shape, num_groups, axis, threads, itemsize=8):
    ax = _channel_axis(shape, axis, "group_norm")
    N, C = shape[0], shape[ax]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups: expected an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {C} channels "
                         f"(x shape {shape}, axis {axis}), got {num_groups}")
    P = _prod(shape[ax + 1:])
    B = (C // num_groups) * P
    return canonical(N, _prod(shape[1:ax]), num_groups, B, max(P, 1), (N, num_groups), (C,),
                     threads, itemsize)


def normalize_trailing_axes(axis, ndim):
    """LayerNorm axes: an int or tuple of ints naming the last k axes; returns k."""
    axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else axis
    if not isinstance(axes, tuple) or not axes:
        raise TypeError(f"axis: expected an int or a non-empty tuple of ints, got {axis!r}")
    norm = sorted({normalize_axis(a, ndim) for a in axes})
    if len(norm) != len(axes) or norm != list(range(ndim - len(norm), ndim)):
        raise ValueError(f"axis: expected the trailing axes of a {ndim}-d input (such as -1 or "
                         f"(-2, -1)), got {axis!r}")
    return len(norm)


@lru_cache(maxsize=512, typed=True)
def plan_layer_norm(shape, axis, threads):
    k = normalize_trailing_axes(axis, len(shape))
    lead, normalized = shape[:len(shape) - k], shape[len(shape) - k:]
    return canonical(_prod(lead), 1, 1, _prod(normalized), 1, lead, normalized, threads)


@lru_cache(maxsize=512, typed=True)
def plan_moments(shape, axis, threads):
    """Statistics over the axes `axis` (None: all), kept axes in order.

    Viewed without copying when the kept axes form at most a leading block and one more
    contiguous block; returns (plan, None) then, else (plan, permutation to apply first).
    """
    ndim = len(shape)
    if axis is None:
        reduced = set(range(ndim))
    else:
        axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else axis
        if not isinstance(axes, tuple):
            raise TypeError(f"axis: expected None, an int or a tuple of ints, got {axis!r}")
        reduced = {normalize_axis(a, ndim) for a in axes}
        if len(reduced) != len(axes):
            raise ValueError(f"axis: expected distinct axes, got {axis!r}")
    kept = [d for d in range(ndim) if d not in reduced]
    stats_shape = tuple(shape[d] for d in kept)
    # split the axes into runs: leading kept (O), reduced (A), kept (C), reduced (B)
    i = 0
    while i < ndim and i in kept:
        i += 1
    o_axes = list(range(i))
    rest = [d for d in kept if d >= i]
    perm = None
    if rest and rest != list(range(rest[0], rest[-1] + 1)):
        perm = tuple(kept + sorted(reduced))
        shape = tuple(shape[d] for d in perm)
        o_axes, rest = list(range(len(kept))), []
    if rest:
        c0, c1 = rest[0], rest[-1] + 1
    else:
        c0 = c1 = ndim
    O = _prod(shape[d] for d in o_axes)
    A = _prod(shape[len(o_axes):c0])
    C = _prod(shape[c0:c1])
    B = _prod(shape[c1:])
    return canonical(O, A, C, B, max(B, 1), stats_shape, (), threads), perm

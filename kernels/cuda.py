"""Numba CUDA kernels for normalization over the canonical view (O, A, C, B).

The GPU twin of kernels/cpu.py: every norm is "statistics per (o, c) over the axes a and b"
of a C-contiguous array viewed as (O, A, C, B) and passed flat. Kernels take the extents,
fill caller-allocated outputs and know nothing of axes, dtype policy or array libraries;
this module is imported lazily, by normcore._cuda only.

Math (n = A * B elements per statistic s = o * C + c; w / bias indexed by the parameter cell
c * Q + b // P, Q = B // P)::

    mean  = sum(x) / n                 per thread: Welford; threads, warps, blocks: Chan merges
    var   = sum((x - mean)**2) / n     biased
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

RMSNorm is the uncentred case: mean := 0 and var := mean(x**2), so c2 = 0. Optional arrays
(z, the saved y, dz) are passed as empty arrays when absent.

Chan's merge of the moments (n, mean, m2) of two disjoint sets::

    delta = mean_b - mean_a,  n = n_a + n_b
    mean  = mean_a + delta * n_b / n,  m2 = m2_a + m2_b + delta**2 * n_a * n_b / n

Kernel families:
- rows (A == 1, one statistic per contiguous row of length B): one block per row, fused
  statistics + normalize (forward) and sums + dx (backward) while the row is in L1/L2.
- runs (B long): block (s, k) reduces chunk k of statistic s, cut into runs of one b-row each;
  partials (O, K, C) are merged by `merge_moments`, so a small C still fills the GPU.
- columns (B short: channels-last): a 2-D block, threads along the contiguous columns j and
  along the rows of chunk k; partials (O, K, C * B) merged over k and b by `merge_moments`.
- elementwise `normalize` / `backward_dx` once the statistics are known.
Every reduction has a fixed order (no atomics), so results are bitwise identical run to run.

Accumulation type `acc`: float32 for float16 / float32 input, float64 for float64; the kernels
are built once per `acc` (`build`), so every literal and shared buffer has that type.
Parameters (w, bias, mean, rstd, c1, c2) arrive already cast to `acc`; partial moments and
partial sums are stored as float64.

Block reductions go through `block_reduce_*`: warp shuffles then one slot per warp on a GPU;
under NUMBA_ENABLE_CUDASIM (no shuffles there) a shared-memory tree over every thread.
"""
import math

import numba
import numpy as np
from numba import cuda

SIM = bool(numba.config.ENABLE_CUDASIM)
WARP = 32
MAX_THREADS = 1024
FULL_MASK = 0xFFFFFFFF
# Shared slots of a 1-D block reduction: one per warp on a GPU, one per thread for the
# simulator's tree twin.
BLOCK_SLOTS = MAX_THREADS if SIM else MAX_THREADS // WARP


def build(acc):
    """Every kernel and device function for the accumulation type `acc` (np.float32 / 64)."""

    # -----------------------------------------------------------------------------------------
    # Moments of sets: Welford push, Chan merge
    # -----------------------------------------------------------------------------------------

    @cuda.jit(device=True)
    def welford(n, mean, m2, v):
        n = n + acc(1)
        delta = v - mean
        mean = mean + delta / n
        m2 = m2 + delta * (v - mean)
        return n, mean, m2

    @cuda.jit(device=True)
    def chan_merge(n, mean, m2, nb, meanb, m2b):
        if nb == 0:
            return n, mean, m2
        if n == 0:
            return nb, meanb, m2b
        nn = n + nb
        delta = meanb - mean
        mean = mean + delta * (nb / nn)
        m2 = m2 + m2b + delta * delta * (n * (nb / nn))
        return nn, mean, m2

    @cuda.jit(device=True)
    def epilogue(v, z, i, relu):
        """v + z[i] (when z is given), then ReLU; a NaN stays NaN."""
        if z.size > 0:
            v += acc(z[i])
        if relu and v < acc(0):
            v = acc(0)
        return v

    @cuda.jit(device=True)
    def effective_dy(dy, y, i, relu):
        """dy masked by ReLU's gradient, read from the saved output y."""
        d = acc(dy[i])
        if relu and not acc(y[i]) > acc(0):
            d = acc(0)
        return d

    # -----------------------------------------------------------------------------------------
    # Reductions. tree_*: all threads call; the `count` threads of a group sit at slots
    # slot0 + pos * stride; every thread gets its group's result. Fixed pairing order.
    # -----------------------------------------------------------------------------------------

    @cuda.jit(device=True)
    def tree_reduce_moments(n, mean, m2, sn, smean, sm2, slot, pos, count, stride):
        sn[slot] = n
        smean[slot] = mean
        sm2[slot] = m2
        cuda.syncthreads()
        step = 1
        while step < count:
            if pos % (2 * step) == 0 and pos + step < count:
                other = slot + step * stride
                sn[slot], smean[slot], sm2[slot] = chan_merge(
                    sn[slot], smean[slot], sm2[slot], sn[other], smean[other], sm2[other])
            cuda.syncthreads()
            step *= 2
        root = slot - pos * stride
        n, mean, m2 = sn[root], smean[root], sm2[root]
        cuda.syncthreads()      # the buffers are reused by the next reduction
        return n, mean, m2

    @cuda.jit(device=True)
    def tree_reduce_sum2(s1, s2, sa, sb, slot, pos, count, stride):
        sa[slot] = s1
        sb[slot] = s2
        cuda.syncthreads()
        step = 1
        while step < count:
            if pos % (2 * step) == 0 and pos + step < count:
                sa[slot] += sa[slot + step * stride]
                sb[slot] += sb[slot + step * stride]
            cuda.syncthreads()
            step *= 2
        root = slot - pos * stride
        s1, s2 = sa[root], sb[root]
        cuda.syncthreads()
        return s1, s2

    @cuda.jit(device=True)
    def warp_reduce_moments(n, mean, m2):
        """Lane 0 gets the warp's moments (butterfly-free shuffle-down tree)."""
        offset = WARP // 2
        while offset > 0:
            nb = cuda.shfl_down_sync(FULL_MASK, n, offset)
            meanb = cuda.shfl_down_sync(FULL_MASK, mean, offset)
            m2b = cuda.shfl_down_sync(FULL_MASK, m2, offset)
            n, mean, m2 = chan_merge(n, mean, m2, nb, meanb, m2b)
            offset //= 2
        return n, mean, m2

    @cuda.jit(device=True)
    def warp_reduce_sum2(s1, s2):
        offset = WARP // 2
        while offset > 0:
            s1 += cuda.shfl_down_sync(FULL_MASK, s1, offset)
            s2 += cuda.shfl_down_sync(FULL_MASK, s2, offset)
            offset //= 2
        return s1, s2

    @cuda.jit(device=True)
    def block_reduce_moments_warps(n, mean, m2, sn, smean, sm2):
        """Moments of a 1-D block (blockDim.x a multiple of 32), returned to every thread."""
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        n, mean, m2 = warp_reduce_moments(n, mean, m2)
        if lane == 0:
            sn[warp] = n
            smean[warp] = mean
            sm2[warp] = m2
        cuda.syncthreads()
        if warp == 0:
            if lane < cuda.blockDim.x // WARP:
                n, mean, m2 = sn[lane], smean[lane], sm2[lane]
            else:
                n, mean, m2 = acc(0), acc(0), acc(0)
            n, mean, m2 = warp_reduce_moments(n, mean, m2)
            if lane == 0:
                sn[0] = n
                smean[0] = mean
                sm2[0] = m2
        cuda.syncthreads()
        n, mean, m2 = sn[0], smean[0], sm2[0]
        cuda.syncthreads()
        return n, mean, m2

    @cuda.jit(device=True)
    def block_reduce_sum2_warps(s1, s2, sa, sb):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        s1, s2 = warp_reduce_sum2(s1, s2)
        if lane == 0:
            sa[warp] = s1
            sb[warp] = s2
        cuda.syncthreads()
        if warp == 0:
            if lane < cuda.blockDim.x // WARP:
                s1, s2 = sa[lane], sb[lane]
            else:
                s1, s2 = acc(0), acc(0)
            s1, s2 = warp_reduce_sum2(s1, s2)
            if lane == 0:
                sa[0] = s1
                sb[0] = s2
        cuda.syncthreads()
        s1, s2 = sa[0], sb[0]
        cuda.syncthreads()
        return s1, s2

    @cuda.jit(device=True)
    def block_reduce_moments_tree(n, mean, m2, sn, smean, sm2):
        tid = cuda.threadIdx.x
        return tree_reduce_moments(n, mean, m2, sn, smean, sm2, tid, tid, cuda.blockDim.x, 1)

    @cuda.jit(device=True)
    def block_reduce_sum2_tree(s1, s2, sa, sb):
        tid = cuda.threadIdx.x
        return tree_reduce_sum2(s1, s2, sa, sb, tid, tid, cuda.blockDim.x, 1)

    # The seam: the simulator has no warp shuffles.
    block_reduce_moments = block_reduce_moments_tree if SIM else block_reduce_moments_warps
    block_reduce_sum2 = block_reduce_sum2_tree if SIM else block_reduce_sum2_warps

    # -----------------------------------------------------------------------------------------
    # Rows: A == 1, R = O * C rows of length B, row r in channel c = r % C. Grid-stride over rows.
    # -----------------------------------------------------------------------------------------

    @cuda.jit
    def rows_forward(x, z, relu, centered, y, R, C, B, P, w, bias, eps, mean_out, rstd_out,
                     var_out):
        """Fused statistics + normalize + affine (+ z, ReLU), one block per row.

        x, y: (R * B,) flat rows; z: like x, or empty. w, bias: (C * B // P,) acc.
        mean_out, rstd_out: (R,) saved statistics; var_out: (R,) float64 biased variance
        (mean(x**2) when not centered), or empty when not wanted.
        """
        sn = cuda.shared.array(BLOCK_SLOTS, acc)
        smean = cuda.shared.array(BLOCK_SLOTS, acc)
        sm2 = cuda.shared.array(BLOCK_SLOTS, acc)
        tid = cuda.threadIdx.x
        T = cuda.blockDim.x
        Q = B // P
        for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
            c = r % C
            base = r * B
            # statistics
            n, mean, m2 = acc(0), acc(0), acc(0)
            for b in range(tid, B, T):
                n, mean, m2 = welford(n, mean, m2, acc(x[base + b]))
            n, mean, m2 = block_reduce_moments(n, mean, m2, sn, smean, sm2)
            var = m2 / n
            if not centered:
                var += mean * mean
                mean = acc(0)
            rstd = acc(1) / math.sqrt(var + acc(eps))
            if tid == 0:
                mean_out[r] = mean
                rstd_out[r] = rstd
                if var_out.size > 0:
                    var_out[r] = var
            # normalize (the row is still in cache)
            for b in range(tid, B, T):
                cell = c * Q + b // P
                v = (acc(x[base + b]) - mean) * (rstd * w[cell]) + bias[cell]
                y[base + b] = epilogue(v, z, base + b, relu)

    @cuda.jit
    def rows_backward(dy, y, relu, x, dx, dz, R, C, B, P, mean, rstd, w, frozen, centered,
                      sdy, sdyxhat):
        """Fused backward, one block per row: g1, g2, then dx (and dz) while the row is in
        cache. y: the saved output (read with relu only); dz: like x, or empty.

        mean, rstd: (R,) acc. sdy, sdyxhat: (R * Q,) float64 per-(row, cell) sum(dy) and
        sum(dy * xhat), filled when not empty (long parameter periods P); with them empty
        the caller reduces the cells itself (`columns_backward_sums`).
        """
        sa = cuda.shared.array(BLOCK_SLOTS, acc)
        sb = cuda.shared.array(BLOCK_SLOTS, acc)
        tid = cuda.threadIdx.x
        T = cuda.blockDim.x
        Q = B // P
        for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
            c = r % C
            base = r * B
            mu = mean[r]
            rs = rstd[r]
            g1, g2 = acc(0), acc(0)
            if sdy.size > 0:
                # one segment of P elements per parameter cell
                for q in range(Q):
                    lo = base + q * P
                    s1, s2 = acc(0), acc(0)
                    for p in range(tid, P, T):
                        d = effective_dy(dy, y, lo + p, relu)
                        s1 += d
                        s2 += d * (acc(x[lo + p]) - mu)
                    s1, s2 = block_reduce_sum2(s1, s2, sa, sb)
                    s2 *= rs
                    if tid == 0:
                        sdy[r * Q + q] = s1
                        sdyxhat[r * Q + q] = s2
                    g1 += w[c * Q + q] * s1
                    g2 += w[c * Q + q] * s2
            elif not frozen:
                for b in range(tid, B, T):
                    d = effective_dy(dy, y, base + b, relu) * w[c * Q + b // P]
                    g1 += d
                    g2 += d * (acc(x[base + b]) - mu)
                g1, g2 = block_reduce_sum2(g1, g2, sa, sb)
                g2 *= rs
            c1, c2 = acc(0), acc(0)
            if not frozen:
                c1 = g2 / acc(B)
                if centered:
                    c2 = g1 / acc(B)
            for b in range(tid, B, T):
                i = base + b
                d = effective_dy(dy, y, i, relu)
                xhat = (acc(x[i]) - mu) * rs
                dx[i] = rs * (d * w[c * Q + b // P] - c2 - xhat * c1)
                if dz.size > 0:
                    dz[i] = d

    # -----------------------------------------------------------------------------------------
    # Runs: block (s, k) walks chunk k of statistic s's n = A * B elements, one b-run at a time
    # (a division per run, none per element). Partials at (o * K + k) * C + c.
    # -----------------------------------------------------------------------------------------

    @cuda.jit
    def runs_moments(x, O, A, C, B, K, count, mean, m2):
        """Partial moments per (o, k, c) of view (O, A, C, B). count/mean/m2: (O * K * C,) f64."""
        sn = cuda.shared.array(BLOCK_SLOTS, acc)
        smean = cuda.shared.array(BLOCK_SLOTS, acc)
        sm2 = cuda.shared.array(BLOCK_SLOTS, acc)
        tid = cuda.threadIdx.x
        T = cuda.blockDim.x
        nstat = A * B
        for unit in range(cuda.blockIdx.x, O * C * K, cuda.gridDim.x):
            k = unit % K
            c = (unit // K) % C
            o = unit // (K * C)
            hi = (k + 1) * nstat // K
            n, mu, q = acc(0), acc(0), acc(0)
            e = k * nstat // K
            while e < hi:
                a = e // B
                b0 = e - a * B
                b1 = min(B, b0 + hi - e)
                base = ((o * A + a) * C + c) * B
                for b in range(b0 + tid, b1, T):
                    n, mu, q = welford(n, mu, q, acc(x[base + b]))
                e += b1 - b0
            n, mu, q = block_reduce_moments(n, mu, q, sn, smean, sm2)
            if tid == 0:
                i = (o * K + k) * C + c
                count[i] = n
                mean[i] = mu
                m2[i] = q

    @cuda.jit
    def runs_backward_sums(dy, y, relu, x, O, A, CQ, P, Q, K, mean, rstd, sdy, sdyxhat):
        """Partial sum(dy), sum(dy * xhat) per (o, k, cell) of the view (O, A, C * Q, P), where
        cell = c * Q + q holds statistic o * C + cell // Q. sdy/sdyxhat: (O * K * CQ,) f64."""
        sa = cuda.shared.array(BLOCK_SLOTS, acc)
        sb = cuda.shared.array(BLOCK_SLOTS, acc)
        tid = cuda.threadIdx.x
        T = cuda.blockDim.x
        C = CQ // Q
        ncell = A * P
        for unit in range(cuda.blockIdx.x, O * CQ * K, cuda.gridDim.x):
            k = unit % K
            cell = (unit // K) % CQ
            o = unit // (K * CQ)
            s = o * C + cell // Q
            mu = mean[s]
            hi = (k + 1) * ncell // K
            s1, s2 = acc(0), acc(0)
            e = k * ncell // K
            while e < hi:
                a = e // P
                p0 = e - a * P
                p1 = min(P, p0 + hi - e)
                base = ((o * A + a) * CQ + cell) * P
                for p in range(p0 + tid, p1, T):
                    d = effective_dy(dy, y, base + p, relu)
                    s1 += d
                    s2 += d * (acc(x[base + p]) - mu)
                e += p1 - p0
            s1, s2 = block_reduce_sum2(s1, s2, sa, sb)
            if tid == 0:
                i = (o * K + k) * CQ + cell
                sdy[i] = s1
                sdyxhat[i] = s2 * rstd[s]

    # -----------------------------------------------------------------------------------------
    # Columns: view (G, A, J) with J = C * B contiguous columns; block (g, k, column tile) with
    # threads (tx along j, ty along the rows of chunk k), merged over ty in shared memory.
    # -----------------------------------------------------------------------------------------

    @cuda.jit
    def columns_moments(x, O, A, J, K, count, mean, m2):
        """Partial moments per (o, k, j). count/mean/m2: (O * K * J,) float64."""
        sn = cuda.shared.array(MAX_THREADS, acc)
        smean = cuda.shared.array(MAX_THREADS, acc)
        sm2 = cuda.shared.array(MAX_THREADS, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        JT = (J + TX - 1) // TX
        for unit in range(cuda.blockIdx.x, O * K * JT, cuda.gridDim.x):
            jt = unit % JT
            k = (unit // JT) % K
            o = unit // (JT * K)
            j = jt * TX + tx
            n, mu, q = acc(0), acc(0), acc(0)
            if j < J:
                for a in range(k * A // K + ty, (k + 1) * A // K, TY):
                    n, mu, q = welford(n, mu, q, acc(x[(o * A + a) * J + j]))
            n, mu, q = tree_reduce_moments(n, mu, q, sn, smean, sm2, ty * TX + tx, ty, TY, TX)
            if ty == 0 and j < J:
                i = (o * K + k) * J + j
                count[i] = n
                mean[i] = mu
                m2[i] = q

    @cuda.jit
    def columns_backward_sums(dy, y, relu, x, G, A, J, K, D, C, B, mean, rstd, sdy, sdyxhat):
        """Partial sum(dy), sum(dy * xhat) per (g, k, j) of the view (G, A, J); the element at
        row t = g * A + a, column j belongs to statistic (t // D) * C + j // B.
        sdy/sdyxhat: (G * K * J,) float64."""
        sa = cuda.shared.array(MAX_THREADS, acc)
        sb = cuda.shared.array(MAX_THREADS, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TX = cuda.blockDim.x
        TY = cuda.blockDim.y
        JT = (J + TX - 1) // TX
        for unit in range(cuda.blockIdx.x, G * K * JT, cuda.gridDim.x):
            jt = unit % JT
            k = (unit // JT) % K
            g = unit // (JT * K)
            j = jt * TX + tx
            s1, s2 = acc(0), acc(0)
            if j < J:
                for a in range(k * A // K + ty, (k + 1) * A // K, TY):
                    t = g * A + a
                    s = (t // D) * C + j // B
                    d = effective_dy(dy, y, t * J + j, relu)
                    s1 += d
                    s2 += d * ((acc(x[t * J + j]) - mean[s]) * rstd[s])
            s1, s2 = tree_reduce_sum2(s1, s2, sa, sb, ty * TX + tx, ty, TY, TX)
            if ty == 0 and j < J:
                i = (g * K + k) * J + j
                sdy[i] = s1
                sdyxhat[i] = s2

    # -----------------------------------------------------------------------------------------
    # Second stage and elementwise kernels
    # -----------------------------------------------------------------------------------------

    @cuda.jit
    def merge_moments(count, mean, m2, O, K, C, Bp, mean_out, var_out):
        """Merge partials laid out (O, K, C, Bp) over k and the Bp columns of each statistic
        into mean_out / var_out (O * C,) float64, one block per statistic; var is biased."""
        sn = cuda.shared.array(BLOCK_SLOTS, acc)
        smean = cuda.shared.array(BLOCK_SLOTS, acc)
        sm2 = cuda.shared.array(BLOCK_SLOTS, acc)
        tid = cuda.threadIdx.x
        T = cuda.blockDim.x
        for s in range(cuda.blockIdx.x, O * C, cuda.gridDim.x):
            o = s // C
            c = s % C
            n, mu, q = acc(0), acc(0), acc(0)
            for m in range(tid, K * Bp, T):
                i = ((o * K + m // Bp) * C + c) * Bp + m % Bp
                n, mu, q = chan_merge(n, mu, q, acc(count[i]), acc(mean[i]), acc(m2[i]))
            n, mu, q = block_reduce_moments(n, mu, q, sn, smean, sm2)
            if tid == 0:
                mean_out[s] = mu if n > 0 else np.nan
                var_out[s] = q / n if n > 0 else np.nan

    @cuda.jit
    def normalize(x, z, relu, y, O, A, C, B, P, mean, rstd, w, bias):
        """y = relu((x - mean) * rstd * w + bias + z), elementwise; z like x or empty;
        mean, rstd: (O * C,), w, bias: (C * Q,), all acc."""
        Q = B // P
        for i in range(cuda.grid(1), O * A * C * B, cuda.gridsize(1)):
            b = i % B
            c = (i // B) % C
            s = (i // (A * C * B)) * C + c
            cell = c * Q + b // P
            y[i] = epilogue((acc(x[i]) - mean[s]) * (rstd[s] * w[cell]) + bias[cell], z, i,
                            relu)

    @cuda.jit
    def backward_dx(dy, y, relu, x, dx, dz, O, A, C, B, P, mean, rstd, w, c1, c2):
        """dx = rstd * (dy * w - c2 - xhat * c1) and dz = dy (when dz is not empty), with dy
        masked by ReLU's gradient when relu; mean, rstd, c1, c2: (O * C,), w: (C * Q,), acc."""
        Q = B // P
        for i in range(cuda.grid(1), O * A * C * B, cuda.gridsize(1)):
            b = i % B
            c = (i // B) % C
            s = (i // (A * C * B)) * C + c
            d = effective_dy(dy, y, i, relu)
            xhat = (acc(x[i]) - mean[s]) * rstd[s]
            dx[i] = rstd[s] * (d * w[c * Q + b // P] - c2[s] - xhat * c1[s])
            if dz.size > 0:
                dz[i] = d

    return {
        "rows_forward": rows_forward,
        "rows_backward": rows_backward,
        "runs_moments": runs_moments,
        "runs_backward_sums": runs_backward_sums,
        "columns_moments": columns_moments,
        "columns_backward_sums": columns_backward_sums,
        "merge_moments": merge_moments,
        "normalize": normalize,
        "backward_dx": backward_dx,
    }


# Accumulation type per input dtype (float16 loads/stores as float16, computes in float32).
ACCUMULATOR = {np.dtype(np.float16): np.float32, np.dtype(np.float32): np.float32,
               np.dtype(np.float64): np.float64}

# One registry of the kernels, per accumulation type: the backend looks kernels up here and
# tests/test_cuda_ptx.py compiles every entry for every input dtype that uses it.
KERNELS = {acc.__name__: build(acc) for acc in (np.float32, np.float64)}
# Partial moments are float64 whatever the input, so they are always merged in float64.
del KERNELS["float32"]["merge_moments"]


def kernels_for(dtype):
    """The kernel table for input `dtype` (merge_moments: the float64 table's)."""
    return {**KERNELS["float64"], **KERNELS[ACCUMULATOR[np.dtype(dtype)].__name__]}


def signature(name, dtype):
    """Numba signature of kernel `name` for input `dtype` (what the backend launches with)."""
    x = f"{np.dtype(dtype).name}[::1]"
    a = f"{ACCUMULATOR[np.dtype(dtype)].__name__}[::1]"
    f64 = "float64[::1]"
    i = "int64"
    b = "boolean"
    args = {
        "rows_forward": [x, x, b, b, x, i, i, i, i, a, a, "float64", a, a, f64],
        "rows_backward": [x, x, b, x, x, x, i, i, i, i, a, a, a, b, b, f64, f64],
        "runs_moments": [x, i, i, i, i, i, f64, f64, f64],
        "runs_backward_sums": [x, x, b, x, i, i, i, i, i, i, a, a, f64, f64],
        "columns_moments": [x, i, i, i, i, f64, f64, f64],
        "columns_backward_sums": [x, x, b, x, i, i, i, i, i, i, i, a, a, f64, f64],
        "merge_moments": [f64, f64, f64, i, i, i, i, f64, f64],
        "normalize": [x, x, b, x, i, i, i, i, i, a, a, a, a],
        "backward_dx": [x, x, b, x, x, x, i, i, i, i, i, a, a, a, a, a],
    }[name]
    return f"void({', '.join(args)})"

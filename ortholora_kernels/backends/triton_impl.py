"""The triton backend: fused kernels for the Gram, the solve and the combine.

Forward: two launches, no host synchronisation, no per-call host work growing with N.

1. ``_gram_kernel``, one program per *chunk* (a column range inside one segment; the
   chunk table is built once per layout and cached on the :class:`Segments`):
   pass 1 takes each row's max-abs over the chunk, pass 2 scales the rows by the power
   of two that brings that max into [1, 2) (squares of gradients at 1e-30 or 1e30 leave
   fp32's range) and un-scales exactly into one fp64 partial per chunk. T >= 16:
   ``tl.dot`` per column tile, its fp32 sum added to an fp64 accumulator (bf16/fp16
   operands on tensor cores, exact products; fp16 needs no scaling pass; fp32 in IEEE
   FMAs); below, fp32 outer products per thread. A few programs per SM, each looping over
   its chunk's tiles; 16-aligned vector loads when every segment offset allows. No
   atomics on data.
   Stage 2 runs in the tail of the same launch through a two-level ticket tree (atomic
   counters): the last program of each group of ``_GROUP`` chunks sums the group's
   partials; the last group of a segment sums the group sums -> G and runs the
   sequential projection on the T x T matrix, branch-free in fp64 (``min(inner, 0)``,
   ``G[j, j] == 0`` skipped) -> C, the combine weights W, the projection count. Every
   sum has a fixed order whichever program comes last: bitwise equal run after run.
2. ``_combine_kernel``: ``out = W_s X_s`` (C_s X_s for "none") per column block, fp32
   accumulation (fp64 for fp64 input), rounded once to the input dtype.

``_FUSED = False`` runs stage 2 as a launch of its own (three launches; same results).
Backward (composed in ops.py): three launches. ``v = dY X^T`` by the Gram kernel (cross
product, no solve); ``_solve_vjp_kernel``, one program per segment, replays the solve (W) and
runs its reverse mode (``M = Gbar + Gbar^T``), the arithmetic of
:func:`ortholora_kernels.solve.solve_vjp` (as torch ops that is ~35 T tiny launches per call:
about 1,100 at T = 32); then ``dX = W^T dY + M X`` by the combine. ``_FUSED_VJP = False``
runs the torch ops instead, and so does T > 64 (``_VJP_MAX_T_PAD``: the kernel's shared
memory and spills grow as T_PAD^2).

On CPU tensors the same kernels run through the Triton interpreter, only when
``TRITON_INTERPRET=1`` is set before this module is first imported (Triton picks the
interpreter when a kernel is defined). Non-contiguous input is copied (``ops.py`` calls
``.contiguous()``); the kernels assume row-major ``[T, N]``. CUDA graphs: make one call
outside capture first (it builds the cached tables), or let the first call be captured:
then its tables and workspace belong to the graph (see :class:`_Layout`, :func:`_workspace`).
Launches run under a device guard (a ``cuda:1`` tensor launches on GPU 1 whatever the
current device).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from .._args import Segments
from .base import Backend

NAME = "triton"

try:  # an optional dependency: importing this module must never fail without it
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Fixed configurations, no autotune: the interpreter runs multi-config autotune badly and
# a fixed config keeps the reduction order, hence the bits, identical run after run.
_TILE_ELEMS = 16384        # register budget (elements) that sizes the column tiles
# Gram programs per launch: a few per SM (CUDA), whatever N is, so the fp64 partials
# (one R_PAD x T_PAD tile per program) stay a fixed few MiB and not a fraction of X's
# bytes (16 tiles per program at most made T = 64, N = 16M bf16 launch 15,625 programs:
# 492 MiB of partials, 25% of X). A program loops over as many column tiles as it needs.
_PROGRAMS_PER_SM = 4
_TARGET_PROGRAMS = None    # an int overrides the count (tests, CPU); None: _PROGRAMS_PER_SM x SMs
_CPU_PROGRAMS = 1024       # the interpreter's count (it has no SMs)
_MAX_WORKSPACES = 8        # eager workspaces kept per layout and kind (streams x shapes), oldest dropped
_REDUCE_ELEMS = 2048       # fp64 elements per step of a partial sum (16 per thread)
_GROUP = 16                # chunks per first-level group of the fused reduction
_FUSED = True              # stage 2 in the tail of the Gram launch (False: its own launch)
# Largest T on CUDA (backends._MAX_TASKS says the same to the automatic choice): sm_90,
# T = 128 compiles with ~2 KB of spills per thread in the fused Gram + solve, T = 129
# (T_PAD 256) with ~54 KB. The interpreter has no such limit.
_MAX_TASKS_CUDA = 128


def availability(device: torch.device) -> str | None:
    """None when usable on ``device``: CUDA with Triton, or CPU under TRITON_INTERPRET=1."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR}); pip install triton"
    device = torch.device(device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 (before importing ortholora_kernels)"
        if not _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after the triton backend was imported; set it before "
                    "importing ortholora_kernels")
        return None
    if device.type == "cuda":
        if _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set when the triton backend was imported: its kernels run in the "
                    "CPU interpreter, not on the GPU; unset it for CUDA tensors")
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None
    return f"no Triton support for {device.type} tensors"


def _pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


if triton is not None:

    @triton.jit
    def _pow2_scale(m):
        """``(2^-e fp32, 2^e fp64)`` per row, ``e`` the binary exponent of max-abs ``m``.

        Bit manipulation rather than log2/exp2: no libdevice, exact powers of two, so
        scaling loses no bits and the fp64 un-scaling is exact.
        """
        e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, -126), 126)            # denormals, inf/NaN: stay in range
        down = ((127 - e) << 23).to(tl.float32, bitcast=True)
        up = ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
        return down, up

    @triton.jit
    def _gram_kernel(a_ptr, b_ptr, part_ptr, table_ptr, N, R, T,
                     group_off_ptr, seg_group_off_ptr, gpart_ptr, gticket_ptr, sticket_ptr,
                     g_ptr, order_ptr, c_ptr, w_ptr, nproj_ptr,
                     R_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     SAME: tl.constexpr, FP64: tl.constexpr, USE_DOT: tl.constexpr,
                     FUSED: tl.constexpr, RB: tl.constexpr, SOLVE: tl.constexpr,
                     MEAN: tl.constexpr, NONE: tl.constexpr, REG_SOLVE: tl.constexpr,
                     ALIGNED: tl.constexpr = False, LOWP: tl.constexpr = 0, FLUSH64: tl.constexpr = True,
                     DOT_PRECISION: tl.constexpr = "ieee", STAGES: tl.constexpr = None):
        """Partial ``A_c B_c^T`` (fp64 ``[R_PAD, T_PAD]``) of chunk ``c = program_id``.

        FUSED: a two-level ticket tree replaces the stage-2 launch. The last program to
        finish a *group* of chunks sums the group's partials; the last group of a
        segment sums the group sums and runs the solve (:func:`_finish`). Two short
        fixed-order sums keep the serial tail short, and whichever program comes last,
        the order of every sum is the same: results are bitwise equal run after run.
        """
        pid = tl.program_id(0)
        start = tl.load(table_ptr + pid * 4 + 1)
        end = tl.load(table_ptr + pid * 4 + 2)
        if ALIGNED:   # every segment offset (and N) 16-divisible: chunk bounds are too -> vector loads
            start = tl.multiple_of(start, 16)
            end = tl.multiple_of(end, 16)
        ra = tl.arange(0, R_PAD)
        rb = tl.arange(0, T_PAD)
        cols = tl.arange(0, BLOCK)
        a_rows = a_ptr + ra.to(tl.int64)[:, None] * N
        b_rows = b_ptr + rb.to(tl.int64)[:, None] * N
        a_live = (ra < R)[:, None]
        b_live = (rb < T)[:, None]
        if FP64:  # fp64 has the range for squares: no scaling, fp64 products
            if USE_DOT:
                acc = tl.zeros([R_PAD, T_PAD], dtype=tl.float64)
            else:
                acc3 = tl.zeros([R_PAD, T_PAD, BLOCK], dtype=tl.float64)
            for c0 in tl.range(start, end, BLOCK, num_stages=STAGES):
                c = c0 + cols
                cm = (c < end)[None, :]
                a = tl.load(a_rows + c[None, :], mask=a_live & cm, other=0.0).to(tl.float64)
                if SAME:
                    b = a
                else:
                    b = tl.load(b_rows + c[None, :], mask=b_live & cm, other=0.0).to(tl.float64)
                if USE_DOT:
                    # out_dtype: Triton 3.6 (the GPU image's) rejects an fp64 accumulator
                    # with the default fp32 out_dtype; newer Tritons infer it.
                    acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float64)
                else:
                    acc3 += a[:, None, :] * b[None, :, :]
            if not USE_DOT:
                acc = tl.sum(acc3, axis=2)
        else:
            if LOWP == 1:
                # fp16 operands need no scaling: fp16 x fp16 products are exact in fp32
                # (11 + 11 significant bits) and stay inside its range (2^-48 .. 2^32).
                ua = tl.full([R_PAD], 1.0, dtype=tl.float64)
                ub = tl.full([T_PAD], 1.0, dtype=tl.float64)
                da = tl.full([R_PAD], 1.0, dtype=tl.float32)
                db = tl.full([T_PAD], 1.0, dtype=tl.float32)
            else:
                # Pass 1: per-row max-abs over the chunk. Squares of 1e-30 or 1e30 leave fp32's
                # range, so rows are scaled by powers of two into [1, 2) before any product.
                # (Pass 2 re-reads the chunk, just fetched: from L2, not HBM.)
                ma = tl.zeros([R_PAD], dtype=tl.float32)
                mb = tl.zeros([T_PAD], dtype=tl.float32)
                for c0 in tl.range(start, end, BLOCK, num_stages=STAGES):
                    c = c0 + cols
                    cm = (c < end)[None, :]
                    a = tl.load(a_rows + c[None, :], mask=a_live & cm, other=0.0).to(tl.float32)
                    ma = tl.maximum(ma, tl.max(tl.abs(a), axis=1))
                    if not SAME:
                        b = tl.load(b_rows + c[None, :], mask=b_live & cm, other=0.0).to(tl.float32)
                        mb = tl.maximum(mb, tl.max(tl.abs(b), axis=1))
                da, ua = _pow2_scale(ma)
                if SAME:
                    db = da
                    ub = ua
                else:
                    db, ub = _pow2_scale(mb)
            # Pass 2: products of scaled values (|.| < 2). tl.dot: one tile's products in
            # fp32 (tensor cores: bf16/fp16 operands, exact products; fp32 operands as
            # DOT_PRECISION says), added to an fp64 accumulator per tile, so the fp32
            # rounding spans one tile (BLOCK columns), never the whole chunk. Outer products:
            # fp32 per thread over the chunk, one cross-thread reduction per chunk.
            if USE_DOT:
                acc2 = tl.zeros([R_PAD, T_PAD], dtype=tl.float64 if FLUSH64 else tl.float32)
            else:
                acc3 = tl.zeros([R_PAD, T_PAD, BLOCK], dtype=tl.float32)
            for c0 in tl.range(start, end, BLOCK, num_stages=STAGES):
                c = c0 + cols
                cm = (c < end)[None, :]
                a = tl.load(a_rows + c[None, :], mask=a_live & cm, other=0.0)
                if LOWP != 1:
                    a = a.to(tl.float32) * da[:, None]
                if SAME:
                    b = a
                else:
                    b = tl.load(b_rows + c[None, :], mask=b_live & cm, other=0.0)
                    if LOWP != 1:
                        b = b.to(tl.float32) * db[:, None]
                if USE_DOT:
                    if LOWP == 2:   # scaled by a power of two: still exactly bf16
                        a = a.to(tl.bfloat16)
                        b = a if SAME else b.to(tl.bfloat16)
                    if FLUSH64:
                        acc2 += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION,
                                       out_dtype=tl.float32).to(tl.float64)
                    else:   # T_PAD 128: an fp64 tile would spill; fp32 over the chunk
                        acc2 = tl.dot(a, tl.trans(b), acc2, input_precision=DOT_PRECISION)
                else:
                    acc3 += a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
            if USE_DOT:
                p = acc2.to(tl.float64)
            else:
                p = tl.sum(acc3, axis=2).to(tl.float64)
            acc = p * ua[:, None] * ub[None, :]
        flat = ra[:, None] * T_PAD + rb[None, :]
        tl.store(part_ptr + pid.to(tl.int64) * (R_PAD * T_PAD) + flat, acc)
        if FUSED:
            grp = tl.load(table_ptr + pid * 4 + 3)
            glo = tl.load(group_off_ptr + grp)
            ghi = tl.load(group_off_ptr + grp + 1)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            ticket = tl.atomic_add(gticket_ptr + grp, 1, sem="acq_rel")
            if ticket == ghi - glo - 1:              # last chunk of its group to finish
                tl.store(gticket_ptr + grp, 0)       # reset for the next call: no memset launch
                gsum = _sum_partials(part_ptr, glo, ghi, R_PAD, T_PAD, RB)
                tl.store(gpart_ptr + grp.to(tl.int64) * (R_PAD * T_PAD) + flat, gsum)
                s = tl.load(table_ptr + pid * 4)
                slo = tl.load(seg_group_off_ptr + s)
                shi = tl.load(seg_group_off_ptr + s + 1)
                tl.debug_barrier()
                ticket2 = tl.atomic_add(sticket_ptr + s, 1, sem="acq_rel")
                if ticket2 == shi - slo - 1:         # last group of its segment
                    tl.store(sticket_ptr + s, 0)
                    _finish(gpart_ptr, slo, shi, s, g_ptr, order_ptr, c_ptr, w_ptr, nproj_ptr, R, T,
                            R_PAD, T_PAD, RB, SOLVE, MEAN, NONE, REG_SOLVE)

    @triton.jit
    def _sum_partials(part_ptr, lo, hi, R_PAD: tl.constexpr, T_PAD: tl.constexpr, RB: tl.constexpr):
        """``sum(part[lo:hi])`` as fp64 ``[R_PAD, T_PAD]``, in a fixed order."""
        i = tl.arange(0, RB)
        r = tl.arange(0, R_PAD)
        k = tl.arange(0, T_PAD)
        flat = (r[:, None] * T_PAD + k[None, :])[None, :, :]
        acc = tl.zeros([R_PAD, T_PAD], dtype=tl.float64)
        for p0 in range(lo, hi, RB):
            p = p0 + i
            # .cg: partials written by other programs of this launch must not come from L1
            tile = tl.load(part_ptr + p.to(tl.int64)[:, None, None] * (R_PAD * T_PAD) + flat,
                           mask=(p < hi)[:, None, None], other=0.0, cache_modifier=".cg")
            acc += tl.sum(tile, axis=0)
        return acc

    @triton.jit
    def _finish(part_ptr, lo, hi, s, g_ptr, order_ptr, c_ptr, w_ptr, nproj_ptr, R, T,
                R_PAD: tl.constexpr, T_PAD: tl.constexpr, RB: tl.constexpr,
                SOLVE: tl.constexpr, MEAN: tl.constexpr, NONE: tl.constexpr, REG_SOLVE: tl.constexpr):
        """Segment ``s``: ``G = sum(part[lo:hi])`` (fixed order, fp64); then (SOLVE) the
        sequential projection -> C, W, nproj.
        """
        g = _sum_partials(part_ptr, lo, hi, R_PAD, T_PAD, RB)
        r = tl.arange(0, R_PAD)
        col = tl.arange(0, T_PAD)
        g_seg = g_ptr + s.to(tl.int64) * R * T
        tl.store(g_seg + r[:, None] * T + col[None, :], g, mask=(r[:, None] < R) & (col[None, :] < T))
        if SOLVE:  # R == T, R_PAD == T_PAD here
            i = r
            live = i < T
            cmask = col[None, :] < T
            coeffs = (i[:, None] == col[None, :]).to(tl.float64)   # g_i' = sum_k C[i, k] g_k
            count = tl.zeros([T_PAD], dtype=tl.int32)
            o_seg = order_ptr + s.to(tl.int64) * T * T
            if REG_SOLVE:
                # Small T: G and the orders stay in registers; rows G[j_i] are gathered with
                # one-hot products, so no step waits on a memory round trip.
                orders = tl.load(o_seg + i[:, None] * T + col[None, :], mask=live[:, None] & cmask, other=0)
                diag = tl.sum(tl.where(i[:, None] == col[None, :], g, 0.0), axis=1)
            else:
                tl.debug_barrier()  # G is re-read below by other threads of this program
            for step in range(0, T):   # every task i visits j = order[s, i, step] at once
                if REG_SOLVE:
                    j = tl.sum(tl.where(col[None, :] == step, orders, 0), axis=1)
                    # where, not a 0/1 product: a NaN in another row must not leak in
                    pick = j[:, None] == col[None, :]                                # [i, q]
                    g_j = tl.sum(tl.where(pick[:, :, None], g[None, :, :], 0.0), axis=1)  # G[j_i, :]
                    norm2 = tl.sum(tl.where(pick, diag[None, :], 0.0), axis=1)
                else:
                    j = tl.load(o_seg + i * T + step, mask=live, other=0)
                    # Order values are never checked on the device (that would be a host
                    # sync): an out-of-range j is skipped (norm2 = 0), never dereferenced.
                    jok = live & (j >= 0) & (j < T)
                    g_j = tl.load(g_seg + j[:, None] * T + col[None, :], mask=jok[:, None] & cmask, other=0.0)
                    norm2 = tl.load(g_seg + j * (T + 1), mask=jok, other=0.0)
                inner = tl.sum(coeffs * g_j, axis=1)                 # g_i' . g_j
                valid = live & (j != i) & (norm2 > 0)                # never divide by a zero task
                safe = tl.where(valid, norm2, 1.0)
                # min(inner, 0) written so a NaN inner stays NaN (propagates, never zeroed)
                coef = tl.where(valid, tl.where(inner > 0, 0.0, inner) / safe, 0.0)
                coeffs = tl.where(col[None, :] == j[:, None], coeffs - coef[:, None], coeffs)
                count += (valid & (inner < 0)).to(tl.int32)
            tl.store(c_ptr + s.to(tl.int64) * T * T + i[:, None] * T + col[None, :], coeffs,
                     mask=live[:, None] & cmask)
            tl.store(nproj_ptr + s, tl.sum(count, axis=0))
            if not NONE:  # for "none" the combine reads C itself
                w = tl.sum(coeffs, axis=0)
                if MEAN:
                    w = w / T
                tl.store(w_ptr + s.to(tl.int64) * T + col, w, mask=col < T)

    @triton.jit
    def _reduce_solve_kernel(part_ptr, chunk_off_ptr, g_ptr, order_ptr, c_ptr, w_ptr, nproj_ptr, R, T,
                             R_PAD: tl.constexpr, T_PAD: tl.constexpr, RB: tl.constexpr,
                             SOLVE: tl.constexpr, MEAN: tl.constexpr, NONE: tl.constexpr,
                             REG_SOLVE: tl.constexpr):
        """Unfused stage 2 (``_FUSED = False``): one program per segment."""
        s = tl.program_id(0)
        lo = tl.load(chunk_off_ptr + s)
        hi = tl.load(chunk_off_ptr + s + 1)
        _finish(part_ptr, lo, hi, s, g_ptr, order_ptr, c_ptr, w_ptr, nproj_ptr, R, T,
                R_PAD, T_PAD, RB, SOLVE, MEAN, NONE, REG_SOLVE)

    @triton.jit
    def _combine_kernel(table_ptr, x_ptr, K1, a_ptr, a_ss, a_sr, a_sk,
                        y_ptr, K2, b_ptr, b_ss, b_sr, b_sk, out_ptr, N, R,
                        R_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_Y: tl.constexpr,
                        FP64: tl.constexpr, ALIGNED: tl.constexpr = False):
        """``out[:, blk] = A_s X[:, blk] (+ B_s Y[:, blk])`` for the block's segment ``s``.

        ``A``/``B`` are read through strides so a transpose costs nothing.
        """
        pid = tl.program_id(0)
        s = tl.load(table_ptr + pid * 4)
        start = tl.load(table_ptr + pid * 4 + 1)
        end = tl.load(table_ptr + pid * 4 + 2)
        if ALIGNED:   # see _gram_kernel
            start = tl.multiple_of(start, 16)
            end = tl.multiple_of(end, 16)
        r = tl.arange(0, R_PAD)
        c = start + tl.arange(0, BLOCK)
        cm = c < end
        rm = r < R
        if FP64:
            acc = tl.zeros([R_PAD, BLOCK], dtype=tl.float64)
        else:
            acc = tl.zeros([R_PAD, BLOCK], dtype=tl.float32)
        a_col = a_ptr + s * a_ss + r * a_sr
        x_row = x_ptr + c
        for _ in range(0, K1):  # rank-1 updates: each row of X is read once
            xk = tl.load(x_row, mask=cm, other=0.0).to(acc.dtype)
            ak = tl.load(a_col, mask=rm, other=0.0).to(acc.dtype)
            acc += ak[:, None] * xk[None, :]
            x_row += N          # pointer increments stay 64-bit: no T * N overflow
            a_col += a_sk
        if HAS_Y:
            b_col = b_ptr + s * b_ss + r * b_sr
            y_row = y_ptr + c
            for _ in range(0, K2):
                yk = tl.load(y_row, mask=cm, other=0.0).to(acc.dtype)
                bk = tl.load(b_col, mask=rm, other=0.0).to(acc.dtype)
                acc += bk[:, None] * yk[None, :]
                y_row += N
                b_col += b_sk
        tl.store(out_ptr + r.to(tl.int64)[:, None] * N + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])

    @triton.jit
    def _solve_vjp_kernel(g_ptr, order_ptr, v_ptr, m_ptr, w_ptr, scratch_ptr, T,
                          T_PAD: tl.constexpr, MEAN: tl.constexpr, NONE: tl.constexpr):
        """The backward's stage 2 for segment ``s = program_id``, in one program: the PCGrad
        solve replayed (-> the combine weights W) and its reverse mode (-> ``M = Gbar + Gbar^T``).

        The same arithmetic as :func:`ortholora_kernels.solve.solve_vjp` (out-of-range order
        entries point at task 0 and are skipped; NaN propagates as there), one launch
        instead of ~35 T tiny torch ops. The history of C is not stored: each forward step
        saves the one entry per row it overwrites (``C[i, j_i]``), and the reverse sweep
        puts it back, so every step sees exactly the C of the forward. Rows ``G[j_i]`` are
        gathered from ``G`` in memory; ``Gbar[j_i] += u_i`` (rows may collide) goes through
        per-segment scratch and a fixed-order sum over i: deterministic, no atomics.
        Scratch per segment (fp64): saved entries ``[T_PAD, T_PAD]`` (step, i), ``u``
        ``[T_PAD, T_PAD]``, the target rows ``[T_PAD]`` and ``dL/dG[j, j]`` ``[T_PAD]``.
        """
        s = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, T_PAD)
        col = tl.arange(0, T_PAD)
        live = i < T
        cmask = col < T
        m2 = live[:, None] & cmask[None, :]
        g_seg = g_ptr + s * T * T
        o_seg = order_ptr + s * T * T
        saved = scratch_ptr + s * (2 * T_PAD * T_PAD + 2 * T_PAD)
        u_seg = saved + T_PAD * T_PAD
        rows_seg = u_seg + T_PAD * T_PAD
        n2_seg = rows_seg + T_PAD
        coeffs = (i[:, None] == col[None, :]).to(tl.float64)
        for step in range(0, T):
            j = tl.load(o_seg + i * T + step, mask=live, other=0)
            in_range = live & (j >= 0) & (j < T)
            j = tl.where(in_range, j, 0)
            g_j = tl.load(g_seg + j[:, None] * T + col[None, :], mask=m2, other=0.0)
            norm2 = tl.load(g_seg + j * (T + 1), mask=live, other=0.0)
            inner = tl.sum(coeffs * g_j, axis=1)
            valid = in_range & (j != i) & (norm2 > 0)
            safe = tl.where(valid, norm2, 1.0)
            coef = tl.where(valid, tl.where(inner > 0, 0.0, inner) / safe, 0.0)
            at_j = col[None, :] == j[:, None]
            tl.store(saved + step * T_PAD + i, tl.sum(tl.where(at_j, coeffs, 0.0), axis=1))
            coeffs = tl.where(at_j, coeffs - coef[:, None], coeffs)
        if NONE:
            tl.store(w_ptr + s * T * T + i[:, None] * T + col[None, :], coeffs, mask=m2)
            cbar = tl.load(v_ptr + s * T * T + i[:, None] * T + col[None, :], mask=m2, other=0.0)
        else:
            w = tl.sum(coeffs, axis=0)
            vrow = tl.load(v_ptr + s * T + col, mask=cmask, other=0.0)
            if MEAN:
                w = w / T
                vrow = vrow / T
            tl.store(w_ptr + s * T + col, w, mask=cmask)
            cbar = tl.where(m2, vrow[None, :], 0.0)       # dL/dC: every row gets dL/dW
        gbar = tl.zeros([T_PAD, T_PAD], dtype=tl.float64)
        tl.debug_barrier()     # the saved entries are read back by other threads
        for r in range(0, T):
            step = T - 1 - r
            j = tl.load(o_seg + i * T + step, mask=live, other=0)
            in_range = live & (j >= 0) & (j < T)
            j = tl.where(in_range, j, 0)
            at_j = col[None, :] == j[:, None]
            coeffs = tl.where(at_j, tl.load(saved + step * T_PAD + i)[:, None], coeffs)   # C before the step
            g_j = tl.load(g_seg + j[:, None] * T + col[None, :], mask=m2, other=0.0)
            norm2 = tl.load(g_seg + j * (T + 1), mask=live, other=0.0)
            inner = tl.sum(coeffs * g_j, axis=1)
            valid = in_range & (j != i) & (norm2 > 0)
            safe = tl.where(valid, norm2, 1.0)
            active = valid & (inner < 0)                    # where coef = inner / norm2
            coef_bar = -tl.sum(tl.where(at_j, cbar, 0.0), axis=1)
            inner_bar = tl.where(active, coef_bar / safe, 0.0)
            norm2_bar = tl.where(active, -coef_bar * inner / (safe * safe), 0.0)
            cbar = cbar + inner_bar[:, None] * g_j
            # Gbar[j_i, :] += inner_bar_i C[i, :] and Gbar[j_i, j_i] += norm2_bar_i, summed
            # over i in a fixed order (several i may share a j_i).
            tl.store(u_seg + i[:, None] * T_PAD + col[None, :], tl.where(live[:, None], inner_bar[:, None] * coeffs, 0.0))
            tl.store(rows_seg + i, tl.where(live, j, -1).to(tl.float64))
            tl.store(n2_seg + i, norm2_bar)
            tl.debug_barrier()
            # Loops, not unrolled: unrolled, the compiler hoists every row's load and spills
            # (T_PAD = 64: 70 KB per thread under Triton 3.6).
            for k in range(0, T):
                hit = i[:, None] == tl.load(rows_seg + k).to(tl.int32)
                gbar += tl.where(hit, tl.load(u_seg + k * T_PAD + col)[None, :], 0.0)
            for k in range(0, T):
                jk = tl.load(rows_seg + k).to(tl.int32)
                gbar += tl.where((i[:, None] == jk) & (col[None, :] == jk), tl.load(n2_seg + k), 0.0)
            tl.debug_barrier()  # the next step overwrites the scratch
        tl.store(m_ptr + s * T * T + i[:, None] * T + col[None, :], gbar + tl.trans(gbar), mask=m2)

    _INTERPRETED = type(_gram_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ----------------------------------------------------------------------------- host side

def _gram_config(r_pad: int, t_pad: int, fp64: bool, same: bool = True):
    """``(BLOCK, USE_DOT)``: tl.dot for >= 16 x 16 tiles, else per-thread fp32 outer products.

    The outer-product accumulator ``[R_PAD, T_PAD, BLOCK]`` is held in registers: about
    64 per thread at 4 warps. tl.dot operands are staged in shared memory: 16 KiB each.
    """
    use_dot = r_pad >= 16 and t_pad >= 16
    if use_dot:
        block = (4096 if not fp64 else 2048) // max(r_pad, t_pad)
    else:
        per_col = r_pad * t_pad + (0 if same else r_pad + t_pad)   # accumulator (+ tiles of A, B)
        block = (_TILE_ELEMS // 2 if not fp64 else _TILE_ELEMS // 4) // per_col
        block = 1 << (block.bit_length() - 1) if block > 0 else 1
    return max(16, min(2048, block)), use_dot


class _Layout:
    """Device tables of one layout for one chunk span (built once, cached on the Segments).

    ``table`` int64 ``[P, 4]``: per program (segment, start, end, group); chunks never
    straddle a segment. ``chunk_off [S + 1]``: chunks of each segment. ``group_off
    [G + 1]``: chunks of each group (``group`` consecutive chunks of one segment, at least
    ``_GROUP``, about sqrt(P) so both levels of the reduction stay short).
    ``seg_group_off [S + 1]``: groups of each segment.

    A 1-D grid over this flattened (segment, chunk) table, not a 2-D [S, max chunks]
    grid: ragged layouts (1-column segments beside 16M-column ones) launch no idle programs.

    Built outside CUDA-graph capture: one blocking copy (every stream sees the finished
    table). Built during capture (the first call of a layout is a captured one): the copy
    from a pinned host buffer is recorded into the graph, so every replay re-uploads it;
    that buffer is kept alive for the process (``_PINNED``), the device copy belongs to
    the graph, and the table is not cached for later calls.
    """

    def __init__(self, seg: Segments, device: torch.device, span: int, capturing: bool = False):
        n_chunks = sum(-(-size // span) for size in seg.sizes)
        group = max(_GROUP, math.isqrt(n_chunks - 1) + 1)
        rows, chunk_off, group_off, seg_group_off = [], [0], [0], [0]
        for s, (lo, hi) in enumerate(zip(seg.offsets, seg.offsets[1:])):
            first = len(rows)
            for a in range(lo, hi, span):
                rows.append((s, a, min(a + span, hi), len(group_off) - 1 + (len(rows) - first) // group))
            chunk_off.append(len(rows))
            group_off.extend(range(first + group, len(rows), group))
            group_off.append(len(rows))
            seg_group_off.append(len(group_off) - 1)
        parts = [torch.tensor(rows, dtype=torch.int64).reshape(-1), torch.tensor(chunk_off), torch.tensor(group_off),
                 torch.tensor(seg_group_off)]
        sizes = [p.numel() for p in parts]
        # One upload; every part starts 16-byte aligned (pad to an even count of int64).
        host = torch.cat([torch.cat([p, p.new_zeros(p.numel() % 2)]) for p in parts])
        if capturing:
            host = host.pin_memory() if device.type == "cuda" else host
            _PINNED.append(host)          # read by every replay of the graph: never freed
            flat = host.to(device, non_blocking=True)
        else:
            flat = host.to(device)
        views = [v[:n] for v, n in zip(flat.split([n + n % 2 for n in sizes]), sizes)]
        self.table, self.chunk_off, self.group_off, self.seg_group_off = views
        self.table = self.table.view(-1, 4)
        self.n_prog, self.n_groups = len(rows), len(group_off) - 1


_PINNED: list = []   # host sources of tables uploaded inside a captured graph


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


_SM_COUNT: dict = {}


def _target_programs(device: torch.device) -> int:
    """Gram programs to aim for on ``device``: ``_TARGET_PROGRAMS`` if set, else a few per SM."""
    if _TARGET_PROGRAMS is not None:
        return _TARGET_PROGRAMS
    if device.type != "cuda":
        return _CPU_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROGRAMS_PER_SM * _SM_COUNT[index]


def _cached_capped(seg: Segments, key: tuple, build):
    """``seg.cached(key, build)`` keeping at most ``_MAX_WORKSPACES`` entries of ``key[0]``'s
    kind (least recently used dropped). A dropped workspace's memory goes back to the
    stream it was allocated on: later work on that stream is ordered after its last use."""
    cache = seg._device_cache
    if key in cache:
        value = cache.pop(key)          # re-inserted: the dict's order is the use order
        cache[key] = value
        return value
    same = [k for k in cache if k[0] == key[0]]
    for old in same[:max(0, len(same) - _MAX_WORKSPACES + 1)]:
        del cache[old]
    value = cache[key] = build()
    return value


def _table(seg: Segments, device: torch.device, block: int, chunked: bool) -> _Layout:
    """The cached :class:`_Layout` for ``block``-column tiles (``chunked``: several per program).

    Per-call host work does not grow with N: this runs once per (layout, device, span).
    """
    per = 1
    if chunked:  # at most about _target_programs() programs: longer chunks as N grows
        n_blocks = -(-seg.numel // block)
        per = max(1, -(-n_blocks // _target_programs(device)))
    span = per * block
    key = ("triton_table", device, span, _GROUP)
    if _capturing(device) and key not in seg._device_cache:
        return _Layout(seg, device, span, capturing=True)   # graph-owned, not cached
    return seg.cached(key, lambda: _Layout(seg, device, span))


def _workspace(seg: Segments, lay: _Layout, device: torch.device, tile: int):
    """``(partials fp64 [P + G, tile], tickets int32 [G + S], group sums, segment tickets)``
    (the last two: views of the first two).

    Rows ``P:`` of the partials hold the group sums; tickets ``:G`` count finished chunks
    per group, ``G:`` finished groups per segment. The tickets return to zero at the end
    of every fused launch, so eager calls reuse one cached set per (layout, device,
    stream; at most ``_MAX_WORKSPACES`` per layout, least recently used dropped): no memset, and launches on different streams never share tickets. Under
    CUDA-graph capture every call gets its own workspace, allocated in the graph's memory
    and zeroed by a memset node of the graph: a second graph of the same shape, or two
    graphs replayed at once, never share (or inherit uninitialised) tickets.
    """
    def build():
        parts = torch.empty((lay.n_prog + lay.n_groups, tile), dtype=torch.float64, device=device)
        tickets = torch.zeros((lay.n_groups + seg.num_segments,), dtype=torch.int32, device=device)
        return parts, tickets, parts[lay.n_prog:], tickets[lay.n_groups:]   # views built once
    if _capturing(device):
        return build()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    return _cached_capped(seg, ("triton_ws", device, stream, lay.n_prog, lay.n_groups, tile), build)


def _gram_warps(t_pad: int, fused_solve: bool, lowp: int = 0, fp64: bool = False) -> int:
    """Warps of a Gram program. With the solve fused in, at T_PAD = 64: 16 (sm_90, Triton
    3.6: 8 warps needed 255 registers and spilled 96 bytes; 16 take 128 and spill nothing).
    Elsewhere 16 warps spilled (unfused, the backward's cross product): 8 at T_PAD >= 32.
    Figures: scripts/compile_gpu.py, benchmarks/RESULTS.md (sm_90 compile tables)."""
    if fused_solve and t_pad >= 64:
        return 16
    if t_pad == 32 and (lowp or not (fused_solve or fp64)):
        return 4    # with the fp64 per-tile accumulator, 8 warps spilled 12-24 bytes here (sm_90)
    return 8 if t_pad >= 32 else 4


def _gram_stages(r_pad: int, t_pad: int) -> int | None:
    """Software-pipelining depth of the Gram loops over column tiles (``tl.range(num_stages=)``).

    The T <= 8 path (per-thread outer products, no tl.dot) gets ``_PIPELINE_STAGES``: the
    next tile's loads (async copies into shared memory) are issued while this tile's
    products run. sm_90 under Triton 3.6 (scripts/compile_gpu.py --pipeline-stages):
    2 stages take 4-16 KB of shared memory and at most 128 registers, no spills; 3 took
    up to 32 KB and 224 registers and spilled at T = 4. The tl.dot path is pipelined by
    the launch's default ``num_stages``: None leaves its loops unannotated (an explicit 1
    would turn that off). Not timed (no GPU).
    """
    return _PIPELINE_STAGES if max(r_pad, t_pad) <= 8 else None


_PIPELINE_STAGES = 2


def _aligned(seg: Segments) -> bool:
    """Whether every segment offset (N included) is 16-divisible: then every chunk's column
    range starts and ends 16-aligned, and the kernels say so (``tl.multiple_of``), so row
    loads vectorise (16-byte ``ld.global.v4``) where the row pointers are aligned too
    (Triton specialises 16-byte aligned pointers and 16-divisible N itself)."""
    return all(o % 16 == 0 for o in seg.offsets)


def _gram_plan(seg: Segments, r: int, t: int, fp64: bool, same: bool, reduction: str, solve: bool = True,
               lowp: int = 0):
    """``(block, consts)`` of a Gram launch: pure host constants, cached per layout.
    ``lowp``: 1 for fp16 operands, 2 for bf16 (both operands of that dtype), else 0."""
    def build():
        r_pad, t_pad = _pow2(r), _pow2(t)
        block, use_dot = _gram_config(r_pad, t_pad, fp64, same)
        rb = max(1, min(64, _REDUCE_ELEMS // (r_pad * t_pad)))   # level 2 sums <= 1024 / _GROUP rows
        consts = dict(R_PAD=r_pad, T_PAD=t_pad, BLOCK=block, SAME=same, FP64=fp64, USE_DOT=use_dot,
                      RB=rb, SOLVE=same and solve, MEAN=reduction == "mean", NONE=reduction == "none",
                      REG_SOLVE=t_pad <= 16, num_warps=_gram_warps(t_pad, _FUSED and same and solve, lowp, fp64),
                      # the hint on the tl.dot paths only: elsewhere (outer products, fp64) it
                      # cost 12-56 bytes of spills on sm_90 for no wider loads
                      ALIGNED=_aligned(seg) and use_dot and not fp64, LOWP=lowp, DOT_PRECISION=_FP32_DOT_PRECISION,
                      FLUSH64=r_pad * t_pad <= _FLUSH64_MAX_TILE,
                      STAGES=_gram_stages(r_pad, t_pad))
        return block, consts
    return seg.cached(("triton_gram", r, t, fp64, same, reduction, solve, lowp, _FUSED, _PIPELINE_STAGES,
                       _FP32_DOT_PRECISION), build)


# tl.dot's precision for fp32 operands (bf16/fp16 ones run on tensor cores as they are:
# mma.sync at T_PAD 16-32, wgmma at 64, no spills). "ieee" (FMAs on the CUDA cores) kept
# over "tf32x3" (three TF32 tensor-core products, ~2^-21 relative error per product): on
# sm_90 tf32x3 spilled 124-176 bytes per thread at T_PAD 32-64 in the fused Gram + solve
# and doubled its shared memory to 96 KiB, while ieee with the per-tile fp64 flush is
# spill-free; its speed-up is a prediction no GPU has checked (benchmarks/RESULTS.md).
_FP32_DOT_PRECISION = "ieee"


_LOWP = {torch.float16: 1, torch.bfloat16: 2}
# Largest R_PAD x T_PAD whose per-tile fp32 sums go into an fp64 accumulator (fp32 rounding
# over one tile of columns, whatever the chunk length). Past it (T_PAD 128) the fp64 tile
# spilled 880 bytes per thread on sm_90; there the fp32 accumulator spans the chunk.
_FLUSH64_MAX_TILE = 64 * 64


def _check_tasks(device: torch.device, t: int) -> None:
    """Refuse T past ``_MAX_TASKS_CUDA`` on CUDA (an explicit ``backend='triton'``; the
    automatic choice never sends it), naming the limit and the way out."""
    if device.type == "cuda" and t > _MAX_TASKS_CUDA:
        raise RuntimeError(f"backend='triton' on CUDA takes at most {_MAX_TASKS_CUDA} tasks (grads has {t} rows): "
                           f"its T_PAD x T_PAD tiles spill past that; use backend='torch'")


def _gram(a: torch.Tensor, b: torch.Tensor | None, seg: Segments, *, order=None, reduction="sum",
          solve=True):
    """Stages 1-2: ``A B^T`` per segment (``b=None``: the Gram of ``a``, then, with
    ``solve``, the PCGrad solve).

    Returns ``(G [S, R, T] fp64, C, W, nproj)``; C, W, nproj only when ``b is None`` and ``solve``.
    One launch when ``_FUSED`` (default), two otherwise. Host work per call: one cache
    lookup, the output allocations and the launch.
    """
    same = b is None
    b = a if same else b
    r, n = a.shape
    t = b.shape[0]
    _check_tasks(a.device, max(r, t))
    s_count = seg.num_segments
    dev = a.device
    fp64 = a.dtype == torch.float64 or b.dtype == torch.float64
    lowp = _LOWP.get(a.dtype, 0) if a.dtype == b.dtype else 0
    block, consts = _gram_plan(seg, r, t, fp64, same, reduction, solve, lowp)
    solve = same and solve
    lay = _table(seg, dev, block, True)
    parts, gtickets, gparts, stickets = _workspace(seg, lay, dev, consts["R_PAD"] * consts["T_PAD"])
    g = torch.empty((s_count, r, t), dtype=torch.float64, device=dev)
    if solve:
        c = torch.empty_like(g)
        w = c if reduction == "none" else torch.empty((s_count, 1, t), dtype=torch.float64, device=dev)
        nproj = torch.empty((s_count,), dtype=torch.int32, device=dev)
        order = order.contiguous()
    else:  # unused pointers: any tensor will do
        c = w = order = g
        nproj = stickets
    with _guard(dev):
        _gram_kernel[(lay.n_prog,)](a, b, parts, lay.table, n, r, t, lay.group_off, lay.seg_group_off,
                                    gparts, gtickets, stickets, g, order, c, w, nproj, FUSED=_FUSED, **consts)
        if not _FUSED:
            k = {key: v for key, v in consts.items() if key not in ("BLOCK", "SAME", "FP64", "USE_DOT", "STAGES", "ALIGNED", "LOWP",
                                                                    "DOT_PRECISION", "FLUSH64")}
            _reduce_solve_kernel[(s_count,)](parts, lay.chunk_off, g, order, c, w, nproj, r, t, **k)
    return (g, c, w, nproj) if solve else (g, None, None, None)


def _combine_config(rows: int):
    """``(R_PAD, BLOCK)`` of the combine: a ``[R_PAD, BLOCK]`` fp32 accumulator, ~32 per thread."""
    r_pad = _pow2(rows)
    return r_pad, max(32, min(1024, (_TILE_ELEMS // 4) // r_pad))


def _combine(seg: Segments, x, a, y=None, b=None, out_rows=1, out_dtype=None, flat=False):
    """Launch kernel 3: ``out [R, N] = A_s X_s (+ B_s Y_s)``; ``A``, ``B`` strided ``[S, R, K]``.

    ``flat``: return ``[N]`` (R must be 1) without a view op.
    """
    n = x.shape[1]
    has_y = y is not None
    y_, b_ = (y, b) if has_y else (x, a)
    wide_y = has_y and y.shape[0] >= 16
    consts = seg.cached(("triton_combine", out_rows, x.dtype, has_y, wide_y),
                        lambda: _combine_plan(out_rows, x.dtype, has_y, _aligned(seg), wide_y))
    lay = _table(seg, x.device, consts["BLOCK"], False)
    out = torch.empty((n,) if flat else (out_rows, n), dtype=out_dtype or x.dtype, device=x.device)
    with _guard(x.device):
        _combine_kernel[(lay.n_prog,)](lay.table, x, x.shape[0], a, *a.stride(), y_, y_.shape[0], b_,
                                       *b_.stride(), out, n, out_rows, **consts)
    return out


_COMBINE_WARPS = 4   # the backward's "none" combine (Y with T >= 16 rows, not fp64) gets 8: with
                     # 16-byte loads, 4 warps spilled 16 bytes there (sm_90, dev Triton); 8 spilled
                     # 8-40 bytes for the one-row Y of sum/mean and for fp64


def _combine_plan(out_rows, dtype, has_y, aligned=False, wide_y=False):
    """Constants of a combine launch (cached per layout). ``wide_y``: Y has >= 16 rows."""
    r_pad, block = _combine_config(out_rows)
    fp64 = dtype == torch.float64
    return dict(R_PAD=r_pad, BLOCK=block, HAS_Y=has_y, FP64=fp64, ALIGNED=aligned,
                num_warps=8 if wide_y and r_pad >= 16 and not fp64 else _COMBINE_WARPS)


def _solve_vjp(gram: torch.Tensor, order: torch.Tensor, reduction: str, v: torch.Tensor, seg: Segments):
    """``(M [S, T, T], W [S, R, T])`` float64 by :func:`_solve_vjp_kernel`: one launch, one program per segment.

    The scratch (every entry written before it is read: no memset) is cached per (device,
    stream) for eager calls; under CUDA-graph capture each call gets its own, in graph memory.
    """
    s_count, t, _ = gram.shape
    dev = gram.device
    t_pad = _pow2(t)

    def build():
        return torch.empty((s_count, 2 * t_pad * t_pad + 2 * t_pad), dtype=torch.float64, device=dev)
    if _capturing(dev):
        scratch = build()
    else:
        stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else None
        scratch = _cached_capped(seg, ("triton_vjp_ws", dev, stream, t_pad), build)
    m = torch.empty((s_count, t, t), dtype=torch.float64, device=dev)
    w = m.new_empty((s_count, t if reduction == "none" else 1, t))
    with _guard(dev):
        _solve_vjp_kernel[(s_count,)](gram.contiguous(), order.contiguous(), v.contiguous(), m, w, scratch, t,
                                      T_PAD=t_pad, MEAN=reduction == "mean", NONE=reduction == "none",
                                      num_warps=_vjp_warps(t_pad))
    return m, w


def _vjp_warps(t_pad: int) -> int:
    """Warps of the reverse-solve program: its [T_PAD, T_PAD] fp64 tiles (C, dL/dC, dL/dG)
    spread over enough threads to stay in registers. sm_90, Triton 3.6 (the GPU image's):
    no spills up to T_PAD = 32 (16 warps there spilled 12-60 bytes; the dev Triton 3.9
    spills 44 with 8 and none with 16); T_PAD = 64 spills with any count (8 warps: 84-228
    bytes, 16: 208-256, 32: 76-168): 32, the least. Figures: benchmarks/RESULTS.md
    (sm_90 compile tables). One program per segment of O(T^3) work: a spill costs L1 traffic, not a pass over X."""
    return 1 if t_pad <= 8 else 2 if t_pad <= 16 else 8 if t_pad <= 32 else 32


_FUSED_VJP = True   # the backward's solve + reverse solve in one launch (False: torch ops, ~35 T launches)
# Largest T_PAD the fused reverse solve takes. Its scratch tiles live in shared memory:
# sm_90 under Triton 3.6 and the dev Triton, T_PAD = 128 takes 128 KiB and spills ~9 KB per
# thread, T_PAD = 256 needs 512 KiB (227 KiB on sm_90: refused at launch). Past 64 the
# backward runs the torch reverse solve (correct for any T, ~35 T small launches).
_VJP_MAX_T_PAD = 64


class TritonBackend(Backend):
    """Fused Gram + PCGrad solve in one launch, the combine kernel with one or two operands."""

    name = NAME

    def availability(self, device: torch.device) -> str | None:
        """None when usable on ``device``: CUDA with Triton, or CPU under TRITON_INTERPRET=1."""
        return availability(device)

    def gram(self, x, seg):
        """``[S, T, T]`` float64 Gram matrices (stage 1 alone: one read of ``x``)."""
        return _gram(x.contiguous(), None, seg, solve=False)[0]

    def cross(self, y, x, seg):
        """``[S, R, T]`` float64 ``Y_s X_s^T`` by the Gram kernel (no solve)."""
        return _gram(y.contiguous(), x.contiguous(), seg)[0]

    def combine(self, seg, x, a, y=None, b=None, out_dtype=None):
        """``[R, N]`` by the combine kernel (``A``, ``B`` read through their strides)."""
        return _combine(seg, x.contiguous(), a, None if y is None else y.contiguous(), b,
                        out_rows=a.shape[-2], out_dtype=out_dtype)

    def gram_solve(self, x, seg, order, reduction):
        """``(G, C, W, nproj)``: the Gram launch with the PCGrad solve in its tail."""
        return _gram(x.contiguous(), None, seg, order=order, reduction=reduction)

    def solve_vjp(self, gram, order, reduction, weights_grad, seg):
        """``(Gbar + Gbar^T, W)``: the PCGrad solve and its reverse mode in one launch."""
        if not _FUSED_VJP or _pow2(gram.shape[-1]) > _VJP_MAX_T_PAD:
            return None   # ops.backward runs the solve's torch reverse mode
        return _solve_vjp(gram, order, reduction, weights_grad, seg)


BACKEND = TritonBackend()

"""Chunked gated linear attention in Triton, forward and backward, for the three decay forms in one kernel family.

Lightning Attention-2 (arXiv 2401.04658) tiling with chunks of BT = 64 tokens; the decay form is a
`tl.constexpr` switch DECAY: 0 constant per head (H,), 1 per head and token (B, T, H), 2 per key channel
(B, T, H, K). b is the log decay summed from the start of its chunk (inclusive; `_chunk_cumsum_kernel` per token,
once in the forward, which hands it to the backward; per channel `_strong_cumsum_kernel` for the strong chunks
only, as the mild ones need only factors `_gate_kernel` makes; constant decays compute it inline); every exp()
below takes b_i - b_j with i at or after j, or b of a position minus b of an earlier one, so its argument is <= 0
and strong decays underflow to exact zeros instead of overflowing. The exceptions are bounded: a per-channel mild
chunk is one dot of factors within e^(+-CHUNK_SPAN_LIMIT / 2), and a diagonal sub-block whose decay spans less
than SPAN_LIMIT one dot of factors up to e^SPAN_LIMIT.

Forward, per (batch, head):
  1. Per-channel decay only, the intra-chunk matrix A_ij = sum_c q_ic k_jc e^(b_ic - b_jc), i >= j. A mild chunk
     (total log decay above -CHUNK_SPAN_LIMIT in every channel) gets A = qg kg^T inline in 3, from the gated
     qg = q e^(b - m), kg = k e^(m - b) (m half the chunk's total) that `_gate_kernel` writes, with e = e^(b - m)
     for dqk, each chunk's total and the list of the other (strong) chunks. Strong chunks go through
     `_chunk_A_kernel`, which loops over that list, in 16 x 16 sub-blocks: off the diagonal a product of two
     rescaled operands around a reference row between them, on the diagonal the same around the block's first
     row where its decay spans less than SPAN_LIMIT, else elementwise. Scalar decays compute (q k^T) e^(b_i - b_j)
     inline in 3.
  2. The state entering every chunk, h_n (K x V, stored in bf16 for bf16 inputs, else fp32). Chunks are cut
     into groups of G: `_chunk_walk_kernel` walks each group's chunks in order (parallel over groups, batch,
     heads and K x V tiles; per channel from qg and kg, times one factor per channel, at most 1) to get the
     group's own contribution, `_group_scan_kernel` carries the state across groups, and a second walk from
     each group's true entering state stores h_n. With batch x heads x tiles enough to fill the GPU there is
     one group (G = #chunks, a single walk, as fla's chunk_fwd_h); otherwise
     `_group_size` picks G by counting sequential steps (B = 1, H = 8 on an H100: 8 groups of 2048 chunks at
     T = 1M, 8 of 64 at T = 32k).
  3. `_output_kernel`, parallel over chunks, batch, heads and V tiles: o = scale (q e^b h_n + A v).
Backward recomputes h_n, runs step 2 in reverse for dh_n (the gradient of the state chunk n hands on,
S <- e^(b_last) S + scale (q e^b)^T do), then `_dv_kernel`, `_dA_kernel` (dA = scale do v^T per chunk, stored once
for dqk's K tiles; only for a learned scalar decay: for a fixed one and per channel dqk makes it itself),
`_dqk_kernel` and, per-channel only (strong chunks), `_intra_bwd_kernel`; the gradient
of the log decay is a reverse cumulative sum within each chunk of db_i = q_i dq_i - k_i dk_i, plus at the chunk's
last row the gradient of its total decay (`_chunk_cumsum_kernel` reversed; for a constant decay a sum weighted by
the row in the chunk; per channel, `_dqk_kernel` sums mild chunks itself and `_strong_cumsum_kernel` the strong
ones).

Scalar decays with heads of at most 64 and many (batch, head) pairs (lightning's training shape; the rule is
`FUSED_MIN_HEADS_PER_SM`) take the fused walks instead, as Lightning Attention-2's own kernel: one program per
(batch, head) walks all its chunks carrying the state in registers, `_fused_fwd_kernel` (o and the state at once),
and for a fixed decay `_fused_dq_kernel` (forward, carrying S^T) and `_fused_dkv_kernel` (reverse, carrying dS;
dk made transposed). No chunk's state goes through memory, and the backward recomputes no walk; with few pairs the
GPU would sit idle, which the chunked kernels avoid.

Scalar decays also take q, k, v packed as the three views of one (B, T, 3, H, D) tensor (`linear_attention_packed`:
lightning's SiLU of its joint projection, as it comes): the kernels that read them, and dv and dqk, which store their
gradients into one tensor of that layout, get QS = 3 (rows 3 H D apart, `_load_in`, `_store_in`), so that no pass
over memory splits q, k, v or stacks their gradients.

Triton 3.4-3.7.0 miscompiles `tl.dot(tl.trans(x), y)` on Hopper when x is an earlier dot's accumulator cast
to bf16/fp16 (fla issue 640). No kernel here transposes a dot result: transposed products are computed
directly from operands loaded in transposed layout (A^T = k q^T, dA^T = v do^T) or by a transposed load of a
stored one (dA).
"""

from __future__ import annotations

import functools
import math
import os
import types

import torch
import triton
import triton.language as tl

from ..dispatch import eager_or_op
from .torch_chunked import LOG_DECAY_FLOOR

#: Tokens per chunk and per intra-chunk sub-block (per-channel decay).
CHUNK = 64
SUB = 16
#: tl.dot precision for fp32 inputs: three tf32 passes, close to fp32 and much faster than "ieee".
FP32_DOT_PRECISION = "tf32x3"
#: Per-channel decay, diagonal sub-blocks: when a block's log decay spans less than this (in every channel), its
#: products go through one tensor-core dot around the block's first (or last) row, with fp32 operands (tf32, or
#: tf32x3 for fp32 inputs), so that no factor exceeds e^SPAN_LIMIT; beyond it (very strong decays) they are
#: summed elementwise, column by column.
SPAN_LIMIT = 40.0
#: Per-channel decay, whole chunks: when a chunk's total log decay stays above -CHUNK_SPAN_LIMIT in every channel,
#: its intra-chunk matrix is one dot of operands rescaled around the midpoint of that range, computed inline as
#: for the scalar forms; otherwise it goes through the 16 x 16 sub-blocks of `_chunk_A_kernel` and
#: `_intra_bwd_kernel`. The factors stay within e^(+-60) (1e26 to 1e-26), far inside the fp32 and bf16 range
#: (fp16 inputs rescale in fp32); every kept product is a true term, so the rescaling costs no precision. Log
#: gates of models (log-sigmoid of unit-scale logits, about -0.8 per token) span about -50 to -70 over a chunk.
CHUNK_SPAN_LIMIT = 120.0
#: Scalar decays, heads of at most 64 (lightning's): with at least this many (batch, head) pairs per SM, one program
#: per pair walks all its chunks carrying the state in registers (`_fused_fwd_kernel`, and in the backward
#: `_fused_dq_kernel` and `_fused_dkv_kernel` unless the decay is learned), instead of the chunked kernels, which
#: move every chunk's state through memory. 0: whenever the heads allow (the tests); None: never.
#: At lightning's training shape on an H200 (T 2k, H 12, D 64, packed, fixed decay; fwd+bwd as CUDA-graph replays)
#: the fused walks took 0.935 / 0.609 / 0.318 ms against the chunked kernels' 1.54 / 0.78 / 0.405 at B 64 / 32 / 16,
#: 5.8 / 2.9 / 1.45 pairs a SM (docs/bench/kernels.md); 1.4 is just below the fewest timed, where they still won.
FUSED_MIN_HEADS_PER_SM: float | None = 1.4
#: Per-channel decay, the log decay's gradient of mild chunks (`_dqk_kernel`, `_reverse_cumsum`): the sum of db over
#: each row and those after it as two bf16 dots with a triangle of ones rather than by `tl.cumsum`. None: for 16-bit
#: inputs on a GPU (fp32 inputs keep the exact scan; under the interpreter it takes fp32 operands); True: always (the
#: tests); False: never.
DA_BY_DOT: bool | None = None
#: The most (batch, head) pairs one launch takes: the kernels put them on a grid's y or z axis, which CUDA caps at
#: 65535. `linear_attention_triton` runs a larger batch in pieces.
MAX_BATCH_HEADS = 65535


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------- helpers
# Tile addresses are a scalar int64 base plus int32 offsets within the tile: int64 offset tiles (and 64-bit
# pointer arithmetic per element) cost more registers than the accumulators and made the kernels spill.
# (Block pointers would do this for us, but Triton 3.9's interpreter, which CI runs, no longer has them.)


@triton.jit
def _ptrs(ptr, i_b, i_h, row0, T, H: tl.constexpr, D: tl.constexpr, d0, R: tl.constexpr, BD: tl.constexpr,
          TRANS: tl.constexpr):
    """Pointers and mask for rows [row0, row0 + R) x columns [d0, d0 + BD) of head i_h of a (B, T, H, D) tensor.

    Transposed, (BD, R), if TRANS: products that need x^T load it that way instead of transposing.
    """
    base = ptr + ((i_b * T + row0) * H + i_h) * D + d0
    r = tl.arange(0, R)
    c = tl.arange(0, BD)
    if TRANS:
        p = base + (r[None, :] * (H * D) + c[:, None])
        mask = ((row0 + r) < T)[None, :] & ((d0 + c) < D)[:, None]
    else:
        p = base + (r[:, None] * (H * D) + c[None, :])
        mask = ((row0 + r) < T)[:, None] & ((d0 + c) < D)[None, :]
    return p, mask


@triton.jit
def _load(ptr, i_b, i_h, row0, T, H: tl.constexpr, D: tl.constexpr, d0, R: tl.constexpr, BD: tl.constexpr,
          TRANS: tl.constexpr):
    """A tile of a (B, T, H, D) tensor in its own dtype, zero outside the tensor; (BD, R) if TRANS."""
    p, mask = _ptrs(ptr, i_b, i_h, row0, T, H, D, d0, R, BD, TRANS)
    return tl.load(p, mask=mask, other=0.0)


@triton.jit
def _store(ptr, x, i_b, i_h, row0, T, H: tl.constexpr, D: tl.constexpr, d0, R: tl.constexpr, BD: tl.constexpr,
           TRANS: tl.constexpr = False):
    """Store a tile as `_load` loads it ((BD, R) if TRANS)."""
    p, mask = _ptrs(ptr, i_b, i_h, row0, T, H, D, d0, R, BD, TRANS)
    tl.store(p, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_in(ptr, i_b, i_h, row0, T, H: tl.constexpr, D: tl.constexpr, d0, R: tl.constexpr, BD: tl.constexpr,
             TRANS: tl.constexpr, QS: tl.constexpr):
    """A tile of q, k or v: of a (B, T, H, D) tensor (QS 1), or of one of the three (B, T, H, D) views of a packed
    (B, T, 3, H, D) one (QS 3: rows 3 H D apart), which `_ptrs` reaches as H -> 3 H."""
    return _load(ptr, i_b, i_h, row0, T, H * QS, D, d0, R, BD, TRANS)


@triton.jit
def _store_in(ptr, x, i_b, i_h, row0, T, H: tl.constexpr, D: tl.constexpr, d0, R: tl.constexpr, BD: tl.constexpr,
              QS: tl.constexpr, TRANS: tl.constexpr = False):
    """Store a tile of dq, dk or dv laid out as `_load_in` reads q, k and v ((BD, R) if TRANS)."""
    _store(ptr, x, i_b, i_h, row0, T, H * QS, D, d0, R, BD, TRANS)


@triton.jit
def _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, row0, last, Tp, H: tl.constexpr, K: tl.constexpr, k0,
                    R: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, TRANS: tl.constexpr):
    """In-chunk cumulative log decay of local rows [row0, row0 + R): (R,), or (R, BK) / (BK, R) per channel."""
    rows = row0 + tl.arange(0, R)
    if DECAY == 0:
        # Rows past the last valid one count as zero decay, as if the input had been zero padded. Floored as the
        # data-dependent forms are: at -inf, b_i - b_j would be -inf - -inf = NaN.
        b = (tl.minimum(rows, last) + 1).to(tl.float32) * _floored(tl.load(a_ptr + i_h).to(tl.float32))
    elif DECAY == 1:
        b = tl.load(b_ptr + (i_b * Tp + t0 + rows) * H + i_h)
    else:
        b = _load(b_ptr, i_b, i_h, t0 + row0, Tp, H, K, k0, R, BK, TRANS)
    return b


@triton.jit
def _row_log_decay(a_ptr, b_ptr, i_b, i_h, t0, row, Tp, H: tl.constexpr, K: tl.constexpr, offs_k,
                   DECAY: tl.constexpr):
    """In-chunk cumulative log decay of one local row (a valid one): a scalar, or (BK,) per channel."""
    if DECAY == 0:
        b = (row + 1).to(tl.float32) * _floored(tl.load(a_ptr + i_h).to(tl.float32))
    elif DECAY == 1:
        b = tl.load(b_ptr + (i_b * Tp + t0 + row) * H + i_h)
    else:
        b = tl.load(b_ptr + ((i_b * Tp + t0 + row) * H + i_h) * K + offs_k, mask=offs_k < K, other=0.0)
    return b


@triton.jit
def _chunk_b_last(bl_ptr, i_bh, n, NT, K: tl.constexpr, offs_k):
    """Per channel: chunk n's total log decay b_last, (BK,), from the (B H, NT, K) totals `_gate_kernel` stores."""
    return tl.load(bl_ptr + (i_bh * NT + n) * K + offs_k, mask=offs_k < K, other=0.0)


@triton.jit
def _chunk_is_mild(bl_ptr, i_bh, n, NT, K: tl.constexpr, KP: tl.constexpr, CSPAN: tl.constexpr):
    """Per-channel decay: whether chunk n's total log decay is above -CSPAN in every channel.

    b falls monotonically within a chunk (log decays are <= 0), so its total bounds every channel's range.
    """
    return tl.min(_chunk_b_last(bl_ptr, i_bh, n, NT, K, tl.arange(0, KP)), axis=0) > -CSPAN


@triton.jit
def _strong_chunk(strong_ptr, c, NT):
    """The c-th strong chunk: (i_bh, i_n).

    strong holds their count, then their numbers i_bh NT + i_n in no particular order (`_gate_kernel`). Kernels for
    strong chunks only loop over it, from a fixed grid of (programs, items per chunk), so that mild chunks (most,
    with models' gates) cost nothing: a program per sub-block whose test exits took 34 us at B 16, T 2k on an H100.
    """
    e = tl.load(strong_ptr + 1 + c).to(tl.int64)
    return e // NT, e % NT


@triton.jit
def _log_gate_factor(b_last, CSPAN: tl.constexpr):
    """Per channel: log f, with k e^(b_last - b) = kg f and q e^b = qg f for `_gate_kernel`'s qg and kg."""
    return tl.where(b_last > -CSPAN, 0.5 * b_last, 0.0)


@triton.jit
def _intra_decay(b, BT: tl.constexpr, TRANS: tl.constexpr):
    """Scalar decays: the (BT, BT) factors e^(b_i - b_j) for i >= j, else 0, indexed (i, j); (j, i) if TRANS."""
    rows = tl.arange(0, BT)
    if TRANS:
        return tl.exp(tl.where(rows[None, :] >= rows[:, None], b[None, :] - b[:, None], float("-inf")))
    return tl.exp(tl.where(rows[:, None] >= rows[None, :], b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _reverse_cumsum(x, upper_ptr, BT: tl.constexpr, BY_DOT: tl.constexpr, CDT: tl.constexpr):
    """The sums of x's (BT, BK) rows at and after each row.

    BY_DOT: as U xh + U xl, U the (BT, BT) upper triangle of ones (`_upper_ones`, read from memory: made in registers
    it cost the per-channel dqk 88 bytes of spilled registers on sm_90) and xh, xl x's bf16 high and low parts (x to
    about 16 of fp32's 24 bits; every product exact, the sums fp32), on tensor cores in CDT. In the per-channel dqk
    at B 4, T 8k on an H200, `tl.cumsum` took 60 of its 395 us (docs/bench/kernels.md).
    """
    if BY_DOT:
        rows = tl.arange(0, BT)
        upper = tl.load(upper_ptr + rows[:, None] * BT + rows[None, :]).to(CDT)
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(upper, lo.to(CDT), tl.dot(upper, hi.to(CDT)))
    return tl.cumsum(x, axis=0, reverse=True)


@triton.jit
def _store_dA(dA_ptr, chunk, da, BT: tl.constexpr):
    """Store a chunk's (BT, BT) dA for `_load_dA`."""
    rows = tl.arange(0, BT)
    tl.store(dA_ptr + chunk * BT * BT + rows[:, None] * BT + rows[None, :], da.to(dA_ptr.dtype.element_ty))


@triton.jit
def _load_dA(dA_ptr, chunk, BT: tl.constexpr):
    """A chunk's stored dA (`_dA_kernel`) and its transpose, by a transposed load."""
    rows = tl.arange(0, BT)
    at = dA_ptr + chunk * BT * BT
    return tl.load(at + rows[:, None] * BT + rows[None, :]), tl.load(at + rows[None, :] * BT + rows[:, None])


@triton.jit
def _state_ptrs(ptr, slab, K: tl.constexpr, V: tl.constexpr, k0, v0, BK: tl.constexpr, BV: tl.constexpr,
                TRANS: tl.constexpr):
    """Pointers and mask for a (BK, BV) tile of (K, V) state number `slab`; (BV, BK) if TRANS."""
    base = ptr + slab * K * V + k0 * V + v0
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    if TRANS:
        p = base + (kk[None, :] * V + vv[:, None])
        mask = ((k0 + kk) < K)[None, :] & ((v0 + vv) < V)[:, None]
    else:
        p = base + (kk[:, None] * V + vv[None, :])
        mask = ((k0 + kk) < K)[:, None] & ((v0 + vv) < V)[None, :]
    return p, mask


@triton.jit
def _load_st(ptr, slab, K: tl.constexpr, V: tl.constexpr, k0, v0, BK: tl.constexpr, BV: tl.constexpr,
             TRANS: tl.constexpr):
    p, mask = _state_ptrs(ptr, slab, K, V, k0, v0, BK, BV, TRANS)
    return tl.load(p, mask=mask, other=0.0)


@triton.jit
def _store_st(ptr, x, slab, K: tl.constexpr, V: tl.constexpr, k0, v0, BK: tl.constexpr, BV: tl.constexpr):
    p, mask = _state_ptrs(ptr, slab, K, V, k0, v0, BK, BV, False)
    tl.store(p, x.to(ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- kernels


_FLOOR = tl.constexpr(LOG_DECAY_FLOOR)


@triton.jit
def _floored(a):
    """A data-dependent log decay as the kernels use it: at least LOG_DECAY_FLOOR (-inf and -1e4 alike), NaN kept."""
    return tl.maximum(a, _FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _cumsum_tile(x_ptr, y_ptr, i_b, i_h, t0, k0, T_in, T_out, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, REVERSE: tl.constexpr):
    """One chunk's (BT, BK) tile of `_chunk_cumsum_kernel`: forward, of a log decay (floored), reversed, of its
    gradient."""
    x = _load(x_ptr, i_b, i_h, t0, T_in, H, K, k0, BT, BK, False).to(tl.float32)
    if not REVERSE:
        x = _floored(x)
    _store(y_ptr, tl.cumsum(x, axis=0, reverse=REVERSE), i_b, i_h, t0, T_out, H, K, k0, BT, BK)


@triton.jit
def _chunk_cumsum_kernel(x_ptr, y_ptr, T_in, T_out, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, REVERSE: tl.constexpr):
    """Sums along time within each chunk of a (B, T, H, K) tensor (K = 1: per-token decay), for one chunk and K tile.

    Forward, b from a: the inclusive running sum; rows [T_in, T_out) of the padded output continue it with zeros.
    Reverse, da from db: the sum over the chunk's rows at or after each row (b_i sums a_t for t <= i).
    """
    i_n, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    _cumsum_tile(x_ptr, y_ptr, i_bh // H, i_bh % H, i_n * BT, i_k * BK, T_in, T_out, H, K, BT, BK, REVERSE)


@triton.jit
def _strong_cumsum_kernel(x_ptr, y_ptr, strong_ptr, T_in, T_out, NT, H: tl.constexpr, K: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr):
    """`_chunk_cumsum_kernel` over the strong chunks only (per channel: the forward's b, which the mild ones do not
    need, and the backward's da, which dqk sums for the mild ones)."""
    for c in range(tl.program_id(0), tl.load(strong_ptr), tl.num_programs(0)):
        i_bh, i_n = _strong_chunk(strong_ptr, c, NT)
        _cumsum_tile(x_ptr, y_ptr, i_bh // H, i_bh % H, i_n * BT, tl.program_id(1) * BK, T_in, T_out, H, K, BT, BK,
                     REVERSE)


@triton.jit
def _gate_kernel(a_ptr, q_ptr, k_ptr, bl_ptr, strong_ptr, qg_ptr, kg_ptr, eg_ptr, T, NT, H: tl.constexpr,
                 K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, CSPAN: tl.constexpr):
    """Per-channel decay, forward, one chunk and K tile: the chunk's total log decay b_last, qg, kg and e, and whether
    the chunk is strong.

    b is the in-chunk inclusive running sum of a (padded rows continue it with zeros). It is not stored here: mild
    chunks need only e = e^(b - m), which goes out beside qg in their dtype (half of b's fp32 bytes) for dqk (not
    for a tile that shows its chunk strong), and `_strong_cumsum_kernel` stores b for the strong chunks, whose
    kernels read it. b_last, its last row, goes to the (B H, NT, K) totals, which the walks and every mildness test
    read. A chunk whose b_last is at or below -CSPAN in some channel is strong: the first of its K tiles to see it
    appends it to the strong list (`_strong_chunk`; a flag per chunk after the list keeps it from being appended
    twice). qg = q e^(b - m), kg = k e^(m - b), m = b_last / 2: what mild chunks multiply instead of q, k and b:
    A = qg kg^T (masked), q e^b = qg e^m, k e^(b_last - b) = kg e^m; qg = q e, kg = k / e. In a channel whose b_last
    is at or below -CSPAN, qg = q e^b and kg = k e^(b_last - b) instead: the walks read qg and kg for every chunk
    (`_log_gate_factor`), the other kernels only for mild ones.
    """
    i_n, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    k0 = i_k * BK
    offs_k = k0 + tl.arange(0, BK)
    b = tl.cumsum(_floored(_load(a_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)), axis=0)
    # The tile's last row holds b_last: rows past the input add zeros.
    b_last = tl.sum(tl.where((tl.arange(0, BT) == BT - 1)[:, None], b, 0.0), axis=0)
    tl.store(bl_ptr + (i_bh * NT + i_n) * K + offs_k, b_last, mask=offs_k < K)
    # m = log f: b_last / 2, or 0 in a strong channel, where qg = q e^b and kg = k e^(b_last - b) are at most |q| and
    # |k| (what the walks multiply).
    m = _log_gate_factor(b_last, CSPAN)[None, :]
    q = _load(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
    k = _load(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
    e = tl.exp(b - m)
    _store(qg_ptr, q * e, i_b, i_h, t0, T, H, K, k0, BT, BK)
    _store(kg_ptr, k * tl.exp(b_last[None, :] - m - b), i_b, i_h, t0, T, H, K, k0, BT, BK)
    # `_chunk_is_mild`'s test on this tile's totals (absent channels count 0), so that both agree: a mild tile stores
    # e (its chunk may still be strong in another tile), a strong one lists its chunk.
    if tl.min(tl.where(offs_k < K, b_last, 0.0), axis=0) > -CSPAN:
        _store(eg_ptr, e, i_b, i_h, t0, T, H, K, k0, BT, BK)
    else:
        chunk = i_bh * NT + i_n
        n_chunks = tl.num_programs(0) * tl.num_programs(2)
        if tl.atomic_xchg(strong_ptr + 1 + n_chunks + chunk, 1) == 0:
            tl.store(strong_ptr + 1 + tl.atomic_add(strong_ptr, 1), chunk)


@triton.jit
def _chunk_walk_kernel(x_ptr, y_ptr, a_ptr, b_ptr, bl_ptr, start_ptr, states_ptr, total_ptr, gsum_ptr, final_ptr, T, Tp,
                       NT, NS, G, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, REVERSE: tl.constexpr,
                       STATES: tl.constexpr, HAS_START: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                       CSPAN: tl.constexpr, RDT: tl.constexpr, XS: tl.constexpr,
                       YS: tl.constexpr):
    """Walk the chunks of one group in order, carrying the (BK, BV) state tile.

    Forward (x = k, y = v): S <- e^(b_last) S + (k e^(b_last - b))^T v.
    Reverse (x = q, y = do, chunks backwards): S <- e^(b_last) S + scale (q e^b)^T do, i.e. dh.
    Per-channel decay: x is the gated kg (reverse: qg) of `_gate_kernel`, only the chunks' totals b_last are read
    (bl), and the stored states are f h (`_log_gate_factor`, f of the chunk they enter).
    STATES: start from the group's true entering state (or zero) and store the state each chunk starts from
    (reverse: the dh each chunk hands back), and the last state as `final`. Otherwise start from zero and store
    only the group's total contribution, for `_group_scan_kernel`, and for data-dependent decays the group's total
    log decay (the sum of its chunks' b_last; once per K tile, from the first V tile).
    XS, YS: x's and y's layout (`_load_in`).
    """
    i_kv, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    k0, v0 = (i_kv // tl.cdiv(V, BV)) * BK, (i_kv % tl.cdiv(V, BV)) * BV
    offs_k = k0 + tl.arange(0, BK)
    n_first = i_s * G
    n_count = tl.minimum(G, NT - n_first)
    if HAS_START:
        s = _load_st(start_ptr, i_bh * NS + i_s, K, V, k0, v0, BK, BV, False).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    g = tl.zeros([BK], dtype=tl.float32)
    if DECAY == 2:
        # Per channel each chunk's b_last is loaded a step ahead, since the state's update and its store wait on it
        # (T 8k, B 4 on an H100: the walk 193 against 143 us; per token it gained nothing).
        n_end = n_first + n_count - 1
        if REVERSE:
            b_next = _chunk_b_last(bl_ptr, i_bh, n_end, NT, K, offs_k)
        else:
            b_next = _chunk_b_last(bl_ptr, i_bh, n_first, NT, K, offs_k)
    for step in range(0, n_count):
        if REVERSE:
            n = n_first + n_count - 1 - step
        else:
            n = n_first + step
        t0 = n * BT
        last = tl.minimum(T - t0, BT) - 1
        if STATES and DECAY != 2:
            _store_st(states_ptr, s, i_bh * NT + n, K, V, k0, v0, BK, BV)
        if DECAY == 2:
            b_last = b_next
            if REVERSE:
                b_next = _chunk_b_last(bl_ptr, i_bh, tl.maximum(n - 1, n_first), NT, K, offs_k)
            else:
                b_next = _chunk_b_last(bl_ptr, i_bh, tl.minimum(n + 1, n_end), NT, K, offs_k)
            f = tl.exp(_log_gate_factor(b_last, CSPAN))
            if STATES:
                # Stored times the chunk's f, so that the kernels that read it multiply qg and kg as they are.
                _store_st(states_ptr, s * f[:, None], i_bh * NT + n, K, V, k0, v0, BK, BV)
        # x is loaded as (BK, BT) so that the product below needs no transpose.
        xt = _load_in(x_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True, XS)
        y = _load_in(y_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False, YS)
        if DECAY != 2:
            b_last = _row_log_decay(a_ptr, b_ptr, i_b, i_h, t0, last, Tp, H, K, offs_k, DECAY)
        if DECAY != 0 and not STATES:  # only the first pass stores a group total
            g += b_last
        if DECAY == 2:
            # x is the gated kg (reverse: qg): k e^(b_last - b) = kg f, q e^b = qg f. Reading them spares the fp32
            # b tile and an exp per element on the walk's sequential path. f is one factor per key channel, a row of
            # x^T y, so it scales the product's rows rather than x: x goes to the dot as loaded, with no elementwise
            # pass over it. kg and qg reach e^(CSPAN / 2), so the dot takes them in their own dtype (RDT: fp32 for
            # fp16 inputs, whose range they would overflow).
            s = s * tl.exp(b_last)[:, None] + (scale * f)[:, None] * tl.dot(xt.to(RDT), y.to(RDT),
                                                                            input_precision=PREC)
        else:
            xt = xt.to(tl.float32)
            b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, K, k0, BT, BK, DECAY, True)
            if REVERSE:
                xt = xt * tl.exp(b)[None, :]
            else:
                xt = xt * tl.exp(b_last - b)[None, :]
            s = s * tl.exp(b_last)
            s += scale * tl.dot(xt.to(DT), y.to(DT), input_precision=PREC)
    if STATES:
        # The walk that ends the sequence (the first group, walking backwards) holds the final state.
        if REVERSE:
            ends = i_s == 0
        else:
            ends = i_s == NS - 1
        if ends:
            _store_st(final_ptr, s, i_bh, K, V, k0, v0, BK, BV)
    else:
        _store_st(total_ptr, s, i_bh * NS + i_s, K, V, k0, v0, BK, BV)
        # (The host used to make these with eight small torch ops per walk: host time, at long T.)
        if DECAY == 2:
            if i_kv % tl.cdiv(V, BV) == 0:
                tl.store(gsum_ptr + (i_bh * NS + i_s) * K + offs_k, g, mask=offs_k < K)
        elif DECAY == 1:
            if i_kv == 0:
                tl.store(gsum_ptr + i_bh * NS + i_s + tl.arange(0, BK), g, mask=tl.arange(0, BK) < 1)


@triton.jit
def _group_scan_kernel(total_ptr, gsum_ptr, a_ptr, h0_ptr, start_ptr, NS, T, GT, H: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                       REVERSE: tl.constexpr, HAS_H0: tl.constexpr):
    """Carry the state across groups: store the state entering each group, then decay it and add the group total.

    A group's total log decay: from gsum, or for a constant decay a times its tokens (GT each, the last fewer).
    """
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    k0, v0 = (i_kv // tl.cdiv(V, BV)) * BK, (i_kv % tl.cdiv(V, BV)) * BV
    offs_k = k0 + tl.arange(0, BK)
    if HAS_H0:
        s = _load_st(h0_ptr, i_bh, K, V, k0, v0, BK, BV, False).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for step in range(0, NS):
        if REVERSE:
            i_s = NS - 1 - step
        else:
            i_s = step
        slab = i_bh * NS + i_s
        _store_st(start_ptr, s, slab, K, V, k0, v0, BK, BV)
        if DECAY == 2:
            g = tl.load(gsum_ptr + slab * K + offs_k, mask=offs_k < K, other=0.0)
            s = s * tl.exp(g)[:, None]
        elif DECAY == 1:
            s = s * tl.exp(tl.load(gsum_ptr + slab))
        else:
            a = _floored(tl.load(a_ptr + i_bh % H).to(tl.float32))
            s = s * tl.exp(a * tl.minimum(GT, T - i_s * GT).to(tl.float32))
        s += _load_st(total_ptr, slab, K, V, k0, v0, BK, BV, False)


@triton.jit
def _chunk_A_kernel(q_ptr, k_ptr, b_ptr, strong_ptr, A_ptr, T, Tp, NT, H: tl.constexpr, K: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                    SPAN: tl.constexpr):
    """Rows [m BC, (m + 1) BC) of A_ij = sum_c q_ic k_jc e^(b_ic - b_jc) (j <= i, else 0) for per-channel decay.

    Only for chunks of strong decay (`_strong_chunk`): the others get A inline in the kernels that use it.
    """
    for c in range(tl.program_id(0), tl.load(strong_ptr), tl.num_programs(0)):
        i_bh, i_n = _strong_chunk(strong_ptr, c, NT)
        i_b, i_h = i_bh // H, i_bh % H
        t0 = i_n * BT
        r0 = tl.program_id(1) * BC
        cols = tl.arange(0, BT)
        sub = tl.arange(0, BC)
        # Reference row just before this block: keys before it decay to it, queries decay from it.
        ref = r0 - 1  # used only past the first block
        acc = tl.zeros([BC, BT], dtype=tl.float32)
        acc_diag = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            k0 = i_k * BK
            offs_k = k0 + tl.arange(0, BK)
            q = _load(q_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False).to(tl.float32)
            b_q = _rows_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0, 0, Tp, H, K, k0, BC, BK, 2, False)
            if r0 > 0:  # the first block has no earlier keys
                b_ref = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, ref, Tp, H, K, offs_k, 2)
                kt = _load(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True).to(tl.float32)
                b_kt = _rows_log_decay(q_ptr, b_ptr, i_b, i_h, t0, 0, 0, Tp, H, K, k0, BT, BK, 2, True)
                kt = kt * tl.exp(tl.where((cols < r0)[None, :], b_ref[:, None] - b_kt, float("-inf")))
                acc += tl.dot((q * tl.exp(b_q - b_ref[None, :])).to(DT), kt.to(DT), input_precision=PREC)
            if tl.max(tl.max(b_q, axis=0) - tl.min(b_q, axis=0), axis=0) < SPAN:
                # Around the block's first row: q e^(b_i - b_r0) <= |q|, k e^(b_r0 - b_j) <= |k| e^SPAN.
                b_r0 = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0, Tp, H, K, offs_k, 2)
                kt_m = _load(k_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, True).to(tl.float32)
                b_kt_m = _rows_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0, 0, Tp, H, K, k0, BC, BK, 2, True)
                d = tl.dot(q * tl.exp(b_q - b_r0[None, :]), kt_m * tl.exp(b_r0[:, None] - b_kt_m),
                           input_precision=PREC)
                acc_diag += tl.where(sub[:, None] >= sub[None, :], d, 0.0)
            else:
                # Elementwise, one key column at a time: every exp() argument <= 0. A dynamic loop: unrolled, it
                # spilled registers at 4 warps.
                for j in range(BC):
                    t_j = t0 + r0 + j
                    # The row test is broadcast to a vector first: scalar & vector masks trip the interpreter.
                    row_mask = (offs_k < K) & ((t_j + 0 * offs_k) < T)
                    k_j = tl.load(k_ptr + ((i_b * T + t_j) * H + i_h) * K + offs_k, mask=row_mask,
                                  other=0.0).to(tl.float32)
                    b_j = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0 + j, Tp, H, K, offs_k, 2)
                    e = tl.exp(tl.where((sub >= j)[:, None], b_q - b_j[None, :], float("-inf")))
                    col = tl.sum(q * k_j[None, :] * e, axis=1)
                    acc_diag += tl.where((sub == j)[None, :], col[:, None], 0.0)
        base = A_ptr + (i_bh * NT + i_n) * BT * BT + (r0 + sub)[:, None] * BT
        # Two stores with disjoint masks: the diagonal block comes from acc_diag, the rest (zeros past it) from acc.
        off_diag = (cols < r0) | (cols >= r0 + BC)
        tl.store(base + cols[None, :], acc, mask=off_diag[None, :])
        tl.store(base + r0 + sub[None, :], acc_diag)


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, o_ptr, a_ptr, b_ptr, bl_ptr, A_ptr, h_ptr, qg_ptr, kg_ptr, T, Tp, NT,
                   scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr,
                   CSPAN: tl.constexpr, RDT: tl.constexpr, QS: tl.constexpr):
    """o = scale (q e^b h + A v) for one chunk and V tile; A inline, or from the A kernel for strong per-channel decay.

    Scalar decays: A = (q k^T) e^(b_i - b_j). Per channel, mild chunk: A = qg kg^T (`_gate_kernel`), whose
    factors reach e^(CSPAN / 2): RDT operands (fp32 for fp16 inputs, whose range that would overflow).
    """
    i_n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    v0 = i_v * BV
    last = tl.minimum(T - t0, BT) - 1
    rows = tl.arange(0, BT)
    causal = rows[:, None] >= rows[None, :]
    mild = True
    if DECAY == 2:
        mild = _chunk_is_mild(bl_ptr, i_bh, i_n, NT, K, KP, CSPAN)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    acc_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k0 = i_k * BK
        h = _load_st(h_ptr, i_bh * NT + i_n, K, V, k0, v0, BK, BV, False)
        if DECAY == 2:
            # q e^b h = qg (f h) in every chunk, and the walk stored f h. A = qg kg^T is made for strong chunks too and
            # not used: no branch in the loop, whose loads it would take out of the software pipeline.
            qg = _load(qg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False)
            kgt = _load(kg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True)
            acc += tl.dot(qg.to(RDT), h.to(RDT), input_precision=PREC)
            acc_a += tl.dot(qg.to(RDT), kgt.to(RDT), input_precision=PREC)
        else:
            q = _load_in(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False, QS)
            # The state in RDT (fp32 for fp16 inputs: it can pass fp16's range where o does not).
            acc += tl.dot(q.to(RDT), h.to(RDT), input_precision=PREC)
            kt = _load_in(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True, QS)
            acc_a += tl.dot(q.to(DT), kt.to(DT), input_precision=PREC)
    v = _load_in(v_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False, QS)
    if DECAY == 2:
        if mild:
            # Above the diagonal the products can reach e^CSPAN and overflow (in strong chunks, anywhere): selected
            # away, never multiplied.
            a_mat = tl.where(causal, acc_a, 0.0)
        else:
            a_mat = tl.load(A_ptr + (i_bh * NT + i_n) * BT * BT + rows[:, None] * BT + rows[None, :])
    else:
        b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, K, 0, BT, BK, DECAY, False)
        acc = acc * tl.exp(b)[:, None]
        a_mat = acc_a * _intra_decay(b, BT, False)
    acc += tl.dot(a_mat.to(DT), v.to(DT), input_precision=PREC)
    _store(o_ptr, acc * scale, i_b, i_h, t0, T, H, V, v0, BT, BV)


@triton.jit
def _dv_kernel(q_ptr, k_ptr, do_ptr, dv_ptr, a_ptr, b_ptr, bl_ptr, A_ptr, dh_ptr, qg_ptr, kg_ptr, T, Tp, NT, scale,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr, CSPAN: tl.constexpr,
               RDT: tl.constexpr, QS: tl.constexpr):
    """dv = scale A^T do + (k e^(b_last - b)) dh_next for one chunk and V tile; A^T made as `_output_kernel` makes A."""
    i_n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    v0 = i_v * BV
    last = tl.minimum(T - t0, BT) - 1
    rows = tl.arange(0, BT)
    # Row j, column i: A_ij for i >= j.
    later = rows[None, :] >= rows[:, None]
    mild = True
    if DECAY == 2:
        mild = _chunk_is_mild(bl_ptr, i_bh, i_n, NT, K, KP, CSPAN)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    acc_at = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k0 = i_k * BK
        dh = _load_st(dh_ptr, i_bh * NT + i_n, K, V, k0, v0, BK, BV, False)
        if DECAY == 2:
            # k e^(b_last - b) dh = kg (f dh) in every chunk, and the walk stored f dh; A^T made for strong chunks too,
            # unused, as A in `_output_kernel`.
            kg = _load(kg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False)
            qgt = _load(qg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True)
            acc += tl.dot(kg.to(RDT), dh.to(RDT), input_precision=PREC)
            acc_at += tl.dot(kg.to(RDT), qgt.to(RDT), input_precision=PREC)
        else:
            k = _load_in(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False, QS)
            acc += tl.dot(k.to(RDT), dh.to(RDT), input_precision=PREC)  # dh in RDT, as h in `_output_kernel`
            # A^T straight from k and a transposed load of q, never by transposing a dot result.
            qt = _load_in(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, True, QS)
            acc_at += tl.dot(k.to(DT), qt.to(DT), input_precision=PREC)
    do = _load(do_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False)
    if DECAY == 2:
        if mild:
            at = tl.where(later, acc_at, 0.0)
        else:
            # A^T by a transposed load of the stored A.
            at = tl.load(A_ptr + (i_bh * NT + i_n) * BT * BT + rows[None, :] * BT + rows[:, None])
    else:
        b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, K, 0, BT, BK, DECAY, False)
        b_last = _row_log_decay(a_ptr, b_ptr, i_b, i_h, t0, last, Tp, H, K, 0, DECAY)
        acc = acc * tl.exp(b_last - b)[:, None]
        at = acc_at * _intra_decay(b, BT, True)
    acc += scale * tl.dot(at.to(DT), do.to(DT), input_precision=PREC)
    _store_in(dv_ptr, acc, i_b, i_h, t0, T, H, V, v0, BT, BV, QS)


@triton.jit
def _dA_kernel(do_ptr, v_ptr, dA_ptr, a_ptr, b_ptr, T, Tp, NT, scale, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr, QS: tl.constexpr):
    """dA = scale do v^T for one chunk, masked to i >= j (scalar decays: times e^(b_i - b_j)), for `_dqk_kernel` and
    `_intra_bwd_kernel`.

    Made once per chunk: each of dqk's K tiles made dA and dA^T again, two of its three products per V tile.
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    rows = tl.arange(0, BT)
    causal = rows[:, None] >= rows[None, :]
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        v0 = i_v * BV
        do = _load(do_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False)
        vt = _load_in(v_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, True, QS)
        acc += tl.dot(do.to(DT), vt.to(DT), input_precision=PREC)
    if DECAY == 2:
        da = tl.where(causal, scale * acc, 0.0)
    else:
        b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, tl.minimum(T - t0, BT) - 1, Tp, H, K, 0, BT, BV, DECAY,
                            False)
        da = scale * acc * _intra_decay(b, BT, False)
    _store_dA(dA_ptr, i_bh * NT + i_n, da, BT)


@triton.jit
def _dqk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dq_out_ptr, dk_out_ptr, db_ptr, da_ptr, dA_ptr, a_ptr,
                b_ptr, bl_ptr, h_ptr, dh_ptr, qg_ptr, kg_ptr, eg_ptr, upper_ptr, B, T, Tp, NT, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                STORE_DB: tl.constexpr, STAGED: tl.constexpr, KP: tl.constexpr, CSPAN: tl.constexpr,
                RDT: tl.constexpr, QS: tl.constexpr, DA_DOT: tl.constexpr, CDT: tl.constexpr):
    """dq, dk and db for one chunk and K tile; strong per-channel decay leaves the in-chunk part to `_intra_bwd_kernel`.

    STAGED (scalar decays, learned): dA and its transpose are loaded as `_dA_kernel` stored them; otherwise (a fixed
    scalar decay, and per channel, whose strong chunks then store dA for `_intra_bwd_kernel`) made here from do and v.
    Scalar decays: complete dq, dk (into dq_ptr, dk_ptr) and a partial (per K tile) db. Per channel, a mild chunk:
    complete dq, dk (into dq_out_ptr, dk_out_ptr) and the log decay's gradient da, db's reverse running sum (the
    chunk is whole here); a strong one: the inter-chunk parts of dq, dk, db in fp32 (into dq_ptr, dk_ptr, db_ptr).
    """
    i_n, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    k0 = i_k * BK
    offs_k = k0 + tl.arange(0, BK)
    last = tl.minimum(T - t0, BT) - 1
    rows = tl.arange(0, BT)
    mild = True
    if DECAY == 2:
        mild = _chunk_is_mild(bl_ptr, i_bh, i_n, NT, K, KP, CSPAN)
    acc_dq = tl.zeros([BT, BK], dtype=tl.float32)
    acc_dk = tl.zeros([BT, BK], dtype=tl.float32)
    acc_hdh = tl.zeros([BK], dtype=tl.float32)
    acc_da = tl.zeros([BT, BT], dtype=tl.float32)
    acc_dat = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        v0 = i_v * BV
        do = _load(do_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False)
        v = _load_in(v_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, False, QS)
        if not STAGED:
            vt = _load_in(v_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, True, QS)
        ht = _load_st(h_ptr, i_bh * NT + i_n, K, V, k0, v0, BK, BV, True)
        dht = _load_st(dh_ptr, i_bh * NT + i_n, K, V, k0, v0, BK, BV, True)
        # RDT operands (fp32 for fp16 inputs): h and dh can pass fp16's range where the gradients do not, and per
        # channel they come times f, down to e^(-CSPAN / 2).
        acc_dq += tl.dot(do.to(RDT), ht.to(RDT), input_precision=PREC)
        acc_dk += tl.dot(v.to(RDT), dht.to(RDT), input_precision=PREC)
        acc_hdh += tl.sum(ht.to(tl.float32) * dht.to(tl.float32), axis=0)
        if not STAGED:
            acc_da += tl.dot(do.to(DT), vt.to(DT), input_precision=PREC)
            # dA^T straight from v and a transposed load of do, never by transposing acc_da.
            do_t = _load(do_ptr, i_b, i_h, t0, T, H, V, v0, BT, BV, True)
            acc_dat += tl.dot(v.to(DT), do_t.to(DT), input_precision=PREC)
    is_last = rows == last
    if DECAY == 2:
        if mild:
            # As A in `_output_kernel`, through the gated qg = q e and kg = k / e (e = e^(b - m), m = b_last / 2); the
            # masks select, never multiply. As q e^b = qg e^m and k e^(b_last - b) = kg e^m, dq = e x and dk = y / e
            # for the x and y below, and db's terms q dq = qg x and k dk = kg y need neither q, k nor e: no exp per
            # element (e comes stored) instead of three, and two loads fewer (1.7% off the per-channel fwd+bwd at B 16,
            # T 2k, when e was made here). h and dh come times e^m (the walks store them so), which the products with
            # them need.
            # dA = scale do v^T (i >= j) and its transpose, as the V loop made them: no decay factor per channel.
            # Read staged instead (stored once a chunk by the dv kernel), fwd+bwd took 0.990 / 1.140 / 1.193 ms at 2k /
            # 8k / 32k on an H200 against 0.968 / 1.118 / 1.180 (docs/bench/kernels.md).
            da = tl.where(rows[:, None] >= rows[None, :], scale * acc_da, 0.0)
            dat = tl.where(rows[None, :] >= rows[:, None], scale * acc_dat, 0.0)
            kg = _load(kg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False)
            qg = _load(qg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False)
            x = scale * acc_dq + tl.dot(da.to(RDT), kg.to(RDT), input_precision=PREC)
            y = acc_dk + tl.dot(dat.to(RDT), qg.to(RDT), input_precision=PREC)
            # e as the gate kernel stored it, in qg's dtype: the same rounding as qg's own, and half the bytes of the
            # fp32 b it would otherwise be made from. Rows past the end read 1, not 0, which y / e would make NaN.
            e_ptrs, e_mask = _ptrs(eg_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False)
            e = tl.load(e_ptrs, mask=e_mask, other=1.0).to(tl.float32)
            _store(dq_out_ptr, x * e, i_b, i_h, t0, T, H, K, k0, BT, BK)
            _store(dk_out_ptr, y / e, i_b, i_h, t0, T, H, K, k0, BT, BK)
            if STORE_DB:
                d_last = acc_hdh + tl.sum(kg.to(tl.float32) * acc_dk, axis=0)
                db = qg.to(tl.float32) * x - kg.to(tl.float32) * y + tl.where(is_last[:, None], d_last[None, :], 0.0)
                # Summed here rather than by a cumsum pass over db, which moved db twice through memory. On an H100 at
                # B 16, T 2k the pass took 0.09 ms and `tl.cumsum` added 0.07 to this kernel (as a tf32x3 product with
                # a triangle of ones, 0.73); for 16-bit inputs two bf16 products now (`_reverse_cumsum`).
                _store(da_ptr, _reverse_cumsum(db, upper_ptr, BT, DA_DOT, CDT), i_b, i_h, t0, T, H, K, k0, BT, BK)
        else:
            # `_intra_bwd_kernel` reads this strong chunk's dA as stored; one K tile stores it.
            if i_k == 0:
                _store_dA(dA_ptr, i_bh * NT + i_n, tl.where(rows[:, None] >= rows[None, :], scale * acc_da, 0.0), BT)
            # h and dh come times f = e^lf: divided out, within the exponents.
            b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, K, k0, BT, BK, DECAY, False)
            b_last = _chunk_b_last(bl_ptr, i_bh, i_n, NT, K, offs_k)
            lf = _log_gate_factor(b_last, CSPAN)
            dq = scale * acc_dq * tl.exp(b - lf[None, :])
            dk = acc_dk * tl.exp(b_last[None, :] - b - lf[None, :])
            _store(dq_ptr, dq, i_b, i_h, t0, T, H, K, k0, BT, BK)
            _store(dk_ptr, dk, i_b, i_h, t0, T, H, K, k0, BT, BK)
            if STORE_DB:
                qf = _load(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
                kf = _load(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
                d_last = tl.exp(b_last - 2.0 * lf) * acc_hdh + tl.sum(kf * dk, axis=0)
                db = qf * dq - kf * dk + tl.where(is_last[:, None], d_last[None, :], 0.0)
                _store(db_ptr, db, i_b, i_h, t0, Tp, H, K, k0, BT, BK)
    else:
        b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, K, k0, BT, BK, DECAY, False)
        b_last = _row_log_decay(a_ptr, b_ptr, i_b, i_h, t0, last, Tp, H, K, offs_k, DECAY)
        q = _load_in(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False, QS)
        k = _load_in(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False, QS)
        dk_state = acc_dk * tl.exp(b_last - b)[:, None]
        if STAGED:  # decayed and scaled by `_dA_kernel`
            da, dat = _load_dA(dA_ptr, i_bh * NT + i_n, BT)
            dq = scale * acc_dq * tl.exp(b)[:, None] + tl.dot(da.to(DT), k.to(DT), input_precision=PREC)
            dk = dk_state + tl.dot(dat.to(DT), q.to(DT), input_precision=PREC)
        else:
            da = acc_da * _intra_decay(b, BT, False)
            dat = acc_dat * _intra_decay(b, BT, True)
            dq = scale * (acc_dq * tl.exp(b)[:, None] + tl.dot(da.to(DT), k.to(DT), input_precision=PREC))
            dk = dk_state + scale * tl.dot(dat.to(DT), q.to(DT), input_precision=PREC)
        if STORE_DB:
            qf, kf = q.to(tl.float32), k.to(tl.float32)
            d_last = tl.exp(b_last) * tl.sum(acc_hdh, axis=0) + tl.sum(tl.sum(kf * dk_state, axis=1), axis=0)
            db = tl.sum(qf * dq - kf * dk, axis=1) + tl.where(is_last, d_last, 0.0)
            tl.store(db_ptr + ((i_k * B + i_b) * Tp + t0 + rows) * H + i_h, db)
        _store_in(dq_ptr, dq, i_b, i_h, t0, T, H, K, k0, BT, BK, QS)
        _store_in(dk_ptr, dk, i_b, i_h, t0, T, H, K, k0, BT, BK, QS)


@triton.jit
def _intra_bwd_kernel(q_ptr, k_ptr, dq_ptr, dk_ptr, dq_out_ptr, dk_out_ptr, db_ptr, dA_ptr, b_ptr, bl_ptr, T, Tp, NT,
                      H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr, STORE_DB: tl.constexpr, SPAN: tl.constexpr,
                      KP: tl.constexpr, CSPAN: tl.constexpr):
    """Per-channel decay, chunks of strong decay only: add the intra-chunk parts of dq, dk (and db), every sub-block
    of BC rows and K tile of one chunk (`_dqk_kernel` completes the mild chunks itself).

    A program per chunk, which exits on mild chunks, rather than a loop over the strong list as `_chunk_A_kernel`:
    looping, it took 1.60 against 1.02 ms at B 16, T 2k on an H100 when every chunk was strong. A program per
    sub-block before: its exits cost 34 us at B 4, T 8k, a program per chunk 8; fwd+bwd with a sixteenth of the chunks
    strong is 0.04 ms slower this way (fewer programs share the work), with a quarter or all of them 0.07 / 0.19 faster.

    dq_i += sum_{j<=i} dA_ij k_j e^(b_i - b_j), dk_j += sum_{i>=j} dA_ij q_i e^(b_i - b_j); off the diagonal
    block through a reference row between i and j, on it as in `_chunk_A_kernel` (a dot, or elementwise).
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_n * BT
    if not _chunk_is_mild(bl_ptr, i_bh, i_n, NT, K, KP, CSPAN):
        cols = tl.arange(0, BT)
        sub = tl.arange(0, BC)
        dA_base = dA_ptr + (i_bh * NT + i_n) * BT * BT
        # Sub-blocks and K tiles in a loop, not in the grid: on mild chunks every program exits at once, and fewer
        # programs cost less time.
        for i_mk in range(0, (BT // BC) * tl.cdiv(K, BK)):
            r0 = (i_mk // tl.cdiv(K, BK)) * BC
            k0 = (i_mk % tl.cdiv(K, BK)) * BK
            offs_k = k0 + tl.arange(0, BK)
            b_m = _rows_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0, 0, Tp, H, K, k0, BC, BK, 2, False)
            b = _rows_log_decay(q_ptr, b_ptr, i_b, i_h, t0, 0, 0, Tp, H, K, k0, BT, BK, 2, False)

            dq = tl.zeros([BC, BK], dtype=tl.float32)
            dk = tl.zeros([BC, BK], dtype=tl.float32)
            # dq, keys in earlier blocks (none for the first): decay them to the row before this block, then from there
            # to the query.
            if r0 > 0:
                ref = r0 - 1
                b_ref = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, ref, Tp, H, K, offs_k, 2)
                k = _load(k_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
                k_ref = k * tl.exp(tl.where((cols < r0)[:, None], b_ref[None, :] - b, float("-inf")))
                da_rows = tl.load(dA_base + (r0 + sub)[:, None] * BT + cols[None, :])
                dq += tl.dot(da_rows.to(DT), k_ref.to(DT), input_precision=PREC) * tl.exp(b_m - b_ref[None, :])
            # dk, queries in later blocks (none for the last): decay from the block's last row on; dA^T by a transposed
            # load.
            ref = r0 + BC - 1
            b_ref = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, ref, Tp, H, K, offs_k, 2)
            if ref < BT - 1:
                q = _load(q_ptr, i_b, i_h, t0, T, H, K, k0, BT, BK, False).to(tl.float32)
                q_ref = q * tl.exp(tl.where((cols > ref)[:, None], b - b_ref[None, :], float("-inf")))
                dat_rows = tl.load(dA_base + cols[None, :] * BT + (r0 + sub)[:, None])
                dk += tl.dot(dat_rows.to(DT), q_ref.to(DT), input_precision=PREC) * tl.exp(b_ref[None, :] - b_m)
            if tl.max(tl.max(b_m, axis=0) - tl.min(b_m, axis=0), axis=0) < SPAN:
                # Around the block's first row for dq and its last row for dk, as in `_chunk_A_kernel`: no factor above
                # e^SPAN. dA and its transpose are loaded as such, lower triangle only.
                b_r0 = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r0, Tp, H, K, offs_k, 2)
                k_m = _load(k_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False).to(tl.float32)
                q_m = _load(q_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False).to(tl.float32)
                on_or_below = sub[:, None] >= sub[None, :]
                da_blk = tl.load(dA_base + (r0 + sub)[:, None] * BT + (r0 + sub)[None, :], mask=on_or_below, other=0.0)
                dat_blk = tl.load(dA_base + (r0 + sub)[None, :] * BT + (r0 + sub)[:, None],
                                  mask=sub[:, None] <= sub[None, :], other=0.0)
                k_up = k_m * tl.exp(b_r0[None, :] - b_m)  # up to |k| e^SPAN
                dq += tl.dot(da_blk.to(tl.float32), k_up, input_precision=PREC) * tl.exp(b_m - b_r0[None, :])
                q_up = q_m * tl.exp(b_m - b_ref[None, :])  # up to |q| e^SPAN
                dk += tl.dot(dat_blk.to(tl.float32), q_up, input_precision=PREC) * tl.exp(b_ref[None, :] - b_m)
            else:
                # Elementwise, one column (for dq) and one row (for dk) at a time: every exp() argument <= 0. A
                # dynamic loop: unrolled inside the K loop, it spilled registers on sm_90.
                for j in range(BC):
                    r = r0 + j
                    t_r = t0 + r
                    row_mask = (offs_k < K) & ((t_r + 0 * offs_k) < T)  # vector & vector, as in `_chunk_A_kernel`
                    row = ((i_b * T + t_r) * H + i_h) * K + offs_k
                    k_j = tl.load(k_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
                    q_j = tl.load(q_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
                    b_j = _row_log_decay(q_ptr, b_ptr, i_b, i_h, t0, r, Tp, H, K, offs_k, 2)
                    da_col = tl.load(dA_base + (r0 + sub) * BT + r).to(tl.float32)  # dA[i, r] for i in the block
                    da_row = tl.load(dA_base + r * BT + r0 + sub).to(tl.float32)  # dA[r, j] for j in the block
                    e_q = tl.exp(tl.where((sub >= j)[:, None], b_m - b_j[None, :], float("-inf")))
                    dq += da_col[:, None] * k_j[None, :] * e_q
                    e_k = tl.exp(tl.where((sub <= j)[:, None], b_j[None, :] - b_m, float("-inf")))
                    dk += da_row[:, None] * q_j[None, :] * e_k

            if STORE_DB:
                # Loaded again rather than kept from the dot path: held across the branch they made the per-channel
                # fwd+bwd 4-5% slower on an H100 (3.41 against 3.26 ms at T 2k).
                q_m = _load(q_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False).to(tl.float32)
                k_m = _load(k_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False).to(tl.float32)
                db = _load(db_ptr, i_b, i_h, t0 + r0, Tp, H, K, k0, BC, BK, False) + q_m * dq - k_m * dk
                _store(db_ptr, db, i_b, i_h, t0 + r0, Tp, H, K, k0, BC, BK)
            # The inter-chunk parts come in fp32 from `_dqk_kernel`; the sums go out in the inputs' dtype.
            dq += _load(dq_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False)
            dk += _load(dk_ptr, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK, False)
            _store(dq_out_ptr, dq, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK)
            _store(dk_out_ptr, dk, i_b, i_h, t0 + r0, T, H, K, k0, BC, BK)


@triton.jit
def _fused_decays(a_ptr, b_ptr, i_b, i_h, t0, T, Tp, H: tl.constexpr, BT: tl.constexpr, DECAY: tl.constexpr):
    """A scalar-decay chunk's in-chunk cumulative log decay b (BT,) and its last valid row's b_last."""
    last = tl.minimum(T - t0, BT) - 1
    # Key width, offset and tile (1, 0, 1): scalar decays have none.
    b = _rows_log_decay(a_ptr, b_ptr, i_b, i_h, t0, 0, last, Tp, H, 1, 0, BT, 1, DECAY, False)
    b_last = _row_log_decay(a_ptr, b_ptr, i_b, i_h, t0, last, Tp, H, 1, 0, DECAY)
    return b, b_last


@triton.jit
def _fused_start(ptr, i_bh, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS: tl.constexpr,
                 TRANS: tl.constexpr):
    """A fused walk's starting state in fp32: (K, V) state i_bh of ptr if HAS, else zeros; (BV, BK) if TRANS."""
    if HAS:
        s = _load_st(ptr, i_bh, K, V, 0, 0, BK, BV, TRANS).to(tl.float32)
    elif TRANS:
        s = tl.zeros([BV, BK], dtype=tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    return s


@triton.jit
def _fused_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, a_ptr, b_ptr, h0_ptr, final_ptr, T, Tp, NT, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, QS: tl.constexpr, RDT: tl.constexpr):
    """Scalar decays, one (batch, head) per program (`_Plan.fused`): walk its chunks in order carrying the state S
    in registers, o = scale ((q k^T) e^(b_i - b_j) v + q e^b S), then S <- e^(b_last) S + (k e^(b_last - b))^T v.
    No state goes through memory; the whole head (K, V <= 64) is one tile. The state meets the dots in RDT (fp32 for
    fp16 inputs, whose range it can pass where o does not; the chunked kernels' `state_dtype`)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    s = _fused_start(h0_ptr, i_bh, K, V, BK, BV, HAS_H0, False)
    for n in range(NT):
        t0 = n * BT
        b, b_last = _fused_decays(a_ptr, b_ptr, i_b, i_h, t0, T, Tp, H, BT, DECAY)
        q = _load_in(q_ptr, i_b, i_h, t0, T, H, K, 0, BT, BK, False, QS)
        kt = _load_in(k_ptr, i_b, i_h, t0, T, H, K, 0, BT, BK, True, QS)
        v = _load_in(v_ptr, i_b, i_h, t0, T, H, V, 0, BT, BV, False, QS)
        a = tl.dot(q.to(DT), kt.to(DT), input_precision=PREC)
        a = a * _intra_decay(b, BT, False) * scale
        qe = q.to(tl.float32) * (tl.exp(b) * scale)[:, None]
        o = tl.dot(a.to(DT), v.to(DT), input_precision=PREC) + tl.dot(qe.to(RDT), s.to(RDT), input_precision=PREC)
        _store(o_ptr, o, i_b, i_h, t0, T, H, V, 0, BT, BV)
        kg = kt.to(tl.float32) * tl.exp(b_last - b)[None, :]
        s = s * tl.exp(b_last) + tl.dot(kg.to(DT), v.to(DT), input_precision=PREC)
    if STORE_FINAL:
        _store_st(final_ptr, s, i_bh, K, V, 0, 0, BK, BV)


@triton.jit
def _fused_dq_kernel(k_ptr, v_ptr, do_ptr, dq_ptr, a_ptr, b_ptr, h0_ptr, T, Tp, NT, scale, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, HAS_H0: tl.constexpr,
                     QS: tl.constexpr, RDT: tl.constexpr):
    """The fused backward's forward walk: dq = scale ((do v^T) e^(b_i - b_j) k + e^b do S^T), carrying S^T (V x K)
    itself, updated from v^T and k, so that no product transposes a dot's result."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    st = _fused_start(h0_ptr, i_bh, K, V, BK, BV, HAS_H0, True)
    for n in range(NT):
        t0 = n * BT
        b, b_last = _fused_decays(a_ptr, b_ptr, i_b, i_h, t0, T, Tp, H, BT, DECAY)
        k = _load_in(k_ptr, i_b, i_h, t0, T, H, K, 0, BT, BK, False, QS)
        vt = _load_in(v_ptr, i_b, i_h, t0, T, H, V, 0, BT, BV, True, QS)
        do = _load(do_ptr, i_b, i_h, t0, T, H, V, 0, BT, BV, False)
        da = tl.dot(do.to(DT), vt.to(DT), input_precision=PREC)
        da = da * _intra_decay(b, BT, False)
        dq = tl.dot(da.to(DT), k.to(DT), input_precision=PREC)
        dq += tl.dot(do.to(RDT), st.to(RDT), input_precision=PREC) * tl.exp(b)[:, None]
        _store_in(dq_ptr, dq * scale, i_b, i_h, t0, T, H, K, 0, BT, BK, QS)
        kg = k.to(tl.float32) * tl.exp(b_last - b)[:, None]
        st = st * tl.exp(b_last) + tl.dot(vt.to(DT), kg.to(DT), input_precision=PREC)


@triton.jit
def _fused_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, a_ptr, b_ptr, dfinal_ptr, dh0_ptr, T, Tp, NT,
                      scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DECAY: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, STORE_DH0: tl.constexpr, QS: tl.constexpr, RDT: tl.constexpr):
    """The fused backward's reverse walk, carrying dS (K x V), the gradient of the state a chunk hands on:
    dv = scale (k q^T) e^(b_i - b_j) do + e^(b_last - b) k dS, and dk made transposed, dk^T = scale q^T ((do v^T)
    e^(b_i - b_j)) + (dS v^T) e^(b_last - b), so that one state and four tiles (k, q^T, v^T, do) serve both; then
    dS <- e^(b_last) dS + scale (q e^b)^T do."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    ds = _fused_start(dfinal_ptr, i_bh, K, V, BK, BV, HAS_DFINAL, False)
    for i in range(NT):
        t0 = (NT - 1 - i) * BT
        b, b_last = _fused_decays(a_ptr, b_ptr, i_b, i_h, t0, T, Tp, H, BT, DECAY)
        k = _load_in(k_ptr, i_b, i_h, t0, T, H, K, 0, BT, BK, False, QS)
        qt = _load_in(q_ptr, i_b, i_h, t0, T, H, K, 0, BT, BK, True, QS)
        vt = _load_in(v_ptr, i_b, i_h, t0, T, H, V, 0, BT, BV, True, QS)
        do = _load(do_ptr, i_b, i_h, t0, T, H, V, 0, BT, BV, False)
        g = tl.exp(b_last - b)
        at = tl.dot(k.to(DT), qt.to(DT), input_precision=PREC)
        at = at * _intra_decay(b, BT, True) * scale
        dv = tl.dot(at.to(DT), do.to(DT), input_precision=PREC)
        dv += g[:, None] * tl.dot(k.to(RDT), ds.to(RDT), input_precision=PREC)
        _store_in(dv_ptr, dv, i_b, i_h, t0, T, H, V, 0, BT, BV, QS)
        da = tl.dot(do.to(DT), vt.to(DT), input_precision=PREC)
        da = da * _intra_decay(b, BT, False) * scale
        dkt = tl.dot(qt.to(DT), da.to(DT), input_precision=PREC)
        dkt += g[None, :] * tl.dot(ds.to(RDT), vt.to(RDT), input_precision=PREC)
        _store_in(dk_ptr, dkt, i_b, i_h, t0, T, H, K, 0, BT, BK, QS, True)
        qet = qt.to(tl.float32) * (tl.exp(b) * scale)[None, :]
        ds = ds * tl.exp(b_last) + tl.dot(qet.to(DT), do.to(DT), input_precision=PREC)
    if STORE_DH0:
        _store_st(dh0_ptr, ds, i_bh, K, V, 0, 0, BK, BV)


# --------------------------------------------------------------------------------------------- host side
# Plain-Python sizes: triton.cdiv and triton.next_power_of_2 are constexpr-function objects, a few microseconds a
# call, and a forward and backward made about 60 of them (a quarter of the host time at B 16, T 2k on an H100).


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class _Capturing(Exception):
    """`_upper_ones` was first asked for during CUDA graph capture, where a tensor made is written only on replay."""


@functools.lru_cache(maxsize=None)
def _upper_ones(device: torch.device) -> torch.Tensor:
    """The (CHUNK, CHUNK) bf16 upper triangle of ones (`_reverse_cumsum`), made once per device."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise _Capturing  # not cached: the next call outside a capture makes it
    return torch.ones(CHUNK, CHUNK, device=device, dtype=torch.bfloat16).triu()


def _pow2_tile(d: int, cap: int = 64) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, min(cap, _next_pow2(d)))


def _gated_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel qg and kg for inputs of `dtype`: bf16 for bf16, else fp32 (fp16's range would
    overflow at e^(CHUNK_SPAN_LIMIT / 2)); the kernels' RDT matches it."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _group_size(n_chunks: int, walkers: int, slots: int) -> int:
    """Chunks per group for the state walk, by a cost model counting sequential chunk steps.

    The GPU runs `slots` walkers (one batch, head and K x V tile each) at once: SMs times walkers per SM, which the
    register budget sets. One walk over all chunks costs ceil(walkers / slots) * n_chunks steps; groups of G cost
    two walks of G chunks with walkers x groups programs, plus a scan over groups. Groups win when batch x heads is
    too small to fill the GPU (B = 1, long T). Without slots (the interpreter) take G ~ sqrt(n_chunks), so tests
    cover groups.
    """
    if not slots:
        return max(1, math.ceil(math.sqrt(n_chunks)))
    best_cost, best = _cdiv(walkers, slots) * n_chunks, n_chunks
    size = 1
    while size < n_chunks:
        groups = _cdiv(n_chunks, size)
        cost = 2 * _cdiv(walkers * groups, slots) * size + groups
        if cost < best_cost:
            best_cost, best = cost, size
        size *= 2
    return best


#: Walk settings by decay form (0 constant, 2 per channel) for a walk in one group with no more walkers than SMs,
#: where each SM would hold one walker of 4 warps: 8 warps and 4 stages, and per channel, whose step is longer, V
#: tiles of 32 (twice the walkers). At B 4, T 8k, H 8, D 128 on an H200 (fwd+bwd, CUDA-graph replays, two rounds):
#: constant with a fixed decay 0.744-0.745 -> 0.713-0.716 ms, with its decay's gradient 0.834-0.836 -> 0.802-0.806,
#: per channel 1.104-1.106 -> 1.057-1.060 (docs/bench/kernels.md); the per-token form was slower so (0.875 -> 0.892).
SPARSE_WALK: dict[int, dict] = {0: dict(num_warps=8, num_stages=4), 2: dict(BV=32, num_warps=8, num_stages=4)}


def _sparse_walk(decay: int, walkers: int, sms: int) -> dict:
    """The walk's settings over the defaults (`SPARSE_WALK`) for a one-group walk of `walkers` on `sms` SMs
    (0: not a GPU)."""
    return SPARSE_WALK.get(decay, {}) if 0 < walkers <= sms else {}


@functools.lru_cache(maxsize=None)
def _launch_settings(K: int, V: int, bf16: bool, per_channel: bool) -> types.MappingProxyType:
    """Tiles, warps and pipeline stages per kernel name for heads of K x V (read-only: plans copy what they change).

    Made once per head shape and dtype: they cost a plan about half its host time when made on every call."""
    # Tiles, warps and pipeline stages per kernel, chosen so that none spills registers on sm_90 (checked by
    # compiling ahead of time, tests/kernels/test_triton_compile.py): fp32 tiles (fp32 inputs, or the fp32
    # states of fp16 inputs) take twice the registers of bf16 ones, so they get narrower tiles and fewer stages.
    # The bf16 choices were timed one kernel at a time on an H100 (fwd+bwd replayed as a CUDA graph, B 16, T 2k,
    # H 8, K = V = 128; docs/bench/kernels.md), among those that do not spill; a spilling one can be faster
    # with one compiler and much slower with the next.
    wide = 64 if bf16 else 32
    stages = 3 if bf16 else 2
    # The output and dv kernels at 4 warps for heads of up to 64 (lightning's) in bf16, at 8 for wider ones (the
    # benchmark's 128, where 8 was chosen); dqk at 4 in bf16 at any width. At lightning's training shape on an H200
    # (packed q, k, v, fixed decay, B 64, T 2k, H 12, D 64; CUDA-graph replays) fwd+bwd took 1.549 ms with all
    # three at 4 against 1.865 at 8, and 0.407 against 0.486 at B 16; at the benchmark's D 128, dqk at 4 took
    # 0.007-0.020 ms off the scalar forms and left per channel as it was (docs/bench/kernels.md).
    # Per channel (its dA made in dqk, not stored by dv) the output and dv kernels also at 4 warps at D 128, and dqk
    # at 4 stages: each alone took 0.003-0.008 ms off its fwd+bwd at 2k / 8k / 32k on an H200, together
    # 0.966-0.967 / 1.118-1.119 / 1.181 -> 0.956-0.957 / 1.104-1.106 / 1.165-1.166 ms (docs/bench/kernels.md).
    chunk_warps = 4 if bf16 and ((K <= 64 and V <= 64) or per_channel) else 8
    cfg = {
        # Walks, bf16: 4 warps (about 120 registers a thread) and 3 stages, with the group size counting two
        # walkers per SM, were faster than 8 warps (one per SM) for every form and shape
        # timed on an H100, most at long T: per channel fwd+bwd 2.40 against 2.74 ms at B 1, T 32k, constant
        # forward 10.5 against 11.8 ms at B 1, T 1M. 4 warps and 2 stages were slower. Other dtypes: untimed.
        "walk": dict(BK=_pow2_tile(K, wide), BV=_pow2_tile(V, wide), num_warps=4 if bf16 else 8,
                     num_stages=stages),
        "scan": dict(BK=_pow2_tile(K, 32), BV=_pow2_tile(V, 32), num_warps=4, num_stages=stages),
        # Output and dv: one V tile of 128 per chunk (bf16), so that q, k (qg, kg) are read and A made once per
        # chunk. Fwd+bwd on an H100 at 2k / 8k / 32k, against tiles of 64, each alone: the output's took 0.002-0.008
        # / 0.013-0.015 / 0.027-0.031 ms off per channel and 0.005 / 0.010 / 0.024 off the fixed-decay constant
        # form, the scalar dv's 0.002 / 0.011 / 0.021 off the latter.
        "out": dict(BK=_pow2_tile(K, wide), BV=_pow2_tile(V, 2 * wide), num_warps=chunk_warps, num_stages=stages),
        "dv": dict(BK=_pow2_tile(K, wide), BV=_pow2_tile(V, 2 * wide), num_warps=chunk_warps, num_stages=stages),
        "dA": dict(BV=_pow2_tile(V, wide), num_warps=8, num_stages=stages),
        # Wide K tiles: each K tile loads do and v again (and unstaged, makes the whole do v^T again). Per channel
        # with dA staged, tiles of 64 gave 1.39 / 1.55 / 1.75 ms fwd+bwd at 2k / 8k / 32k against 1.45 / 1.62 /
        # 1.93 with 32 (before, making dA itself, 64 spilled registers). 3 stages rather than 2: 0.04-0.07 ms
        # off every form's fwd+bwd (per channel 1.31 / 1.46 / 1.64 -> 1.26 / 1.41 / 1.57 ms).
        "dqk": dict(BK=_pow2_tile(K, wide), BV=_pow2_tile(V, 32), num_warps=4 if bf16 else 8,
                    num_stages=4 if bf16 and per_channel else stages),
        # A, 4 warps (two programs per SM; 8 warps took the whole register file): the sub-block path 13% faster
        # at B 16, T 2k and 28% in the forward at B 1, T 1M. It spilled at 4 warps until its elementwise loop
        # became dynamic.
        "A": dict(BK=_pow2_tile(K, 32), num_warps=4, num_stages=1 if bf16 else stages),
        "intra": dict(BK=_pow2_tile(K, 32), num_warps=4, num_stages=stages),
        # Sums along time of the log decay (width 1 per token, K per channel); no dots, so no 16 minimum.
        "cumsum": dict(BK=min(64, _next_pow2(K if per_channel else 1)), num_warps=4,
                       num_stages=stages),
        "gate": dict(BK=min(64, _next_pow2(K)), num_warps=4, num_stages=stages),
        # The fused walks (`FUSED_MIN_HEADS_PER_SM`), the whole head in one tile. At lightning's shape on an H200
        # (B 64): the forward walks at 3 stages 1.318 ms fwd+bwd against 1.395 at 2; the reverse walk at 4 warps
        # 0.935 against 1.348 at 8 (and 1.220 at 8 warps, 3 stages), though Triton 3.9 compiles it for sm_90 with
        # spills of 8-32 bytes (tests/kernels/test_triton_compile.py allows those). fp32 spills at any setting.
        "fused": dict(BK=_pow2_tile(K), BV=_pow2_tile(V), num_warps=4, num_stages=3),
        "fused_dkv": dict(BK=_pow2_tile(K), BV=_pow2_tile(V), num_warps=4, num_stages=2),
    }
    return types.MappingProxyType({name: types.MappingProxyType(values) for name, values in cfg.items()})


class _Plan:
    """Sizes, tiles, launch settings and the per-chunk decay bookkeeping shared by the forward and the backward."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, saved: tuple | None = None,
                 k: torch.Tensor | None = None, qs: int = 1):
        self.B, self.T, self.H, self.K = q.shape
        if self.B * self.H > MAX_BATCH_HEADS:  # reached only where the batch was not split first (vmap's members)
            raise ValueError(f"the triton backend takes at most {MAX_BATCH_HEADS} (batch x heads) pairs in one call, "
                             f"got {self.B} x {self.H}; pass the batch in smaller pieces")
        self.V = v.shape[-1]
        self.decay = {1: 0, 3: 1, 4: 2}[log_decay.dim()]
        # q, k, v (and their gradients): dense (qs 1) or views of one packed (B, T, 3, H, D) tensor (qs 3, `_load_in`);
        # the per-channel form's own kernels read them dense.
        self.qs = qs
        self.BT = CHUNK
        self.NT = _cdiv(self.T, self.BT)
        self.Tp = self.NT * self.BT
        bf16 = q.dtype == torch.bfloat16
        K, V = self.K, self.V
        per_channel = self.decay == 2
        self.cfg = dict(_launch_settings(K, V, bf16, per_channel))
        # One program per (batch, head) over all chunks (`FUSED_MIN_HEADS_PER_SM`); bf16 only, unless forced: fp32 is
        # for checking, not speed, and fp16's states meet the dots as fp32 operands (RDT), with which the fused reverse
        # walk spills on sm_90 (112-176 bytes, Triton 3.9), where the chunked kernels do not.
        heads_per_sm = self.B * self.H / _sm_count(q.device) if q.is_cuda else 0.0
        self.fused = (FUSED_MIN_HEADS_PER_SM is not None and not per_channel and K <= 64 and V <= 64
                      and heads_per_sm >= FUSED_MIN_HEADS_PER_SM
                      and (q.dtype == torch.bfloat16 or FUSED_MIN_HEADS_PER_SM == 0))
        walkers = _cdiv(K, self.cfg["walk"]["BK"]) * _cdiv(V, self.cfg["walk"]["BV"]) * self.B * self.H
        # Two walkers of 4 warps per SM: of 1, 2 or 3, the count that gave the fastest groups on an H100 (kernels.md).
        walkers_per_sm = 8 // self.cfg["walk"]["num_warps"]
        sms = _sm_count(q.device) if q.is_cuda else 0
        self.G = _group_size(self.NT, walkers, sms * walkers_per_sm)
        self.NS = _cdiv(self.NT, self.G)
        if bf16 and self.NS == 1:
            self.cfg["walk"] = {**self.cfg["walk"], **_sparse_walk(self.decay, walkers, sms)}
        # The interpreter multiplies bf16 tiles as raw uint16 bits, so it gets fp32 operands instead.
        if q.dtype == torch.bfloat16 and not _interpreting():
            self.dt = tl.bfloat16
        elif q.dtype == torch.float16:
            self.dt = tl.float16
        else:
            self.dt = tl.float32
        self.prec = FP32_DOT_PRECISION if self.dt == tl.float32 and not _interpreting() else "tf32"
        # bf16 states lose nothing the bf16 dots would not; fp16 states could overflow, so they stay fp32.
        self.state_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
        # Per-channel decay: the whole-chunk test of `_chunk_is_mild` (its width, a power of 2, and its limit).
        self.mild = dict(KP=_next_pow2(self.K), CSPAN=CHUNK_SPAN_LIMIT)
        # The dtype of dot operands that can pass fp16's range: states and their gradients (every form), per channel
        # also the gated qg and kg. For fp16 inputs fp32 (tf32 on the GPU: fp16's precision), else the inputs' dt.
        self.rdt = tl.float32 if q.dtype == torch.float16 else self.dt
        # Per channel, how dqk sums the log decay's gradient (`DA_BY_DOT`); its triangle comes with the launch.
        by_dot = DA_BY_DOT if DA_BY_DOT is not None else q.dtype != torch.float32 and not _interpreting()
        self.da_sum = dict(DA_DOT=by_dot and per_channel, CDT=tl.float32 if _interpreting() else tl.bfloat16)
        # Kernels over the strong chunks (`_strong_chunk`): a fixed grid of programs that loop over them.
        self.strong_programs = _sm_count(q.device) * 4 if q.is_cuda else 3
        self._bookkeeping(q, k, log_decay, saved)

    def _bookkeeping(self, q: torch.Tensor, k: torch.Tensor | None, log_decay: torch.Tensor,
                     saved: tuple | None) -> None:
        """The decay's bookkeeping, made by the forward (given k) and handed to the backward (`saved`): b, the in-chunk
        inclusive cumulative log decay (padded to whole chunks), for the data-dependent forms (per channel, for the
        strong chunks only); per channel also e, the chunks' totals bl, the strong list and the gated qg, kg
        (`_gate_kernel`)."""
        self.qg = self.kg = self.eg = self.bl = self.strong = None
        if self.decay == 0:
            self.a = log_decay.float().contiguous()
            self.b = self.a  # unused: the kernels compute b from a
        elif self.decay == 1:
            self.b = saved[0] if saved else self.chunk_cumsum(log_decay, self.T, self.Tp, reverse=False)
            self.a = self.b
        else:
            if saved:
                self.b, self.eg, self.bl, self.strong = saved
            else:
                dev = q.device
                self.b = torch.empty(self.B, self.Tp, self.H, self.K, device=dev, dtype=torch.float32)
                self.bl = torch.empty(self.B * self.H, self.NT, self.K, device=dev, dtype=torch.float32)
                # The count, the list, and a flag per chunk (`_gate_kernel`).
                self.strong = torch.zeros(1 + 2 * self.B * self.H * self.NT, device=dev, dtype=torch.int32)
                self.qg = torch.empty(q.shape, device=dev, dtype=_gated_dtype(q.dtype))
                self.kg = torch.empty_like(self.qg)
                self.eg = torch.empty_like(self.qg)
                self.launch(_gate_kernel, "gate", self.grid("gate", self.NT, "K"), log_decay, q, k, self.bl,
                            self.strong, self.qg, self.kg, self.eg, self.T, self.NT, H=self.H, K=self.K, BT=self.BT,
                            CSPAN=CHUNK_SPAN_LIMIT)
                # b for the strong chunks only (the list is complete once the gate kernel is done); mild ones read e.
                self.launch(_strong_cumsum_kernel, "cumsum", self.strong_grid(_cdiv(self.K, self.cfg["cumsum"]["BK"])),
                            log_decay, self.b, self.strong, self.T, self.Tp, self.NT, H=self.H, K=self.K, BT=self.BT,
                            REVERSE=False)
            self.a = self.b

    def chunk_cumsum(self, x: torch.Tensor, rows_in: int, rows_out: int, reverse: bool,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`_chunk_cumsum_kernel` over x, (B, rows_in, H): a (B, rows_out, H) tensor of `dtype` (per-token decay)."""
        y = torch.empty(self.B, rows_out, self.H, device=x.device, dtype=dtype)
        self.launch(_chunk_cumsum_kernel, "cumsum", (self.NT, 1, self.B * self.H), x, y, rows_in, rows_out, H=self.H,
                    K=1, BT=self.BT, REVERSE=reverse)
        return y

    def strong_grid(self, per_chunk: int) -> tuple[int, int]:
        """The grid of a kernel over the strong chunks (`_strong_chunk`), `per_chunk` programs each."""
        return (min(self.strong_programs, self.B * self.H * self.NT), per_chunk)

    def launch(self, kernel, name, grid, *args, **constexprs):
        """Launch `kernel` with the tiles, warps and stages chosen for `name`."""
        kernel[grid](*args, **self.cfg[name], **constexprs)

    def grid(self, name, rows, k_or_v="V"):
        """(rows, tiles of K or V for kernel `name`, B H)."""
        width = self.K if k_or_v == "K" else self.V
        return (rows, _cdiv(width, self.cfg[name]["B" + k_or_v]), self.B * self.H)

    def states(self, x, y, scale, h0, reverse):
        """The state entering every chunk (reverse: the dh it hands back), (B H, NT, K, V), and the final one.

        x: k (reverse: q), or per channel the gated kg (qg)."""
        B, H, K, V, NS = self.B, self.H, self.K, self.V, self.NS
        dev = x.device
        tiles = _cdiv(K, self.cfg["walk"]["BK"]) * _cdiv(V, self.cfg["walk"]["BV"])
        walk = dict(H=H, K=K, V=V, BT=self.BT, DECAY=self.decay, REVERSE=reverse, DT=self.dt, PREC=self.prec,
                    CSPAN=self.mild["CSPAN"], RDT=self.rdt, XS=self.qs,
                    YS=1 if reverse else self.qs)  # y: do (reverse) or v
        states = torch.empty(B * H, self.NT, K, V, device=dev, dtype=self.state_dtype)
        final = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
        start = h0
        if NS > 1:
            # Pass 1: each group's own contribution; then the scan gives the state entering each group.
            totals = torch.empty(B * H, NS, K, V, device=dev, dtype=torch.float32)
            g_sum = torch.empty(B * H, NS, K if self.decay == 2 else 1, device=dev) if self.decay else None
            self.launch(_chunk_walk_kernel, "walk", (tiles, NS, B * H), x, y, self.a, self.b, self.bl, None, None,
                        totals, g_sum, None, self.T, self.Tp, self.NT, NS, self.G, scale, STATES=False,
                        HAS_START=False, **walk)
            start = torch.empty_like(totals)
            grid = (_cdiv(K, self.cfg["scan"]["BK"]) * _cdiv(V, self.cfg["scan"]["BV"]), B * H)
            self.launch(_group_scan_kernel, "scan", grid, totals, g_sum, self.a, h0, start, NS, self.T,
                        self.G * self.BT, H=H, K=K, V=V, DECAY=self.decay, REVERSE=reverse, HAS_H0=h0 is not None)
        # Pass 2: walk each group again from its true entering state, storing every chunk's state.
        self.launch(_chunk_walk_kernel, "walk", (tiles, NS, B * H), x, y, self.a, self.b, self.bl, start, states,
                    None, None, final, self.T, self.Tp, self.NT, NS, self.G, scale, STATES=True,
                    HAS_START=start is not None, **walk)
        return states, final

    def chunk_A(self, q, k):
        """Per-channel decay: the masked intra-chunk matrix A, (B H, NT, BT, BT) fp32."""
        A = torch.empty(self.B * self.H, self.NT, self.BT, self.BT, device=q.device, dtype=torch.float32)
        self.launch(_chunk_A_kernel, "A", self.strong_grid(self.BT // SUB), q, k, self.b, self.strong, A, self.T,
                    self.Tp, self.NT, H=self.H, K=self.K, BT=self.BT, BC=SUB, DT=self.dt, PREC=self.prec,
                    SPAN=SPAN_LIMIT)
        return A


def _forward(q, k, v, log_decay, h0, scale, qs=1):
    """o, the final state, and for the backward A, b, qg, kg, eg, bl, strong: b for the data-dependent decays, the
    others per channel (`_Plan._bookkeeping`); empty where not made. qs: see `_Plan`."""
    plan = _Plan(q, v, log_decay, k=k, qs=qs)

    def empty():  # a custom op's outputs may not alias one another
        return q.new_empty(0, dtype=torch.float32)

    o = v.new_empty(v.shape)  # dense, also when v is a view of a packed tensor
    if plan.fused:
        final = torch.empty(plan.B, plan.H, plan.K, plan.V, device=q.device, dtype=torch.float32)
        plan.launch(_fused_fwd_kernel, "fused", (plan.B * plan.H,), q, k, v, o, plan.a, plan.b, h0, final, plan.T,
                    plan.Tp, plan.NT, scale, H=plan.H, K=plan.K, V=plan.V, BT=plan.BT, DECAY=plan.decay, DT=plan.dt,
                    PREC=plan.prec, HAS_H0=h0 is not None, STORE_FINAL=True, QS=qs, RDT=plan.rdt)
        return o, final, empty(), (plan.b if plan.decay else empty()), empty(), empty(), empty(), empty(), empty()
    A = plan.chunk_A(q, k) if plan.decay == 2 else empty()
    qg, kg = (plan.qg, plan.kg) if plan.decay == 2 else (q, k)  # scalar forms: the walks read k
    h, final = plan.states(kg, v, 1.0, h0, reverse=False)
    plan.launch(_output_kernel, "out", plan.grid("out", plan.NT), q, k, v, o, plan.a, plan.b, plan.bl,
                A if plan.decay == 2 else None, h, qg, kg, plan.T, plan.Tp, plan.NT, scale, H=plan.H, K=plan.K,
                V=plan.V, BT=plan.BT, DECAY=plan.decay, DT=plan.dt, PREC=plan.prec, RDT=plan.rdt, QS=qs,
                **plan.mild)
    if plan.decay != 2:
        return o, final, A, (plan.b if plan.decay else empty()), empty(), empty(), empty(), empty(), empty()
    return o, final, A, plan.b, qg, kg, plan.eg, plan.bl, plan.strong


def _backward(q, k, v, log_decay, h0, A, b, qg, kg, eg, bl, strong, do, dfinal, scale, need_da, need_dh0,
              dqkv=None):
    """dq, dk, dv, and da and dh0 where asked for (None otherwise); A, b, qg, kg, eg, bl, strong as the forward
    returned them. Scalar decays, q, k, v views of a packed (B, T, 3, H, D) tensor: dq, dk, dv go into the views of
    `dqkv`, shaped as it."""
    A = A if A.numel() else None
    qs = 1 if dqkv is None else 3
    plan = _Plan(q, v, log_decay, {1: None, 3: (b,), 4: (b, eg, bl, strong)}[log_decay.dim()], qs=qs)
    B, T, H, K, V, NT = plan.B, plan.T, plan.H, plan.K, plan.V, plan.NT
    shapes = dict(H=H, K=K, V=V, BT=plan.BT, DECAY=plan.decay, DT=plan.dt, PREC=plan.prec, RDT=plan.rdt,
                  QS=qs, **plan.mild)
    do = do.contiguous()
    dfinal = dfinal.float().contiguous() if dfinal is not None else None
    if plan.fused and not need_da:
        return _fused_backward(plan, q, k, v, h0, do, dfinal, scale, need_dh0, dqkv)
    if plan.decay != 2:
        qg, kg = q, k  # what the walks read; the other kernels do not read them
    # States are recomputed rather than saved: (B H, T / 64, K, V) per layer would dwarf q, k and v.
    h, _ = plan.states(kg, v, 1.0, h0, reverse=False)
    dh, dh0 = plan.states(qg, do, scale, dfinal, reverse=True)

    per_channel = plan.decay == 2
    # dA made once per chunk rather than again by each of dqk's K tiles for the scalar forms when their decay is
    # learned (on an H100 at B 16, T 2k: constant 1.18 -> 1.03 ms fwd+bwd), but not for a fixed one (0.94 against
    # 0.96), nor per channel since its dqk stopped spilling (`_dqk_kernel`). Stored bf16 for bf16 inputs, whose dots
    # take it in bf16; fp32 otherwise (fp16 could overflow).
    staged = need_da and not per_channel
    dA = None
    if staged or per_channel:  # per channel dqk stores the strong chunks' dA for `_intra_bwd_kernel`
        dA = torch.empty(B * H, NT, plan.BT, plan.BT, device=q.device,
                         dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32)
    dv = torch.empty_like(v) if dqkv is None else dqkv[:, :, 2]
    plan.launch(_dv_kernel, "dv", plan.grid("dv", NT), q, k, do, dv, plan.a, plan.b, plan.bl, A, dh, qg, kg, T, plan.Tp,
                NT, scale, **shapes)
    if staged:
        plan.launch(_dA_kernel, "dA", (NT, B * H), do, v, dA, plan.a, plan.b, T, plan.Tp, NT, scale, H=H, K=K, V=V,
                    BT=plan.BT, DECAY=plan.decay, DT=plan.dt, PREC=plan.prec, QS=qs)

    nk = _cdiv(K, plan.cfg["dqk"]["BK"])
    db = da = None
    if per_channel:
        # Mild chunks get dq and dk whole from `_dqk_kernel`; strong ones their inter-chunk parts in fp32, which
        # `_intra_bwd_kernel` completes.
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dq_inter = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk_inter = torch.empty_like(dq_inter)
        if need_da:
            db = torch.empty(B, plan.Tp, H, K, device=q.device, dtype=torch.float32)
            da = torch.empty(B, T, H, K, device=q.device, dtype=log_decay.dtype)
    else:
        dq_inter, dk_inter = (torch.empty_like(q), torch.empty_like(k)) if dqkv is None else dqkv.unbind(2)[:2]
        dq, dk = dq_inter, dk_inter
        if need_da:
            db = torch.empty(nk, B, plan.Tp, H, device=q.device, dtype=torch.float32)  # partial sums per K tile
    da_sum, upper = dict(plan.da_sum), None
    if need_da and da_sum["DA_DOT"]:
        try:
            upper = _upper_ones(q.device)
        except _Capturing:  # this call sums by the scan instead
            da_sum["DA_DOT"] = False
    plan.launch(_dqk_kernel, "dqk", plan.grid("dqk", NT, "K"), q, k, v, do, dq_inter, dk_inter, dq, dk, db, da, dA,
                plan.a, plan.b, plan.bl, h, dh, qg, kg, plan.eg, upper, B, T, plan.Tp, NT, scale, STORE_DB=need_da,
                STAGED=staged, **da_sum, **shapes)
    if per_channel:
        plan.launch(_intra_bwd_kernel, "intra", (NT, B * H), q, k, dq_inter, dk_inter, dq, dk, db, dA, plan.b,
                    plan.bl, T, plan.Tp, NT, H=H, K=K, BT=plan.BT, BC=SUB, DT=plan.dt, PREC=plan.prec, STORE_DB=need_da,
                    SPAN=SPAN_LIMIT, **plan.mild)

    if need_da:
        if plan.decay == 0:
            # b_i = (i + 1) a, one a per head: a collects (i + 1) db_i (rows past the end have db_i = 0). Summed
            # over chunks first, then weighted by a product (einsum cost 0.1 ms of host time per call).
            weight = torch.arange(1, plan.BT + 1, device=q.device, dtype=torch.float32)
            da = (weight @ db.view(-1, plan.BT, H).sum(0)).to(log_decay.dtype)
        elif plan.decay == 1:
            da = plan.chunk_cumsum(db.sum(dim=0), plan.Tp, T, reverse=True, dtype=log_decay.dtype)
        else:
            width = plan.cfg["cumsum"]["BK"]
            plan.launch(_strong_cumsum_kernel, "cumsum", plan.strong_grid(_cdiv(K, width)), db, da, plan.strong,
                        plan.Tp, T, NT, H=H, K=K, BT=plan.BT, REVERSE=True)
    return dq, dk, dv, da, (dh0 if (h0 is not None and need_dh0) else None)


def _fused_backward(plan, q, k, v, h0, do, dfinal, scale, need_dh0, dqkv):
    """dq, dk, dv (and dh0 where asked for) of a fixed scalar decay by the fused walks (`_Plan.fused`): one forward
    walk for dq, one reverse walk for dk and dv; views of `dqkv` when q, k, v are packed."""
    B, H, K, V = plan.B, plan.H, plan.K, plan.V
    if dqkv is None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:
        dq, dk, dv = dqkv.unbind(2)
    dims = dict(H=H, K=K, V=V, BT=plan.BT, DECAY=plan.decay, DT=plan.dt, PREC=plan.prec, QS=plan.qs, RDT=plan.rdt)
    plan.launch(_fused_dq_kernel, "fused", (B * H,), k, v, do, dq, plan.a, plan.b, h0, plan.T, plan.Tp, plan.NT,
                scale, HAS_H0=h0 is not None, **dims)
    dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if (h0 is not None and need_dh0) else None
    plan.launch(_fused_dkv_kernel, "fused_dkv", (B * H,), q, k, v, do, dk, dv, plan.a, plan.b, dfinal, dh0, plan.T,
                plan.Tp, plan.NT, scale, HAS_DFINAL=dfinal is not None, STORE_DH0=dh0 is not None, **dims)
    return dq, dk, dv, None, dh0


def _dense(q, k, v, log_decay, h0):
    """The inputs as the kernels index them: contiguous, the initial state in fp32 (no copies when they are)."""
    return q.contiguous(), k.contiguous(), v.contiguous(), *_dense_decay_state(log_decay, h0)


def _dense_decay_state(log_decay, h0):
    """The log decay contiguous and the initial state (if any) fp32 contiguous, as every kernel reads them."""
    return log_decay.contiguous(), (h0.float().contiguous() if h0 is not None else None)


# The kernels run as torch custom ops: torch.compile keeps a model that calls them in one graph (as a
# torch.compiler.disable function, each call split it, and the host work between the pieces left the GPU
# idle: lightning at 135M spent 92 ms per step for 69 ms of GPU work on an H100), and it never traces into
# the Triton kernels, whose fp32 loop-carried state its fp64 Python-float arguments would break.
@torch.library.custom_op("slab::linear_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, h0: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(*_dense(q, k, v, log_decay, h0), scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, log_decay, h0, scale):
    B, T, H, K = q.shape
    A = (q.new_empty(B * H, _cdiv(T, CHUNK), CHUNK, CHUNK, dtype=torch.float32) if log_decay.dim() == 4
         else q.new_empty(0, dtype=torch.float32))
    Tp = _cdiv(T, CHUNK) * CHUNK
    b = (q.new_empty(B, Tp, H, *log_decay.shape[3:], dtype=torch.float32) if log_decay.dim() > 1
         else q.new_empty(0, dtype=torch.float32))
    channel = log_decay.dim() == 4
    # Where the forward makes none, its `empty()` stands in: fp32 whatever q's dtype.
    gated = q.new_empty(q.shape, dtype=_gated_dtype(q.dtype)) if channel else q.new_empty(0, dtype=torch.float32)
    bl = q.new_empty(B * H, _cdiv(T, CHUNK), K, dtype=torch.float32) if channel else q.new_empty(0, dtype=torch.float32)
    strong = (q.new_empty(1 + 2 * B * H * _cdiv(T, CHUNK), dtype=torch.int32) if channel
              else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(v), q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32), A, b, gated, \
        torch.empty_like(gated), torch.empty_like(gated), bl, strong


@torch.library.custom_op("slab::linear_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, h0: torch.Tensor | None,
            A: torch.Tensor, b: torch.Tensor, qg: torch.Tensor, kg: torch.Tensor, eg: torch.Tensor, bl: torch.Tensor,
            strong: torch.Tensor, do: torch.Tensor, dfinal: torch.Tensor | None, scale: float, need_da: bool,
            need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, log_decay, h0 = _dense(q, k, v, log_decay, h0)
    dq, dk, dv, da, dh0 = _backward(q, k, v, log_decay, h0, A, b, qg, kg, eg, bl, strong, do, dfinal, scale,
                                    need_da, need_dh0)
    # A custom op returns tensors only: an empty one stands for "no gradient".
    return dq, dk, dv, (da if da is not None else q.new_empty(0)), (dh0 if dh0 is not None else q.new_empty(0))


@_bwd_op.register_fake
def _(q, k, v, log_decay, h0, A, b, qg, kg, eg, bl, strong, do, dfinal, scale, need_da, need_dh0):
    da = torch.empty_like(log_decay) if need_da else q.new_empty(0)
    dh0 = h0.new_empty(h0.shape, dtype=torch.float32) if (h0 is not None and need_dh0) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), da, dh0


def _setup_context(ctx, inputs, output):
    """Save what the backward reads: the inputs, and A, b, qg, kg, eg, bl, strong as the forward made them."""
    q, k, v, log_decay, h0, scale = inputs
    # A, b, qg, kg, eg, bl and strong: made once in the forward, read again by the backward (per-channel qg, kg and
    # eg: three bf16 copies of q's size, which spare the backward a pass over q, k and b).
    ctx.save_for_backward(q, k, v, log_decay, h0, *output[2:])
    ctx.mark_non_differentiable(*output[2:])
    # Otherwise autograd fills a zero gradient for each of those outputs on every backward (per channel, writes
    # the size of six copies of q: 0.1 ms of a 2.2 ms step at B 16, T 2k on an H100).
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _autograd_backward(ctx, do, dfinal, *_unused, run=_bwd_op):
    """Gradients of q, k, v, the log decay and the initial state (None where not asked for), through `run`."""
    q, k, v, log_decay, h0, *made = ctx.saved_tensors
    if do is None:  # only the final state reached the loss
        do = torch.zeros_like(v)
    need_da, need_dh0 = ctx.needs_input_grad[3], h0 is not None and ctx.needs_input_grad[4]
    dq, dk, dv, da, dh0 = run(q, k, v, log_decay, h0, *made, do, dfinal, ctx.scale, need_da, need_dh0)
    return dq, dk, dv, (da if need_da else None), (dh0 if need_dh0 else None), None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom ops' forward and backward for calls outside torch.compile and functorch: a plain autograd
    Function costs less host time per call than the op dispatch, and these kernels are bound by the host at
    training sizes when not in a CUDA graph."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, scale):
        # ctx here rather than a separate setup_context, which has autograd bind the arguments with inspect on
        # every call.
        output = _forward(q, k, v, log_decay, h0, scale)
        _setup_context(ctx, (q, k, v, log_decay, h0, scale), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, do, dfinal, *unused):
        return _autograd_backward(ctx, do, dfinal, *unused, run=_backward)  # the saved inputs are dense already


def _vmap_front(x, dim, n):
    """A vmapped argument with the vmapped dimension (size n) first, expanded where it had none."""
    return x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)


def _vmap_heads(x, axis):
    """The members folded into the heads: (n, ...) -> the unbatched shape with n H at `axis`, its heads' index."""
    return x.movedim(0, axis).flatten(axis, axis + 1)


def _vmap_decay_state(info, log_decay, h0, dims):
    """The log decay and initial state of vmapped members, folded into the heads: (n H,), (B, T, n H) or
    (B, T, n H, K); (B, n H, K, V)."""
    n = info.batch_size
    g = _vmap_front(log_decay, dims[0], n)
    g = g.reshape(-1) if g.dim() == 2 else _vmap_heads(g, 2)  # constant decay: (n, H) -> (n H,)
    h0 = None if h0 is None else _vmap_heads(_vmap_front(h0, dims[1], n), 1)
    return g, h0


@_fwd_op.register_vmap
def _vmap(info, in_dims, q, k, v, log_decay, h0, scale):
    """Under ``torch.func.vmap`` (several stacked models trained as one), fold the vmapped dimension into the
    heads and run one kernel launch over all of them."""
    q, k, v = (_vmap_heads(_vmap_front(x, d, info.batch_size), 2) for x, d in zip((q, k, v), in_dims[:3]))
    g, h0 = _vmap_decay_state(info, log_decay, h0, in_dims[3:5])
    o, final, *rest = _fwd_op(*_dense(q, k, v, g, h0), scale)
    n = info.batch_size
    return (o.unflatten(2, (n, -1)), final.unflatten(1, (n, -1)), *rest), (2, 1) + (None,) * len(rest)


# q, k and v as the three views of one packed (B, T, 3, H, D) tensor, scalar decays only: the kernels read them in
# place and write the packed tensor's gradient. A model whose q, k, v come from one joint projection (lightning) so
# copies neither q, k, v apart nor, in the backward, dq, dk, dv together: on an H200 the SiLU of lightning's projection
# with the split took 1.0 ms of a 32k-token step, the SiLU's gradient with the stack 3.2 (58.7 ms in all), as autograd
# and inductor made them.
#
# Two other ways measured slower there. The SiLU applied by the kernels as they load q, k, v (no SiLU pass at all)
# sent the loads that fed the dots straight from shared memory through registers: dqk 2.2 -> 5.3 ms per step, the
# walks 1.7 -> 2.9. The SiLU's gradient applied as dq, dk, dv are stored, from a dense copy made in the op: dqk +1.0,
# dv +0.4, and torch's SiLU from the permuted projection into that copy 2.9 ms against inductor's 1.0; no net gain.
# The same in the fused walks (branch wip/silu-in-walks-h100) lost too, on an H100 as on an H200: training 615.6k
# against 647.4k tokens/s; the walks, at their register limit already, spill with the extra tiles (docs/bench/kernels.md).
@torch.library.custom_op("slab::linear_attention_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, log_decay: torch.Tensor, h0: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(*qkv.unbind(2), log_decay, h0, scale, qs=3)


@_packed_fwd_op.register_fake
def _(qkv, log_decay, h0, scale):
    return _fwd_fake(*qkv.unbind(2), log_decay, h0, scale)


@torch.library.custom_op("slab::linear_attention_packed_bwd", mutates_args=())
def _packed_bwd_op(qkv: torch.Tensor, log_decay: torch.Tensor, h0: torch.Tensor | None, A: torch.Tensor,
                   b: torch.Tensor, do: torch.Tensor, dfinal: torch.Tensor | None, scale: float, need_da: bool,
                   need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _packed_backward(qkv, log_decay, h0, A, b, do, dfinal, scale, need_da, need_dh0)


@_packed_bwd_op.register_fake
def _(qkv, log_decay, h0, A, b, do, dfinal, scale, need_da, need_dh0):
    da = torch.empty_like(log_decay) if need_da else qkv.new_empty(0)
    dh0 = h0.new_empty(h0.shape, dtype=torch.float32) if (h0 is not None and need_dh0) else qkv.new_empty(0)
    return torch.empty_like(qkv), da, dh0


def _packed_backward(qkv, log_decay, h0, A, b, do, dfinal, scale, need_da, need_dh0):
    """The packed tensor's gradient, and da and dh0 (empty where not asked for)."""
    dqkv = torch.empty_like(qkv)
    none = qkv.new_empty(0)  # per-channel bookkeeping, which the scalar forms have none of
    _, _, _, da, dh0 = _backward(*qkv.unbind(2), log_decay, h0, A, b, none, none, none, none, none, do, dfinal, scale,
                                 need_da, need_dh0, dqkv=dqkv)
    # A custom op's returns may not alias one another: a fresh empty tensor for each gradient not asked for.
    return dqkv, (da if da is not None else qkv.new_empty(0)), (dh0 if dh0 is not None else qkv.new_empty(0))


def _packed_setup_context(ctx, inputs, output):
    """Save the packed inputs and the forward's A and b (scalar decays make nothing else) for the backward."""
    qkv, log_decay, h0, scale = inputs
    ctx.save_for_backward(qkv, log_decay, h0, output[2], output[3])
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _packed_autograd_backward(ctx, do, dfinal, *_unused, run=_packed_bwd_op):
    """Gradients of the packed tensor, the log decay and the initial state (None where not asked for)."""
    qkv, log_decay, h0, A, b = ctx.saved_tensors
    if do is None:
        do = qkv.new_zeros(qkv[:, :, 2].shape)
    need_da, need_dh0 = ctx.needs_input_grad[1], h0 is not None and ctx.needs_input_grad[2]
    dqkv, da, dh0 = run(qkv, log_decay, h0, A, b, do, dfinal, ctx.scale, need_da, need_dh0)
    return dqkv, (da if need_da else None), (dh0 if need_dh0 else None), None


_packed_fwd_op.register_autograd(_packed_autograd_backward, setup_context=_packed_setup_context)


@_packed_fwd_op.register_vmap
def _packed_vmap(info, in_dims, qkv, log_decay, h0, scale):
    """Under vmap, the members folded into the heads, as `_vmap`: qkv (n, B, T, 3, H, D) -> (B, T, 3, n H, D)."""
    n = info.batch_size
    qkv = _vmap_heads(_vmap_front(qkv, in_dims[0], n), 3).contiguous()
    g, h0 = _vmap_decay_state(info, log_decay, h0, in_dims[1:3])
    o, final, *rest = _packed_fwd_op(qkv, *_dense_decay_state(g, h0), scale)
    return (o.unflatten(2, (n, -1)), final.unflatten(1, (n, -1)), *rest), (2, 1) + (None,) * len(rest)


class _EagerPacked(torch.autograd.Function):
    """The packed custom ops' forward and backward outside torch.compile, as `_Eager` for the dense ones."""

    @staticmethod
    def forward(ctx, qkv, log_decay, h0, scale):
        output = _forward(*qkv.unbind(2), log_decay, h0, scale, qs=3)
        _packed_setup_context(ctx, (qkv, log_decay, h0, scale), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, do, dfinal, *unused):
        return _packed_autograd_backward(ctx, do, dfinal, *unused, run=_packed_backward)


def linear_attention_triton_packed(
    qkv: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton backend on q, k, v packed as (B, T, 3, H, D), scalar decays: read in place, the gradient written
    packed."""
    if log_decay.dim() == 4:
        raise ValueError("the packed kernels take constant or per-token decays; per channel, pass q, k, v apart")
    if qkv.shape[0] * qkv.shape[3] > MAX_BATCH_HEADS:
        return _in_batch_pieces(linear_attention_triton_packed, qkv.shape[3], (qkv,), log_decay, initial_state, scale,
                                output_final_state)
    args = (qkv.contiguous(), *_dense_decay_state(log_decay, initial_state), float(scale))
    o, final = _run_op(_packed_fwd_op, _EagerPacked, args)
    return o, (final if output_final_state else None)


def _run_op(op, eager, args):
    """o and the final state of a forward custom op on `args` (first the tensor its device and wrapping are read
    from): the op itself under torch.compile (traced whole) and functorch (its vmap rule), else `eager`, the same
    forward and backward as a plain autograd Function."""
    if not args[0].is_cuda and not _interpreting():
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU)")
    o, final, *_ = eager_or_op(op, eager, *args)
    return o, final


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked Triton forward (and autograd backward); CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    if q.shape[0] * q.shape[2] > MAX_BATCH_HEADS:
        return _in_batch_pieces(linear_attention_triton, q.shape[2], (q, k, v), log_decay, initial_state, scale,
                                output_final_state)
    # Made dense before the op, so that the tensors it saves for the backward need no second copy there.
    o, final = _run_op(_fwd_op, _Eager, (*_dense(q, k, v, log_decay, initial_state), float(scale)))
    return o, (final if output_final_state else None)


def _in_batch_pieces(run, heads: int, batched: tuple, log_decay, initial_state, scale, output_final_state):
    """`run` over pieces of the batch of at most MAX_BATCH_HEADS (batch, head) pairs each, its outputs joined."""
    if heads > MAX_BATCH_HEADS:
        raise ValueError(f"the triton backend takes at most {MAX_BATCH_HEADS} heads, got {heads}")
    step, B = MAX_BATCH_HEADS // heads, batched[0].shape[0]
    outs = [run(*(x[i:i + step] for x in batched), log_decay if log_decay.dim() == 1 else log_decay[i:i + step],
                scale, None if initial_state is None else initial_state[i:i + step], output_final_state)
            for i in range(0, B, step)]
    return torch.cat([o for o, _ in outs]), (torch.cat([f for _, f in outs]) if output_final_state else None)

"""GEMMs with their activation in the epilogue, on quack's CuTe DSL kernels (the optional quack-kernels package, 0.6.x,
which the ``fa4`` extra brings): the SwiGLU MLP and lightning's q, k, v SiLU without their elementwise passes.

Unfused, the MLP's gate reads the two projections back from memory after cuBLAS writes them, and its backward reads
and writes the gate's gradient once more; in the 135M lightning step on an H100 those passes took 14.7 ms of 200
(docs/bench/kernels.md), the q, k, v SiLU 11.6. Here the forward GEMM applies the activation as it stores its tile
(``gemm_act``), and the backward GEMM of the second projection computes the gate's gradient from the stored
pre-activation in its epilogue (``dswiglu_epi``, the gate's output kept from the forward; or quack's ``gemm_dgated``).
The other GEMMs stay on cuBLAS (``torch.mm``). Where quack is not installed, or ``epilogues_usable`` is False, the
callers (``models.lm.MLP``, the lightning mixer) run the plain modules, which compute the same functions. Measured
on an H100 with the tiles pinned below (docs/bench/kernels.md): lightning trained 5.0-6.3% faster, the hybrid 4.6%,
softmax about 4%; compiled training takes them by default.

Also here: the head + loss on quack's scaled-exp linear cross-entropy (``linear_cross_entropy_epilogue``, compiled
training's default through ``models.lm.LM.epilogue_loss``), and, opt-in (``models.lm.Block.fused_tail``):
``residual_norm_mlp``, a block's output projection, residual add, second RMSNorm and MLP as one op on quack's
deferred-norm epilogues (see its section below).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from kernels.dispatch import _wrapped

log = logging.getLogger(__name__)

#: GPUs (compute capability) where quack's epilogue GEMMs are taken: its SM90 kernels, measured on an H100 only.
CAPABILITIES = ((9, 0),)


@functools.cache
def _quack():
    """quack's GEMM interface module, or None where quack-kernels or the CUTLASS DSL it needs does not import."""
    try:
        installed = importlib.util.find_spec("quack") is not None
    except Exception:
        installed = False
    if not installed:
        return None
    try:
        from quack import gemm_interface
        # The epilogues' library fingerprints their code when it is imported, down through the CUTLASS DSL's functions
        # unless they lie under a site-packages folder, and refuses some of those (a TypeError, seen with the packages
        # unpacked elsewhere): imported here, so that such an install falls back rather than fails training.
        import quack.epilogue.library  # noqa: F401
    except Exception as exc:  # installed but broken (another CUDA, a missing library): the plain modules run
        log.warning("quack-kernels is installed but does not import (%s: %s); the MLP and q, k, v activations run "
                    "unfused", type(exc).__name__, exc)
        return None
    return gemm_interface


#: quack's SM90 tiles for each epilogue GEMM (tile_m, tile_n, cluster_m, cluster_n; pingpong, static schedule): its
#: autotuner's winners at the 135M model's shapes on an H100 (M 131072, K 768; docs/bench/kernels.md, thirtieth
#: session). Its default (128 x 192, cluster 2 x 1) ran the gate's gradient at 1.36 ms against 0.97 for these.
TILES = {"gated": (192, 128, 1, 2), "dgated": (128, 128, 1, 2), "silu": (128, 192, 1, 2),
         # The block's tail (``residual_norm_mlp``), the autotuner's winners at the same shapes (N 768 / 3584 / 1792 /
         # 768): the output projection with the residual add and the norm's statistics, the MLP's forward on the
         # deferred norm, its gate's gradient, its input gradient with the norm's backward (None: quack's default,
         # 128 x 192, which timed 1.12 ms against the autotuner's pick's 1.19).
         "residual": (128, 128, 1, 2), "rstd_gated": (192, 128, 1, 2), "dgated_rstd": (128, 128, 1, 2),
         "norm_bwd": None,
         # The residual adds on gemm_add (thirty-fifth session, the autotuner's picks at M 131072): the mixer's output
         # projection (K 768) and the MLP's w2 (K 1792), the latter with A and B swapped (the fifth entry, swap_ab).
         "add_wo": (128, 192, 1, 2), "add_w2": (128, 208, 2, 1, True)}


def _add_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, kind: str) -> torch.Tensor:
    """a @ b + c on quack's GEMM with c read in the epilogue (gemm_add's kernel), on the tiles pinned for ``kind``."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    # gemm_add itself takes no config: its kernel entry (gemm_tuned.fn) does.
    _quack().gemm_tuned.fn(a, b, out, c, config=_config(kind))
    return out


def _config(kind: str):
    """The pinned GemmConfig for one epilogue GEMM (None: quack's default)."""
    return None if TILES[kind] is None else _pinned(_quack(), kind)


@functools.cache
def _pinned(quack, kind: str):
    # One object per kind and module: quack caches its launch plans by the pinned config's identity.
    tile_m, tile_n, cluster_m, cluster_n, *swap = TILES[kind]
    return quack.GemmConfig(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster_m, cluster_n=cluster_n, pingpong=True,
                            is_dynamic_persistent=False, device_capacity=9, swap_ab=bool(swap and swap[0]))


@torch.compiler.assume_constant_result
def _ready(device_index: int) -> bool:
    """Whether quack is installed and the GPU is one it is taken on (a constant to torch.compile)."""
    return torch.cuda.get_device_capability(device_index) in CAPABILITIES and _quack() is not None


def epilogues_ready(device: torch.device) -> bool:
    """Whether the epilogue GEMMs run on this device at all: a Hopper GPU with quack installed."""
    return device.type == "cuda" and _ready(device.index if device.index is not None else torch.cuda.current_device())


def epilogues_usable(x: torch.Tensor, *widths: int) -> bool:
    """Whether the epilogue GEMMs take input ``x`` (..., d) with these output widths: a CUDA bf16 or fp16 tensor on a
    Hopper GPU, quack installed, d and every width a multiple of 16, and no functorch transform (vmap) around it."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16) or not _unwrapped(x):
        return False
    return not any(n % 16 for n in (x.shape[-1], *widths)) and epilogues_ready(x.device)


def _unwrapped(x: torch.Tensor) -> bool:
    """Whether no functorch transform (vmap, grad) wraps x; taken as so under torch.compile, which cannot trace the
    check (a graph break in every layer), as the models that vmap (models.packed) never ask for these kernels."""
    return torch.compiler.is_compiling() or not _wrapped(x)


# --- the SwiGLU MLP -------------------------------------------------------------------------------------------------


#: Whether the SwiGLU MLP keeps its gate's output (M, F) from the forward, where its GEMM writes it anyway for w2, for
#: w2's weight gradient (``dswiglu_epi`` then leaves its store out of the backward's gate-gradient GEMM): one (M, F)
#: write fewer a layer, for one (M, F) tensor more kept a layer (4.8 GiB more at the peak for the 135M model at 131,072
#: tokens). On an H100 lightning trained +1.7%, +1.1% and +0.8% faster with it in three alternated pairs
#: (docs/bench/kernels.md, thirty-seventh session). Off: quack's ``gemm_dact`` writes it again.
MLP_KEEPS_GATE = True


def _mlp_forward(x, w13, w2, res=None):
    preact, gated = _quack().gemm_act(x, w13.T, activation="swiglu", store_preact=True, tuned=False,
                                      config=_config("gated"))
    return (gated @ w2.T if res is None else _add_gemm(gated, w2.T, res, "add_w2")), preact, gated


def _mlp_backward(x, w13, w2, preact, dy, gated=None):
    # dgated = dy w2 stays in the accumulator: the epilogue writes the gate's gradient (interleaved as preact) and,
    # where the forward's gate output was not kept, that output again, which w2's gradient needs.
    if gated is None:
        dpre, gated = _quack().gemm_dact(dy, w2, preact, activation="swiglu", tuned=False,
                                         config=_config("dgated"))
    else:
        # quack's dynamic scheduler: 0.896 ms against 0.912 without at 131,072 tokens on an H100 (kernels.md).
        dpre = _library().dswiglu_epi(dy, w2, preact, tuned=False, dynamic_scheduler=True,
                                      config=_config("dgated"))["D"]
    return dpre @ w13, dpre.T @ x, dy.T @ gated


@torch.library.custom_op("slab::swiglu_mlp", mutates_args=())
def swiglu_mlp_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, res: torch.Tensor | None = None,
                  keep_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w2(silu(w1 x) * w3 x)`` for x (M, d), w13 (2F, d) holding w1's and w3's rows in turn, w2 (d, F), plus res
    (M, d) where given, added in w2's GEMM (quack's gemm_add); also the pre-activation (M, 2F) the backward reads and
    the gate's output (M, F), which the backward reads too with ``keep_gate``."""
    return _mlp_forward(x, w13, w2, res)


@swiglu_mlp_op.register_fake
def _(x, w13, w2, res=None, keep_gate=False):
    m = x.shape[0]
    return x.new_empty(m, w2.shape[0]), x.new_empty(m, w13.shape[0]), x.new_empty(m, w2.shape[1])


@torch.library.custom_op("slab::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_backward_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, preact: torch.Tensor,
                           dy: torch.Tensor, gated: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dw13, dw2 of ``swiglu_mlp_op`` for the output's gradient dy (M, d), from the forward's gate output where
    given."""
    return _mlp_backward(x, w13, w2, preact, dy, gated)


@swiglu_mlp_backward_op.register_fake
def _(x, w13, w2, preact, dy, gated=None):
    return torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2)


def _mlp_save(ctx, inputs, output):
    # The callers use only y: eager autograd would otherwise hand the backward a zero (M, 2F) gradient for preact,
    # written in full, and add it.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])  # the backward's own read, not a result
    ctx.save_for_backward(*inputs[:3], output[1], output[2] if inputs[4] else None)
    ctx.residual = inputs[3] is not None


def _mlp_op_backward(ctx, dy, dpreact, _dgated):
    x, w13, w2, preact, gated = ctx.saved_tensors
    dres = dy if ctx.residual else None  # res is added as it is
    if dy is not None:
        dx, dw13, dw2 = swiglu_mlp_backward_op(x, w13, w2, preact, dy.contiguous(), gated)
    else:
        dx, dw13, dw2 = torch.zeros_like(x), torch.zeros_like(w13), torch.zeros_like(w2)
    if dpreact is not None:  # preact = x w13^T
        dx, dw13 = dx + dpreact @ w13, dw13 + dpreact.T @ x
    return dx, dw13, dw2, dres, None


swiglu_mlp_op.register_autograd(_mlp_op_backward, setup_context=_mlp_save)


def _interleaved(w1: torch.Tensor, w3: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One (2F, d) weight with w1's and w3's rows in turn, in ``dtype``: quack's gated epilogues pair neighbouring
    columns."""
    return torch.stack((w1, w3), dim=1).flatten(0, 1).to(dtype)


def swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)`` over x (..., d) on the epilogue GEMMs, in x's dtype
    (callers check ``epilogues_usable`` first), plus ``residual`` (..., d) in w2's GEMM where given; the weights'
    gradients reach w1, w3, w2 as they are."""
    res = None if residual is None else residual.to(x.dtype).reshape(-1, residual.shape[-1]).contiguous()
    # The flag is read here, not in the op's autograd: torch.compile guards this function's reads.
    y, *_ = swiglu_mlp_op(x.reshape(-1, x.shape[-1]).contiguous(), _interleaved(w1, w3, x.dtype), w2.to(x.dtype),
                          res, MLP_KEEPS_GATE)
    return y.view(*x.shape[:-1], w2.shape[0])


# --- a projection that writes into the residual stream, the add in its epilogue -------------------------------------
# The mixer's output projection and the MLP's w2 (``swiglu_mlp``'s residual) on quack's gemm_add, which reads the
# residual in the epilogue: the next norm then reads one tensor, not the residual and the projection to add. cuBLAS's
# addmm (tried in the thirtieth session) first copies the residual into its output, a pass of its own. Taken under
# "gemm" (``models.lm.Block.residual_gemm``) since the thirty-fifth session: lightning's training +1.0% and +1.5% on an
# H100 with the autotuner's tiles, now pinned in TILES.


@torch.library.custom_op("slab::linear_add", mutates_args=())
def linear_add_op(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + y w^T`` for y (..., k), w (d, k), x (..., d), all contiguous, in x's shape, from one GEMM."""
    return _add_gemm(y.view(-1, y.shape[-1]), w.T, x.view(-1, x.shape[-1]), "add_wo").view(x.shape)


@linear_add_op.register_fake
def _(y, w, x):
    return torch.empty_like(x)


def _linear_add_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])


def _linear_add_backward(ctx, dout):
    y, w = ctx.saved_tensors
    flat = dout.reshape(-1, dout.shape[-1])
    return (flat @ w).view(y.shape), flat.T @ y.reshape(-1, y.shape[-1]), dout


linear_add_op.register_autograd(_linear_add_backward, setup_context=_linear_add_save)


def linear_add(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + F.linear(y, w)`` over y (..., k), x (..., d) with the add in the GEMM's epilogue, in x's dtype (callers
    check ``epilogues_usable`` first)."""
    return linear_add_op(y.to(x.dtype).contiguous(), w.to(x.dtype), x.contiguous())


# --- a projection and its SiLU (lightning's q, k, v) ----------------------------------------------------------------


@torch.library.custom_op("slab::linear_silu", mutates_args=())
def linear_silu_op(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x w^T`` (M, N) for x (M, d), w (N, d), and its SiLU, from one GEMM."""
    pre, post = _quack().gemm_act(x, w.T, activation="silu", store_preact=True, tuned=False,
                                  config=_config("silu"))
    return pre, post


@linear_silu_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], w.shape[0])


def _silu_save(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # as _mlp_save: no zero gradient for the unused pre-activation
    ctx.save_for_backward(*inputs, output[0])


def _silu_op_backward(ctx, dpre, dpost):
    # aten's SiLU gradient: one kernel in eager (in fp32 inside, as torch's SiLU), one fused pass under torch.compile.
    x, w, pre = ctx.saved_tensors
    grad = torch.ops.aten.silu_backward(dpost, pre) if dpost is not None else None
    if dpre is not None:
        grad = dpre if grad is None else grad + dpre
    if grad is None:
        return torch.zeros_like(x), torch.zeros_like(w)
    return grad @ w, grad.T @ x


linear_silu_op.register_autograd(_silu_op_backward, setup_context=_silu_save)


def linear_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.silu(F.linear(x, w))`` over x (..., d) on one epilogue GEMM, in x's dtype (callers check
    ``epilogues_usable`` first)."""
    _, post = linear_silu_op(x.reshape(-1, x.shape[-1]).contiguous(), w.to(x.dtype))
    return post.view(*x.shape[:-1], w.shape[0])


# --- the head and its loss (quack's scaled-exp linear cross-entropy) ------------------------------------------------
# quack 0.6.5's pipeline: per chunk of tokens, the logits GEMM's epilogue writes exp(logit - a per-tile offset) in bf16
# with the rows' partial sums, so that no row pass reads the logits back (kernels.fused.triton_ce's Triton pass, 8 ms of
# the 135M lightning step on an H100); the two gradient GEMMs scale that tile on load (quack's A-operand transforms).


#: Tokens a chunk of the scaled-exp loss takes: on an H100 at 131,072 tokens its forward + backward took 34.72 ms in
#: chunks of 4,096, 33.31 in 8,192 and 33.22 in 16,384, against 36.07 for kernels.fused's (docs/bench/kernels.md).
LOSS_CHUNK_TOKENS = 8192
#: Width of the logits GEMM's tiles, also the span of each row's offset k (None: quack's pick, 256 for V 32,000). 128
#: won all five alternated training pairs on H100s (+0.4% to +1.5% for lightning, docs/bench/kernels.md) at no memory
#: cost; V is a multiple of 128 wherever this loss runs (loss_usable).
LOSS_TILE_N = 128


@functools.cache
def _lce():
    """quack's linear cross-entropy module, or None where it does not import."""
    if _quack() is None:
        return None
    try:
        from quack import linear_cross_entropy
    except Exception as exc:
        log.warning("quack's linear cross-entropy does not import (%s: %s); the loss runs on kernels.fused",
                    type(exc).__name__, exc)
        return None
    return linear_cross_entropy


@torch.compiler.assume_constant_result
def _lce_ready() -> bool:
    """Whether quack's linear cross-entropy imports (a constant to torch.compile)."""
    return _lce() is not None


def _loss_fits(vocab: int) -> bool:
    """Whether quack's pipeline imports and takes ``vocab`` classes (its tiles over the vocabulary are 128 wide)."""
    return not vocab % 128 and _lce_ready()


def loss_ready(device: torch.device, vocab: int) -> bool:
    """Whether training's head + loss over ``vocab`` classes runs on quack's pipeline on this device (as
    ``loss_usable`` decides for a bf16 input there)."""
    return epilogues_ready(device) and _loss_fits(vocab)


def loss_usable(x: torch.Tensor, weight: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> bool:
    """Whether ``linear_cross_entropy_epilogue`` takes x (..., d) and the head's weight (V, d): x bf16 (the autocast
    dtype) on a Hopper GPU with quack installed, V a multiple of 128, d of 16, chunks of a multiple of 128 tokens."""
    vocab = weight.shape[0]
    return (x.dtype == torch.bfloat16 and not chunk_tokens % 128 and epilogues_usable(x, vocab)
            and _loss_fits(vocab))


def linear_cross_entropy_epilogue(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  ignore_index: int = -100, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of x (..., d) @ weight (V, d)^T against targets x.shape[:-1] on quack's
    scaled-exp pipeline (callers check ``loss_usable`` first); 0 where every target is ignored."""
    from quack.linear_cross_entropy import scaled_exp_linear_cross_entropy  # imported: loss_usable held

    d = x.shape[-1]
    t = targets.reshape(-1)
    # The sum, then the mean by hand: quack's own mean divides by the count unguarded (NaN for an all-ignored batch).
    total = scaled_exp_linear_cross_entropy(x.reshape(-1, d), weight.to(x.dtype), t, chunk_size=chunk_tokens,
                                            ignore_index=ignore_index, reduction="sum", tile_n1=LOSS_TILE_N)
    return total / (t != ignore_index).sum().clamp_min(1)


# --- a block's tail: output projection, residual add, RMSNorm and SwiGLU MLP in one op -------------------------------
# The norm between the mixer and the MLP is deferred (quack's "Coda" block epilogues): the output projection's GEMM adds
# the residual and writes both the new residual stream h and h * weight, with the row sums of h^2; the MLP's first GEMM
# multiplies each row by rstd = (mean h^2 + eps)^-1/2 before its gate, as norm(h) W^T = rstd (h * weight) W^T; w2's GEMM
# adds h (quack's gemm_add since the thirty-fourth session; cuBLAS's beta = 1 before), so the op returns the block's
# output. In the backward the gate's gradient GEMM also sums d(pre-activation) * (unscaled pre-activation) per row, the
# gradient of rstd, and the MLP's input-gradient GEMM applies the norm's backward and adds the residual's gradient.
# So neither the norm's forward nor its backward is a pass of its own, and neither the projection's nor the MLP's
# output goes through memory on its own.
#
# Why the block's output and not h and the MLP's output apart, as measured first (9d3a8b4, an H100): that op alone was
# 4% faster than the "gemm" tail, but training was not. Its profile showed the next block's norm, whose input was then h
# + MLP, with its backward in two kernels (0.39 + 0.23 ms; one of 0.28-0.34 a norm before). This form hands the next
# norm one tensor, as the unfused blocks do: checked on an H100 (worst error ratio 1.08 to plain bf16's), lightning's
# training +0.1% to +1.2% in four pairs, the split still there. Its cause, found on the CPU with inductor's scheduler on
# fake CUDA tensors (docs/bench/tail_fusion_probe.py): the op's inputs flattened to (B*T, d) outside it, so the gradient
# it hands back was added to the norm's on (B*T, d) loops, whose memory accesses inductor does not match with the norm's
# (B, T, d) reductions. The op now takes and returns (B, T, d) (``residual_norm_mlp``): on an H100 (thirty-fourth
# session) the norm's backward ran as one kernel behind it, yet training gained +0.0% and +0.3% (kernels.md).


def _library():
    """The epilogues of the tail and the SwiGLU's backward (``kernels.quack_epilogues``); only called where
    ``epilogues_usable`` held."""
    from kernels import quack_epilogues

    return quack_epilogues


def _tail_forward(y, x, wo, wn, w13, w2, eps: float):
    lib = _library()
    shape, d = x.shape, x.shape[-1]
    y, x = y.view(-1, d), x.view(-1, d)
    out = lib.rms_partial_epi(y, wo.T, x, weight=wn, tuned=False, config=_config("residual"))
    hw, h, sqsum = out["D"], out["resid_out"], out["sqsum"]
    rstd = torch.rsqrt(sqsum / h.shape[1] + eps)
    out = lib.rstd_gated_preact_mod("swiglu")(hw, w13.T, rstd=rstd, tuned=False, config=_config("rstd_gated"))
    preact, gated = out["D"], out["postact"]
    # h added in w2's epilogue (quack's gemm_add): cuBLAS's addmm first copied h into its output, 0.13 ms a layer.
    return _add_gemm(gated, w2.T, h, "add_w2").view(shape), h, hw, preact, gated, rstd


def _tail_backward(y, h, hw, preact, gated, rstd, wo, wn, w13, w2, dout):
    lib = _library()
    y_shape, x_shape = y.shape, dout.shape
    y, dout = y.view(h.shape), dout.view(h.shape)
    # D: the gradient of the unscaled pre-activation (rstd applied); dsum: sum over the row of d(pre) * unscaled pre,
    # the gradient of rstd. The gate's output, which w2's gradient reads, comes from the forward.
    out = lib.dswiglu_rstd_epi(dout, w2, preact, rstd=rstd, tuned=False, dynamic_scheduler=True,
                               config=_config("dgated_rstd"))
    dpre, dsum = out["D"], out["dsum"]
    corr = dsum * rstd.pow(3) / -h.shape[1]  # d rstd / d h = -rstd^3 h / d
    # dh = d(h * weight) * weight + corr * h + the output's gradient (h is added into it); dw: sum of d(hw) * h.
    out = lib.rms_bwd_apply_epi(dpre, w13, dout, y=h, w=wn, corr=corr, tuned=False, config=_config("norm_bwd"))
    dh, dwn = out["D"], out["dw"]
    return (dh @ wo).view(y_shape), dh.view(x_shape), dh.T @ y, dwn, dpre.T @ hw, dout.T @ gated


@torch.library.custom_op("slab::residual_norm_mlp", mutates_args=())
def residual_norm_mlp_op(y: torch.Tensor, x: torch.Tensor, wo: torch.Tensor, wn: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """``h + w2(SwiGLU(RMSNorm(h) w13^T))`` with ``h = x + y wo^T``, for y, x (..., d) contiguous, in x's shape; also
    h, h * weight (M, d), the unscaled pre-activation, the gate's output and rstd (fp32), which the backward reads."""
    return _tail_forward(y, x, wo, wn, w13, w2, eps)


@residual_norm_mlp_op.register_fake
def _(y, x, wo, wn, w13, w2, eps):
    d = x.shape[-1]
    m = x.numel() // d
    return (torch.empty_like(x), x.new_empty(m, d), x.new_empty(m, d), x.new_empty(m, w13.shape[0]),
            x.new_empty(m, w2.shape[1]), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("slab::residual_norm_mlp_backward", mutates_args=())
def residual_norm_mlp_backward_op(y: torch.Tensor, h: torch.Tensor, hw: torch.Tensor, preact: torch.Tensor,
                                  gated: torch.Tensor, rstd: torch.Tensor, wo: torch.Tensor, wn: torch.Tensor,
                                  w13: torch.Tensor, w2: torch.Tensor, dout: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    """dy, dx, dwo, dweight, dw13, dw2 of ``residual_norm_mlp_op`` for the gradient of its output."""
    return _tail_backward(y, h, hw, preact, gated, rstd, wo, wn, w13, w2, dout)


@residual_norm_mlp_backward_op.register_fake
def _(y, h, hw, preact, gated, rstd, wo, wn, w13, w2, dout):
    return (torch.empty_like(y), torch.empty_like(dout), torch.empty_like(wo),
            torch.empty_like(wn, dtype=torch.float32), torch.empty_like(w13), torch.empty_like(w2))


def _tail_save(ctx, inputs, output):
    y, x, wo, wn, w13, w2, eps = inputs
    _, h, hw, preact, gated, rstd = output
    ctx.save_for_backward(y, h, hw, preact, gated, rstd, wo, wn, w13, w2)
    ctx.mark_non_differentiable(h, hw, preact, gated, rstd)  # the backward's own reads, not results
    ctx.set_materialize_grads(False)  # as _mlp_save: no zero gradients written for them


def _tail_op_backward(ctx, dout, *_unused):
    if dout is None:
        return (None,) * 7
    dy, dx, dwo, dwn, dw13, dw2 = residual_norm_mlp_backward_op(*ctx.saved_tensors, dout.contiguous())
    return dy, dx, dwo, dwn, dw13, dw2, None


residual_norm_mlp_op.register_autograd(_tail_op_backward, setup_context=_tail_save)


def residual_norm_mlp(y: torch.Tensor, x: torch.Tensor, wo: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A block's tail on the epilogue GEMMs: ``h + MLP(RMSNorm(h))`` with ``h = x + F.linear(y, wo)``, for y, x
    (..., d) in x's dtype (callers check ``epilogues_usable`` first)."""
    # y and x go in with their (B, T, d) shape, and the result comes out in it: flattened here, they split the next
    # block's first norm's backward in two kernels (see this section's head).
    out, *_ = residual_norm_mlp_op(y.to(x.dtype).contiguous(), x.contiguous(), wo.to(x.dtype), norm_weight.float(),
                                   _interleaved(w1, w3, x.dtype), w2.to(x.dtype), float(eps))
    return out


def residual_norm_mlp_reference(y: torch.Tensor, x: torch.Tensor, wo: torch.Tensor, norm_weight: torch.Tensor,
                                eps: float, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """What ``residual_norm_mlp`` computes, in plain PyTorch."""
    h = x + F.linear(y, wo)
    return h + swiglu_mlp_reference(F.rms_norm(h, (h.shape[-1],), norm_weight, eps), w1, w3, w2)


def swiglu_mlp_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """What ``swiglu_mlp`` computes, in plain PyTorch (the unfused modules' arithmetic)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

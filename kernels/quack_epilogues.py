"""The GEMM epilogues and A-operand transforms of our own on quack, beside the ones of its fused-block library we use;
imported only where quack-kernels and its CUTLASS DSL are (``gemm_epilogue._library``).

A block's tail (``kernels.gemm_epilogue.residual_norm_mlp``): quack's gate's-gradient epilogue for a deferred norm
(``dgated_rstd_preact_mod``) also stores the gate's output, which w2's weight gradient reads. The tail keeps that output
from its forward instead (the forward's GEMM writes it anyway, for w2's forward), so ``dswiglu_rstd_epi`` leaves the
store out: one (M, F) write fewer a layer, for its memory.

Lightning's q, k, v SiLU with its derivative kept (``kernels.gemm_epilogue.linear_silu``, opt-in): the forward's
epilogue writes SiLU's derivative at the pre-activation beside the SiLU (``silu_dsilu_epi``), and the backward's two
GEMMs multiply the output's gradient by it as they load it (``dsilu_backward``), so no pass writes the pre-activation's
gradient. quack ships A-operand values per row and k-tile, or per row block and k-element; ours is per element
(``ElementKind``), read from an (M, K) tensor of A's own layout or from its transpose.
"""

import cutlass.cute as cute
import torch
from quack.activation import dswiglu, sigmoid
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.library import identity_epi, rms_bwd_apply_epi, rms_partial_epi, rstd_gated_preact_mod
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, ColVecReduce
from quack.operand_transform import a_transform
from quack.operand_transform.kinds import ARG_KINDS, StripKind, _StripArg, _StripAux, strip_geometry


@gemm_epilogue(ops={"rstd": ColVecLoad("rstd")}, reduces={"dsum": ColVecReduce("dsum")}, mode="packed_cd_b16x2")
def dswiglu_rstd_epi(acc, c, rstd):
    """The gate's gradient for s = SwiGLU(rstd * GU): acc = ds, c = the unscaled pre-activation GU (gate and up
    interleaved). D = the gradient of GU (rstd applied), dsum = the row's sum of d(rstd GU) * GU (rstd's gradient)."""
    g, u = unpack(c)
    gs, us = g * rstd, u * rstd
    dgs, dus, _ = dswiglu(gs, us, acc)
    return {"D": pack(dgs * rstd, dus * rstd), "dsum": dgs * g + dus * u}


@gemm_epilogue(outputs=("postact",))
def silu_dsilu_epi(acc):
    """D = SiLU's derivative at acc, sigmoid(acc) (1 + acc (1 - sigmoid(acc))); postact = SiLU(acc)."""
    s = sigmoid(acc)
    post = acc * s
    return {"D": s + post * (1.0 - s), "postact": post}


class _KInnerAux(_StripAux):
    """quack's strip staging with the k axis inner: an element per value, read from an (M, K) row-major tensor (its
    own geometry puts m inner whenever gran_m <= gran_k, which for one value an element means a (K, M) tensor)."""

    def _geometry(self):
        gran_m, g_m, gran_k, g_k, _ = strip_geometry(1, 1, self.gemm.cta_tile_shape_mnk[0],
                                                     self.gemm.cta_tile_shape_mnk[2])
        return gran_m, g_m, gran_k, g_k, True


class _KInnerArg(_StripArg):
    def __init__(self, gemm, gran_m, gran_k):
        super().__init__(gemm, gran_m, gran_k)
        self.aux = _KInnerAux(gemm, gran_m, gran_k)


class ElementKind(StripKind):
    """A runtime operand of one value per element of A (M, K), an (M, K) row-major tensor in A's dtype."""

    def __init__(self):
        super().__init__(gran_m=1, gran_k=1)

    def device_arg(self, gemm):
        return _KInnerArg(gemm, 1, 1)

    def host_view(self, A, value, tile_m, tile_k):
        """The (tile_K, tile_M, M / tile_M, K / tile_K, 1) view of value the aux slot's TMA reads, a box a tile."""
        m, k = A.shape
        assert value.dtype == A.dtype and value.is_contiguous() and tuple(value.shape) == (m, k)
        assert m % tile_m == 0 and k % tile_k == 0, f"({m}, {k}) must be whole ({tile_m}, {tile_k}) tiles"
        return value.view(m // tile_m, tile_m, k // tile_k, tile_k).permute(3, 1, 0, 2).unsqueeze(-1)

    def host_fake(self, a_dtype, tile_m, tile_k):
        gm, rk = cute.sym_int(), cute.sym_int()
        stride = (1, cute.sym_int64(divisibility=8), cute.sym_int64(divisibility=8), tile_k, 1)
        return cute.runtime.make_fake_tensor(a_dtype, (tile_k, tile_m, gm, rk, 1), stride=stride, assumed_align=16)


# Registered by name, as @a_transform's args refer to kinds: A (M, K) with its values (M, K), and A the transpose of
# an (K, M) tensor with its values (K, M) (quack's own strip geometry, one value an element).
ARG_KINDS.setdefault("slab_element", ElementKind())
ARG_KINDS.setdefault("slab_element_t", StripKind(gran_m=1, gran_k=1))


@a_transform(vec_size=8, args={"u": "slab_element"})
def scale_a(x, u):
    """A * U elementwise, U of A's shape."""
    return x * u


@a_transform(vec_size=8, args={"u": "slab_element_t"})
def scale_a_t(x, u):
    """A * U elementwise, A and U given transposed."""
    return x * u


def dsilu_backward(dpost: torch.Tensor, dsilu: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                   config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx and dw of ``post = SiLU(x w^T)`` for the output's gradient dpost (M, N), from the derivative dsilu (M, N) the
    forward kept: (dpost * dsilu) w and (dpost * dsilu)^T x, the product taken as each GEMM loads dpost."""
    dx = identity_epi(dpost, w, transform_a=scale_a, transform_operands={"u": dsilu}, tuned=False, config=config)
    dw = identity_epi(dpost.T, x, transform_a=scale_a_t, transform_operands={"u": dsilu}, tuned=False, config=config)
    return dx["D"], dw["D"]


__all__ = ["dsilu_backward", "dswiglu_rstd_epi", "rms_bwd_apply_epi", "rms_partial_epi", "rstd_gated_preact_mod",
           "silu_dsilu_epi"]

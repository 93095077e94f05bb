"""The GEMM epilogues of a block's tail (``kernels.gemm_epilogue.residual_norm_mlp``), as quack's fused-block library
gives them, and two of our own for the SwiGLU's backward; imported only where quack-kernels and its CUTLASS DSL are
(``gemm_epilogue._library``).

quack's gate's-gradient epilogues (``dgated_mod``, ``dgated_rstd_preact_mod``) also store the gate's output, which w2's
weight gradient reads. Where the forward's output is kept instead (the forward's GEMM writes it anyway, for w2's
forward), ``dswiglu_epi`` and ``dswiglu_rstd_epi`` leave the store out: one (M, F) write fewer a layer, for its memory.
"""

from quack.activation import dswiglu
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.library import rms_bwd_apply_epi, rms_partial_epi, rstd_gated_preact_mod
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import ColVecLoad, ColVecReduce


@gemm_epilogue(mode="packed_cd_b16x2")
def dswiglu_epi(acc, c):
    """The gate's gradient for s = SwiGLU(GU): acc = ds, c = the pre-activation GU (gate and up interleaved). D = the
    gradient of GU, interleaved as GU is."""
    g, u = unpack(c)
    dg, du, _ = dswiglu(g, u, acc)
    return {"D": pack(dg, du)}


@gemm_epilogue(ops={"rstd": ColVecLoad("rstd")}, reduces={"dsum": ColVecReduce("dsum")}, mode="packed_cd_b16x2")
def dswiglu_rstd_epi(acc, c, rstd):
    """The gate's gradient for s = SwiGLU(rstd * GU): acc = ds, c = the unscaled pre-activation GU (gate and up
    interleaved). D = the gradient of GU (rstd applied), dsum = the row's sum of d(rstd GU) * GU (rstd's gradient)."""
    g, u = unpack(c)
    gs, us = g * rstd, u * rstd
    dgs, dus, _ = dswiglu(gs, us, acc)
    return {"D": pack(dgs * rstd, dus * rstd), "dsum": dgs * g + dus * u}


__all__ = ["dswiglu_epi", "dswiglu_rstd_epi", "rms_bwd_apply_epi", "rms_partial_epi", "rstd_gated_preact_mod"]

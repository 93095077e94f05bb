"""The language model shared by every architecture; only the token mixer differs between them.

Token embedding, ``n_layers`` blocks (pre-RMSNorm, mixer, residual; pre-RMSNorm, SwiGLU MLP, residual),
a final RMSNorm and an untied head. Layer ``i`` uses the mixer named by ``config.layer_kinds[i]``. Under
autocast the residual stream is kept in the autocast dtype.
Initialisation follows GPT-2: normal(0, 0.02) weights, and residual output projections (a mixer's
``wo``/``out_proj``, the MLP's ``w2``) scaled by 1/sqrt(2 n_layers) so the residual stream does not grow
with depth.

``kernels`` picks which parts of the shell run on the fused kernels of ``kernels.fused`` (``KERNELS``):
"torch", none (plain modules, the reference); "loss", only the head + loss in training, fused on CUDA tensors and
plain elsewhere; "gemm" (compiled training's default), the head + loss, the SwiGLU MLP and lightning's q, k, v SiLU
in the epilogues of quack's GEMMs where ``kernels.gemm_epilogue`` takes them (a Hopper GPU), the loss as "loss" does
elsewhere; "auto", the RMSNorms and the SwiGLU gate as well, fused on CUDA; "triton", all of them fused even off CUDA
(under TRITON_INTERPRET=1, for tests). A fused head + loss never materialises the logits in training. Parameters are
the same either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused import linear_cross_entropy, rms_norm, swiglu
from kernels.gemm_epilogue import (epilogues_usable, linear_add, linear_cross_entropy_epilogue, loss_usable,
                                   residual_norm_mlp, swiglu_mlp)
from models.config import ModelConfig
from models.mixers import HGRN2, Lightning, Mamba2, Softmax

MIXERS = {"S": Softmax, "L": Lightning, "H": HGRN2, "M": Mamba2}

INIT_STD = 0.02
#: Which of the LM shell's norms, SwiGLU gate and head + loss run fused (see the module docstring).
KERNELS = ("torch", "loss", "gemm", "auto", "triton")
#: Last name of the linear layers that write into the residual stream (GPT-2 scaled init).
RESIDUAL_OUT = ("wo", "out_proj", "w2")


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose output keeps the input's dtype (bf16 on the residual stream under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) in x's dtype; the statistics are taken in fp32 either way."""
        # With an fp32 weight on a bf16 input PyTorch skips its fused kernel and returns fp32.
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(SiLU(w1 x) * w3 x)``, no biases."""

    def __init__(self, d_model: int, hidden: int, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d), plus ``residual`` where given (in w2's GEMM under "gemm")."""
        if self.kernels == "gemm" and epilogues_usable(x, self.w1.out_features):
            return swiglu_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight, residual)
        if self.kernels in ("auto", "triton"):
            y = self.w2(swiglu(self.w1(x), self.w3(x), backend=self.kernels))
        else:
            y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y if residual is None else residual + y


class Block(nn.Module):
    """One residual block: pre-norm token mixer, then pre-norm SwiGLU MLP."""

    #: Under "gemm", whether the mixer's output projection, the residual add, the second norm and the MLP run as one op
    #: on the epilogue GEMMs (``kernels.gemm_epilogue.residual_norm_mlp``) where it is usable. Off: on an H100 the op
    #: was 4% faster alone, lightning's training +0.0% to +1.2% in six pairs (docs/bench/kernels.md), +0.0% and +0.3%
    #: since the next norm's backward no longer splits behind it (0b679e3), for 5 GiB more memory.
    fused_tail = False
    #: Under "gemm", whether the two residual adds run in the epilogues of the GEMMs whose outputs they add (the mixer's
    #: output projection, ``kernels.gemm_epilogue.linear_add``, and the MLP's w2) where usable: on an H100 lightning's
    #: training +1.0% and +1.5% (docs/bench/kernels.md), one (B*T, d) tensor less read by each next norm.
    residual_gemm = True

    def __init__(self, config: ModelConfig, layer_idx: int, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        kind = config.layer_kinds[layer_idx]
        self.norm1 = RMSNorm(config.d_model, eps=1e-6)
        self.mixer = MIXERS[kind](config, layer_idx)
        if kind == "L":  # its q, k, v SiLU in its projection's epilogue too, under "gemm"
            self.mixer.gemm_epilogues = kernels == "gemm"
        self.norm2 = RMSNorm(config.d_model, eps=1e-6)
        self.mlp = MLP(config.d_model, config.mlp_hidden(kind), kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        h = _norm(self.norm1, x, self.kernels)
        if (self.fused_tail or self.residual_gemm) and self._tail_on_epilogues(x):
            if self.fused_tail:
                mlp = self.mlp
                return residual_norm_mlp(self.mixer.mix(h), x, self.mixer.wo.weight, self.norm2.weight,
                                         self.norm2.eps, mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)
            x = linear_add(self.mixer.mix(h), self.mixer.wo.weight, x)
            return self.mlp(_norm(self.norm2, x, self.kernels), residual=x)
        x = x + self.mixer(h)
        return x + self.mlp(_norm(self.norm2, x, self.kernels))

    def _tail_on_epilogues(self, x: torch.Tensor) -> bool:
        """Whether the block's epilogue tails (fused_tail, residual_gemm) can run here: "gemm" kernels, a mixer whose
        output projection stands apart (``mix``), and the epilogue GEMMs usable for x."""
        return self.kernels == "gemm" and hasattr(self.mixer, "mix") and epilogues_usable(x, self.mlp.w1.out_features)


def _norm(norm: nn.RMSNorm, x: torch.Tensor, kernels: str) -> torch.Tensor:
    return rms_norm(x, norm.weight, norm.eps, backend=kernels) if kernels in ("auto", "triton") else norm(x)



class LM(nn.Module):
    """A causal language model built from a ``ModelConfig``."""

    #: Under "gemm", whether the head + loss run on quack's scaled-exp pipeline
    #: (``kernels.gemm_epilogue.linear_cross_entropy_epilogue``) where it is usable, rather than ``kernels.fused``'s:
    #: on an H100, 2.8 ms faster alone at 131,072 tokens, lightning's training +0.5% and +1.2%, softmax's +0.7%.
    epilogue_loss = True

    def __init__(self, config: ModelConfig, *, kernels: str = "torch"):
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {kernels!r}")
        self.config = config
        self.kernels = kernels
        # The kernels of the norms and the MLP: plain modules unless every fused kernel or the epilogue GEMMs were asked
        # for ("loss" fuses only the head + loss below).
        self.shell = kernels if kernels in ("auto", "triton", "gemm") else "torch"
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i, self.shell) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, eps=1e-6)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = out_std if name.rsplit(".", 1)[-1] in RESIDUAL_OUT else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, last_only: bool = False):
        """Logits (B, T, vocab) for token ids (B, T) and, with ``targets``, the mean cross-entropy.

        Targets equal to -100 are ignored (MQAR labels only its query positions). ``last_only`` computes
        the head on the last position alone (B, 1, vocab), all that greedy decoding needs. With targets and
        ``kernels`` other than "torch", the logits are None: the loss is computed without them.
        """
        x = self.trunk(idx)
        if last_only:
            x = x[:, -1:]
        x = _norm(self.norm_f, x, self.shell)
        # Training only: quack's loss-only path (no gradient) is not measured here, so evaluation keeps kernels.fused's.
        if (targets is not None and self.kernels == "gemm" and self.epilogue_loss and torch.is_grad_enabled()
                and loss_usable(x, self.head.weight)):
            return None, linear_cross_entropy_epilogue(x, self.head.weight, targets, ignore_index=-100)
        if targets is not None and self.kernels != "torch":
            backend = self.kernels if self.kernels in ("auto", "triton") else "auto"
            return None, linear_cross_entropy(x, self.head.weight, targets, ignore_index=-100, backend=backend)
        logits = self.head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """The residual stream (B, T, d) after the last block, before the final norm and the head."""
        x = self.embed(idx)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # The residual stream in the autocast dtype (bf16), as Megatron-LM keeps it by default: in fp32,
            # every residual add, norm and cast moved twice the bytes (6% of the 135M step on an H100).
            x = x.to(torch.get_autocast_dtype(device_type))
        for block in self.blocks:
            x = block(x)
        return x

    def num_params(self, nonembed: bool = False) -> int:
        """Parameters of the module; ``nonembed`` leaves out the token embedding and the head."""
        total = sum(p.numel() for p in self.parameters())
        if nonembed:
            total -= self.embed.weight.numel() + self.head.weight.numel()
        return total

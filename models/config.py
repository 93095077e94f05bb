"""Model shapes and their arithmetic: exact parameter counts and training FLOPs per token per architecture.

Every architecture shares one LM shell (token embedding, ``n_layers`` blocks of pre-RMSNorm + mixer and
pre-RMSNorm + SwiGLU MLP, final RMSNorm, untied head); only the mixer differs. The counts below are
derived from the same per-layer weight shapes that ``models.lm`` builds, so they equal
``sum(p.numel())`` of the module (the models tests check it).

How parameter counts are matched across architectures: every block is sized to about ``12 d^2`` weights,
as a standard Transformer block (``4 d^2`` attention + ``8 d^2`` MLP). The SwiGLU MLP takes whatever the
mixer leaves: ``d_ff = round((12 d^2 - mixer weights) / (3 d))`` to a multiple of 64 (16 below d=256).
So softmax gets the usual ``8/3 d``, lightning (``5 d^2``: fused q/k/v, gate, output) a narrower MLP, and
Mamba2 (expand 2, its in/out projections ``~6 d^2``) narrower still. Non-embedding counts of the five
architectures at the same ``d_model`` and ``n_layers`` are therefore within a few percent.

FLOPs convention (``FLOPS_CONVENTION``), after PaLM and MiniMax-01 (arXiv 2501.08313, §2.2):
``6 x`` every matmul weight (the LM head included, the embedding lookup excluded), plus per layer
``12 d T`` for softmax attention (both ``n^2`` products, no causal halving) and ``36 H K V`` for a linear
mixer's state work (``= 36 d d_h`` with ``K = V = d_h``: MiniMax's ``1/(2h)`` term). HGRN2 and Mamba2 are
counted the same way with their own state sizes. MiniMax's small non-matmul ``5/(18 d)`` term is left out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

ARCHS: tuple[str, ...] = ("softmax", "lightning", "hybrid", "hgrn2", "mamba2")

#: The single letter each mixer has in a layer pattern (``hybrid`` mixes L and S).
LAYER_KIND = {"softmax": "S", "lightning": "L", "hgrn2": "H", "mamba2": "M"}

FLOPS_CONVENTION = "6*matmul_weights(incl. head) + 12*d*T per softmax layer (full) + 36*H*K*V per linear layer"

#: Head width used when a plan gives ``params`` instead of a shape.
SHAPE_HEAD_DIM = 64
#: Width-to-depth ratio (d_model / n_layers) used when a plan gives ``params`` instead of a shape.
SHAPE_ASPECT = 64

#: Byte-level vocabulary: 256 bytes and the specials PAD, BOS, EOS, SEP (models.data defines them).
BYTE_VOCAB_SIZE = 260
#: Default vocabulary of the synthetic MQAR task (Zoology's setting).
MQAR_VOCAB_SIZE = 8192
#: Built-in data sources a plan may name (models.data implements them); anything else is a path.
DATA_SOURCES = ("stdlib", "passkey", "mqar")

MAMBA_EXPAND = 2
MAMBA_D_CONV = 4
MAMBA_D_STATE = 64


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one language model: everything ``models.lm`` needs to build it."""

    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hybrid: str = ""  # per-layer pattern of "L"/"S" for arch == "hybrid", else ""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        for name in ("d_model", "n_layers", "n_heads", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.arch == "hybrid":
            if len(self.hybrid) != self.n_layers or set(self.hybrid) - {"L", "S"}:
                raise ValueError(f"hybrid pattern {self.hybrid!r} must be {self.n_layers} letters of L/S")
        elif self.hybrid:
            raise ValueError(f"a hybrid pattern is only valid for arch 'hybrid', not {self.arch!r}")
        if "S" in self.layer_kinds and self.head_dim % 2:
            raise ValueError(f"softmax layers rotate pairs of channels (RoPE), so their heads need an even width; "
                             f"d_model {self.d_model} / n_heads {self.n_heads} is {self.head_dim}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (also the key/value width of linear mixers)."""
        return self.d_model // self.n_heads

    @property
    def layer_kinds(self) -> str:
        """One letter per layer: S softmax, L lightning, H HGRN2, M Mamba2."""
        if self.arch == "hybrid":
            return self.hybrid
        return LAYER_KIND[self.arch] * self.n_layers

    @property
    def mamba_d_inner(self) -> int:
        """Mamba2's inner width (expand x d_model)."""
        return MAMBA_EXPAND * self.d_model

    @property
    def mamba_d_state(self) -> int:
        """Mamba2's state size N per head (B and C width), capped by d_model for tiny models."""
        return min(MAMBA_D_STATE, self.d_model)

    def mixer_shapes(self, kind: str) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of one mixer of the given layer kind, named as ``models.mixers`` names them."""
        d, h = self.d_model, self.n_heads
        if kind == "S":
            return {"wqkv": (3 * d, d), "wo": (d, d)}
        if kind == "L":
            return {"wqkv": (3 * d, d), "wgate": (d, d), "wo": (d, d), "norm": (d,)}
        if kind == "H":
            return {"wq": (d, d), "wf": (d, d), "wi": (d, d), "wo": (d, d), "norm": (d,)}
        if kind == "M":
            di, n = self.mamba_d_inner, self.mamba_d_state
            conv = di + 2 * n
            return {
                "in_proj": (2 * di + 2 * n + h, d),
                "conv_weight": (conv, 1, MAMBA_D_CONV),
                "conv_bias": (conv,),
                "dt_bias": (h,),
                "A_log": (h,),
                "D": (h,),
                "norm": (di,),
                "out_proj": (d, di),
            }
        raise ValueError(f"unknown layer kind {kind!r}")

    def mlp_hidden(self, kind: str) -> int:
        """SwiGLU hidden width for a layer of this kind: what the mixer leaves of a 12 d^2 block."""
        d = self.d_model
        mixer = sum(math.prod(s) for s in self.mixer_shapes(kind).values())
        multiple = 64 if d >= 256 else 16
        return max(multiple, multiple * round((12 * d * d - mixer) / (3 * d) / multiple))


# Shapes whose weights are multiplied with activations (counted in 6N): matrices and the short conv.
_NON_MATMUL = {"norm", "conv_bias", "dt_bias", "A_log", "D"}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model: total, and without the token embedding and LM head."""

    total: int
    nonembed: int
    matmul: int  # weights that take part in a matmul (head included): the N of 6N


# Memoised: a big plan repeats the same few shapes thousands of times (ModelConfig is frozen, so hashable).
@functools.lru_cache(maxsize=4096)
def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of the model ``models.lm`` builds from ``cfg``."""
    d, v = cfg.d_model, cfg.vocab_size
    blocks = matmul = 0
    for kind in cfg.layer_kinds:
        shapes = cfg.mixer_shapes(kind)
        f = cfg.mlp_hidden(kind)
        mixer = sum(math.prod(s) for s in shapes.values())
        blocks += mixer + 3 * d * f + 2 * d  # mixer, SwiGLU (w1, w3, w2), two RMSNorms
        matmul += sum(math.prod(s) for k, s in shapes.items() if k not in _NON_MATMUL) + 3 * d * f
    nonembed = blocks + d  # final norm
    return ParamCounts(total=nonembed + 2 * v * d, nonembed=nonembed, matmul=matmul + d * v)


def mixer_flops_per_token(cfg: ModelConfig, kind: str, seq_len: int) -> int:
    """Training FLOPs per token of one layer's sequence mixing that no weight accounts for."""
    if kind == "S":
        return 12 * cfg.d_model * seq_len
    if kind in ("L", "H"):
        return 36 * cfg.n_heads * cfg.head_dim * cfg.head_dim
    if kind == "M":
        return 36 * cfg.mamba_d_state * cfg.mamba_d_inner
    raise ValueError(f"unknown layer kind {kind!r}")


@functools.lru_cache(maxsize=4096)
def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at context ``seq_len`` under ``FLOPS_CONVENTION``."""
    counts = count_params(cfg)
    return 6 * counts.matmul + sum(mixer_flops_per_token(cfg, k, seq_len) for k in cfg.layer_kinds)


def hybrid_pattern(value: str | int, n_layers: int) -> str:
    """Resolve a plan's ``hybrid`` cell to a per-layer pattern.

    An integer k puts softmax in every k-th layer (8 -> ``LLLLLLLS``: one softmax per seven lightning);
    a string of L/S is repeated over the layers (cut at the last layer). It must give at least one S.
    """
    text = str(value).strip().upper()
    if text.isdigit():
        k = int(text)
        if k < 1:
            raise ValueError(f"hybrid period must be >= 1, got {k}")
        pattern = "".join("S" if (i + 1) % k == 0 else "L" for i in range(n_layers))
    else:
        if not text or set(text) - {"L", "S"}:
            raise ValueError(f"hybrid must be an integer period or a pattern of L and S, got {value!r}")
        pattern = (text * (n_layers // len(text) + 1))[:n_layers]
    if "S" not in pattern:
        raise ValueError(f"hybrid {value!r} gives no softmax layer in {n_layers} layers")
    return pattern


def hybrid_period(value: str | int) -> int:
    """The layers after which a hybrid pattern repeats: k for a period k, else the shortest unit whose whole
    repeats spell the pattern ('LSLS' 2, 'LLSL' 4, 'LLLSLL' 6): as `hybrid_pattern` repeats it."""
    text = str(value).strip().upper()
    if text.isdigit():
        return int(text)
    n = len(text)
    if not n:
        raise ValueError(f"hybrid must be an integer period or a pattern of L and S, got {value!r}")
    return next(p for p in range(1, n + 1) if n % p == 0 and text == text[:p] * (n // p))


def shape_for_params(target_nonembed: float, layer_multiple: int = 1) -> tuple[int, int, int]:
    """Resolve a target non-embedding size to (d_model, n_layers, n_heads).

    The rule: about 12 d^2 weights per layer, d_model / n_layers = 64, d_model a multiple of 64, heads 64
    wide. So n_layers = round((N / (12 * 64^2))^(1/3)), d_model = 64 * round(sqrt(N / (12 l)) / 64).
    ``layer_multiple`` (a hybrid's period) rounds n_layers to a multiple of it instead, so that every size of a
    ladder holds whole periods of its pattern, and so one softmax share.
    """
    if not target_nonembed > 0:
        raise ValueError(f"params must be positive, got {target_nonembed}")
    if layer_multiple < 1:
        raise ValueError(f"layer_multiple must be >= 1, got {layer_multiple}")
    ideal = (target_nonembed / (12 * SHAPE_ASPECT**2)) ** (1 / 3)
    n_layers = layer_multiple * max(1, round(ideal / layer_multiple))
    d_model = SHAPE_HEAD_DIM * max(1, round(math.sqrt(target_nonembed / (12 * n_layers)) / SHAPE_HEAD_DIM))
    return d_model, n_layers, d_model // SHAPE_HEAD_DIM

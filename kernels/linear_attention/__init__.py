"""Gated linear attention, one entry point for lightning (constant decay), Mamba2 (per token) and HGRN2 (per channel).

Per head, S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t, with the log decay a_t <= 0 given
as (H,), (B, T, H) or (B, T, H, K). Backends: "naive" (recurrence, ground truth), "torch" (chunked PyTorch,
the CPU path), "triton" (chunked Triton kernels), "auto" (triton on CUDA tensors, torch elsewhere).
A positive log decay is refused (ValueError) by "naive" and "torch" only: "triton", and so "auto" on CUDA, does not
look, which would cost a host sync per call, and returns what the growing state gives, inf or NaN once it overflows.
"""

from __future__ import annotations

import contextlib

import torch

BACKENDS = ("auto", "triton", "torch", "naive")
#: Names of the three decay forms, by log_decay.dim().
DECAY_FORMS = {1: "constant", 3: "token", 4: "channel"}


def decay_form(log_decay: torch.Tensor) -> str:
    """Which decay a log_decay tensor encodes: "constant" (H,), "token" (B, T, H) or "channel" (B, T, H, K)."""
    try:
        return DECAY_FORMS[log_decay.dim()]
    except KeyError:
        raise ValueError(
            f"log_decay must have shape (H,), (B, T, H) or (B, T, H, K); got {tuple(log_decay.shape)}"
        ) from None


def _validate(q, k, v, log_decay, initial_state, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, time, heads, dim); got {getattr(x, 'shape', x)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, T, H, K); got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) with q's (B, T, H) = {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(log_decay, torch.Tensor) or not log_decay.is_floating_point():
        got = log_decay.dtype if isinstance(log_decay, torch.Tensor) else type(log_decay).__name__
        raise ValueError(f"log_decay must be a floating-point tensor; got {got}")
    if not (q.device == k.device == v.device == log_decay.device):
        raise ValueError("q, k, v and log_decay must be on one device")
    batch, time, heads, dk = q.shape
    if time < 1 or batch < 1 or heads < 1 or dk < 1 or v.shape[-1] < 1:
        raise ValueError(f"every dimension must be at least 1; got q {tuple(q.shape)}, v {tuple(v.shape)}")
    expected = {"constant": (heads,), "token": (batch, time, heads), "channel": (batch, time, heads, dk)}
    form = decay_form(log_decay)
    if tuple(log_decay.shape) != expected[form]:
        raise ValueError(
            f"log_decay with {log_decay.dim()} dims must have shape {expected[form]} for q {tuple(q.shape)}; "
            f"got {tuple(log_decay.shape)}"
        )
    if initial_state is not None:
        want = (batch, heads, dk, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            got = initial_state.dtype if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state must be a floating-point tensor (B, H, K, V) = {want}; got {got}")
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape (B, H, K, V) = {want}; got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError("initial_state must be on q's device")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend "auto" stands for: triton on CUDA tensors, torch elsewhere; other names pass through."""
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    return backend


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over (B, T, H, D) inputs; returns (o with v's dtype, fp32 final state or None)."""
    scale, backend = _checked(q, k, v, log_decay, initial_state, backend, scale)
    return _run(q, k, v, log_decay, scale, initial_state, output_final_state, backend)


def _checked(q, k, v, log_decay, initial_state, backend: str, scale: float | None) -> tuple[float, str]:
    """Validate the inputs; the scale (default 1 / sqrt(K)) and the backend "auto" stands for.

    A positive log decay (a state that grows) is refused by the naive and torch backends, outside torch.compile and
    vmap; the Triton backend does not look, since on the GPU the test would cost a pass over the decays and a wait
    for its answer every call.
    """
    _validate(q, k, v, log_decay, initial_state, backend)
    resolved = resolve_backend(backend, q)
    if resolved in ("naive", "torch") and _any_positive(log_decay):
        raise ValueError(f"log_decay must be <= 0 (a decay of at most 1); its largest value is {log_decay.max().item():.4g}")
    return (q.shape[-1] ** -0.5 if scale is None else scale), resolved


def _any_positive(log_decay: torch.Tensor) -> bool:
    """Whether a log decay is positive; False where the value cannot steer Python (torch.compile, vmap)."""
    if torch.compiler.is_compiling():  # a value-dependent branch would break the graph
        return False
    try:
        return bool((log_decay > 0).any())
    except RuntimeError:  # under vmap (packed Mamba2 members) a batched tensor has no single truth value
        return False


def _run(q, k, v, log_decay, scale, initial_state, output_final_state, backend: str):
    """The named backend on validated inputs."""
    if backend == "triton":
        # Imported here so that `import kernels` never pulls in triton.
        from .triton_chunk import linear_attention_triton

        return linear_attention_triton(q, k, v, log_decay, scale, initial_state, output_final_state)
    if backend == "naive":
        from .naive import linear_attention_naive as run
    else:
        from .torch_chunked import linear_attention_chunked as run
    # fp32 math as the Triton kernels do it, also under autocast (the models' forward on CUDA), which would run these
    # products in bf16. (Devices autocast does not know, as meta, have none to turn off.)
    device = q.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        return run(q, k, v, log_decay, scale, initial_state, output_final_state)


def linear_attention_packed(
    qkv: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linear_attention` of q, k, v packed as one (B, T, 3, H, D) tensor (a joint projection's output, viewed): the
    Triton kernels read it in place and write its gradient in that layout, with no copy that splits or stacks."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be a (batch, time, 3, heads, dim) tensor; got {getattr(qkv, 'shape', qkv)}")
    q, k, v = qkv.unbind(2)
    scale, backend = _checked(q, k, v, log_decay, initial_state, backend, scale)
    if backend == "triton" and log_decay.dim() != 4:  # per channel, the kernels read q, k, v dense
        from .triton_chunk import linear_attention_triton_packed

        return linear_attention_triton_packed(qkv, log_decay, scale, initial_state, output_final_state)
    return _run(q, k, v, log_decay, scale, initial_state, output_final_state, backend)


__all__ = ["BACKENDS", "decay_form", "linear_attention", "linear_attention_packed", "resolve_backend"]

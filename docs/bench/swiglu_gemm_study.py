"""A prototype for issue 8's next lever: SwiGLU's gate in the epilogues of Triton GEMMs, so that the MLP's
elementwise passes go away if the GEMMs keep cuBLAS's speed. In a 128k-token lightning 135M step on an H200 those
passes take 3.5 ms (forward) and 6.5 ms (backward) at 4.3-4.4 TB/s (docs/bench/kernels.md); the GEMMs they sit
between take about 1 ms each. The product does not use this; the script checks it and times it against cuBLAS plus
the compiled gate, as training runs them.

    TRITON_INTERPRET=1 python docs/bench/swiglu_gemm_study.py check   # small shapes, on CPU in the interpreter
    python docs/bench/swiglu_gemm_study.py check                     # the same on the GPU
    python docs/bench/swiglu_gemm_study.py time ['[{"BM": 128, ...}]']  # GPU: the 135M MLP, forward and backward
    python docs/bench/swiglu_gemm_study.py time tma ['[...]']          # the same, persistent kernels on TMA

Forward (`gate_fwd`): h1 = x W1^T and h3 = x W3^T, both products of a tile in one program, stored for the backward,
and g = silu(h1) h3 from the fp32 accumulators. Backward of the gate (`gate_bwd`): dg = dy W2 in the accumulator,
then dh1 = dg h3 silu'(h1) and dh3 = dg silu(h1) in the epilogue, so that dg is never written nor read again.
Bytes a layer saved at 131072 tokens, hidden 1792: about 0.94 GB each way against the unfused passes. The persistent
variants (`gate_fwd_tma`, `gate_bwd_tma`) do the same with one program per SM walking the tiles on tensor descriptors
(TMA loads and stores on Hopper), so that one tile's epilogue can overlap the next tile's loads.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

#: Launch settings `time` tries when given none: tile rows, tile columns (per product), K step, grouped rows, warps,
#: stages.
CONFIGS = [
    # Without spills on sm_90 (Triton 3.9's compile): 128 registers forward, 111 backward.
    dict(BM=128, BN=64, BK=64, GROUP=8, num_warps=8, num_stages=4),
    dict(BM=128, BN=64, BK=64, GROUP=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=64, BK=32, GROUP=8, num_warps=8, num_stages=5),
    # Wider tiles, which spill a little (24-64 bytes) in that compile.
    dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=32, GROUP=8, num_warps=8, num_stages=4),
    dict(BM=64, BN=128, BK=64, GROUP=8, num_warps=4, num_stages=4),
]


@triton.jit
def _tile_start(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """The first row and column of output tile number `tile` of (M, N), GROUP row tiles walked together so that their
    B tiles stay in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    in_group = GROUP * tiles_n
    first_m = (tile // in_group) * GROUP
    rows = min(tiles_m - first_m, GROUP)
    return (first_m + (tile % in_group) % rows) * BM, ((tile % in_group) // rows) * BN


@triton.jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """This program's rows and columns of the (M, N) output (`_tile_start`), and the offsets and mask of that tile in
    a row-major (M, N) tensor."""
    m0, n0 = _tile_start(tl.program_id(0), M, N, BM, BN, GROUP)
    rm = m0 + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    return rm, rn, rm.to(tl.int64)[:, None] * N + rn[None, :], (rm[:, None] < M) & (rn[None, :] < N)


@triton.jit
def _rows(a_ptr, rm, kk, M, K):
    """The (rows rm, columns kk) tile of a row-major (M, K) tensor, zero past its edges."""
    return tl.load(a_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                   other=0.0)


@triton.jit
def _gate_fwd_kernel(x_ptr, w1_ptr, w3_ptr, h1_ptr, h3_ptr, g_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr):
    """h1, h3 = x W1^T, x W3^T (x (M, K), W (N, K)) and g = silu(h1) h3, each (M, N)."""
    rm, rn, out, mask = _tile(M, N, BM, BN, GROUP)
    rk = tl.arange(0, BK)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    # W's rows read as the columns of a (BK, BN) tile: a transposed load, not a transposed dot result.
    w_cols = rn[None, :] * K
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = _rows(x_ptr, rm, kk, M, K)
        w_mask = (kk[:, None] < K) & (rn[None, :] < N)
        b1 = tl.load(w1_ptr + w_cols + kk[:, None], mask=w_mask, other=0.0)
        b3 = tl.load(w3_ptr + w_cols + kk[:, None], mask=w_mask, other=0.0)
        acc1 = tl.dot(a.to(DT), b1.to(DT), acc1)
        acc3 = tl.dot(a.to(DT), b3.to(DT), acc3)
    tl.store(h1_ptr + out, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
    tl.store(h3_ptr + out, acc3.to(h3_ptr.dtype.element_ty), mask=mask)
    g = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(g_ptr + out, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_grad(dg, h1, h3):
    """dh1 = dg h3 silu'(h1) and dh3 = dg silu(h1), fp32, from dg and the saved h1, h3."""
    h1 = h1.to(tl.float32)
    h3 = h3.to(tl.float32)
    s = tl.sigmoid(h1)
    return dg * h3 * s * (1.0 + h1 * (1.0 - s)), dg * h1 * s


@triton.jit
def _gate_bwd_kernel(dy_ptr, w2_ptr, h1_ptr, h3_ptr, dh1_ptr, dh3_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr):
    """dg = dy W2 (dy (M, K), W2 (K, N), the Linear(N, K) weight), then dh1 = dg h3 silu'(h1), dh3 = dg silu(h1)."""
    rm, rn, out, mask = _tile(M, N, BM, BN, GROUP)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = _rows(dy_ptr, rm, kk, M, K)
        b = tl.load(w2_ptr + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a.to(DT), b.to(DT), acc)
    h1 = tl.load(h1_ptr + out, mask=mask, other=0.0)
    dh1, dh3 = _gate_grad(acc, h1, tl.load(h3_ptr + out, mask=mask, other=0.0))
    tl.store(dh3_ptr + out, dh3.to(dh3_ptr.dtype.element_ty), mask=mask)
    tl.store(dh1_ptr + out, dh1.to(dh1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_fwd_tma_kernel(x_d, w1_d, w3_d, h1_d, h3_d, g_d, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, OUT: tl.constexpr,
                         PROGRAMS: tl.constexpr):
    """`_gate_fwd_kernel` as a persistent kernel on tensor descriptors (TMA on Hopper): PROGRAMS programs walk the
    tiles, the loop over tiles and K steps flattened so that the next tile's loads overlap this one's epilogue."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        m0, n0 = _tile_start(tile, M, N, BM, BN, GROUP)
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        acc3 = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = x_d.load([m0, k0]).to(DT)
            acc1 = tl.dot(a, w1_d.load([n0, k0]).to(DT).T, acc1)
            acc3 = tl.dot(a, w3_d.load([n0, k0]).to(DT).T, acc3)
        h1_d.store([m0, n0], acc1.to(OUT))
        h3_d.store([m0, n0], acc3.to(OUT))
        g_d.store([m0, n0], (acc1 * tl.sigmoid(acc1) * acc3).to(OUT))


@triton.jit
def _gate_bwd_tma_kernel(dy_d, w2_d, h1_d, h3_d, dh1_d, dh3_d, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, OUT: tl.constexpr,
                         PROGRAMS: tl.constexpr):
    """`_gate_bwd_kernel` as a persistent kernel on tensor descriptors, as `_gate_fwd_tma_kernel`."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        m0, n0 = _tile_start(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            acc = tl.dot(dy_d.load([m0, k0]).to(DT), w2_d.load([k0, n0]).to(DT), acc)
        dh1, dh3 = _gate_grad(acc, h1_d.load([m0, n0]), h3_d.load([m0, n0]))
        dh3_d.store([m0, n0], dh3.to(OUT))
        dh1_d.store([m0, n0], dh1.to(OUT))


#: Settings of the persistent TMA kernels (`time tma`), chosen to fit the pipeline and the epilogue's tiles in shared
#: memory.
TMA_CONFIGS = [
    dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=2),
    dict(BM=128, BN=128, BK=32, GROUP=8, num_warps=8, num_stages=4),
    dict(BM=128, BN=64, BK=64, GROUP=8, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, BK=64, GROUP=8, num_warps=8, num_stages=4),
    dict(BM=64, BN=128, BK=64, GROUP=8, num_warps=4, num_stages=3),
]


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


def _dot_dtype(dtype: torch.dtype):
    # The interpreter's dots take fp32 operands only (16-bit ones come out as garbage), as in kernels/linear_attention.
    return tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else _tl_dtype(dtype)


def _launch_tma(kernel, cfg: dict, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                blocks: list) -> None:
    """Launch a persistent TMA kernel over an (m, n) output on tensor descriptors of `blocks`, (tensor, block shape)
    pairs in the kernel's order: one program per SM, or per tile when there are fewer."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = [TensorDescriptor.from_tensor(t, block) for t, block in blocks]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
    programs = min(sms, triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]))
    kernel[(programs,)](*descs, m, n, k, **cfg, DT=_dot_dtype(dtype), OUT=_tl_dtype(dtype), PROGRAMS=programs)


def gate_fwd_tma(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, cfg: dict = TMA_CONFIGS[0]):
    """`gate_fwd` by the persistent TMA kernel."""
    (m, k), n = x.shape, w1.shape[0]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    h1, h3, g = (x.new_empty(m, n) for _ in range(3))
    _launch_tma(_gate_fwd_tma_kernel, cfg, m, n, k, x.dtype, x.device,
                [(x, [bm, bk]), (w1, [bn, bk]), (w3, [bn, bk]), (h1, [bm, bn]), (h3, [bm, bn]), (g, [bm, bn])])
    return h1, h3, g


def gate_bwd_tma(dy: torch.Tensor, w2: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, cfg: dict = TMA_CONFIGS[0]):
    """`gate_bwd` by the persistent TMA kernel."""
    (m, k), n = dy.shape, w2.shape[1]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)
    _launch_tma(_gate_bwd_tma_kernel, cfg, m, n, k, dy.dtype, dy.device,
                [(dy, [bm, bk]), (w2, [bk, bn]), (h1, [bm, bn]), (h3, [bm, bn]), (dh1, [bm, bn]), (dh3, [bm, bn])])
    return dh1, dh3


def _launch(kernel, m: int, n: int, cfg: dict, dtype: torch.dtype, *args) -> None:
    kernel[(triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)](*args, **cfg, DT=_dot_dtype(dtype))


def gate_fwd(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, cfg: dict = CONFIGS[0]):
    """(h1, h3, g) for x (M, K) and Linear weights w1, w3 (N, K): one Triton kernel."""
    m, k = x.shape
    n = w1.shape[0]
    h1, h3, g = (x.new_empty(m, n) for _ in range(3))
    _launch(_gate_fwd_kernel, m, n, cfg, x.dtype, x, w1, w3, h1, h3, g, m, n, k)
    return h1, h3, g


def gate_bwd(dy: torch.Tensor, w2: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, cfg: dict = CONFIGS[0]):
    """(dh1, dh3) for the MLP's output gradient dy (M, K), w2 (K, N) and the saved h1, h3: one Triton kernel."""
    m, k = dy.shape
    n = w2.shape[1]
    dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)
    _launch(_gate_bwd_kernel, m, n, cfg, dy.dtype, dy, w2, h1, h3, dh1, dh3, m, n, k)
    return dh1, dh3


# The whole MLP, w2(silu(x W1^T) x W3^T), as custom ops (opaque to torch.compile, as kernels.fused's are), so that the
# backward's first GEMM is gate_bwd's and dg never exists. `patch_mlp` puts it in place of models.lm.MLP's forward.
@torch.library.custom_op("slab_study::gate_mlp", mutates_args=())
def _gate_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h1, h3, g = gate_fwd(x, w1, w3, MLP_CONFIG)
    return g @ w2.T, h1, h3, g


@_gate_mlp.register_fake
def _(x, w1, w3, w2):
    hidden = x.new_empty(x.shape[0], w1.shape[0])
    return x.new_empty(x.shape[0], w2.shape[0]), hidden, torch.empty_like(hidden), torch.empty_like(hidden)


@torch.library.custom_op("slab_study::gate_mlp_bwd", mutates_args=())
def _gate_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  h1: torch.Tensor, h3: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()
    dh1, dh3 = gate_bwd(dy, w2, h1, h3, MLP_CONFIG)
    dx = dh1 @ w1
    dx.addmm_(dh3, w3)
    return dx, dh1.T @ x, dh3.T @ x, dy.T @ g


@_gate_mlp_bwd.register_fake
def _(dy, x, w1, w3, w2, h1, h3, g):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)


def _gate_mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output[1:])


def _gate_mlp_backward(ctx, dy, *_):
    return _gate_mlp_bwd(dy, *ctx.saved_tensors)


_gate_mlp.register_autograd(_gate_mlp_backward, setup_context=_gate_mlp_setup)

#: The launch settings the MLP's kernels take (`time` compares them).
MLP_CONFIG = CONFIGS[0]


def gate_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2(silu(x W1^T) * x W3^T) for x (..., d) on the prototype's kernels, in x's dtype (weights cast to it)."""
    d = x.shape[-1]
    w1, w3, w2 = (w.to(x.dtype) for w in (w1, w3, w2))
    return _gate_mlp(x.reshape(-1, d).contiguous(), w1, w3, w2)[0].view(*x.shape[:-1], w2.shape[0])


def patch_mlp() -> None:
    """models.lm.MLP computes its forward with gate_mlp (train_study.py's option gategemm)."""
    import models.lm as lm

    lm.MLP.forward = lambda self, x: gate_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)


def reference(x, w1, w3, w2, dy):
    """h1, h3, g, dh1, dh3 in fp32 by autograd: the gate's forward and its backward through w2."""
    x, w1, w3, w2, dy = (t.float() for t in (x, w1, w3, w2, dy))
    h1, h3 = (x @ w1.T).requires_grad_(), (x @ w3.T).requires_grad_()
    g = F.silu(h1) * h3
    (g @ w2.T).backward(dy)
    return h1.detach(), h3.detach(), g.detach(), h1.grad, h3.grad


def _inputs(m, k, n, device, dtype, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    w1, w3 = ((torch.randn(n, k, device=device, generator=gen) / k ** 0.5).to(dtype) for _ in range(2))
    w2 = (torch.randn(k, n, device=device, generator=gen) / n ** 0.5).to(dtype)
    dy = torch.randn(m, k, device=device, generator=gen).to(dtype)
    return x, w1, w3, w2, dy


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(cfgs=None) -> None:
    """Each setting's outputs against the fp32 reference, shapes with partial tiles, the plain kernels and the
    persistent TMA ones (given settings: both take them); fp32 and bf16 in the interpreter, bf16 on the GPU, whose fp32
    dots run in tf32 (errors of about 2e-3) and whose fp32 tiles may not fit shared memory; exits 1 on a failure."""
    device = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
    bad = 0
    # TMA needs rows of a multiple of 16 bytes: N 104 rather than 100 there.
    for name, fwd, bwd, defaults, last_n in (("plain", gate_fwd, gate_bwd, CONFIGS, 100),
                                             ("tma", gate_fwd_tma, gate_bwd_tma, TMA_CONFIGS, 104)):
        settings = cfgs or defaults
        if device == "cpu":
            settings = [dict(c, BM=min(c["BM"], 32), BN=min(c["BN"], 32), BK=min(c["BK"], 16)) for c in settings[:2]]
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))[(device == "cuda"):]:
            for m, k, n in ((70, 48, 40), (33, 16, last_n)):
                x, w1, w3, w2, dy = _inputs(m, k, n, device, dtype)
                want = reference(x, w1, w3, w2, dy)
                for cfg in settings:
                    h1, h3, g = fwd(x, w1, w3, cfg)
                    dh1, dh3 = bwd(dy, w2, h1, h3, cfg)
                    errs = [_rel(a, b) for a, b in zip((h1, h3, g, dh1, dh3), want)]
                    ok = max(errs) <= tol
                    bad += not ok
                    print(f"check {name} {dtype} M {m} K {k} N {n} {cfg}: worst {max(errs):.1e} "
                          f"{'pass' if ok else 'FAIL'}", flush=True)
    bad += not _check_mlp(device)
    if bad:
        sys.exit(f"{bad} check(s) failed")


def _check_mlp(device: str) -> bool:
    """The patched models.lm.MLP against the plain one, fp32: output and every parameter's and x's gradient."""
    import models.lm as lm

    torch.manual_seed(0)
    mlp = lm.MLP(48, 80).to(device)
    x = torch.randn(2, 35, 48, device=device, requires_grad=True)
    dy = torch.randn(2, 35, 48, device=device)
    results = []
    for forward in (lm.MLP.forward, lambda self, x: gate_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)):
        mlp.zero_grad()
        x.grad = None
        y = forward(mlp, x)
        y.backward(dy)
        results.append([y.detach(), x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())])
    worst = max(_rel(a, b) for a, b in zip(results[1], results[0]))
    print(f"check the patched MLP against models.lm.MLP, fp32: worst {worst:.1e}", flush=True)
    return worst <= 1e-4


def time(cfgs=None, tma: bool = False, m: int = 131072, k: int = 768, n: int = 1792) -> None:
    """GPU: median ms of the gate's forward (two cuBLAS GEMMs + the compiled gate, against gate_fwd) and backward
    (cuBLAS dy W2 + the compiled gate's backward, against gate_bwd) at the 135M MLP's shapes, bf16, each setting;
    with `tma`, the persistent TMA kernels (gate_fwd_tma, gate_bwd_tma) and their settings."""
    from triton.testing import do_bench

    x, w1, w3, w2, dy = _inputs(m, k, n, "cuda", torch.bfloat16)
    gate = torch.compile(lambda a, b: F.silu(a) * b)

    def gate_grad(dg, a, b):
        s = torch.sigmoid(a.float())
        return ((dg * b * s * (1 + a * (1 - s))).to(a.dtype), (dg * a * s).to(b.dtype))

    gate_grad = torch.compile(gate_grad)
    h1, h3 = x @ w1.T, x @ w3.T
    flops = 2 * m * k * n
    ms = {
        "cublas two GEMMs": do_bench(lambda: (x @ w1.T, x @ w3.T), return_mode="median"),
        "cublas two GEMMs + compiled gate": do_bench(lambda: gate(x @ w1.T, x @ w3.T), return_mode="median"),
        "cublas dy W2": do_bench(lambda: dy @ w2, return_mode="median"),
        "cublas dy W2 + compiled gate backward": do_bench(lambda: gate_grad(dy @ w2, h1, h3), return_mode="median"),
    }
    for name, t in ms.items():
        gemms = 2 if "two" in name else 1
        print(f"time {name}: {t:.3f} ms ({gemms * flops / t / 1e9:.0f} TFLOP/s of its GEMMs)", flush=True)
    fwd, bwd = (gate_fwd_tma, gate_bwd_tma) if tma else (gate_fwd, gate_bwd)
    for cfg in cfgs or (TMA_CONFIGS if tma else CONFIGS):
        label = f"time {'tma ' if tma else ''}{cfg}"
        try:
            f = do_bench(lambda: fwd(x, w1, w3, cfg), return_mode="median")
            b = do_bench(lambda: bwd(dy, w2, h1, h3, cfg), return_mode="median")
        except Exception as e:  # a setting past the SM's shared memory or registers
            print(f"{label}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
            continue
        print(f"{label}: forward {f:.3f} ms ({2 * flops / f / 1e9:.0f} TFLOP/s), backward {b:.3f} ms "
              f"({flops / b / 1e9:.0f} TFLOP/s)", flush=True)


def _cfgs(args):
    """The JSON list of settings given on the command line, or None."""
    if not args:
        return None
    try:
        cfgs = json.loads(args[0])
    except json.JSONDecodeError as e:
        sys.exit(f"settings: not JSON ({e})")
    keys = set(CONFIGS[0])
    if not isinstance(cfgs, list) or not all(isinstance(c, dict) and set(c) == keys for c in cfgs):
        sys.exit(f"settings: expected a JSON list of objects with the keys {', '.join(sorted(keys))}")
    return cfgs


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["help"]
    if command == "check" and len(rest) <= 1:
        check(_cfgs(rest))
    elif command == "time" and len(rest) - (rest[:1] == ["tma"]) <= 1:
        tma = rest[:1] == ["tma"]
        if not torch.cuda.is_available():
            sys.exit("time: needs a CUDA GPU, and torch sees none here")
        time(_cfgs(rest[1:] if tma else rest), tma)
    else:
        sys.exit(__doc__)

"""kernels.fused: the Triton kernels (in the interpreter, on CPU tensors) against the PyTorch references.

Every test compares numbers: outputs and every gradient, as max|a - b| / max|b| against the reference run on
the same inputs in the same dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.compare import rel_err
from kernels.fused import gated_rms_norm, linear_cross_entropy, rms_norm, swiglu

#: Relative error allowed (max|a - b| / max|b|) by dtype. fp32: both sides do fp32 math in another order. bf16:
#: the reference rounds intermediates (silu(a) before the product, logits before the GEMMs of the gradients)
#: where the kernels keep fp32, and the interpreter rounds fp32 to bf16 by truncation, so results differ by
#: one or two bf16 ulps (2^-8 relative each); 2e-2 is about three ulps of the largest entry.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = (torch.float32, torch.bfloat16)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to every input."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out.float() * grad_out).sum().backward()
    return out.detach(), [t.grad.clone() for t in inputs]


def assert_matches(fn_triton, fn_ref, inputs, grad_out, dtype, names):
    out, grads = run(fn_triton, inputs, grad_out)
    out_ref, grads_ref = run(fn_ref, inputs, grad_out)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    errors = {"out": rel_err(out, out_ref)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(names, grads, grads_ref)})
    bad = {name: err for name, err in errors.items() if not err <= TOL[dtype]}
    assert not bad, f"{dtype}: relative errors above {TOL[dtype]}: {bad}"


# ------------------------------------------------------------------------------------------------ rms_norm
#: (shape, d): 37 rows of d 48 (16-row tiles: the last one partial, and the backward's two programs stride
#: over three tiles); d 768 (tile 1024, masked) on a 3-D input of 10 rows; a single row of 3.
NORM_SHAPES = [(37, 48), (2, 5, 768), (1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g)
    assert_matches(lambda *t: rms_norm(*t, backend="triton"), lambda *t: rms_norm(*t, backend="torch"),
                   leaves(x, w), dy, dtype, ["x", "weight"])


def test_rms_norm_bf16_input_fp32_weight():
    """The mixed case (bf16 activations, fp32 parameters): output in x's dtype, dweight in the weight's."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, 48, generator=g).bfloat16(), 1 + 0.5 * torch.randn(48, generator=g)
    dy = torch.randn(20, 48, generator=g)
    x, w = leaves(x, w)
    out, (dx, dw) = run(lambda *t: rms_norm(*t, backend="triton"), [x, w], dy)
    out_ref, (dx_ref, dw_ref) = run(lambda *t: rms_norm(*t, backend="torch"), [x, w], dy)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert rel_err(out, out_ref) <= TOL[torch.bfloat16] and rel_err(dx, dx_ref) <= TOL[torch.bfloat16]
    assert rel_err(dw, dw_ref) <= 1e-5  # dy and x are the same bf16 values on both sides, summed in fp32


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_is_functional_rms_norm(dtype):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    want = F.rms_norm(x, (48,), w, 1e-6)
    assert rel_err(rms_norm(x, w, backend="torch"), want) <= TOL[dtype] / 4
    assert rel_err(rms_norm(x, w, eps=0.5, backend="torch"), F.rms_norm(x, (48,), w, 0.5)) <= TOL[dtype] / 4
    assert rel_err(rms_norm(x, w, eps=0.5, backend="triton"), F.rms_norm(x, (48,), w, 0.5)) <= TOL[dtype]


# ------------------------------------------------------------------------------------------------ gated_rms_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_gated_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    # Gates up to |g| ~ 12, where sigmoid saturates and its derivative s (1 - s) underflows towards 0.
    gate = (4 * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g)
    assert_matches(lambda *t: gated_rms_norm(*t, backend="triton"), lambda *t: gated_rms_norm(*t, backend="torch"),
                   leaves(x, gate, w), dy, dtype, ["x", "gate", "weight"])


def test_gated_rms_norm_reference_is_the_lightning_formula():
    """The reference is sigmoid(g) * nn.RMSNorm(x) as lightning computed it before the fused op, with its gradients;
    the plain RMSNorm (the same kernels without the gate) is unchanged by the gate's switch."""
    g = torch.Generator().manual_seed(6)
    x, gate, dy = (torch.randn(11, 48, generator=g) for _ in range(3))
    norm = torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.3 * torch.randn(48, generator=g))
    xs, gs = leaves(x, gate)
    out, (dx, dg) = run(lambda a, b: gated_rms_norm(a, b, norm.weight, 1e-6, backend="triton"), [xs, gs], dy)
    out_ref, (dx_ref, dg_ref) = run(lambda a, b: torch.sigmoid(b) * norm(a), [xs, gs], dy)
    assert max(rel_err(out, out_ref), rel_err(dx, dx_ref), rel_err(dg, dg_ref)) <= TOL[torch.float32]
    assert rel_err(rms_norm(x, norm.weight, backend="triton"), norm(x)) <= TOL[torch.float32]


def test_gated_rms_norm_bf16_input_fp32_weight():
    """As lightning calls it under autocast: bf16 o and gate, an fp32 weight; output and dx in bf16, dweight fp32."""
    g = torch.Generator().manual_seed(7)
    x, gate = (torch.randn(20, 48, generator=g).bfloat16() for _ in range(2))
    w, dy = 1 + 0.5 * torch.randn(48, generator=g), torch.randn(20, 48, generator=g)
    ins = leaves(x, gate, w)
    out, (dx, dg, dw) = run(lambda *t: gated_rms_norm(*t, backend="triton"), ins, dy)
    out_ref, (dx_ref, dg_ref, dw_ref) = run(lambda *t: gated_rms_norm(*t, backend="torch"), ins, dy)
    assert (out.dtype, dx.dtype, dg.dtype, dw.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)
    assert max(rel_err(out, out_ref), rel_err(dx, dx_ref), rel_err(dg, dg_ref)) <= TOL[torch.bfloat16]
    assert rel_err(dw, dw_ref) <= 1e-5


# ------------------------------------------------------------------------------------------------ swiglu
#: 1850 elements (one 2048-wide block, masked) and 6000 (three blocks, the last partial).
SWIGLU_SHAPES = [(37, 50), (2, 3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(3)
    # Scale 6 reaches |a| ~ 20, where sigmoid saturates: silu'(a) must stay finite there.
    a, b = (6 * torch.randn(shape, generator=g)).to(dtype), torch.randn(shape, generator=g).to(dtype)
    dc = torch.randn(shape, generator=g)
    assert_matches(lambda *t: swiglu(*t, backend="triton"), lambda *t: swiglu(*t, backend="torch"),
                   leaves(a, b), dc, dtype, ["a", "b"])


# ------------------------------------------------------------------------------------------------ linear_cross_entropy
def ce_inputs(n, d, vocab, dtype, ignored=(), seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(vocab, d, generator=g) / math.sqrt(d) * 3).to(dtype)  # logits of std ~3: a peaked softmax
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[list(ignored)] = -100
    return x, w, targets


def check_ce(x, w, targets, dtype, **kwargs):
    grad_loss = torch.tensor(1.7)  # backward must scale the stored gradients by grad_output
    assert_matches(lambda *t: linear_cross_entropy(*t, targets, backend="triton", **kwargs),
                   lambda *t: linear_cross_entropy(*t, targets, backend="torch"),
                   leaves(x, w), grad_loss, dtype, ["x", "weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_several_chunks_some_ignored(dtype):
    """29 tokens in chunks of 8 (the last one 5), a quarter of them ignored, vocab 300 (a masked 512 block)."""
    x, w, targets = ce_inputs(29, 32, 300, dtype, ignored=range(0, 29, 4))
    check_ce(x, w, targets, dtype, chunk_tokens=8)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_vocab_over_several_blocks(dtype, one_pass, monkeypatch):
    """Vocab 300 as one 512-wide row in registers, or in 128-wide blocks (the last holds 44), where the online
    logsumexp crosses block boundaries."""
    from kernels.fused import triton_ce

    if not one_pass:
        monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 128)
        monkeypatch.setattr(triton_ce, "ONE_PASS_MAX_V", 256)
    narrow = one_pass and dtype != torch.float32  # a 16-bit row held at 16 bits
    assert triton_ce._ce_launch(300, dtype)[:3] == ((512, True, narrow) if one_pass else (128, False, False))
    x, w, targets = ce_inputs(13, 24, 300, dtype, ignored=[5])
    # The target at the last column, in the partial block, and in the first.
    targets[0], targets[1] = 299, 0
    check_ce(x, w, targets, dtype, chunk_tokens=5)


@pytest.mark.parametrize("narrow", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ce_16bit_row_held_narrow_or_wide(dtype, narrow, monkeypatch):
    """A one-pass 16-bit row held as loaded (the exps taken twice) or widened to fp32 (once): both match the
    reference, fp16 too (whose widening is a plain conversion, not bf16's bit move)."""
    from kernels.fused import triton_ce

    monkeypatch.setattr(triton_ce, "NARROW_ROWS", narrow)
    assert triton_ce._ce_launch(300, dtype)[2] is narrow
    x, w, targets = ce_inputs(11, 24, 300, dtype, ignored=[4])
    targets[0], targets[1] = 299, 0
    check_ce(x, w, targets, dtype, chunk_tokens=4)


def test_ce_weight_gradient_sums_bf16_chunks_in_fp32():
    """A chunk's bf16 product goes into the fp32 grad_W unrounded (rounding it to bf16 first, as a bf16 GEMM and
    then an add would, misses the exact sum by about 2^-9 of its largest entry)."""
    from kernels.fused.triton_ce import _add_product

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 96, generator=g).bfloat16(), torch.randn(96, 48, generator=g).bfloat16()
    acc0 = torch.randn(64, 48, generator=g) * 1e-2
    exact = (acc0.double() + a.double() @ b.double()).float()
    acc = acc0.clone()
    _add_product(acc, a, b)
    assert acc.dtype == torch.float32 and rel_err(acc, exact) < 1e-6
    assert rel_err(acc0 + (a @ b).float(), exact) > 1e-4  # the rounded product: what the first check tells apart


def test_ce_all_but_one_ignored():
    x, w, targets = ce_inputs(17, 16, 70, torch.float32, ignored=[i for i in range(17) if i != 11])
    check_ce(x, w, targets, torch.float32, chunk_tokens=4)


def test_default_chunk_tokens():
    from kernels.fused.triton_ce import default_chunk_tokens

    assert default_chunk_tokens(8 * 2048, 32000, 768) == 4096  # the floor: ceil(16384 / 42) = 391 alone
    assert default_chunk_tokens(64 * 8192, 32000, 768) == 12484  # ceil(524288 / 42): logits about x's size
    assert default_chunk_tokens(100, 32000, 768) == 100  # one chunk, never more tokens than there are


def test_ce_default_chunk_and_3d_input(monkeypatch):
    """x (B, T, d) and targets (B, T); without the floor the default is ceil(40 / ceil(300 / 32)) = 4: 10 chunks."""
    from kernels.fused import triton_ce

    monkeypatch.setattr(triton_ce, "MIN_CHUNK_TOKENS", 1)
    assert triton_ce.default_chunk_tokens(40, 300, 32) == 4
    x, w, targets = ce_inputs(40, 32, 300, torch.float32, ignored=[3, 39])
    check_ce(x.view(4, 10, 32), w, targets.view(4, 10), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ce_equals_cross_entropy_of_materialised_logits(backend):
    x, w, targets = ce_inputs(21, 32, 150, torch.float32, ignored=[2, 7, 8])
    want = F.cross_entropy(x @ w.T, targets, ignore_index=-100)
    got = linear_cross_entropy(x, w, targets, chunk_tokens=6, backend=backend)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    # The same mean by hand: ignored tokens out of both the sum and the count.
    keep = targets != -100
    by_hand = (torch.logsumexp(x @ w.T, dim=1) - (x @ w.T).gather(1, targets.clamp_min(0)[:, None])[:, 0])[keep]
    assert abs(got.item() - by_hand.mean().item()) <= 1e-5 * abs(want.item())


def test_ce_other_ignore_index():
    x, w, targets = ce_inputs(12, 16, 40, torch.float32)
    targets[[1, 4]] = 7
    want = F.cross_entropy(x @ w.T, targets, ignore_index=7)
    got = linear_cross_entropy(x, w, targets, ignore_index=7, chunk_tokens=5, backend="triton")
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_ce_all_ignored_is_nan_with_zero_gradients_like_torch():
    x, w, targets = ce_inputs(6, 16, 40, torch.float32, ignored=range(6))
    x, w = leaves(x, w)
    loss = linear_cross_entropy(x, w, targets, chunk_tokens=4, backend="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x @ w.T, targets))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("bad", [40, 1000, -5])
def test_ce_target_out_of_range_gives_nan_not_a_loss(bad, one_pass, monkeypatch):
    """torch refuses a class index outside [0, V); the kernel cannot without a host sync, so the loss and that row's
    gradient come out NaN (before, the row's loss was its logsumexp, a plausible number); other rows are untouched."""
    from kernels.fused import triton_ce

    if not one_pass:
        monkeypatch.setattr(triton_ce, "ONE_PASS_MAX_V", 16)
        monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 16)
    x, w, targets = ce_inputs(6, 16, 40, torch.float32, ignored=[2])
    targets[3] = bad
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(x @ w.T, targets)
    x, w = leaves(x, w)
    loss = linear_cross_entropy(x, w, targets, chunk_tokens=4, backend="triton")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[3]).all() and torch.isfinite(x.grad[[0, 1, 4, 5]]).all()


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)])
def test_ce_gradient_only_where_required(needs):
    x, w, targets = ce_inputs(11, 16, 50, torch.float32, ignored=[0])
    x.requires_grad_(needs[0])
    w.requires_grad_(needs[1])
    loss = linear_cross_entropy(x, w, targets, chunk_tokens=4, backend="triton")
    xr, wr = leaves(x, w)
    F.cross_entropy(xr @ wr.T, targets).backward()
    assert abs(loss.item() - F.cross_entropy(x @ w.T, targets).item()) <= 1e-5 * loss.item()
    if any(needs):
        loss.backward()
    for t, ref, need in ((x, xr, needs[0]), (w, wr, needs[1])):
        if need:
            assert rel_err(t.grad, ref.grad) <= TOL[torch.float32]
        else:
            assert t.grad is None
    assert loss.requires_grad == any(needs)


def test_ce_no_grad_mode_returns_loss_only():
    x, w, targets = ce_inputs(11, 16, 50, torch.float32)
    x, w = leaves(x, w)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, targets, chunk_tokens=4, backend="triton")
    assert not loss.requires_grad
    assert abs(loss.item() - F.cross_entropy(x @ w.T, targets).item()) <= 1e-5 * loss.item()


def test_ce_under_autocast_matches_reference_and_keeps_parameter_dtype():
    """fp32 x and weight under bf16 autocast: computed in bf16 like an autocast Linear; grads come back fp32."""
    x, w, targets = ce_inputs(19, 32, 130, torch.float32, ignored=[4])
    results = {}
    for backend in ("torch", "triton"):
        xl, wl = leaves(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(xl, wl, targets, chunk_tokens=7, backend=backend)
        loss.backward()
        assert loss.dtype == torch.float32 and xl.grad.dtype == wl.grad.dtype == torch.float32
        results[backend] = (loss.detach(), xl.grad, wl.grad)
    for got, want in zip(results["triton"], results["torch"]):
        assert rel_err(got, want) <= TOL[torch.bfloat16]
    fp32 = F.cross_entropy(x @ w.T, targets).item()
    assert abs(results["triton"][0].item() - fp32) > 0  # so the check above saw bf16 arithmetic, not fp32


# ------------------------------------------------------------------------------------------------ dispatch, errors
def test_auto_picks_torch_on_cpu():
    """On CPU tensors "auto" is the reference path, bit for bit; triton differs in the last bits."""
    x, w, targets = ce_inputs(16, 24, 90, torch.float32)
    auto = linear_cross_entropy(x, w, targets)
    assert torch.equal(auto, linear_cross_entropy(x, w, targets, backend="torch"))
    a, b = torch.randn(40, 30), torch.randn(40, 30)
    assert torch.equal(swiglu(a, b), F.silu(a) * b)
    wn = torch.randn(30)
    assert torch.equal(rms_norm(a, wn), rms_norm(a, wn, backend="torch"))


def test_triton_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="CUDA"):
        rms_norm(x, torch.ones(8), backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        swiglu(x, x, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        linear_cross_entropy(x, torch.randn(5, 8), torch.zeros(4, dtype=torch.long), backend="triton")


def test_import_does_not_pull_in_triton():
    import subprocess
    import sys

    code = "import sys, kernels.fused; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


X, W8, T4 = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: rms_norm(X, torch.ones(7)), "weight must have shape"),
        (lambda: rms_norm(X.long(), torch.ones(8)), "x must be a floating-point"),
        (lambda: rms_norm(X, torch.ones(8), backend="cuda"), "unknown backend"),
        (lambda: rms_norm(X, torch.ones(8, device="meta")), "one device"),
        (lambda: gated_rms_norm(X, X[:, :4], torch.ones(8)), "gate must have x's shape"),
        (lambda: gated_rms_norm(X, X.long(), torch.ones(8)), "gate must be a floating-point"),
        (lambda: gated_rms_norm(X, X, torch.ones(7)), "weight must have shape"),
        (lambda: swiglu(X, X[:, :4]), "one shape and dtype"),
        (lambda: swiglu(X, X.double()), "one shape and dtype"),
        (lambda: swiglu(X, X.int()), "b must be a floating-point"),
        (lambda: linear_cross_entropy(X, W8[:, :6], T4), "weight \\(V, d\\)"),
        (lambda: linear_cross_entropy(X, W8, T4[:3]), "targets must have shape"),
        (lambda: linear_cross_entropy(X, W8, T4.float()), "int64 tensor"),
        (lambda: linear_cross_entropy(X, W8, T4.int()), "int64 tensor"),
        (lambda: linear_cross_entropy(X, W8.double(), T4), "one dtype"),
        (lambda: linear_cross_entropy(X[0], W8, T4[0]), "weight \\(V, d\\)"),
        (lambda: linear_cross_entropy(X[:0], W8, T4[:0]), "at least one token"),
        (lambda: linear_cross_entropy(X, W8, T4, chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------ sm_90 compile
def _aot_report() -> list[dict]:
    """Compile every kernel as launched (tiles, warps) for an H100; registers and spill bytes of each."""
    import inspect
    import re
    import subprocess
    import sys
    from pathlib import Path

    import triton

    sys.path.insert(0, str(Path(__file__).parent))
    from test_triton_compile import _compile

    from kernels.fused import triton_ce as ce
    from kernels.fused import triton_norm as nm
    from kernels.fused import triton_swiglu as sw

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"slab_fused_{os.getpid()}.cubin"
    rows = []
    for io in ("*bf16", "*fp32"):
        launches = []
        for d in (768, 2048, 4096):
            for gated in (False, True):
                for backward in (False, True):
                    block_d, r, warps, _ = nm._launch(d, backward, gated)
                    launches.append((f"norm gated={gated} backward={backward} d={d}",
                                     nm._rms_norm_bwd_kernel if backward else nm._rms_norm_fwd_kernel,
                                     dict(ROWS=r, BLOCK_D=block_d, GATED=gated), warps))
        launches += [("swiglu fwd", sw._swiglu_fwd_kernel, dict(BLOCK=sw.BLOCK), sw.NUM_WARPS),
                     ("swiglu bwd", sw._swiglu_bwd_kernel, dict(BLOCK=sw.BLOCK), sw.NUM_WARPS)]
        for vocab in (32000, 50304):  # one pass (a row in registers), and in blocks
            block_v, one_pass, narrow, warps = ce._ce_launch(vocab, torch.bfloat16 if io == "*bf16" else torch.float32)
            launches += [(f"ce V={vocab} grad={g}", ce._ce_kernel,
                          dict(BLOCK_V=block_v, WRITE_GRAD=g, ONE_PASS=one_pass, NARROW=narrow), warps)
                         for g in (False, True)]
        # V is specialized as a multiple of 16 (32000 and 50304 are), as a launch does: the row loads are vectorized.
        for name, kernel, consts, warps in launches:
            ptrs = {"targets_ptr": "*i64", "loss_ptr": "*fp32", "rstd_ptr": "*fp32", "dw_ptr": "*fp32"}
            ptrs = {p: ptrs.get(p, io) for p in inspect.signature(kernel.fn).parameters if p.endswith("_ptr")}
            compiled = _compile(kernel, consts, ptrs, warps, 3, divisible=("V",))
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            cubin.unlink()
            rows.append({"name": f"{io} {name}", "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
                         "spill": int(re.search(r"STACK:(\d+)", usage).group(1))})
    return rows


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter runs no GPU compiler: compile each launch for sm_90 ahead of time (no GPU needed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no NVIDIA toolchain (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_fused as t; " \
           "print(json.dumps(t._aot_report()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * 18
    # The loss kernel's 16-bit row (64 values a thread) compiles to 63 registers and no spill with the GPU image's
    # Triton 3.6; later Tritons spill 8 bytes of it (two registers), which is allowed, and nothing more.
    allowed = {"*bf16 ce V=32000 grad=True": 8}
    assert not [r for r in rows if r["spill"] > allowed.get(r["name"], 0)], rows


# ------------------------------------------------------------------------------------------ the GPU check
def test_check_fused_passes_the_kernels_and_catches_a_wrong_one():
    """slab bench fused's on-device check (here in the interpreter, small shapes) passes the kernels as they
    are and fails a kernel whose gradient is off by 10%."""
    from kernels.fused.bench import CHECK_TOL, Shapes, check_fused, check_op

    errors = check_fused("cpu", Shapes(n=24, d=32, hidden=48, vocab=40))
    assert set(errors) == {"rms_norm", "gated_rms_norm", "swiglu", "linear_cross_entropy"}
    assert all(0 <= e <= CHECK_TOL for e in errors.values()), errors

    class Scaled(torch.autograd.Function):  # right forward, gradient 10% too large
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return swiglu(a, b, backend="torch")

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            with torch.enable_grad():
                a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
                ga, gb = torch.autograd.grad(swiglu(a, b, backend="torch"), (a, b), g)
            return 1.1 * ga, gb

    def wrong(a, b, backend):
        return Scaled.apply(a, b) if backend == "triton" else swiglu(a, b, backend=backend)

    x = [torch.randn(8, 16).to(torch.bfloat16) for _ in range(2)]
    assert check_op(wrong, x) > CHECK_TOL


# ------------------------------------------------------------------------------------------------ entry points
@pytest.mark.parametrize("op", ["rms_norm", "gated_rms_norm", "swiglu"])
def test_eager_calls_skip_the_custom_op_and_compiled_calls_keep_it(op):
    """Eager calls go through a plain autograd Function (the custom op's dispatch costs host time on every call);
    torch.compile keeps the custom op. Both run the same kernels: the same outputs and gradients, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    weight = 1 + 0.1 * torch.randn(32, generator=g)
    calls = {"rms_norm": lambda x, gate, w: rms_norm(x + gate, w, backend="triton"),
             "gated_rms_norm": lambda x, gate, w: gated_rms_norm(x, gate, w, backend="triton"),
             "swiglu": lambda x, gate, w: swiglu(x, gate, backend="triton") * w}
    fn = calls[op]
    inputs = leaves(x, gate, weight)
    out = fn(*inputs)
    assert "slab" not in out.grad_fn.name() and not any(
        "slab" in (f.name() if f is not None else "") for f, _ in out.grad_fn.next_functions)
    eager_out, eager_grads = run(fn, inputs, torch.ones_like(x))
    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs, torch.ones_like(x))
    assert torch.equal(eager_out, compiled_out)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


def test_ce_fp16_input_gradient_survives_the_usual_loss_scale():
    # GradScaler starts at 65536, past fp16's 65504: the loss scale was cast to fp16 (inf), so every x gradient was
    # inf or NaN and the step was skipped
    x, w, targets = ce_inputs(64, 16, 256, torch.float16)
    x, w = leaves(x, w)
    (linear_cross_entropy(x, w, targets, chunk_tokens=32, backend="triton") * 65536.0).backward()
    xr, wr = leaves(x.detach().float(), w.detach().float())
    F.cross_entropy(xr @ wr.T, targets).backward()
    assert torch.isfinite(x.grad).all() and rel_err(x.grad.float() / 65536, xr.grad) <= TOL[torch.float16]


def test_ce_fp16_small_input_gradient_keeps_its_precision():
    # An x gradient of ~1e-6 an entry, as 16k tokens with head weights of 0.02 give (here 32 tokens, weights of 3e-5),
    # under the usual loss scale. Before, the kernels stored dlogits and dx already divided by the token count, in
    # fp16, where that is subnormal (and dlogits of 1 / (V N) flush to zero): 1.1e-2 off, against 4e-4 for the
    # unfused loss, which scales before it rounds. Now they store per-token sums and the mean is taken in fp32.
    x, w, targets = ce_inputs(32, 16, 40, torch.float16)
    w = (w.float() * 4e-5).half()
    x, w = leaves(x, w)
    (linear_cross_entropy(x, w, targets, chunk_tokens=16, backend="triton") * 65536.0).backward()
    xr, wr = leaves(x.detach().float(), w.detach().float())
    F.cross_entropy(xr @ wr.T, targets).backward()
    assert rel_err(x.grad.float() / 65536, xr.grad) <= TOL[torch.float16]
    assert rel_err(w.grad.float() / 65536, wr.grad) <= TOL[torch.float16]

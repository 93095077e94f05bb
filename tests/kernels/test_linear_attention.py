"""Every backend and decay form of kernels.linear_attention against the fp32 recurrence, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.compare import rel_err
from kernels.linear_attention import linear_attention, resolve_backend

# Slow as a whole (about 3 minutes under the Triton interpreter): conftest starts it among the first files.
pytestmark = pytest.mark.slow

FORMS = ("constant", "token", "channel")
#: Relative error allowed (max|a - b| / max|b|) by input dtype; bf16/fp16 round q, k, v and the products.
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_inputs(form, batch, time, heads, dk, dv, dtype, *, strong=False, with_state=False, seed=0):
    """Random inputs as leaf tensors; strong=True gives log decays in [-20, -5] on half the entries of the even
    heads (constant, token) or even channels (channel), so a chunk's cumulative log decay reaches -1000s while
    the odd ones keep every gradient well away from zero."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, time, heads, dk, generator=g).to(dtype)
    k = torch.randn(batch, time, heads, dk, generator=g).to(dtype)
    v = torch.randn(batch, time, heads, dv, generator=g).to(dtype)
    shape = {"constant": (heads,), "token": (batch, time, heads), "channel": (batch, time, heads, dk)}[form]
    a = -torch.rand(shape, generator=g) * 0.5
    if strong:
        even = torch.arange(shape[-1]) % 2 == 0
        pick = even & ((torch.rand(shape, generator=g) < 0.5) | (form == "constant"))
        a = torch.where(pick, -5.0 - 15.0 * torch.rand(shape, generator=g), a)
    h0 = torch.randn(batch, heads, dk, dv, generator=g) if with_state else None
    tensors = [q, k, v, a] + ([h0] if with_state else [])
    for x in tensors:
        x.requires_grad_(True)
    return q, k, v, a, h0


def run_with_grads(backend, q, k, v, a, h0, do, dht):
    """Forward with `backend` and backward of <o, do> + <final state, dht>; returns o, state and the gradients."""
    for x in (q, k, v, a, h0):
        if x is not None:
            x.grad = None
    o, state = linear_attention(q, k, v, a, initial_state=h0, output_final_state=True, backend=backend)
    ((o.float() * do).sum() + (state * dht).sum()).backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad, "log_decay": a.grad}
    if h0 is not None:
        grads["initial_state"] = h0.grad
    return o.detach(), state.detach(), {name: g.clone() for name, g in grads.items()}


#: naive's outputs and gradients by check_against_naive's arguments: its step-by-step recurrence costs about as much
#: as a backend under test, and several tests (both backends, several monkeypatched paths) check the same inputs.
_NAIVE = {}


def check_against_naive(backend, form, batch, time, heads, dk, dv, dtype, strong=False, with_state=True):
    key = (form, batch, time, heads, dk, dv, dtype, strong, with_state)
    inputs = make_inputs(*key[:-2], strong=strong, with_state=with_state)
    if key not in _NAIVE:
        _NAIVE[key] = naive_reference(inputs)
    check_against_naive_inputs(backend, inputs, dtype, _NAIVE[key])


def naive_reference(inputs):
    """The gradients of the loss fed back (do, dht), and naive's outputs, final state and gradients for these inputs."""
    q, k, v, a, h0 = inputs
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    g = torch.Generator().manual_seed(1)
    do = torch.randn(batch, time, heads, dv, generator=g)
    dht = torch.randn(batch, heads, dk, dv, generator=g)
    return do, dht, run_with_grads("naive", q, k, v, a, h0, do, dht)


def check_against_naive_inputs(backend, inputs, dtype, reference=None):
    """Outputs, final state and every gradient of `backend` within TOL[dtype] of naive's, for these inputs
    (`reference`: naive_reference(inputs), when already made)."""
    q, k, v, a, h0 = inputs
    batch, time, heads, _ = q.shape
    dk, dv = q.shape[-1], v.shape[-1]
    do, dht, (o_ref, s_ref, g_ref) = reference or naive_reference(inputs)
    o, s, grads = run_with_grads(backend, q, k, v, a, h0, do, dht)
    assert o.dtype == v.dtype and s.dtype == torch.float32
    assert o.shape == (batch, time, heads, dv) and s.shape == (batch, heads, dk, dv)
    tol = TOL[dtype]
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref)}
    errors.update({name: rel_err(grads[name], g_ref[name]) for name in g_ref})
    bad = {name: err for name, err in errors.items() if not err <= tol}
    form = {1: "constant", 3: "token", 4: "channel"}[a.dim()]
    assert not bad, f"{backend} {form} {dtype}: relative errors above {tol}: {bad}"


BACKENDS = ("torch", "triton")
#: (B, T, H, K, V): a single token; T not a multiple of the 64-token chunk and K != V (batch and heads crossed); several
#: chunks in two groups of the state scan (triton) with T - 1 a multiple of 64 (one head: the groups run per (batch,
#: head), whose indexing the shape before crosses); K and V above one tile of fp32's widest (32 for K, 64 for V in the
#: output and dv kernels), tails masked (K 40 is two K tiles as 80 was three; V 72 two V tiles of 64, three of 32).
SHAPES = [(1, 1, 1, 16, 16), (2, 37, 2, 16, 32), (1, 129, 1, 32, 16), (1, 70, 1, 40, 72)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch,time,heads,dk,dv", SHAPES)
def test_matches_naive_fp32(backend, form, batch, time, heads, dk, dv):
    check_against_naive(backend, form, batch, time, heads, dk, dv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_strong_decay(backend, form):
    # Per channel the strong entries lie in the even channels of every head: one head is the same case (the scalar
    # forms need two, the even strong, the odd mild).
    check_against_naive(backend, form, 1, 100, 1 if form == "channel" else 2, 16, 16, torch.float32, strong=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["token", "channel"])
@pytest.mark.parametrize("extreme", [-1e4, float("-inf")])
def test_extreme_log_decays_mixed_with_mild_ones(backend, form, extreme):
    # 30% of the entries at -1e4 or -inf (log 0: a state reset, as at a document boundary), the rest in [-0.5, 0].
    # Before the floor: running sums of ~1e5 cost fp32 1e-3 to 6e-3 of the output at -1e4, and -inf gave NaN from
    # its first token on; naive's recurrence multiplies by e^a and has neither problem.
    # One head: the extremes fall on every head alike (per channel, the sub-block paths cost seconds per chunk here).
    q, k, v, a, h0 = make_inputs(form, 1, 70, 1, 16, 16, torch.float32, with_state=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        a.copy_(torch.where(torch.rand(a.shape, generator=g) < 0.3, torch.tensor(extreme), a))
    check_against_naive_inputs(backend, (q, k, v, a, h0), torch.float32)


@pytest.mark.parametrize("fused", [False, True])
def test_triton_constant_decay_of_minus_infinity(monkeypatch, fused):
    """A head with no memory at all (log 0 = -inf: every token resets the state) beside a mild one, chunked over three
    chunks in two groups (the scan) or by the fused walks. Before, the kernels took a constant decay unfloored, and
    b_i - b_j = -inf - -inf made every output and gradient NaN (the data-dependent forms were floored already)."""
    from kernels.linear_attention import triton_chunk

    if fused:
        monkeypatch.setattr(triton_chunk, "FUSED_MIN_HEADS_PER_SM", 0)
    q, k, v, a, h0 = make_inputs("constant", 1, 70 if fused else 130, 2, 16, 16, torch.float32, with_state=True)
    with torch.no_grad():
        a.copy_(torch.tensor([float("-inf"), -0.3]))
    check_against_naive_inputs("triton", (q, k, v, a, h0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_low_precision(backend, form, dtype):
    # One head per channel, as in test_strong_decay.
    check_against_naive(backend, form, 1, 70, 1 if form == "channel" else 2, 16, 32, dtype, strong=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strong", [False, True])
def test_triton_per_channel_several_key_tiles(dtype, strong):
    """K = 64 is two key tiles of 32 in the per-channel backward (dqk, intra) and the A kernel's K loop: against
    naive, mild and strong chunks (the other tests' K of 16 is one tile). One head: the K tiles are per (batch, head)."""
    check_against_naive("triton", "channel", 1, 70, 1, 64, 32, dtype, strong=strong)


@pytest.mark.parametrize("span_limit", [0.0, 1e9])
def test_triton_per_channel_diagonal_blocks_both_ways(monkeypatch, span_limit):
    """The diagonal sub-blocks of a per-channel decay as a dot around a reference row (limit 1e9: always) and
    elementwise (limit 0: always), each against naive, whatever the data would pick; strong decays (with their
    elementwise fallback) are test_strong_decay's and test_low_precision's."""
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "SPAN_LIMIT", span_limit)
    monkeypatch.setattr(triton_chunk, "CHUNK_SPAN_LIMIT", 0.0)  # no chunk is mild: every one takes the sub-blocks
    check_against_naive("triton", "channel", 2, 37, 2, 16, 32, torch.float32)
    if span_limit:
        # One head: two chunks of bf16, the batch and heads of the strong-chunk list having been crossed above. Only
        # for the dot: bf16's elementwise blocks are test_low_precision's (its strong decays span over 40 in every
        # block), its dot blocks no other test's; the elementwise ones are the slowest path in the interpreter.
        check_against_naive("triton", "channel", 1, 70, 1, 16, 32, torch.bfloat16)


# The capture fallback is one dtype's: it only switches the call to the scan (`_backward`), which every fp16 per-channel
# test runs anyway (DA_BY_DOT's default under the interpreter).
@pytest.mark.parametrize("dtype,capturing", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)])
def test_triton_per_channel_decay_gradient_by_dot(monkeypatch, dtype, capturing):
    """The log decay's gradient of mild chunks summed as two dots of db's bf16 parts with a triangle of ones (the
    GPU's way for 16-bit inputs; forced here, where the interpreter takes fp32 operands) within each dtype's
    tolerance of naive; strong chunks in the same call keep their own sum. During a CUDA graph capture with no
    triangle made yet (simulated) the call falls back to the scan. (fp32 inputs keep the scan: forced, their log
    decay's gradient came out 2.0e-4 from naive, at their tolerance.) One head: every head would be the same case."""
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "DA_BY_DOT", True)
    if capturing:
        def refuse(device):
            raise triton_chunk._Capturing

        monkeypatch.setattr(triton_chunk, "_upper_ones", refuse)
    q, k, v, a, h0 = make_inputs("channel", 1, 170, 1, 16, 32, dtype, with_state=True)
    with torch.no_grad():
        a[:, 64:128, :, 3] = -3.0  # chunk 1 strong
    check_against_naive_inputs("triton", (q, k, v, a, h0), dtype)


def test_triton_upper_ones():
    """The triangle `_reverse_cumsum` reads: ones on and above the diagonal, made once per device."""
    from kernels.linear_attention import triton_chunk as tc

    upper = tc._upper_ones(torch.device("cpu"))
    assert upper.dtype == torch.bfloat16 and upper.shape == (tc.CHUNK, tc.CHUNK)
    assert torch.equal(upper.float(), torch.ones(tc.CHUNK, tc.CHUNK).triu())
    assert tc._upper_ones(torch.device("cpu")) is upper


# The products above the diagonal of the edge chunk overflow (e^115); they are masked out, as on the GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in matmul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_per_channel_mild_and_strong_chunks_in_one_call(dtype):
    """Per-channel decay over three chunks: mild, strong (-3 per token in one channel: -192 over the chunk, past
    CHUNK_SPAN_LIMIT = 120) and mild at the edge (-2.75 per token in one channel: -115.5 over its 42 tokens), so the
    inline whole-chunk path, near its limit too, and the sub-blocks run in one call. One head: every head would be the
    same case."""
    q, k, v, a, h0 = make_inputs("channel", 1, 170, 1, 16, 32, dtype, with_state=True)
    with torch.no_grad():
        a[:, 64:128, :, 3] = -3.0
        a[:, 128:, :, 5] = -2.75
    check_against_naive_inputs("triton", (q, k, v, a, h0), dtype)


@pytest.mark.parametrize("strong", [False, True])
def test_triton_per_channel_mild_chunks_never_read_the_sub_block_matrix(monkeypatch, strong):
    """With the intra-chunk matrix of `_chunk_A_kernel` replaced by NaNs, mild chunks still match naive (they
    compute it inline), while strong ones do not (they read it): the path choice is made as documented."""
    from kernels.linear_attention import triton_chunk

    def nan_matrix(plan, q, k):
        return torch.full((plan.B * plan.H, plan.NT, plan.BT, plan.BT), float("nan"), device=q.device)

    monkeypatch.setattr(triton_chunk._Plan, "chunk_A", nan_matrix)
    # One head: mild or strong, every head would be the same case.
    inputs = make_inputs("channel", 1, 100, 1, 16, 16, torch.float32, strong=strong, with_state=True)
    if strong:
        with pytest.raises(AssertionError, match="relative errors above"):
            check_against_naive_inputs("triton", inputs, torch.float32)
    else:
        check_against_naive_inputs("triton", inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_initial_state(backend):
    check_against_naive(backend, "token", 2, 20, 2, 16, 16, torch.float32, with_state=False)


@pytest.mark.parametrize("form", FORMS)
def test_triton_long_sequence_many_groups(form):
    """150 tokens: 3 chunks in groups of 2 (the interpreter's ~sqrt), so the scan carries a state across a group
    boundary mid-sequence into a partial group; K = 40 spans two K tiles of the walk, which each write their channels'
    group totals. Weak decays (about -0.005 per token), so that the initial state and the first group's state still
    count after a group's 128 tokens. One head: the groups run per (batch, head), whose indexing the shorter tests
    cross. (It was 300 tokens, 5 chunks in groups of 3 and 2: also two groups, the same paths.)"""
    q, k, v, a, h0 = make_inputs(form, 1, 150, 1, 40, 24, torch.float32, with_state=True)
    with torch.no_grad():
        a.mul_(0.02)
    check_against_naive_inputs("triton", (q, k, v, a, h0), torch.float32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("used", ["output", "state"])
def test_triton_loss_of_one_output_only(form, used):
    """With only the output or only the final state in the loss (the other's gradient arrives as None), every
    gradient still matches naive."""
    # One head: which gradient arrives as None is the same for every head.
    q, k, v, a, h0 = make_inputs(form, 1, 40, 1, 16, 16, torch.float32, with_state=True)
    g = torch.Generator().manual_seed(3)
    do, dht = torch.randn(1, 40, 1, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g)
    grads = {}
    for backend in ("naive", "triton"):
        for x in (q, k, v, a, h0):
            x.grad = None
        o, state = linear_attention(q, k, v, a, initial_state=h0, output_final_state=True, backend=backend)
        ((o * do).sum() if used == "output" else (state * dht).sum()).backward()
        # q reaches no final state: naive leaves its gradient None, where the kernels give zeros.
        grads[backend] = [torch.zeros_like(x) if x.grad is None else x.grad.clone() for x in (q, k, v, a, h0)]
    for got, want in zip(grads["triton"], grads["naive"]):
        assert torch.allclose(got, want, atol=1e-5) or rel_err(got, want) <= TOL[torch.float32]


def test_triton_rejects_cpu_without_interpreter(monkeypatch):
    q, k, v, a, _ = make_inputs("token", 1, 4, 1, 16, 16, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        linear_attention(q, k, v, a, backend="triton")


def test_naive_matches_explicit_recurrence():
    """The reference itself, against the recurrence written out by hand for one head and channel decay."""
    q, k, v, a, h0 = make_inputs("channel", 1, 3, 1, 2, 2, torch.float32, with_state=True)
    o, s = linear_attention(q, k, v, a, scale=1.0, initial_state=h0, output_final_state=True, backend="naive")
    state = h0[0, 0].detach()
    for t in range(3):
        state = a[0, t, 0].detach().exp()[:, None] * state + k[0, t, 0].detach()[:, None] * v[0, t, 0].detach()[None]
        torch.testing.assert_close(o[0, t, 0].detach(), q[0, t, 0].detach() @ state)
    torch.testing.assert_close(s[0, 0].detach(), state)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_fp32_under_autocast(backend):
    """Under bf16 autocast (the models' forward on CUDA) fp32 inputs still get fp32 math, as the Triton kernels give:
    before, autocast ran the naive and torch backends' products in bf16, 3e-3 to 4e-3 off the output and final
    state (the ground truth among them)."""
    q, k, v, a, h0 = make_inputs("channel", 1, 40, 2, 16, 16, torch.float32, with_state=True)
    with torch.no_grad():
        o_ref, s_ref = linear_attention(q, k, v, a, initial_state=h0, output_final_state=True, backend="naive")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, s = linear_attention(q, k, v, a, initial_state=h0, output_final_state=True, backend=backend)
    assert o.dtype == torch.float32
    assert max(rel_err(o, o_ref), rel_err(s, s_ref)) <= TOL[torch.float32]


def test_default_scale_and_no_final_state():
    q, k, v, a, _ = make_inputs("token", 1, 5, 1, 16, 4, torch.float32)
    o, state = linear_attention(q, k, v, a, backend="torch")
    o1, _ = linear_attention(q, k, v, a, scale=1.0, backend="torch")
    assert state is None
    torch.testing.assert_close(o, o1 * 0.25)


def test_constant_decay_as_buffer_needs_no_grad():
    q, k, v, _, _ = make_inputs("constant", 1, 9, 2, 8, 8, torch.float32)
    a = -torch.tensor([0.1, 2.0])  # a buffer: no requires_grad
    o, _ = linear_attention(q, k, v, a, backend="torch")
    o.sum().backward()
    assert q.grad is not None and a.grad is None


@pytest.mark.parametrize("form", FORMS)
# Batch and heads crossed in one chunk; several chunks in two groups with one head (as SHAPES).
@pytest.mark.parametrize("shape", [(2, 37, 2, 16, 32), (1, 129, 1, 32, 16)])
def test_triton_with_a_fixed_decay_matches_naive(form, shape):
    """A decay that needs no gradient (lightning's) takes its own backward path (dA made inside dqk, no db)."""
    q, k, v, a, h0 = make_inputs(form, *shape, torch.float32, with_state=True)
    a = a.detach()
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("naive", "triton"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
        o, _ = linear_attention(leaves[0], leaves[1], leaves[2], a, initial_state=leaves[3], backend=backend)
        (o * do).sum().backward()
        results.append([o.detach()] + [x.grad for x in leaves])
    for got, ref in zip(results[1], results[0]):
        assert rel_err(got, ref) <= TOL[torch.float32]


def test_auto_picks_torch_on_cpu():
    q, k, v, a, _ = make_inputs("token", 1, 70, 1, 8, 8, torch.float32)
    assert resolve_backend("auto", q) == "torch"
    o_auto, _ = kernels.linear_attention(q, k, v, a)
    o_torch, _ = linear_attention(q, k, v, a, backend="torch")
    o_naive, _ = linear_attention(q, k, v, a, backend="naive")
    assert torch.equal(o_auto, o_torch)
    assert not torch.equal(o_auto, o_naive)  # so that the check above could tell torch from naive


def test_import_does_not_pull_in_triton():
    import subprocess
    import sys

    code = "import sys, kernels; kernels.linear_attention; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: {**t, "backend": "cuda"}, "unknown backend"),
        (lambda t: {**t, "k": t["k"][..., :4]}, "q and k must have the same shape"),
        (lambda t: {**t, "v": t["v"][:, :3]}, "v must be"),
        (lambda t: {**t, "q": t["q"][0]}, "4-D"),
        (lambda t: {**t, "log_decay": torch.zeros(2, 5)}, "log_decay must have shape"),
        (lambda t: {**t, "log_decay": torch.zeros(4)}, "log_decay with 1 dims"),
        (lambda t: {**t, "log_decay": torch.zeros(2, 5, 3, 4)}, "log_decay with 4 dims"),
        (lambda t: {**t, "log_decay": torch.zeros(2, 5, 2)}, "log_decay with 3 dims"),
        (lambda t: {**t, "initial_state": torch.zeros(2, 3, 8, 8)}, "initial_state must have shape"),
        # Before, an AttributeError from inside the checks, or an integer state taken silently.
        (lambda t: {**t, "log_decay": [-0.5] * 3}, "log_decay must be a floating-point tensor; got list"),
        (lambda t: {**t, "initial_state": [[0.0]]}, r"initial_state must be a floating-point tensor .* got list"),
        (lambda t: {**t, "initial_state": torch.zeros(2, 3, 8, 6, dtype=torch.long)},
         r"initial_state must be a floating-point tensor \(B, H, K, V\) = \(2, 3, 8, 6\); got torch.int64"),
        (lambda t: {**t, "v": t["v"].double()}, "one dtype"),
        (lambda t: {**t, "q": t["q"][:, :0], "k": t["k"][:, :0], "v": t["v"][:, :0],
                    "log_decay": torch.zeros(2, 0, 3)}, "at least 1"),
        (lambda t: {**t, "log_decay": torch.full((2, 5, 3), 0.5)}, "log_decay must be <= 0 .* largest value is 0.5"),
        (lambda t: {**t, "log_decay": torch.full((2, 5, 3), 0.5), "backend": "naive"}, "log_decay must be <= 0"),
    ],
)
def test_validation_errors(change, message):
    base = {
        "q": torch.randn(2, 5, 3, 8),
        "k": torch.randn(2, 5, 3, 8),
        "v": torch.randn(2, 5, 3, 6),
        "log_decay": -torch.rand(2, 5, 3),
        "initial_state": None,
        "backend": "torch",
    }
    args = change(base)
    with pytest.raises(ValueError, match=message):
        linear_attention(
            args["q"], args["k"], args["v"], args["log_decay"],
            initial_state=args["initial_state"], backend=args["backend"],
        )


def test_triton_group_size_model():
    """One walk over all chunks when batch x heads fill the GPU; groups (and a scan) when B = 1 and T is long."""
    from kernels.linear_attention.triton_chunk import _group_size

    assert _group_size(32, walkers=512, slots=132) == 32  # T = 2k, B = 16, H = 8: one group
    assert _group_size(16384, walkers=32, slots=132) == 4096  # T = 1M, B = 1: four groups fill 128 SMs
    assert _group_size(16384, walkers=32, slots=264) == 2048  # two walkers per SM: eight groups
    assert _group_size(512, walkers=32, slots=132) == 128
    assert _group_size(300, walkers=1, slots=0) == 18  # interpreter: ~sqrt(#chunks)


def test_triton_sparse_walk_only_with_fewer_walkers_than_sms():
    """The walk's settings change only where each SM would hold one walker, for the forms they were timed on."""
    from kernels.linear_attention.triton_chunk import SPARSE_WALK, _sparse_walk

    assert _sparse_walk(2, walkers=128, sms=132) == SPARSE_WALK[2] and SPARSE_WALK[2]["BV"] == 32  # B 4, T 8k
    assert _sparse_walk(0, walkers=128, sms=132) == SPARSE_WALK[0] and "BV" not in SPARSE_WALK[0]
    assert _sparse_walk(1, walkers=128, sms=132) == {}  # per token: slower so
    assert _sparse_walk(2, walkers=512, sms=132) == {}  # B 16, T 2k: the GPU is full
    assert _sparse_walk(2, walkers=128, sms=0) == {}  # no GPU (the interpreter)


def test_triton_plan_settings_are_shared_read_only(monkeypatch):
    """Plans of one head shape share their launch settings, made once: a plan's own change (the sparse walk's) stays
    in that plan, and an in-place change of the shared settings fails instead of reaching later plans."""
    from kernels.linear_attention import triton_chunk as tc

    q = torch.randn(1, 128, 2, 64, dtype=torch.bfloat16)
    a = torch.full((2,), -0.1)
    # As on a GPU with fewer walkers than SMs:
    monkeypatch.setattr(tc, "_sparse_walk", lambda decay, walkers, sms: {"num_warps": 8})
    changed = tc._Plan(q, q, a)
    monkeypatch.setattr(tc, "_sparse_walk", lambda decay, walkers, sms: {})
    plain = tc._Plan(q, q, a)
    assert changed.cfg["walk"]["num_warps"] == 8 and plain.cfg["walk"]["num_warps"] == 4
    assert plain.cfg["dqk"] is tc._Plan(q, q, a).cfg["dqk"]
    with pytest.raises(TypeError):
        plain.cfg["dqk"]["num_warps"] = 8


def test_triton_lists_each_strong_chunk_once():
    """Per channel, the forward lists the chunks whose total log decay reaches -CHUNK_SPAN_LIMIT in some channel, each
    once even when several K tiles see it; the sub-block kernels work on those alone, the others test the totals."""
    from kernels.linear_attention import triton_chunk as tc

    B, T, H, K = 1, 200, 2, 80  # four chunks, the last partial; K in two tiles of 64
    q = torch.randn(B, T, H, K)
    a = torch.full((B, T, H, K), -0.01)
    a[0, 64:128, 0, 3] = -3.0  # chunk 1 of head 0: strong in both K tiles
    a[0, 64:128, 0, 70] = -3.0
    a[0, 192:200, 1, 75] = -20.0  # chunk 3 of head 1, the partial one: strong in the second tile only
    a[0, 0:64, 1, 5] = -1.5  # chunk 0 of head 1: -96, mild
    plan = tc._Plan(q, q, a, k=q)
    count = int(plan.strong[0])
    assert sorted(plan.strong[1:1 + count].tolist()) == [0 * plan.NT + 1, 1 * plan.NT + 3]
    totals = plan.bl.view(H, plan.NT, K)
    torch.testing.assert_close(totals[0, 1, 3], torch.tensor(-192.0))
    torch.testing.assert_close(totals[1, 3, 0], torch.tensor(-0.08))  # 8 tokens of -0.01
    assert (totals.amin(-1) <= -tc.CHUNK_SPAN_LIMIT).sum() == count
    # b, the in-chunk running sum, is stored for the strong chunks (their kernels read it), padded rows continuing it;
    # mild chunks get e = e^(b - b_last / 2) instead, which dqk reads.
    padded = torch.cat([a, torch.zeros(B, plan.Tp - T, H, K)], dim=1)
    b = padded.view(B, plan.NT, tc.CHUNK, H, K).cumsum(2)
    stored = plan.b.view(B, plan.NT, tc.CHUNK, H, K)
    torch.testing.assert_close(stored[0, 1, :, 0], b[0, 1, :, 0])
    torch.testing.assert_close(stored[0, 3, :, 1], b[0, 3, :, 1])
    e = torch.exp(b[0, 0, :, 1] - 0.5 * b[0, 0, -1, 1])  # chunk 0 of head 1, mild
    torch.testing.assert_close(plan.eg[0, :64, 1], e)


@pytest.mark.parametrize("form", ["constant", "token", "channel"])
def test_triton_under_vmap_matches_each_member(form):
    """Stacked models (packed training) vmap the kernel: members fold into heads, one launch for all."""
    from torch.func import vmap

    torch.manual_seed(0)
    # Members and heads of different counts, so that folding them in the wrong order fails; one sequence (the batch
    # is left where it was, and the kernels cross it elsewhere).
    n, B, T, H, K, V = 3, 1, 20, 2, 16, 8
    q, k = torch.randn(n, B, T, H, K), torch.randn(n, B, T, H, K)
    v = torch.randn(n, B, T, H, V)
    shape = {"constant": (n, H), "token": (n, B, T, H), "channel": (n, B, T, H, K)}[form]
    g = -torch.rand(*shape) * 0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o, final = vmap(lambda *a: linear_attention(*a, backend="triton", output_final_state=True))(*leaves)
    (o.square().sum() + final.sum()).backward()
    refs = [x.clone().requires_grad_() for x in (q, k, v, g)]
    outs = [linear_attention(*(x[i] for x in refs), backend="naive", output_final_state=True) for i in range(n)]
    o_ref, final_ref = torch.stack([a for a, _ in outs]), torch.stack([b for _, b in outs])
    (o_ref.square().sum() + final_ref.sum()).backward()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    for got, ref in zip(leaves, refs):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-3)


def assert_compiled_matches_eager(f, inputs):
    """f compiled whole (fullgraph: any graph break fails) gives eager's loss and every input's gradient."""
    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["constant", "token", "channel"])
def test_triton_compiles_in_one_graph(form):
    """The Triton backend is a custom op: torch.compile(fullgraph=True) fails on any graph break, and the
    compiled forward and every gradient (initial state included) equal eager ones."""
    torch.manual_seed(0)
    # Two chunks, off the grid; batch and heads of different sizes, so that the fake outputs' shapes tell them apart.
    B, T, H, K, V = 1, 70, 2, 16, 8
    shape = {"constant": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[form]
    inputs = [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V),
              -torch.rand(*shape) * 0.5, torch.randn(B, H, K, V)]

    def f(q, k, v, g, h0):
        o, final = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
        return o.square().sum() + final.sum()

    assert_compiled_matches_eager(f, inputs)


@pytest.mark.parametrize("form", FORMS)
def test_triton_batch_beyond_the_grid_runs_in_pieces(monkeypatch, form):
    """CUDA caps a grid's y and z at 65535, where the kernels put batch x heads: a larger batch runs in pieces (here
    the cap lowered to 5, so B 3 x H 2 runs as batches of 2 and 1), outputs, state and every gradient as naive's."""
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "MAX_BATCH_HEADS", 5)
    pieces = []
    plan = triton_chunk._Plan.__init__

    def counting(self, q, *args, **kwargs):
        pieces.append(q.shape[0])
        plan(self, q, *args, **kwargs)

    monkeypatch.setattr(triton_chunk._Plan, "__init__", counting)
    check_against_naive("triton", form, 3, 37, 2, 16, 8, torch.float32)
    assert pieces and set(pieces) == {2, 1}  # no plan of the whole batch, which the cap would refuse
    if form != "channel":
        q, k, v, a, h0 = make_inputs(form, 3, 37, 2, 16, 16, torch.float32, with_state=True)
        qkv = torch.stack((q, k, v), dim=2).detach().requires_grad_()
        g = torch.Generator().manual_seed(1)
        do, dht = torch.randn(v.shape, generator=g), torch.randn(h0.shape, generator=g)
        for x, y in zip(run_packed("triton", qkv, a, h0, do, dht), run_packed("naive", qkv, a, h0, do, dht)):
            assert rel_err(x, y) <= TOL[torch.float32]


def test_triton_refuses_more_heads_than_the_grid_takes(monkeypatch):
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "MAX_BATCH_HEADS", 3)
    q, k, v, a, _ = make_inputs("token", 2, 5, 4, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="at most 3 heads, got 4"):
        linear_attention(q, k, v, a, backend="triton")
    with pytest.raises(ValueError, match=r"at most 3 \(batch x heads\) pairs in one call, got 2 x 2"):
        triton_chunk._Plan(q[:, :, :2], v[:, :, :2], a[:, :, :2])  # unsplit, as under vmap


# --------------------------------------------------------------------------- q, k, v packed as one tensor


def run_packed(backend, qkv, a, h0, do, dht):
    """linear_attention_packed's outputs and gradients (qkv, log decay where it needs one, initial state)."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in (qkv, a, h0)]
    o, state = kernels.linear_attention_packed(leaves[0], leaves[1], initial_state=leaves[2], output_final_state=True,
                                               backend=backend)
    ((o.float() * do).sum() + (state * dht).sum()).backward()
    return [o.detach(), state.detach()] + [x.grad for x in leaves if x.requires_grad]


#: (backend, form, (B, T, H, D), learned decay): the packed kernels (triton, scalar decays) over the shapes of SHAPES
#: with K = V (the packed rows' head stride crossed by the second); the paths that split first (per channel, the torch
#: backend) once each.
PACKED_CASES = (
    [("triton", form, shape, learned) for form in ("constant", "token")
     for shape in [(1, 1, 1, 16), (2, 37, 2, 16), (1, 129, 1, 32)] for learned in (True, False)]
    + [("triton", "channel", (2, 37, 2, 16), True)]
    + [("torch", form, (2, 37, 2, 16), True) for form in FORMS]
)


@pytest.mark.parametrize("backend,form,shape,learned", PACKED_CASES)
def test_packed_matches_naive_on_the_split(backend, form, shape, learned):
    """(B, T, 3, H, D) in: the same outputs and gradients as the naive recurrence on q, k, v = its three slices, with
    the decay learned (its gradient too) or fixed (lightning's buffer: the triton backward's own path)."""
    batch, time, heads, dim = shape
    q, k, v, a, h0 = make_inputs(form, batch, time, heads, dim, dim, torch.float32, with_state=True)
    # From a SiLU, as lightning's: the slices are views of a tensor that is not a leaf.
    qkv = torch.stack((q, k, v), dim=2).detach().requires_grad_()
    a = a.detach().requires_grad_(learned)
    g = torch.Generator().manual_seed(1)
    do, dht = torch.randn(v.shape, generator=g), torch.randn(h0.shape, generator=g)
    got = run_packed(backend, qkv, a, h0, do, dht)
    ref = run_packed("naive", qkv, a, h0, do, dht)
    o_split, _ = linear_attention(q, k, v, a, initial_state=h0, backend="naive")
    torch.testing.assert_close(ref[0], o_split.detach())  # the reference does what it says
    assert len(got) == len(ref) == 4 + learned
    for name, x, y in zip(("o", "state", "qkv", "log_decay" if learned else "h0", "h0"), got, ref):
        assert rel_err(x, y) <= TOL[torch.float32], f"{name}: {rel_err(x, y)}"


@pytest.mark.parametrize("form", ["constant", "token"])
def test_triton_packed_silu_bf16(form):
    """bf16, as lightning trains, on the SiLU of a joint projection: output and the projection's gradient within the
    bf16 tolerance of naive in fp32."""
    # One sequence: the packed kernels' batch and heads are crossed in test_packed_matches_naive_on_the_split.
    q, k, v, a, _ = make_inputs(form, 1, 70, 2, 32, 32, torch.bfloat16)
    proj = torch.stack((q, k, v), dim=2).detach()
    a = a.detach().float()
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for backend, x in (("triton", proj), ("naive", proj.float())):
        leaf = x.clone().requires_grad_()
        o, _ = kernels.linear_attention_packed(torch.nn.functional.silu(leaf), a, backend=backend)
        (o.float() * do).sum().backward()
        results.append((o.detach().float(), leaf.grad.float()))
    for got, ref in zip(*results):
        assert rel_err(got, ref) <= TOL[torch.bfloat16]


def test_packed_compiles_in_one_graph():
    """The packed Triton path is a custom op too: fullgraph compile, forward and every gradient equal eager."""
    torch.manual_seed(0)
    B, T, H, D = 1, 70, 2, 16  # as test_triton_compiles_in_one_graph
    inputs = [torch.randn(B, T, 3, H, D), -torch.rand(H) * 0.5, torch.randn(B, H, D, D)]

    def f(proj, g, h0):
        o, final = kernels.linear_attention_packed(torch.nn.functional.silu(proj), g, initial_state=h0,
                                                   output_final_state=True, backend="triton")
        return o.square().sum() + final.sum()

    assert_compiled_matches_eager(f, inputs)


def test_packed_under_vmap_matches_each_member():
    """Stacked models vmap the packed call: members folded into the heads, one launch for all."""
    from torch.func import vmap

    torch.manual_seed(0)
    n, B, T, H, D = 2, 1, 20, 2, 16
    qkv, g = torch.randn(n, B, T, 3, H, D), -torch.rand(n, H) * 0.5
    leaf = qkv.clone().requires_grad_()
    o = vmap(lambda x, a: kernels.linear_attention_packed(x, a, backend="triton")[0])(leaf, g)
    o.square().sum().backward()
    ref = qkv.clone().requires_grad_()
    o_ref = torch.stack([kernels.linear_attention_packed(ref[i], g[i], backend="naive")[0] for i in range(n)])
    o_ref.square().sum().backward()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("qkv_shape", [(1, 4, 2, 2, 8), (1, 4, 2, 8)])
def test_packed_validation_errors(qkv_shape):
    with pytest.raises(ValueError, match="qkv must be a"):
        kernels.linear_attention_packed(torch.randn(qkv_shape), -torch.rand(2))


#: The fused walks (`triton_chunk.FUSED_MIN_HEADS_PER_SM`): (form, (B, T, H, K, V), strong decays). Strong scalar
#: decays need two heads (the even strong, the odd mild); the several chunks one, as in SHAPES.
FUSED_CASES = [(form, shape, strong) for form in ("constant", "token")
               for shape, strong in [((1, 1, 1, 16, 16), False), ((2, 37, 2, 16, 32), True),
                                     ((1, 129, 1, 32, 16), False), ((1, 70, 2, 64, 64), True)]]


@pytest.mark.parametrize("form,shape,strong", FUSED_CASES)
def test_triton_fused_walks_match_naive(monkeypatch, form, shape, strong):
    """One program per (batch, head) over all chunks: with a fixed decay, forward and backward both fused (outputs,
    final state, dq, dk, dv, dh0); with a learned one, the fused forward then the chunked backward (also da)."""
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "FUSED_MIN_HEADS_PER_SM", 0)
    inputs = make_inputs(form, *shape, torch.float32, strong=strong, with_state=True)
    reference = naive_reference(inputs)
    check_against_naive_inputs("triton", inputs, torch.float32, reference)  # learned decay
    q, k, v, a, h0 = inputs
    # The fixed decay's reference is the learned one's: naive computes o, the state and these gradients alike whether
    # or not the decay takes one, from the same do and dht.
    do, dht, (o_ref, s_ref, g_ref) = reference
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    o, s = linear_attention(*leaves[:3], a.detach(), initial_state=leaves[3], output_final_state=True,
                            backend="triton")
    ((o * do).sum() + (s * dht).sum()).backward()
    results = [[o_ref, s_ref] + [g_ref[name] for name in ("q", "k", "v", "initial_state")],
               [o.detach(), s.detach()] + [x.grad for x in leaves]]
    for name, got, ref in zip(("o", "state", "dq", "dk", "dv", "dh0"), results[1], results[0]):
        assert rel_err(got, ref) <= TOL[torch.float32], f"{name}: {rel_err(got, ref)}"


@pytest.mark.parametrize("form", ["constant", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_walks_packed(monkeypatch, form, dtype):
    """Packed q, k, v (lightning's layout) through the fused walks, with a fixed decay: no chunk state walk runs, and
    the output, final state and gradients of qkv and h0 match naive on the three slices."""
    from kernels.linear_attention import triton_chunk

    monkeypatch.setattr(triton_chunk, "FUSED_MIN_HEADS_PER_SM", 0)

    def no_walks(*args, **kwargs):
        raise AssertionError("the chunked path ran")

    monkeypatch.setattr(triton_chunk._Plan, "states", no_walks)
    q, k, v, a, h0 = make_inputs(form, 2, 70, 2, 32, 32, dtype, with_state=True)
    qkv = torch.stack((q, k, v), dim=2).detach().requires_grad_()
    g = torch.Generator().manual_seed(1)
    do, dht = torch.randn(v.shape, generator=g), torch.randn(h0.shape, generator=g)
    got = run_packed("triton", qkv, a.detach(), h0, do, dht)
    ref = run_packed("naive", qkv.float().detach().requires_grad_(), a.detach(), h0, do, dht)
    assert len(got) == len(ref) == 4
    for name, x, y in zip(("o", "state", "qkv", "h0"), got, ref):
        assert rel_err(x.float(), y) <= TOL[dtype], f"{name}: {rel_err(x.float(), y)}"


def test_triton_fused_walks_only_where_they_apply(monkeypatch):
    """The fused walks take scalar decays with heads of at most 64, when forced (0) on the CPU; never with None, per
    channel, or wider heads; and (the GPU rule) not on a CPU tensor unless forced."""
    from kernels.linear_attention import triton_chunk as tc

    def fused(K=64, V=64, decay_shape=(2,), dtype=torch.bfloat16):
        q = torch.empty(1, 128, 2, K, dtype=dtype)
        saved = {1: None, 3: (torch.empty(1, 128, 2),), 4: (torch.empty(1, 128, 2, K), None, None, None)}
        return tc._Plan(q, torch.empty(1, 128, 2, V, dtype=dtype), torch.empty(decay_shape),
                        saved[len(decay_shape)]).fused

    monkeypatch.setattr(tc, "FUSED_MIN_HEADS_PER_SM", 0)
    assert fused() and fused(decay_shape=(1, 128, 2)) and fused(K=16, V=32) and fused(dtype=torch.float32)
    assert not fused(decay_shape=(1, 128, 2, 64)) and not fused(K=80) and not fused(V=128)
    monkeypatch.setattr(tc, "FUSED_MIN_HEADS_PER_SM", None)
    assert not fused()
    monkeypatch.setattr(tc, "FUSED_MIN_HEADS_PER_SM", 4)
    assert not fused()  # no SMs to count on the CPU


def test_triton_refuses_a_second_derivative_instead_of_returning_zero():
    # before, create_graph=True gave gradients that did not require grad, and a second derivative of 0
    q, k, v, a, _ = make_inputs("token", 1, 20, 1, 8, 8, torch.float32)
    o, _ = linear_attention(q, k, v, a, backend="triton")
    (gq,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()

"""The head and its cross-entropy loss at the 135M model's shapes (M 131,072 tokens, d 768, V 32,000; issue 8's 50%
MFU): our chunked loss (kernels.fused.triton_ce: cuBLAS logits, a Triton row pass that overwrites them with their
gradient, two cuBLAS gradient GEMMs) against quack 0.6.5's two pipelines, its chunked one (the same plan on its own
kernels) and its scaled-exp one (the logits GEMM's epilogue writes the softmax's numerators and the rows' partial
sums, so no row pass reads the logits; the gradient GEMMs scale them on load).

    python docs/bench/lce_study.py check    # loss, dx, dW against fp32 math, at 8,192 and 5,000 rows (ragged chunks)
    python docs/bench/lce_study.py time     # forward + backward as CUDA-graph replays, median ms of do_bench
    python docs/bench/lce_study.py tiles    # the scaled-exp logits GEMM on tiles 128 wide (pingpong) against 256
    python docs/bench/lce_study.py energy   # the same loops sustained at the power cap: ms, W, J a call
    python docs/bench/lce_study.py pipetiles  # training's pipeline with each of its three GEMMs on other tiles
    python docs/bench/lce_study.py pipetrace  # without a GPU: those GEMMs built for sm_90a up to their launch

Needs quack-kernels and the CUTLASS DSL beside torch on a Hopper GPU (docs/bench/gemm_epilogue_verify.sh).
"""

import contextlib
import json
import sys

import torch

from kernels.fused import linear_cross_entropy
from kernels.gemm_epilogue import linear_cross_entropy_epilogue

D, V = 768, 32000
M = 64 * 2048  # one microbatch of the README's command


def _inputs(m: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # The head's input is the final norm's output (rows of RMS about 1); the weight as the LM initialises it.
    x = torch.randn(m, D, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (m,), device="cuda", generator=g)
    t[torch.rand(m, device="cuda", generator=g) < 0.05] = -100  # some ignored rows, as MQAR's labels have
    return x, w, t


def _cases(chunks=(4096, 8192, 16384)):
    """name -> fn(x, w, t) returning the mean loss (fp32 scalar)."""
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    cases = {"ours triton 4096": lambda x, w, t: linear_cross_entropy(x, w, t, backend="triton")}
    # Its base pipeline (it picks the scaled-exp one itself where eligible), on quack's untuned default tiles.
    cases["quack chunked 4096"] = lambda x, w, t: chunked_linear_cross_entropy(x, w, t, chunk_size=4096, tuned=False,
                                                                               use_scaled_exp=False)
    for c in chunks:
        cases[f"quack scaled-exp {c}"] = lambda x, w, t, c=c: linear_cross_entropy_epilogue(x, w, t, chunk_tokens=c)
    return cases


def _tile_cases(chunks=(8192, 16384)):
    """The scaled-exp pipeline with its logits GEMM on tiles 128 wide (pingpong) against quack's pick for V 32000
    (256, cooperative): name -> fn(x, w, t)."""
    from quack.linear_cross_entropy import scaled_exp_linear_cross_entropy as lce

    cases = {}
    for c in chunks:
        for n1 in (256, 128):
            cases[f"quack scaled-exp {c} tile_n1 {n1}"] = (
                lambda x, w, t, c=c, n1=n1: lce(x, w, t, chunk_size=c, reduction="sum", tile_n1=n1)
                / (t != -100).sum())
    return cases


# The scaled-exp pipeline's three GEMMs per chunk, by their names in quack.linear_cross_entropy, and the tiles quack
# 0.6.5 gives them there (tile_N of the logits GEMM is LOSS_TILE_N, training's, and stays). In the thirty-sixth
# session's profiles these ran at 0.77-0.86 ms per chunk of 8,192 tokens where a plain GEMM of the same size took 0.60:
# the two gradient GEMMs scale their A operand on load (a register-sourced mainloop), the logits GEMM's epilogue
# writes exps and row sums. Other tiles for each, one at a time. (Not the gradient GEMMs' tile_M: quack's loop builds
# their A operand's bundle for 128-row tiles, which a 256-row GEMM refuses.)
PIPE_GEMMS = {"logits": ("scaled_exp_target_epi", dict(tile_M=128, cluster_M=2, cluster_N=1, pingpong=True)),
              "dx": ("_lce_vscale_epi", dict(tile_M=128, tile_N=192, tile_K=64, cluster_M=2, cluster_N=1)),
              "dw": ("identity_epi", dict(tile_M=128, tile_N=192, tile_K=64, cluster_M=1, cluster_N=2))}
PIPE_VARIANTS = {
    "logits": [dict(cluster_M=1), dict(cluster_M=1, cluster_N=2), dict(tile_M=256, pingpong=False)],
    "dx": [dict(pingpong=True), dict(tile_N=256), dict(cluster_M=1), dict(cluster_M=1, cluster_N=2)],
    "dw": [dict(pingpong=True), dict(tile_N=256), dict(cluster_M=2, cluster_N=1), dict(cluster_N=1)],
}


class _Retiled:
    """One of quack's epilogue GEMM objects whose ``gemm`` calls take ``overrides`` over the caller's tiles."""

    def __init__(self, real, overrides: dict):
        self.real, self.overrides = real, overrides

    def gemm(self, *args, **kwargs):
        return self.real.gemm(*args, **{**kwargs, **self.overrides})

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def _retiled(gemm: str, overrides: dict):
    """Within, the scaled-exp pipeline runs its GEMM ``gemm`` (a PIPE_GEMMS key) with ``overrides`` over its tiles:
    its loop looks the GEMM objects up in its module at each call, so the stand-in is what it calls."""
    import quack.linear_cross_entropy as q

    name = PIPE_GEMMS[gemm][0]
    real = getattr(q, name)
    setattr(q, name, _Retiled(real, overrides))
    try:
        yield
    finally:
        setattr(q, name, real)


def _pipe_cases() -> dict:
    """Training's head + loss (linear_cross_entropy_epilogue: chunks of 8,192, LOSS_TILE_N) as it is, then with each
    variant of PIPE_VARIANTS: name -> fn(x, w, t)."""
    cases = {"pipeline as quack tiles it": lambda x, w, t: linear_cross_entropy_epilogue(x, w, t)}
    for gemm, variants in PIPE_VARIANTS.items():
        for overrides in variants:
            def fn(x, w, t, gemm=gemm, overrides=overrides):
                with _retiled(gemm, overrides):
                    return linear_cross_entropy_epilogue(x, w, t)
            cases[f"{gemm} {json.dumps(overrides)}"] = fn
    return cases


def pipetiles() -> None:
    """Each retiled pipeline checked against fp32 math at 8,192 rows, then timed as training's step runs it."""
    cases = _pipe_cases()
    _check(cases, 8192)
    _time(cases)


def pipetrace() -> None:
    """Without a GPU: each variant's GEMM built for sm_90a up to its launch (refusing CPU tensors), with the device
    queries answered as an H100 would. Needs quack and the CUTLASS DSL importable and CUTE_DSL_ARCH=sm_90a."""
    import quack.linear_cross_entropy as q
    from gemm_epilogue_study import as_h100, report_builds  # beside this script
    from quack.operand_transform.host import transform_a_operand

    as_h100()  # after the imports: it answers for the quack modules loaded by then

    m = 1024
    x, w = torch.randn(m, D, dtype=torch.bfloat16), torch.randn(V, D, dtype=torch.bfloat16)
    e, strip = torch.randn(m, V, dtype=torch.bfloat16), torch.randn(V // 64, m, dtype=torch.bfloat16)
    rows = [torch.empty(m, V // 128) for _ in range(2)] + [torch.empty(m) for _ in range(2)]
    calls = {
        "logits": lambda t: q.scaled_exp_target_epi.gemm(
            x, w, e, epi_args=dict(max_log2=128, sum_exp=rows[0], max_log2_out=rows[1], target=torch.zeros(m).long(),
                                   target_logit=rows[2]), tile_N=128, **t),
        "dx": lambda t: q._lce_vscale_epi.gemm(
            transform_a_operand(q._lce_dx_scale, e, {"u": strip}, t["tile_M"], 64), w.mT, torch.empty(m, D).bfloat16(),
            epi_args=dict(v=rows[3].unsqueeze(0)), transform_a=q._lce_dx_scale, **t),
        "dw": lambda t: q.identity_epi.gemm(
            transform_a_operand(q._lce_dw_scale, e.t(), {"u": strip}, t["tile_M"], 64), x.mT, torch.empty(V, D),
            epi_args={}, transform_a=q._lce_dw_scale, add_to_output=True, **t),
    }
    report_builds({f"{gemm} {json.dumps(overrides)}": lambda gemm=gemm, overrides=overrides:
                   calls[gemm]({**PIPE_GEMMS[gemm][1], **overrides})
                   for gemm, variants in PIPE_VARIANTS.items() for overrides in [{}] + variants})


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _check(cases: dict, rows: int) -> None:
    """Each case's loss and gradients against fp32 math on the same bf16 inputs of `rows` rows."""
    x, w, t = _inputs(rows)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xf @ wf.T, t, ignore_index=-100)
    rdx, rdw = torch.autograd.grad(ref, (xf, wf))
    for name, fn in cases.items():
        loss = fn(x, w, t)
        dx, dw = torch.autograd.grad(loss, (x, w))
        row = {"case": name, "rows": rows, "loss": round(abs(loss.item() - ref.item()) / ref.item(), 7),
               "dx": round(_rel(dx, rdx), 5), "dw": round(_rel(dw, rdw), 5)}
        print("CHECK", json.dumps(row), flush=True)


def check() -> None:
    """Each pipeline's loss and gradients against fp32 math, at 8,192 rows and at 5,000 (a ragged last chunk)."""
    for rows in (8192, 5000):
        _check(_cases(chunks=(4096,)), rows)


def _graphed(fn, x, w, t):
    """fn's forward + backward captured as one CUDA graph (training replays it so: no host time in the timing)."""
    def step():
        loss = fn(x, w, t)
        return torch.autograd.grad(loss, (x, w))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles quack's kernels and fills its caches outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _time(cases: dict) -> None:
    """Each case's forward + backward at M tokens as graph replays, median ms of do_bench."""
    from triton.testing import do_bench

    x, w, t = _inputs(M)
    for name, fn in cases.items():
        try:
            ms = do_bench(_graphed(fn, x, w, t), warmup=25, rep=200)
        except Exception as exc:  # one pipeline failing to build or capture must not hide the others' times
            print("TIME", json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            continue
        print("TIME", json.dumps({"case": name, "tokens": M, "ms": round(ms, 3)}), flush=True)


def time() -> None:
    """Forward + backward of the head and loss on each pipeline."""
    _time(_cases())


def tiles() -> None:
    """The scaled-exp pipeline's logits GEMM on 128-wide tiles against 256: checked, then timed."""
    _check(_tile_cases(chunks=(4096,)), 8192)
    _time(_tile_cases())


def energy(seconds: float = 8.0) -> None:
    """Ours against the scaled-exp pipeline at chunks of 4,096 and 8,192, looped at the power cap."""
    from gemm_epilogue_study import _sustained  # beside this script

    x, w, t = _inputs(M)
    cases = {k: _graphed(f, x, w, t) for k, f in _cases(chunks=(4096, 8192)).items() if "chunked" not in k}
    _sustained(cases, seconds, label="head + loss")


if __name__ == "__main__":
    modes = {"check": check, "time": time, "tiles": tiles, "energy": energy, "pipetiles": pipetiles,
             "pipetrace": pipetrace}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: python docs/bench/lce_study.py {'|'.join(modes)}")
    modes[sys.argv[1]]()

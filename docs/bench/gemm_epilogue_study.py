"""The SwiGLU MLP and lightning's q, k, v SiLU in the epilogues of quack's GEMMs (kernels/gemm_epilogue.py) against
the plain modules as training compiles them, at the 135M model's shapes (issue 8's 50% MFU).

    python docs/bench/gemm_epilogue_study.py check   # outputs and gradients against fp32 math, next to plain bf16's
    python docs/bench/gemm_epilogue_study.py time    # forward + backward of one layer's MLP and q, k, v (do_bench)
    python docs/bench/gemm_epilogue_study.py tiles   # each epilogue GEMM, default config and autotuned, vs cuBLAS's mm
    python docs/bench/gemm_epilogue_study.py plain   # the GEMMs left on cuBLAS against quack's autotuned plain GEMM
    python docs/bench/gemm_epilogue_study.py residual   # the residual add in cuBLAS's addmm vs inductor's add + norm
    python docs/bench/gemm_epilogue_study.py tail_check   # the block's tail (residual_norm_mlp) against fp32 math
    python docs/bench/gemm_epilogue_study.py tail_time    # its forward + backward against the current "gemm" tail
    python docs/bench/gemm_epilogue_study.py tail_tiles   # its four epilogue GEMMs, default config and autotuned
    python docs/bench/gemm_epilogue_study.py gate_tiles   # the MLP's gate-gradient GEMM, kept gate output or not
    python docs/bench/gemm_epilogue_study.py tail_energy  # J and ms a call of both tails, looped (the power cap)
    python docs/bench/gemm_epilogue_study.py plain_energy # the cuBLAS GEMMs of the step against quack's, looped
    CUTE_DSL_ARCH=sm_90a python docs/bench/gemm_epilogue_study.py trace   # no GPU: build the nine kernels as the
        # wrapper calls them, up to their launch, which must then refuse the CPU tensors: checks that quack imports and
        # takes the calls' arguments and builds the kernels; shapes are checked only at the launch (a wrong K passes)

Needs quack-kernels and the CUTLASS DSL beside torch on a Hopper GPU (the fa4 extra's packages; see
docs/bench/gemm_epilogue_verify.sh for how they reach the lent machine).
"""

import contextlib
import functools
import json
import sys

import torch
import torch.nn.functional as F

import kernels.gemm_epilogue as ge
from kernels.gemm_epilogue import (epilogues_usable, linear_add, linear_silu, residual_norm_mlp,
                                   residual_norm_mlp_reference, swiglu_mlp, swiglu_mlp_reference)

D = 768  # the 135M model's width; hidden 1792 for lightning's MLP, 2048 for softmax's
M = 64 * 2048  # one microbatch of the README's command: 64 sequences of 2048 tokens


def _weights(f, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((f, D), (f, D), (D, f))
    return [(torch.randn(*s, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_() for s in shapes]


def _fwd_bwd(fn, *args, dy):
    """A call of fn(*args) under bf16 autocast and its backward from dy, for do_bench and the sustained loops."""
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(*args)
        y.backward(dy)
    return run


@contextlib.contextmanager
def _keeps_gate(keep: bool):
    """Within, the SwiGLU MLP keeps its gate's output for the backward or not (gemm_epilogue.MLP_KEEPS_GATE), which is
    restored after: the other cases run on training's default."""
    saved = ge.MLP_KEEPS_GATE
    ge.MLP_KEEPS_GATE = keep
    try:
        yield
    finally:
        ge.MLP_KEEPS_GATE = saved


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _compare(op, fused_fn, plain_fn, inputs, dy, names, **meta) -> float:
    """Print the fused op's and the plain bf16 op's errors against fp32 math (output and each input's gradient, as
    (fused, plain) pairs); return the worst ratio of fused to plain."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    ref = plain_fn(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dy.float())
    row = {"op": op, **meta}
    for label, fn in (("fused", fused_fn), ("plain", plain_fn)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(*inputs)
        grads = torch.autograd.grad(y, inputs, dy)
        for name, a, r in zip(("out", *names), (y, *grads), (ref, *ref_grads)):
            row.setdefault(name, []).append(round(_rel(a, r), 5))
    print("CHECK", json.dumps(row), flush=True)
    return max(v[0] / max(v[1], 1e-3) for v in row.values() if isinstance(v, list))


def check() -> None:
    """Outputs and gradients of the fused ops and of the plain bf16 ones, each against fp32 math on the same inputs."""
    torch.manual_seed(0)
    worst = 0.0
    for m, f in ((4096, 1792), (1000, 2048)):  # the second: a row count no tile divides
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        assert epilogues_usable(x, f)
        dy = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        # The gate's gradient from quack's gemm_dact, then from dswiglu_epi with the forward's gate output kept.
        for keep, op in ((False, "swiglu_mlp"), (True, "swiglu_mlp_kept")):
            with _keeps_gate(keep):
                worst = max(worst, _compare(op, swiglu_mlp, swiglu_mlp_reference, (x, *_weights(f)), dy,
                                            ("dx", "dw1", "dw3", "dw2"), M=m, F=f))
        # lightning's q, k, v: its SiLU in the projection's epilogue
        w = (torch.randn(3 * D, D, device="cuda") * 0.02).requires_grad_()
        dq = torch.randn(m, 3 * D, device="cuda", dtype=torch.bfloat16)
        worst = max(worst, _compare("linear_silu", linear_silu, lambda x, w: F.silu(F.linear(x, w)), (x, w), dq,
                                    ("dx", "dw"), M=m))
        # the residual adds in the GEMMs' epilogues (gemm_add on the tiles pinned for the output projection and w2)
        r = torch.randn(m, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wo = (torch.randn(D, D, device="cuda") * 0.02).requires_grad_()
        worst = max(worst, _compare("linear_add", linear_add, lambda y, w, r: r + F.linear(y, w), (x, wo, r), dy,
                                    ("dy", "dw", "dres"), M=m))
        worst = max(worst, _compare("swiglu_mlp_add", lambda x, *ws: swiglu_mlp(x, *ws[:3], residual=ws[3]),
                                    lambda x, *ws: ws[3] + swiglu_mlp_reference(x, *ws[:3]), (x, *_weights(f), r), dy,
                                    ("dx", "dw1", "dw3", "dw2", "dres"), M=m, F=f))
    # The fused ops' error against fp32 should be of the plain bf16 ops' size (each pair is fused, plain).
    print(f"CHECK worst fused/plain error ratio {worst:.2f}: {'ok' if worst < 2 else 'LARGER THAN PLAIN'}", flush=True)


def time() -> None:
    """Forward + backward of one layer's MLP and q, k, v projection at M tokens: compiled plain modules against the
    epilogue GEMMs (eager calls and compiled), median ms of do_bench."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = []
    for f in (1792, 2048):
        ws = _weights(f)
        dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        cases = {"plain compiled": torch.compile(swiglu_mlp_reference), "fused": swiglu_mlp,
                 "fused compiled": torch.compile(swiglu_mlp), "fused kept": swiglu_mlp,
                 "fused kept compiled": torch.compile(swiglu_mlp)}
        for name, fn in cases.items():
            with _keeps_gate("kept" in name):  # the forward's gate output kept for the backward (dswiglu_epi)
                ms = do_bench(_fwd_bwd(fn, x, *ws, dy=dy), warmup=50, rep=300)
            rows.append({"op": f"mlp F={f}", "case": name, "ms": round(ms, 3)})
            print("TIME", json.dumps(rows[-1]), flush=True)
    w = (torch.randn(3 * D, D, device="cuda") * 0.02).requires_grad_()
    dq = torch.randn(M, 3 * D, device="cuda", dtype=torch.bfloat16)
    cases = {"plain compiled": torch.compile(lambda x, w: F.silu(F.linear(x, w))), "fused": linear_silu,
             "fused compiled": torch.compile(linear_silu)}
    for name, fn in cases.items():
        ms = do_bench(_fwd_bwd(fn, x, w, dy=dq), warmup=50, rep=300)
        rows.append({"op": "qkv silu", "case": name, "ms": round(ms, 3)})
        print("TIME", json.dumps(rows[-1]), flush=True)


def tiles() -> None:
    """Each epilogue GEMM alone at the lightning MLP's and q, k, v's shapes against cuBLAS's plain GEMM of the same
    shape (torch.mm, no epilogue): quack's default config (what the wrapper ran up to 2026-12-07), with and without
    its dynamic scheduler, w2 K-major for the gate's gradient, and autotuned (quack's search over its SM90 configs;
    QUACK_CACHE_DIR keeps every config's time). Median ms of do_bench; the winners' configs are printed."""
    from triton.testing import do_bench

    from kernels.gemm_epilogue import _quack

    quack = _quack()
    torch.manual_seed(0)
    f = 1792
    x, dy = (torch.randn(M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w13, w2, wqkv = ((torch.randn(*s, device="cuda") * 0.02).to(torch.bfloat16) for s in ((2 * f, D), (D, f), (3 * D, D)))
    w2_kmajor = w2.T.contiguous().T
    pre = x @ w13.T
    cases = {
        "gated fwd": (lambda **kw: quack.gemm_act(x, w13.T, activation="swiglu", store_preact=True, **kw),
                      lambda: x @ w13.T, {}),
        "dgated": (lambda b=w2, **kw: quack.gemm_dact(dy, b, pre, activation="swiglu", **kw), lambda: dy @ w2,
                   {"static": {"dynamic_scheduler": False}, "w2 K-major": {"b": w2_kmajor}}),
        "silu fwd": (lambda **kw: quack.gemm_act(x, wqkv.T, activation="silu", store_preact=True, **kw),
                     lambda: x @ wqkv.T, {}),
    }
    for name, (fused, plain, extra) in cases.items():
        row = {"op": name, "cublas_mm": round(do_bench(plain, warmup=50, rep=300), 3)}
        variants = {"quack_default": {}, **extra, "quack_tuned": {"tuned": True}}
        if name == "dgated":
            variants["quack_tuned_static"] = {"tuned": True, "dynamic_scheduler": False}
        for label, kw in variants.items():
            kw = {"tuned": False, **kw}
            fused(**kw)  # compiles (and tuned, searches) before the timing
            row[label] = round(do_bench(lambda: fused(**kw), warmup=50, rep=300), 3)
            print("TILES", json.dumps(row), flush=True)
    import gc

    from quack.autotuner import Autotuner

    for tuner in (o for o in gc.get_objects() if isinstance(o, Autotuner)):  # every search run: its winner per key
        for key, config in tuner.cache.items():
            best = (getattr(tuner, "configs_timings", None) or {}).get(config)
            print("WINNER", tuner.fn.__name__, str(key)[:160], config, best, flush=True)


def plain() -> None:
    """The plain GEMMs lightning's step runs on cuBLAS, at its 135M shapes (M 131072): torch.mm against quack's gemm
    autotuned, median ms of do_bench: is there a faster tile for them? (Not used in training.)"""
    from triton.testing import do_bench

    from kernels.gemm_epilogue import _quack

    quack = _quack()
    torch.manual_seed(0)
    shapes = {"o proj fwd (K 768, N 768)": (D, D), "w2 fwd (K 1792, N 768)": (1792, D),
              "qkv dx (K 2304, N 768)": (3 * D, D), "w13 dx (K 3584, N 768)": (3584, D)}
    for name, (k, n) in shapes.items():
        a = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        b = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16).T
        row = {"op": name, "cublas_mm": round(do_bench(lambda: a @ b, warmup=50, rep=300), 3)}
        quack.gemm(a, b, tuned=True)
        row["quack_tuned"] = round(do_bench(lambda: quack.gemm(a, b, tuned=True), warmup=50, rep=300), 3)
        print("TILES", json.dumps(row), flush=True)


def residual() -> None:
    """The residual add in the GEMM that writes a block's branch (cuBLAS addmm, beta 1) against inductor's add fused
    into the next norm, forward only, at the 135M model's shapes: does the add move into the GEMM for free?"""
    from triton.testing import do_bench

    torch.manual_seed(0)
    weight = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    norm = torch.compile(lambda y: F.rms_norm(y, (D,), weight, 1e-6))
    add_norm = torch.compile(lambda res, h, w: (lambda y: (y, F.rms_norm(y, (D,), weight, 1e-6)))(res + h @ w.T))
    for name, k in (("output projection (K 768)", D), ("w2 (K 1792)", 1792)):
        res, h = torch.randn(M, D, device="cuda", dtype=torch.bfloat16), torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(D, k, device="cuda") * 0.02).to(torch.bfloat16)
        row = {"op": name,
               "mm + add_norm compiled": round(do_bench(lambda: add_norm(res, h, w), warmup=50, rep=300), 3),
               "mm alone": round(do_bench(lambda: h @ w.T, warmup=50, rep=300), 3),
               "addmm alone": round(do_bench(lambda: torch.addmm(res, h, w.T), warmup=50, rep=300), 3),
               "addmm + norm compiled": round(do_bench(lambda: norm(torch.addmm(res, h, w.T)), warmup=50, rep=300), 3)}
        y0, n0 = add_norm(res, h, w)
        y1 = torch.addmm(res, h, w.T)
        row["max abs diff"] = (y0.float() - y1.float()).abs().max().item()
        print("RESIDUAL", json.dumps(row), flush=True)


def _tail_inputs(m, f, seed=0):
    """The block tail's inputs at m tokens: y, x (bf16, requiring grad), wo, norm weight, w1, w3, w2 (fp32 leaves)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    y, x = (torch.randn(m, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2))
    wo = (torch.randn(D, D, device="cuda", generator=g) * 0.02).requires_grad_()
    wn = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).requires_grad_()
    return (y, x, wo, wn, *_weights(f))


def _tail_fused(y, x, wo, wn, w1, w3, w2):
    """residual_norm_mlp on the tail's inputs (eps 1e-6, the model's)."""
    return residual_norm_mlp(y, x, wo, wn, 1e-6, w1, w3, w2)


def _tail_plain(y, x, wo, wn, w1, w3, w2):
    """The tail's plain PyTorch reference on the same inputs."""
    return residual_norm_mlp_reference(y, x, wo, wn, 1e-6, w1, w3, w2)


def _tail_gemm(y, x, wo, wn, w1, w3, w2):
    """The tail as "gemm" training ran it before residual_norm_mlp: cuBLAS's projection, inductor's add and norm, the
    MLP on the epilogue GEMMs."""
    h = x + F.linear(y, wo)
    return h + swiglu_mlp(F.rms_norm(h, (D,), wn.to(h.dtype), 1e-6), w1, w3, w2)


def tail_check() -> None:
    """residual_norm_mlp's output and gradients against fp32 math, next to the plain bf16 tail's."""
    worst = 0.0
    for m in (4096, 1000):
        inputs = _tail_inputs(m, 1792)
        dy = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
        worst = max(worst, _compare("residual_norm_mlp", _tail_fused, _tail_plain, inputs, dy,
                                    ("dy", "dx", "dwo", "dwn", "dw1", "dw3", "dw2"), M=m))
    print(f"CHECK worst fused/plain error ratio {worst:.2f}: {'ok' if worst < 2 else 'LARGER THAN PLAIN'}", flush=True)


def tail_time() -> None:
    """Forward + backward of a block's tail (output projection, residual, norm, MLP) at M tokens, F 1792: the plain
    modules compiled, the current "gemm" tail compiled, and residual_norm_mlp (eager and compiled); median ms."""
    from triton.testing import do_bench

    inputs = _tail_inputs(M, 1792)
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    cases = {"plain compiled": torch.compile(_tail_plain), "gemm compiled": torch.compile(_tail_gemm),
             "tail": _tail_fused, "tail compiled": torch.compile(_tail_fused)}
    for name, fn in cases.items():
        ms = do_bench(_fwd_bwd(fn, *inputs, dy=dy), warmup=50, rep=300)
        print("TIME", json.dumps({"op": "block tail F=1792", "case": name, "ms": round(ms, 3)}), flush=True)


def _sustained(cases: dict, seconds: float, rounds: int = 2, label: str = "") -> None:
    """Loop each case's call for about `seconds` (after 20 warm-up calls), the cases in turn, `rounds` times: ms and J a
    call, mean W and SM clock over the loop (nvidia-smi sampled every 200 ms, models.bench.ClockSampler). A GPU at its
    700 W cap runs such loops at the clock their energy allows, which do_bench's short bursts do not reach."""
    from models.bench import ClockSampler, _gpu_id

    for fn in cases.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    with ClockSampler(_gpu_id("cuda")) as clock:
        for rnd in range(1, rounds + 1):
            for name, fn in cases.items():
                n = 0
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                clock.mark()
                start.record()
                while True:
                    for _ in range(50):
                        fn()
                    n += 50
                    end.record()
                    end.synchronize()
                    if start.elapsed_time(end) > seconds * 1e3:
                        break
                clock.stop()
                ms = start.elapsed_time(end) / n
                got = clock.summary()
                watts = got["power_w"]
                row = {"op": label, "case": name, "round": rnd, "calls": n, "ms": round(ms, 4), "W": watts,
                       "J": round(watts * ms / 1e3, 5) if watts else None, "sm_clock_mhz": got["sm_clock_mhz"]}
                print("ENERGY", json.dumps(row), flush=True)


def tail_energy(seconds: float = 10.0) -> None:
    """Power and time of the tail's forward + backward (current "gemm" tail against residual_norm_mlp, both compiled),
    looped (`_sustained`). At the 700 W cap, time follows energy: a path that saves memory passes but spends more
    energy a call saves no time in training."""
    inputs = _tail_inputs(M, 1792)
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    cases = {"gemm compiled": torch.compile(_tail_gemm), "tail compiled": torch.compile(_tail_fused)}
    _sustained({name: _fwd_bwd(fn, *inputs, dy=dy) for name, fn in cases.items()}, seconds, label="block tail F=1792")


def plain_energy(seconds: float = 4.0) -> None:
    """The GEMMs lightning's 135M step runs on cuBLAS, each looped at the power cap (`_sustained`): torch.mm against
    quack's autotuned GEMM. In short bursts they were within 2% (`plain`); at the cap a kernel that moves less data
    inside the GPU a FLOP (larger tiles, clusters) would run at a higher clock."""
    from kernels.gemm_epilogue import _quack

    quack = _quack()
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    # (kind, rows, K, N) of A (rows, K) @ B (K, N), laid out as training hands them over: forward, activation @ weight^T;
    # input gradient, gradient @ weight; weight gradient, gradient^T @ activation, the tokens as K.
    shapes = {"o proj fwd": ("fwd", M, D, D), "w2 fwd": ("fwd", M, 1792, D), "qkv dx": ("dx", M, 3 * D, D),
              "w13 dx": ("dx", M, 3584, D), "qkv dw": ("dw", 3 * D, M, D), "w13 dw": ("dw", 3584, M, D),
              "head chunk fwd": ("fwd", 4096, D, 32000), "head chunk dx": ("dx", 4096, 32000, D)}
    for name, (kind, rows, k, n) in shapes.items():
        a = torch.randn(k, rows, **bf).T if kind == "dw" else torch.randn(rows, k, **bf)
        w = torch.randn(n, k, **bf) * 0.02 if kind == "fwd" else torch.randn(k, n, **bf) * 0.02
        b = w.T if kind == "fwd" else w
        try:
            quack.gemm(a, b, tuned=True)  # the search, before the loop
            _sustained({"cublas_mm": lambda: a @ b, "quack_tuned": lambda: quack.gemm(a, b, tuned=True)}, seconds,
                       label=name)
        except Exception as exc:  # noqa: BLE001 - a study: say what failed and go on
            print("ENERGY", json.dumps({"op": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)


def tail_tiles() -> None:
    """The tail's four epilogue GEMMs alone at M tokens against cuBLAS's plain GEMM of each shape: the pinned config
    (TILES) and autotuned; median ms, the winners' configs printed."""
    from kernels.gemm_epilogue import _library

    lib = _library()
    torch.manual_seed(0)
    f = 1792
    bf = dict(device="cuda", dtype=torch.bfloat16)
    y, x, dy = (torch.randn(M, D, **bf) for _ in range(3))
    wo, w13, w2 = ((torch.randn(*s, device="cuda") * 0.02).to(torch.bfloat16) for s in ((D, D), (2 * f, D), (D, f)))
    wn = torch.ones(D, device="cuda")
    rstd = torch.rand(M, device="cuda") + 0.5
    pre, dpre = torch.randn(M, 2 * f, **bf), torch.randn(M, 2 * f, **bf)
    corr = torch.randn(M, device="cuda") * 1e-3
    cases = {
        "residual": (lambda **kw: lib.rms_partial_epi(y, wo.T, x, weight=wn, **kw), lambda: y @ wo.T),
        "rstd_gated": (lambda **kw: lib.rstd_gated_preact_mod("swiglu")(y, w13.T, rstd=rstd, **kw), lambda: y @ w13.T),
        "dgated_rstd": (lambda **kw: lib.dswiglu_rstd_epi(dy, w2, pre, rstd=rstd, dynamic_scheduler=True, **kw),
                        lambda: dy @ w2),
        "norm_bwd": (lambda **kw: lib.rms_bwd_apply_epi(dpre, w13, dy, y=x, w=wn, corr=corr, **kw), lambda: dpre @ w13),
    }
    _epilogue_tiles(cases)


def gate_tiles() -> None:
    """The MLP's gate-gradient GEMM alone at M tokens: quack's gemm_dact (which also writes the gate's output) against
    ``dswiglu_epi`` (the output kept from the forward, MLP_KEEPS_GATE), each with and without quack's dynamic
    scheduler, on the pinned tiles (TILES' dgated) and autotuned, and cuBLAS's plain dy @ w2."""
    from kernels.gemm_epilogue import _library, _quack

    quack, lib = _quack(), _library()
    torch.manual_seed(0)
    f = 1792
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w2 = (torch.randn(D, f, device="cuda") * 0.02).to(torch.bfloat16)
    pre = torch.randn(M, 2 * f, device="cuda", dtype=torch.bfloat16)
    cases = {f"{name}{' dyn' if dyn else ''}": (functools.partial(fn, dynamic_scheduler=dyn), lambda: dy @ w2)
             for name, fn in (("dgated", lambda **kw: quack.gemm_dact(dy, w2, pre, activation="swiglu", **kw)),
                              ("dgated_kept", lambda **kw: lib.dswiglu_epi(dy, w2, pre, **kw)))
             for dyn in (False, True)}
    _epilogue_tiles(cases, kind=lambda name: "dgated")


def _epilogue_tiles(cases: dict, kind=lambda name: name) -> None:
    """Time each case's epilogue GEMM (fused(**kw), plain()) on its pinned tiles (TILES[kind(name)]) and autotuned,
    against the plain GEMM; print a TILES row per case and the autotuner's winners."""
    from triton.testing import do_bench

    from kernels.gemm_epilogue import _config

    for name, (fused, plain) in cases.items():
        row = {"op": name, "cublas_mm": round(do_bench(plain, warmup=50, rep=300), 3)}
        for label, kw in {"pinned": {"tuned": False, "config": _config(kind(name))}, "tuned": {"tuned": True}}.items():
            try:
                fused(**kw)  # compiles (and tuned, searches) before the timing
                row[label] = round(do_bench(lambda: fused(**kw), warmup=50, rep=300), 3)
            except Exception as exc:  # noqa: BLE001 - a study: say what failed and go on
                row[label] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print("TILES", json.dumps(row), flush=True)
    import gc

    from quack.autotuner import Autotuner

    for tuner in (o for o in gc.get_objects() if isinstance(o, Autotuner)):
        for key, config in tuner.cache.items():
            print("WINNER", tuner.fn.__name__, str(key)[:160], config, flush=True)


def as_h100():
    """Without a GPU: torch and quack's modules answer device queries as an H100 would (SM90, 132 SMs in pairs), so
    that quack's kernels build for sm_90a up to their launch; returns quack's GEMM interface."""
    from kernels.gemm_epilogue import _quack

    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    quack = _quack()
    assert quack is not None, "quack does not import"
    answers = {"get_device_capacity": lambda *a, **k: (9, 0), "get_max_active_clusters": lambda *a, **k: 66}
    for module in list(sys.modules.values()):  # wherever it is asked
        if getattr(module, "__name__", "").startswith("quack"):
            for attr, answer in answers.items():
                if hasattr(module, attr):
                    setattr(module, attr, answer)
    return quack


def report_builds(cases: dict) -> None:
    """Run each case (name -> fn) on CPU tensors under ``as_h100`` and print whether its kernel built and stopped only
    at its launch, refusing the CPU tensors (ok), or failed before."""
    for name, fn in cases.items():
        try:
            fn()
            print("TRACE", name, "launched on the CPU?", flush=True)
        except ValueError as exc:
            ok = "expected device_type=cuda" in str(exc)
            print("TRACE", name, "built, refused at launch (ok)" if ok else f"FAILED: {exc}", flush=True)


def trace() -> None:
    """Without a GPU: build the wrapper's quack kernels (gated, dgated, SiLU, the tail's four, the residual adds) at
    the 135M shapes for sm_90a up to their launch, with the device queries answered as an H100 would; each must stop
    only at the launch, refusing CPU tensors (a mismatched K is not caught before it). Needs quack and the CUTLASS DSL
    importable (under a site-packages folder) and CUTE_DSL_ARCH=sm_90a."""
    quack = as_h100()
    m, f = 1000, 1792
    x, w13, w2 = (torch.randn(*s, dtype=torch.bfloat16) for s in ((m, D), (2 * f, D), (D, f)))
    cases = {"gated": lambda: quack.gemm_act(x, w13.T, activation="swiglu", store_preact=True, tuned=False),
             "dgated": lambda: quack.gemm_dact(x, w2, torch.randn(m, 2 * f, dtype=torch.bfloat16), activation="swiglu",
                                               tuned=False),
             "silu": lambda: quack.gemm_act(x, w13[: 3 * D].T, activation="silu", store_preact=True, tuned=False)}
    from kernels.gemm_epilogue import _add_gemm, _config, _library

    lib = _library()
    wo, y, hw = (torch.randn(*s, dtype=torch.bfloat16) for s in ((D, D), (m, D), (m, D)))
    wn, rstd, corr = torch.ones(D), torch.rand(m) + 0.5, torch.randn(m)
    pre = torch.randn(m, 2 * f, dtype=torch.bfloat16)
    cases |= {
        "residual": lambda: lib.rms_partial_epi(y, wo.T, x, weight=wn, tuned=False, config=_config("residual")),
        "rstd_gated": lambda: lib.rstd_gated_preact_mod("swiglu")(hw, w13.T, rstd=rstd, tuned=False,
                                                                  config=_config("rstd_gated")),
        "dgated_rstd": lambda: lib.dswiglu_rstd_epi(x, w2, pre, rstd=rstd, tuned=False, dynamic_scheduler=True,
                                                    config=_config("dgated_rstd")),
        # The MLP's gate's gradient without the gate's output stored (gemm_epilogue.MLP_KEEPS_GATE).
        "dgated_kept": lambda: lib.dswiglu_epi(x, w2, pre, tuned=False, config=_config("dgated")),
        "norm_bwd": lambda: lib.rms_bwd_apply_epi(pre, w13, x, y=y, w=wn, corr=corr, tuned=False,
                                                  config=_config("norm_bwd")),
        # The residual adds in the GEMMs (linear_add, swiglu_mlp's residual, the tail's w2): quack's gemm_add.
        "add_wo": lambda: _add_gemm(y, wo.T, x, "add_wo"),
        "add_w2": lambda: _add_gemm(torch.randn(m, f, dtype=torch.bfloat16), w2.T, x, "add_w2"),
    }
    report_builds(cases)


MODES = {"check": check, "time": time, "tiles": tiles, "plain": plain, "residual": residual, "trace": trace,
         "tail_check": tail_check, "tail_time": tail_time, "tail_tiles": tail_tiles, "gate_tiles": gate_tiles,
         "tail_energy": tail_energy,
         "plain_energy": plain_energy}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in MODES:
        sys.exit(f"usage: python docs/bench/gemm_epilogue_study.py MODE, MODE one of {', '.join(MODES)}")
    MODES[sys.argv[1]]()

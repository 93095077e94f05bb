"""The measurements behind docs/bench/kernels.md's 135M training-speed study (issue 8) other than `slab bench train`'s
tables: one training-bench run with the levers tried one at a time, and the GPU idle gaps of a profiler trace.

The levers were tried as patches on the code of commit f82e154, before any of them landed; run them there:

    git worktree add /tmp/f82e154 f82e154
    PYTHONPATH=/tmp/f82e154 python docs/bench/train_study.py variant NAME softmax|lightning [OPTION ...]
    python docs/bench/train_study.py gaps /tmp/train_study/trace_NAME.json   # after a run with the trace option
    (profiles and traces go to $TRAIN_STUDY_OUT where set, else /tmp/train_study)
    python docs/bench/train_study.py loss   # the loss kernel's row held at 16 bits or at 32 (on current code)
    python docs/bench/train_study.py norm   # the RMSNorm kernels' launch settings (on current code)

OPTIONS (any mix): resid16 (the residual stream in bf16), bthd (attention on (B, T, H, Dh) views), ce / ce1 (the
fused head + loss, default chunks / one chunk), b32 (64k tokens per step, microbatch 32), h6 (6 heads of 128),
noclip (no gradient clipping), b64 / b128 (128k / 256k tokens per step, microbatch 64 / 128), b64x2 (256k tokens
per step in two microbatches of 64), qkvg (lightning's wqkv
and wgate as one projection), w13 (the MLP's w1 and w3 as one projection), flash (SDPA's flash backend instead of
cuDNN), eager / ro / mat (no compile, reduce-overhead, max-autotune-no-cudagraphs; default: torch.compile's default
mode), fused (all fused kernels), prof (a torch.profiler table), trace (a chrome trace of three steps), hostt (host
time per step by call), wideloss (the loss kernel holds a row of logits in fp32, as before NARROW_ROWS), nomos /
mostune (inductor's mixed-order reductions, the norms' backward, without pipelined loads, as torch 2.11's default /
with their row split autotuned), moreads / monostrict (those reductions without their limit on the buffers a kernel
reads / without their size checks: does one of them split the next norm's backward behind the tail?), pdl (inductor's kernels launched with programmatic dependent launch), ce16k (the
fused loss in chunks of at least 16384 tokens rather than 4096: fewer fp32 additions into grad_W), gategemm (the
MLP on swiglu_gemm_study.py's prototype kernels: SwiGLU's gate in Triton GEMM epilogues), budget75 / budget60 (the
compiled backward's partitioner recomputes to keep saved activations within 75% / 60% of what it would save, torch's
activation_memory_budget), t8k / t32k (T 8192 / 32768 at the same tokens a step), st (autograd's backward on the
calling thread, torch.autograd.set_multithreading_enabled(False)), tail (under "gemm", each block's output projection,
residual add, second norm and MLP as one op on quack's epilogue GEMMs, models.lm.Block.fused_tail), qlce (under
"gemm", the head + loss on quack's scaled-exp linear cross-entropy, models.lm.LM.epilogue_loss, the default since
this session's measurements; noqlce: on kernels.fused's instead; lce128: its logits GEMM on tiles 128 wide, the default
since 2026-12-07's thirty-third session; lce256: on quack's pick, 256 wide for V 32,000), norg (under "gemm", each
block's two residual adds apart rather than in the epilogues of the GEMMs whose outputs they add, the default since the
thirty-fifth session, models.lm.Block.residual_gemm; before eb06448, opt-in, the option resgemm turned them on),
keepgate / nokeepgate (under "gemm", the SwiGLU MLP keeps its gate's output from the forward for w2's gradient, or
writes it again in the backward's gate-gradient GEMM, kernels.gemm_epilogue.MLP_KEEPS_GATE).
Each run trains 20 steps (T 2048 unless t8k or t32k) and prints one RESULT line (median tokens/s of the second half, MFU of 989).
"""

import contextlib
import functools
import gzip
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

# Profiles and traces; the device scripts point it at the call's $OUT, whose files come back.
OUT = Path(os.environ.get("TRAIN_STUDY_OUT", "/tmp/train_study"))
#: The OPTIONS of the docstring.
OPTIONS = ("resid16", "bthd", "ce", "ce1", "b32", "b64", "b64x2", "b128", "h6", "noclip", "qkvg", "w13", "flash", "eager",
           "ro", "mat", "fused", "prof", "trace", "hostt", "wideloss", "nomos", "mostune", "moreads", "monostrict", "pdl",
           "ce16k", "gategemm", "budget75", "budget60", "t8k", "t32k", "st", "tail", "qlce", "noqlce", "lce128", "lce256",
           "norg", "keepgate", "nokeepgate")
#: Inductor settings (models.train.INDUCTOR_OPTIONS) that the options nomos, mostune, moreads, monostrict and pdl set.
INDUCTOR_OPTIONS = {"nomos": ("triton.mix_order_reduction_allow_multi_stages", False),
                    "mostune": ("triton.mix_order_reduction_autotune_split_size", True),
                    "moreads": ("triton.mix_order_reduction_max_reads", 0),
                    "monostrict": ("triton.mix_order_reduction_non_strict_mode", True),
                    "pdl": ("triton.enable_pdl", True)}


def _patch_resid16(lm, torch):
    def trunk(self, idx):
        x = self.embed(idx)
        if torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))
        for block in self.blocks:
            x = block(x)
        return x

    lm.LM.trunk = trunk


def _patch_bthd(torch):
    import torch.nn.functional as F

    import models.mixers.softmax as sm

    def rot(x, base=sm.ROPE_BASE):
        cos, sin = sm.rope_table(x.shape[1], x.shape[-1], base, x.device)
        cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k = rot(q), rot(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))

    sm.Softmax.forward = forward


def _patch_ce(lm, one_chunk: bool):
    from kernels.fused import linear_cross_entropy

    def forward(self, idx, targets=None, *, last_only=False):
        x = self.norm_f(self.trunk(idx))
        n = x.shape[0] * x.shape[1]
        loss = linear_cross_entropy(x, self.head.weight, targets, ignore_index=-100,
                                    chunk_tokens=n if one_chunk else None, backend="triton")
        return None, loss

    lm.LM.forward = forward


def _patch_qkvg(torch):
    """Lightning's wqkv and wgate as one (d -> 4d) projection: one GEMM over x instead of two, forward and backward."""
    import torch.nn.functional as F

    import kernels
    import models.mixers.lightning as ml

    init = ml.Lightning.__init__

    def __init__(self, config, layer_idx):
        init(self, config, layer_idx)
        d = config.d_model
        self.wqkvg = torch.nn.Linear(d, 4 * d, bias=False)
        del self.wqkv, self.wgate

    def forward(self, x):
        b, t, d = x.shape
        h = self.wqkvg(x)
        qkv = F.silu(h[..., : 3 * d]).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 1, 3, 4)
        q, k, v = qkv.contiguous().unbind(0)
        o, _ = kernels.linear_attention(q, k, v, self.log_decay, backend=self.backend)
        o = self.norm(o.reshape(b, t, d).float())
        return self.wo(torch.sigmoid(h[..., 3 * d:]) * o)

    ml.Lightning.__init__ = __init__
    ml.Lightning.forward = forward


def _patch_w13(torch):
    """The MLP's w1 and w3 as one (d -> 2 hidden) projection: one GEMM over x instead of two, forward and backward."""
    import torch.nn.functional as F

    import models.lm as lm

    init = lm.MLP.__init__

    def __init__(self, d_model, hidden, kernels="torch"):
        init(self, d_model, hidden, kernels)
        self.w13 = torch.nn.Linear(d_model, 2 * hidden, bias=False)
        del self.w1, self.w3

    def forward(self, x):
        h1, h3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(h1) * h3)

    lm.MLP.__init__ = __init__
    lm.MLP.forward = forward


def _patch_host_timers(torch, host: dict):
    """Host seconds per call kind, counted from the 10th optimizer step on."""
    import models.data as md

    def timed(key, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if key == "adamw":
                    host["_steps"] = host.get("_steps", 0) + 1
                if host.get("_steps", 0) >= 10:
                    host[key] = host.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    compile_ = torch.compile
    torch.compile = lambda m, **k: timed("model", compile_(m, **k))
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = timed("adamw", torch.optim.AdamW.step)
    torch.optim.AdamW.zero_grad = timed("zero", torch.optim.AdamW.zero_grad)
    md.Batches.next = timed("data", md.Batches.next)
    torch.Tensor.item = timed("item", torch.Tensor.item)
    torch.Tensor.pin_memory = timed("pin", torch.Tensor.pin_memory)


def variant(name: str, arch: str, *options: str) -> None:
    """Train the 135M model once with the given levers and print its RESULT line."""
    import torch

    import models.bench as mb
    import models.lm as lm

    opts = set(options)
    unknown = sorted(opts - set(OPTIONS))
    if unknown:  # a misspelt lever would otherwise time the code without it
        sys.exit(f"variant: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    host: dict = {}
    if "h6" in opts:
        mb.PRESETS["135M"] = (768, 12, 6, 32000)
    if "resid16" in opts:
        _patch_resid16(lm, torch)
    if "bthd" in opts:
        _patch_bthd(torch)
    if "ce" in opts or "ce1" in opts:
        _patch_ce(lm, one_chunk="ce1" in opts)
    if "qkvg" in opts:
        _patch_qkvg(torch)
    if "w13" in opts:
        _patch_w13(torch)
    if "hostt" in opts:
        _patch_host_timers(torch, host)
    for opt in sorted(opts & set(INDUCTOR_OPTIONS)):
        import torch._inductor.config as inductor_config

        import models.train as mt

        key, value = INDUCTOR_OPTIONS[opt]
        if key not in inductor_config.get_config_copy():
            sys.exit(f"variant: this torch's inductor has no {key} (option {opt})")
        mt.INDUCTOR_OPTIONS = {**mt.INDUCTOR_OPTIONS, key: value}
    if "gategemm" in opts:
        from swiglu_gemm_study import patch_mlp  # beside this script

        patch_mlp()
    for opt in sorted(opts & {"budget75", "budget60"}):
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = int(opt.removeprefix("budget")) / 100
    if "tail" in opts:
        lm.Block.fused_tail = True
    if "norg" in opts:
        lm.Block.residual_gemm = False
    if "keepgate" in opts or "nokeepgate" in opts:
        import kernels.gemm_epilogue as ge

        ge.MLP_KEEPS_GATE = "keepgate" in opts
    if "qlce" in opts or "noqlce" in opts:
        lm.LM.epilogue_loss = "qlce" in opts
    if "lce128" in opts:
        import kernels.gemm_epilogue as ge

        ge.LOSS_TILE_N = 128
    if "lce256" in opts:
        import kernels.gemm_epilogue as ge

        ge.LOSS_TILE_N = None
    if "ce16k" in opts:
        import kernels.fused.triton_ce as ce

        ce.MIN_CHUNK_TOKENS = 16384
    if "wideloss" in opts:
        import kernels.fused.triton_ce as ce

        ce.NARROW_ROWS = False
    if "trace" in opts:
        # Named apart from this function's own `profile` (the table's path), which the closure would see.
        from torch.profiler import ProfilerActivity, schedule
        from torch.profiler import profile as torch_profile

        def traced(steps, device):
            ready = lambda p: p.export_chrome_trace(str(OUT / f"trace_{name}.json"))  # noqa: E731
            return torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                 schedule=schedule(wait=9, warmup=1, active=3), on_trace_ready=ready)

        mb._step_profiler = traced
        opts.add("prof")
    # Tokens per step and microbatch (None: the whole step in one pass).
    batches = {"b128": (262144, 128), "b64x2": (262144, 64), "b64": (131072, 64), "b32": (65536, 32)}
    tokens_per_step, microbatch = next((batches[b] for b in batches if b in opts), (32768, None))
    seq_len = 32768 if "t32k" in opts else 8192 if "t8k" in opts else 2048
    spec = mb.bench_spec(arch, "135M", seq_len, max(1, tokens_per_step // seq_len), 20)
    if "st" in opts:
        # The backward on the calling thread instead of autograd's device thread: less host time a step when the
        # host sets the pace (eager steps at long T, kernels.md).
        torch.autograd.set_multithreading_enabled(False)
    if "noclip" in opts:
        spec = replace(spec, grad_clip=0.0)
    mode = "reduce-overhead" if "ro" in opts else "max-autotune-no-cudagraphs" if "mat" in opts else True
    if "eager" in opts:
        mode = False
    ctx = contextlib.nullcontext()
    if "flash" in opts:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    profile = OUT / f"prof_{name}.txt" if "prof" in opts else None
    from torch._inductor import metrics

    with ctx:
        r = mb.bench_train(spec, compile=mode, microbatch=microbatch, profile=profile, fused="fused" in opts)
    if host:
        per_step = {k: round(v / 10 * 1e3, 2) for k, v in host.items() if k != "_steps"}
        print("HOST ms/step", per_step, "wall ms/step", round(tokens_per_step / r["tokens_per_s"] * 1e3, 2))
    print("RESULT", json.dumps({"code": mb.__file__, "name": name, "arch": arch, "opts": sorted(opts),
                                "tps": r["tokens_per_s"], "mfu": r["mfu_989"], "loss": r["final_loss"],
                                "micro": r["microbatch"], "mhz": r.get("sm_clock_mhz"),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                                # inductor's mixed-order reductions made and refused over the run's compilations
                                "mix_order": [getattr(metrics, k, None) for k in ("codegen_mix_order_reduction",
                                                                                   "rejected_mix_order_reduction_fusion")]}))


def loss(rows: int = 4096) -> None:
    """The loss kernel on one chunk of the 135M model's logits (rows x 32000, bf16), its row held at 16 bits (narrow)
    or in fp32 (wide) at several warp counts, then the whole head + loss fwd+bwd at 131072 tokens, narrow against
    wide, alternated: median times of triton.testing.do_bench, and each variant's error against the wide one."""
    import torch
    import triton.testing

    import kernels.fused.triton_ce as ce
    from kernels.fused import linear_cross_entropy

    n, vocab = rows, 32000
    g = torch.Generator("cuda").manual_seed(0)
    logits0 = (3 * torch.randn(n, vocab, device="cuda", generator=g)).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    loss_rows = torch.empty(n, device="cuda")
    logits = logits0.clone()

    def launch(narrow, warps):
        return ce._ce_kernel[(n,)](logits, targets, loss_rows, vocab, -100, BLOCK_V=32768, WRITE_GRAD=True,
                                   ONE_PASS=True, NARROW=narrow, num_warps=warps)

    copy_us = triton.testing.do_bench(lambda: logits.copy_(logits0), return_mode="median") * 1e3
    ref = None
    for narrow, warps in [(False, 32), (True, 32), (True, 16), (True, 8), (False, 32), (True, 32)]:
        logits.copy_(logits0)
        kernel = launch(narrow, warps)
        got = logits.float(), loss_rows.clone()
        ref = ref or got
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
        # In place: later calls read the previous call's gradient (random, not zero); the second figure times each
        # call on a fresh copy of the logits, less the copy's own time.
        us = triton.testing.do_bench(lambda: launch(narrow, warps), return_mode="median") * 1e3
        fresh = triton.testing.do_bench(lambda: (logits.copy_(logits0), launch(narrow, warps)),
                                        return_mode="median") * 1e3 - copy_us
        gbs = 2 * logits.numel() * logits.element_size() / us / 1e3
        print(f"ce narrow={narrow} warps={warps} regs {getattr(kernel, 'n_regs', '?')} spills "
              f"{getattr(kernel, 'n_spills', '?')} us {us:.1f} (fresh {fresh:.1f}) GB/s {gbs:.0f} err {err:.1e}",
              flush=True)
    tokens = 131072
    x = (torch.randn(tokens, 768, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    w = (0.02 * torch.randn(vocab, 768, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    for rnd in (1, 2):
        for narrow in (False, True):
            ce.NARROW_ROWS = narrow
            step = lambda: linear_cross_entropy(x, w, t).backward()  # noqa: E731
            step()
            ms = triton.testing.do_bench(step, grad_to_none=[x, w], return_mode="median")
            print(f"head+loss fwd+bwd {tokens} tokens narrow={narrow} round {rnd}: {ms:.3f} ms", flush=True)
    ce.NARROW_ROWS = True


def norm(rows: int = 131072) -> None:
    """The RMSNorm kernels (plain and gated) at the 135M model's shape (rows x 768, bf16) over launch settings:
    median us of triton.testing.do_bench and the GB/s of the bytes each must move; the defaults are marked."""
    import torch
    import triton
    import triton.testing

    import kernels.fused.triton_norm as nm

    m, d = rows, 768
    g = torch.Generator("cuda").manual_seed(0)
    x, gate, dy = (torch.randn(m, d, device="cuda", generator=g).bfloat16() for _ in range(3))
    w = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).bfloat16()
    y, dx, dgate = (torch.empty_like(x) for _ in range(3))
    rstd = torch.empty(m, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_d = triton.next_power_of_2(d)

    def report(what, rows_, warps, extra, fn, tensors):
        try:
            us = triton.testing.do_bench(fn, return_mode="median") * 1e3
        except Exception as e:  # a setting past the SM's registers or shared memory
            print(f"norm {what} rows={rows_} warps={warps}{extra}: failed ({type(e).__name__})", flush=True)
            return
        print(f"norm {what} rows={rows_} warps={warps}{extra}: {us:.1f} us, {tensors * x.nbytes / us / 1e3:.0f} GB/s",
              flush=True)

    for gated in (True, False):
        name = "gated" if gated else "plain"
        _, r0, w0, _ = nm._launch(d, False)
        for rows_, warps in [(r0, w0), (1, 2), (1, 4), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8), (8, 16), (r0, w0)]:
            fn = lambda: nm._rms_norm_fwd_kernel[(triton.cdiv(m, rows_),)](  # noqa: E731
                x, gate if gated else x, w, y, rstd, m, d, 1e-6, ROWS=rows_, BLOCK_D=block_d, GATED=gated,
                num_warps=warps)
            report(f"{name} fwd", rows_, warps, " (default)" if (rows_, warps) == (r0, w0) else "", fn,
                   3 if gated else 2)
        _, r0, w0, p0 = nm._launch(d, True, gated)
        for rows_, warps, per_sm in [(r0, w0, p0), (1, 4, 4), (1, 8, 4), (2, 8, 2), (2, 16, 2), (1, 4, 8), (1, 2, 16),
                                     (1, 4, 6), (r0, w0, p0)]:
            programs = per_sm * sms
            dw = torch.empty(programs, d, device="cuda")
            fn = lambda: nm._rms_norm_bwd_kernel[(programs,)](  # noqa: E731
                dy, x, gate if gated else x, w, rstd, dx, dgate if gated else dx, dw, m, d, ROWS=rows_,
                BLOCK_D=block_d, GATED=gated, num_warps=warps)
            report(f"{name} bwd", rows_, warps, f" per_sm={per_sm}" + (" (default)" if (rows_, warps, per_sm) ==
                                                                       (r0, w0, p0) else ""), fn, 5 if gated else 3)


def gaps(*traces: str) -> None:
    """GPU busy time and the idle gaps between kernels in chrome traces of training steps."""
    for path in traces:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path) as f:
            events = json.load(f)["traceEvents"]
        kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                         if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
        busy, idle, (start, end) = 0.0, [], kernels[0]
        for s, e in kernels[1:]:
            if s > end:
                busy += end - start
                idle.append((s - end, end))
                start, end = s, e
            else:
                end = max(end, e)
        busy += end - start
        span = kernels[-1][1] - kernels[0][0]
        idle.sort(reverse=True)
        print(f"{path}: span {span / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, idle {sum(g for g, _ in idle) / 1e3:.1f} ms")
        print("  largest gaps (us, at ms):", [(round(g), round((at - kernels[0][0]) / 1e3, 1)) for g, at in idle[:8]])


def _rows_arg(command: str, args: list[str]) -> list[int]:
    """loss's and norm's optional row count, checked: a positive int."""
    if args and not (args[0].isdigit() and int(args[0]) > 0):
        sys.exit(f"{command}: rows must be a positive integer; got {args[0]!r}")
    return [int(a) for a in args]


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command in ("variant", "loss", "norm"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"{command}: needs a CUDA GPU, and torch sees none here")
    if command == "variant" and len(args) >= 2:
        variant(*args)
    elif command == "gaps" and args:
        gaps(*args)
    elif command == "loss" and len(args) <= 1:
        loss(*_rows_arg(command, args))
    elif command == "norm" and len(args) <= 1:
        norm(*_rows_arg(command, args))
    else:
        sys.exit(__doc__)

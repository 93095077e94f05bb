"""The measurements behind docs/bench/kernels.md's linear-attention figures other than `slab bench kernels`' table:
per-kernel profiles, launch settings timed as CUDA-graph replays, the walks' settings, and the side-by-side with
flash-linear-attention. On a GPU (bf16, H 8, K = V = 128):

    python docs/bench/linear_attention_study.py profile                  # per-kernel GPU time and host time per step
    python docs/bench/linear_attention_study.py settings channel 16 2048 A,intra,dqk,walk,out,cumsum
    python docs/bench/linear_attention_study.py walks                    # walk settings, long forward and fwd+bwd
    python docs/bench/linear_attention_study.py side ours|constant|channel   # ours, or fla's constant / per-channel
    python docs/bench/linear_attention_study.py paths                    # per channel: whole chunks vs sub-blocks
    python docs/bench/linear_attention_study.py decaygrad                # per channel with and without da
    python docs/bench/linear_attention_study.py checks                   # the device checks alone, one line each
    python docs/bench/linear_attention_study.py compare _a,_b            # main against copies of kernels/: checks, gpu
    python docs/bench/linear_attention_study.py mixed                    # per channel, a fraction of chunks strong
    python docs/bench/linear_attention_study.py gpu                      # GPU time of fwd+bwd per form and shape
    python docs/bench/linear_attention_study.py host                     # host and wall time per fwd+bwd (eager)
    python docs/bench/linear_attention_study.py hostprof                 # cProfile of the eager steps at 8k
    python docs/bench/linear_attention_study.py launch                   # host us per launch, per plan, per empty
    python docs/bench/linear_attention_study.py trace DIR                # CPU + CUDA chrome traces of eager steps
    python docs/bench/linear_attention_study.py split                    # host us per part of an eager fwd+bwd
    python docs/bench/linear_attention_study.py groups                   # walk warps/stages x walkers per SM
    python docs/bench/linear_attention_study.py kernels                  # us per kernel per step, 8k and 2k
    python docs/bench/linear_attention_study.py walkgrid                 # walk settings x forms x shapes, 2 rounds
    python docs/bench/linear_attention_study.py lightning                # settings at lightning's training shape
    python docs/bench/linear_attention_study.py lightning-one '{"dqk": {"num_warps": 4}}'   # one of them (its worker)
    python docs/bench/linear_attention_study.py lightninggrid '[{"fused": {"num_stages": 2}}]'  # a list of them
    python docs/bench/linear_attention_study.py fused                    # lightning's shape: fused walks or chunks
    python docs/bench/linear_attention_study.py channelgrid              # per channel: launch settings, one at a time
    python docs/bench/linear_attention_study.py sparse                   # walks with fewer walkers than SMs
    python docs/bench/linear_attention_study.py precision                # per channel bf16 errors by settings
    python docs/bench/linear_attention_study.py garbage                  # errors after filling freed memory
    python docs/bench/linear_attention_study.py widegrid                 # per channel: dqk and gate over all of K
    python docs/bench/linear_attention_study.py grid '[{"dqk": {"num_stages": 3}}]'   # per channel: given settings
    python docs/bench/linear_attention_study.py channel-one '{"dqk": {"BV": 64}}'   # one of them (its worker)
"""

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from kernels.linear_attention import linear_attention
from kernels.linear_attention import triton_chunk as tc
from kernels.linear_attention import bench
from kernels.linear_attention.bench import _ours, _peers, _time_one

FORMS = ("constant", "token", "channel")
#: B x T = 32k tokens, the benchmark's fwd+bwd shapes.
SHAPES = ((16, 2048), (4, 8192), (1, 32768))
#: Launch settings tried per kernel by `settings` (one kernel at a time, keeping the best found so far).
SPACE = {
    "A": dict(BK=(32, 64), num_warps=(4, 8), num_stages=(1, 2, 3)),
    "intra": dict(BK=(16, 32, 64), num_warps=(2, 4, 8), num_stages=(1, 3)),
    "dqk": dict(BK=(32, 64), BV=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    "walk": dict(BK=(32, 64), num_warps=(4, 8), num_stages=(2, 3, 4)),
    "out": dict(BK=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
    "cumsum": dict(num_warps=(2, 4, 8)),
    "gate": dict(BK=(32, 64, 128), num_warps=(2, 4, 8)),
}


def override(settings: dict[str, dict]) -> None:
    """Make every later plan use ``settings`` (kernel name -> launch settings) over its own choices."""

    class Overridden(tc._Plan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name, values in settings.items():
                self.cfg[name] = {**self.cfg[name], **values}

    tc._Plan = Overridden


def inputs(form: str, batch: int, time: int, heads: int = 8, dim: int = 128, learn_decay: bool = True,
           strong: float = 0.0):
    """Random bf16 q, k, v (leaves), a log decay of the form's shape (a leaf if learn_decay), and an output gradient;
    seeded. Per channel, a fraction `strong` of the (batch, chunk, head) blocks decays by e^-3 a token: strong."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, time, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    shape = {"constant": (heads,), "token": (batch, time, heads), "channel": (batch, time, heads, dim)}[form]
    a = -torch.rand(shape, device="cuda", generator=g) * 0.1
    if strong:
        blocks = torch.rand(batch, -(-time // tc.CHUNK), 1, heads, 1, device="cuda", generator=g) < strong
        a = a - 3.0 * blocks.expand(-1, -1, tc.CHUNK, -1, dim).reshape(batch, -1, heads, dim)[:, :time]
    a = a.requires_grad_(learn_decay)
    return q, k, v, a, torch.randn(v.shape, device="cuda", generator=g, dtype=v.dtype)


def step_fn(q, k, v, a, do):
    """One fwd+bwd: the output and the gradients of q, k, v and, where it is a leaf, the log decay (no accumulation
    into .grad)."""
    leaves = tuple(x for x in (q, k, v, a) if x.requires_grad)

    def step():
        o, _ = linear_attention(q, k, v, a, backend="triton")
        return (o,) + torch.autograd.grad(o, leaves, do)

    return step


def warmed_step(form: str, batch: int, time_: int, warmup: int):
    """`step_fn` on fresh inputs, run `warmup` times and synchronized (kernels compiled, allocator warm)."""
    step = step_fn(*inputs(form, batch, time_))
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return step


def profile() -> None:
    """Per-kernel GPU time of 10 fwd+bwd steps per form and shape, then host and wall ms per step at B 16, T 2k."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for (batch, time_), form in itertools.product(((16, 2048), (1, 32768)), FORMS):
        step = warmed_step(form, batch, time_, 5)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"\n===== {form} B={batch} T={time_} (10 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    for form in FORMS:
        host, wall = host_wall(warmed_step(form, 16, 2048, 5), calls=50, runs=1)
        print(f"host-loop {form}: host {host * 1e3:.3f} ms/step, wall {wall * 1e3:.3f} ms/step")


def graph_ms(form: str, batch: int, time_: int, learn_decay: bool = True,
             strong: float = 0.0) -> tuple[float, list[torch.Tensor]]:
    """Median ms of fwd+bwd replayed as a CUDA graph (GPU time, no host time), and its outputs."""
    return replay_ms(step_fn(*inputs(form, batch, time_, learn_decay=learn_decay, strong=strong)))


def replay_ms(step, rep: int = 150) -> tuple[float, list[torch.Tensor]]:
    """Median ms of step() replayed as a CUDA graph (`bench.graph_ms`), and its outputs in fp32."""
    ms, out = bench.graph_ms(step, rep)
    return ms, [x.detach().float().clone() for x in out]


def settings(form: str, batch: int, time_: int, names: list[str]) -> None:
    """Time each kernel's settings in SPACE in turn, keeping the best correct one before moving to the next."""
    unknown = [name for name in names if name not in SPACE]
    if unknown:
        sys.exit(f"settings: unknown kernel(s) {', '.join(unknown)}; known: {', '.join(SPACE)}")
    chosen: dict[str, dict] = {}
    override(chosen)
    best_ms, ref = graph_ms(form, batch, time_)
    print(f"{form} B={batch} T={time_} default: {best_ms:.3f} ms", flush=True)
    for name in names:
        keys = list(SPACE[name])
        best = None
        for values in itertools.product(*(SPACE[name][key] for key in keys)):
            chosen[name] = dict(zip(keys, values))
            ms, out = graph_ms(form, batch, time_)
            err = max(((x - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for x, r in zip(out, ref))
            flag = "" if err < 2e-2 else f" WRONG rel err {err:.2e}"
            print(f"  {name} {chosen[name]}: {ms:.3f} ms{flag}", flush=True)
            if not flag and ms < best_ms:
                best_ms, best = ms, dict(chosen[name])
        if best is None:
            chosen.pop(name, None)
        else:
            chosen[name] = best
        print(f"BEST after {name}: {best_ms:.3f} ms with {chosen}", flush=True)


def walks() -> None:
    """The walks at 8 warps / 3 stages against 4 / 2: forward at B 1, T 128k and 1M, fwd+bwd at 2k and 32k."""
    chosen: dict[str, dict] = {}
    override(chosen)
    for label, walk in (("walk w8 s3", dict(num_warps=8, num_stages=3)),
                        ("walk w4 s2", dict(num_warps=4, num_stages=2))):
        chosen["walk"] = walk
        for form in FORMS:
            for batch, time_, backward in ((1, 131072, False), (1, 1048576, False), (16, 2048, True), (1, 32768, True)):
                ms = _time_one(_ours("triton"), "ours triton", form, batch, time_, backward, False)[0]
                print(label, form, batch, time_, "fwd+bwd" if backward else "fwd", f"{ms:.3f}", flush=True)


def side(which: str) -> None:
    """fwd+bwd ms at B x T = 32k tokens: ours (three forms), or fla's constant or per-channel kernel."""
    for batch, time_ in SHAPES:
        if which == "ours":
            for form in FORMS:
                ms = _time_one(_ours("triton"), "ours triton", form, batch, time_, True, False)[0]
                print("ours", form, batch, time_, f"{ms:.3f}", flush=True)
        else:
            name = {"constant": "fla chunk_simple_gla", "channel": "fla chunk_gla"}[which]
            ms = _time_one(_peers()[(name, which)], name, which, batch, time_, True, False)[0]
            print(name, which, batch, time_, f"{ms:.3f}", flush=True)


def paths() -> None:
    """Per-channel ms on the benchmark's own decays, as chosen (whole chunks inline where mild) and with every chunk
    forced through the 16 x 16 sub-blocks (CHUNK_SPAN_LIMIT = 0), the path that strong decays take."""
    shapes = ((16, 2048, True), (4, 8192, True), (1, 32768, True), (1, 131072, False), (1, 1048576, False))
    for label, limit in (("as chosen", tc.CHUNK_SPAN_LIMIT), ("sub-blocks", 0.0)):
        tc.CHUNK_SPAN_LIMIT = limit
        for batch, time_, backward in shapes:
            ms = _time_one(_ours("triton"), "ours triton", "channel", batch, time_, backward, False)[0]
            print("paths", label, batch, time_, "fwd+bwd" if backward else "fwd", f"{ms:.3f}", flush=True)


def gpu() -> None:
    """GPU time of fwd+bwd (every gradient, the log decay's too) per form at B x T = 32k tokens: CUDA-graph replays.

    Then "constant-fixed": the constant form without its decay's gradient, as lightning trains it (a fixed decay per
    head) and as `slab bench kernels` times it.
    """
    for (batch, time_), form in itertools.product(SHAPES, FORMS):
        print("gpu", form, batch, time_, f"{graph_ms(form, batch, time_)[0]:.3f}", flush=True)
    for batch, time_ in SHAPES:
        print("gpu constant-fixed", batch, time_, f"{graph_ms('constant', batch, time_, False)[0]:.3f}", flush=True)


def checks() -> None:
    """`bench.check_on_device` without peers, one line per check (ok, forward and worst gradient errors), then the
    count: to check whichever kernels are first on PYTHONPATH without timing anything."""
    rows = bench.check_on_device(peers=False)
    for r in rows:
        print("check", r.impl, r.decay, r.dtype, "strong" if r.strong else "models", r.forward_ok and r.backward_ok,
              f"{r.forward_err:.2e}", f"{r.backward_err:.2e}", r.worst, r.error, flush=True)
    print("checks passed", sum(r.forward_ok and r.backward_ok for r in rows), "of", len(rows), flush=True)


def compare(folders: str) -> None:
    """Main's kernels against each copy of `kernels/` under the comma-separated folders: the device checks of each,
    then `gpu` two rounds, alternated. Each runs in its own process with the folder first on PYTHONPATH; this script's
    own folder holds no `kernels/`, so nothing else can shadow the copy (a scratch script beside one did)."""
    variants = {"main": None} | {folder: os.path.abspath(folder) for folder in folders.split(",") if folder}
    digests: dict[str, str] = {}
    for name, path in variants.items():
        root = Path(path or Path(__file__).resolve().parents[2]) / "kernels"
        if not (root / "linear_attention" / "triton_chunk.py").is_file():
            sys.exit(f"compare: {root.parent} holds no kernels/linear_attention/triton_chunk.py")
        # A copy equal to another (a patch that did not apply) would be timed as if it differed.
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))).hexdigest()[:12]
        if digest in digests:
            sys.exit(f"compare: {name}'s kernels/ equals {digests[digest]}'s (sha1 {digest})")
        digests[digest] = name
        print("compare", name, "kernels sha1", digest, flush=True)

    def run(name: str, command: str) -> list[str]:
        env = dict(os.environ)
        if variants[name] is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [variants[name], env.get("PYTHONPATH")]))
        lines, error = _run_self(command, env=env)
        return lines or [f"failed: {error}"]

    for name in variants:
        for line in run(name, "checks"):
            if line.startswith("checks passed") or " False " in line or line.startswith("failed"):
                print("compare", name, line, flush=True)
    for rnd, name in itertools.product(range(2), variants):
        for line in run(name, "gpu"):
            print("compare", rnd, name, line, flush=True)


def decaygrad() -> None:
    """Per channel: fwd+bwd GPU ms with and without the log decay's gradient (what making da costs), two rounds."""
    for rnd, (batch, time_), learn in itertools.product(range(2), SHAPES, (True, False)):
        ms = graph_ms("channel", batch, time_, learn_decay=learn)[0]
        print("decaygrad", rnd, batch, time_, "da" if learn else "no da", f"{ms:.3f}", flush=True)


def mixed() -> None:
    """Per channel, GPU time of fwd+bwd (CUDA graphs) with a fraction of the chunks strong: the sub-block path's cost
    when it serves some chunks only."""
    for (batch, time_), strong in itertools.product(SHAPES[:2], (0.0, 1 / 16, 1 / 4, 1.0)):
        print("mixed channel", batch, time_, f"strong {strong:.3f}",
              f"{graph_ms('channel', batch, time_, strong=strong)[0]:.3f}", flush=True)


def groups() -> None:
    """Walk warps and stages against the walkers per SM the group-size model counts: fwd+bwd GPU time per form and
    shape, and the forward at B 1, T 1M."""
    chosen: dict[str, dict] = {}
    override(chosen)
    model, sms = tc._group_size, tc._sm_count(torch.device("cuda"))
    for (warps, stages), per_sm in itertools.product(((8, 3), (4, 2), (4, 3), (8, 2)), (1, 2, 3)):
        chosen["walk"] = dict(num_warps=warps, num_stages=stages)
        tc._group_size = lambda n, walkers, slots, per_sm=per_sm: model(n, walkers, sms * per_sm if slots else 0)
        label = f"walk w{warps} s{stages}, {per_sm} per SM"
        for form in FORMS:
            for batch, time_ in SHAPES:
                print("groups", label, form, batch, time_, f"{graph_ms(form, batch, time_)[0]:.3f}", flush=True)
            ms = _time_one(_ours("triton"), "ours triton", form, 1, 1 << 20, False, False)[0]
            print("groups", label, form, "fwd 1M", f"{ms:.2f}", flush=True)
    tc._group_size = model


def kernel_us(form: str, batch: int, time_: int, learn_decay: bool = True) -> dict[str, float]:
    """GPU microseconds per fwd+bwd step of each kernel (self time, torch.profiler over 10 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = step_fn(*inputs(form, batch, time_, learn_decay=learn_decay))
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 10 for e in prof.key_averages() if e.self_device_time_total > 0}


def kernels() -> None:
    """Per channel against the fixed-decay constant form, kernel by kernel, at B 4 T 8k and B 16 T 2k."""
    for (batch, time_), (form, learn) in itertools.product(((4, 8192), (16, 2048)),
                                                          (("channel", True), ("constant", False))):
        label = form if learn else "constant-fixed"
        times = kernel_us(form, batch, time_, learn)
        for name, us in sorted(times.items(), key=lambda item: -item[1]):
            print("kernels", label, batch, time_, name[:40], f"{us:.1f}", flush=True)
        print("kernels", label, batch, time_, "TOTAL", f"{sum(times.values()):.1f}", flush=True)


#: The per-channel kernels' settings before `channelgrid`'s picks (dqk at 3 stages, output and dv at 8 warps at D 128).
CHANNEL_BEFORE = {"dqk": dict(num_stages=3), "dv": dict(num_warps=8), "out": dict(num_warps=8)}


def sparse() -> None:
    """The walk settings for fewer walkers than SMs (`triton_chunk.SPARSE_WALK`) on and off, and per channel the
    kernels' settings before `channelgrid`'s picks: GPU checks of the defaults, then fwd+bwd GPU ms per form at SHAPES,
    two rounds alternated."""
    from kernels.linear_attention.bench import check_on_device, check_summary

    checks = [c for c in check_on_device(peers=False) if c.impl.startswith("ours triton")]
    print("sparse checks", check_summary(checks), flush=True)
    rule = dict(tc.SPARSE_WALK)
    chosen: dict[str, dict] = {}
    override(chosen)
    cases = (("before", {}, CHANNEL_BEFORE, ("channel",)), ("settings", {}, {}, ("channel",)),
             ("rule off", {}, {}, ("constant-fixed", "constant", "token")),
             ("rule on", rule, {}, ("channel", "constant-fixed", "constant", "token")))
    for rnd, (label, walk_rule, settings_, forms) in itertools.product(range(2), cases):
        tc.SPARSE_WALK = walk_rule
        chosen.clear()
        chosen.update(settings_)
        for form in forms:
            name, learn = form.removesuffix("-fixed"), not form.endswith("-fixed")
            ms = [f"{graph_ms(name, batch, time_, learn)[0]:.3f}" for batch, time_ in SHAPES]
            print("sparse", rnd, label, form, *ms, flush=True)
    tc.SPARSE_WALK = rule


def precision() -> None:
    """Per channel in bf16 against the fp32 recurrence on the GPU (`bench._check_one`), with SPARSE_WALK on and off
    and CHANNEL_BEFORE's settings or the defaults: relative errors of the output and the worst gradient, at head
    widths 64 and 128, mild and strong decays, two sizes."""
    from kernels.linear_attention.bench import _check_one, _ours

    rule = dict(tc.SPARSE_WALK)
    chosen: dict[str, dict] = {}
    override(chosen)
    for (walk_rule, settings_), dim, strong, (batch, time_, heads) in itertools.product(
            ((rule, {}), ({}, {}), (rule, CHANNEL_BEFORE), ({}, CHANNEL_BEFORE)), (64, 128), (False, True),
            ((2, 300, 2), (1, 1000, 4))):
        tc.SPARSE_WALK = walk_rule
        chosen.clear()
        chosen.update(settings_)
        c = _check_one(_ours("triton"), "channel", torch.bfloat16, "cuda", batch, time_, heads, dim, strong=strong)
        print("precision", "rule" if walk_rule else "no-rule", "before" if settings_ else "settings", f"D{dim}",
              "strong" if strong else "mild", f"B{batch} T{time_} H{heads}", f"{c.forward_err:.2e}",
              f"{c.backward_err:.2e}", c.worst, flush=True)
    tc.SPARSE_WALK = rule


def garbage() -> None:
    """Whether any kernel reads memory it did not write: per channel (and the constant form) in bf16 against the fp32
    recurrence after the allocator's free blocks were filled with NaN, with 1e4, or left as they were, with
    SPARSE_WALK on and off. An unwritten read shows as NaN or as an error that moves with the fill."""
    from kernels.linear_attention.bench import _check_one, _ours

    rule = dict(tc.SPARSE_WALK)
    for walk_rule, fill, form, dim, strong in itertools.product((rule, {}), (None, float("nan"), 1e4),
                                                                ("channel", "constant"), (64, 128), (False, True)):
        if strong and form == "constant":
            continue
        tc.SPARSE_WALK = walk_rule
        if fill is not None:
            # Blocks of both of the allocator's pools (small tensors come from 2 MB segments, large ones apart) go back
            # to its cache filled, and the next tensors are cut from them.
            junk = [torch.full((n,), fill, device="cuda") for n in [1 << 16] * 512 + [1 << 28]]
            del junk
        c = _check_one(_ours("triton"), form, torch.bfloat16, "cuda", 2, 300, 2, dim, strong=strong)
        print("garbage", "rule" if walk_rule else "no-rule", fill, form, f"D{dim}", "strong" if strong else "mild",
              f"{c.forward_err:.2e}", f"{c.backward_err:.2e}", c.worst, c.repeatable, flush=True)
    tc.SPARSE_WALK = rule


#: Walk settings timed by `walkgrid` (the first: the defaults).
WALK_GRID = ({}, dict(BK=32, num_warps=8, num_stages=4), dict(BK=32, num_warps=8, num_stages=3),
             dict(BK=32, num_warps=4, num_stages=3), dict(BK=32, BV=32, num_warps=4, num_stages=3),
             dict(BK=32, BV=32, num_warps=4, num_stages=4), dict(BK=64, BV=32, num_warps=8, num_stages=4),
             dict(BK=64, num_warps=8, num_stages=4))


def walkgrid() -> None:
    """GPU ms of fwd+bwd per walk setting, form (the data-dependent ones with their decay's gradient, the constant
    one fixed and learned) and shape, two rounds; forward ms at B 1, T 1M in the first."""
    chosen: dict[str, dict] = {}
    override(chosen)
    for rnd, walk in itertools.product(range(2), WALK_GRID):
        chosen["walk"] = walk
        for form, learn in (("channel", True), ("constant", False), ("token", True), ("constant", True)):
            ms = [f"{graph_ms(form, batch, time_, learn)[0]:.3f}" for batch, time_ in SHAPES]
            print("walkgrid", rnd, walk, form + ("" if learn else "-fixed"), *ms, flush=True)
            if rnd == 0 and learn != (form == "constant"):
                ms_1m = _time_one(_ours("triton"), "ours triton", form, 1, 1 << 20, False, False)[0]
                print("walkgrid fwd 1M", walk, form, f"{ms_1m:.2f}", flush=True)


#: Settings tried by `lightning`, one kernel at a time, keeping the best so far.
LIGHTNING_SPACE = {
    "out": dict(BK=(32, 64), BV=(32, 64), num_warps=(4, 8), num_stages=(3,)),
    "dv": dict(BV=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
    "dqk": dict(BK=(32, 64), BV=(32, 64), num_warps=(4, 8), num_stages=(3,)),
    "walk": dict(num_warps=(4, 8), num_stages=(2, 3, 4)),
}


def lightning_ms(batch: int, graph: bool = True, time_: int = 2048, heads: int = 12, dim: int = 64):
    """Lightning's linear attention as it trains (packed q, k, v from a SiLU, a fixed constant decay, bf16): GPU ms
    of fwd+bwd as a CUDA-graph replay, or (graph False) the output and gradient in fp32."""
    from kernels import linear_attention_packed

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, time_, 3, heads, dim, device="cuda", generator=g)
    qkv = torch.nn.functional.silu(qkv).bfloat16().requires_grad_()
    a = -torch.rand(heads, device="cuda", generator=g) * 0.5
    do = torch.randn(batch, time_, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16)

    def step():
        o, _ = linear_attention_packed(qkv, a, backend="triton")
        return (o,) + torch.autograd.grad(o, (qkv,), do)

    if not graph:
        return [x.float() for x in step()]
    return replay_ms(step, rep=200)[0]


def lightning_one(settings_json: str) -> None:
    """One setting (kernel name -> launch settings, JSON) at lightning's shape: ms at B 64 and B 16, and the largest
    relative difference of its output and gradient from the defaults' at B 4, where the chunked kernels run, and of
    the fused walks' there, forced (one line, RESULT + JSON)."""
    settings_ = _settings_json(settings_json, "lightning-one")
    chosen: dict[str, dict] = {}
    override(chosen)
    ref = lightning_ms(4, graph=False)
    chosen.update(settings_)
    outs = [lightning_ms(4, graph=False)]
    default_min = tc.FUSED_MIN_HEADS_PER_SM
    tc.FUSED_MIN_HEADS_PER_SM = 0
    outs.append(lightning_ms(4, graph=False))
    tc.FUSED_MIN_HEADS_PER_SM = default_min
    err = max(((x - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for out in outs for x, r in zip(out, ref))
    print("RESULT", json.dumps(dict(ms64=lightning_ms(64), ms16=lightning_ms(16), err=err)), flush=True)


def trial(worker: str, chosen: dict) -> dict:
    """Run `worker` (a command of this script that prints one RESULT line) on settings `chosen` in its own process:
    some settings fault on the GPU, which leaves a process's CUDA context unusable. Its result, or its last error."""
    lines, error = _run_self(worker, json.dumps(chosen))
    for line in lines:
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return dict(fail=error)


def _run_self(*args: str, env: dict | None = None) -> tuple[list[str], str]:
    """This script run with args in a process of its own: its stdout lines and the start of its last stderr line."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    return done.stdout.splitlines(), (done.stderr.strip().splitlines() or ["?"])[-1][:100]


def lightning() -> None:
    """LIGHTNING_SPACE at lightning's training shape, each setting in its own process (`trial`), keeping each
    kernel's best correct one in turn."""
    chosen: dict[str, dict] = {}
    best = trial("lightning-one", chosen)
    print("lightning defaults", best, flush=True)
    best_ms = best["ms64"]
    for name, space in LIGHTNING_SPACE.items():
        keys, pick = list(space), None
        for values in itertools.product(*(space[key] for key in keys)):
            setting = dict(zip(keys, values))
            result = trial("lightning-one", {**chosen, name: setting})
            print("lightning", name, setting, result, flush=True)
            if "ms64" in result and result["err"] < 2e-2 and result["ms64"] < best_ms:
                best_ms, pick = result["ms64"], setting
        if pick:
            chosen[name] = pick
        print(f"lightning BEST after {name}: {best_ms:.3f} ms with {chosen}", flush=True)


#: Per-channel settings timed by `channelgrid`, each on its own (the first: the defaults).
CHANNEL_GRID = ({}, {"dqk": dict(BV=64)}, {"dqk": dict(num_warps=8)}, {"dqk": dict(num_stages=2)},
                {"dqk": dict(num_stages=4)}, {"dv": dict(BV=64)}, {"dv": dict(num_warps=4)},
                {"walk": dict(BV=32, num_warps=8, num_stages=4)}, {"walk": dict(num_warps=8, num_stages=4)},
                {"out": dict(num_warps=4)})


#: `widegrid`: dqk and the gate kernel with the whole K of 128 in one tile (one program per chunk instead of two).
WIDE_GRID = ({"dqk": dict(BK=128, num_warps=8, num_stages=2)}, {"dqk": dict(BK=128, num_warps=8, num_stages=3)},
             {"dqk": dict(BK=128, num_warps=8, num_stages=4)}, {"gate": dict(BK=128, num_warps=8)},
             {"gate": dict(BK=64, num_warps=8)}, {"gate": dict(BK=128, num_warps=4)})


def _settings_json(settings_json: str, worker: str, many: bool = False) -> dict | list[dict]:
    """The settings a command was given as JSON (kernel name -> launch settings; with `many`, a list of them); exits
    with a message if they are not that."""
    expected = 'a JSON list of {"kernel": {setting: value}} objects' if many else (
        "a JSON object of kernel name -> launch settings")
    try:
        settings_ = json.loads(settings_json)
    except json.JSONDecodeError as exc:
        sys.exit(f"{worker}: expected {expected}; {exc}")
    if not (isinstance(settings_, list) and all(isinstance(s, dict) for s in settings_) if many
            else isinstance(settings_, dict)):
        sys.exit(f"{worker}: expected {expected}")
    return settings_


def channel_one(settings_json: str) -> None:
    """One setting for the per-channel form: fwd+bwd GPU ms at each of SHAPES, and the largest relative difference
    of its output and gradients from the defaults' at B 4, T 8k (one line, RESULT + JSON)."""
    settings_ = _settings_json(settings_json, "channel-one")
    chosen: dict[str, dict] = {}
    override(chosen)
    ref = graph_ms("channel", 4, 8192)[1]
    chosen.update(settings_)
    ms = [graph_ms("channel", batch, time_) for batch, time_ in SHAPES]
    err = max(((x - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() for x, r in zip(ms[1][1], ref))
    print("RESULT", json.dumps(dict(ms=[round(m, 4) for m, _ in ms], err=err)), flush=True)


def channelgrid() -> None:
    """CHANNEL_GRID for the per-channel form, each setting in its own process (`trial`), then the defaults again (the
    drift over the call)."""
    _channel_trials("channelgrid", CHANNEL_GRID + ({},))


def widegrid() -> None:
    """WIDE_GRID for the per-channel form, as `channelgrid`: the defaults first and last, each in its own process."""
    _channel_trials("widegrid", ({},) + WIDE_GRID + ({},))


def grid(settings_json: str) -> None:
    """Per channel: each setting of a JSON list (kernel name -> launch settings) in its own process, as `channelgrid`,
    the defaults first and last."""
    _channel_trials("grid", [{}] + _settings_json(settings_json, "grid", many=True) + [{}])


def lightninggrid(settings_json: str) -> None:
    """Lightning's shape: each setting of a JSON list (kernel name -> launch settings) in its own process
    (`lightning-one`), the defaults first and last."""
    for setting in [{}] + _settings_json(settings_json, "lightninggrid", many=True) + [{}]:
        print("lightninggrid", json.dumps(setting), trial("lightning-one", setting), flush=True)


def _channel_trials(label: str, settings_: Iterable[dict]) -> None:
    """One `channel-one` trial per setting, each in its own process, a line each."""
    for setting in settings_:
        print(label, json.dumps(setting), trial("channel-one", setting), flush=True)


def fused() -> None:
    """Lightning's shape at B 16, 32 and 64 (fwd+bwd, CUDA-graph replays): the chunked kernels against the fused walks
    (forced), two rounds; then the fused reverse walk's launch settings, and their outputs' largest relative
    difference from the chunked kernels' at B 4."""
    for rnd, batch, forced in itertools.product(range(2), (16, 32, 64), (None, 0)):
        tc.FUSED_MIN_HEADS_PER_SM = forced
        print("fused", rnd, batch, "fused" if forced == 0 else "chunked", f"{lightning_ms(batch):.3f}", flush=True)
    tc.FUSED_MIN_HEADS_PER_SM = None
    ref = lightning_ms(4, graph=False)
    tc.FUSED_MIN_HEADS_PER_SM = 0
    chosen: dict[str, dict] = {}
    override(chosen)
    for setting in ({}, dict(num_warps=4, num_stages=2), dict(num_warps=8, num_stages=3)):
        chosen["fused_dkv"] = setting
        err = max(((x - r).abs().max() / r.abs().max()).item() for x, r in zip(lightning_ms(4, graph=False), ref))
        print("fused dkv", setting or "default", *(f"B{b} {lightning_ms(b):.3f}" for b in (64, 32, 16)),
              f"err {err:.1e}", flush=True)


def host_wall(fn, calls: int = 40, runs: int = 5, warmup: int = 0) -> tuple[float, float]:
    """Seconds per call of fn: host (queueing its work) and wall (until the GPU is done), the median of `runs` runs of
    `calls` calls, each run after `warmup` calls and a sync."""
    measured = []
    for _ in range(runs):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        queued = (time.perf_counter() - t) / calls
        torch.cuda.synchronize()
        measured.append((queued, (time.perf_counter() - t) / calls))
    return sorted(measured)[runs // 2]


def host() -> None:
    """Host ms (queueing the work) and wall ms per eager fwd+bwd step, the median of 5 runs of 40 steps each."""
    for (batch, time_), form in itertools.product(((16, 2048), (1, 32768)), FORMS):
        queued, wall = host_wall(warmed_step(form, batch, time_, 10))
        print("host", form, batch, time_, f"host {queued * 1e3:.3f}", f"wall {wall * 1e3:.3f}", flush=True)


def hostprof() -> None:
    """cProfile of 200 eager fwd+bwd steps per form at B 4, T 8k: where the host's time goes (top functions)."""
    import cProfile
    import pstats

    for form in ("constant", "channel"):
        step = warmed_step(form, 4, 8192, 10)
        print(f"hostprof {form}: plain wall {host_wall(step, calls=200, runs=1)[1] * 1e3:.3f} ms/step", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            step()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof).strip_dirs()
        print(f"\n===== hostprof {form} B=4 T=8192, 200 steps, by own time", flush=True)
        stats.sort_stats("tottime").print_stats(25)
        print(f"===== hostprof {form}, by cumulative time", flush=True)
        stats.sort_stats("cumulative").print_stats(30)


def launch() -> None:
    """Host us per launch of one small kernel, through `_Plan.launch` (Triton's JIT dispatch) and through its compiled
    kernel's launcher directly (`CompiledKernel.run`'s arguments as Triton 3.6 takes them); host us per `_Plan` made
    and per torch.empty; at B 4, T 8k."""
    batch, time_, heads = 4, 8192, 8
    x = torch.randn(batch, time_, heads, device="cuda")
    q = torch.randn(batch, time_, heads, 128, device="cuda", dtype=torch.bfloat16)
    plan = tc._Plan(q, q, x, saved=(x,))
    y = torch.empty_like(x)
    grid = (plan.NT, 1, batch * heads)
    kw = dict(H=heads, K=1, BT=plan.BT, REVERSE=False)
    args = (x, y, time_, time_)
    kernel = tc._chunk_cumsum_kernel
    compiled = kernel[grid](*args, **plan.cfg["cumsum"], **kw)
    named = dict(zip(kernel.arg_names, args)) | plan.cfg["cumsum"] | kw
    values = [named[name] for name in kernel.arg_names]
    stream = torch.cuda.current_stream().cuda_stream

    def direct():
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *values)

    ways = {"plan.launch": lambda: plan.launch(kernel, "cumsum", grid, *args, **kw), "compiled.run": direct,
            "torch.empty": lambda: torch.empty(batch, time_, heads, 128, device="cuda")}
    for form in FORMS:
        shape = {"constant": (heads,), "token": (batch, time_, heads), "channel": (batch, time_, heads, 128)}[form]
        a = -torch.rand(shape, device="cuda")
        saved = {"constant": None, "token": (x,), "channel": (a, a, a, a)}[form]
        ways[f"_Plan {form} (backward's)"] = lambda a=a, saved=saved: tc._Plan(q, q, a, saved=saved)
    for _ in range(2):
        for name, fn in ways.items():
            queued, wall = host_wall(fn, calls=2000, runs=1, warmup=50)
            print("launch", name, f"host {queued * 1e6:.1f} us", f"wall {wall * 1e6:.1f} us", flush=True)


def trace(out_dir: str) -> None:
    """Chrome traces (CPU and CUDA) of 6 eager fwd+bwd steps per form at B 4, T 8k, written under out_dir (for
    Perfetto or chrome://tracing): where the GPU waits for the host."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for form in ("constant", "channel"):
        step = warmed_step(form, 4, 8192, 10)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(6):
                step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(f"{out_dir}/trace_{form}.json")
        print(f"trace {form}: written", flush=True)


def _launching(q: torch.Tensor, n: int, one_thread: bool = False):
    """A step of an autograd Function whose backward launches a small Triton kernel n times (`split`): the cost of
    the backward's device thread against launches; `one_thread` runs it on the calling thread instead."""
    x = torch.randn(q.shape[:3], device=q.device, requires_grad=True)
    plan = tc._Plan(q, q, x.detach(), saved=(x.detach(),))
    y = torch.empty_like(x)

    class Launching(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, dy):
            for _ in range(n):
                plan.launch(tc._chunk_cumsum_kernel, "cumsum", (plan.NT, 1, plan.B * plan.H), dy, y, plan.T, plan.T,
                            H=plan.H, K=1, BT=plan.BT, REVERSE=False)
            return dy

    def step():
        with torch.autograd.set_multithreading_enabled(not one_thread):
            return torch.autograd.grad(Launching.apply(x), (x,), x.detach())

    return step


def split() -> None:
    """Host us per eager call of each part of a fwd+bwd at B 4, T 8k: the forward through autograd and without it,
    `_forward` and `_backward` called directly, the whole step, and an autograd Function that launches nothing."""

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, a):
            return torch.empty_like(v)

        @staticmethod
        def backward(ctx, do):
            return None, None, None, None

    for form in ("constant", "channel"):
        q, k, v, a, do = inputs(form, 4, 8192)
        scale = 128 ** -0.5
        made = tc._forward(q, k, v, a.detach(), None, scale)
        leaves = (q, k, v, a)

        def nothing():
            o = Nothing.apply(q, k, v, a)
            return torch.autograd.grad(o, leaves, do, allow_unused=True)

        def forward_no_grad():
            with torch.no_grad():
                return linear_attention(q, k, v, a, backend="triton")

        def step_one_thread(step=step_fn(q, k, v, a, do)):
            with torch.autograd.set_multithreading_enabled(False):
                return step()

        class Real(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, a):
                return tc._forward(q, k, v, a, None, scale)[0]

            @staticmethod
            def backward(ctx, do):
                return tc._backward(q, k, v, a.detach(), None, *made[2:], do, None, scale, True, False)[:4]

        def real():
            return torch.autograd.grad(Real.apply(q, k, v, a), leaves, do)

        def step_backward():
            o, _ = linear_attention(q, k, v, a, backend="triton")
            o.backward(do)

        parts = {"step": step_fn(q, k, v, a, do), "step, one thread": step_one_thread,
                 "step, .backward()": step_backward, "autograd around _forward, _backward": real,
                 "forward (autograd)": lambda: linear_attention(q, k, v, a, backend="triton"),
                 "forward (no grad)": forward_no_grad,
                 "_forward": lambda: tc._forward(q, k, v, a.detach(), None, scale),
                 "_backward": lambda: tc._backward(q, k, v, a.detach(), None, *made[2:], do, None, scale, True, False),
                 "autograd, no kernels": nothing}
        for n in (0, 6, 24):
            parts[f"autograd, {n} launches in the backward"] = _launching(q, n)
            parts[f"autograd, {n} launches in the backward, one thread"] = _launching(q, n, one_thread=True)
        for name, fn in parts.items():
            queued, wall = host_wall(fn, warmup=5)
            print("split", form, name, f"host {queued * 1e6:.0f} us", f"wall {wall * 1e6:.0f} us", flush=True)


if __name__ == "__main__":
    # Each command with the number of arguments it takes; anything else prints the usage above and exits 1.
    commands = {"profile": (profile, 0), "walks": (walks, 0), "paths": (paths, 0), "side": (side, 1),
                "gpu": (gpu, 0), "host": (host, 0), "hostprof": (hostprof, 0), "launch": (launch, 0),
                "split": (split, 0), "trace": (trace, 1), "groups": (groups, 0), "mixed": (mixed, 0),
                "decaygrad": (decaygrad, 0), "checks": (checks, 0), "compare": (compare, 1),
                "kernels": (kernels, 0), "walkgrid": (walkgrid, 0), "lightning": (lightning, 0),
                "lightning-one": (lightning_one, 1), "lightninggrid": (lightninggrid, 1), "fused": (fused, 0),
                "channel-one": (channel_one, 1), "channelgrid": (channelgrid, 0), "widegrid": (widegrid, 0),
                "grid": (grid, 1),
                "sparse": (sparse, 0),
                "precision": (precision, 0), "garbage": (garbage, 0),
                "settings": (lambda f, b, t, n: settings(f, int(b), int(t), n.split(",")), 4)}
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command not in commands or len(args) != commands[command][1]:
        sys.exit(__doc__)
    if not torch.cuda.is_available():
        sys.exit(f"{command}: needs a CUDA GPU, and torch sees none here")
    commands[command][0](*args)

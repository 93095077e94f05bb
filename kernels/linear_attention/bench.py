"""GPU benchmark of `kernels.linear_attention` against torch SDPA and flash-linear-attention, checked on the device first.

`check_on_device` compares every backend and decay form (and the fla peers, when importable) with the naive
recurrence on the GPU itself, outputs and gradients, in fp32 and bf16 (the peers in bf16, the dtype they are
timed in), and whether a second run gives the same bits;
the packed entry point (q, k, v as one tensor) is checked too, ours on Triton again at lightning's head width, and
ours on Triton with an initial state in and the final state out (every gradient, a constant decay's too).
`run_bench` then times forward and forward+backward (`triton.testing.do_bench` medians after warm-up) and writes
CSV, PNG and a markdown table.
An implementation that fails its check gets no timing; one that raises gets an error cell, not a crash.

Run it with `slab bench kernels --out docs/bench [--quick] [--no-peers]`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from time import monotonic

import pandas as pd
import torch
import torch.nn.functional as F

from ..compare import rel_err
from . import linear_attention, linear_attention_packed

log = logging.getLogger(__name__)

HEADS, DIM = 8, 128
#: Lightning's head width. The Triton kernels launch with other settings for heads of up to 64 (`_Plan`), so the
#: device check runs them at this width too.
LIGHTNING_DIM = 64
#: (B, T) timed forward and forward+backward, then (B, T) timed forward only.
TRAIN_SHAPES = [(16, 2048), (4, 8192), (1, 32768)]
LONG_SHAPES = [(1, 131072), (1, 524288), (1, 1048576)]
QUICK_TRAIN_SHAPES = [(16, 2048), (4, 8192)]
QUICK_LONG_SHAPES = [(1, 131072)]
#: Relative error (max|a - b| / max|b|) allowed on the device; tf32/bf16 tensor cores round more than the CPU.
DEVICE_TOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
#: A call slower than this is timed with a few plain repeats instead of do_bench's calibration runs.
SLOW_MS = 500.0

FORMS = ("constant", "token", "channel")


@dataclass(frozen=True)
class CheckResult:
    """One implementation and decay form checked against the naive recurrence on the device.

    forward_ok covers o; backward_ok every gradient the implementation gives; error is set when one raised.
    """

    impl: str
    decay: str
    dtype: str
    forward_ok: bool
    backward_ok: bool
    forward_err: float
    backward_err: float
    worst: str
    error: str = ""
    strong: bool = False  # decays of -10 per token on a fifth of the entries, on top of the models' range
    repeatable: bool = False  # a second run gave the same bits (o and every gradient)
    dim: int = DIM  # head width (K = V)

    @property
    def ok(self) -> bool:
        """Both the forward and the backward passed."""
        return self.forward_ok and self.backward_ok


def _log_decay(form: str, batch: int, time: int, heads: int, dim: int, device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Random log decays in the range models produce: MiniMax slopes per head, log-sigmoid gates otherwise (drawn
    from `generator`, so that a check repeats its inputs in every process)."""
    if form == "constant":
        return -(2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads))
    shape = (batch, time, heads) if form == "token" else (batch, time, heads, dim)
    return F.logsigmoid(torch.randn(shape, device=device, generator=generator))


def _peers() -> dict[tuple[str, str], Callable]:
    """flash-linear-attention's chunked kernels by (name, decay form), empty when fla is not installed."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        log.info("fla is not importable: its kernels are left out of the benchmark")
        return {}
    return {
        ("fla chunk_simple_gla", "constant"): lambda q, k, v, a, s: chunk_simple_gla(q, k, v, g_gamma=a, scale=s)[0],
        ("fla chunk_simple_gla", "token"): lambda q, k, v, a, s: chunk_simple_gla(q, k, v, g=a, scale=s)[0],
        ("fla chunk_gla", "channel"): lambda q, k, v, a, s: chunk_gla(q, k, v, g=a, scale=s)[0],
    }


def _ours(backend: str) -> Callable:
    return lambda q, k, v, a, s: linear_attention(q, k, v, a, scale=s, backend=backend)[0]


#: Ours on Triton with an initial state in and the final state out (checked, not timed; the peers' signatures differ).
STATE = "ours triton +state"


def _ours_state(backend: str) -> Callable:
    """(o, final state) of the backend, from an initial state."""
    return lambda q, k, v, a, s, h0: linear_attention(q, k, v, a, scale=s, initial_state=h0, output_final_state=True,
                                                      backend=backend)


#: The packed entry point (lightning's); checked, not timed here, where stacking q, k and v first would be timed with it.
PACKED = "ours triton packed"


def _packed(q, k, v, a, s):
    return linear_attention_packed(torch.stack((q, k, v), dim=2), a, scale=s, backend="triton")[0]


def _implementations(peers: bool = True) -> dict[tuple[str, str], Callable]:
    impls = {(f"ours {backend}", form): _ours(backend) for backend in ("triton", "torch") for form in FORMS}
    impls.update({(PACKED, form): _packed for form in ("constant", "token")})
    if peers:
        impls.update(_peers())
    return impls


def _check_one(fn, form: str, dtype: torch.dtype, device, batch=2, time=300, heads=2, dim=DIM,
               strong: bool = False, state: bool = False) -> CheckResult:
    """fn against naive: relative error of o, then of the gradients fn provides; an exception fails that half. fn
    runs twice, to tell whether it repeats its bits. With state, fn also takes an initial state and returns the
    final one (`_ours_state`), both checked, and every input, a constant decay too, takes a gradient."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, time, heads, dim, device=device, generator=gen).to(dtype) for _ in range(3))
    a = _log_decay(form, batch, time, heads, dim, device, gen)
    if strong:
        # exp of a positive number anywhere would show up here; per channel, it also takes the diagonal blocks
        # off their dot and onto the elementwise path, which the models' range alone never reaches.
        a = torch.where(torch.rand(a.shape, device=device, generator=gen) < 0.2, a - 10.0, a)
    do = torch.randn(batch, time, heads, dim, device=device, generator=gen)
    # drawn after the rest, so that the checks without a state keep their inputs
    h0, ds = (torch.randn(batch, heads, dim, dim, device=device, generator=gen) if state else None for _ in range(2))
    scale = dim**-0.5
    tol = DEVICE_TOL[dtype]
    results = {}
    inputs = (q, k, v, a, h0) if state else (q, k, v, a)
    for who, run in (("naive", (_ours_state if state else _ours)("naive")), ("tested", fn), ("again", fn)):
        leaves = [x.detach().clone().requires_grad_(state or form != "constant" or x is not a) for x in inputs]
        try:
            o, s = run(*leaves[:4], scale, *leaves[4:]) if state else (run(*leaves, scale), None)
        except Exception as exc:  # a peer refusing is a result, not a crash
            return CheckResult("", form, _dtype_name(dtype), False, False, math.nan, math.nan, "o", _first_line(exc),
                               strong)
        try:
            ((o.float() * do).sum() + ((s.float() * ds).sum() if state else 0)).backward()
            grads, error = [x.grad for x in leaves], ""
        except Exception as exc:
            grads, error = [None] * len(leaves), _first_line(exc)
        results[who] = (o.detach(), None if s is None else s.detach(), grads, error)
    (o_ref, s_ref, g_ref, _), (o, s, grads, error) = results["naive"], results["tested"]
    o_again, s_again, grads_again, _ = results["again"]
    repeatable = torch.equal(o, o_again) and (s is None or torch.equal(s, s_again)) and all(
        (g is None and h is None) or (g is not None and h is not None and torch.equal(g, h))
        for g, h in zip(grads, grads_again))
    forward_errs = {"o": rel_err(o, o_ref), **({"final_state": rel_err(s, s_ref)} if state else {})}
    forward_err = max(forward_errs.values())
    names = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")
    errors = {n: rel_err(g, r) for n, g, r in zip(names, grads, g_ref) if g is not None}
    backward_err = max(errors.values()) if errors else math.nan
    worst = max(errors, key=errors.get) if errors else "o"
    if not (math.isfinite(forward_err) and forward_err <= tol):
        worst = max(forward_errs, key=forward_errs.get)
    backward_ok = not error and bool(errors) and math.isfinite(backward_err) and backward_err <= tol
    return CheckResult("", form, _dtype_name(dtype), math.isfinite(forward_err) and forward_err <= tol, backward_ok,
                       forward_err, backward_err, worst, error, strong, repeatable)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_on_device(
    device: str = "cuda", size: tuple[int, int, int, int] = (2, 300, 2, DIM), peers: bool = True,
    widths: tuple[int, ...] = (LIGHTNING_DIM,), fused_width: int | None = LIGHTNING_DIM,
) -> list[CheckResult]:
    """Each backend and decay form (ours, and fla's when importable) against naive on `device`, fp32 and bf16 (fla's
    in bf16 alone);
    data-dependent decays both in the models' range and strong. Then ours on Triton (dense and packed) again at
    each head width in `widths`, as their launch settings depend on it, and in bf16 at `fused_width` with the fused
    walks forced (`triton_chunk.FUSED_MIN_HEADS_PER_SM`: training takes them with many heads, this check's few would
    not).

    size is (B, T, H, D); the default has T off the chunk grid and the benchmark's head width. On a GPU the peers'
    kernels compile in child processes while ours are checked (`_start_warm_ups`).
    """
    batch, time, heads, dim = size
    impls = _implementations(peers)
    peer_keys = [key for key in impls if key[0] in FLA_PEER.values()]
    # fla's checks compile its autotuned kernels: many minutes on a cold Triton cache, on one CPU core each. Children
    # compile them side by side (into the shared on-disk cache) while ours are checked; the peers are checked last.
    warm_ups = _start_warm_ups(peer_keys, size, device) if peer_keys and torch.device(device).type == "cuda" else []
    runs = [(key, fn, dim, False, False) for key, fn in impls.items() if key not in peer_keys]
    runs += [(key, fn, width, False, False) for width in widths if width != dim
             for key, fn in impls.items() if key[0] in ("ours triton", PACKED)]
    if fused_width:
        runs += [(key, fn, fused_width, True, False) for key, fn in impls.items()
                 if key[0] in ("ours triton", PACKED) and key[1] != "channel"]
    # the initial state's gradient and the final state are other code paths of the same kernels
    runs += [((STATE, form), _ours_state("triton"), dim, False, True) for impl, form in impls if impl == "ours triton"]
    runs += [(key, impls[key], dim, False, False) for key in peer_keys]
    out = []
    for (impl, form), fn, width, fused, state in runs:
        if warm_ups and (impl, form) in peer_keys:
            _join_warm_ups(warm_ups)
            warm_ups = []
        # fla's kernels are timed in bf16 alone, and each dtype's check autotunes them anew: their fp32 checks took
        # about 9 of bench kernels' 23 minutes on a fresh H100 (2026-12-06) and told the timing nothing
        dtypes = (torch.bfloat16,) if fused or impl in FLA_PEER.values() else (torch.float32, torch.bfloat16)
        for dtype, strong in itertools.product(dtypes, (False, True)):
            if strong and form == "constant":
                continue
            with _fused_walks(fused):
                result = _check_one(fn, form, dtype, device, batch, time, heads, width, strong=strong, state=state)
            result = replace(result, impl=impl + (" fused" if fused else ""), dim=width)
            if result.error:
                log.warning("check %s %s %s%s: %s", result.impl, form, result.dtype, _width(result), result.error)
            log.info("check %s", result)
            out.append(result)
    return out


#: How long the peers' compile warm-up may take before the checks go on without it (they then compile in-process).
WARM_UP_TIMEOUT_S = 1800.0


def _warm_up_one(impl: str, form: str, size: tuple[int, int, int, int], device: str) -> None:
    """In a child process: the bf16 check of one peer, run only so that its Triton kernels compile into the disk cache."""
    _check_one(_implementations(peers=True)[(impl, form)], form, torch.bfloat16, device, *size)


def _start_warm_ups(keys: list[tuple[str, str]], size: tuple[int, int, int, int],
                    device: str) -> list[multiprocessing.process.BaseProcess]:
    """Start one child per (peer, decay form) that compiles that peer's kernels (`_warm_up_one`)."""
    ctx = multiprocessing.get_context("spawn")  # a forked child would inherit this process's CUDA context
    procs = [ctx.Process(target=_warm_up_one, args=(impl, form, size, device), name=f"warm-up {impl} {form}",
                         daemon=True) for impl, form in keys]
    for proc in procs:
        proc.start()
    log.info("the peers' kernels compile in %d child processes while ours are checked", len(procs))
    return procs


def _join_warm_ups(procs: list[multiprocessing.process.BaseProcess], timeout_s: float = WARM_UP_TIMEOUT_S) -> None:
    """Wait for the warm-up children; one that fails or overruns is logged and stopped, never fatal (the check
    itself then compiles, or records the peer's refusal)."""
    start = monotonic()
    log.info("waiting for the peers' compile warm-up")
    for proc in procs:
        proc.join(max(0.0, timeout_s - (monotonic() - start)))
        if proc.is_alive():
            log.warning("%s still running after %.0f s: stopped, its check compiles in this process", proc.name,
                        timeout_s)
            proc.terminate()
            proc.join()
        elif proc.exitcode:
            log.warning("%s exited with %s", proc.name, proc.exitcode)
    log.info("peers' compile warm-up done in %.0f s", monotonic() - start)


@contextlib.contextmanager
def _fused_walks(forced: bool):
    """Within: our Triton kernels take the fused walks wherever the heads allow (forward and backward), if forced."""
    if not forced:
        yield
        return
    from . import triton_chunk

    saved = triton_chunk.FUSED_MIN_HEADS_PER_SM
    triton_chunk.FUSED_MIN_HEADS_PER_SM = 0
    try:
        yield
    finally:
        triton_chunk.FUSED_MIN_HEADS_PER_SM = saved


def check_summary(checks: list[CheckResult]) -> str:
    """One line on the device checks: how many passed and repeated their bits, naming those that did not."""
    def names(rows):
        return ", ".join(f"{c.impl} {c.decay} {c.dtype}{_width(c)}{' strong' if c.strong else ''}" for c in rows)

    failed = [c for c in checks if not c.ok]
    noisy = [c for c in checks if c.ok and not c.repeatable]
    line = f"checks: {len(checks) - len(failed)} of {len(checks)} passed, {sum(c.repeatable for c in checks)} repeatable"
    if failed:
        line += f"; failed: {names(failed)}"
    if noisy:
        line += f"; passed but not bitwise repeatable: {names(noisy)}"
    return line


def _width(check: CheckResult) -> str:
    """' D 64' for a check at a head width other than the benchmark's, else ''."""
    return "" if check.dim == DIM else f" D {check.dim}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _time_ms(step: Callable[[], None], grads: list[torch.Tensor], quick: bool) -> float:
    """Median milliseconds of step(): do_bench after warm-up, or a few plain repeats when one call is slow."""
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    step()  # compile and warm up
    torch.cuda.synchronize()
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first > SLOW_MS:
        times = [first]
        for _ in range(1 if quick else 2):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(sorted(times)[len(times) // 2])
    warmup, rep = (10, 50) if quick else (50, 300)
    return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median"))


def graph_ms(step: Callable[[], object], rep: int = 150) -> tuple[float, object]:
    """Median ms of step() captured once as a CUDA graph and replayed (GPU time, without the host's launch time), and
    what the captured step returned. Warmed up on a side stream first, as capture requires."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")), out


def _sdpa(q, k, v, a, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _time_one(fn, impl: str, form: str, batch: int, time: int, backward: bool, quick: bool) -> tuple[float, float]:
    """Median ms of one eager call (what a caller waits, host time included where the host is the slower) and of the
    same work replayed as a CUDA graph (GPU time; NaN for calls over SLOW_MS, which are the GPU's anyway, or where
    capture fails)."""
    device = "cuda"
    dtype = torch.bfloat16
    if impl == "sdpa flash":
        shape = (batch, HEADS, time, DIM)  # SDPA wants (B, H, T, D)
    else:
        shape = (batch, time, HEADS, DIM)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    a = _log_decay(form, batch, time, HEADS, DIM, device) if form else None
    if a is not None and backward and form != "constant":
        a.requires_grad_(True)
    scale = DIM**-0.5
    grads = [x for x in (q, k, v, a) if x is not None and x.requires_grad]
    if backward:
        do = torch.randn(shape, device=device, dtype=dtype)

        def step():
            fn(q, k, v, a, scale).backward(do)
    else:

        def step():
            with torch.no_grad():
                fn(q, k, v, a, scale)

    ms = _time_ms(step, grads, quick)
    if ms > SLOW_MS:
        return ms, math.nan

    def functional_step():  # a graph replays into the same memory: gradients returned, never accumulated
        if backward:
            return torch.autograd.grad(fn(q, k, v, a, scale), grads, do)
        with torch.no_grad():
            return fn(q, k, v, a, scale)

    try:
        return ms, graph_ms(functional_step, rep=50 if quick else 150)[0]
    except Exception as exc:  # a peer that syncs with the host cannot be captured: its eager time stands alone
        log.warning("%s %s B=%d T=%d: no CUDA-graph time (%s)", impl, form, batch, time, _first_line(exc))
        torch.cuda.synchronize()
        return ms, math.nan


def run_bench(out_dir: Path, quick: bool = False, peers: bool = True) -> pd.DataFrame:
    """Check on the GPU, then time every implementation; writes linear_attention.{csv,png,md} under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = check_on_device("cuda", peers=peers)
    pd.DataFrame([asdict(c) for c in checks]).to_csv(out_dir / "linear_attention_checks.csv", index=False)
    log.log(logging.WARNING if any(not c.ok for c in checks) else logging.INFO, "%s", check_summary(checks))
    # A failed check takes that implementation's timings away: all of them for a wrong forward, the
    # forward+backward ones for a wrong (or refused) backward.
    failed = {}
    for c in checks:
        case = f"{c.dtype}{_width(c)}"
        what = f"{case}: {c.error}" if c.error else None
        if not c.forward_ok:
            for mode in ("fwd", "fwd+bwd"):
                failed.setdefault((c.impl, c.decay, mode), "failed check (" + (what or f"{case}: o rel err {c.forward_err:.2g}") + ")")
        elif not c.backward_ok:
            failed.setdefault((c.impl, c.decay, "fwd+bwd"), "failed check (" + (what or f"{case}: {c.worst} rel err {c.backward_err:.2g}") + ")")

    timed = {key: fn for key, fn in _implementations(peers).items() if key[0] not in ("ours torch", PACKED)}
    timed[("sdpa flash", "")] = _sdpa
    train = QUICK_TRAIN_SHAPES if quick else TRAIN_SHAPES
    long = QUICK_LONG_SHAPES if quick else LONG_SHAPES
    jobs = [(b, t, mode) for b, t in train for mode in ("fwd", "fwd+bwd")] + [(b, t, "fwd") for b, t in long]

    rows = []
    for batch, time, mode in jobs:
        for (impl, form), fn in timed.items():
            row = {"impl": impl, "decay": form, "mode": mode, "B": batch, "T": time, "H": HEADS, "K": DIM, "V": DIM,
                   "dtype": "bfloat16", "ms": math.nan, "gpu_ms": math.nan, "status": "ok"}
            if (impl, form, mode) in failed:
                row["status"] = failed[(impl, form, mode)]
            else:
                try:
                    row["ms"], row["gpu_ms"] = _time_one(fn, impl, form, batch, time, mode == "fwd+bwd", quick)
                except Exception as exc:  # recorded as an error cell; the other cells still run
                    log.warning("%s %s %s B=%d T=%d raised: %s", impl, form, mode, batch, time, exc)
                    row["status"] = "error: " + _first_line(exc)
                    torch.cuda.empty_cache()
            log.info("%s", row)
            rows.append(row)
            pd.DataFrame(rows).to_csv(out_dir / "linear_attention.partial.csv", index=False)  # survives a timeout
    df = pd.DataFrame(rows)
    df["tokens_per_s"] = df["B"] * df["T"] / (df["ms"] / 1e3)
    df.to_csv(out_dir / "linear_attention.csv", index=False)
    (out_dir / "linear_attention.partial.csv").unlink(missing_ok=True)
    (out_dir / "linear_attention.md").write_text(report(df) + "\n")
    plot(df, out_dir / "linear_attention.png")
    return df


def report(df: pd.DataFrame) -> str:
    """The Markdown under the benchmark: the eager table and its ratios, then the same for GPU time where measured."""
    parts = [markdown_table(df), "\n".join(comparisons(df))]
    if "gpu_ms" in df and df["gpu_ms"].notna().any():
        parts += ["GPU time, the same work replayed as a CUDA graph (no host time; empty where not captured):",
                  markdown_table(df, "gpu_ms"), "\n".join(comparisons(df, "gpu_ms") + [host_bound(df)])]
    return "\n\n".join(part for part in parts if part)


def host_bound(df: pd.DataFrame) -> str:
    """One line: ours' fwd+bwd eager time over its GPU time, per form and T where both were measured. Well above 1,
    the host's launches, not the kernels, set the eager pace (docs/bench/kernels.md)."""
    df = _decays(df)
    ok = df[(df["status"] == "ok") & (df["impl"] == "ours triton") & (df["mode"] == "fwd+bwd")
            & df["ms"].notna() & df["gpu_ms"].notna()]
    if ok.empty:
        return ""
    ratio = (ok["ms"] / ok["gpu_ms"]).groupby([ok["decay"], ok["T"]]).first()
    times = sorted(set(ok["T"]))
    parts = [f"{form} " + " / ".join(f"{ratio[form, time]:.2f}x" if (form, time) in ratio.index else "-"
                                     for time in times)
             for form in FORMS if form in ratio.index.get_level_values(0)]
    return (f"- eager / GPU time, ours fwd+bwd at T {' / '.join(map(str, times))}: {'; '.join(parts)} (well above 1: "
            "the host's launches, not the kernels, set the eager times)")


def _label(impl: str, decay: str) -> str:
    return f"{impl} ({decay})" if decay else impl


def _decays(df: pd.DataFrame) -> pd.DataFrame:
    """df with an empty decay for SDPA's rows also when read back from the CSV (where pandas makes it NaN)."""
    return df.assign(decay=df["decay"].fillna(""))


def markdown_table(df: pd.DataFrame, value: str = "ms") -> str:
    """Milliseconds (column `value`: "ms" eager, "gpu_ms" CUDA-graph replays) per (mode, B, T) row and implementation
    column; failures and errors say so in their cell."""
    df = _decays(df)
    df = df.assign(column=[_label(i, d) for i, d in zip(df["impl"], df["decay"])])
    df["cell"] = [("" if math.isnan(ms) else f"{ms:.2f}") if status == "ok" else status
                  for ms, status in zip(df[value], df["status"])]
    table = df.pivot_table(index=["mode", "B", "T"], columns="column", values="cell", aggfunc="first", sort=False)
    table = table.fillna("")
    columns = list(dict.fromkeys(df["column"]))
    header = "| mode | B | T | " + " | ".join(columns) + " |"
    lines = [header, "|" + " --- |" * (3 + len(columns))]
    for (mode, batch, time), row in table.iterrows():
        cells = [str(row.get(c, "")).replace("|", "/") for c in columns]
        lines.append(f"| {mode} | {batch} | {time} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The fla kernel each of our forms is compared with, where fla is in the table.
FLA_PEER = {"constant": "fla chunk_simple_gla", "token": "fla chunk_simple_gla", "channel": "fla chunk_gla"}


def comparisons(df: pd.DataFrame, value: str = "ms") -> list[str]:
    """The ratios the kernels are judged by, from the table's ok cells of column `value`: per T, each data-dependent
    form's fwd+bwd against the constant form's, ours against SDPA and fla; and SDPA's forward against ours at the
    longest T."""
    df = _decays(df)
    ok = df[(df["status"] == "ok") & df[value].notna()]

    def ms(impl, decay, mode, time):
        cell = ok[(ok["impl"] == impl) & (ok["decay"] == decay) & (ok["mode"] == mode) & (ok["T"] == time)]
        return float(cell[value].iloc[0]) if len(cell) else math.nan

    def ratios(pairs):
        return ", ".join(f"{name} {a / b:.{2 if a / b < 10 else 0}f}x" for name, a, b in pairs if math.isfinite(a / b))

    lines = []
    ours = "ours triton"
    for time in sorted(set(ok.loc[ok["mode"] == "fwd+bwd", "T"])):
        mine = {form: ms(ours, form, "fwd+bwd", time) for form in FORMS}
        parts = [ratios((f"{form} / constant", mine[form], mine["constant"]) for form in ("token", "channel")),
                 ratios((f"{form} / SDPA", mine[form], ms("sdpa flash", "", "fwd+bwd", time)) for form in FORMS),
                 ratios((f"{form} / fla", mine[form], ms(FLA_PEER[form], form, "fwd+bwd", time)) for form in FORMS)]
        if any(parts):
            lines.append(f"- fwd+bwd, T {time}: " + "; ".join(part for part in parts if part))
    forward = ok.loc[ok["mode"] == "fwd", "T"]
    if len(forward):
        time = int(forward.max())
        part = ratios((f"SDPA / {form}", ms("sdpa flash", "", "fwd", time), ms(ours, form, "fwd", time))
                      for form in FORMS)
        if part:
            lines.append(f"- fwd, T {time}: {part}")
    return lines


def plot(df: pd.DataFrame, path: Path) -> None:
    """Milliseconds against T, one panel per mode, one line per implementation (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _decays(df)
    modes = list(dict.fromkeys(df["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        part = df[(df["mode"] == mode) & (df["status"] == "ok")]
        for (impl, decay), line in part.groupby(["impl", "decay"], sort=False):
            ax.plot(line["T"], line["ms"], marker="o", label=_label(impl, decay))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B x T = 32k tokens up to 32k, then B = 1)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{mode}, H={HEADS}, K=V={DIM}, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

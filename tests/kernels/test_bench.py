"""The benchmark's device check and report, run on CPU (Triton in the interpreter); timings need a GPU."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from kernels.linear_attention import bench


def test_check_on_device_passes_ours_and_flags_wrong_and_raising_peers(monkeypatch):
    real = bench._implementations()

    def wrong(q, k, v, a, s):
        return 1.1 * bench.linear_attention(q, k, v, a, scale=s, backend="torch")[0]

    def raising(q, k, v, a, s):
        raise RuntimeError("forward refused\nsecond line")

    def no_backward(q, k, v, a, s):
        o = bench.linear_attention(q, k, v, a, scale=s, backend="torch")[0]
        return _RefuseBackward.apply(o)

    calls = []

    def noisy(q, k, v, a, s):  # right, but not the same bits twice (as atomics would make it)
        calls.append(1)
        return (1 + 1e-5 * len(calls)) * bench.linear_attention(q, k, v, a, scale=s, backend="torch")[0]

    impls = {key: fn for key, fn in real.items() if key[0].startswith("ours")}
    assert (bench.PACKED, "constant") in impls and (bench.PACKED, "token") in impls
    impls[("peer wrong", "token")] = wrong
    impls[("peer noisy", "token")] = noisy
    impls[("peer raising", "channel")] = raising
    impls[("peer no backward", "token")] = no_backward
    monkeypatch.setattr(bench, "_implementations", lambda peers=True: impls)
    # One chunk, off its grid, as the other checks here: what this test proves is the check's bookkeeping; our kernels
    # over several chunks, strong decays and their sub-blocks are test_linear_attention.py's, at tighter tolerances.
    results = bench.check_on_device("cpu", size=(1, 20, 1, 16), widths=(), fused_width=None)
    by_key = {(r.impl, r.decay, r.dtype): r for r in results if not r.strong}
    # Two dtypes each; data-dependent decays also strong; ours on Triton again with the states.
    per_form = {form: 2 if form == "constant" else 4 for form in bench.FORMS}
    assert len(results) == sum(per_form[form] for _, form in impls) + sum(per_form.values())
    states = [r for r in results if r.impl == bench.STATE]
    assert sorted({r.decay for r in states}) == sorted(bench.FORMS) and all(r.ok and r.repeatable for r in states)
    for form in bench.FORMS:
        for backend in ("ours triton", "ours torch"):
            for r in (r for r in results if (r.impl, r.decay) == (backend, form)):
                assert r.ok and max(r.forward_err, r.backward_err) <= bench.DEVICE_TOL[getattr(torch, r.dtype)], r
            assert sum(r.strong for r in results if (r.impl, r.decay) == (backend, form)) == (form != "constant") * 2
    for r in (r for r in results if r.impl == bench.PACKED):
        assert r.ok and max(r.forward_err, r.backward_err) <= bench.DEVICE_TOL[getattr(torch, r.dtype)], r
    assert all(r.repeatable for r in results if r.impl.startswith("ours"))
    noisy_result = by_key[("peer noisy", "token", "float32")]
    assert noisy_result.ok and not noisy_result.repeatable
    wrong_result = by_key[("peer wrong", "token", "float32")]
    assert not wrong_result.forward_ok and wrong_result.forward_err == pytest.approx(0.1, rel=1e-3)
    raised = by_key[("peer raising", "channel", "bfloat16")]
    assert not raised.ok and raised.error == "RuntimeError: forward refused"
    half = by_key[("peer no backward", "token", "float32")]
    assert half.forward_ok and not half.backward_ok and half.error == "RuntimeError: no backward here"


@pytest.mark.parametrize("form", ["token", "channel"])
def test_check_repeats_its_inputs_whatever_the_global_rng(form):
    """A check draws its decays from its own seeded generator: the same errors in every process (on the H200 the
    per-channel check's errors moved between calls while its decays came from the global generator)."""
    fn = bench._ours("torch")
    first = bench._check_one(fn, form, torch.float32, "cpu", 1, 100, 1, 8)
    torch.randn(1000)  # moves the global generator, as earlier checks in a process do
    second = bench._check_one(fn, form, torch.float32, "cpu", 1, 100, 1, 8)
    assert (first.forward_err, first.backward_err) == (second.forward_err, second.backward_err)
    assert first.forward_err > 0 and first.backward_err > 0  # chunked against step by step: real errors compared


def test_check_on_device_checks_ours_on_triton_again_at_other_head_widths(monkeypatch):
    real = bench._implementations(peers=False)
    keys = [("ours triton", "constant"), ("ours torch", "constant"), (bench.PACKED, "constant")]
    monkeypatch.setattr(bench, "_implementations", lambda peers=True: {key: real[key] for key in keys})
    monkeypatch.setattr(bench, "_check_one", _real_checks_only_where(lambda dim: dim != 16))
    results = bench.check_on_device("cpu", size=(1, 20, 1, 16), widths=(32, 16), fused_width=None)
    # The size's own width once for all three; width 32 again for the Triton two only; both dtypes each; Triton with
    # the states at the size's width.
    assert sorted((r.impl, r.dim) for r in results) == sorted(
        [(impl, 16) for impl, _ in keys for _ in range(2)] + [("ours triton", 32)] * 2 + [(bench.PACKED, 32)] * 2
        + [(bench.STATE, 16)] * 2)
    assert all(r.ok and r.repeatable for r in results), results
    failed = replace([r for r in results if r.dim == 32][-1], forward_ok=False)
    assert bench.check_summary([failed]).endswith(f"failed: {failed.impl} constant {failed.dtype} D 32")


def test_check_on_device_checks_the_fused_walks_forced_in_bf16(monkeypatch):
    from kernels.linear_attention import triton_chunk

    real = bench._implementations(peers=False)
    keys = [("ours triton", "constant"), ("ours triton", "token"), ("ours triton", "channel"), (bench.PACKED, "token")]
    monkeypatch.setattr(bench, "_implementations", lambda peers=True: {key: real[key] for key in keys})
    walked = []
    fused_fwd = triton_chunk._fused_fwd_kernel

    class Spy:  # counts the fused forward's launches, and launches it
        def __getitem__(self, grid):
            walked.append(triton_chunk.FUSED_MIN_HEADS_PER_SM)
            return fused_fwd[grid]

    monkeypatch.setattr(triton_chunk, "_fused_fwd_kernel", Spy())
    default = triton_chunk.FUSED_MIN_HEADS_PER_SM
    # Checked for real only with the walks forced: a switch forced for other runs too, or left on after, would check
    # those for real as well, and they would walk (`walked`); one never forced would leave the fused runs unwalked.
    monkeypatch.setattr(bench, "_check_one", _real_checks_only_where(
        lambda dim: triton_chunk.FUSED_MIN_HEADS_PER_SM != default))
    results = bench.check_on_device("cpu", size=(1, 20, 1, 16), widths=(), fused_width=32)
    fused = [r for r in results if r.impl.endswith(" fused")]
    # Scalar forms only, bf16 only (the per-token one also strong), at the fused width; each passed and repeated.
    assert sorted((r.impl, r.decay, r.strong) for r in fused) == [
        ("ours triton fused", "constant", False), ("ours triton fused", "token", False),
        ("ours triton fused", "token", True), ("ours triton packed fused", "token", False),
        ("ours triton packed fused", "token", True)]
    assert all(r.dtype == "bfloat16" and r.dim == 32 and r.ok and r.repeatable for r in fused), fused
    # Only those runs walked fused (two calls each), and the switch was put back.
    assert len(walked) == 2 * len(fused) and set(walked) == {0}
    assert triton_chunk.FUSED_MIN_HEADS_PER_SM == default


def _real_checks_only_where(real):
    """bench._check_one where real(dim) holds (dim: the head width checked), elsewhere a passing, repeatable result
    with no kernel run.

    For the tests of one kind of run (another head width, the fused walks): the other checks check_on_device makes,
    of our implementations unforced at the size's own width (with the states too), are those that
    test_check_on_device_passes_ours_and_flags_wrong_and_raising_peers makes at the same size and asserts on, and
    each costs seconds in the interpreter."""
    checked = bench._check_one

    def check(fn, form, dtype, device, batch, time, heads, dim, *, strong=False, state=False):
        if real(dim):
            return checked(fn, form, dtype, device, batch, time, heads, dim, strong=strong, state=state)
        return bench.CheckResult("", form, bench._dtype_name(dtype), True, True, 0.0, 0.0, "o", strong=strong,
                                 repeatable=True)

    return check


class _RefuseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no backward here")


def test_markdown_table_and_plot(tmp_path):
    rows = [
        {"impl": "ours triton", "decay": "token", "mode": "fwd", "B": 1, "T": 2048, "ms": 1.234, "status": "ok"},
        {"impl": "ours triton", "decay": "token", "mode": "fwd", "B": 1, "T": 8192, "ms": 4.5, "status": "ok"},
        {"impl": "fla chunk_gla", "decay": "channel", "mode": "fwd", "B": 1, "T": 2048, "ms": math.nan,
         "status": "error: RuntimeError: x|y"},
        {"impl": "sdpa flash", "decay": "", "mode": "fwd+bwd", "B": 1, "T": 2048, "ms": 9.0, "status": "ok"},
    ]
    df = pd.DataFrame(rows)
    table = bench.markdown_table(df)
    lines = table.splitlines()
    assert lines[0] == "| mode | B | T | ours triton (token) | fla chunk_gla (channel) | sdpa flash |"
    assert "| fwd | 1 | 2048 | 1.23 | error: RuntimeError: x/y |  |" in lines
    assert "| fwd+bwd | 1 | 2048 |  |  | 9.00 |" in lines
    # The CSV the benchmark writes gives the same table back (SDPA's empty decay is read as NaN).
    df.to_csv(tmp_path / "bench.csv", index=False)
    assert bench.markdown_table(pd.read_csv(tmp_path / "bench.csv")) == table
    bench.plot(df, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_comparisons_are_the_targets_ratios_from_ok_cells():
    def row(impl, decay, mode, time, ms, status="ok"):
        return {"impl": impl, "decay": decay, "mode": mode, "B": 1, "T": time, "ms": ms, "status": status}

    df = pd.DataFrame([
        row("ours triton", "constant", "fwd+bwd", 2048, 1.0), row("ours triton", "token", "fwd+bwd", 2048, 1.1),
        row("ours triton", "channel", "fwd+bwd", 2048, 1.5), row("sdpa flash", "", "fwd+bwd", 2048, 2.0),
        row("fla chunk_gla", "channel", "fwd+bwd", 2048, 3.0),
        row("fla chunk_simple_gla", "token", "fwd+bwd", 2048, math.nan, "failed check (bfloat16: no bwd)"),
        row("ours triton", "constant", "fwd", 1 << 20, 10.0), row("ours triton", "channel", "fwd", 1 << 20, 20.0),
        row("sdpa flash", "", "fwd", 1 << 20, 7000.0), row("sdpa flash", "", "fwd", 2048, 1.0),
    ])
    assert bench.comparisons(df) == [
        "- fwd+bwd, T 2048: token / constant 1.10x, channel / constant 1.50x; constant / SDPA 0.50x, token / SDPA "
        "0.55x, channel / SDPA 0.75x; channel / fla 0.50x",
        "- fwd, T 1048576: SDPA / constant 700x, SDPA / channel 350x",
    ]


def test_run_bench_skips_failed_checks_and_records_errors(monkeypatch, tmp_path):
    """The orchestration without a GPU: timings are faked, the bookkeeping around them is real."""
    impls = {("ours triton", "token"): None, ("peer", "token"): None, ("peer", "channel"): None}
    checks = [
        bench.CheckResult("ours triton", "token", "bfloat16", True, True, 1e-3, 1e-3, "dq"),
        bench.CheckResult("peer", "token", "bfloat16", True, False, 1e-3, math.nan, "o", "RuntimeError: no bwd"),
        bench.CheckResult("peer", "channel", "float32", False, False, 0.5, 0.5, "dk"),
    ]
    calls = []

    def fake_time(fn, impl, form, batch, time, backward, quick):
        calls.append((impl, form, backward))
        if impl == "sdpa flash" and time > 4096:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return 1.5, (math.nan if impl == "peer" else 1.2)  # a peer whose capture failed: no GPU time

    monkeypatch.setattr(bench, "_implementations", lambda peers=True: impls)
    monkeypatch.setattr(bench, "check_on_device", lambda device, peers=True: checks)
    monkeypatch.setattr(bench, "_time_one", fake_time)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    df = bench.run_bench(tmp_path, quick=True)

    def status(impl, decay, mode, time=2048):
        row = df[(df.impl == impl) & (df.decay == decay) & (df["mode"] == mode) & (df["T"] == time)]
        assert len(row) == 1
        return row.iloc[0]

    ours = status("ours triton", "token", "fwd+bwd")
    assert ours.ms == 1.5 and ours.gpu_ms == 1.2
    assert math.isnan(status("peer", "token", "fwd").gpu_ms)
    assert status("peer", "token", "fwd").status == "ok"
    assert status("peer", "token", "fwd+bwd").status == "failed check (bfloat16: RuntimeError: no bwd)"
    assert math.isnan(status("peer", "token", "fwd+bwd").ms)
    assert status("peer", "channel", "fwd").status.startswith("failed check (float32: o rel err 0.5")
    assert status("sdpa flash", "", "fwd", 8192).status.startswith("error: OutOfMemoryError: CUDA out of memory")
    assert ("peer", "channel", False) not in calls and ("peer", "token", True) not in calls
    for name in ("linear_attention.csv", "linear_attention.png", "linear_attention.md", "linear_attention_checks.csv"):
        assert (tmp_path / name).stat().st_size > 0
    markdown = (tmp_path / "linear_attention.md").read_text()
    assert "failed check" in markdown
    # The comparisons follow the table (ours at 1.5 ms and SDPA's at 1.5 ms where it ran).
    assert "- fwd+bwd, T 2048: token / SDPA 1.00x" in markdown
    # Then the same from GPU time, where the peer has none: its cell is empty, not a number.
    eager, gpu = markdown.split("GPU time, the same work replayed as a CUDA graph")
    assert "| fwd | 16 | 2048 | 1.50 | 1.50 |" in eager and "| fwd | 16 | 2048 | 1.20 |  |" in gpu
    assert "- fwd+bwd, T 2048: token / SDPA 1.00x" in gpu
    # How far the host set the eager pace: ours' eager over GPU time at each T (1.5 / 1.2 ms here).
    assert "- eager / GPU time, ours fwd+bwd at T 2048 / 8192: token 1.25x / 1.25x (well above 1" in gpu
    # A CSV from before GPU time was recorded gives the eager part alone.
    old = pd.read_csv(tmp_path / "linear_attention.csv").drop(columns="gpu_ms")
    assert bench.report(old) == eager.rstrip("\n")


def test_check_summary_names_failures_and_unrepeatable_passes():
    checks = [
        bench.CheckResult("ours triton", "token", "bfloat16", True, True, 1e-3, 1e-3, "dq", repeatable=True),
        bench.CheckResult("peer", "token", "float32", True, True, 1e-3, 1e-3, "dq", strong=True),
        bench.CheckResult("peer", "channel", "float32", False, False, 0.5, 0.5, "dk", repeatable=True),
    ]
    assert bench.check_summary(checks) == ("checks: 2 of 3 passed, 2 repeatable; failed: peer channel float32; "
                                           "passed but not bitwise repeatable: peer token float32 strong")
    assert bench.check_summary(checks[:1]) == "checks: 1 of 1 passed, 1 repeatable"


@pytest.mark.parametrize("form", ["constant", "channel"])
def test_state_check_fails_a_wrong_final_state_or_initial_state_gradient(form):
    """The state check compares the final state and the initial state's gradient with naive's, not only o."""
    right = bench._ours_state("torch")

    def wrong_state(q, k, v, a, s, h0):
        o, st = right(q, k, v, a, s, h0)
        return o, 1.1 * st

    def wrong_h0_grad(q, k, v, a, s, h0):  # the state flows forward, but its gradient is doubled
        return right(q, k, v, a, s, _Double.apply(h0))

    ok = bench._check_one(right, form, torch.float32, "cpu", 1, 40, 1, 8, state=True)
    assert ok.ok and ok.repeatable, ok
    bad = bench._check_one(wrong_state, form, torch.float32, "cpu", 1, 40, 1, 8, state=True)
    assert not bad.forward_ok and bad.worst == "final_state" and bad.forward_err == pytest.approx(0.1, rel=1e-3)
    grad = bench._check_one(wrong_h0_grad, form, torch.float32, "cpu", 1, 40, 1, 8, state=True)
    assert grad.forward_ok and not grad.backward_ok and grad.worst == "dinitial_state", grad


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_check_on_device_checks_the_fla_peers_in_bf16_alone(monkeypatch):
    """fla's kernels are timed in bf16, and each dtype's check made them autotune anew: their fp32 checks were about 9
    of `bench kernels`' 23 minutes on a fresh H100. Ours stay checked in both dtypes."""
    peer = bench.FLA_PEER["token"]
    impls = {("ours torch", "token"): bench._ours("torch"),
             (peer, "token"): lambda q, k, v, a, s: bench.linear_attention(q, k, v, a, scale=s, backend="torch")[0]}
    monkeypatch.setattr(bench, "_implementations", lambda peers=True: impls)
    results = bench.check_on_device("cpu", size=(1, 20, 1, 16), widths=(), fused_width=None)
    dtypes = {impl: sorted({r.dtype for r in results if r.impl == impl}) for impl in ("ours torch", peer)}
    assert dtypes == {"ours torch": ["bfloat16", "float32"], peer: ["bfloat16"]}, dtypes
    assert all(r.ok for r in results), results


def test_check_on_device_checks_the_peers_last_and_warms_them_up_only_on_a_gpu(monkeypatch):
    """The peers' checks come after ours, so that on a GPU their kernels compile in children meanwhile; on the CPU
    (fla needs a GPU) no child is started."""
    peer = bench.FLA_PEER["token"]
    impls = {(peer, "token"): bench._ours("torch"), ("ours torch", "token"): bench._ours("torch")}
    monkeypatch.setattr(bench, "_implementations", lambda peers=True: impls)
    started = []
    monkeypatch.setattr(bench, "_start_warm_ups", lambda *args: started.append(args) or [])
    results = bench.check_on_device("cpu", size=(1, 20, 1, 16), widths=(), fused_width=None)
    assert [r.impl for r in results][-2:] == [peer, peer] and results[0].impl == "ours torch"
    assert started == []


def test_warm_up_children_run_a_check_and_a_failing_or_late_one_is_not_fatal(caplog):
    """The warm-up mechanism itself, with one of ours standing in for a peer: a child imports this module afresh
    (spawned) and runs its check; a child that raises, or outlives the wait, is logged and the wait returns."""
    caplog.set_level("INFO", logger=bench.__name__)
    size = (1, 20, 1, 16)
    good = bench._start_warm_ups([("ours torch", "token")], size, "cpu")
    bad = bench._start_warm_ups([("no such peer", "token")], size, "cpu")
    bench._join_warm_ups(good + bad)
    assert good[0].exitcode == 0 and bad[0].exitcode not in (0, None)
    assert "warm-up no such peer token exited with 1" in caplog.text
    late = bench._start_warm_ups([("ours torch", "token")], size, "cpu")
    bench._join_warm_ups(late, timeout_s=0.0)
    assert not late[0].is_alive() and "still running after 0 s: stopped" in caplog.text

"""Benchmark of the analysis layer (`slab bench analysis`): approach 3 with its bootstrap, and a report
over a MiniMax-01-sized study (about 3,700 runs), both on synthetic data."""

from __future__ import annotations

import tempfile
import time

from analysis.fits import fit_approach3
from analysis.report import write_report
from analysis.synthetic import random_runs, study


def bench_analysis(
    *,
    n_fit_runs: int = 200,
    n_bootstrap: int = 1000,
    n_report_runs: int = 3700,
    report_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Seconds for approach 3 with `n_bootstrap` bootstraps on `n_fit_runs` runs (target < 10 s on two
    cores) and for `write_report` over `n_report_runs` runs with ~50 curve points each (target < 30 s)."""
    runs = random_runs(n_fit_runs, seed=seed)
    t0 = time.perf_counter()
    fit_approach3(runs, n_bootstrap=n_bootstrap, seed=seed)
    t_fit = time.perf_counter() - t0

    data = study(n_report_runs, seed=seed)
    with tempfile.TemporaryDirectory(prefix="slab-bench-") as out:
        t0 = time.perf_counter()
        write_report(data.runs, data.metrics, data.evals, out, throughput=data.throughput,
                     bootstrap=report_bootstrap, seed=seed)
        t_report = time.perf_counter() - t0
    return {"approach3_bootstrap_s": t_fit, "report_s": t_report}

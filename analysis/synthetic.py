"""Synthetic runs, curves, evals and throughput drawn from a known law, for tests and benchmarks.

Frames follow the contracts of `db.queries` (runs, metrics, evals, throughput), so the fits and the
report can be checked against a known truth without training anything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.fits import chinchilla_law

# Hoffmann et al. 2022's published approach-3 estimates (REFERENCES.md §2).
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}

# (d_model, n_layers, n_heads): a small ladder after Chinchilla's Table A9 (REFERENCES.md §2b).
LADDER = [(512, 8, 8), (640, 10, 10), (768, 12, 12), (768, 18, 12), (1024, 16, 16), (1280, 18, 10),
          (1408, 21, 11), (1536, 25, 12), (1792, 23, 14), (2048, 22, 16)]
VOCAB = 32_000

# How each architecture's synthetic law differs from the baseline (factors on A and B; E shift).
ARCH_LAWS = {
    "softmax": (1.00, 1.00, 0.000),
    "lightning": (1.06, 1.02, 0.010),
    "hybrid": (0.99, 1.00, 0.000),
    "hgrn2": (1.08, 1.03, 0.015),
    "mamba2": (1.04, 1.02, 0.008),
}
HYBRID_PATTERNS = ["LLLLLLLS", "LLLS", "LS", "LLLLLLLLLLLLLLLS"]


@dataclass(frozen=True)
class Study:
    """The four frames of a synthetic study."""

    runs: pd.DataFrame
    metrics: pd.DataFrame
    evals: pd.DataFrame
    throughput: pd.DataFrame


def _run_ids(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest()[:16] for i in range(n)]


def runs_frame(
    N: np.ndarray,
    D: np.ndarray,
    L: np.ndarray,
    *,
    arch: str | Sequence[str] = "softmax",
    plan: str = "synthetic",
    prefix: str = "run",
    extra: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """A runs frame with the full column contract, built from non-embedding N, tokens D and loss L."""
    n = len(N)
    N = np.asarray(N, float)
    d_model = np.clip(np.round(np.cbrt(N / 12 * 64) / 64) * 64, 64, None).astype(int)  # l ~ d/64
    n_layers = np.maximum(1, np.round(N / (12 * d_model.astype(float) ** 2))).astype(int)
    out = pd.DataFrame(
        {
            "run_id": _run_ids(prefix, n),
            "arch": np.broadcast_to(np.asarray(arch, dtype=object), (n,)),
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": np.maximum(1, d_model // 64),
            "hybrid": "",
            "seq_len": 2048,
            "batch_size": 64,
            "lr": 3e-4,
            "seed": np.arange(n) % 3,
            "params": N + 2 * VOCAB * d_model,
            "nonembed_params": N,
            "tokens": np.asarray(D, float),
            "flops": 6.0 * N * np.asarray(D, float),
            "final_loss": np.asarray(L, float),
            "val_loss": np.asarray(L, float),
            "wall_s": 6.0 * N * np.asarray(D, float) / 4e14,
            "plan": plan,
        }
    )
    for k, v in (extra or {}).items():
        out[k] = v
    return out


def grid_runs(
    n_sizes: int = 20,
    n_tokens: int = 10,
    *,
    N_range: tuple[float, float] = (1e7, 1e10),
    D_range: tuple[float, float] = (1e8, 1e12),
    noise: float = 0.005,
    law: Mapping[str, float] = HOFFMANN,
    seed: int = 0,
    arch: str = "softmax",
) -> pd.DataFrame:
    """Runs on a log-spaced grid of N x D with loss from L(N, D) times lognormal noise of sd `noise`."""
    rng = np.random.default_rng(seed)
    Ns = np.geomspace(*N_range, n_sizes)
    Ds = np.geomspace(*D_range, n_tokens)
    N, D = (v.ravel() for v in np.meshgrid(Ns, Ds, indexing="ij"))
    L = chinchilla_law(N, D, **law) * np.exp(noise * rng.standard_normal(N.size))
    return runs_frame(N, D, L, arch=arch, prefix=f"grid{seed}")


def random_runs(
    n: int = 200,
    *,
    N_range: tuple[float, float] = (1e7, 1e10),
    tokens_per_param: tuple[float, float] = (2.0, 200.0),
    noise: float = 0.01,
    law: Mapping[str, float] = HOFFMANN,
    seed: int = 0,
    arch: str = "softmax",
) -> pd.DataFrame:
    """n runs with N log-uniform over N_range and D / N log-uniform over tokens_per_param, loss from L(N, D)."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(*np.log(N_range), n))
    D = N * np.exp(rng.uniform(*np.log(tokens_per_param), n))
    L = chinchilla_law(N, D, **law) * np.exp(noise * rng.standard_normal(n))
    return runs_frame(N, D, L, arch=arch, prefix=f"rand{seed}")


def isoflop_runs(
    budgets: Sequence[float] = (1e18, 1e19, 1e20, 1e21),
    n_sizes: int = 9,
    *,
    spread: float = 8.0,
    noise: float = 0.003,
    law: Mapping[str, float] = HOFFMANN,
    seed: int = 0,
    arch: str = "softmax",
    budget_column: bool = True,
) -> pd.DataFrame:
    """IsoFLOP runs: per budget, n_sizes sizes log-spaced over `spread` around the true N_opt, D = C / 6N."""
    from analysis.fits import optimal_allocation

    rng = np.random.default_rng(seed)
    rows_N, rows_D, rows_C = [], [], []
    for C in budgets:
        n_opt, _ = optimal_allocation(C, law["A"], law["B"], law["alpha"], law["beta"])
        # a random offset keeps the true optimum off the grid, as in a real sweep
        Ns = n_opt * np.geomspace(1 / spread, spread, n_sizes) * math.exp(rng.uniform(-0.2, 0.2))
        rows_N += list(Ns)
        rows_D += list(C / (6 * Ns))
        rows_C += [C] * n_sizes
    N, D = np.array(rows_N), np.array(rows_D)
    L = chinchilla_law(N, D, **law) * np.exp(noise * rng.standard_normal(N.size))
    extra = {"budget": np.array(rows_C)} if budget_column else None
    return runs_frame(N, D, L, arch=arch, plan="isoflop", prefix=f"iso{seed}", extra=extra)


def curves_for(runs: pd.DataFrame, law: Mapping[str, float] = HOFFMANN, *, n_steps: int = 50,
               noise: float = 0.003, seed: int = 0) -> pd.DataFrame:
    """Training curves whose loss at t tokens is L(N, t), sampled log-uniformly in t up to each run's D."""
    rng = np.random.default_rng(seed)
    N = runs["nonembed_params"].to_numpy(float)[:, None]
    D = runs["tokens"].to_numpy(float)[:, None]
    frac = np.geomspace(0.02, 1.0, n_steps)[None, :]
    t = D * frac
    L = chinchilla_law(N, t, **law) * np.exp(noise * rng.standard_normal(t.shape))
    steps = np.broadcast_to(np.round(frac * 1000).astype(int), t.shape)
    n = len(runs)
    return pd.DataFrame(
        {
            "run_id": np.repeat(runs["run_id"].to_numpy(), n_steps),
            "step": steps.ravel(),
            "tokens": t.ravel(),
            "flops": (6 * N * t).ravel(),
            "loss": L.ravel(),
            "lr": 3e-4,
            "tokens_per_s": np.repeat(4e14 / (6 * N.ravel()), n_steps) if n else [],
        }
    )


def hybrid_pattern_for(arch: str, i: int) -> str:
    """The hybrid layer pattern of the i-th synthetic run of ``arch`` (cycling ``HYBRID_PATTERNS``; "" otherwise)."""
    return HYBRID_PATTERNS[i % len(HYBRID_PATTERNS)] if arch == "hybrid" else ""


#: The training context of the synthetic study's runs.
STUDY_SEQ_LEN = 1024


def study(
    n_runs: int = 300,
    *,
    archs: Sequence[str] = ("softmax", "lightning", "hybrid", "hgrn2", "mamba2"),
    n_steps: int = 50,
    isoflop_budgets: Sequence[float] = (3e17, 1e18, 3e18),
    noise: float = 0.004,
    seed: int = 0,
) -> Study:
    """A MiniMax-01-style synthetic study: per arch a size x tokens sweep plus an IsoFLOP block, curves,
    NIAH and MQAR evals, and a throughput table."""
    rng = np.random.default_rng(seed)
    archs = list(archs)
    sizes = np.array([12 * l * d * d for d, l, _ in LADDER], float)
    iso_blocks = []
    for k, arch in enumerate(archs):
        fA, fB, dE = ARCH_LAWS.get(arch, (1.05, 1.02, 0.01))
        law = {**HOFFMANN, "A": HOFFMANN["A"] * fA, "B": HOFFMANN["B"] * fB, "E": HOFFMANN["E"] + dE}
        iso = isoflop_runs(isoflop_budgets, 7, spread=6.0, noise=noise, law=law, seed=seed + k, arch=arch,
                           budget_column=False)
        iso_blocks.append(iso)
    n_iso = sum(len(b) for b in iso_blocks)
    n_grid = max(n_runs - n_iso, len(archs) * 4)
    arch_of = np.array(archs, dtype=object)[np.arange(n_grid) % len(archs)]
    N = sizes[rng.integers(0, len(sizes), n_grid)]
    D = N * rng.choice([2.0, 5.0, 10.0, 20.0, 40.0, 80.0], n_grid) * np.exp(rng.uniform(-0.1, 0.1, n_grid))
    laws = [ARCH_LAWS.get(a, (1.05, 1.02, 0.01)) for a in arch_of]
    fA, fB, dE = (np.array(v) for v in zip(*laws))
    L = chinchilla_law(N, D, HOFFMANN["E"] + dE, HOFFMANN["A"] * fA, HOFFMANN["B"] * fB,
                       HOFFMANN["alpha"], HOFFMANN["beta"]) * np.exp(noise * rng.standard_normal(n_grid))
    grid = runs_frame(N, D, L, arch=arch_of, plan="grid", prefix=f"study{seed}")
    grid["seed"] = rng.integers(0, 3, n_grid)
    grid["lr"] = rng.choice([1e-4, 3e-4, 1e-3], n_grid)
    runs = pd.concat([grid, *iso_blocks], ignore_index=True).iloc[:n_runs].reset_index(drop=True)
    runs["hybrid"] = [hybrid_pattern_for(a, i) for i, a in enumerate(runs["arch"])]
    runs["seq_len"] = STUDY_SEQ_LEN  # NIAH's lengths 512 and 1024 lie within it, 2048 and 4096 beyond

    metrics = []
    for arch, sub in runs.groupby("arch", sort=False):
        fA, fB, dE = ARCH_LAWS.get(arch, (1.05, 1.02, 0.01))
        law = {**HOFFMANN, "A": HOFFMANN["A"] * fA, "B": HOFFMANN["B"] * fB, "E": HOFFMANN["E"] + dE}
        metrics.append(curves_for(sub, law, n_steps=n_steps, noise=noise, seed=seed + len(metrics)))
    metrics = pd.concat(metrics, ignore_index=True)
    return Study(runs, metrics, _evals(runs, rng), _throughput(archs))


def _evals(runs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """NIAH (length x depth) and MQAR accuracies shaped like MiniMax-01's findings (REFERENCES.md §5)."""
    lengths, depths = [512, 1024, 2048, 4096], [0.0, 0.25, 0.5, 0.75, 1.0]
    size = np.log10(runs["nonembed_params"].to_numpy(float))
    arch = runs["arch"].to_numpy()
    n_soft = np.array([p.count("S") for p in runs["hybrid"]])
    n_lin = np.array([len(p) - p.count("S") for p in runs["hybrid"]])
    ratio = np.where(n_soft > 0, n_lin / np.maximum(n_soft, 1), np.inf)
    base = np.select(
        [arch == "softmax", arch == "hybrid"],
        [0.95, 0.98 - 0.02 * np.log2(1 + ratio)],
        0.15,
    ) * np.clip((size - 6.5) / 2.5, 0.3, 1.0)
    names, values, ids = [], [], []
    steps = []
    last = 1000
    for L in lengths:
        for dp in depths:
            decay = np.where((arch == "softmax") | (arch == "hybrid"), 0.03, 0.25) * math.log2(L / 512)
            p = np.clip(base - decay - 0.05 * (dp == 0.5), 0, 1)
            values.append(np.clip(p + 0.05 * rng.standard_normal(len(runs)), 0, 1))
            names.append(f"niah/len={L}/depth={dp:g}")
    mq = np.select([arch == "softmax", arch == "hybrid"], [0.99, 0.97 - 0.03 * np.log2(1 + ratio)], 0.35)
    mq = mq * np.clip(runs["d_model"].to_numpy() / 1024, 0.4, 1.0)
    values.append(np.clip(mq + 0.03 * rng.standard_normal(len(runs)), 0, 1))
    names.append("mqar/acc")
    n = len(runs)
    ids = np.tile(runs["run_id"].to_numpy(), len(names))
    steps = np.full(n * len(names), last)
    return pd.DataFrame({"run_id": ids, "step": steps, "name": np.repeat(names, n), "value": np.concatenate(values)})


def _throughput(archs: Sequence[str]) -> pd.DataFrame:
    """Tokens/s vs sequence length: softmax falls with length, linear mixers stay flat (REFERENCES.md §5)."""
    rows = []
    for arch in archs:
        for T in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
            if arch == "softmax":
                tps = 16500 / (1 + 0.014 * (T / 1024 - 1))
            elif arch == "hybrid":
                tps = 16200 / (1 + 0.002 * (T / 1024 - 1))
            else:
                tps = {"lightning": 16000, "hgrn2": 14000, "mamba2": 13500}.get(arch, 13000)
            rows.append({"arch": arch, "seq_len": T, "tokens_per_s": float(tps), "params": 3e9})
    return pd.DataFrame(rows)

"""Architecture comparisons: per-arch frontier laws, loss gaps and compute multipliers with bootstrap
intervals, and retrieval (NIAH, MQAR) and throughput tables (MiniMax-01 §2.2, REFERENCES.md §4-5)."""

from __future__ import annotations

import logging
import math
import re
import zlib
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from analysis.fits import (
    DEFAULT_PARAMS_COL,
    LOSS_COLUMNS,
    FitError,
    FitResult,
    FrontierNotIdentified,
    Progress,
    compute_needed,
    done_runs,
    fit_loss_compute,
    loss_compute_law,
    percentile_interval,
    positive_column_errors,
    _frame_records,
    _some,
)

log = logging.getLogger(__name__)


@dataclass
class ArchComparison:
    """Per-arch frontier fits and, per arch and budget, the loss gap and compute multiplier vs a baseline."""

    baseline: str
    fits: dict[str, FitResult]
    gaps: pd.DataFrame
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "baseline": self.baseline,
            "fits": {k: v.to_dict() for k, v in self.fits.items()},
            "gaps": _frame_records(self.gaps),
            "errors": dict(self.errors),
        }


def arch_seed(seed: int, arch: str) -> int:
    """The bootstrap seed of one arch's fits, from the user's seed and the arch's name: the same in fit, compare and
    report whatever archs are fitted beside it, and unlike any other arch's, so that no two resample alike."""
    return int(np.random.SeedSequence([seed, zlib.crc32(arch.encode())]).generate_state(1)[0])


def arch_names(runs: pd.DataFrame) -> pd.Series:
    """The runs' arch column as text; a run with none (missing or blank) is a FitError naming it (pandas 3 keeps a
    missing value missing through astype(str), and sorting the names then failed with a TypeError)."""
    arch = runs["arch"]
    missing = (arch.isna() | (arch.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        ids = runs["run_id"].to_numpy() if "run_id" in runs.columns else runs.index.to_numpy()
        raise FitError(f"{int(missing.sum())} run(s) have no arch: {_some(ids[missing])}")
    return arch.astype(str)


def fit_per_arch(
    runs: pd.DataFrame,
    *,
    metrics: pd.DataFrame | None = None,
    form: str = "saturating",
    params_col: str = DEFAULT_PARAMS_COL,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
    on_error: str = "raise",
    edges: str = "auto",
) -> tuple[dict[str, FitResult], dict[str, str]]:
    """The frontier law of each arch; returns (fits, errors). on_error="skip" records an arch's FitError
    in `errors` instead of raising. edges="auto": every arch's frontier without its edge points, unless one
    arch's is not identified so (`FrontierNotIdentified`); then every arch's envelope, so that all are
    compared alike (each fit's details say which)."""
    if "arch" not in runs.columns:
        raise FitError("runs frame has no 'arch' column: nothing to compare")
    runs = runs.assign(arch=arch_names(runs))
    archs = sorted(runs["arch"].unique())
    curves = metrics is not None and not metrics.empty

    def each(mode: str) -> tuple[dict[str, FitResult], dict[str, str], bool]:
        fits, errors, unidentified = {}, {}, False
        for i, arch in enumerate(archs):
            sub = runs[runs["arch"].astype(str) == arch]
            sub_metrics = metrics[metrics["run_id"].isin(set(sub["run_id"]))] if curves else None
            if sub_metrics is not None and sub_metrics.empty:
                # fit_loss_compute would take its final points (validation loss, one point a run), a frontier not made
                # as the others' from training curves are: the gap would measure the difference of sources.
                errors[arch] = ("its runs have no training curves while other archs' have: a frontier from its final "
                                "points would not compare with theirs")
                continue
            try:
                fits[arch] = fit_on_runs(lambda nb: fit_loss_compute(
                    sub, metrics=sub_metrics, form=form, params_col=params_col, edges=mode,
                    n_bootstrap=nb, seed=arch_seed(seed, arch), progress=_stage(progress, i, len(archs), n_bootstrap),
                ), n_bootstrap, len(sub))
            except FrontierNotIdentified as exc:
                unidentified = True
                errors[arch] = str(exc)
            except FitError as exc:
                errors[arch] = str(exc)
        return fits, errors, unidentified

    fits, errors, unidentified = each("drop" if edges == "auto" else edges)
    if edges == "auto" and unidentified:
        fits, errors, _ = each("keep")
    if errors and on_error != "skip":
        arch, message = next(iter(errors.items()))
        raise FitError(f"arch {arch}: {message}")
    return fits, errors


def compare_archs(
    runs: pd.DataFrame,
    *,
    baseline: str = "softmax",
    budgets: Sequence[float] | None = None,
    metrics: pd.DataFrame | None = None,
    form: str = "saturating",
    params_col: str = DEFAULT_PARAMS_COL,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
    fits: dict[str, FitResult] | None = None,
    edges: str = "auto",
) -> ArchComparison:
    """Loss gap L_X(C) - L_base(C) and compute multiplier (compute X needs to reach the baseline's loss
    at C, over C) per arch and budget, with intervals from the paired bootstrap replicates.

    Budgets default to three points spanning the compute range every arch's frontier covers.
    """
    errors: dict[str, str] = {}
    if fits is None:
        fits, errors = fit_per_arch(
            runs, metrics=metrics, form=form, params_col=params_col, n_bootstrap=n_bootstrap, seed=seed,
            progress=progress, on_error="skip", edges=edges,
        )
    if baseline not in fits:
        why = errors.get(baseline, "no runs of that arch")
        fitted = ", ".join(fits) or "none"
        raise FitError(f"baseline arch {baseline!r} has no frontier fit ({why}); archs fitted: {fitted}")
    # an arch on a handful of runs has unknown intervals, and so has any gap it is in (the report's rule)
    fits = {arch: unknown_on_few_runs(fit) for arch, fit in fits.items()}
    if budgets is None:
        budgets = default_budgets(fits)
    rows = []
    base = fits[baseline]
    for arch, fit in fits.items():
        if arch == baseline:
            continue
        for C in budgets:
            rows.append({"arch": arch, "baseline": baseline, "C": float(C), **_gap_at(fit, base, float(C))})
    cols = ["arch", "baseline", "C", "loss", "loss_lo", "loss_hi", "baseline_loss", "baseline_loss_lo",
            "baseline_loss_hi", "gap", "gap_lo", "gap_hi", "rel_gap", "rel_gap_lo", "rel_gap_hi",
            "multiplier", "multiplier_lo", "multiplier_hi"]
    return ArchComparison(baseline, fits, pd.DataFrame(rows, columns=cols), errors)


def gap_summary(comparison: ArchComparison) -> pd.DataFrame:
    """The comparison to read in a terminal: per arch and budget, the loss, the gap in percent and the compute
    multiplier with their 95% intervals in brackets, "[unknown]" where either fit's are (the full columns stay in
    `comparison.gaps`)."""
    g = comparison.gaps

    def unknown(arch) -> bool:
        fits = (comparison.fits.get(arch), comparison.fits.get(comparison.baseline))
        return any(f is not None and "intervals_unknown" in f.details for f in fits)

    lost = [unknown(a) for a in g["arch"]]

    def with_ci(values, los, his, fmt):
        return [fmt(v) + (" [unknown]" if u else f" [{fmt(lo)}, {fmt(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "")
                for v, lo, hi, u in zip(values, los, his, lost)]

    def pct(v):
        return f"{100 * v:+.2f}"

    return pd.DataFrame({
        "arch": g["arch"],
        "C (FLOPs)": [f"{c:.2g}" for c in g["C"]],
        "loss": [fmt_number(v) for v in g["loss"]],
        f"{comparison.baseline} loss": [fmt_number(v) for v in g["baseline_loss"]],
        "gap % [95%]": with_ci(g["rel_gap"], g["rel_gap_lo"], g["rel_gap_hi"], pct),
        "compute multiplier [95%]": with_ci(g["multiplier"], g["multiplier_lo"], g["multiplier_hi"], fmt_number),
    })


def fmt_number(v: float) -> str:
    """A number as tables show it: 4 significant digits, 'inf' for an infinite one, '-' for NaN."""
    return f"{v:.4g}" if np.isfinite(v) else ("inf" if np.isinf(v) else "-")


def default_budgets(fits: dict[str, FitResult], n: int = 3, decades: float = 2.0) -> list[float]:
    """`n` log-spaced budgets over the top `decades` of the compute range all fits' frontiers share
    (of their union if they share none): the largest budgets are the ones a study is for."""
    lows = [f.points["C"].min() for f in fits.values()]
    highs = [f.points["C"].max() for f in fits.values()]
    lo, hi = max(lows), min(highs)
    if not lo < hi:
        lo, hi = min(lows), max(highs)
    lo = max(lo, hi / 10**decades)
    return [float(f"{c:.2g}") for c in np.geomspace(lo, hi, n)]


def _law_params(fit: FitResult, table: dict[str, Any]) -> tuple[Any, Any, Any]:
    E = table["E"] if "E" in fit.estimates else 0.0
    return E, table["A"], table["alpha"]


def _gap_at(fit: FitResult, base: FitResult, C: float) -> dict[str, float]:
    """Point values and paired-bootstrap intervals at one budget."""
    Ex, Ax, ax = _law_params(fit, fit.estimates)
    Eb, Ab, ab = _law_params(base, base.estimates)
    Lx = float(loss_compute_law(C, Ex, Ax, ax))
    Lb = float(loss_compute_law(C, Eb, Ab, ab))
    mult = float(compute_needed(Lb, Ex, Ax, ax)) / C
    out = {"loss": Lx, "baseline_loss": Lb, "gap": Lx - Lb, "rel_gap": (Lx - Lb) / Lb, "multiplier": mult}
    for k in list(out):
        out[f"{k}_lo"], out[f"{k}_hi"] = math.nan, math.nan
    # a fit whose replicates mostly failed has no interval (fits._check_bootstrap), nor has a gap drawn from them
    known = all("intervals_unknown" not in f.details for f in (fit, base))
    if fit.samples is not None and base.samples is not None and known:
        k = min(len(fit.samples), len(base.samples))
        sx = {c: fit.samples[c].to_numpy()[:k] for c in fit.samples.columns}
        sb = {c: base.samples[c].to_numpy()[:k] for c in base.samples.columns}
        # Replicate i of X and of the baseline are independent resamples of disjoint runs, so pairing
        # by index draws from the joint bootstrap distribution.
        with np.errstate(all="ignore"):
            lx = loss_compute_law(C, *_law_params(fit, sx))
            lb = loss_compute_law(C, *_law_params(base, sb))
            draws = {
                "loss": lx,
                "baseline_loss": lb,
                "gap": lx - lb,
                "rel_gap": (lx - lb) / lb,
                "multiplier": compute_needed(lb, *_law_params(fit, sx)) / C,
            }
        for name, v in draws.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = percentile_interval(v)
    return out


def _stage(progress: Progress | None, i: int, n: int, per: int) -> Progress | None:
    """Map one arch's (done, total) progress onto the whole comparison's."""
    if progress is None:
        return None
    return lambda done, total: progress(i * per + done, n * per)


# --------------------------------------------------------------------------------------------
# Retrieval and throughput tables


def parse_eval_name(name: str) -> dict[str, Any]:
    """Split 'niah/len=1024/depth=0.5' into {'task': 'niah', 'len': 1024, 'depth': 0.5}."""
    parts = str(name).split("/")
    out: dict[str, Any] = {"task": parts[0]}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            try:
                out[k] = float(v) if re.search(r"[.eE]", v) else int(v)
            except ValueError:
                out[k] = v
        else:
            out.setdefault("metric", p)
    return out


def _last_evals(evals: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's eval values at its last step, joined to the run's columns."""
    missing = [c for c in ("run_id", "name", "value") if c not in evals.columns]
    if missing:
        raise FitError(f"evals frame is missing column(s) {', '.join(map(repr, missing))}")
    ev = evals
    if "step" in ev.columns:
        ev = ev.sort_values("step", kind="mergesort").groupby(["run_id", "name"], sort=False).tail(1)
    wanted = ("run_id", "arch", "hybrid", "d_model", "n_layers", "seq_len", "params", "nonembed_params")
    keep = [c for c in wanted if c in runs.columns]
    return ev.merge(runs[keep], on="run_id", how="inner")


def niah_grid(niah: pd.DataFrame) -> pd.DataFrame:
    """A `niah_table` as a grid to read: one row per variant and depth, one column of accuracy (%) per length."""
    t = niah.assign(accuracy=100 * niah["accuracy"])
    t = t.pivot_table(index=["variant", "depth"], columns="length", values="accuracy").reset_index()
    t.columns = [str(c) if not isinstance(c, (int, np.integer)) else f"len {c}" for c in t.columns]
    return t


def beyond_context_names(niah: pd.DataFrame) -> dict[str, str]:
    """Renames for a `niah_grid`'s length columns beyond the runs' training context ('for some' where only some runs'
    context is exceeded): softmax with RoPE fails there by construction, which a bare length hides."""
    names = {}
    for n, sub in niah.groupby("length"):
        out = sub["in_context"].eq(False)
        if out.any():
            names[f"len {int(n)}"] = f"len {int(n)} (beyond training context{'' if out.all() else ' for some'})"
    return names


def variant_of(arch: str, hybrid: str | float | None) -> str:
    """The name a result is reported under: the arch, or for a hybrid its ratio ('hybrid 7:1')."""
    if str(arch) != "hybrid":
        return str(arch)
    r = hybrid_ratio(hybrid, "hybrid")
    return "hybrid" if math.isnan(r) else f"hybrid {ratio_label(r)}"


def niah_table(runs: pd.DataFrame, evals: pd.DataFrame, *, size: str | float = "largest",
               params_col: str = DEFAULT_PARAMS_COL) -> pd.DataFrame:
    """Mean NIAH exact-match accuracy per variant (arch, and a hybrid's ratio), length and needle depth (long frame).

    size="largest" keeps each variant's largest model, "all" averages every size, a number keeps that size.
    ``in_context``: the length is within the runs' training context (seq_len); NaN where seq_len is unknown.
    """
    ev = _last_evals(evals, runs)
    ev = ev[ev["name"].astype(str).str.startswith("niah/")]
    cols = ["arch", "variant", "length", "depth", "accuracy", "n_runs", "params", "in_context"]
    if ev.empty:
        return pd.DataFrame(columns=cols)
    names = ev["name"].astype(str)
    # Each name parsed once: thousands of runs share the same few NIAH cells.
    parsed = pd.DataFrame([parse_eval_name(n) for n in names.unique()], index=names.unique())
    if "len" not in parsed or "depth" not in parsed:
        raise FitError("NIAH eval names must look like 'niah/len=1024/depth=0.5'")
    ev = ev.assign(length=parsed["len"].astype(float).reindex(names).to_numpy(),
                   depth=parsed["depth"].astype(float).reindex(names).to_numpy())
    ev = ev.dropna(subset=["length", "depth"])
    hybrid = ev["hybrid"] if "hybrid" in ev.columns else pd.Series("", index=ev.index)
    # Hybrids of different ratios answer different questions (how much softmax retrieval needs): never pooled.
    # Named once per (arch, pattern), not once per eval value: a paper-scale study has tens of thousands.
    pairs = pd.DataFrame({"arch": ev["arch"].to_numpy(), "hybrid": hybrid.to_numpy()})
    group = pairs.groupby(["arch", "hybrid"], sort=False, dropna=False).ngroup().to_numpy()
    first = pairs.iloc[np.unique(group, return_index=True)[1]]
    variants = [variant_of(a, h) for a, h in zip(first["arch"], first["hybrid"])]
    ev = ev.assign(variant=[variants[g] for g in group])
    seq_len = ev["seq_len"].astype(float) if "seq_len" in ev.columns else pd.Series(np.nan, index=ev.index)
    # 1 inside, 0 beyond, and 2 where a run's seq_len is unknown, so that the max over a cell's runs is unknown
    # whenever one of them is
    ev = ev.assign(inside=np.where(seq_len.notna(), (ev["length"] <= seq_len).astype(float), 2.0))
    if size == "largest":
        top = ev.groupby("variant")[params_col].transform("max")
        ev = ev[ev[params_col] == top]
    elif size != "all":
        ev = ev[np.isclose(ev[params_col].astype(float), float(size), rtol=1e-6)]
    out = ev.groupby(["arch", "variant", "length", "depth"], as_index=False).agg(
        accuracy=("value", "mean"), n_runs=("run_id", "nunique"), params=(params_col, "max"),
        inside=("inside", "max"), outside=("inside", "min"),
    )
    out["length"] = out["length"].astype(int)
    # in context only if it is for every run pooled in the cell; unknown if any run's seq_len is
    out["in_context"] = [np.nan if hi > 1 else bool(lo == 1) for hi, lo in zip(out["inside"], out["outside"])]
    out["in_context"] = out["in_context"].astype(object)
    return out[cols]


def hybrid_ratio(pattern: str | float | None, arch: str = "") -> float:
    """Linear layers per softmax layer of a hybrid pattern ('LLLLLLLS' -> 7); softmax -> 0, lightning
    or a pattern with no 'S' -> inf, other non-hybrids -> NaN."""
    p = "" if pattern is None or (isinstance(pattern, float) and math.isnan(pattern)) else str(pattern)
    if not p:
        return {"softmax": 0.0, "lightning": math.inf}.get(str(arch), math.nan)
    n_soft = p.upper().count("S")
    return math.inf if n_soft == 0 else (len(p) - n_soft) / n_soft


def ratio_label(r: float) -> str:
    """'softmax' for 0, 'linear only' for inf, '7:1' for 7 linear layers per softmax layer."""
    if r == 0:
        return "softmax"
    if math.isinf(r):
        return "linear only"
    return f"{r:g}:1"


def mqar_table(runs: pd.DataFrame, evals: pd.DataFrame, *, params_col: str = DEFAULT_PARAMS_COL) -> pd.DataFrame:
    """MQAR accuracy per arch, hybrid ratio, model size and eval name: mean over runs (seeds, lrs) and max."""
    ev = _last_evals(evals, runs)
    ev = ev[ev["name"].astype(str).str.startswith("mqar")]
    cols = ["arch", "hybrid", "ratio", "ratio_label", "d_model", "params", "name", "accuracy", "best", "n_runs"]
    if ev.empty:
        return pd.DataFrame(columns=cols)
    if "hybrid" not in ev.columns:
        ev = ev.assign(hybrid="")
    ev = ev.assign(hybrid=ev["hybrid"].fillna("").astype(str))
    if "d_model" not in ev.columns:
        ev = ev.assign(d_model=np.nan)
    out = ev.groupby(["arch", "hybrid", "d_model", params_col, "name"], as_index=False, dropna=False).agg(
        accuracy=("value", "mean"), best=("value", "max"), n_runs=("run_id", "nunique")
    )
    out = out.rename(columns={params_col: "params"})
    out["ratio"] = [hybrid_ratio(p, a) for p, a in zip(out["hybrid"], out["arch"])]
    out["ratio_label"] = out["ratio"].map(ratio_label)
    return out[cols].sort_values(["ratio", "params"]).reset_index(drop=True)


def load_throughput(path: str | Path) -> pd.DataFrame:
    """Read a throughput CSV (arch, seq_len, tokens_per_s, as `slab bench train --out` writes) for the report; a value
    that is not a positive number, a length that is not whole or a row without an arch raises FitError with its lines."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise FitError(f"{path}: cannot read the throughput CSV: {exc}") from exc
    missing = [c for c in ("arch", "seq_len", "tokens_per_s") if c not in frame.columns]
    if missing:
        raise FitError(f"{path}: missing column(s) {', '.join(missing)}")
    lines = np.arange(2, len(frame) + 2)  # file line numbers, header being line 1
    number = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(float) for c in ("seq_len", "tokens_per_s")}
    bad = positive_column_errors(lines, number)
    fractional = np.isfinite(number["seq_len"]) & (number["seq_len"] != np.round(number["seq_len"]))
    if fractional.any():
        bad.append(f"column 'seq_len' must be a whole number of tokens; bad on line(s) {_some(lines[fractional])}")
    no_arch = frame["arch"].isna().to_numpy() | (frame["arch"].astype(str).str.strip() == "").to_numpy()
    if no_arch.any():
        bad.append(f"column 'arch' is empty on line(s) {_some(lines[no_arch])}")
    if bad:
        raise FitError(f"{path}: " + "; ".join(bad))
    return frame.assign(arch=frame["arch"].astype(str).str.strip(), seq_len=number["seq_len"].astype(int),
                        tokens_per_s=number["tokens_per_s"])


#: Columns giving the shape of the model a throughput row measured (the same for every arch at one size, where its
#: parameter count is not: a 134M softmax and lightning differ by 9k parameters, mamba2 by more).
THROUGHPUT_SHAPE = ("d_model", "n_layers", "n_heads", "vocab")
#: Columns saying how it was run: a compiled and an eager measurement, or an H100's and an H200's, are not repeats.
THROUGHPUT_SETUP = ("compile", "fused", "kernels", "device")
#: Without shape columns, parameter counts within this factor of a size's smallest are one size (the archs' counts
#: at one shape differ by well under 1%; two sizes of a study by 2x or more).
SAME_SIZE = 1.05


def _si(n: float) -> str:
    """A parameter count as 134M, 1.3B or 500k."""
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if n >= 0.9995 * scale:  # 999.7M reads 1B, not 1e+03M
            return f"{n / scale:.3g}{unit}"
    return f"{n / 1e3:.3g}k"


def size_label(params) -> str:
    """Parameter counts of one model size as a label: 134M, or 134M-140M where they spread past SAME_SIZE."""
    lo, hi = float(np.min(params)), float(np.max(params))
    return _si(lo) if hi < SAME_SIZE * lo else f"{_si(lo)}-{_si(hi)}"


def throughput_configs(throughput: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Each row's measured configuration, as an index into the returned labels (smallest model first): its model shape
    (else its parameter count, within 5%) and its compile, fused, kernels and device settings, where the frame has them."""
    n = len(throughput)
    shape = [c for c in THROUGHPUT_SHAPE if c in throughput.columns]
    setup = [c for c in THROUGHPUT_SETUP if c in throughput.columns]
    params = (pd.to_numeric(throughput["params"], errors="coerce").to_numpy(float) if "params" in throughput.columns
              else np.full(n, np.nan))
    size = np.full(n, -1)  # the parameter-count class; -1 where the count is unknown
    start, k = math.nan, -1
    for v in np.unique(params[np.isfinite(params)]):  # ascending
        if not v <= SAME_SIZE * start:
            start, k = v, k + 1
        size[params == v] = k
    keys = pd.DataFrame(index=range(n))
    for c in shape:  # numbers, so that d_model 1024 sorts after 768; unknown last
        keys[c] = pd.to_numeric(throughput[c], errors="coerce").fillna(np.inf).to_numpy(float)
    # the shape decides the size where it is known; a row without one (a blank d_model) falls back on its count
    keys["_size"] = np.where(np.isinf(keys[shape]).all(axis=1), size, -1) if shape else size
    for c in setup:
        keys[c] = throughput[c].astype(str).str.strip().to_numpy()
    cols = list(keys.columns)
    # smallest first: a configuration sorts by its smallest parameter count (unknown last), then by its columns
    keys["_p"] = pd.Series(params).groupby([keys[c] for c in cols]).transform("min").fillna(np.inf).to_numpy()
    uniq = keys.drop_duplicates().sort_values(["_p", *cols]).reset_index(drop=True)
    codes = keys.merge(uniq.reset_index(names="_code"), on=[*cols, "_p"], how="left")["_code"].to_numpy(int)
    labels: list[list[str]] = []
    for i in range(len(uniq)):
        p = params[(codes == i) & np.isfinite(params)]
        if len(p):
            labels.append([size_label(p)])
        else:
            labels.append(["size unknown"] if "params" in throughput.columns else [])
    # the shape is named where the parameter counts do not tell the configurations apart, the settings where they vary
    names = {"d_model": "d_model {}", "n_layers": "{} layers", "n_heads": "{} heads", "vocab": "vocab {}"}
    for c in [*shape, *setup]:
        if uniq[c].nunique() < 2 or (c in shape and len({", ".join(x) for x in labels}) == len(labels)):
            continue
        for label, v in zip(labels, uniq[c]):
            shown = ("?" if not np.isfinite(v) else f"{v:g}") if c in shape else v
            label.append(names.get(c, "{}" if c == "device" else c + " {}").format(shown))
    shown = [", ".join(x) or "one size" for x in labels]
    if len(set(shown)) < len(shown):  # never expected (each varying column is named); labels must stay distinct
        shown = [f"{x} [{i + 1}]" for i, x in enumerate(shown)]
    return codes, shown


def throughput_table(throughput: pd.DataFrame, *, baseline: str = "softmax") -> pd.DataFrame:
    """Mean tokens/s per arch, configuration and sequence length, relative to the baseline's at the same configuration
    and length; only repeats of one configuration are averaged (``n`` of them, where any is above 1), and a ``size``
    column (ordered, smallest first) names the configuration where the frame holds several."""
    missing = [c for c in ("arch", "seq_len", "tokens_per_s") if c not in throughput.columns]
    if missing:
        raise FitError(f"throughput frame is missing column(s) {', '.join(map(repr, missing))}")
    codes, labels = throughput_configs(throughput)
    aggs = {"tokens_per_s": ("tokens_per_s", "mean")}
    if "mfu" in throughput.columns:
        aggs["mfu"] = ("mfu", "mean")
    aggs["n"] = ("tokens_per_s", "size")
    # rows of different sizes (or settings) at one arch and length are different models, never averaged together:
    # a 1.3B model's tokens/s averaged with a 134M one's can fake a fall with length or hide one
    out = throughput.assign(_config=codes).groupby(["arch", "_config", "seq_len"], as_index=False).agg(**aggs)
    base = out[out["arch"] == baseline].set_index(["_config", "seq_len"])["tokens_per_s"]
    at = pd.MultiIndex.from_frame(out[["_config", "seq_len"]])
    out["vs_baseline"] = out["tokens_per_s"].to_numpy() / base.reindex(at).to_numpy()
    out = out.sort_values(["arch", "_config", "seq_len"]).reset_index(drop=True)
    if len(labels) > 1:
        log.info("throughput measured at %d configurations (%s): tabulated apart", len(labels), "; ".join(labels))
        out.insert(1, "size", pd.Categorical.from_codes(out["_config"], categories=labels, ordered=True))
    if out["n"].max() > 1:
        log.info("throughput: %d arch/size/length cells average repeated measurements", int((out["n"] > 1).sum()))
    else:  # every cell one measurement: the column would say nothing (and a one-size table stays as it was)
        out = out.drop(columns="n")
    return out.drop(columns="_config")


def throughput_sizes(throughput: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """A `throughput_table`'s rows per configuration, smallest first, each with its size label (None for a table of
    one configuration); a raw throughput frame is tabulated first."""
    t = throughput if "vs_baseline" in throughput.columns or throughput.empty else throughput_table(throughput)
    if "size" not in t.columns:
        return [(None, t)]
    return [(str(size), sub) for size, sub in t.groupby("size", observed=True, sort=True)]


#: An approach-3 fit whose N_opt exponent a = beta / (alpha + beta) falls outside this range puts nearly all of
#: extra compute into size or into data (Chinchilla's a is about 0.5, Kaplan's 0.73): a sign that the runs do not
#: pin the split down, not a finding.
PLAUSIBLE_ALLOCATION = (0.05, 0.95)


def _allocation_caveat(a: float, tokens_per_param: float) -> str:
    """A warning appended to an approach-3 finding whose compute split is degenerate; empty otherwise."""
    lo, hi = PLAUSIBLE_ALLOCATION
    if np.isfinite(a) and lo < a < hi and np.isfinite(tokens_per_param) and tokens_per_param > 0:
        return ""
    return (" Degenerate: these runs do not pin down how compute splits between size and data; "
            "vary both at fixed compute (an IsoFLOP plan) before reading this split.")


def _niah_findings(niah: pd.DataFrame) -> list[str]:
    """NIAH lines: within the training context and beyond it, apart, since softmax with RoPE fails beyond it by
    construction and a mean over both would mix retrieval with length extrapolation."""
    inside = niah["in_context"]
    if inside.notna().all() and inside.eq(True).any():
        groups = [("within the training context", niah[inside.eq(True)]),
                  ("beyond the training context", niah[inside.eq(False)])]
    else:
        groups = [("over lengths and depths", niah)]
    lines = []
    for where, sub in groups:
        if sub.empty:
            continue
        mean = sub.groupby("variant")["accuracy"].mean().sort_values(ascending=False, kind="mergesort")
        n_runs = sub.groupby("variant")["n_runs"].max()
        # several runs of the largest size (budgets, seeds, learning rates) are averaged
        parts = ", ".join(f"{v} {100 * a:.0f}%" + (f" ({int(n_runs[v])} runs averaged)" if n_runs[v] > 1 else "")
                          for v, a in mean.items())
        lines.append(f"Mean NIAH accuracy {where} (largest model of each): {parts}.")
    return lines


def loss_table(runs: pd.DataFrame, *, params_col: str = DEFAULT_PARAMS_COL) -> pd.DataFrame:
    """Final validation loss (training loss where none) per variant and size: mean and best over runs (seeds, lrs).

    For ablations at one size, such as hybrid ratios, where no loss-compute law can be fitted."""
    cols = ["variant", "params", "tokens", "loss", "best", "n_runs"]
    missing = [c for c in ("arch", params_col, "tokens") if c not in runs.columns]
    if missing or not any(c in runs.columns for c in LOSS_COLUMNS):
        raise FitError(f"runs frame is missing column(s) {', '.join(map(repr, missing or ['val_loss']))}")
    r = done_runs(runs)
    if r.empty:
        return pd.DataFrame(columns=cols)
    loss = pd.Series(np.nan, index=r.index)
    for c in LOSS_COLUMNS:  # as the fits take it: val_loss, else final_loss, else loss
        if c in r.columns:
            loss = loss.fillna(pd.to_numeric(r[c], errors="coerce"))
    hybrid = r["hybrid"] if "hybrid" in r.columns else pd.Series("", index=r.index)
    run_id = r["run_id"] if "run_id" in r.columns else pd.Series(r.index.astype(str), index=r.index)
    t = pd.DataFrame({"variant": [variant_of(a, h) for a, h in zip(r["arch"], hybrid)], "params": r[params_col],
                      "tokens": r["tokens"], "loss": loss, "run_id": run_id})
    out = t.groupby(["variant", "params", "tokens"], as_index=False, dropna=False).agg(
        loss=("loss", "mean"), best=("loss", "min"), n_runs=("run_id", "nunique"))
    return out.sort_values(["params", "tokens", "loss"]).reset_index(drop=True)[cols]


#: Below this many runs of an arch a bootstrap that resamples runs has little to draw from: its intervals are unknown
#: (with 3 runs the best loss of a resample can only rise, so an interval sits on one side of the estimate).
MIN_BOOTSTRAP_RUNS = 5


def unknown_on_few_runs(fit: FitResult, n_runs: int | None = None) -> FitResult:
    """``fit``, or where it rests on fewer than MIN_BOOTSTRAP_RUNS runs (``n_runs``, or its details' count) a copy whose
    intervals are unknown (NaN) and say why in details["intervals_unknown"], as the report gives them."""
    counts = [int(n) for n in (n_runs, fit.details.get("n_runs")) if n is not None]
    skipped = bool(fit.details.get("bootstrap_skipped"))  # `fit_on_runs` ran none: its intervals are unknown all the same
    # no bootstrap asked for: no interval to withhold; already unknown (most replicates failed): that reason stands
    if (not (fit.intervals or skipped) or "intervals_unknown" in fit.details or not counts
            or min(counts) >= MIN_BOOTSTRAP_RUNS):
        return fit
    note = (f"the fit rests on {_n_runs(min(counts))}, too few to resample (at least {MIN_BOOTSTRAP_RUNS} are "
            "needed): its intervals are unknown")
    return replace(fit, intervals={k: (math.nan, math.nan) for k in fit.intervals or fit.estimates},
                   details={**fit.details, "intervals_unknown": note})


def fit_on_runs(fit: Callable[[int], FitResult], n_bootstrap: int, n_runs: int) -> FitResult:
    """``fit(n_bootstrap)``, or where ``n_runs`` are too few to resample ``fit(0)`` with the intervals unknown (as
    `unknown_on_few_runs` would leave them) and details["bootstrap_skipped"] the replicates asked for and not run."""
    if not n_bootstrap or n_runs >= MIN_BOOTSTRAP_RUNS:
        return fit(n_bootstrap)
    # the replicates' intervals would be discarded: a bootstrap of 3 runs had run for a minute for nothing
    result = fit(0)
    result.details["bootstrap_skipped"] = int(n_bootstrap)
    return unknown_on_few_runs(result, n_runs)


def few_runs(comparison: ArchComparison) -> dict[str, int]:
    """The archs whose frontier fit rests on fewer than MIN_BOOTSTRAP_RUNS runs, with their run counts."""
    counts = {a: f.details.get("n_runs") for a, f in comparison.fits.items()}
    return {a: int(n) for a, n in sorted(counts.items()) if n is not None and n < MIN_BOOTSTRAP_RUNS}


def _few_runs_line(few: dict[str, int]) -> str:
    """The report's caveat on intervals that rest on too few runs."""
    names = list(few)
    who = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    counts = set(few.values())
    rest = (_n_runs(counts.pop()) + ("" if len(names) == 1 else " each") if len(counts) == 1
            else ", ".join(f"{_n_runs(n)} of {a}" for a, n in few.items()))
    return (f"The intervals of {who} rest on {rest}, too few to resample (at least {MIN_BOOTSTRAP_RUNS} are "
            "needed): read them as unknown.")


def _n_runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


#: What "matches", "fails" and "flat" mean below (plain thresholds, stated in the report's lines).
SEED_LOSS_MATCH = 0.02  # without a bootstrap interval: lightning's loss at most 2% above softmax's
SEED_NIAH_PASS = 0.5  # softmax must retrieve at least this often in context for a retrieval gap to show
SEED_NIAH_GAP = 0.2  # "fails where softmax passes": at least 20 points below softmax
SEED_NIAH_MATCH = 0.1  # "matches or beats softmax": at most 10 points below it
SEED_FLAT = 0.8  # "flat": tokens/s at the longest length at least 80% of the shortest's
SEED_FALLS = 0.7  # "falls": at most 70%
#: Fractions this close count as equal when judged against a threshold: 0.3 - 0.2 is 0.09999999999999998, and an
#: exact 20-point gap must not miss "at least 20 points" by floating-point noise.
_TIE = 1e-9


def seed_study_findings(
    comparison: ArchComparison | None = None,
    *,
    niah: pd.DataFrame | None = None,
    throughput: pd.DataFrame | None = None,
) -> list[str]:
    """Which of MiniMax-01's findings these runs reproduce, each line saying 'Reproduced', 'Not reproduced' or
    'Not tested' and the numbers it rests on (the seed study: REFERENCES sections 5 and 5b)."""
    lines = []
    # 1. Lightning matched softmax on language-modelling loss.
    claim = "lightning matches softmax on loss"
    g = comparison.gaps if comparison is not None else pd.DataFrame()
    sub = g[g["arch"] == "lightning"] if not g.empty and comparison.baseline == "softmax" else pd.DataFrame()
    if sub.empty:
        lines.append(f"Not tested: {claim} (no loss comparison of lightning against softmax).")
    else:
        row = sub.loc[sub["C"].idxmax()]
        rel, lo, hi = row["rel_gap"], row["rel_gap_lo"], row["rel_gap_hi"]
        few = {a: n for a, n in few_runs(comparison).items() if a in ("lightning", "softmax")}
        # printed with the digits that show which side of its threshold each number judged lies (an interval from
        # +0.04% reads '+0.0%', as if it held no difference)
        [shown_lo] = _pcts([lo], lambda v: v > 0, 1, "+") if np.isfinite(lo) else ["-"]
        [shown_rel] = _pcts([rel], lambda v: v > SEED_LOSS_MATCH + _TIE, 1, "+") if not np.isfinite(lo) else [
            f"{100 * rel:+.1f}%"]
        # an interval from a handful of runs is unknown (summary_findings says so), so it is not quoted
        ci = f" (95% CI {shown_lo} to {100 * hi:+.1f}%)" if np.isfinite(lo) and not few else ""
        at = (f"lightning's loss is {shown_rel} from softmax's at C={row['C']:.2g} FLOPs{ci}, needing "
              f"{row['multiplier']:.3g}x its compute")
        if few:
            # an interval from a handful of runs says nothing, and a point estimate from them no more
            lines.append(f"Not tested: {claim}: {at}, but the comparison rests on "
                         f"{' and '.join(f'{_n_runs(n)} of {a}' for a, n in few.items())}, too few to tell a "
                         f"difference from noise (at least {MIN_BOOTSTRAP_RUNS} of each are needed).")
        else:
            # MiniMax-01's lightning law lay at or below softmax's; only a loss measurably above it contradicts that
            worse = lo > 0 if np.isfinite(lo) else rel > SEED_LOSS_MATCH + _TIE
            lines.append(f"{'Not reproduced' if worse else 'Reproduced'}: {claim}: {at}; matching means not "
                         f"measurably above softmax (an interval that holds no difference, or lies below; without an "
                         f"interval, within {100 * SEED_LOSS_MATCH:.0f}%).")
    # 2. Lightning fails needle-in-a-haystack where softmax passes; 3. the hybrid fixes it.
    claim2, claim3 = "lightning fails needle-in-a-haystack where softmax passes", "a hybrid matches or beats softmax on it"
    inside = None
    if niah is not None and not niah.empty and niah["in_context"].eq(True).any():
        inside = niah[niah["in_context"].eq(True)].groupby("variant")["accuracy"].mean()
    if inside is None or "softmax" not in inside:
        lines.append(f"Not tested: {claim2}, and that {claim3} (no NIAH results of softmax within its context).")
        return lines + _seed_speed(throughput)
    soft = inside["softmax"]
    if soft < SEED_NIAH_PASS:
        [shown] = _pcts([soft], lambda s: s < SEED_NIAH_PASS - _TIE)
        lines.append(f"Not tested: {claim2}, and that {claim3}: softmax itself retrieves {shown} within its "
                     f"context, below {_pct(SEED_NIAH_PASS)}, too weak a baseline to show either (train longer, or "
                     "with more passkey documents).")
        return lines + _seed_speed(throughput)
    if "lightning" in inside:
        lin = inside["lightning"]
        fails = lin <= soft - SEED_NIAH_GAP + _TIE
        shown_lin, shown_soft = _pcts([lin, soft], lambda a, b: a <= b - SEED_NIAH_GAP + _TIE)
        lines.append(f"{'Reproduced' if fails else 'Not reproduced'}: {claim2}: within the training context "
                     f"lightning retrieves {shown_lin}, softmax {shown_soft} (failing means at least "
                     f"{100 * SEED_NIAH_GAP:.0f} points below softmax).")
    else:
        lines.append(f"Not tested: {claim2} (no NIAH results of lightning).")
    # by ratio, most softmax first ('hybrid 3:1' before 'hybrid 31:1')
    hybrids = sorted((v for v in inside.index if v.startswith("hybrid")),
                     key=lambda v: float(v.split()[1].split(":")[0]) if v.count(":") == 1 else math.inf)
    for v in hybrids:
        ok = inside[v] >= soft - SEED_NIAH_MATCH - _TIE
        shown_v, shown_soft = _pcts([inside[v], soft], lambda a, b: a >= b - SEED_NIAH_MATCH - _TIE)
        lines.append(f"{'Reproduced' if ok else 'Not reproduced'}: {claim3}: {v} retrieves {shown_v} within "
                     f"the training context, softmax {shown_soft} (matching means at most "
                     f"{100 * SEED_NIAH_MATCH:.0f} points below; MiniMax-01's hybrid is 7:1).")
    if not hybrids:
        lines.append(f"Not tested: {claim3} (no NIAH results of a hybrid).")
    return lines + _seed_speed(throughput)


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _pcts(values: list[float], judge, digits: int = 0, sign: str = "") -> list[str]:
    """``values`` (fractions) as percentages with the fewest digits (from ``digits``) at which ``judge``, applied to the
    printed numbers, gives the verdict it gives the values themselves: 80.4% against a 20-point threshold from 100%
    is '80.4%', not an '80%' that reads as meeting it."""
    truth = bool(judge(*values))
    for d in range(digits, digits + 4):
        shown = [f"{100 * v:{sign}.{d}f}" for v in values]
        if bool(judge(*(float(x) / 100 for x in shown))) == truth:
            break
    return [x + "%" for x in shown]


def _seed_speed(throughput: pd.DataFrame | None) -> list[str]:
    """The seed study's speed finding: lightning's tokens/s flat with sequence length, softmax's falling; judged at
    each model size (configuration) apart where the table holds several, one line each."""
    claim = "lightning's training speed stays flat with sequence length while softmax's falls"
    t = throughput if throughput is not None else pd.DataFrame(columns=["arch", "seq_len", "tokens_per_s"])
    groups = throughput_sizes(t)
    if len(groups) == 1:
        return [_seed_speed_at(groups[0][1], claim, "")]
    # a size only other archs were measured at says nothing of this claim; one that lacks lightning or softmax, or
    # the lengths both share, is said to be untested rather than borrowed from another size
    return [_seed_speed_at(sub, claim, f", for the {size} models") for size, sub in groups
            if sub["arch"].isin(["lightning", "softmax"]).any()] or [
        f"Not tested: {claim} (no throughput of lightning or softmax)."]


def _seed_speed_at(t: pd.DataFrame, claim: str, at: str) -> str:
    """`_seed_speed`'s line for one configuration's rows (``at`` names it; empty for a table of one)."""
    same = " at this size" if at else ""
    both = set(t.loc[t["arch"] == "lightning", "seq_len"]) & set(t.loc[t["arch"] == "softmax", "seq_len"])
    if len(both) < 2:  # lengths both were measured at (softmax may have run out of memory at the longest)
        return f"Not tested: {claim}{at} (no throughput of both at two common lengths{same})."
    short, long = min(both), max(both)
    kept = {}
    for arch in ("lightning", "softmax"):
        s = t[t["arch"] == arch].set_index("seq_len")["tokens_per_s"]
        kept[arch] = s.get(long, np.nan) / s.get(short, np.nan)
    lin, soft = kept["lightning"], kept["softmax"]
    if not (np.isfinite(lin) and np.isfinite(soft)):
        return f"Not tested: {claim}{at} (no throughput of both at {int(short)} and {int(long)})."
    ok = lin >= SEED_FLAT - _TIE and soft <= SEED_FALLS + _TIE
    [shown_lin] = _pcts([lin], lambda a: a >= SEED_FLAT - _TIE)
    [shown_soft] = _pcts([soft], lambda a: a <= SEED_FALLS + _TIE)
    return (f"{'Reproduced' if ok else 'Not reproduced'}: {claim}{at}: from {int(short)} to {int(long)} tokens, "
            f"lightning keeps {shown_lin} of its tokens/s and softmax {shown_soft} (flat means at least "
            f"{100 * SEED_FLAT:.0f}%, falling at most {100 * SEED_FALLS:.0f}%).")


#: Runs of the same size and tokens count FLOPs differently per arch (attention and state terms: up to 13% apart in
#: the smoke study), so computes within this factor are taken as matched when best validation losses are compared.
MATCHED_COMPUTE = 1.25


def _held_out_caveat(runs: pd.DataFrame | None, arch: str, baseline: str, rel_gap_pct: float) -> str:
    """A warning for a frontier gap whose sign the best validation losses of the two archs, over the compute both
    reach, contradict; else empty. The laws are fitted to training loss, which data read several times over pushes
    below held-out loss."""
    if runs is None or not {"arch", "val_loss"} <= set(runs.columns):
        return ""
    loss = pd.to_numeric(runs["val_loss"], errors="coerce")
    names = runs["arch"].astype(str)
    within = ""
    if "flops" in runs.columns:
        # an arch trained to more compute has a lower best loss for that alone: compare up to the compute both reach
        C = pd.to_numeric(runs["flops"], errors="coerce")
        top = C.groupby(names).max()
        cap = min(top.get(arch, math.nan), top.get(baseline, math.nan))
        if np.isfinite(cap):
            loss = loss.where(C <= MATCHED_COMPUTE * cap)
            within = f", runs up to {cap:.2g} FLOPs, the compute both reach"
    best = loss.groupby(names).min()
    v, b = best.get(arch, math.nan), best.get(baseline, math.nan)
    if not (np.isfinite(v) and np.isfinite(b) and b > 0) or (v - b) * rel_gap_pct > 0 or v == b:
        return ""
    return (f" Held-out loss disagrees: {arch}'s best validation loss is {100 * (v / b - 1):+.1f}% from "
            f"{baseline}'s ({v:.4g} against {b:.4g} nats{within}); the laws fit training loss, which repeated data can "
            "push below held-out loss, so read this gap with care.")


def _pooled_hybrids(runs: pd.DataFrame | None, fitted: set[str]) -> str:
    """A caveat when a fitted arch's runs hold several hybrid layer ratios, which its laws and gaps pool; else empty."""
    if runs is None or not {"arch", "hybrid"} <= set(runs.columns):
        return ""
    pooled = []
    for arch, sub in runs.groupby(runs["arch"].astype(str), sort=True):
        if arch not in fitted:  # no law of it: its losses are tabulated by variant
            continue
        ratios = sorted({r for r in (hybrid_ratio(p, arch) for p in sub["hybrid"]) if not math.isnan(r)})
        if len(ratios) > 1:
            pooled.append(f"{arch}'s runs hold {len(ratios)} layer ratios ({', '.join(map(ratio_label, ratios))})")
    if not pooled:
        return ""
    return ("; ".join(pooled) + ": its loss laws and gaps pool them (the retrieval results keep them apart); fit one "
            "ratio's runs to compare a ratio.")


def summary_findings(
    comparison: ArchComparison | None = None,
    *,
    approach3: dict[str, FitResult] | None = None,
    niah: pd.DataFrame | None = None,
    throughput: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
    throughput_baseline: str | None = None,
    frontier: dict[str, FitResult] | None = None,
) -> list[str]:
    """Plain-language lines on what the fits and tables show (used in the report); with the runs, a gap the
    training-loss laws state is checked against the best held-out (validation) loss of each arch. Speeds are named
    relative to ``throughput_baseline`` (else the arch the throughput table is relative to). ``frontier``: the
    loss-compute fits whose estimates at a bound are noted (else the comparison's)."""
    lines: list[str] = []
    mixtures = sorted(runs["data"].dropna().astype(str).unique()) if runs is not None and "data" in runs else []
    if len(mixtures) > 1:
        # each mixture has its own loss level: a law or a gap across them measures the data as much as the arch
        lines.append(f"These runs train on {len(mixtures)} data mixtures ({', '.join(mixtures)}), whose losses do not "
                     "compare: the laws and gaps below mix them; fit and compare the runs of one mixture.")
    fitted = set(comparison.fits if comparison is not None else ()) | set(approach3 or ())
    pooled = _pooled_hybrids(runs, fitted)
    if pooled:
        lines.append(pooled)
    if comparison is not None and any(f.details.get("edges") == "keep" for f in comparison.fits.values()):
        lines.append("At most budgets the best run is the smallest model trained there, so each arch's loss-compute "
                     "law follows these runs' envelope, an upper bound of its compute-optimal frontier (train "
                     "smaller models to pin the frontier down); the comparison below compares envelopes.")
    few = few_runs(comparison) if comparison is not None else {}
    if few:
        lines.append(_few_runs_line(few))
    if comparison is not None and not comparison.gaps.empty:
        g = comparison.gaps
        for arch, sub in g.groupby("arch", sort=True):
            row = sub.loc[sub["C"].idxmax()]  # the largest compared budget
            rel = 100 * row["rel_gap"]
            lo, hi = 100 * row["rel_gap_lo"], 100 * row["rel_gap_hi"]
            ci = f" (95% CI {lo:+.2f}% to {hi:+.2f}%)" if np.isfinite(lo) else ""
            if np.isfinite(lo) and not lo <= rel <= hi:
                # Resampled runs can only lift a frontier's best loss, so the replicates may all lean one way: said,
                # rather than print an estimate its own interval leaves out as if the two agreed.
                ci = ci[:-1] + ", which leaves out the estimate itself: the bootstrap leans one way here, so read the " \
                    "interval as rough)"
            m, base = row["multiplier"], comparison.baseline
            at = f"{base}'s at C={row['C']:.2g} FLOPs"
            if arch in few or base in few:
                # its interval is unknown (the line above says so): neither quoted nor read as a verdict
                n_x, n_b = (comparison.fits[a].details.get("n_runs", "?") for a in (arch, base))
                counts = f"{n_x} run{'' if n_x == 1 else 's'} of {arch} and {n_b} of {base}"
                need = f", needing {m:.3g}x the compute to reach {base}'s loss there" if np.isfinite(m) else ""
                word = "above" if rel > 0 else "below"
                lines.append(f"{arch}'s frontier loss is {abs(rel):.2f}% {word} {at}{need}; it rests on {counts}, too "
                             "few to tell it from noise." + _held_out_caveat(runs, arch, base, rel))
                continue
            if np.isfinite(lo) and lo <= 0 <= hi:  # the interval holds no difference: no direction to state
                lines.append(f"{arch}'s frontier loss cannot be told from {at}: {rel:+.2f}%{ci}.")
                continue
            if np.isfinite(m):
                m_lo, m_hi = row["multiplier_lo"], row["multiplier_hi"]
                m_ci = f" ({m_lo:.3g}-{m_hi:.3g}x)" if np.isfinite(m_lo) else ""
                mult = f"; it needs {m:.3g}x the compute to reach {base}'s loss there{m_ci}"
            else:
                mult = f"; its fitted law never reaches {base}'s loss there"
            word = "above" if rel > 0 else "below"
            lines.append(f"{arch}'s frontier loss is {abs(rel):.2f}% {word} {at}{ci}{mult}."
                         + _held_out_caveat(runs, arch, base, rel))
    if frontier is None:
        frontier = comparison.fits if comparison is not None else {}
    for arch, fit in sorted(frontier.items()):
        # as approach 3's below: an estimate pinned at a bound is no estimate, nor is a gap drawn from it
        if fit.details.get("at_bound"):
            lines.append(f"{arch}'s frontier law ({fit.formula}): {fit.details['at_bound']}.")
    for arch, fit in sorted((approach3 or {}).items()):
        e = fit.estimates
        keys = [k for k in e if k.startswith("tokens_per_param@")]
        if not keys:
            continue
        # the budget nearest the data's largest compute: beyond it the law is extrapolated
        top = float(fit.points["C"].max()) if "C" in fit.points else math.nan
        k = min(keys, key=lambda key: abs(math.log(float(key.split("@")[1]) / top)) if top > 0 else 0.0)
        C = float(k.split("@")[1])
        lo, hi = fit.interval(k)
        ci = f" (95% CI {lo:.3g}-{hi:.3g})" if np.isfinite(lo) else ""
        beyond = f", extrapolated beyond the data's largest compute ({top:.2g})" if C > 1.5 * top else ""
        lines.append(
            f"{arch}: approach 3 gives alpha={e['alpha']:.3f}, beta={e['beta']:.3f}, "
            f"so N_opt grows as C^{e['a']:.2f}; "
            f"compute-optimal tokens per parameter at C={k.split('@')[1]} FLOPs{beyond}: "
            # an overflowing B (beta 100) leaves it undefined: 'nan' (and before that 'inf') had been quoted as a value
            + (f"{e[k]:.3g}{ci}" if np.isfinite(e[k]) else f"undefined ({fit.details.get('not_finite', 'not a number')})")
            + ("" if fit.converged else " (optimiser did not confirm convergence)") + "."
            + _allocation_caveat(e["a"], e[k])
            # an estimate pinned at a bound is no estimate, and what derives from it neither: said beside the numbers
            + (f" Note: {fit.details['at_bound']}." if fit.details.get("at_bound") else "")
        )
    if niah is not None and not niah.empty:
        lines += _niah_findings(niah)
    if throughput is not None and not throughput.empty and "vs_baseline" in throughput.columns:
        base = throughput_baseline or _throughput_baseline(throughput) or "the baseline"
        for size, t in throughput_sizes(throughput):  # each size apart: ratios are within one size only
            # the longest length the baseline was measured at beside another arch: an arch measured alone at a longer
            # one (the baseline out of memory there) has nothing to be relative to
            known = t[t["vs_baseline"].notna()]
            shared = known.groupby("seq_len")["arch"].nunique()
            shared = shared[shared > 1]
            if not shared.empty:
                longest = shared.index.max()
                sub = known[known["seq_len"] == longest]
                parts = ", ".join(f"{a} {v:.2f}x" for a, v in zip(sub["arch"], sub["vs_baseline"]))
                at = f" of the {size} models" if size is not None else ""
                lines.append(f"Throughput{at} at sequence length {int(longest)} relative to {base}: {parts}.")
    return lines


def _throughput_baseline(throughput: pd.DataFrame) -> str | None:
    """The arch a `throughput_table` is relative to: the one whose every ratio is exactly 1 (itself over itself)."""
    ones = throughput.groupby("arch")["vs_baseline"].agg(lambda v: bool(v.notna().all() and (v == 1.0).all()))
    named = list(ones[ones].index)
    return str(named[0]) if len(named) == 1 else None

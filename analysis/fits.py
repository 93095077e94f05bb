"""Scaling-law fits with bootstrap intervals (REFERENCES.md §2).

Five fits, each returning a `FitResult`:
- `fit_loss_compute`: loss against compute on the compute-efficient frontier, L = E + A C^-alpha
  (form="saturating") or L = A C^-alpha (form="power", MiniMax-01 §2.2 style);
- `fit_approach1`: Chinchilla approach 1, the minimum-loss envelope of the training curves;
- `fit_approach2`: Chinchilla approach 2, IsoFLOP parabolas;
- `fit_approach3`: Chinchilla approach 3, L(N, D) = E + A / N^alpha + B / D^beta with the Huber /
  log-sum-exp objective of Hoffmann et al. 2022 and Besiroglu et al. 2024.

Intervals come from resampling runs with replacement (Besiroglu et al. 2024) and are 95% percentile
intervals. Inputs are pandas frames with the runs contract of `db.queries` or the frame `load_csv` makes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, minimize

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)

DEFAULT_PARAMS_COL = "nonembed_params"
#: Bootstrap resamples slab fit, compare and report take unless told: one count, so that the three print the same
#: intervals for the same runs (a report fits every arch by several approaches, so more would slow it).
CLI_BOOTSTRAP = 200
LOSS_COLUMNS = ("val_loss", "final_loss", "loss")
HUBER_DELTA = 1e-3
# The initialisation grid of Hoffmann et al. 2022 (REFERENCES.md §2), in the original parameterisation.
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_AB = np.arange(0.0, 25.1, 5.0)
TIE_REL_TOL = 1e-3  # final points whose compute agrees this closely are one budget (rounded token counts)
SCREEN_POINTS = 64  # runs used to screen the grid starts (enough to tell the basins apart)


class FitError(ValueError):
    """Input a fit cannot use; the message says what is wrong and where."""


class FrontierNotIdentified(FitError):
    """Too few frontier points once the edge points are dropped, though the runs' envelope has enough: the best
    run at most budgets is the smallest size there, so the compute-optimal frontier may lie below it."""


EDGES = ("drop", "keep")


@dataclass
class FitResult:
    """One fitted law: point estimates, 95% bootstrap intervals, the data used and diagnostics."""

    method: str
    formula: str
    estimates: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    residuals: np.ndarray
    points: pd.DataFrame
    n_points: int
    n_bootstrap: int
    converged: bool
    details: dict[str, Any] = field(default_factory=dict)
    # Bootstrap replicates (one row each, columns as `estimates`); kept out of `to_dict` for size.
    samples: pd.DataFrame | None = field(default=None, repr=False)

    def interval(self, name: str) -> tuple[float, float]:
        """The 95% interval of one estimate, (nan, nan) when there was no bootstrap."""
        return self.intervals.get(name, (math.nan, math.nan))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN and infinities become None)."""
        return {
            "method": self.method,
            "formula": self.formula,
            "estimates": {k: _json_num(v) for k, v in self.estimates.items()},
            "intervals": {k: [_json_num(lo), _json_num(hi)] for k, (lo, hi) in self.intervals.items()},
            "residuals": [_json_num(v) for v in np.asarray(self.residuals, dtype=float)],
            "points": _frame_records(self.points),
            "n_points": int(self.n_points),
            "n_bootstrap": int(self.n_bootstrap),
            "converged": bool(self.converged),
            "details": _json_clean(self.details),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FitResult":
        """Rebuild a result from `to_dict` output (without bootstrap samples)."""
        nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(
            method=d["method"],
            formula=d["formula"],
            estimates={k: nan(v) for k, v in d["estimates"].items()},
            intervals={k: (nan(v[0]), nan(v[1])) for k, v in d["intervals"].items()},
            residuals=np.array([nan(v) for v in d["residuals"]]),
            points=pd.DataFrame.from_records(d["points"]),
            n_points=int(d["n_points"]),
            n_bootstrap=int(d["n_bootstrap"]),
            converged=bool(d["converged"]),
            details=dict(d.get("details", {})),
        )


# --------------------------------------------------------------------------------------------
# Laws (vectorised; parameters broadcast against the inputs)


def loss_compute_law(C, E, A, alpha):
    """L(C) = E + A C^-alpha (E = 0 gives the pure power law)."""
    return E + A * np.power(C, -np.asarray(alpha, dtype=float))


def chinchilla_law(N, D, E, A, B, alpha, beta):
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)."""
    return E + A * np.power(N, -np.asarray(alpha, dtype=float)) + B * np.power(D, -np.asarray(beta, dtype=float))


def compute_needed(loss, E, A, alpha):
    """Compute at which L(C) = E + A C^-alpha reaches `loss` (inf when loss <= E)."""
    loss, E, A, alpha = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (loss, E, A, alpha)))
    out = np.full(loss.shape, np.inf)
    out[np.isnan(loss) | np.isnan(E) | np.isnan(A) | np.isnan(alpha)] = np.nan  # failed replicates stay failed
    ok = loss > E
    with np.errstate(divide="ignore", over="ignore"):
        out[ok] = np.power(A[ok] / (loss[ok] - E[ok]), 1.0 / alpha[ok])
    return out if out.ndim else float(out)


@dataclass(frozen=True)
class ComputeRule:
    """Training compute per token as k N^g, so that C = k N^g D: Chinchilla's 6 N by default, or fitted to
    the runs, whose FLOPs also count the LM head and attention (`models.config.flops_per_token`)."""

    k: float = 6.0
    g: float = 1.0

    @classmethod
    def fit(cls, N, D, C, source: str = "runs") -> "ComputeRule":
        """Least squares of log(C / D) on log N over the runs; 6 N where C = 6 N D holds (to 1e-9). `source` names
        the points in a FitError: "runs" or "training curves"."""
        N, D, C = (np.asarray(v, float) for v in (N, D, C))
        per_token = C / D
        if np.allclose(per_token, 6.0 * N, rtol=1e-9, atol=0.0):
            return cls()
        x, y = np.log(N), np.log(per_token)
        _check_per_token(x, np.log(D), np.log(C), source)
        if np.ptp(x) < 1e-9:  # one size: its compute per token, with g as Chinchilla's
            return cls(k=float(np.exp(np.mean(y - x))), g=1.0)
        g, c = np.polyfit(x, y, 1)
        # Compute per token that does not grow with size is no training count (6 N alone grows as N); with g <= 0
        # the optimal N_opt is unbounded, and approach 3 had printed an exponent a of 4.7 and N_opt as nan.
        if g < MIN_PER_TOKEN_EXPONENT:
            raise FitError(f"the {source}' FLOPs per token vary as (model size)^{g:.2f}, not growing with the size: they "
                           f"are not a training-compute count (check the {_FLOPS_COLUMN[source]})")
        return cls(k=float(np.exp(c)), g=float(g))

    def tokens(self, C, N):
        """Tokens that compute C buys a model of N parameters."""
        return np.asarray(C, float) / (self.k * np.power(N, self.g))


#: The least exponent g of compute per token ~ N^g taken for a training count: a small model's per-token compute is
#: mostly its LM head, which grows with width alone (g about 0.1 for depths 1-4 at width 128), but never not at all.
MIN_PER_TOKEN_EXPONENT = 0.01
#: How far the exponent h of C ~ N^g D^h may stray from 1 before the FLOPs are taken for something other than a
#: training count (which is compute per token times tokens, so h = 1 exactly; external counts are rounded).
PER_TOKEN_TOL = 0.1


#: The column a FitError of `ComputeRule.fit` sends the user to, by the points it was fitted on.
_FLOPS_COLUMN = {"runs": "flops column", "training curves": "metrics' flops column"}


def _check_per_token(logN: np.ndarray, logD: np.ndarray, logC: np.ndarray, source: str = "runs") -> None:
    """A FitError where the FLOPs (of `source`: runs or training curves) do not grow in proportion to their tokens at a
    given size."""
    X = np.column_stack([np.ones_like(logN), logN, logD])
    # Only where the tokens at a given size span 2x or more: runs at a fixed tokens-per-parameter ratio (the smoke
    # study's) leave h to the noise of the small terms of the count.
    spread = logD - X[:, :2] @ np.linalg.lstsq(X[:, :2], logD, rcond=None)[0]
    if np.ptp(spread) < math.log(2):
        return
    h = float(np.linalg.lstsq(X, logC, rcond=None)[0][2])
    # with FLOPs of 1e30 for every run, a rule fitted as C / D ~ N^g had put 1e-43 tokens per parameter
    if abs(h - 1.0) > PER_TOKEN_TOL:
        raise FitError(f"the {source}' FLOPs grow as tokens^{h:.2f} at a given size, not in proportion to the tokens: "
                       f"they are not a training-compute count (check the {_FLOPS_COLUMN[source]})")


def optimal_allocation(C, A, B, alpha, beta, rule: ComputeRule = ComputeRule()):
    """Compute-optimal (N_opt, D_opt) of approach 3 under C = k N^g D (Hoffmann et al. 2022, eq. 4, at k 6, g 1).

    Minimising E + A N^-alpha + B (C / k N^g)^-beta over N: N_opt = (alpha A / (g beta B k^beta))^(1 /
    (alpha + g beta)) C^(beta / (alpha + g beta)), D_opt = C / (k N_opt^g).
    """
    k, g = rule.k, rule.g
    N = np.power(alpha * A / (g * beta * B * np.power(k, beta)), 1.0 / (alpha + g * beta)) * np.power(
        np.asarray(C, float), beta / (alpha + g * beta))
    return N, rule.tokens(C, N)


# --------------------------------------------------------------------------------------------
# Input


def prepare_points(runs: pd.DataFrame, params_col: str = DEFAULT_PARAMS_COL) -> pd.DataFrame:
    """Validated per-run points (run_id, N, D, C, L, plus arch/budget when present) from a runs frame.

    L is val_loss, falling back to final_loss where NaN (or a `loss` column); C is flops or 6 N D.
    """
    if not isinstance(runs, pd.DataFrame):
        raise FitError(f"runs must be a pandas DataFrame, got {type(runs).__name__}")
    if runs.empty:
        raise FitError("runs frame is empty: nothing to fit")
    cols = set(runs.columns)
    missing = [c for c in (params_col, "tokens") if c not in cols]
    loss_cols = [c for c in LOSS_COLUMNS if c in cols]
    if not loss_cols:
        missing.append("val_loss (or final_loss, or loss)")
    if missing:
        hint = " (choose another params_col)" if params_col in missing else ""
        raise FitError(
            f"runs frame is missing column(s) {', '.join(map(repr, missing))}{hint}; "
            f"columns present: {', '.join(map(str, runs.columns))}"
        )
    runs = done_runs(runs)
    run_id = runs["run_id"].astype(str).to_numpy() if "run_id" in cols else runs.index.astype(str).to_numpy()
    dup = pd.Series(run_id).duplicated()
    if dup.any():
        raise FitError(f"{int(dup.sum())} run id(s) appear more than once (each run would count twice): "
                       f"{_some(np.unique(run_id[dup.to_numpy()]))}")
    N = _numeric(runs[params_col], params_col)
    D = _numeric(runs["tokens"], "tokens")
    L = np.full(len(runs), np.nan)
    for c in loss_cols:
        L = np.where(np.isnan(L), pd.to_numeric(runs[c], errors="coerce").to_numpy(dtype=float), L)
    _check_positive(N, run_id, params_col)
    _check_positive(D, run_id, "tokens")
    bad = ~np.isfinite(L)
    if bad.any():
        raise FitError(
            f"{bad.sum()} run(s) have no finite loss in {' / '.join(loss_cols)}: {_some(run_id[bad])}"
        )
    bad = L <= 0
    if bad.any():
        raise FitError(f"{bad.sum()} run(s) have a loss <= 0 (losses are in nats, > 0): {_some(run_id[bad])}")
    C = 6.0 * N * D
    if "flops" in cols:
        fl = pd.to_numeric(runs["flops"], errors="coerce").to_numpy(dtype=float)
        neg = (fl <= 0) | np.isinf(fl)  # NaN (not recorded) falls back to 6 N D; inf is a broken count, not a budget
        if neg.any():
            raise FitError(f"{neg.sum()} run(s) have flops <= 0 or infinite: {_some(run_id[neg])}")
        C = np.where(np.isfinite(fl), fl, C)
    out = pd.DataFrame({"run_id": run_id, "N": N, "D": D, "C": C, "L": L})
    for extra in ("arch", "hybrid", "budget"):
        if extra in cols:
            out[extra] = runs[extra].to_numpy()
    return out.reset_index(drop=True)


def _by_run(pts: pd.DataFrame) -> pd.DataFrame:
    """Points in order of run id: the bootstrap draws runs by position, so a seed gives the same resamples (and
    intervals) whatever order the runs came in (a query without ORDER BY, a sorted CSV)."""
    return pts.sort_values("run_id", kind="mergesort").reset_index(drop=True)


def done_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a fit may use: those done, when the frame has a status (others are left out with a warning)."""
    if "status" not in runs.columns:
        return runs
    # unfinished runs carry planned tokens with a mid-training (or no) loss
    done = runs["status"].astype(str).eq("done")
    if done.all():
        return runs
    log.warning("fits: left out %d run(s) not done (statuses: %s)", int((~done).sum()),
                ", ".join(sorted(set(runs.loc[~done, "status"].astype(str)))))
    if not done.any():
        raise FitError("no run in the frame is done: nothing to fit")
    return runs[done]


def load_csv(
    path: str | Path,
    params_col: str = "params",
    tokens_col: str | None = None,
    loss_col: str = "loss",
    flops_col: str | None = None,
) -> pd.DataFrame:
    """Read external (params, tokens, loss[, flops]) data into a frame the fits take with params_col="params".

    Tokens default to flops / (6 N) and flops to 6 N D; tokens_col and flops_col left None take "tokens" and
    "flops" where the file has them, a named one must exist. So the Besiroglu et al. 2024 Chinchilla data
    (params_col="Model Size", flops_col="Training FLOP") loads as it is. What a fit should know of the data
    (repeated rows, FLOPs far from 6 N D) is in the frame's attrs["notes"].
    """
    path = Path(path)
    if path.is_dir():
        raise FitError(f"{path}: a folder, not a CSV file")
    if not path.is_file():
        raise FitError(f"{path}: no such file")
    try:
        raw = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FitError(f"{path}: not a readable CSV ({exc})") from exc
    cols = list(raw.columns)
    tcol = tokens_col or ("tokens" if "tokens" in cols else None)
    fcol = flops_col or ("flops" if "flops" in cols else None)
    need = [params_col, loss_col, *(c for c in (tokens_col, flops_col) if c is not None)]
    if tcol is None and fcol is None:
        need.append("tokens (or flops)")
    missing = [c for c in need if c not in cols]
    if missing:
        raise FitError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns: {', '.join(cols)}")
    number = lambda c: pd.to_numeric(raw[c], errors="coerce").to_numpy(float)  # noqa: E731
    N, loss = number(params_col), number(loss_col)
    flops = number(fcol) if fcol else None
    D = number(tcol) if tcol else flops / (6.0 * N)
    rows = np.arange(2, len(raw) + 2)  # file line numbers, header being line 1
    bad = positive_column_errors(rows, {params_col: N, (tcol or fcol): D, loss_col: loss})
    if bad:
        raise FitError(f"{path}: " + "; ".join(bad))
    if flops is None:
        flops = 6.0 * N * D
    notes = []
    repeats = int(raw.duplicated().sum())
    if repeats:
        notes.append(f"{repeats} row(s) repeat an earlier row exactly; each counts as a run, which narrows the "
                     "intervals (drop them if they are copies)")
    if tcol and fcol:
        # A blank cell says nothing of the column's convention (a median over its NaN is NaN), and its row's C comes
        # from 6ND instead (prepare_points): a second convention in one fit, unless the column's is 6ND.
        given = np.isfinite(flops) & (flops > 0)
        if given.any():
            ratio = np.median(flops[given] / (6.0 * N[given] * D[given]))
            if not 0.5 <= ratio <= 2:
                notes.append(f"column {fcol!r} is {ratio:.3g}x 6 x params x tokens (median): C is read from it, so "
                             "the compute-optimal sizes at a budget follow its convention, not C = 6ND")
        blank = np.isnan(flops)
        if blank.any():
            notes.append(f"{int(blank.sum())} row(s) have no {fcol!r} (line(s) {_some(rows[blank])}): their C is "
                         "6 x params x tokens")
    out = pd.DataFrame({"run_id": [f"{path.name}:{r}" for r in rows], "params": N, "tokens": D, "flops": flops,
                        "loss": loss})
    out.attrs["notes"] = notes
    return out


def positive_column_errors(lines: np.ndarray, columns: Mapping[str, np.ndarray]) -> list[str]:
    """One message per column holding a value that is not a positive, finite number, naming its file lines."""
    out = []
    for name, v in columns.items():
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            out.append(f"column {name!r} must be a positive number; bad on line(s) {_some(lines[bad])}")
    return out


# --------------------------------------------------------------------------------------------
# Loss against compute on the frontier


def curve_envelope(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    params_col: str = DEFAULT_PARAMS_COL,
    n_bins: int = 30,
    edges: str = "drop",
) -> pd.DataFrame:
    """Frontier from training curves: the lowest loss per log-spaced FLOP bin, then the lower envelope
    (edges="drop": without the bins whose best run is the smallest size covering them; see `_FrontierSource`)."""
    _check_counts(0, n_bins=n_bins)
    pts = prepare_points(runs, params_col)
    source = _FrontierSource(pts, _curves(metrics, runs, params_col), n_bins, drop_edges=_check_edges(edges))
    return source.frame(np.arange(len(source.run_ids)))


def _check_edges(edges: str) -> bool:
    """Whether to drop edge points; a value other than "drop" or "keep" is a FitError."""
    if edges not in EDGES:
        raise FitError(f"edges must be one of {', '.join(EDGES)}, got {edges!r}")
    return edges == "drop"


def fit_loss_compute(
    runs: pd.DataFrame,
    *,
    metrics: pd.DataFrame | None = None,
    form: str = "saturating",
    params_col: str = DEFAULT_PARAMS_COL,
    n_bins: int = 30,
    edges: str = "drop",
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> FitResult:
    """Fit L = E + A C^-alpha (form="saturating") or L = A C^-alpha (form="power") on the frontier.

    The frontier comes from the training curves when `metrics` holds any, else from final points; the
    bootstrap resamples runs and rebuilds the frontier each time. Least squares in log loss. edges="keep"
    fits the runs' whole envelope, an upper bound of the compute-optimal frontier where the best run is
    the smallest size covering a budget; "drop" leaves those points out (FrontierNotIdentified when too
    few remain); "auto" drops them where the frontier stays identified, else keeps them, and then
    details["unidentified"] says why.
    """
    _check_counts(n_bootstrap, n_bins=n_bins)
    if metrics is not None and metrics.empty:  # runs that recorded no curves: their final points, as the report fits
        metrics = None
    if edges == "auto":
        kwargs = dict(metrics=metrics, form=form, params_col=params_col, n_bins=n_bins, n_bootstrap=n_bootstrap,
                      seed=seed, progress=progress)
        try:
            return fit_loss_compute(runs, edges="drop", **kwargs)
        except FrontierNotIdentified as exc:
            result = fit_loss_compute(runs, edges="keep", **kwargs)
            result.details["unidentified"] = str(exc)
            return result
    drop_edges = _check_edges(edges)
    if form not in ("saturating", "power"):
        raise FitError(f"form must be 'saturating' or 'power', got {form!r}")
    pts = _by_run(prepare_points(runs, params_col))
    k = 3 if form == "saturating" else 2
    source = _FrontierSource(pts, None if metrics is None else _curves(metrics, runs, params_col), n_bins,
                             drop_edges=drop_edges)
    n_runs = len(source.run_ids)
    # one size's final points at several token counts are its training curve too: as from curves, no frontier (compare
    # had printed a "frontier" gap and compute multiplier for a one-size ablation trained to three budgets)
    if np.unique(source.N_run).size < 2:
        raise FitError(
            f"loss-compute fit{' from curves' if source.kind == 'curves' else ''} needs runs of at least 2 model sizes, "
            f"got {n_runs} run(s) of one size: one model's training curve is not the compute-optimal frontier"
        )
    front = source.frame(np.arange(n_runs))
    if len(front) < k and source.kind == "curves" and drop_edges:
        n_env = len(source.frame(np.arange(n_runs), drop_edges=False))
        if n_env >= k:
            raise FrontierNotIdentified(
                f"loss-compute fit ({form}): {len(front)} frontier point(s) of the {n_env} on the runs' envelope are "
                "left once the points where the best run is the smallest size covering that compute are dropped "
                "(a smaller model might do better there): the compute-optimal frontier is not identified. Train "
                "smaller models, or fit the envelope, an upper bound of the frontier (--edges keep)"
            )
    if len(front) < k:
        budgets = np.unique(pts["C"]).size
        # with budgets enough, a short frontier means the loss stops falling with compute: more budgets won't help
        why = (f" at {budgets} compute budgets: the loss stops falling as compute grows (a cheaper run is as good as "
               "the costlier ones), so there is no frontier to fit" if budgets >= k and source.kind != "curves"
               else ": add runs at more compute budgets")
        raise FitError(f"loss-compute fit ({form}) needs at least {k} frontier points, got {len(front)} from "
                       f"{n_runs} run(s){why}")
    C0 = float(np.exp(np.mean(np.log(front["C"]))))  # centring makes the fit well conditioned
    theta_hat, ok = _fit_frontier(front["C"].to_numpy() / C0, front["L"].to_numpy(), form, None)
    if not np.all(np.isfinite(theta_hat)):
        raise FitError(f"loss-compute fit ({form}) found no finite solution on {len(front)} frontier points")

    def to_estimates(theta):
        if form == "saturating":
            e, a, alpha = theta
            return {"E": math.exp(e), "A": _safe_exp(a + alpha * math.log(C0)), "alpha": float(alpha)}
        a, alpha = theta
        return {"A": _safe_exp(a + alpha * math.log(C0)), "alpha": float(alpha)}

    estimates = to_estimates(theta_hat)
    rng = np.random.default_rng(seed)
    rows, n_fail, n_lost = [], 0, 0
    for i in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n_runs, n_runs), minlength=n_runs)
        sel = np.flatnonzero(counts)
        C, L, w = source.envelope(sel, counts)
        good = False
        # as for the data itself, one model's training curve is not a frontier: such a replicate fails
        one_size = np.unique(source.N_run[sel]).size < 2
        if len(C) >= k and not one_size:
            th, good = _fit_frontier(C / C0, L, form, theta_hat, w)
        rows.append(to_estimates(th) if good else {key: math.nan for key in estimates})
        n_fail += not good
        n_lost += _replicate_failed(rows[-1])  # as _check_bootstrap will count it, unusable laws included
        if progress:
            progress(i + 1, n_bootstrap)
        if _mostly_failed(n_lost, n_bootstrap):
            break  # the intervals are unknown whatever the rest give
    samples = pd.DataFrame(rows, columns=list(estimates)) if n_bootstrap else None
    pred = loss_compute_law(front["C"].to_numpy(), estimates.get("E", 0.0), estimates["A"], estimates["alpha"])
    points = front.assign(L_fit=pred)
    return _check_bootstrap(FitResult(
        method="frontier" if form == "saturating" else "frontier_power",
        formula="L = E + A * C^-alpha" if form == "saturating" else "L = A * C^-alpha",
        estimates=estimates,
        intervals=_intervals(samples),
        residuals=np.log(pred) - np.log(front["L"].to_numpy()),
        points=points,
        n_points=len(front),
        n_bootstrap=n_bootstrap,
        converged=bool(ok),
        details={"source": source.kind, "n_runs": int(n_runs), "bootstrap_failed": int(n_fail), "C_ref": C0,
                 "edges": edges if source.kind == "curves" else "drop", **_stopped_after(len(rows), n_bootstrap),
                 **_note_frontier_at_bound(estimates, front["C"].to_numpy(), pred)},
        samples=samples,
    ))


class _FrontierSource:
    """Frontier points for any subset of runs, fast enough to rebuild in every bootstrap replicate.

    From final points: one point per run; runs whose compute agrees within `TIE_REL_TOL` (an IsoFLOP
    budget) are one budget, of which only the lowest loss can be on the frontier. From curves: per run
    and log-spaced FLOP bin the curve's lowest point; a subset's frontier takes the minimum over its
    runs per bin, then the lower envelope. A bin whose winner is the smallest of the subset's sizes
    covering it is dropped: a smaller model, trained longer, might do better there, so that point only
    bounds the frontier (the edge effect of approach 1).
    """

    def __init__(self, pts: pd.DataFrame, curves: pd.DataFrame | None, n_bins: int, drop_edges: bool = True):
        self.kind = "final" if curves is None else "curves"
        self.drop_edges = drop_edges
        if curves is None:
            table = pts[["run_id", "N", "D", "C", "L"]]
            self.run_ids = table["run_id"].to_numpy()
            self.N_run = table["N"].to_numpy()
            order = np.argsort(table["C"].to_numpy(), kind="mergesort")
            self.table = table.iloc[order].reset_index(drop=True)
            self.run_of = order  # sorted point -> run index
            C = self.table["C"].to_numpy()
            # ties: a point within TIE_REL_TOL of the one below it shares that one's budget
            new_group = np.r_[True, C[1:] > C[:-1] * (1 + TIE_REL_TOL)]
            self.group_start = np.flatnonzero(new_group)
            self.group_of = np.cumsum(new_group) - 1
            self.C, self.L = C, self.table["L"].to_numpy()
            return
        curves = curves[curves["run_id"].isin(set(pts["run_id"]))]
        # np.unique's order (sorted) from a hash pass and a sort of the few distinct ids: np.unique sorts every
        # curve point's id as a Python string, most of a paper-scale source's cost
        self.run_ids = np.sort(pd.unique(curves["run_id"].to_numpy()))
        size = dict(zip(pts["run_id"], pts["N"]))
        self.N_run = np.array([size[r] for r in self.run_ids], float)
        bins = _log_bins(curves["C"].to_numpy(), n_bins)
        best = _binned_minima(curves, bins)
        r = np.searchsorted(self.run_ids, best["run_id"].to_numpy())
        b = best["bin"].to_numpy()
        self.Lrb = np.full((len(self.run_ids), n_bins), np.inf)
        self.row = np.full((len(self.run_ids), n_bins), -1)
        self.Lrb[r, b] = best["L"].to_numpy()
        self.row[r, b] = np.arange(len(best))
        self.table = best[["run_id", "N", "D", "C", "L"]]
        self.run_of = r  # table row -> run index
        self.C, self.L = self.table["C"].to_numpy(), self.table["L"].to_numpy()  # read once, not per replicate

    def _rows(self, sel: np.ndarray, drop_edges: bool | None = None) -> np.ndarray:
        """Indices into self.table of the frontier of the selected runs, in order of compute."""
        if self.kind == "final":
            mask = np.zeros(len(self.run_ids), bool)
            mask[sel] = True
            m = mask[self.run_of]
            L = np.where(m, self.L, np.inf)
            best = np.minimum.reduceat(L, self.group_start)  # per budget
            prev = np.minimum.accumulate(np.r_[np.inf, best[:-1]])  # best of the lower budgets
            g = self.group_of
            keep = m & (L == best[g]) & (L < prev[g])
            # one point per budget even when two runs tie exactly
            first = np.r_[True, g[1:] != g[:-1]] | ~np.r_[False, keep[:-1]]
            return np.flatnonzero(keep & first)
        Ls = self.Lrb[sel]
        win = np.argmin(Ls, axis=0)
        cols = np.arange(Ls.shape[1])
        Lb = Ls[win, cols]
        ok = np.isfinite(Lb)
        N = self.N_run[sel]
        smallest = np.where(np.isfinite(Ls), N[:, None], np.inf).min(0)  # per bin, over the runs covering it
        edge = (N[win] <= smallest)[ok]
        rows = self.row[sel][win, cols][ok]
        L = Lb[ok]
        # Bins are disjoint compute ranges, so bin order is compute order. An edge point still bounds the
        # frontier from above, so a later point no lower than it is dominated.
        prev = np.minimum.accumulate(np.r_[np.inf, L[:-1]])
        drop = self.drop_edges if drop_edges is None else drop_edges
        return rows[(L < prev) & ~(edge & drop)]

    def envelope(self, sel: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(C, L, weight) of the frontier of the selected runs, each point weighted by how often its run was drawn."""
        rows = self._rows(sel)
        weight = counts[self.run_of[rows]].astype(float)
        return self.C[rows], self.L[rows], weight

    def frame(self, sel: np.ndarray, drop_edges: bool | None = None) -> pd.DataFrame:
        """The frontier points of the selected runs as a frame (edge points as the source drops them, unless told)."""
        return self.table.iloc[self._rows(sel, drop_edges)].reset_index(drop=True)


def _fit_frontier(c: np.ndarray, L: np.ndarray, form: str, start: np.ndarray | None,
                  w: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Least squares in log loss, weighted by w (a bootstrap's run counts); returns (theta, converged).
    theta = (log E, log A', alpha) or (log A', alpha)."""
    lc, ll = np.log(c), np.log(L)
    # A run drawn twice by the bootstrap counts twice, as it would in any least squares over resampled points;
    # counted once, a replicate refits ~63% of the points and its spread understates the estimate's.
    sw = np.ones_like(lc) if w is None else np.sqrt(np.asarray(w, float))
    if form == "power":
        X = np.column_stack([np.ones_like(lc), -lc])
        coef, *_ = np.linalg.lstsq(X * sw[:, None], ll * sw, rcond=None)
        return coef, bool(np.all(np.isfinite(coef)))

    def resid(th):
        e, a, alpha = th
        return sw * (np.log(np.exp(e) + np.exp(a - alpha * lc)) - ll)

    def jac(th):
        e, a, alpha = th
        Ev, T = np.exp(e), np.exp(a - alpha * lc)
        p = Ev + T
        return sw[:, None] * np.column_stack([Ev / p, T / p, -lc * T / p])

    if start is not None:
        starts = [np.asarray(start, float)]
    else:
        lmin = float(L.min())
        starts = []
        for frac in (0.3, 0.6, 0.9):
            for alpha in (0.05, 0.2, 0.5, 1.0):
                E = frac * lmin
                a = math.log(max(float(np.median(L)) - E, 1e-3 * lmin))
                starts.append(np.array([math.log(E), a, alpha]))
    best, best_cost, best_ok = None, np.inf, False
    for s in starts:
        with np.errstate(over="ignore", invalid="ignore"):
            r = least_squares(resid, s, jac=jac, method="lm", xtol=1e-12, ftol=1e-12, max_nfev=2000)
        if np.all(np.isfinite(r.x)) and r.cost < best_cost:
            best, best_cost, best_ok = r.x, r.cost, r.status > 0
    if best is None:
        return np.full(3, np.nan), False
    return best, best_ok


def _curves(metrics: pd.DataFrame, runs: pd.DataFrame, params_col: str) -> pd.DataFrame:
    """Training-curve points (run_id, C, L, D, N) of the given runs, C from flops or else from tokens by the
    runs' `ComputeRule`."""
    if not isinstance(metrics, pd.DataFrame) or metrics.empty:
        raise FitError("metrics frame is empty: no training curves to use")
    missing = [c for c in ("run_id", "loss") if c not in metrics.columns]
    if "flops" not in metrics.columns and "tokens" not in metrics.columns:
        missing.append("flops (or tokens)")
    if missing:
        raise FitError(f"metrics frame is missing column(s) {', '.join(map(repr, missing))}")
    m = metrics.reset_index(drop=True)
    out = pd.DataFrame({"run_id": m["run_id"].astype(str), "L": pd.to_numeric(m["loss"], errors="coerce")})
    out["D"] = pd.to_numeric(m["tokens"], errors="coerce").to_numpy() if "tokens" in m.columns else np.nan
    pts = prepare_points(runs, params_col)
    # each point's run size by a hash lookup of its run (prepare_points' ids are unique): a dict mapped over every
    # point of a paper-scale study's curves took twice as long
    at = pd.Index(pts["run_id"]).get_indexer(out["run_id"])
    out["N"] = np.where(at >= 0, pts["N"].to_numpy()[at], np.nan)
    # at >= 0 is isin(pts' ids); `at` follows the rows so that the runs left without points need no set of ids built
    # by iterating the curves' arrow-backed strings one by one (most of this function's time at 12,000 runs)
    known = at >= 0
    out, at = out[known], at[known]
    C = pd.to_numeric(m.loc[out.index, "flops"], errors="coerce") if "flops" in m.columns else None
    rule = ComputeRule.fit(pts["N"], pts["D"], pts["C"])
    if C is not None:
        # The budgets come from the curves' FLOPs, not the runs': curves counting tokens^2 (beside runs counting 6ND)
        # had given approach 1 an allocation of 4 tokens per parameter, with no word that the count was wrong.
        given = (C > 0) & np.isfinite(C) & (out["D"] > 0) & np.isfinite(out["D"])
        if given.any():
            ComputeRule.fit(out.loc[given, "N"], out.loc[given, "D"], C[given], source="training curves")
    fallback = rule.k * np.power(out["N"], rule.g) * out["D"]
    out["C"] = fallback if C is None else C.fillna(fallback)
    usable = np.isfinite(out["C"]) & (out["C"] > 0) & np.isfinite(out["L"]) & (out["L"] > 0)
    usable = usable.to_numpy(bool, na_value=False)
    out, at = out[usable], at[usable]
    if out.empty:
        raise FitError("metrics frame has no point with a positive finite loss and compute for these runs")
    has_points = np.zeros(len(pts), bool)
    has_points[at] = True
    without = pts.loc[~has_points, "run_id"]
    if len(without):  # a fit from curves sees only runs that have them; say so rather than fit fewer in silence
        log.warning("fits: left out %d of %d run(s) with no training-curve point: %s", len(without), len(pts),
                    _some(without.to_numpy()))
    return out.reset_index(drop=True)


def _log_bins(C: np.ndarray, n_bins: int) -> np.ndarray:
    lo, hi = np.log10(C.min()), np.log10(C.max())
    if hi - lo < 1e-9:
        hi = lo + 1e-6
    return np.logspace(lo, hi, n_bins + 1)


def _binned_minima(curves: pd.DataFrame, bins: np.ndarray) -> pd.DataFrame:
    """Each run's lowest-loss curve point per compute bin, with the bin index."""
    b = np.clip(np.searchsorted(bins, curves["C"].to_numpy(), side="right") - 1, 0, len(bins) - 2)
    c = curves.assign(bin=b)
    idx = c.groupby(["run_id", "bin"], sort=False)["L"].idxmin()
    return c.loc[idx.to_numpy()].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Approach 1: minimum-loss envelope over training curves


def fit_approach1(
    runs: pd.DataFrame,
    metrics: pd.DataFrame,
    *,
    params_col: str = DEFAULT_PARAMS_COL,
    n_budgets: int = 40,
    budgets: Sequence[float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> FitResult:
    """Chinchilla approach 1: per log-spaced FLOP budget the run whose curve is lowest gives N_opt, D_opt.

    Curves are interpolated (log-log) at the budgets. A budget counts where a first fit (on budgets whose
    winner is neither the smallest nor the largest size covering it) puts N_opt inside the sizes covering
    it; its winner is then taken wherever it landed (`_approach1_envelope`).
    Fits N_opt = k_N C^a and D_opt = k_D C^b by least squares in log space.
    """
    _check_counts(n_bootstrap, n_budgets=n_budgets)
    budgets = _check_budgets(budgets)
    pts = prepare_points(runs, params_col)
    curves = _curves(metrics, runs, params_col)
    n_sizes = curves["N"].nunique()
    if n_sizes < 3:
        raise FitError(f"approach 1 needs curves from at least 3 model sizes, got {n_sizes}")
    Cgrid = np.logspace(np.log10(curves["C"].min()), np.log10(curves["C"].max()), n_budgets + 2)[1:-1]
    rule = ComputeRule.fit(pts["N"], pts["D"], pts["C"])
    run_ids, Lmat, Dmat, Nrun = _interpolate_curves(curves, Cgrid, rule)
    sel0 = np.arange(len(run_ids))
    front = _approach1_envelope(sel0, Lmat, Dmat, Nrun, Cgrid)
    if len(front["C"]) < 2:
        raise FitError(
            f"approach 1 found {len(front['C'])} usable budget(s) (need 2): the lowest curve at each budget "
            "must come from a size with smaller and larger sizes also covering that budget"
        )
    if np.unique(front["N"]).size < 2:
        raise FitError(
            f"approach 1: one size wins all {len(front['C'])} usable budgets, so N_opt does not change with compute "
            "there and its exponent would read 0: add sizes, or runs whose budgets overlap more"
        )
    est, resid = _allocation_fit(front["C"], front["N"], front["D"])
    rng = np.random.default_rng(seed)
    rows, n_fail, n_lost = [], 0, 0
    R = len(run_ids)
    # The replicates' draws one by one, as ever (the same stream), their envelopes a batch at a time. A replicate's
    # envelope is the same in any batch (its sizes' coverage is a sum of 0/1 weights, exact in floats), so the batches
    # are cut for stopping early (`_mostly_failed`) without changing any replicate: the first holds the n_bootstrap // 2
    # + 1 replicates that run before most can have failed, each later one an eighth of the bootstrap.
    per_batch = max(1, _ENVELOPE_ELEMS // max(1, R * len(Cgrid)))
    s = 0
    while s < n_bootstrap and not _mostly_failed(n_lost, n_bootstrap):
        size = min(per_batch, n_bootstrap - s, max(n_bootstrap // 2 + 1 - s, -(-n_bootstrap // 8)))
        counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(size)])
        for i, f in enumerate(_approach1_envelopes(counts > 0, Lmat, Dmat, Nrun, Cgrid), start=s):
            if np.unique(f["N"]).size >= 2:  # one winner (or none) says nothing of how N_opt grows: a failed replicate
                rows.append(_allocation_fit(f["C"], f["N"], f["D"], counts[i - s][f["row"]])[0])
            else:
                rows.append({k: math.nan for k in est})
                n_fail += 1
            n_lost += _replicate_failed(rows[-1])  # as _check_bootstrap will count it, unusable laws included
            if progress:
                progress(i + 1, n_bootstrap)
            if _mostly_failed(n_lost, n_bootstrap):
                break  # the intervals are unknown whatever the rest give
        s += size
    samples = pd.DataFrame(rows, columns=list(est)) if n_bootstrap else None
    est, samples = _with_tokens_per_param(est, samples, budgets or allocation_budgets(pts["C"]))
    points = pd.DataFrame(
        {"C": front["C"], "N_opt": front["N"], "D_opt": front["D"], "L": front["L"], "run_id": run_ids[front["row"]]}
    )
    return _check_bootstrap(FitResult(
        method="approach1",
        formula="N_opt = k_N * C^a, D_opt = k_D * C^b (envelope of training curves)",
        estimates=est,
        intervals=_intervals(samples),
        residuals=resid,
        points=points,
        n_points=len(points),
        n_bootstrap=n_bootstrap,
        converged=True,
        details={"n_runs": int(len(run_ids)), "n_budgets_tried": int(len(Cgrid)), "bootstrap_failed": int(n_fail),
                 "compute": asdict(rule), **_stopped_after(len(rows), n_bootstrap)},
        samples=samples,
    ))


def _interpolate_curves(curves: pd.DataFrame, Cgrid: np.ndarray, rule: ComputeRule):
    """Each run's log loss and log tokens interpolated at the budgets it covers (NaN elsewhere)."""
    curves = curves.sort_values(["run_id", "C"], kind="mergesort")
    ids = curves["run_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    lC, lL = np.log(curves["C"].to_numpy()), np.log(curves["L"].to_numpy())
    Dv, Nv = curves["D"].to_numpy(), curves["N"].to_numpy()
    lD = np.log(np.where(np.isfinite(Dv) & (Dv > 0), Dv, np.nan))
    lg = np.log(Cgrid)
    R, K = len(starts), len(Cgrid)
    Lmat = np.full((R, K), np.nan)
    Dmat = np.full((R, K), np.nan)
    for r, (s, e) in enumerate(zip(starts, ends)):
        x = lC[s:e]
        inside = (lg >= x[0]) & (lg <= x[-1])
        if inside.any():
            Lmat[r, inside] = np.exp(np.interp(lg[inside], x, lL[s:e]))
            d = lD[s:e]
            if np.isfinite(d).all():
                Dmat[r, inside] = np.exp(np.interp(lg[inside], x, d))
            else:  # no token counts logged: D from the compute rule
                Dmat[r, inside] = rule.tokens(Cgrid[inside], Nv[s])
    return ids[starts], Lmat, Dmat, Nv[starts]


def _approach1_envelope(sel, Lmat, Dmat, Nrun, Cgrid) -> dict[str, np.ndarray]:
    """The budgets approach 1 uses and each one's lowest curve, for the selected runs (two passes).

    Pass 1 keeps a budget when its winner is neither the smallest nor the largest size covering it (an edge
    winner only bounds N_opt). That rule selects on the outcome: near the data's edge only winners that
    landed on the larger side survive, which biased N_opt upward (a 0.48 against a true 0.45 on the
    synthetic study). Pass 2 chooses budgets by the design instead: where pass 1's law puts N_opt between
    the second smallest and the second largest covering sizes, and takes each such budget's winner,
    edge or not.
    """
    L = Lmat[sel]
    N = Nrun[sel][:, None]
    cover = np.isfinite(L)
    win = np.argmin(np.where(cover, L, np.inf), axis=0)
    Nw = N[win, 0]
    # Sizes, not runs: runs of one size (seeds, token budgets) are one size, else a budget covered by two sizes
    # passed for three and the second smallest "size" was the smallest again, letting edge budgets in.
    smallest = np.where(cover, N, np.inf).min(0)
    largest = np.where(cover, N, -np.inf).max(0)
    inner = cover & (N > smallest) & (N < largest)
    has = inner.any(0)  # at least 3 sizes cover the budget
    second = np.where(cover & (N > smallest), N, np.inf).min(0)  # per budget, the second smallest covering size
    second_high = np.where(cover & (N < largest), N, -np.inf).max(0)  # and the second largest
    keep = has & (Nw > smallest) & (Nw < largest)
    if keep.sum() >= 2:
        a, c = np.polyfit(np.log(Cgrid[keep]), np.log(Nw[keep]), 1)  # pass 1's N_opt = e^c C^a
        # in logs: at a = -25 and C = 1e20, e^c overflowed and C^a underflowed, inf x 0 = NaN dropping every budget
        predicted = np.exp(c + a * np.log(Cgrid))
        keep = has & (predicted >= second) & (predicted <= second_high)
    k = np.flatnonzero(keep)
    rows = sel[win[k]]
    return {"C": Cgrid[k], "N": Nw[k], "D": Dmat[rows, k], "L": L[win[k], k], "row": rows}


#: Elements (replicates x runs x budgets) of one batch of `_approach1_envelopes`, which bounds its arrays.
_ENVELOPE_ELEMS = 2_000_000


def _approach1_envelopes(masks, Lmat, Dmat, Nrun, Cgrid) -> list[dict[str, np.ndarray]]:
    """`_approach1_envelope` of each row of run masks (B, R): the same budgets and winners, found from the sizes that
    cover each budget and its runs in order of loss instead of a pass over every selected run per replicate."""
    B = len(masks)
    cover = np.isfinite(Lmat)  # (R, K)
    sizes, size_of = np.unique(Nrun, return_inverse=True)
    # per replicate, budget and size: whether a selected run of that size covers the budget
    present = np.zeros((B, Lmat.shape[1], len(sizes)), bool)
    weights = masks.astype(float)
    for g in range(len(sizes)):
        runs_g = size_of == g
        present[:, :, g] = weights[:, runs_g] @ cover[runs_g] > 0
    n_sizes = present.sum(-1)
    rank = np.cumsum(present, axis=-1)  # 1 at the smallest covering size, n_sizes at the largest
    ladder = np.broadcast_to(sizes, present.shape)

    def nth(i):  # per replicate and budget, the covering size of rank i (1-based; nan where fewer)
        at = present & (rank == i[..., None])
        return np.where(at.any(-1), np.where(at, ladder, 0.0).sum(-1), np.nan)

    one = np.ones_like(n_sizes)
    smallest = np.where(n_sizes > 0, nth(one), np.inf)
    largest = np.where(n_sizes > 0, nth(n_sizes), -np.inf)
    has = n_sizes >= 3  # a covering size strictly between the smallest and the largest
    second = np.where(n_sizes >= 2, nth(2 * one), np.inf)
    second_high = np.where(n_sizes >= 2, nth(n_sizes - 1), -np.inf)
    # each budget's winner: the first selected run in order of loss (uncovered last; ties by run, as argmin takes them)
    order = np.argsort(np.where(cover, Lmat, np.inf), axis=0, kind="stable")  # (R, K)
    win = np.broadcast_to(order[0], (B, order.shape[1])).copy()
    found = masks[:, order[0]]
    for j in range(1, len(order)):
        if found.all():
            break
        chosen = masks[:, order[j]] & ~found
        win[chosen] = np.broadcast_to(order[j], win.shape)[chosen]
        found |= chosen
    Nw = Nrun[win]
    first = has & (Nw > smallest) & (Nw < largest)
    out = []
    for b in range(B):
        keep = first[b]
        if keep.sum() >= 2:
            a, c = np.polyfit(np.log(Cgrid[keep]), np.log(Nw[b, keep]), 1)
            predicted = np.exp(c + a * np.log(Cgrid))
            keep = has[b] & (predicted >= second[b]) & (predicted <= second_high[b])
        k = np.flatnonzero(keep)
        rows = win[b, k]
        out.append({"C": Cgrid[k], "N": Nw[b, k], "D": Dmat[rows, k], "L": Lmat[rows, k], "row": rows})
    return out


def _allocation_fit(C, N, D, w=None) -> tuple[dict[str, float], np.ndarray]:
    """N = k_N C^a and D = k_D C^b by least squares in log space, weighted by w (a bootstrap's counts of each
    point's run, as in `_fit_frontier`); residuals of the N fit."""
    lC = np.log(np.asarray(C, float))
    sw = np.ones_like(lC) if w is None else np.sqrt(np.asarray(w, float))
    X = np.column_stack([np.ones_like(lC), lC]) * sw[:, None]
    (cN, a), *_ = np.linalg.lstsq(X, np.log(N) * sw, rcond=None)
    (cD, b), *_ = np.linalg.lstsq(X, np.log(D) * sw, rcond=None)
    # _safe_exp: at a = -25 and C near 1e20, cN is 1150 and math.exp raised OverflowError (inf is noted by the fit)
    est = {"k_N": _safe_exp(cN), "a": float(a), "k_D": _safe_exp(cD), "b": float(b)}
    return est, (cN + a * lC) - np.log(N)


def _with_tokens_per_param(est, samples, budgets):
    """Add D_opt / N_opt at each budget to the estimates and the bootstrap samples (NaN where k_N or k_D is 0 or
    infinite: an exponent so steep that the constant left the floats)."""

    def ratio(kN, kD, a, b, C):
        # In logs: with Python floats C^(b - a) raised OverflowError at b - a = 17, and k_D / k_N ZeroDivisionError
        # where k_N underflowed to 0; the ratio itself is often a float where its factors are not.
        kN, kD, a, b = (np.asarray(v, float) for v in (kN, kD, a, b))
        with np.errstate(all="ignore"):
            out = np.exp(np.log(kD) - np.log(kN) + (b - a) * math.log(C))
        return np.where(np.isfinite(kN) & (kN > 0) & np.isfinite(kD) & (kD > 0), out, np.nan)

    est = dict(est)
    for C in budgets:
        key = f"tokens_per_param@{C:.3g}"
        est[key] = float(ratio(est["k_N"], est["k_D"], est["a"], est["b"], C))
        if samples is not None:
            samples[key] = ratio(samples["k_N"], samples["k_D"], samples["a"], samples["b"], C)
    return est, samples


def allocation_budgets(C) -> list[float]:
    """Default budgets for derived allocations: the data's largest compute and ten times it (1 sig. fig.)."""
    hi = float(np.max(C))
    return [float(f"{hi:.1g}"), float(f"{10 * hi:.1g}")]


# --------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas


def isoflop_groups(pts: pd.DataFrame, budget_col: str = "budget", rel_tol: float = 0.05) -> np.ndarray:
    """A budget label per point: the `budget` column when present, else runs whose FLOPs agree within rel_tol."""
    if budget_col in pts.columns and pts[budget_col].notna().all():
        label = pd.to_numeric(pts[budget_col], errors="coerce").to_numpy(float)
        bad = ~(np.isfinite(label) & (label > 0))
        if bad.any():  # a NaN label's runs would leave the fit unseen (groupby drops them)
            who = pts["run_id"].to_numpy()[bad] if "run_id" in pts.columns else np.flatnonzero(bad)
            raise FitError(f"{int(bad.sum())} run(s) have a {budget_col!r} that is not a positive number of FLOPs: "
                           f"{_some(who)}")
        return label
    C = pts["C"].to_numpy()
    order = np.argsort(C)
    label = np.empty(len(C))
    start = C[order[0]]
    group = [order[0]]
    for i in order[1:]:
        if C[i] > start * (1 + rel_tol):
            label[group] = np.exp(np.mean(np.log(C[group])))
            start, group = C[i], [i]
        else:
            group.append(i)
    label[group] = np.exp(np.mean(np.log(C[group])))
    return label


def fit_approach2(
    runs: pd.DataFrame,
    *,
    params_col: str = DEFAULT_PARAMS_COL,
    budget_col: str = "budget",
    rel_tol: float = 0.05,
    min_sizes: int = 4,
    min_span: float = 4.0,
    budgets: Sequence[float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> FitResult:
    """Chinchilla approach 2: per FLOP budget a parabola of L in log N gives N_opt; D_opt = C / (k N_opt^g), the
    runs' `ComputeRule` (Chinchilla's C / 6 N_opt when their compute is 6 N D).

    Budgets come from a `budget` column or from runs whose FLOPs agree within rel_tol. A budget counts
    when it has `min_sizes` sizes spanning a factor `min_span` and a convex parabola with its minimum
    inside the sizes tried. The bootstrap resamples runs within each budget so that no budget vanishes
    from a replicate.
    """
    _check_counts(n_bootstrap)
    budgets = _check_budgets(budgets)
    pts = _by_run(prepare_points(runs, params_col))
    pts["group"] = isoflop_groups(pts, budget_col, rel_tol)
    groups, too_few = [], []
    for g, sub in pts.groupby("group", sort=True):
        n_sizes = sub["N"].nunique()
        if n_sizes >= min_sizes and sub["N"].max() >= min_span * sub["N"].min():
            groups.append((float(g), np.log(sub["N"].to_numpy()), sub["L"].to_numpy(), sub.index.to_numpy()))
        else:
            too_few.append((float(g), int(n_sizes)))
    if len(groups) < 2:
        shown = ", ".join(f"{g:.3g} ({n} size{'s' * (n != 1)})" for g, n in too_few[:5]) or "none"
        raise FitError(
            f"approach 2 needs at least 2 FLOP budgets with {min_sizes}+ model sizes spanning {min_span:g}x; "
            f"found {len(groups)} (other budgets: {shown})"
        )
    G = len(groups)
    point = [_parabola_minima(x, L, np.ones((1, len(x)))) for _, x, L, _ in groups]
    logC = np.log([g for g, *_ in groups])
    logN = np.array([p[0][0] for p in point])
    kept = np.isfinite(logN)
    if kept.sum() < 2:
        raise FitError(
            f"approach 2: only {int(kept.sum())} budget(s) have a convex parabola with its minimum inside the "
            "sizes tried (need 2): widen the size range around the optimum"
        )
    rule = ComputeRule.fit(pts["N"], pts["D"], pts["C"])
    est_b, resid = _allocation_fit_batch(logC, logN[None, :], rule)
    est = {k: float(v[0]) for k, v in est_b.items()}
    rng = np.random.default_rng(seed)
    samples = None
    if n_bootstrap:
        # No early stop here, unlike the other fits: a replicate fails only once every budget's minimum is known, and
        # every budget solves all replicates in one call (1,000 in milliseconds); splitting those calls to stop sooner
        # would save nothing and change the replicates' last digits (the sums of W @ P group differently).
        boot = np.full((n_bootstrap, G), np.nan)
        for gi, (_, x, L, _) in enumerate(groups):
            counts = rng.multinomial(len(x), np.full(len(x), 1.0 / len(x)), size=n_bootstrap).astype(float)
            boot[:, gi] = _parabola_minima(x, L, counts)[0]
            if progress:
                progress(int(n_bootstrap * (gi + 1) / G), n_bootstrap)
        samples = pd.DataFrame(_allocation_fit_batch(logC, boot, rule)[0])
    est, samples = _with_tokens_per_param(est, samples, budgets or allocation_budgets(pts["C"]))
    used = np.concatenate([idx for *_, idx in groups])
    points = pts.loc[used].rename(columns={"group": "budget_group"}).reset_index(drop=True)
    minima_rows = []
    for (g, *_), (xm, Lm, coef) in zip(groups, point):
        if np.isfinite(xm[0]):
            N = math.exp(xm[0])
            minima_rows.append({"C": g, "N_opt": N, "D_opt": float(rule.tokens(g, N)), "L_opt": float(Lm[0]),
                                "coef": [float(c[0]) for c in coef]})
    return _check_bootstrap(FitResult(
        method="approach2",
        formula="N_opt = k_N * C^a, D_opt = k_D * C^b (IsoFLOP parabola minima)",
        estimates=est,
        intervals=_intervals(samples),
        residuals=resid[0][np.isfinite(resid[0])],
        points=points,
        n_points=len(points),
        n_bootstrap=n_bootstrap,
        converged=True,
        details={
            "minima": minima_rows,
            "n_budgets": G,
            "budgets_dropped": [g for (g, *_), k in zip(groups, kept) if not k],
            "compute": asdict(rule),
            "bootstrap_failed": 0 if samples is None else int(samples["a"].isna().sum()),
        },
        samples=samples,
    ))


def _parabola_minima(x: np.ndarray, L: np.ndarray, W: np.ndarray, min_sizes: int = 3):
    """Weighted fits L = c2 x^2 + c1 x + c0, one per row of weights W (k, m), by the normal equations.

    Returns (x_min, L_min, (c2, c1, c0)), arrays of length k; NaN where the parabola is not convex, its
    minimum lies outside the sizes with weight, or fewer than `min_sizes` distinct sizes have weight.
    """
    xm = x.mean()
    xc = x - xm  # centring keeps the normal equations well conditioned
    P = np.stack([xc**p for p in range(5)])  # (5, m)
    S = W @ P.T  # (k, 5): sums of w x^p
    T = W @ (P[:3] * L).T  # (k, 3): sums of w x^p L
    M = np.stack(
        [np.stack([S[:, 4], S[:, 3], S[:, 2]], -1), np.stack([S[:, 3], S[:, 2], S[:, 1]], -1),
         np.stack([S[:, 2], S[:, 1], S[:, 0]], -1)], 1
    )
    rhs = np.stack([T[:, 2], T[:, 1], T[:, 0]], -1)
    _, inv_idx = np.unique(x, return_inverse=True)
    distinct = np.zeros((W.shape[0], inv_idx.max() + 1))
    np.add.at(distinct.T, inv_idx, (W > 0).T.astype(float))
    enough = (distinct > 0).sum(1) >= min_sizes
    coef = np.full((W.shape[0], 3), np.nan)
    if enough.any():
        coef[enough] = np.linalg.solve(M[enough], rhs[enough][..., None])[..., 0]
    c2, c1, c0 = coef.T
    with np.errstate(all="ignore"):
        xs = -c1 / (2 * c2)
    lo = np.where(W > 0, xc, np.inf).min(1)
    hi = np.where(W > 0, xc, -np.inf).max(1)
    ok = enough & (c2 > 0) & (xs >= lo) & (xs <= hi)
    x_min = np.where(ok, xs + xm, np.nan)
    L_min = np.where(ok, c0 + c1 * xs + c2 * xs * xs, np.nan)
    # coefficients for the uncentred x, for plotting
    return x_min, L_min, (c2, c1 - 2 * c2 * xm, c0 - c1 * xm + c2 * xm * xm)


def _allocation_fit_batch(logC: np.ndarray, logN: np.ndarray, rule: ComputeRule) -> tuple[dict[str, np.ndarray],
                                                                                        np.ndarray]:
    """Per row of logN (k, G), least squares of log N_opt and log D_opt = log C - log k - g log N_opt on
    log C over the finite entries; NaN where fewer than 2. Returns (estimates, residuals of the N fit)."""
    ok = np.isfinite(logN)
    n = ok.sum(1)
    w = ok.astype(float)
    lc = np.broadcast_to(logC, logN.shape)
    with np.errstate(all="ignore"):
        mc = (w * lc).sum(1) / n
        ln = np.where(ok, logN, 0.0)
        mn = ln.sum(1) / n
        dc = np.where(ok, lc - mc[:, None], 0.0)
        a = (dc * (ln - mn[:, None])).sum(1) / (dc * dc).sum(1)
        cN = mn - a * mc
        good = (n >= 2) & np.isfinite(a)
        a, cN = np.where(good, a, np.nan), np.where(good, cN, np.nan)
        # log D_opt = log C - log k - g log N_opt is linear in the same points: slope 1 - g a
        b, cD = 1.0 - rule.g * a, -math.log(rule.k) - rule.g * cN
        est = {"k_N": np.exp(cN), "a": a, "k_D": np.exp(cD), "b": b}
        resid = np.where(ok, cN[:, None] + a[:, None] * lc - logN, np.nan)
    return est, resid


# --------------------------------------------------------------------------------------------
# Approach 3: parametric L(N, D)


def fit_approach3(
    runs: pd.DataFrame,
    *,
    params_col: str = DEFAULT_PARAMS_COL,
    delta: float = HUBER_DELTA,
    n_starts: int | None = 64,
    screen_iters: int = 20,
    bootstrap_starts: int = 3,
    budgets: Sequence[float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> FitResult:
    """Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta by Huber (delta) on log residuals.

    Hoffmann et al. 2022 / Besiroglu et al. 2024: log-sum-exp form, L-BFGS from the 4,500 starts of the
    REFERENCES §2 grid. With `n_starts` = k every start first takes `screen_iters` iterations on up to
    64 of the runs, and the k best continue to convergence on all runs; None runs every start to
    convergence (the original protocol; tens of seconds for 200 runs). The best is checked by scipy's
    L-BFGS-B. Bootstrap replicates (runs resampled with replacement) start from the point estimate plus
    `bootstrap_starts - 1` perturbed starts. Derived: a, b, G and N_opt, D_opt, tokens per parameter
    and L_opt at `budgets` under the runs' `ComputeRule` (C = 6 N D when their compute is counted so).
    """
    if bootstrap_starts < 1 or (n_starts is not None and n_starts < 1):
        raise FitError("approach 3 needs n_starts >= 1 (or None) and bootstrap_starts >= 1")
    if not (math.isfinite(delta) and delta > 0):  # 0 divided by zero; a negative one maximised the misfit
        raise FitError(f"approach 3 needs a Huber delta > 0 (Hoffmann et al.'s is {HUBER_DELTA:g}), got {delta}")
    _check_counts(n_bootstrap)
    budgets = _check_budgets(budgets)
    pts = _by_run(prepare_points(runs, params_col))
    n = len(pts)
    if n < 5:
        raise FitError(f"approach 3 has 5 parameters and needs at least 5 runs, got {n}")
    # E + A / N^alpha has three unknowns: two sizes (or two token counts) cannot pin them down.
    for col, what in (("N", "model sizes"), ("D", "token counts")):
        distinct = pts[col].nunique()
        if distinct < 3:
            raise FitError(f"approach 3 needs at least 3 distinct {what}; the {n} runs have {distinct}")
    if abs(np.corrcoef(np.log(pts["N"]), np.log(pts["D"]))[0, 1]) > 0.999:
        raise FitError(
            "approach 3 cannot tell the size term from the data term: N and D move together in these runs "
            "(one compute budget?); add runs of other token counts at the same sizes"
        )
    rule = ComputeRule.fit(pts["N"], pts["D"], pts["C"])  # before the fit: FLOPs it refuses fail at once
    obj = _Approach3Objective(
        np.log(pts["N"].to_numpy()), np.log(pts["D"].to_numpy()), np.log(pts["L"].to_numpy()), delta
    )
    grid = obj.grid_starts()
    starts = grid
    if n_starts is not None and n_starts < len(grid):
        # A short run from every start says which basins are worth finishing; a subset of the runs is
        # enough to rank them and keeps this step's cost independent of the number of runs.
        Xs, Fs, _ = lbfgs_batch(obj.subset(SCREEN_POINTS).batch, grid, max_iter=screen_iters)
        starts = Xs[np.argsort(np.where(np.isfinite(Fs), Fs, np.inf), kind="stable")[:n_starts]]
    X, F, conv = lbfgs_batch(obj.batch, starts)
    best_i = int(np.argmin(F))
    # scipy's L-BFGS-B restarted at the batched optimum is an independent check: it must find nothing
    # better (it often ends "ABNORMAL" there, because no step can decrease the objective any more).
    ref = obj.minimize(X[best_i])
    theta = ref.x if ref.fun < F[best_i] else X[best_i]
    f_best = min(float(ref.fun), float(F[best_i]))
    scipy_gain = float(F[best_i] - ref.fun)
    # A start "agrees" when it reaches the best objective to 1e-6 relative: evidence of a global optimum.
    agree = int(np.sum(np.abs(F - f_best) <= 1e-6 * max(abs(f_best), 1.0)))
    grad = obj(theta)[1]
    converged = bool(conv[best_i]) and scipy_gain <= 1e-8 * max(abs(f_best), 1.0) and agree >= 2
    estimates = obj.estimates(theta)
    _check_falling(estimates)

    samples, boot_conv, stopped = None, 0, {}
    if n_bootstrap:
        boot, solved, boot_conv = _bootstrap_approach3(obj, theta, n_bootstrap, bootstrap_starts, seed, progress)
        samples = pd.DataFrame(
            [obj.estimates(t) if np.all(np.isfinite(t)) else {} for t in boot[solved]], columns=list(estimates)
        )
        stopped = _stopped_after(int(solved.sum()), n_bootstrap)
    budgets = list(budgets) if budgets else allocation_budgets(pts["C"])
    estimates, samples = _with_allocation(estimates, samples, budgets, rule)
    law = [estimates[k] for k in ("E", "A", "B", "alpha", "beta")]
    # where a constant overflows (B = exp(1000) at beta 52), from the fitted logs: inf x 0 had made it NaN
    pred = (chinchilla_law(pts["N"].to_numpy(), pts["D"].to_numpy(), *law) if np.all(np.isfinite(law))
            else obj.predict(theta))
    return _check_bootstrap(FitResult(
        method="approach3",
        formula="L = E + A / N^alpha + B / D^beta",
        estimates=estimates,
        intervals=_intervals(samples),
        residuals=np.log(pred) - np.log(pts["L"].to_numpy()),
        points=pts.assign(L_fit=pred),
        n_points=n,
        n_bootstrap=n_bootstrap,
        converged=converged,
        details={
            "objective": f_best,
            "grad_norm": float(np.linalg.norm(grad)),
            "scipy_check_gain": scipy_gain,
            "scipy_message": str(ref.message),
            "n_starts": int(len(starts)),
            "n_grid": int(len(grid)),
            "n_starts_agreeing": agree,
            "delta": delta,
            "bootstrap_converged": int(boot_conv),
            "budgets": budgets,
            "compute": asdict(rule),
            **stopped,
            **_note_at_bound(obj, theta),
        },
        samples=samples,
    ))


def _bootstrap_approach3(obj, theta, n_bootstrap, n_starts, seed, progress, max_elems=100_000):
    """Bootstrap replicates as multinomial weights on the runs (the same as resampling them), solved in
    batches; returns (parameter rows, which replicates were solved, number of replicates whose best start converged).
    Replicates are solved until more than half of the `n_bootstrap` have failed (`_mostly_failed`), then left NaN."""
    rng = np.random.default_rng(seed)
    n = len(obj.t)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)
    scale = np.array([1.0, 1.0, 0.3, 0.1, 0.1])
    # Replicates reweight the same runs, so their curvature is near the point estimate's: started from it, L-BFGS needs
    # about a fifth of the evaluations it needs from a scalar matrix (the replicates' optima agree to ~1e-6).
    H0 = _inverse_hessian(obj, theta)
    starts = np.repeat(theta[None, :], n_bootstrap * n_starts, axis=0).reshape(n_bootstrap, n_starts, 5)
    starts[:, 1:] += scale * rng.standard_normal((n_bootstrap, n_starts - 1, 5))
    out = np.full((n_bootstrap, 5), np.nan)
    solved = np.zeros(n_bootstrap, bool)
    n_conv = n_failed = 0
    # batches small enough to stay in cache, large enough to amortise the Python loop
    per_batch = max(32, max_elems // (n * n_starts))
    for s in range(0, n_bootstrap, per_batch):
        e = min(n_bootstrap, s + per_batch)
        X0 = starts[s:e].reshape(-1, 5)
        Wb = np.repeat(W[s:e], n_starts, axis=0)
        # The batches stay as they were: problems solved together round differently when grouped otherwise, so smaller
        # batches would change the replicates of a bootstrap that does not stop. Within a batch a replicate's failure
        # (its best start's law unusable, as _check_bootstrap judges it) is known once all its starts have stopped,
        # which the solver reports as they do: the batch stops there once most of all replicates have failed.
        tracker = _FailureTracker(obj, e - s, n_starts, n_bootstrap, n_failed)
        X, F, conv = lbfgs_batch(obj.batch, X0, Wb, H0=H0, on_finish=tracker)
        F = np.where(np.isfinite(F), F, np.inf).reshape(e - s, n_starts)
        pick = np.argmin(F, axis=1)
        rows = np.arange(e - s) * n_starts + pick
        # a stopped batch's unfinished replicates hold an iterate, not a solution: left NaN, and not solved
        ok = np.isfinite(F[np.arange(e - s), pick]) & tracker.done
        out[s:e][ok] = X[rows][ok]
        solved[s:e] = tracker.done
        n_conv += int(conv[rows][ok].sum())
        if tracker.stopped:
            break
        # replicates stopped by the iteration limit are not reported by lbfgs_batch: counted here, all of them at once
        n_failed += sum(_theta_failed(obj, t) for t in out[s:e])
        if progress:
            progress(e, n_bootstrap)
        if _mostly_failed(n_failed, n_bootstrap):
            break
    return out, solved, n_conv


def _theta_failed(obj: "_Approach3Objective", t: np.ndarray) -> bool:
    """Whether a replicate solved at t counts as failed in `_check_bootstrap` (fit_approach3 makes NaN samples of a t
    that is not finite)."""
    return not np.all(np.isfinite(t)) or _replicate_failed(obj.estimates(t))


class _FailureTracker:
    """`lbfgs_batch`'s on_finish for a batch of bootstrap replicates of `n_starts` starts each: counts the replicates
    that fail as their last start stops, and says stop once `failed_before` and these are most of `n_bootstrap`."""

    def __init__(self, obj: "_Approach3Objective", n_replicates: int, n_starts: int, n_bootstrap: int,
                 failed_before: int):
        self.obj, self.n_starts, self.n_bootstrap = obj, n_starts, n_bootstrap
        self.left = np.full(n_replicates, n_starts)  # starts still running, per replicate
        self.failed = failed_before
        self.stopped = False

    @property
    def done(self) -> np.ndarray:
        """The replicates every start of which stopped (all of them, unless the batch was stopped early)."""
        return self.left == 0 if self.stopped else np.ones(len(self.left), bool)

    def __call__(self, idx: np.ndarray, X: np.ndarray, F: np.ndarray) -> bool:
        reps = idx // self.n_starts
        np.subtract.at(self.left, reps, 1)
        for r in np.unique(reps[self.left[reps] == 0]):
            # the replicate's best start as _bootstrap_approach3 picks it (argmin: the first of equal ones)
            Fr = F[r * self.n_starts:(r + 1) * self.n_starts]
            best = int(np.argmin(np.where(np.isfinite(Fr), Fr, np.inf)))
            self.failed += not np.isfinite(Fr[best]) or _theta_failed(self.obj, X[r * self.n_starts + best])
        self.stopped = _mostly_failed(self.failed, self.n_bootstrap)
        return self.stopped


def _inverse_hessian(obj: "_Approach3Objective", theta: np.ndarray) -> np.ndarray | None:
    """The inverse Hessian of the unweighted objective at theta, by central differences of its analytic gradient;
    None where that Hessian is not positive definite (theta at a kink or in a flat valley)."""
    p = theta.size
    h = 1e-6 * np.maximum(1.0, np.abs(theta))
    with np.errstate(all="ignore"):
        _, G = obj.batch(np.vstack([theta + np.diag(h), theta - np.diag(h)]))
    H = (G[:p] - G[p:]) / (2 * h[:, None])
    H = 0.5 * (H + H.T)
    if not np.all(np.isfinite(H)):
        return None
    eig = np.linalg.eigvalsh(H)
    if not eig[0] > 1e-12 * eig[-1]:
        return None
    return np.linalg.inv(H)


def lbfgs_batch(
    fun: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]],
    X0: np.ndarray,
    W: np.ndarray | None = None,
    *,
    memory: int = 10,
    max_iter: int = 1000,
    ftol: float = 1e-13,
    gtol: float = 1e-9,
    H0: np.ndarray | None = None,
    on_finish: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise many independent smooth problems at once with L-BFGS and a backtracking Armijo search.

    `fun(X, W)` returns the objectives (k,) and gradients (k, p) of rows X (k, p) with data weights W
    (k, n). One numpy call serves every problem, which is what makes 1,000 bootstrap fits take
    seconds; scipy's L-BFGS-B is the reference it is tested against. Returns (X, F, converged).
    `H0` (p, p), an inverse Hessian shared by the problems, replaces the usual scalar initial matrix.
    `on_finish(idx, X, F)`, told the problems that stop (converged or not) before the iteration limit, their rows of X
    and F final, may return True to stop all at once: the problems left keep their last iterate, not converged.
    """
    X_out = np.array(X0, dtype=float)
    k, p = X_out.shape
    with np.errstate(all="ignore"):
        F_out, G0 = fun(X_out, W)
    F_out = np.where(np.isfinite(F_out), F_out, np.inf)
    conv_out = np.zeros(k, bool)
    # The working set holds the unfinished problems only, compacted as problems finish, so that a
    # few slow problems do not pay for the whole batch.
    startable = np.isfinite(F_out) & np.all(np.isfinite(G0), axis=1)
    work = np.flatnonzero(startable)
    if on_finish is not None and not startable.all() and on_finish(np.flatnonzero(~startable), X_out, F_out):
        return X_out, F_out, conv_out
    x, f, g = X_out[work], F_out[work], G0[work]
    w = None if W is None else W[work]
    S = np.zeros((memory, work.size, p))
    Y = np.zeros((memory, work.size, p))
    RHO = np.zeros((memory, work.size))  # 0 marks an empty or rejected pair
    gamma = np.ones(work.size)
    for it in range(max_iter):
        if work.size == 0:
            break
        q = g.copy()
        alphas = []
        for j in [(it - 1 - i) % memory for i in range(memory)]:  # newest to oldest
            a = RHO[j] * np.einsum("ij,ij->i", S[j], q)
            q -= a[:, None] * Y[j]
            alphas.append((j, a))
        r = gamma[:, None] * q if H0 is None else q @ H0
        for j, a in reversed(alphas):
            b = RHO[j] * np.einsum("ij,ij->i", Y[j], r)
            r += S[j] * (a - b)[:, None]
        d = -r
        gd = np.einsum("ij,ij->i", g, d)
        bad = ~(gd < 0) | ~np.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent
            d[bad] = -g[bad]
            gd[bad] = -np.einsum("ij,ij->i", g[bad], g[bad])
            RHO[:, bad] = 0.0
            gamma[bad] = 1.0
        t = np.ones(work.size)
        fresh = ~np.any(RHO != 0, axis=0)
        if H0 is not None:  # its direction is scaled already; steepest descent after a restart is not
            fresh &= bad
        t[fresh] = np.minimum(1.0, 1.0 / np.maximum(np.abs(g[fresh]).sum(1), 1e-300))
        xn = x + t[:, None] * d
        with np.errstate(all="ignore"):
            fn, gn = fun(xn, w)
        ok = np.isfinite(fn) & (fn <= f + 1e-4 * t * gd)
        for _ in range(60):
            rej = np.flatnonzero(~ok)
            if rej.size == 0:
                break
            t[rej] *= 0.3
            xn[rej] = x[rej] + t[rej, None] * d[rej]
            with np.errstate(all="ignore"):
                fr, gr = fun(xn[rej], None if w is None else w[rej])
            fn[rej], gn[rej] = fr, gr
            ok[rej] = np.isfinite(fr) & (fr <= f[rej] + 1e-4 * t[rej] * gd[rej])
        s_ = xn - x
        y_ = gn - g
        sy = np.einsum("ij,ij->i", s_, y_)
        yy = np.einsum("ij,ij->i", y_, y_)
        valid = ok & (yy > 0) & (sy > 1e-10 * np.sqrt(np.einsum("ij,ij->i", s_, s_) * yy))
        slot = it % memory
        S[slot], Y[slot] = s_, y_
        RHO[slot] = np.where(valid, 1.0 / np.where(valid, sy, 1.0), 0.0)
        gamma[valid] = sy[valid] / yy[valid]
        f_old = f
        x = np.where(ok[:, None], xn, x)
        f = np.where(ok, fn, f)
        g = np.where(ok[:, None], gn, g)
        scale = np.maximum(np.maximum(np.abs(f_old), np.abs(f)), 1.0)
        small_grad = np.abs(g).max(1) <= gtol * scale
        done = (ok & ((f_old - f) <= ftol * scale)) | small_grad
        # a failed search means no step decreases f at this precision: stop there
        finished = done | ~ok
        if finished.any():
            idx = work[finished]
            X_out[idx], F_out[idx] = x[finished], f[finished]
            conv_out[idx] = done[finished]
            keep = ~finished
            work, x, f, g, gamma = work[keep], x[keep], f[keep], g[keep], gamma[keep]
            S, Y, RHO = S[:, keep], Y[:, keep], RHO[:, keep]
            w = None if w is None else w[keep]
            if on_finish is not None and on_finish(idx, X_out, F_out):
                break
    X_out[work], F_out[work] = x, f
    return X_out, F_out, conv_out


def _with_allocation(est, samples, budgets, rule: ComputeRule = ComputeRule()):
    """Add a, b, G and N_opt, D_opt, tokens per parameter, L_opt at each budget (a, b: exponents of N_opt and
    D_opt in C under `rule`; G as Hoffmann et al. define it)."""

    def derive(E, A, B, alpha, beta):
        out = {"a": beta / (alpha + rule.g * beta), "b": alpha / (alpha + rule.g * beta)}
        # np.power, as in optimal_allocation: a fit with a negative exponent gives NaN here, never a complex number.
        out["G"] = np.power(alpha * A / (beta * B), 1.0 / (alpha + beta))
        for C in budgets:
            N, D = optimal_allocation(C, A, B, alpha, beta, rule)
            out[f"N_opt@{C:.3g}"] = N
            out[f"D_opt@{C:.3g}"] = D
            out[f"tokens_per_param@{C:.3g}"] = D / N
            out[f"L_opt@{C:.3g}"] = chinchilla_law(N, D, E, A, B, alpha, beta)
        return out

    def falling(E, A, B, alpha, beta):
        # Python floats raised ZeroDivisionError at alpha + beta = 0; and with both exponents negative every ratio
        # above came out finite, an allocation for a law whose loss rises with size and data.
        E, A, B, alpha, beta = (np.asarray(v, float) for v in (E, A, B, alpha, beta))
        out = derive(E, A, B, alpha, beta)
        bad = ~((alpha > 0) & (beta > 0))
        # an overflowed constant (B = inf at beta 52) had given N_opt = 0 and D_opt = inf, read as numbers; a and b
        # need the exponents alone
        over = ~(np.isfinite(E) & np.isfinite(A) & np.isfinite(B))
        return {k: np.where(bad | (over & (k not in ("a", "b"))), np.nan, v) for k, v in out.items()}

    names = ("E", "A", "B", "alpha", "beta")
    with np.errstate(all="ignore"):
        est = {**est, **{k: float(v) for k, v in falling(*(est[k] for k in names)).items()}}
        if samples is not None:
            samples = samples.assign(**falling(*(samples[k].to_numpy() for k in names)))
    return est, samples


#: Approach 3's optimiser has no explicit bounds, but its parameterisation has: E, A and B = exp(e, a, b) are bounded
#: below by 0, which they reach only as their logarithm runs off towards -inf until the gradient vanishes (E = 3e-16
#: on runs of a law without E), and alpha and beta by 0, which `_check_falling` requires them to exceed and which they
#: approach as their term flattens into a constant. A constant whose term is below this share of the fitted loss at
#: every run is taken to sit at its bound.
AT_BOUND_SHARE = 1e-3
#: An exponent whose power (N^-alpha, D^-beta) changes by less than this fraction across the runs' sizes (token counts)
#: is taken to sit at its bound 0: its term is a constant there, a second E. Flat fits found with alpha or beta near 0
#: changed theirs by under 1%; laws the runs do identify change theirs by a factor of several.
AT_BOUND_CHANGE = 0.05


def _note_at_bound(obj: "_Approach3Objective", theta: np.ndarray) -> dict[str, str]:
    """details["at_bound"]: which approach-3 estimates sit at a bound of their parameterisation (E, A or B at 0, alpha
    or beta at 0) and what that leaves unestimated; nothing where none does."""
    est = obj.estimates(theta)
    share = obj.term_shares(theta).max(axis=1)  # each term's largest share of the fitted loss over the runs
    notes = _floor_at_bound(est["E"], share[2], "every run")
    for i, const, exp, var, x, what in ((0, "A", "alpha", "N", obj.x, "model sizes"),
                                        (1, "B", "beta", "D", obj.y, "token counts")):
        if share[i] < AT_BOUND_SHARE:
            notes.append(f"{const} = {est[const]:.3g} sits at its lower bound 0 ({const} / {var}^{exp} is under "
                         f"{AT_BOUND_SHARE:.1%} of the fitted loss at every run): that term has vanished, so {exp} is "
                         "not estimated, nor is the allocation that follows from it")
        notes += _flat_at_bound(exp, est[exp], float(np.ptp(x)), var, f"the runs' {what}", f"{const} / {var}^{exp}",
                                "a second constant beside E", "the allocation that follows from it (a, b, N_opt)")
    return {"at_bound": "; ".join(notes)} if notes else {}


def _note_frontier_at_bound(estimates: Mapping[str, float], C: np.ndarray, L_fit: np.ndarray) -> dict[str, str]:
    """details["at_bound"] for a loss-compute fit, by approach 3's rules: E at its lower bound 0 (saturating form), or
    alpha so near 0 that C^-alpha is flat over the frontier's compute; nothing where neither is."""
    notes = []
    if "E" in estimates:  # the saturating form's floor, as approach 3's E
        notes += _floor_at_bound(estimates["E"], float(np.max(estimates["E"] / L_fit)), "every frontier point")
    beside = "a second constant beside E" if "E" in estimates else "a constant: the law is flat"
    notes += _flat_at_bound("alpha", estimates["alpha"], float(np.ptp(np.log(C))), "C", "the frontier's compute",
                            "A C^-alpha", beside, "the gaps and compute multipliers that follow from it")
    return {"at_bound": "; ".join(notes)} if notes else {}


def _floor_at_bound(E: float, share: float, where: str) -> list[str]:
    """The note on a floor E at its lower bound 0, where its largest ``share`` of the fitted loss (at ``where``) is
    under AT_BOUND_SHARE; none otherwise."""
    if share >= AT_BOUND_SHARE:
        return []
    return [f"E = {E:.3g} sits at its lower bound 0 (under {AT_BOUND_SHARE:.1%} of the fitted loss at {where}): the "
            "fit found no floor under the loss, so E is pinned there, not estimated"]


def _flat_at_bound(exp: str, value: float, log_span: float, var: str, across: str, term: str, flat_as: str,
                   lost: str) -> list[str]:
    """The note on an exponent at its lower bound 0, where ``var``^-``exp`` changes by under AT_BOUND_CHANGE over
    ``log_span`` (the spread of log ``var`` in the data); none otherwise."""
    change = -math.expm1(-value * log_span)  # how far var^-exp falls over the data
    if not (value > 0 and change < AT_BOUND_CHANGE):
        return []
    return [f"{exp} = {value:.3g} sits at its lower bound 0 ({var}^-{exp} changes by {change:.2%} across {across}): "
            f"{term} is {flat_as}, so {exp} and {lost} are not estimated"]


def _check_falling(est: Mapping[str, float]) -> None:
    """A FitError for an approach-3 fit whose loss does not fall with both size and data (an exponent <= 0): it
    has no compute-optimal allocation, and a, b, G and N_opt would be NaN or meaningless."""
    bad = [(k, what) for k, what in (("alpha", "model size"), ("beta", "tokens")) if not est[k] > 0]
    if bad:
        raise FitError(
            f"approach 3's best fit has {' and '.join(f'{k} = {est[k]:.3g}' for k, _ in bad)}: in these runs loss "
            f"does not fall as {' and '.join(w for _, w in bad)} grow{'s' if len(bad) == 1 else ''} (flat or rising "
            "losses?), so there is no compute-optimal allocation to report")


class _Approach3Objective:
    """Sum of Huber(LSE(a - alpha x, b - beta y, e) - log L) / delta^2 with its analytic gradient.

    x and y are centred log N and log D so the optimiser sees a well-conditioned problem; `estimates`
    maps back to the original (a, b) = log A, log B. Dividing by delta^2 keeps the objective scale the
    same for any delta, so the tolerances mean the same thing.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, logL: np.ndarray, delta: float,
                 center: tuple[float, float] | None = None):
        self.xm, self.ym = center if center is not None else (float(x.mean()), float(y.mean()))
        self.x, self.y, self.t, self.delta = x - self.xm, y - self.ym, logL, delta

    def subset(self, max_points: int) -> "_Approach3Objective":
        """The same objective (same parameterisation) on at most `max_points` evenly chosen runs."""
        n = len(self.t)
        if n <= max_points:
            return self
        i = np.unique(np.linspace(0, n - 1, max_points).astype(int))
        return _Approach3Objective(self.x[i] + self.xm, self.y[i] + self.ym, self.t[i], self.delta, (self.xm, self.ym))

    def batch(self, TH: np.ndarray, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Objectives (k,) and gradients (k, 5) for parameter rows TH (k, 5) and run weights W (k, n)."""
        # The (k, n) arrays are worked on in place: the grid screen calls this hundreds of times on 4,500 x 64
        # arrays, and a fresh temporary for every operation made allocation and page faults a good part of the fit.
        # Every value is the same operation on the same operands as `_batch_reference`'s, so the results are equal.
        a, b, e, alpha, beta = (TH[:, i : i + 1] for i in range(5))
        u1 = np.multiply(alpha, self.x)
        np.subtract(a, u1, out=u1)  # a - alpha x
        u2 = np.multiply(beta, self.y)
        np.subtract(b, u2, out=u2)  # b - beta y
        m = np.maximum(u1, u2)
        np.maximum(m, e, out=m)
        e1 = np.exp(np.subtract(u1, m, out=u1), out=u1)
        e2 = np.exp(np.subtract(u2, m, out=u2), out=u2)
        e3 = np.subtract(e, m)
        np.exp(e3, out=e3)
        s = np.add(e1, e2)
        s += e3
        r = np.log(s)
        np.add(m, r, out=r)
        r -= self.t  # m + log(s) - t
        d = self.delta
        ar = np.abs(r, out=m)
        h = np.multiply(0.5, r)
        h *= r
        h /= d  # 0.5 r^2 / d
        quad = ar <= d
        np.subtract(ar, 0.5 * d, out=ar)
        np.copyto(ar, h, where=quad)  # Huber: quadratic within d, linear beyond
        h = ar
        h /= d
        g = np.divide(r, d, out=r)
        np.clip(g, -1.0, 1.0, out=g)
        s *= d
        g /= s  # clip(r / d) / (d s)
        if W is not None:
            h *= W
            g *= W
        e1 *= g
        e2 *= g
        e3 *= g
        grad = np.column_stack([e1.sum(1), e2.sum(1), e3.sum(1), -(e1 @ self.x), -(e2 @ self.y)])
        return h.sum(1), grad

    def _batch_reference(self, TH: np.ndarray, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`batch` written plainly, one expression per quantity: the reference its tests compare it with."""
        a, b, e, alpha, beta = (TH[:, i : i + 1] for i in range(5))
        u1 = a - alpha * self.x
        u2 = b - beta * self.y
        m = np.maximum(np.maximum(u1, u2), e)
        e1, e2, e3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(e - m)
        s = e1 + e2 + e3
        r = m + np.log(s) - self.t
        ar = np.abs(r)
        d = self.delta
        h = np.where(ar <= d, 0.5 * r * r / d, ar - 0.5 * d) / d
        g = np.clip(r / d, -1.0, 1.0) / (d * s)
        if W is not None:
            h = h * W
            g = g * W
        g1, g2 = g * e1, g * e2
        grad = np.column_stack([g1.sum(1), g2.sum(1), (g * e3).sum(1), -(g1 @ self.x), -(g2 @ self.y)])
        return h.sum(1), grad

    def __call__(self, th: np.ndarray, w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        F, G = self.batch(np.asarray(th, float)[None, :], None if w is None else w[None, :])
        return float(F[0]), G[0]

    def grid_starts(self) -> np.ndarray:
        """The REFERENCES §2 grid, converted to the centred parameterisation."""
        A_, B_, E_, al, be = np.meshgrid(GRID_AB, GRID_AB, GRID_E, GRID_ALPHA, GRID_ALPHA, indexing="ij")
        A_, B_, E_, al, be = (v.ravel() for v in (A_, B_, E_, al, be))
        return np.column_stack([A_ - al * self.xm, B_ - be * self.ym, E_, al, be])

    def minimize(self, start: np.ndarray, w: np.ndarray | None = None):
        """scipy's L-BFGS-B from one start: the reference optimiser."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return minimize(
                self, np.asarray(start, float), args=(w,), jac=True, method="L-BFGS-B",
                options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-14},
            )

    def term_shares(self, th: np.ndarray) -> np.ndarray:
        """Each term's share of the law's loss at each run, (3, n) for A / N^alpha, B / D^beta and E; in logs, so
        finite where A or B overflow."""
        a, b, e, alpha, beta = (float(v) for v in th)
        u = np.stack([a - alpha * self.x, b - beta * self.y, np.full_like(self.x, e)])
        return np.exp(u - np.logaddexp.reduce(u, axis=0))

    def predict(self, th: np.ndarray) -> np.ndarray:
        """The law's loss at each run, exp(LSE(a - alpha x, b - beta y, e)), finite where A or B overflow."""
        a, b, e, alpha, beta = (float(v) for v in th)
        return np.exp(np.logaddexp.reduce([a - alpha * self.x, b - beta * self.y, np.full_like(self.x, e)]))

    def estimates(self, th: np.ndarray) -> dict[str, float]:
        a, b, e, alpha, beta = (float(v) for v in th)
        return {
            "E": _safe_exp(e),
            "A": _safe_exp(a + alpha * self.xm),
            "B": _safe_exp(b + beta * self.ym),
            "alpha": alpha,
            "beta": beta,
        }


# --------------------------------------------------------------------------------------------
# Helpers


def _check_bootstrap(result: FitResult) -> FitResult:
    """Count the replicates that could not be fitted or gave no usable law (failing them), note estimates that are not
    finite, and leave the intervals unknown when failed replicates are most of them."""
    _note_not_finite(result)
    s = result.samples
    if s is None or s.empty:
        return result
    # A replicate whose law does not fall (an exponent <= 0) is one the data itself would be refused for
    # (`_check_falling`), and one whose constant overflows has no allocation: each fails as a whole. Kept, they had
    # widened alpha's interval while a, b and N_opt (NaN for them) were drawn from the others alone, uncounted.
    # Approaches 1 and 2 have no loss exponents, but their k_N and k_D overflow as approach 3's A and B do.
    unusable = np.broadcast_to(_unusable(s), len(s))
    if unusable.any():
        s = s.copy()
        s.loc[unusable, :] = np.nan
        result.samples, result.intervals = s, _intervals(s)
        result.details["bootstrap_unusable"] = int(unusable.sum())
    failed = int(s.isna().all(axis=1).sum())
    result.details["bootstrap_failed"] = failed
    # A bootstrap stopped early (`_mostly_failed`) ran fewer replicates than were asked for; its majority is of those.
    stopped = result.details.get("bootstrap_stopped_after")
    total = result.n_bootstrap if stopped is not None else len(s)
    # The replicates that fit are those whose resampled runs still identify the law: when they are a minority
    # their spread is not the estimate's (with 3 runs, the only one that fits is the data itself: zero width).
    if _mostly_failed(failed, total):
        why = (f", {int(unusable.sum())} of them with a law whose loss does not fall or whose constant overflows"
               if unusable.any() else "")
        # a stopped bootstrap's samples are the replicates it ran: len(s) is `stopped` there
        when = ("" if stopped is None else f" when the bootstrap stopped, {stopped} of the {total} asked for: more "
                f"than half of all {total} fail whatever the others give")
        note = (f"{failed} of {len(s)} bootstrap replicates could not be fitted (their resampled runs do not "
                f"identify the law{why}){when}, so the intervals, which would rest on the rest, are unknown")
        result.intervals = {k: (math.nan, math.nan) for k in result.intervals}
        result.details["intervals_unknown"] = note
        log.info("%s: %s", result.method, note)  # callers show details (slab fit prints it, the report's tables say so)
    return result


def _stopped_after(done: int, n_bootstrap: int) -> dict[str, int]:
    """details["bootstrap_stopped_after"]: how many replicates ran, where a bootstrap stopped before all it was asked
    for (nothing where it ran them all)."""
    return {"bootstrap_stopped_after": int(done)} if done < n_bootstrap else {}


def _mostly_failed(failed: int, total: int) -> bool:
    """Whether `failed` of `total` requested replicates are more than half: the intervals are then unknown, however
    the others turn out, so a bootstrap may stop at the replicate that makes it so."""
    return 2 * failed > total


def _unusable(values: Mapping[str, Any] | pd.DataFrame):
    """Per replicate (a samples frame's rows, or one replicate's estimates as a dict), whether its law is one a fit
    refuses: an exponent <= 0 or a constant that overflows (NaN is neither)."""
    bad: Any = False
    for c in ("alpha", "beta"):
        if c in values:
            bad = bad | (np.asarray(values[c], float) <= 0)
    for c in LAW_CONSTANTS:
        if c in values:
            bad = bad | np.isinf(np.asarray(values[c], float))
    return bad


def _replicate_failed(estimates: Mapping[str, float]) -> bool:
    """Whether one replicate's estimates count as failed in `_check_bootstrap`: none is a number, or its law is
    unusable."""
    values = np.asarray(list(estimates.values()), float)
    return bool(np.isnan(values).all() or _unusable(estimates))


#: Each law constant that is the exponential of a fitted intercept, with the exponent it grows with.
LAW_CONSTANTS = {"E": None, "A": "alpha", "B": "beta", "k_N": "a", "k_D": "b"}


def _note_not_finite(result: FitResult) -> None:
    """Say in details["not_finite"] which estimates are not finite numbers, and why (slab fit prints it)."""
    bad = [k for k, v in result.estimates.items() if not math.isfinite(v)]
    if not bad:
        return
    e = result.estimates
    over = [f"{k} overflows a float ({x} = {e[x]:.3g})" if x in e else f"{k} overflows a float"
            for k, x in LAW_CONSTANTS.items() if k in e and math.isinf(e[k])]
    why = ("; ".join(over) + ": a law this steep fits the runs as a step, and what derives from it is undefined"
           if over else "they are undefined at these estimates")
    result.details["not_finite"] = f"{_some(bad)} {'is' if len(bad) == 1 else 'are'} not finite: {why}"


def _intervals(samples: pd.DataFrame | None, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals per column, ignoring failed (NaN) replicates."""
    if samples is None or samples.empty:
        return {}
    return {c: percentile_interval(samples[c].to_numpy(), level) for c in samples.columns}


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (NaN dropped; infinities allowed)."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    q = (1 - level) / 2
    # inverted_cdf never interpolates, so an infinite replicate cannot turn an endpoint into NaN.
    lo, hi = np.quantile(v, [q, 1 - q], method="inverted_cdf")
    return (float(lo), float(hi))


def _check_counts(n_bootstrap: int, **counts: int) -> None:
    """A FitError for a negative bootstrap count (numpy had raised on a negative shape, or the fit ran none) or a count
    below 1 among ``counts`` (such as n_bins)."""
    if not n_bootstrap >= 0:
        raise FitError(f"n_bootstrap must be 0 (no intervals) or more, got {n_bootstrap}")
    for name, v in counts.items():
        if not v >= 1:
            raise FitError(f"{name} must be at least 1, got {v}")


def _check_budgets(budgets: Sequence[float] | None) -> list[float] | None:
    """The allocation budgets as floats, None where none were given; a budget that is not a positive finite number
    is a FitError (its N_opt, D_opt and tokens per parameter had come out NaN, under a key such as 'N_opt@-1')."""
    if budgets is None:
        return None
    out = [float(C) for C in budgets]
    bad = [C for C in out if not (math.isfinite(C) and C > 0)]
    if bad:
        raise FitError(f"budgets must be positive numbers of FLOPs, got {_some(bad)}")
    return out or None


def _safe_exp(v: float) -> float:
    return math.exp(v) if v < 709 else math.inf


def _numeric(s: pd.Series, name: str) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)


def _check_positive(v: np.ndarray, run_id: np.ndarray, name: str) -> None:
    bad = ~(np.isfinite(v) & (v > 0))
    if bad.any():
        raise FitError(f"{bad.sum()} run(s) have a missing or non-positive {name}: {_some(run_id[bad])}")


def _some(items, k: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _json_num(v) -> float | int | None:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _json_clean(obj):
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (str, bool, np.bool_)) or obj is None:
        return bool(obj) if isinstance(obj, np.bool_) else obj
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return _json_num(obj)
    return str(obj)


def _frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``df`` as JSON-clean dicts, as `_json_clean` makes each value; float, int and bool columns are
    converted a column at a time (value by value, a 12,000-run report's fit points took half a second)."""
    if not df.columns.is_unique:
        return [{str(k): _json_clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    fast = {k for k in df.columns if df[k].dtype.kind in "fiub" and isinstance(df[k].dtype, np.dtype)}
    slow = [k for k in df.columns if k not in fast]
    records = df[slow].to_dict(orient="records") if slow else []
    cols = {k: [_json_clean(r[k]) for r in records] for k in slow}
    for k in fast:
        v = df[k].to_numpy()
        values = v.tolist()
        if v.dtype.kind == "f":  # NaN and infinities become None, as _json_num makes them
            for i in np.flatnonzero(~np.isfinite(v)):
                values[i] = None
        cols[k] = values
    names = [str(k) for k in df.columns]
    return [dict(zip(names, row)) for row in zip(*(cols[k] for k in df.columns))]

"""Scaling-curve report: fits per architecture, figures (PNG and SVG), `report.md` and one
self-contained `index.html` (figures embedded as base64 PNG, no external references)."""

from __future__ import annotations

import base64
import errno
import html
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from analysis.compare import (  # noqa: E402
    MIN_BOOTSTRAP_RUNS,
    ArchComparison,
    arch_names,
    arch_seed,
    beyond_context_names,
    compare_archs,
    few_runs,
    fit_on_runs,
    fit_per_arch,
    fmt_number,
    loss_table,
    mqar_table,
    niah_grid,
    niah_table,
    ratio_label,
    seed_study_findings,
    size_label,
    summary_findings,
    throughput_sizes,
    throughput_table,
    unknown_on_few_runs,
)
from analysis.fits import (  # noqa: E402
    CLI_BOOTSTRAP,
    DEFAULT_PARAMS_COL,
    ComputeRule,
    FitError,
    FitResult,
    Progress,
    allocation_budgets,
    done_runs,
    fit_approach1,
    fit_approach2,
    fit_approach3,
    loss_compute_law,
    optimal_allocation,
    prepare_points,
)

# Okabe & Ito's colour-blind-safe palette; fixed colours per arch keep figures comparable.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ARCH_COLOURS = {
    "softmax": "#0072B2", "lightning": "#D55E00", "hybrid": "#009E73", "hgrn2": "#E69F00", "mamba2": "#CC79A7",
}
SEQUENTIAL = "viridis"  # perceptually uniform and colour-blind safe
# Text as text in SVGs (smaller, faster) and a fixed hash salt so that SVG ids are reproducible.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "scalinglab", "font.size": 9, "axes.titlesize": 9,
       "legend.fontsize": 7, "xtick.labelsize": 7.5, "ytick.labelsize": 7.5, "figure.dpi": 100}

FIT_METHODS = ("frontier", "frontier_power", "approach1", "approach2", "approach3")
#: The documents a report writes beside figures/: its Markdown, its self-contained HTML and its fits.
DOCUMENTS = ("report.md", "index.html", "fits.json")
#: The figures a report draws, in its order; each is figures/NAME.png and NAME.svg.
FIGURES = ("loss_vs_tokens", "loss_vs_compute", "isoflop", "optimal_allocation", "residuals", "niah", "mqar", "throughput")
TABLE_PARAMS = {
    "frontier": ["E", "A", "alpha"],
    "frontier_power": ["A", "alpha"],
    "approach1": ["a", "b", "k_N", "k_D"],
    "approach2": ["a", "b", "k_N", "k_D"],
    "approach3": ["E", "A", "B", "alpha", "beta", "a", "b"],
}
METHOD_TITLES = {
    "frontier": "Loss vs compute on the frontier: L = E + A C^-alpha (C in FLOPs, L in nats)",
    "frontier_power": "Loss vs compute on the frontier, pure power law: L = A C^-alpha (C in FLOPs, L in nats)",
    "approach1": "Chinchilla approach 1 (envelope of training curves): N_opt = k_N C^a, D_opt = k_D C^b",
    "approach2": "Chinchilla approach 2 (IsoFLOP parabolas): N_opt = k_N C^a, D_opt = k_D C^b",
    "approach3": "Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta",
}


@dataclass
class ReportFiles:
    """What `write_report` wrote, the fits it used (as fits.json gives them), and what it had to skip."""

    out_dir: Path
    index_html: Path
    report_md: Path
    fits_json: Path
    figures: dict[str, dict[str, Path]]
    skipped: list[str]
    findings: list[str]
    fits: dict[str, FitResult] = field(repr=False)
    comparison: ArchComparison | None = field(default=None, repr=False)
    seconds: float = 0.0
    seed_study: list[str] = field(default_factory=list)


def write_report(
    runs: pd.DataFrame,
    metrics: pd.DataFrame | None,
    evals: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    throughput: pd.DataFrame | None = None,
    title: str = "scalinglab report",
    fits: Mapping[str, FitResult] | None = None,
    bootstrap: int = CLI_BOOTSTRAP,
    seed: int = 0,
    progress: Progress | None = None,
    params_col: str = DEFAULT_PARAMS_COL,
    baseline: str = "softmax",
    edges: str = "auto",
) -> ReportFiles:
    """Fit every law per arch, draw the figures and write index.html, report.md, fits.json, figures/.

    `fits` may hold results computed earlier, keyed "<method>/<arch>" (methods: frontier,
    frontier_power, approach1, approach2, approach3); those are reused instead of refitted. `edges`: the frontier
    laws' edge rule, as `compare_archs`'s.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    # Figures are drawn into a staging folder and moved in with the documents: a report that fails halfway leaves
    # the folder as it was (or absent), never new figures beside old documents.
    if (out / "figures").exists() and not (out / "figures").is_dir():  # someone's file: not ours to replace
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out / "figures"))
    for name in DOCUMENTS:  # a folder where a document goes had failed the last move, after the figures were replaced
        if (out / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, f"a folder stands where the report writes {name}", str(out / name))
    # An earlier report's figures/ is replaced whole: one holding anything else (a paper's own plots) had been deleted.
    if foreign := _not_report_figures(out / "figures"):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(errno.EEXIST, f"figures/ holds files a report does not write ({shown}), which it would "
                                            "replace: move them, or give another --out", str(out / "figures"))
    # Staged inside an existing folder, which is all a report needs to be able to write: beside it, a parent this
    # process may not write ($HOME's, /tmp's, a container's mount point's) refused a writable --out.
    staging = (out / f".figures-new-{os.getpid()}" if out.is_dir()
               else out.parent / f".{out.name}.figures-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        return _write_report(runs, metrics, evals, out, staging, t0, throughput=throughput, title=title, fits=fits,
                             bootstrap=bootstrap, seed=seed, progress=progress, params_col=params_col,
                             baseline=baseline, edges=edges)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _not_report_figures(folder: Path) -> list[str]:
    """The names in ``folder`` that no report writes (anything but FIGURES' PNG and SVG files); none if it is absent."""
    ours = {f"{name}.{ext}" for name in FIGURES for ext in ("png", "svg")}
    try:
        return sorted(p.name for p in folder.iterdir() if p.name not in ours or not p.is_file())
    except FileNotFoundError:
        return []


def _write_report(runs, metrics, evals, out: Path, figdir: Path, t0: float, *, throughput, title, fits, bootstrap,
                  seed, progress, params_col, baseline, edges) -> ReportFiles:
    """write_report's work, its figures drawn into ``figdir`` and moved into ``out/figures`` at the end."""
    runs = done_runs(runs)  # as prepare_points does, so that runs and pts stay row for row
    pts = prepare_points(runs, params_col)  # bad runs are an error, not an empty report
    runs = runs.copy()
    if "arch" not in runs.columns:
        runs["arch"] = "all"
    runs["arch"] = arch_names(runs)
    pts["arch"] = runs["arch"].to_numpy()
    has_curves = metrics is not None and not metrics.empty
    metrics = metrics if has_curves else None
    archs = sorted(pts["arch"].unique())
    asked = baseline
    if baseline not in archs:
        baseline = archs[0]

    budgets = allocation_budgets(pts["C"])  # shared, so that archs are compared at the same compute
    skipped: list[str] = []
    fits_all: dict[str, FitResult] = dict(fits or {})
    total = len(archs) * len(FIT_METHODS) + len(FIGURES) + 1
    step = [0]

    def tick():
        step[0] += 1
        if progress:
            progress(step[0], total)

    # The frontier laws of all archs together: each arch's frontier without edge points, or, when one arch's is
    # not identified so, every arch's envelope (fit_per_arch), so that the comparison compares like with like.
    for method, form in (("frontier", "saturating"), ("frontier_power", "power")):
        if any(k.startswith(f"{method}/") for k in fits_all):
            continue
        got, errors = fit_per_arch(runs, metrics=metrics, form=form, params_col=params_col, n_bootstrap=bootstrap,
                                   seed=seed, on_error="skip", edges=edges)
        fits_all.update({f"{method}/{a}": f for a, f in got.items()})
        skipped += [f"{method}/{a}: not fitted ({e})" for a, e in errors.items()]
    for _ in range(2 * len(archs)):  # the progress bar counts a fit per method and arch
        tick()

    for arch in archs:
        sub = runs[runs["arch"] == arch]
        ids = set(sub["run_id"].astype(str))
        sub_m = None if metrics is None else metrics[metrics["run_id"].astype(str).isin(ids)]
        if sub_m is not None and sub_m.empty:
            sub_m = None
        # each takes its bootstrap count: none where the arch's runs are too few to resample (fit_on_runs)
        jobs: dict[str, Callable[[int], FitResult]] = {
            "approach1": lambda nb: fit_approach1(
                sub, sub_m, params_col=params_col, budgets=budgets, n_bootstrap=nb, seed=arch_seed(seed, arch)
            ),
            "approach2": lambda nb: fit_approach2(
                sub, params_col=params_col, budgets=budgets, n_bootstrap=nb, seed=arch_seed(seed, arch)
            ),
            # the best 64 grid starts and one start per replicate: the report favours speed, the
            # library's defaults run the full protocol
            "approach3": lambda nb: fit_approach3(
                sub, params_col=params_col, budgets=budgets, n_starts=64, n_bootstrap=nb,
                bootstrap_starts=1, seed=arch_seed(seed, arch),
            ),
        }
        for method, job in jobs.items():
            key = f"{method}/{arch}"
            if key not in fits_all:
                if method == "approach1" and sub_m is None:
                    skipped.append(f"{key}: not fitted (no training curves for this arch)")
                else:
                    try:
                        fits_all[key] = fit_on_runs(job, bootstrap, len(sub))
                    except FitError as exc:
                        skipped.append(f"{key}: not fitted ({exc})")
            tick()

    frontier = {a: fits_all[f"frontier/{a}"] for a in archs if f"frontier/{a}" in fits_all}
    comparison = None
    if len(frontier) >= 2 and baseline in frontier:
        comparison = compare_archs(runs, baseline=baseline, fits=frontier)
    elif len(archs) >= 2:
        skipped.append(f"architecture comparison: needs frontier fits of {baseline} and another arch")
    tick()

    niah = niah_table(runs, evals, params_col=params_col) if evals is not None and not evals.empty else None
    mqar = mqar_table(runs, evals, params_col=params_col) if evals is not None and not evals.empty else None
    has_tput = throughput is not None and not throughput.empty
    # speeds relative to the baseline asked for wherever the table measured it, though no run of it was trained: with
    # runs of lightning alone, a table holding softmax had been read relative to lightning
    tput_base = asked if has_tput and asked in set(throughput["arch"].astype(str)) else baseline
    tput = throughput_table(throughput, baseline=tput_base) if has_tput else None

    # Archs whose intervals the findings call unknown (too few runs to resample): no table or figure quotes them.
    counts = runs["arch"].value_counts()
    few = {a: int(counts[a]) for a in archs if counts[a] < MIN_BOOTSTRAP_RUNS}
    if comparison is not None:
        few.update(few_runs(comparison))
    figures: dict[str, dict[str, Path]] = {}
    captions: dict[str, str] = {}
    drawers = {
        "loss_vs_tokens": lambda: _fig_loss_vs_tokens(runs, metrics, params_col),
        "loss_vs_compute": lambda: _fig_loss_vs_compute(pts, fits_all, archs, few),
        "isoflop": lambda: _fig_isoflop(fits_all, archs),
        "optimal_allocation": lambda: _fig_allocation(fits_all, archs),
        "residuals": lambda: _fig_residuals(fits_all, archs),
        "niah": lambda: _fig_niah(niah),
        "mqar": lambda: _fig_mqar(mqar),
        "throughput": lambda: _fig_throughput(tput, throughput),
    }
    for name in FIGURES:
        fig, caption = drawers[name]()
        if fig is None:
            skipped.append(f"figure {name}: skipped ({caption})")
        else:
            figures[name] = _save(fig, figdir / name)
            captions[name] = caption
        tick()

    a3 = {a: fits_all[f"approach3/{a}"] for a in archs if f"approach3/{a}" in fits_all}
    findings = summary_findings(comparison, approach3=a3, niah=niah, throughput=tput, runs=runs,
                                throughput_baseline=tput_base, frontier=frontier)
    seed = seed_study_findings(comparison, niah=niah, throughput=tput)
    losses = loss_table(runs, params_col=params_col) if comparison is None else None
    blocks = _blocks(title, runs, metrics, evals, findings, seed, skipped, figures, captions, fits_all, archs,
                     comparison, niah, mqar, tput, losses, few, tput_base)
    md_path, html_path, json_path = (out / name for name in DOCUMENTS)
    # fits.json says what the tables say: no interval for an arch with too few runs, and why (as slab fit stores it)
    for key, fit in list(fits_all.items()):
        arch = key.partition("/")[2]
        if arch in few:
            fits_all[key] = unknown_on_few_runs(fit, few[arch])
    payload = {k: v.to_dict() for k, v in fits_all.items()}
    if comparison is not None:
        payload["comparison"] = {"baseline": comparison.baseline, "gaps": comparison.to_dict()["gaps"]}
    documents = {json_path: json.dumps(payload, allow_nan=False), md_path: _render_md(blocks),
                 html_path: _render_html(title, blocks, figures)}
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Every document is written in full before anything in the folder changes: written one after another once the
    # figures were in, a full disk left new figures beside old documents (and half a document's temporary file).
    written = {path: path.with_name(path.name + ".tmp") for path in documents}
    try:
        for path, tmp in written.items():
            tmp.write_text(documents[path], encoding="utf-8")
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    final = out / "figures"
    old = out / f".figures-old-{os.getpid()}"
    if final.exists():  # the whole folder is replaced: a figure of an earlier report would no longer match
        final.rename(old)
    shutil.move(str(figdir), final)
    shutil.rmtree(old, ignore_errors=True)
    for path, tmp in written.items():
        tmp.replace(path)
    figures = {name: {ext: final / p.name for ext, p in paths.items()} for name, paths in figures.items()}
    return ReportFiles(out, html_path, md_path, json_path, figures, skipped, findings, fits_all, comparison,
                       time.perf_counter() - t0, seed)


# --------------------------------------------------------------------------------------------
# Figures: each returns (figure, caption) or (None, why it was skipped)


def arch_colour(arch: str, archs: list[str]) -> str:
    """The colour-blind-safe colour of ``arch`` in every figure (fixed for known archs, else by its index in ``archs``)."""
    if arch in ARCH_COLOURS:
        return ARCH_COLOURS[arch]
    spare = [c for c in OKABE_ITO if c not in ARCH_COLOURS.values()]
    return spare[archs.index(arch) % len(spare)] if arch in archs else OKABE_ITO[-1]


def _save(fig, stem: Path) -> dict[str, Path]:
    paths = {"png": stem.with_suffix(".png"), "svg": stem.with_suffix(".svg")}
    with plt.rc_context(_RC):
        fig.savefig(paths["png"], dpi=100)
        fig.savefig(paths["svg"], metadata={"Date": None})  # no timestamp: a re-drawn report differs only where its data do
    plt.close(fig)
    return paths


def _sci(v: float, _pos=None) -> str:
    """1e+18 -> '1e18', 3e18 -> '3e18': plain text, because mathtext tick labels are slow to lay out."""
    if v <= 0 or not np.isfinite(v):
        return ""
    e = int(math.floor(math.log10(v) + 1e-9))
    m = v / 10**e
    return f"1e{e}" if abs(m - 1) < 1e-6 else f"{m:.2g}e{e}"


def _log_axes(ax, x: str | None = "wide", y: str | None = None) -> None:
    """Log scales with plain-text tick labels: 'wide' spans decades (FLOPs, tokens), 'narrow' a factor
    of a few (losses)."""
    for kind, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if kind is None:
            continue
        set_scale("log")
        if kind == "narrow":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
            axis.set_minor_locator(NullLocator())
        else:
            axis.set_major_formatter(FuncFormatter(_sci))
        axis.set_minor_formatter(NullFormatter())


def _panels(n: int, width: float = 4.2, height: float = 3.4, sharey: bool = True):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    # margins in inches, not fractions: one panel's fraction left no room for the y label, and two rows' none for
    # two-line tick labels (NIAH's 'beyond') above the x label
    fig.subplots_adjust(left=0.85 / (width * cols), right=0.86, bottom=0.65 / (height * rows), top=1 - 0.1 / rows,
                        wspace=0.28, hspace=0.5)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _fig_loss_vs_tokens(runs, metrics, params_col):
    if metrics is None or not {"run_id", "tokens", "loss"} <= set(metrics.columns):
        return None, "no training curves (metrics with tokens and loss)"
    size = dict(zip(runs["run_id"].astype(str), pd.to_numeric(runs[params_col], errors="coerce")))
    arch_of = dict(zip(runs["run_id"].astype(str), runs["arch"]))
    m = metrics[["run_id", "tokens", "loss"]].copy()
    m["run_id"] = m["run_id"].astype(str)
    m = m[m["run_id"].isin(size) & (m["tokens"] > 0) & (m["loss"] > 0)]
    if m.empty:
        return None, "no training-curve points for these runs"
    m = m.sort_values(["run_id", "tokens"], kind="mergesort")
    ids = m["run_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    run_arch = np.array([arch_of[r] for r in ids[starts]], dtype=object)
    run_size = np.array([size[r] for r in ids[starts]], float)
    archs = sorted(set(run_arch))
    norm = LogNorm(vmin=np.nanmin(run_size), vmax=max(np.nanmax(run_size), np.nanmin(run_size) * 1.01))
    fig, axes = _panels(len(archs))
    x, y = m["tokens"].to_numpy(float), m["loss"].to_numpy(float)
    xy = np.column_stack([x, y])
    # The curves are drawn in log10 coordinates under the axes' affine part: the log scale applied once here instead
    # of to each of thousands of paths at every draw, the same numbers (np.log10, as matplotlib's LogTransform).
    log_xy = np.column_stack([np.log10(x), np.log10(y)])
    point_arch = np.repeat(run_arch, ends - starts)
    for ax, arch in zip(axes, archs):
        runs_here = np.flatnonzero(run_arch == arch)
        lc = LineCollection([log_xy[starts[i]:ends[i]] for i in runs_here], cmap=SEQUENTIAL, norm=norm,
                            linewidths=0.8, alpha=0.7, transform=ax.transLimits + ax.transAxes)
        lc.set_array(run_size[runs_here])
        lc.set_rasterized(True)  # thousands of curves: keep the SVG small
        ax.add_collection(lc, autolim=False)
        # the data limits the curves would give in data coordinates, from one path of all their points
        _update_datalim(ax, LineCollection([xy[point_arch == arch]]))
        _log_axes(ax, "wide", "narrow")
        ax.autoscale()
        ax.set_title(f"{arch} ({len(runs_here)} runs)")
        ax.set_xlabel("training tokens")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("training loss (nats)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=SEQUENTIAL), ax=axes, label=f"parameters ({params_col})")
    return fig, "Training loss against tokens, one line per run, coloured by model size."


def _update_datalim(ax, collection) -> None:
    """Extend ``ax``'s data limits by those of a collection in data coordinates, as `Axes.add_collection` does."""
    collection.set_transform(ax.transData)
    lim = collection.get_datalim(ax.transData)
    points = lim.get_points()
    if not np.isinf(lim.minpos).all():  # the least positive values, which a log scale's limits start from
        points = np.concatenate([points, [lim.minpos]])
    ax.update_datalim(points)


def _fig_loss_vs_compute(pts, fits, archs, few=None):
    fitted = [a for a in archs if f"frontier/{a}" in fits or f"frontier_power/{a}" in fits]
    if not fitted:
        return None, "no frontier fit succeeded"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    extrapolated = False
    for arch in archs:
        c = arch_colour(arch, archs)
        p = pts[pts["arch"] == arch]
        f = fits.get(f"frontier/{arch}") or fits.get(f"frontier_power/{arch}")
        # an arch with no law keeps its points, named: unnamed, its colour matched nothing in the legend
        ax.scatter(p["C"], p["L"], s=6, color=c, alpha=0.25, linewidths=0, rasterized=True,
                   label=None if f is not None or p.empty else f"{arch}: no law fitted (runs' final losses)")
        if f is None:
            continue
        fp = f.points
        ax.scatter(fp["C"], fp["L"], s=14, color=c, edgecolors="black", linewidths=0.3, zorder=3)
        # the law as fitted over the compute its points span; beyond them (runs past its last frontier point, whose
        # edge points were dropped) it is extrapolated and drawn dashed
        lo_fit, hi_fit = float(fp["C"].min()), float(fp["C"].max())
        lo, hi = float(min(p["C"].min(), lo_fit)), float(max(p["C"].max(), hi_fit))
        grid = np.geomspace(lo_fit, hi_fit, 120)
        E = f.estimates.get("E", 0.0)
        law = lambda x: loss_compute_law(x, E, f.estimates["A"], f.estimates["alpha"])  # noqa: E731
        label = (
            f"{arch}: L = {E:.3g} + {f.estimates['A']:.3g} C^-{f.estimates['alpha']:.3f}"
            if "E" in f.estimates else f"{arch}: L = {f.estimates['A']:.3g} C^-{f.estimates['alpha']:.3f}"
        )
        ax.plot(grid, law(grid), color=c, lw=1.6, label=label)
        for a, b in ((lo, lo_fit), (hi_fit, hi)):
            if b > a * 1.01:  # more than a rounding of the compute: extrapolated
                extrapolated = True
                x = np.geomspace(a, b, 40)
                ax.plot(x, law(x), color=c, lw=1.2, ls="--", alpha=0.6)
        band = None if arch in (few or {}) else _band(f, grid)
        if band is not None:
            ax.fill_between(grid, band[0], band[1], color=c, alpha=0.2, linewidth=0)
    _log_axes(ax, "wide", "narrow")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss (nats)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper right")
    used = [fits.get(f"frontier/{a}") or fits.get(f"frontier_power/{a}") for a in fitted]
    curves = any(f.details.get("source") == "curves" for f in used)
    envelope = any(f.details.get("edges") == "keep" for f in used)
    front = ("points of the training-loss curves on the runs' envelope, an upper bound of the compute-optimal "
             "frontier (the smallest model is the best at most budgets)" if envelope
             else "frontier points of the training-loss curves" if curves else "frontier points")
    unbanded = [a for a in fitted if a in (few or {})]
    band = ("" if not unbanded else
            f" (no band for {', '.join(unbanded)}: fewer than {MIN_BOOTSTRAP_RUNS} runs, "
            f"{'its interval is' if len(unbanded) == 1 else 'their intervals are'} unknown)")
    beyond = ("; dashed where it runs past the compute of the points it was fitted to: extrapolated, not fitted"
              if extrapolated else "")
    return fig, (f"Loss against compute per architecture: each run's final validation loss (faint), {front} "
                 f"(outlined), fitted law and its 95% bootstrap band{band}{beyond}.")


def _band(fit: FitResult, grid: np.ndarray):
    s = fit.samples
    if s is None or s.empty or "intervals_unknown" in fit.details:
        return None
    s = s.dropna(subset=["A", "alpha"])
    if len(s) < 10:
        return None
    E = s["E"].to_numpy()[:, None] if "E" in s.columns else 0.0
    with np.errstate(all="ignore"):
        curves = loss_compute_law(grid[None, :], E, s["A"].to_numpy()[:, None], s["alpha"].to_numpy()[:, None])
    return np.nanpercentile(curves, 2.5, axis=0), np.nanpercentile(curves, 97.5, axis=0)


def _fig_isoflop(fits, archs):
    have = [a for a in archs if f"approach2/{a}" in fits and fits[f"approach2/{a}"].details.get("minima")]
    if not have:
        return None, "no IsoFLOP budgets (runs sharing a FLOP budget across 4+ sizes)"
    fig, axes = _panels(len(have), sharey=False)
    cmap = plt.get_cmap(SEQUENTIAL)
    for ax, arch in zip(axes, have):
        f = fits[f"approach2/{arch}"]
        minima = f.details["minima"]
        Cs = [m["C"] for m in minima]
        norm = LogNorm(vmin=min(Cs), vmax=max(max(Cs), min(Cs) * 1.01))
        p = f.points[np.isin(f.points["budget_group"], Cs)]
        ax.scatter(p["N"], p["L"], s=12, c=[cmap(norm(b)) for b in p["budget_group"]])
        for mrow in minima:
            q = p[p["budget_group"] == mrow["C"]]
            xs = np.geomspace(q["N"].min(), q["N"].max(), 60)
            c2, c1, c0 = mrow["coef"]
            lx = np.log(xs)
            col = cmap(norm(mrow["C"]))
            ax.plot(xs, c2 * lx * lx + c1 * lx + c0, color=col, lw=1.2, label=f"{mrow['C']:.2g}")
            ax.scatter([mrow["N_opt"]], [mrow["L_opt"]], marker="*", s=90, color=col, edgecolors="black",
                       linewidths=0.5, zorder=4)
        _log_axes(ax, "wide")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"{arch}: IsoFLOP curves")
        ax.grid(True, which="major", alpha=0.25)
        if len(minima) <= 12:
            ax.legend(fontsize=6, title="budget (FLOPs)", title_fontsize=6)
    return fig, "IsoFLOP curves: loss against size at fixed compute, with each parabola's minimum (star)."


def _fig_allocation(fits, archs):
    rows = [(a, m) for a in archs for m in ("approach1", "approach2", "approach3") if f"{m}/{a}" in fits]
    # An approach-3 law whose A or B overflows (an exponent of 50) has no allocation to draw: drawn, N_opt came out 0
    # and D_opt divided by it.
    undefined = [a for a, m in rows if m == "approach3"
                 and not all(math.isfinite(fits[f"{m}/{a}"].estimates[k]) for k in ("A", "B"))]
    rows = [(a, m) for a, m in rows if not (m == "approach3" and a in undefined)]
    none = f"approach 3 of {', '.join(undefined)}: no allocation (a law constant overflows)" if undefined else ""
    if not rows:
        return None, "no approach 1, 2 or 3 fit succeeded" + (f" with an allocation ({none})" if none else "")
    fig, (axN, axD) = plt.subplots(1, 2, figsize=(11, 4.4))
    fig.subplots_adjust(left=0.07, right=0.87, bottom=0.13, top=0.95, wspace=0.25)
    styles = {"approach1": ("o", "-"), "approach2": ("s", ":"), "approach3": (None, "--")}
    extrapolated = False
    for arch, method in rows:
        f = fits[f"{method}/{arch}"]
        c = arch_colour(arch, archs)
        e = f.estimates
        marker, ls = styles[method]
        if method == "approach3":
            Cs = np.geomspace(f.points["C"].min(), max(f.details.get("budgets", [f.points["C"].max()])), 80)
            rule = ComputeRule(**f.details.get("compute", {}))
            N, D = optimal_allocation(Cs, e["A"], e["B"], e["alpha"], e["beta"], rule)
            # past the largest run the law is extrapolated (to the tables' budgets): drawn faded, not as data
            top = float(f.points["C"].max())
            out = Cs > top
            if out.any():
                extrapolated = True
                Cx = np.r_[top, Cs[out]]
                Nx, Dx = optimal_allocation(Cx, e["A"], e["B"], e["alpha"], e["beta"], rule)
                axN.plot(Cx, Nx, color=c, ls=ls, lw=1.2, alpha=0.35)
                axD.plot(Cx, Dx, color=c, ls=ls, lw=1.2, alpha=0.35)
                Cs, N, D = Cs[~out], N[~out], D[~out]
        else:
            if method == "approach1":
                C, Np, Dp = f.points["C"], f.points["N_opt"], f.points["D_opt"]
            else:
                mins = pd.DataFrame(f.details["minima"])
                C, Np, Dp = mins["C"], mins["N_opt"], mins["D_opt"]
            axN.scatter(C, Np, marker=marker, s=14, color=c, alpha=0.8)
            axD.scatter(C, Dp, marker=marker, s=14, color=c, alpha=0.8)
            Cs = np.geomspace(C.min(), C.max(), 40)
            N, D = e["k_N"] * Cs ** e["a"], e["k_D"] * Cs ** e["b"]
        axN.plot(Cs, N, color=c, ls=ls, lw=1.2)
        axD.plot(Cs, D, color=c, ls=ls, lw=1.2)
    for ax, what in ((axN, "N_opt (parameters)"), (axD, "D_opt (tokens)")):
        _log_axes(ax, "wide", "wide")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.grid(True, which="major", alpha=0.25)
    from matplotlib.lines import Line2D

    present = sorted({a for a, _ in rows}, key=archs.index)
    handles = [Line2D([], [], color=arch_colour(a, archs), lw=2, label=a) for a in present]
    for m in ("approach1", "approach2", "approach3"):
        if any(mm == m for _, mm in rows):
            label = m.replace("approach", "approach ")
            handles.append(Line2D([], [], color="grey", ls=styles[m][1], marker=styles[m][0], label=label))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    beyond = ", faded past its runs' largest compute: extrapolated" if extrapolated else ""
    return fig, ("Compute-optimal size and tokens against compute: approach 1 (circles, solid), approach 2 "
                 f"(squares, dotted), approach 3 (dashed{beyond}); exponents are in the fit tables."
                 + (f" Not drawn: {none}." if none else ""))


def _fig_residuals(fits, archs):
    # (fit, its archs, x column, x label, title, caption): one panel per fit that exists, none left empty
    panels = [(m, [a for a in archs if f"{m}/{a}" in fits], x, xlabel, title, what) for m, x, xlabel, title, what in (
        ("approach3", "N", "parameters N", "approach 3", "of approach 3 (per run)"),
        ("frontier", "C", "training compute C (FLOPs)", "frontier law", "of the frontier law (per frontier point)"),
    )]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None, "no fit to show residuals of"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (method, fitted, x, xlabel, title, _) in zip(axes[0], panels):
        for arch in fitted:
            f = fits[f"{method}/{arch}"]
            colour = arch_colour(arch, archs)
            if method == "approach3":
                ax.scatter(f.points[x], f.residuals, s=6, alpha=0.5, color=colour, label=arch, rasterized=True)
            else:
                ax.plot(f.points[x], f.residuals, marker="o", ms=3, lw=0.8, color=colour, label=arch)
        ax.set_title(f"{title}: ln L_fit - ln L")
        ax.set_xlabel(xlabel)
        _log_axes(ax, "wide")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("residual, ln L_fit - ln L (0.01 = 1%)")
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()  # side by side, the right panel's y label would overlap the left panel
    return fig, f"Residuals in natural log space {' and '.join(p[-1] for p in panels)}: 0.01 is a 1% misfit."


def _fig_niah(niah):
    if niah is None or niah.empty:
        return None, "no NIAH evals (names like niah/len=1024/depth=0.5)"
    variants = sorted(niah["variant"].unique(), key=_variant_order)
    beyond = _beyond_context(niah)
    fig, axes = _panels(len(variants), width=4.0, height=3.2, sharey=False)
    for ax, variant in zip(axes, variants):
        t = niah[niah["variant"] == variant].pivot_table(index="depth", columns="length", values="accuracy") * 100
        im = ax.imshow(t.to_numpy(), cmap="cividis", vmin=0, vmax=100, aspect="auto", origin="lower")
        # softmax with RoPE fails past its training context by construction: that column is not a retrieval result
        out = [(variant, int(c)) in beyond for c in t.columns]
        ax.set_xticks(range(t.shape[1]), [f"{int(c)}\nbeyond" if o else str(int(c)) for c, o in zip(t.columns, out)],
                      fontsize=7)
        if any(out) and not all(out):
            ax.axvline(out.index(True) - 0.5, color="white", lw=2, ls="--")
        ax.set_yticks(range(t.shape[0]), [f"{d:g}" for d in t.index], fontsize=7)
        for (r, c), v in np.ndenumerate(t.to_numpy()):
            if np.isfinite(v):  # 6 pt read as specks at the size the report shows
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 50 else "black")
        params = niah[niah["variant"] == variant]["params"].max()
        ax.set_title(f"{variant} ({params:.3g} params)", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (fraction)")
    fig.colorbar(im, ax=axes, label="exact-match accuracy (%)")
    note = (" Lengths marked 'beyond' exceed the runs' training context (right of the dashed line), where softmax with "
            "RoPE fails by construction." if beyond else "")
    return fig, ("Needle-in-a-haystack accuracy (%) by context length and needle depth, largest model of each arch "
                 "(hybrids by ratio)." + note)


def _variant_order(variant: str) -> tuple:
    """Sort key: by name, and hybrids by ratio ('hybrid 3:1' before 'hybrid 15:1', which a string sort reverses)."""
    name, _, ratio = variant.partition(" ")
    try:
        return (name, float(ratio.split(":")[0]) if ratio else -1.0, variant)
    except ValueError:
        return (name, math.inf, variant)


def _beyond_context(niah: pd.DataFrame) -> set[tuple[str, int]]:
    """The (variant, length) cells of a `niah_table` lying beyond the training context of some run they pool."""
    out = niah[niah["in_context"].eq(False)]
    return {(v, int(n)) for v, n in zip(out["variant"], out["length"])}


def _niah_grid_marked(niah: pd.DataFrame) -> pd.DataFrame:
    """`niah_grid` in variant order, a length column beyond the training context headed so (for some variants only:
    'beyond for some')."""
    g = niah_grid(niah)
    g = g.iloc[sorted(range(len(g)), key=lambda i: (_variant_order(g["variant"].iloc[i]), g["depth"].iloc[i]))]
    return g.rename(columns=beyond_context_names(niah)).reset_index(drop=True)


def _fig_mqar(mqar):
    if mqar is None or mqar.empty:
        return None, "no MQAR evals (names starting with mqar)"
    t = mqar[np.isfinite(mqar["ratio"]) | np.isinf(mqar["ratio"])]
    if t.empty:
        return None, "MQAR evals exist but no run has a softmax/lightning/hybrid pattern to place on the ratio axis"
    ratios = sorted(t["ratio"].unique())
    pos = {r: i for i, r in enumerate(ratios)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sizes = sorted(t["params"].unique())
    norm = LogNorm(vmin=min(sizes), vmax=max(max(sizes), min(sizes) * 1.01))
    cmap = plt.get_cmap(SEQUENTIAL)
    # one grouping for every size: a paper-scale study has dozens of sizes, and a grouping per size took longer
    # than drawing its line
    means = t.groupby(["params", "ratio"])["accuracy"].mean()
    for size in sizes:
        q = means.loc[size]
        ax.plot([pos[r] for r in q.index], q.to_numpy(), marker="o", ms=4, lw=1, color=cmap(norm(size)))
    ax.set_xticks(range(len(ratios)), [ratio_label(r) for r in ratios], fontsize=8)
    ax.set_xlabel("linear layers per softmax layer (hybrid ratio)")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.25)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="parameters")
    # archs with no softmax:lightning ratio (hgrn2, mamba2) have no place on this axis: say so rather than drop them
    off = sorted(set(mqar.loc[mqar["ratio"].isna(), "arch"].astype(str)))
    left_out = (f" Not on this axis (no softmax:lightning layer ratio): {', '.join(off)}; their accuracy is in the "
                "MQAR table." if off else "")
    return fig, ("MQAR accuracy against the hybrid ratio (softmax only on the left, linear only, that is lightning, "
                 "on the right), one line per model size." + left_out)


#: Line style and marker telling the model sizes (or settings) of a throughput figure apart, this report's and the
#: bench figures' (colour is the arch's); the first is a one-size figure's look.
SIZE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1, 1, 1)), "v"), ((0, (1, 3)), "P"))


def _fig_throughput(tput, raw=None):
    if tput is None or tput.empty:
        return None, "no throughput table given"
    archs = sorted(tput["arch"].unique())
    groups = throughput_sizes(tput)
    fig, ax = plt.subplots(figsize=(7, 4.3))
    # one curve per arch and size: tokens/s of different sizes are never joined or averaged into one curve
    for i, (size, t) in enumerate(groups):
        for arch in archs:
            q = t[t["arch"] == arch].sort_values("seq_len")
            if q.empty:
                continue
            ls, marker = SIZE_STYLES[i % len(SIZE_STYLES)]
            ax.plot(q["seq_len"], q["tokens_per_s"], marker=marker, ms=4, ls=ls, color=arch_colour(arch, archs),
                    label=arch if size is None else f"{arch}, {size}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training throughput (tokens/s)")
    ax.set_ylim(bottom=0)  # a fall with length reads as large as it is
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8 if len(groups) == 1 else 7)
    repeats = (" A point averages the n repeated measurements of its arch, size and length that the throughput table "
               "gives." if "n" in tput.columns else "")
    if len(groups) > 1:
        sizes = ", ".join(str(size) for size, _ in groups)
        return fig, ("Training throughput against sequence length, one curve per architecture (colour) and model size "
                     f"(line style: {sizes}), each size apart since tokens/s depends on the model's size as much as on "
                     "the length; from the table given with --throughput (a benchmark, such as slab bench train's, not "
                     "these runs)." + repeats)
    # the benchmark's size, which the table keeps in its raw rows only: the runs beside it are often far smaller
    sizes = (sorted(pd.to_numeric(raw["params"], errors="coerce").dropna().unique())
             if raw is not None and "params" in raw.columns else [])
    size = size_label(sizes) if sizes else ""
    at = f" at {size} parameters" if size else " of its own model size"
    return fig, ("Training throughput against sequence length per architecture, from the table given with "
                 f"--throughput (a benchmark{at}, such as slab bench train's, not these runs)." + repeats)


# --------------------------------------------------------------------------------------------
# Document: a list of blocks rendered to Markdown and to HTML


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return fmt_number(v)
    return str(v)


def _with_ci(fit: FitResult, name: str) -> str:
    v = fit.estimates.get(name, math.nan)
    lo, hi = fit.interval(name)
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
    return _fmt(v)


#: Marks a value at a compute beyond the largest one its fit rests on (the same 1.5x as the findings' "extrapolated").
EXTRAPOLATED = "†"


def _fit_table(fits: Mapping[str, FitResult], method: str, archs: list[str],
               few: Mapping[str, int] | None = None) -> pd.DataFrame | None:
    """One row per arch: estimates with their 95% intervals (none for an arch in ``few``, whose runs are too few to
    resample), and allocations at budgets beyond the fit's data marked EXTRAPOLATED."""
    rows = []
    few = few or {}
    for arch in archs:
        f = fits.get(f"{method}/{arch}")
        if f is None:
            continue
        names = list(TABLE_PARAMS[method]) + [k for k in f.estimates if k.startswith("tokens_per_param@")]
        cell = (lambda n: _fmt(f.estimates[n])) if arch in few else (lambda n: _with_ci(f, n))
        row = {"arch": arch, **{n: cell(n) for n in names if n in f.estimates}}
        top = float(f.points["C"].max()) if "C" in f.points and len(f.points) else math.nan
        for n in names:
            if n.startswith("tokens_per_param@") and n in row and float(n.split("@")[1]) > 1.5 * top:
                row[n] += f" {EXTRAPOLATED}"
        row["points"] = str(f.n_points)
        failed = f.details.get("bootstrap_failed", 0)
        stopped = f.details.get("bootstrap_stopped_after")
        # replicates that could not be fitted narrow what an interval rests on; most of them leave it unknown (and a
        # bootstrap stops once they are: the count failed is then of the replicates run)
        ran = "" if stopped is None else f"stopped after {stopped}: "
        row["bootstrap"] = (str(f.n_bootstrap) if not failed else f"{f.n_bootstrap} ({ran}{failed} failed"
                            + ("; intervals unknown)" if "intervals_unknown" in f.details else ")"))
        if f.details.get("bootstrap_skipped"):  # none ran (fit_on_runs): a count would claim replicates never run
            row["bootstrap"] = f"skipped ({_runs(few[arch]) + ': ' if arch in few else ''}too few to resample)"
        elif arch in few:
            row["bootstrap"] = f"{f.n_bootstrap} ({_runs(few[arch])}: intervals unknown)"
        row["converged"] = _fmt(f.converged)
        rows.append(row)
    return pd.DataFrame(rows).fillna("-") if rows else None


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _blocks(title, runs, metrics, evals, findings, seed, skipped, figures, captions, fits, archs, comparison, niah,
            mqar, tput, losses, few=None, tput_base=None) -> list[tuple]:
    b: list[tuple] = [("h1", title)]
    n_m = 0 if metrics is None else len(metrics)
    n_e = 0 if evals is None else len(evals)
    counts = ", ".join(f"{a}: {n}" for a, n in runs["arch"].value_counts().sort_index().items())
    b.append(("p", f"{len(runs)} runs ({counts}), "
                   f"{n_m} training-curve points, {n_e} eval values. Intervals are 95% bootstrap percentile "
                   "intervals over runs resampled with replacement."))
    b.append(("p", _compute_note(fits, archs)))
    b.append(("h2", "Findings"))
    b.append(("ul", findings or ["No comparison could be made from this data."]))
    b.append(("h2", "Against the seed study (MiniMax-01)"))
    b.append(("p", "MiniMax-01 found that lightning attention matches softmax on language-modelling loss but fails "
                   "needle-in-a-haystack retrieval, that a hybrid with one softmax layer per seven lightning layers "
                   "matches or beats softmax on retrieval, and that lightning's training speed stays flat as sequences "
                   "grow while softmax's falls. What these runs say of each:"))
    b.append(("ul", seed))
    if skipped:
        b.append(("h2", "Not shown"))
        b.append(("ul", skipped))
    b.append(("h2", "Figures"))
    titles = {
        "loss_vs_tokens": "Loss vs tokens", "loss_vs_compute": "Loss vs compute", "isoflop": "IsoFLOP curves",
        "optimal_allocation": "N_opt and D_opt vs compute", "residuals": "Residuals", "niah": "Needle in a haystack",
        "mqar": "MQAR vs hybrid ratio", "throughput": "Throughput vs sequence length",
    }
    for name in figures:
        b.append(("h3", titles.get(name, name)))
        b.append(("figure", name, captions[name]))
    b.append(("h2", "Fits"))
    for method in FIT_METHODS:
        t = _fit_table(fits, method, archs, few)
        if t is not None:
            b.append(("h3", METHOD_TITLES[method]))
            b.append(("table", t))
            if t.map(lambda v: str(v).endswith(EXTRAPOLATED)).to_numpy().any():
                b.append(("p", f"{EXTRAPOLATED} at a compute more than 1.5x the largest this arch's fit rests on: "
                               "extrapolated, not measured."))
    if comparison is not None and not comparison.gaps.empty:
        g = comparison.gaps

        # a gap involving an arch with too few runs has an unknown interval, as the findings say
        unknown = [a in (few or {}) or comparison.baseline in (few or {}) for a in g["arch"]]

        def ci(k):
            return [_fmt(v) if u or not (np.isfinite(lo) and np.isfinite(hi)) else f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
                    for v, lo, hi, u in zip(g[k], g[f"{k}_lo"], g[f"{k}_hi"], unknown)]

        t = pd.DataFrame({
            "arch": g["arch"],
            "C (FLOPs)": g["C"].map(_fmt),
            "loss (nats)": ci("loss"),
            f"{comparison.baseline} loss": g["baseline_loss"].map(_fmt),
            "gap (nats)": ci("gap"),
            "compute multiplier": ci("multiplier"),
        })
        b.append(("h3", f"Architectures against {comparison.baseline} on the frontier law"))
        b.append(("p", "compute multiplier: the compute an arch needs to reach the baseline's loss at C, "
                       "divided by C." + (f" No interval where either arch has fewer than {MIN_BOOTSTRAP_RUNS} runs."
                                          if any(unknown) else "")))
        b.append(("table", t))
    if niah is not None and not niah.empty:
        b.append(("h3", "NIAH accuracy (%) by length and depth (largest model of each arch; hybrids by ratio)"))
        b.append(("table", _niah_grid_marked(niah).map(_fmt)))
    if losses is not None and not losses.empty:
        b.append(("h3", "Final loss by variant and size (no loss-compute law could be compared)"))
        b.append(("p", "loss: each run's final validation loss (its training loss where it has none), mean and best "
                       "over the runs of a variant, size and token budget (seeds, learning rates)."))
        b.append(("table", losses.map(_fmt)))
    if mqar is not None and not mqar.empty:
        t = mqar[["arch", "ratio_label", "params", "name", "accuracy", "best", "n_runs"]]
        b.append(("h3", "MQAR accuracy by hybrid ratio and size"))
        b.append(("table", t.map(_fmt)))
    if tput is not None and not tput.empty:
        b.append(("h3", "Throughput (tokens/s)"))
        notes = []
        if "size" in tput.columns:
            sizes = list(tput["size"].cat.categories)
            notes.append(f"Measured at {len(sizes)} model sizes or settings ({'; '.join(sizes)}), kept apart: each row "
                         f"is one arch at one size and length, relative to {tput_base or 'the baseline'} at the same "
                         "size and length ('-' where it was not measured there); tokens/s depends on the model's "
                         "size, so an average over sizes would mix models, not measure one.")
        if "n" in tput.columns:
            notes.append("n: repeated measurements of the same arch, size and length, averaged.")
        if notes:
            b.append(("p", " ".join(notes)))
        # the column names the arch it is relative to, which may not be the comparison's baseline
        b.append(("table", tput.rename(columns={"vs_baseline": f"vs {tput_base}"} if tput_base else {}).map(_fmt)))
    return b


def _compute_note(fits: Mapping[str, FitResult], archs: list[str]) -> str:
    """What C and N mean in this report, and the compute rule each arch's allocations use."""
    rules = []
    for arch in archs:
        f = fits.get(f"approach3/{arch}") or fits.get(f"approach2/{arch}")
        if f is not None and "compute" in f.details:
            r = ComputeRule(**f.details["compute"])
            rules.append(f"{arch} {r.k:.3g} N^{r.g:.3g}")
    text = ("C is each run's training FLOPs as models.config counts them (6 x every matmul weight, the LM head "
            "included, plus the attention term); N is the parameter count the fits use (non-embedding unless the report "
            "was asked otherwise); coefficients such as A and k_N are in these units. The loss is the training loss "
            "along each run's curve for the frontier laws, the loss comparison and approach 1 (each run's final "
            "validation loss where no curves were recorded), and each run's final validation loss for approaches 2 "
            "and 3 and the faint points of the loss-compute figure.")
    if rules:
        text += (" Approaches 2 and 3 allocate compute as the runs spend it, C = (compute per token) x D, with the "
                 "compute per token fitted to the runs: " + ", ".join(rules) + " (Chinchilla's is 6 N).")
    return text


def _md_text(s: Any) -> str:
    """Text as Markdown shows it literally: an arch named <script> or *a* is data, not HTML or emphasis."""
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\\", "\\\\").replace("*", "\\*").replace("`", "\\`")


def _md_table(t: pd.DataFrame) -> str:
    esc = lambda s: _md_text(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in t.columns) + " |", "| " + " | ".join("---" for _ in t.columns) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in t.astype(str).itertuples(index=False)]
    return "\n".join(lines)


def _render_md(blocks) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_text(blk[1]))
        elif kind == "p":
            out.append(_md_text(blk[1]))
        elif kind == "ul":
            out.append("\n".join(f"- {_md_text(x)}" for x in blk[1]))
        elif kind == "figure":
            name, caption = blk[1], _md_text(blk[2])
            alt = caption.replace("[", "\\[").replace("]", "\\]")  # a bracket in it had ended the image's alt text
            out.append(f"![{alt}](figures/{name}.png)\n\n{caption} ([SVG](figures/{name}.svg))")
        elif kind == "table":
            out.append(_md_table(blk[1]))
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0 1.2em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
"""


def _render_html(title: str, blocks, figures: dict[str, dict[str, Path]]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>\n"
             f"<style>{_CSS}</style>\n</head>\n<body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(blk[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "figure":
            name, caption = blk[1], blk[2]
            data = base64.b64encode(figures[name]["png"].read_bytes()).decode("ascii")
            parts.append(f'<figure id="fig-{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        elif kind == "table":
            t = blk[1]
            head = "".join(f"<th>{e(str(c))}</th>" for c in t.columns)
            body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>"
                           for row in t.astype(str).itertuples(index=False))
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


"""Architecture comparisons recover a known compute multiplier; retrieval and throughput tables."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import compare
from analysis.fits import FitError
from analysis.synthetic import runs_frame, study


def frontier_runs(arch, k, seed, n=14):
    """Final points on L(C) = 1.9 + 2000 (C / k)^-0.17 (so this arch needs k times the compute of k = 1),
    plus dominated runs."""
    rng = np.random.default_rng(seed)
    C = np.geomspace(1e17, 1e21, n)
    L = 1.9 + 2000 * (C / k) ** -0.17
    N = np.sqrt(C / 120)
    L_all = np.r_[L * np.exp(0.002 * rng.standard_normal(n)), L * 1.04]
    r = runs_frame(np.r_[N, N / 2], np.r_[C / (6 * N), 2 * C / (6 * N)], L_all, arch=arch, prefix=arch)
    return r


@pytest.fixture(scope="module")
def comparison():
    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.5, 1)], ignore_index=True)
    return compare.compare_archs(runs, budgets=[1e18, 1e20], n_bootstrap=300, seed=0)


def test_compute_multiplier_and_gap_recover_the_known_shift(comparison):
    g = comparison.gaps
    assert list(g["arch"]) == ["lightning", "lightning"]
    for _, row in g.iterrows():
        assert row["multiplier"] == pytest.approx(1.5, rel=0.1)
        assert row["multiplier_lo"] <= 1.5 <= row["multiplier_hi"]
        true_gap = 2000 * ((row["C"] / 1.5) ** -0.17 - row["C"] ** -0.17)
        assert row["gap"] == pytest.approx(true_gap, abs=0.01)
        assert row["gap_lo"] <= row["gap"] <= row["gap_hi"]
        assert row["rel_gap"] == pytest.approx(row["gap"] / row["baseline_loss"])


def test_comparison_round_trips_through_json(comparison):
    d = comparison.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert set(d["fits"]) == {"softmax", "lightning"}


def test_findings_describe_the_gap(comparison):
    lines = compare.summary_findings(comparison)
    assert len(lines) == 1
    assert lines[0].startswith("lightning's frontier loss is") and "above softmax's" in lines[0]
    assert "the compute to reach softmax's loss" in lines[0]


def test_missing_baseline_is_an_error():
    runs = frontier_runs("lightning", 1.0, 0)
    with pytest.raises(FitError, match="baseline arch 'softmax'"):
        compare.compare_archs(runs, n_bootstrap=0)


def test_compute_needed_inverts_the_law():
    C = compare.compute_needed(2.5, 1.9, 2000.0, 0.17)
    assert 1.9 + 2000 * C**-0.17 == pytest.approx(2.5)
    assert math.isinf(compare.compute_needed(1.8, 1.9, 2000.0, 0.17))


@pytest.mark.parametrize(
    "pattern, arch, ratio",
    [("LLLLLLLS", "hybrid", 7.0), ("LLLS", "hybrid", 3.0), ("LSLS", "hybrid", 1.0), ("", "softmax", 0.0),
     ("", "lightning", math.inf), (None, "lightning", math.inf), ("LLLL", "hybrid", math.inf)],
)
def test_hybrid_ratio(pattern, arch, ratio):
    assert compare.hybrid_ratio(pattern, arch) == ratio


def test_hybrid_ratio_of_other_archs_is_undefined():
    assert math.isnan(compare.hybrid_ratio("", "mamba2"))
    assert compare.ratio_label(7.0) == "7:1" and compare.ratio_label(0.0) == "softmax"


def test_eval_names_parse():
    assert compare.parse_eval_name("niah/len=1024/depth=0.5") == {"task": "niah", "len": 1024, "depth": 0.5}
    assert compare.parse_eval_name("mqar/acc") == {"task": "mqar", "metric": "acc"}


@pytest.fixture(scope="module")
def data():
    return study(120, n_steps=10, seed=3)


def test_niah_table_by_length_and_depth(data):
    t = compare.niah_table(data.runs, data.evals)
    assert set(t.columns) >= {"arch", "length", "depth", "accuracy", "n_runs"}
    assert set(t["length"]) == {512, 1024, 2048, 4096}
    assert set(t["depth"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert t["accuracy"].between(0, 1).all()
    # one cell by hand: the largest softmax models' mean at len 1024, depth 0.5
    r = data.runs[data.runs["arch"] == "softmax"]
    big = r[r["nonembed_params"] == r["nonembed_params"].max()]["run_id"]
    ev = data.evals[data.evals["run_id"].isin(big) & (data.evals["name"] == "niah/len=1024/depth=0.5")]
    cell = t[(t["arch"] == "softmax") & (t["length"] == 1024) & (t["depth"] == 0.5)]
    assert cell["accuracy"].iloc[0] == pytest.approx(ev["value"].mean())
    means = t.groupby("arch")["accuracy"].mean()
    assert means["softmax"] > means["lightning"]


def test_niah_table_parses_each_eval_name_once(data, monkeypatch):
    """Thousands of runs share a few NIAH cells: parsing the name of every eval row took a Python call per row."""
    calls = []
    parse = compare.parse_eval_name
    monkeypatch.setattr(compare, "parse_eval_name", lambda name: calls.append(name) or parse(name))
    table = compare.niah_table(data.runs, data.evals)
    niah = data.evals["name"][data.evals["name"].str.startswith("niah/")]
    assert len(calls) == niah.nunique() < len(niah)
    assert len(table) == table[["variant", "length", "depth"]].drop_duplicates().shape[0] > 0


def test_niah_table_names_each_variant_once(data, monkeypatch):
    """A paper-scale study has tens of thousands of NIAH values over a few (arch, pattern) pairs: naming the variant of
    every value took a third of a second of the report."""
    runs = data.runs.copy()
    unknown = runs.index[runs["arch"] == "hybrid"][:3]
    runs.loc[unknown, "hybrid"] = np.nan  # a hybrid of unknown pattern is reported as "hybrid", apart from the ratios
    calls = []
    name = compare.variant_of
    monkeypatch.setattr(compare, "variant_of", lambda arch, hybrid: calls.append(arch) or name(arch, hybrid))
    table = compare.niah_table(runs, data.evals, size="all")
    n_values = data.evals["name"].str.startswith("niah/").sum()
    assert len(calls) == len(runs[["arch", "hybrid"]].drop_duplicates()) < n_values
    # every run under its own variant, as naming it row by row does (each run has every NIAH cell)
    per_run = pd.Series([name(a, h) for a, h in zip(runs["arch"], runs["hybrid"])]).value_counts()
    assert table.groupby("variant")["n_runs"].max().to_dict() == per_run.to_dict()
    # the four other archs, the hybrid of unknown pattern, and one variant per hybrid pattern (each its own ratio)
    assert per_run["hybrid"] == 3 and len(per_run) == 5 + len(set(runs["hybrid"].dropna()) - {""})


def test_niah_table_uses_the_last_step():
    runs = runs_frame(np.array([1e8]), np.array([1e9]), np.array([3.0]))
    evals = pd.DataFrame({"run_id": [runs["run_id"][0]] * 2, "step": [10, 20],
                          "name": ["niah/len=512/depth=0"] * 2, "value": [0.1, 0.9]})
    assert compare.niah_table(runs, evals)["accuracy"].tolist() == [0.9]


def test_niah_grid_reads_in_percent(data):
    """The grid users read (compare, report) is in percent, as the findings are: one column per length."""
    t = compare.niah_table(data.runs, data.evals)
    g = compare.niah_grid(t)
    assert [c for c in g.columns if c.startswith("len ")] == ["len 512", "len 1024", "len 2048", "len 4096"]
    cell = t[(t["variant"] == "softmax") & (t["length"] == 1024) & (t["depth"] == 0.5)]["accuracy"].iloc[0]
    row = g[(g["variant"] == "softmax") & (g["depth"] == 0.5)]
    assert row["len 1024"].iloc[0] == pytest.approx(100 * cell)


def test_mqar_table_by_ratio_and_size(data):
    t = compare.mqar_table(data.runs, data.evals)
    assert set(t["ratio_label"]) >= {"softmax", "linear only", "7:1", "3:1"}
    hyb = t[t["arch"] == "hybrid"]
    assert (hyb["ratio"] == [compare.hybrid_ratio(p, "hybrid") for p in hyb["hybrid"]]).all()
    assert (t["best"] >= t["accuracy"]).all()


def test_load_throughput_names_every_bad_cell(tmp_path):
    # a word or '2k' had crashed the report with a traceback after drawing figures; -5 and NaN were plotted
    path = tmp_path / "tp.csv"
    path.write_text("arch,seq_len,tokens_per_s\nsoftmax,2048,abc\nlightning,2k,100\nsoftmax,8192,-5\n"
                    "lightning,8192,nan\n,4096,7\nsoftmax,512.5,9\nlightning,2048,1e5\n")
    with pytest.raises(FitError) as info:
        compare.load_throughput(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "column 'seq_len' must be a positive number; bad on line(s) 3" in message
    assert "column 'tokens_per_s' must be a positive number; bad on line(s) 2, 4, 5" in message
    assert "column 'seq_len' must be a whole number of tokens; bad on line(s) 7" in message
    assert "column 'arch' is empty on line(s) 6" in message
    path.write_text("arch,seq_len,tokens_per_s,mfu\n softmax ,2048,100.5,0.4\nlightning,2048.0,200,0.3\n")
    good = compare.load_throughput(path)
    assert good["arch"].tolist() == ["softmax", "lightning"] and good["seq_len"].tolist() == [2048, 2048]
    assert compare.throughput_table(good)["vs_baseline"].tolist() == [pytest.approx(200 / 100.5), 1.0]


def test_throughput_table_relative_to_baseline(data):
    t = compare.throughput_table(data.throughput)
    soft = t[t["arch"] == "softmax"]
    assert np.allclose(soft["vs_baseline"], 1.0)
    lin = t[(t["arch"] == "lightning") & (t["seq_len"] == 65536)]["vs_baseline"].iloc[0]
    assert lin > 1.5
    with pytest.raises(FitError, match="tokens_per_s"):
        compare.throughput_table(data.throughput.drop(columns=["tokens_per_s"]))


def _approach3(alpha, beta, tokens_per_param):
    from analysis.fits import FitResult

    estimates = {"alpha": alpha, "beta": beta, "a": beta / (alpha + beta), "tokens_per_param@5e+12": tokens_per_param}
    return FitResult("approach3", "L = E + A/N^alpha + B/D^beta", estimates, {}, np.zeros(0), pd.DataFrame(), 30, 0, True)


def test_findings_flag_a_degenerate_compute_split():
    lines = compare.summary_findings(approach3={"softmax": _approach3(0.34, 0.28, 20.0),
                                                "lightning": _approach3(213.0, 0.169, 0.0),
                                                "hybrid": _approach3(0.084, 117.6, math.inf)})
    by_arch = {line.split(":")[0]: line for line in lines}
    assert "Degenerate" not in by_arch["softmax"]
    assert "Degenerate" in by_arch["lightning"] and "Degenerate" in by_arch["hybrid"]


def _gaps(rel, lo, hi, mult=1.04):
    return compare.ArchComparison("softmax", {}, pd.DataFrame([{
        "arch": "hybrid", "C": 3.6e20, "rel_gap": rel, "rel_gap_lo": lo, "rel_gap_hi": hi,
        "multiplier": mult, "multiplier_lo": 0.97, "multiplier_hi": 1.12}]))


def test_gap_summary_reads_in_percent_with_intervals_in_brackets():
    """compare's terminal table: 6 columns instead of the frame's 18, the gap in percent as the findings give it."""
    c = _gaps(0.0152, -0.0072, 0.0216)
    c.gaps = c.gaps.assign(loss=2.5, baseline_loss=2.46)
    t = compare.gap_summary(c)
    assert list(t.columns) == ["arch", "C (FLOPs)", "loss", "softmax loss", "gap % [95%]", "compute multiplier [95%]"]
    row = t.iloc[0]
    assert row["gap % [95%]"] == "+1.52 [-0.72, +2.16]" and row["compute multiplier [95%]"] == "1.04 [0.97, 1.12]"
    assert row["C (FLOPs)"] == "3.6e+20" and row["loss"] == "2.5"
    c = _gaps(0.01, np.nan, np.nan)
    c.gaps = c.gaps.assign(loss=2.5, baseline_loss=2.46)
    assert compare.gap_summary(c).iloc[0]["gap % [95%]"] == "+1.00"  # no bootstrap: no brackets


def test_findings_state_no_direction_when_the_interval_holds_no_difference():
    [line] = compare.summary_findings(_gaps(0.0052, -0.0072, 0.0216))
    assert "cannot be told from softmax's" in line and "+0.52%" in line
    assert "above" not in line and "below" not in line
    [line] = compare.summary_findings(_gaps(0.0152, 0.0072, 0.0216))
    assert "1.52% above softmax's" in line and "1.04x the compute" in line  # 1.04, not rounded to "1x"


def test_a_gap_that_held_out_loss_contradicts_is_flagged():
    # the smoke report called mamba2 20% below softmax on training loss while its validation loss was 16% above
    runs = pd.DataFrame({"arch": ["softmax", "softmax", "hybrid", "hybrid"], "val_loss": [0.80, 0.75, 0.90, 0.87]})
    [line] = compare.summary_findings(_gaps(-0.20, -0.45, -0.15), runs=runs)
    assert "20.00% below softmax's" in line
    assert "Held-out loss disagrees: hybrid's best validation loss is +16.0% from softmax's (0.87 against 0.75 nats)" in line
    [line] = compare.summary_findings(_gaps(0.0152, 0.0072, 0.0216), runs=runs)  # same direction: no caveat
    assert "Held-out" not in line
    [line] = compare.summary_findings(_gaps(-0.20, -0.45, -0.15), runs=runs.assign(val_loss=[0.80, 0.75, 0.70, 0.87]))
    assert "Held-out" not in line
    [line] = compare.summary_findings(_gaps(0.0052, -0.0072, 0.0216), runs=runs.assign(val_loss=[0.8, 0.9, 0.5, 0.6]))
    assert "Held-out" not in line  # no direction stated, nothing to contradict


def test_approach3_finding_quotes_the_budget_inside_the_data_or_says_it_extrapolates():
    fit = _approach3(0.34, 0.28, 20.0)
    fit.points = pd.DataFrame({"C": [1e17, 1.2e18]})
    fit.estimates = {**fit.estimates, "tokens_per_param@1e+18": 18.0, "tokens_per_param@1e+19": 25.0}
    del fit.estimates["tokens_per_param@5e+12"]
    [line] = compare.summary_findings(approach3={"softmax": fit})
    assert "at C=1e+18 FLOPs: 18" in line and "extrapolated" not in line
    del fit.estimates["tokens_per_param@1e+18"]
    [line] = compare.summary_findings(approach3={"softmax": fit})
    assert "at C=1e+19 FLOPs, extrapolated beyond the data's largest compute (1.2e+18): 25" in line


def _undertrained(arch, sizes):
    """A smoke-study design: a few sizes, each trained to 3 tokens per parameter, with curves (the smallest
    model is the best at most budgets, so the compute-optimal frontier is not identified)."""
    from analysis.fits import chinchilla_law
    from analysis.synthetic import HOFFMANN, curves_for

    N = np.asarray(sizes, float)
    runs = runs_frame(N, 3 * N, chinchilla_law(N, 3 * N, **HOFFMANN), arch=arch, prefix=arch)
    return runs, curves_for(runs, n_steps=30, seed=len(arch))


def test_an_unidentified_frontier_is_refused_or_fitted_as_the_envelope_when_asked():
    from analysis.fits import FrontierNotIdentified, fit_loss_compute

    runs, metrics = _undertrained("softmax", [2e6, 6e6, 1.4e7])
    with pytest.raises(FrontierNotIdentified, match="--edges keep"):
        fit_loss_compute(runs, metrics=metrics, n_bootstrap=0)
    f = fit_loss_compute(runs, metrics=metrics, edges="keep", n_bootstrap=0)
    assert f.details["edges"] == "keep" and f.n_points >= 3
    # auto: the envelope, saying why; on an identified frontier, the frontier as drop fits it
    auto = fit_loss_compute(runs, metrics=metrics, edges="auto", n_bootstrap=0)
    assert auto.details["edges"] == "keep" and "not identified" in auto.details["unidentified"]
    assert auto.estimates == f.estimates
    s = study(150, archs=("lightning",), n_steps=12, seed=1)
    identified = fit_loss_compute(s.runs, metrics=s.metrics, edges="auto", n_bootstrap=0)
    assert identified.details["edges"] == "drop" and "unidentified" not in identified.details
    assert identified.estimates == fit_loss_compute(s.runs, metrics=s.metrics, n_bootstrap=0).estimates


def test_comparison_fits_every_arch_alike_when_one_frontier_is_not_identified():
    soft, soft_m = _undertrained("softmax", [2e6, 6e6, 1.4e7])
    s = study(150, archs=("lightning",), n_steps=12, seed=1)  # identified: sizes span 8M-1.1B
    runs = pd.concat([soft, s.runs], ignore_index=True)
    metrics = pd.concat([soft_m, s.metrics], ignore_index=True)
    auto = compare.compare_archs(runs, metrics=metrics, n_bootstrap=0)
    assert {f.details["edges"] for f in auto.fits.values()} == {"keep"}
    assert any("compares envelopes" in line for line in compare.summary_findings(auto))
    fits, errors = compare.fit_per_arch(s.runs, metrics=s.metrics, n_bootstrap=0)
    assert fits["lightning"].details["edges"] == "drop" and not errors


def test_niah_keeps_hybrid_ratios_apart_and_marks_the_training_context(data):
    # the hybrid-ratio ablation's question: before, every hybrid ratio was averaged into one "hybrid"
    t = compare.niah_table(data.runs, data.evals)
    hybrids = {v for v in t["variant"] if v.startswith("hybrid")}
    patterns = {p for p in data.runs.loc[data.runs["arch"] == "hybrid", "hybrid"]}
    assert len(hybrids) == len({compare.hybrid_ratio(p, "hybrid") for p in patterns}) >= 2
    assert set(t.loc[t["variant"] == "softmax", "variant"]) == {"softmax"}
    assert t["in_context"].tolist() == [n <= 1024 for n in t["length"]]
    lines = compare.summary_findings(niah=t)
    inside = next(x for x in lines if x.startswith("Mean NIAH accuracy within the training context"))
    beyond = next(x for x in lines if x.startswith("Mean NIAH accuracy beyond the training context"))
    soft_in = t[(t["variant"] == "softmax") & t["in_context"].eq(True)]["accuracy"].mean()
    assert f"softmax {100 * soft_in:.0f}%" in inside and all(h in inside and h in beyond for h in hybrids)
    # without seq_len the table cannot tell, and the finding says over what it averaged
    no_len = compare.niah_table(data.runs.drop(columns="seq_len"), data.evals)
    assert no_len["in_context"].isna().all()
    assert compare.summary_findings(niah=no_len)[0].startswith("Mean NIAH accuracy over lengths and depths")


def niah_frame(acc: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """A niah_table-shaped frame: per variant, accuracy within and beyond the training context."""
    rows = [{"arch": v.split()[0], "variant": v, "length": n, "depth": 0.5, "accuracy": a, "n_runs": 1, "params": 1e7,
             "in_context": n == 512} for v, (a_in, a_out) in acc.items() for n, a in ((512, a_in), (1024, a_out))]
    return pd.DataFrame(rows)


def test_seed_study_findings_say_what_is_reproduced_from_the_numbers(comparison):
    tput = compare.throughput_table(pd.DataFrame({"arch": ["softmax"] * 2 + ["lightning"] * 2, "seq_len": [2048, 32768] * 2,
                                                  "tokens_per_s": [400e3, 140e3, 430e3, 400e3]}))
    niah = niah_frame({"softmax": (0.9, 0.0), "lightning": (0.3, 0.1), "hybrid 7:1": (0.85, 0.5), "hybrid 31:1": (0.4, 0.1)})
    lines = compare.seed_study_findings(comparison, niah=niah, throughput=tput)
    # the fixture's lightning needs 1.5x softmax's compute: a real loss gap, so "matches" is not reproduced
    assert lines[0].startswith("Not reproduced: lightning matches softmax on loss: lightning's loss is +")
    assert lines[1] == ("Reproduced: lightning fails needle-in-a-haystack where softmax passes: within the training "
                        "context lightning retrieves 30%, softmax 90% (failing means at least 20 points below softmax).")
    assert lines[2].startswith("Reproduced: a hybrid matches or beats softmax on it: hybrid 7:1 retrieves 85%")
    assert lines[3].startswith("Not reproduced: a hybrid matches or beats softmax on it: hybrid 31:1 retrieves 40%")
    assert lines[4].startswith("Reproduced: lightning's training speed stays flat with sequence length while softmax's "
                               "falls: from 2048 to 32768 tokens, lightning keeps 93% of its tokens/s and softmax 35%")
    # a softmax that cannot retrieve is no baseline; no comparison and no throughput: not tested
    weak = compare.seed_study_findings(None, niah=niah_frame({"softmax": (0.3, 0.0), "lightning": (0.2, 0.0)}))
    assert [x.split(":")[0] for x in weak] == ["Not tested"] * 3
    assert "softmax itself retrieves 30% within its context" in weak[1]


def test_seed_study_loss_match_when_the_interval_holds_no_difference():
    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.0, 1)], ignore_index=True)
    same = compare.compare_archs(runs, budgets=[1e18, 1e20], n_bootstrap=200, seed=0)
    assert compare.seed_study_findings(same)[0].startswith("Reproduced: lightning matches softmax on loss")


def test_seed_study_loss_not_tested_and_intervals_unknown_on_few_runs():
    """With 3 runs an arch's bootstrap can only raise the best loss, so its interval is one-sided: the smoke study's
    report had called lightning's loss 'Reproduced' on such intervals, which the CLI itself called unknown."""
    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.0, 1)], ignore_index=True)
    same = compare.compare_archs(runs, budgets=[1e18, 1e20], n_bootstrap=50, seed=0)
    assert not compare.few_runs(same)
    assert not any("read them as unknown" in line for line in compare.summary_findings(same))
    for fit in same.fits.values():
        fit.details["n_runs"] = 3
    assert compare.few_runs(same) == {"lightning": 3, "softmax": 3}
    line = compare.seed_study_findings(same)[0]
    assert line.startswith("Not tested: lightning matches softmax on loss: lightning's loss is ")
    assert "rests on 3 runs of lightning and 3 runs of softmax, too few" in line and "CI" not in line
    assert ("The intervals of lightning and softmax rest on 3 runs each, too few to resample (at least 5 are needed): "
            "read them as unknown.") in compare.summary_findings(same)


def test_loss_table_per_variant_and_size():
    runs = runs_frame(np.array([1e7] * 4), np.array([1e9] * 4), np.array([3.0, 3.2, 2.9, 3.5]), arch="hybrid")
    runs["hybrid"] = ["LLLS", "LLLS", "LLLLLLLS", "LLLLLLLS"]
    t = compare.loss_table(runs)
    assert t["variant"].tolist() == ["hybrid 3:1", "hybrid 7:1"]  # by size, then by mean loss
    assert t["loss"].tolist() == pytest.approx([3.1, 3.2]) and t["best"].tolist() == pytest.approx([3.0, 2.9])
    assert t["n_runs"].tolist() == [2, 2]


def test_seed_speed_uses_the_lengths_both_were_measured_at_and_loss_table_takes_any_loss_column():
    # a hybrid measured at a length the others were not (or softmax out of memory there) no longer hides the finding
    t = compare.throughput_table(pd.DataFrame({
        "arch": ["softmax"] * 2 + ["lightning"] * 2 + ["hybrid"] * 3, "seq_len": [2048, 32768] * 3 + [65536],
        "tokens_per_s": [400e3, 140e3, 430e3, 400e3, 420e3, 300e3, 200e3]}))
    assert compare.seed_study_findings(throughput=t)[-1].startswith("Reproduced: lightning's training speed")
    runs = runs_frame(np.array([1e7, 1e7]), np.array([1e9, np.nan]), np.array([3.0, 3.4]))
    runs = runs[["run_id", "arch", "nonembed_params", "tokens"]].assign(loss=[3.0, 3.4])  # a `loss` column only
    table = compare.loss_table(runs)
    assert table["loss"].notna().all() and table["n_runs"].sum() == 2  # a NaN token count is kept, not dropped
    with pytest.raises(FitError, match="tokens"):
        compare.loss_table(runs.drop(columns=["tokens"]))


def test_a_niah_cell_pooling_a_run_of_unknown_context_is_unknown():
    runs = runs_frame(np.array([1e7, 1e7]), np.array([1e9, 1e9]), np.array([3.0, 3.0]))
    runs["seq_len"] = [512, np.nan]
    evals = pd.DataFrame({"run_id": runs["run_id"], "step": [1, 1], "name": ["niah/len=512/depth=0"] * 2,
                          "value": [1.0, 0.0]})
    assert compare.niah_table(runs, evals)["in_context"].isna().all()
    runs["seq_len"] = [512, 512]
    assert compare.niah_table(runs, evals)["in_context"].tolist() == [True]


def test_findings_give_no_interval_or_verdict_for_a_gap_resting_on_few_runs():
    """The smoke report said the intervals of 3-run archs are unknown, then quoted them: 'hgrn2's frontier loss is
    9.29% below softmax's (95% CI -17.36% to -8.30%)', an interval excluding no difference, and 'hybrid's frontier
    loss cannot be told from softmax's', a verdict drawn from such an interval."""
    from analysis.fits import FitResult

    def with_runs(c, n):
        fit = FitResult("frontier", "", {}, {}, np.array([]), pd.DataFrame(), 0, 0, True, details={"n_runs": n})
        c.fits = {"hybrid": fit, "softmax": fit}
        return c

    lines = compare.summary_findings(with_runs(_gaps(-0.0929, -0.1736, -0.0830, mult=0.706), 3))
    [line] = [x for x in lines if x.startswith("hybrid's")]
    assert "9.29% below softmax's at C=3.6e+20 FLOPs" in line and "0.706x the compute" in line
    assert "CI" not in line and "3 runs of hybrid and 3 of softmax, too few to tell" in line
    [line] = [x for x in compare.summary_findings(with_runs(_gaps(0.0052, -0.0072, 0.0216), 3)) if x.startswith("hy")]
    assert "cannot be told" not in line and "0.52% above" in line and "too few to tell" in line
    [line] = compare.summary_findings(with_runs(_gaps(-0.0929, -0.1736, -0.0830, mult=0.706), 5))
    assert "(95% CI -17.36% to -8.30%)" in line  # enough runs: the interval stands


def test_findings_warn_when_the_runs_train_on_several_data_mixtures():
    """Validation losses of different mixtures do not compare (README), yet a report over such runs fitted and
    compared them without a word."""
    runs = pd.DataFrame({"arch": ["softmax", "lightning"], "val_loss": [2.0, 2.1],
                         "data": ["stdlib", "stdlib+passkey@0.1"]})
    [line] = compare.summary_findings(runs=runs)
    assert "2 data mixtures (stdlib, stdlib+passkey@0.1)" in line and "do not compare" in line
    assert not compare.summary_findings(runs=runs.assign(data="stdlib"))


def test_an_arch_on_fewer_than_5_runs_has_unknown_intervals_and_so_have_its_gaps():
    """The report gives an arch of fewer than MIN_BOOTSTRAP_RUNS runs no interval, yet the comparison, which slab
    compare prints and its --json gives, carried numbers for it: a one-sided interval from 4 runs."""
    few = frontier_runs("lightning", 1.5, 1, n=4).iloc[:4]  # its 4 frontier runs
    runs = pd.concat([frontier_runs("softmax", 1.0, 0), few], ignore_index=True)
    c = compare.compare_archs(runs, budgets=[1e18, 1e20], n_bootstrap=100, seed=0)
    assert c.fits["lightning"].details["n_runs"] == 4
    assert all(math.isnan(x) for lo_hi in c.fits["lightning"].intervals.values() for x in lo_hi)
    assert "too few to resample" in c.fits["lightning"].details["intervals_unknown"]
    assert all(lo < hi for lo, hi in c.fits["softmax"].intervals.values())  # 28 runs: its intervals stand
    bounds = c.gaps[[k for k in c.gaps.columns if k.endswith(("_lo", "_hi"))]]
    assert bounds.isna().all().all() and c.gaps["gap"].notna().all()
    summary = compare.gap_summary(c)
    assert summary["gap % [95%]"].str.endswith(" [unknown]").all()
    assert summary["compute multiplier [95%]"].str.endswith(" [unknown]").all()
    data = json.loads(json.dumps(c.to_dict()))
    assert data["fits"]["lightning"]["intervals"]["alpha"] == [None, None] and data["gaps"][0]["gap_lo"] is None


def test_unknown_on_few_runs_leaves_fits_on_enough_runs_or_without_a_bootstrap_as_they_are():
    from analysis.fits import fit_loss_compute

    runs = frontier_runs("softmax", 1.0, 0, n=4).iloc[:4]
    fit = fit_loss_compute(runs, n_bootstrap=50, seed=0)
    assert compare.unknown_on_few_runs(fit, 5) is not fit  # its details' count (4) is the one it rests on
    unknown = compare.unknown_on_few_runs(fit)
    assert all(math.isnan(x) for lo_hi in unknown.intervals.values() for x in lo_hi)
    assert not any(math.isnan(x) for lo_hi in fit.intervals.values() for x in lo_hi)  # the fit given is not changed
    assert compare.unknown_on_few_runs(fit_loss_compute(runs, n_bootstrap=0)).intervals == {}
    many = fit_loss_compute(frontier_runs("softmax", 1.0, 0), n_bootstrap=50, seed=0)
    assert compare.unknown_on_few_runs(many) is many


def _empty_metrics():
    """The metrics frame of runs without training curves, as db.queries.metrics_frame returns it."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("run_id", object), ("step", "int64"), ("tokens", "int64"),
                         ("flops", "float64"), ("loss", "float64"), ("lr", "float64"), ("tokens_per_s", "float64"),
                         ("mfu", "float64"))})


def test_runs_without_training_curves_are_fitted_from_their_final_points():
    """slab fit and slab compare stopped at "metrics frame is empty" on runs with no curves, while slab report fitted
    the same runs from their final points: an empty frame of curves now means final points, as for the report."""
    from analysis.fits import fit_loss_compute

    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.5, 1)], ignore_index=True)
    softmax = runs[runs["arch"] == "softmax"]
    got = fit_loss_compute(softmax, metrics=_empty_metrics(), edges="auto", n_bootstrap=20, seed=3)
    want = fit_loss_compute(softmax, metrics=None, edges="auto", n_bootstrap=20, seed=3)
    assert got.details["source"] == "final" and got.estimates == want.estimates and got.intervals == want.intervals
    both = compare.compare_archs(runs, metrics=_empty_metrics(), budgets=[1e19], n_bootstrap=20, seed=0)
    alone = compare.compare_archs(runs, metrics=None, budgets=[1e19], n_bootstrap=20, seed=0)
    pd.testing.assert_frame_equal(both.gaps, alone.gaps)


def test_an_arch_without_curves_beside_archs_with_them_is_not_fitted_from_other_points():
    """Its final points would make a frontier unlike the others' (from curves): it is left out, saying why."""
    from analysis.synthetic import curves_for

    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.5, 1)], ignore_index=True)
    metrics = curves_for(runs[runs["arch"] == "softmax"], n_steps=20)
    fits, errors = compare.fit_per_arch(runs, metrics=metrics, n_bootstrap=0, on_error="skip")
    assert set(fits) == {"softmax"} and "no training curves while other archs' have" in errors["lightning"]


def test_slab_fit_and_compare_take_a_database_without_curves(tmp_path):
    """The commands, on runs that recorded no metrics: both fit, and agree with each other as the report does."""
    from typer.testing import CliRunner

    from db.engine import open_db, session
    from db.schema import Plan, PlanRun, Run
    from sweep.cli import app

    runs = pd.concat([frontier_runs("softmax", 1.0, 0), frontier_runs("lightning", 1.5, 1)], ignore_index=True)
    url = f"sqlite:///{tmp_path}/slab.db"
    engine = open_db(url)
    with session(engine) as s:
        plan = Plan(name="syn", path="syn.csv", sha256="0" * 64)
        s.add(plan)
        s.flush()
        for i, r in enumerate(runs.itertuples(index=False)):
            s.add(Run(run_id=r.run_id, arch=r.arch, status="done", params=int(r.params),
                      nonembed_params=int(r.nonembed_params), tokens=int(r.tokens), flops=float(r.flops),
                      final_loss=float(r.final_loss), val_loss=float(r.val_loss),
                      spec={"arch": r.arch, "d_model": int(r.d_model), "n_layers": int(r.n_layers)}))
        s.flush()  # the runs before the links to them
        s.add_all(PlanRun(plan_id=plan.id, run_id=r, row=i + 2) for i, r in enumerate(runs["run_id"]))
    engine.dispose()
    fit = CliRunner().invoke(app, ["--db", url, "fit", "--arch", "softmax", "--bootstrap", "10", "--json"])
    assert fit.exit_code == 0, fit.output
    cmp = CliRunner().invoke(app, ["--db", url, "compare", "--bootstrap", "10", "--json"])
    assert cmp.exit_code == 0, cmp.output
    fitted, compared = json.loads(fit.stdout), json.loads(cmp.stdout)["fits"]["softmax"]
    assert fitted["details"]["source"] == "final" and fitted["estimates"] == pytest.approx(compared["estimates"])
    # approach 1 does need curves: the error says these runs have none, not to leave --csv (no --csv was given)
    one = CliRunner().invoke(app, ["--db", url, "fit", "--arch", "softmax", "--method", "1"])
    assert one.exit_code == 2 and "these runs recorded none" in one.output and "--csv" not in one.output, one.output


def test_an_estimate_outside_its_own_interval_is_flagged():
    # the synthetic study had read "+3.89% (95% CI -0.13% to +3.64%)" with no word on the estimate lying outside it
    [line] = compare.summary_findings(_gaps(0.0389, -0.0013, 0.0364))
    assert "cannot be told from softmax's" in line and "+3.89% (95% CI -0.13% to +3.64%, which leaves out the " \
        "estimate itself" in line
    [line] = compare.summary_findings(_gaps(0.0152, 0.0072, 0.0216))
    assert "leaves out" not in line
    [line] = compare.summary_findings(_gaps(0.0452, 0.0072, 0.0216))
    assert "4.52% above softmax's at C=3.6e+20 FLOPs (95% CI +0.72% to +2.16%, which leaves out" in line

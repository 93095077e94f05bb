"""slab fit / compare / report on a database holding a synthetic study, and on an external CSV."""
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from typer.testing import CliRunner

from analysis.synthetic import HOFFMANN, study
from db.engine import open_db, session
from db.schema import Eval, Metric, Plan, PlanRun, Run
from sweep.cli import app


@pytest.fixture(scope="module")
def study_db(tmp_path_factory):
    """A SQLite file with a finished synthetic study (runs, curves, evals) registered as plan 'syn'."""
    return _study_db(tmp_path_factory.mktemp("db") / "slab.db", ("softmax", "lightning"), 150)


def _study_db(path, archs, n_runs):
    url = f"sqlite:///{path}"
    s = study(n_runs, archs=archs, n_steps=12, seed=1)
    engine = open_db(url)
    with session(engine) as db:
        plan = Plan(name="syn", path="syn.csv", sha256="0" * 64)
        db.add(plan)
        db.flush()
        for i, r in enumerate(s.runs.itertuples(index=False)):
            spec = {"arch": r.arch, "d_model": int(r.d_model), "n_layers": int(r.n_layers), "n_heads": int(r.n_heads), "hybrid": r.hybrid}
            db.add(Run(run_id=r.run_id, arch=r.arch, status="done", params=int(r.params), nonembed_params=int(r.nonembed_params),
                       tokens=int(r.tokens), flops=float(r.flops), final_loss=float(r.final_loss), val_loss=float(r.val_loss), spec=spec))
        db.flush()
        db.add_all(PlanRun(plan_id=plan.id, run_id=r, row=i + 2) for i, r in enumerate(s.runs["run_id"]))
        db.flush()
        db.execute(Metric.__table__.insert(), s.metrics[["run_id", "step", "tokens", "flops", "loss", "lr"]].to_dict("records"))
        db.execute(Eval.__table__.insert(), s.evals[["run_id", "step", "name", "value"]].to_dict("records"))
    engine.dispose()
    return url


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_fit_methods_store_and_print(study_db):
    # one law over two archs would mix them: refused, naming them, and nothing stored
    mixed = invoke("--db", study_db, "fit", "--method", "3", "--bootstrap", "30", "--json")
    assert mixed.exit_code == 2 and "2 architectures (lightning, softmax)" in mixed.stderr and "--arch" in mixed.stderr
    result = invoke("--db", study_db, "fit", "--method", "3", "--arch", "lightning", "--bootstrap", "30", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    n_lightning = json.loads(invoke("--db", study_db, "sql", "select count(*) as n from runs where arch = 'lightning'",
                                    "--json").stdout)[0]["n"]
    assert data["method"] == "approach3" and data["n_points"] == n_lightning > 0
    assert abs(data["estimates"]["alpha"] - HOFFMANN["alpha"]) < 0.1
    table = invoke("--db", study_db, "fit", "--plan", "syn", "--arch", "softmax", "--bootstrap", "20")
    assert table.exit_code == 0 and "alpha" in table.stdout and "95% low" in table.stdout
    stored = json.loads(invoke("--db", study_db, "sql", "select method, arch from fits order by id", "--json").stdout)
    assert stored == [{"method": "approach3", "arch": "lightning"}, {"method": "frontier", "arch": "softmax"}]


def test_fit_falls_back_to_the_envelope_as_compare_does_on_the_committed_smoke_study(tmp_path):
    """docs/smoke/smoke.db: 3 sizes at 3 tokens per parameter, so the frontier is not identified. fit (whose default
    had been drop) now fits the envelope and says so, as compare and report do; --edges drop still refuses."""
    import shutil
    from pathlib import Path

    db = tmp_path / "smoke.db"
    shutil.copy(Path(__file__).parents[2] / "docs" / "smoke" / "smoke.db", db)
    url = f"sqlite:///{db}"
    auto = invoke("--db", url, "fit", "--plan", "smoke-h100", "--arch", "softmax", "--bootstrap", "20", "--json")
    assert auto.exit_code == 0, auto.output
    assert "fitted the runs' envelope instead" in auto.stderr and "too few to resample" in auto.stderr
    assert json.loads(auto.stdout)["details"]["edges"] == "keep"
    drop = invoke("--db", url, "fit", "--plan", "smoke-h100", "--arch", "softmax", "--edges", "drop")
    assert drop.exit_code == 2 and "the compute-optimal frontier is not identified" in drop.stderr


def test_compare_heads_niah_lengths_beyond_the_training_context_as_the_report_does(tmp_path):
    # slab compare had printed "len 1024" bare: softmax's 0 there read as a retrieval failure, not RoPE past its context
    import shutil
    from pathlib import Path

    db = tmp_path / "smoke.db"
    shutil.copy(Path(__file__).parents[2] / "docs" / "smoke" / "smoke.db", db)
    result = invoke("--db", f"sqlite:///{db}", "compare", "--plan", "smoke-h100", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "len 1024 (beyond training context)" in text and "len 512 (beyond" not in text


def test_report_input_errors_name_what_is_wrong_first(study_db, tmp_path):
    # the throughput CSV is read before the runs: a wrong path fails at once, even with no database there
    missing = invoke("--db", f"sqlite:///{tmp_path}/none.db", "report", "--out", tmp_path / "r", "--throughput",
                     tmp_path / "nothere.csv")
    assert missing.exit_code == 2 and "nothere.csv: cannot read the throughput CSV" in missing.stderr
    # a file where the figures folder goes: the message names it
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "figures").write_text("")
    blocked = invoke("--db", study_db, "report", "--plan", "syn", "--out", tmp_path / "o", "--bootstrap", "0")
    assert blocked.exit_code == 2 and f"File exists: {tmp_path / 'o' / 'figures'}" in blocked.stderr


def test_fit_compare_and_report_share_one_bootstrap_default():
    """compare (1000) and report (200) had printed different intervals for the same runs by default."""
    import typer.main

    from analysis.fits import CLI_BOOTSTRAP

    commands = typer.main.get_command(app).commands
    for name in ("fit", "compare", "report"):
        option = next(p for p in commands[name].params if p.name == "bootstrap")
        assert option.default == CLI_BOOTSTRAP, name


def test_fit_and_report_print_the_same_intervals_for_every_arch(study_db, tmp_path):
    # an arch's bootstrap was seeded by its place among the archs fitted together (seed + i): slab fit --seed 0
    # matched the report for the first arch alone, and an arch's intervals moved when another was added
    rep = invoke("--db", study_db, "report", "--plan", "syn", "--out", tmp_path / "r", "--bootstrap", "10")
    assert rep.exit_code == 0, rep.output
    assert "fits.json" in rep.output.splitlines()[-1]  # its closing line names every document it wrote
    fitted = json.loads((tmp_path / "r" / "fits.json").read_text())
    for arch in ("lightning", "softmax"):
        for method, key, law in (("frontier", "frontier", {"E", "A", "alpha"}), ("2", "approach2", {"a", "b"})):
            fit = invoke("--db", study_db, "fit", "--arch", arch, "--method", method, "--bootstrap", "10", "--json")
            assert fit.exit_code == 0, fit.output
            got, want = json.loads(fit.stdout)["intervals"], fitted[f"{key}/{arch}"]["intervals"]
            # the report reads approach 2's tokens per parameter at budgets shared by every arch, fit at its own
            shared = got.keys() & want.keys()
            assert law <= shared and {k: got[k] for k in shared} == {k: want[k] for k in shared}, (arch, method)
    lone = tmp_path / "lone.db"  # the same softmax runs, with no other arch beside them
    lone.write_bytes(Path(study_db.removeprefix("sqlite:///")).read_bytes())
    engine = open_db(f"sqlite:///{lone}")
    with session(engine) as db:
        gone = [r for (r,) in db.execute(select(Run.run_id).where(Run.arch == "lightning"))]
        for table in (Metric, Eval, PlanRun, Run):
            db.execute(delete(table).where(table.run_id.in_(gone)))
    engine.dispose()
    alone = invoke("--db", f"sqlite:///{lone}", "report", "--out", tmp_path / "s", "--bootstrap", "10")
    assert alone.exit_code == 0, alone.output
    intervals = json.loads((tmp_path / "s" / "fits.json").read_text())["frontier/softmax"]["intervals"]
    assert intervals == fitted["frontier/softmax"]["intervals"]


def test_compare_and_report(study_db, tmp_path):
    result = invoke("--db", study_db, "compare", "--bootstrap", "20", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["baseline"] == "softmax"
    out = tmp_path / "report"
    rep = invoke("--db", study_db, "report", "--plan", "syn", "--out", out, "--bootstrap", "10")
    assert rep.exit_code == 0, rep.output
    assert "against the seed study (MiniMax-01):\n- " in rep.stdout and "Against the seed study" in (out / "report.md").read_text()
    kept = invoke("--db", study_db, "report", "--plan", "syn", "--out", tmp_path / "kept", "--bootstrap", "0", "--edges", "keep")
    fitted = json.loads((tmp_path / "kept" / "fits.json").read_text())
    assert kept.exit_code == 0 and {f["details"]["edges"] for k, f in fitted.items() if k.startswith("frontier/")} == {"keep"}
    assert invoke("--db", study_db, "report", "--out", tmp_path / "x", "--edges", "none").exit_code == 2
    assert (out / "index.html").exists() and (out / "report.md").exists()
    assert list((out / "figures").glob("*.png")) and list((out / "figures").glob("*.svg"))


def test_bad_analysis_input_exits_2(study_db, tmp_path):
    assert invoke("--db", study_db, "fit", "--plan", "nope").exit_code == 2
    assert invoke("--db", study_db, "fit", "--arch", "mamba2").exit_code == 2
    assert invoke("--db", study_db, "compare", "--baseline", "hgrn2").exit_code == 2
    # --edges is a rule of the loss-compute fits; the approaches would have ignored it
    result = invoke("--db", study_db, "fit", "--method", "2", "--edges", "keep")
    assert result.exit_code == 2 and "--edges applies to --method frontier and power" in result.stderr
    result = invoke("--db", study_db, "fit", "--arch", "softmax", "--edges", "all")
    assert result.exit_code == 2 and "--edges must be auto, drop or keep" in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1e6,3.0\n")
    result = invoke("fit", "--csv", bad)
    assert result.exit_code == 2 and "bad.csv" in result.stderr
    empty = f"sqlite:///{tmp_path}/empty.db"
    open_db(empty).dispose()
    result = invoke("--db", empty, "report", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "no finished runs" in result.stderr
    assert not (tmp_path / "r").exists()


def test_fit_external_csv(tmp_path):
    import numpy as np

    from analysis.fits import chinchilla_law

    rng = np.random.default_rng(0)
    N = np.repeat([1e7, 3e7, 1e8, 3e8, 1e9], 6)
    D = N * np.tile([5, 10, 20, 40, 80, 160], 5)
    L = chinchilla_law(N, D, **HOFFMANN) * np.exp(0.003 * rng.standard_normal(N.size))
    path = tmp_path / "chin.csv"
    path.write_text("Model Size,Training FLOP,loss\n" + "".join(f"{n},{6 * n * d},{l}\n" for n, d, l in zip(N, D, L)))
    result = invoke("fit", "--csv", path, "--params-col", "Model Size", "--flops-col", "Training FLOP", "--method", "3", "--bootstrap", "20", "--json")
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)["estimates"]
    assert abs(est["E"] - HOFFMANN["E"]) < 0.15 and abs(est["beta"] - HOFFMANN["beta"]) < 0.08


def test_compare_with_only_the_baseline_exits_2(tmp_path):
    url = _study_db(tmp_path / "one.db", ("softmax",), 20)
    result = invoke("--db", url, "compare", "--bootstrap", "5")
    assert result.exit_code == 2 and "nothing to compare" in result.stderr


def test_fit_on_few_runs_warns_and_no_bootstrap_prints_no_nan(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text("params,tokens,loss\n1e6,2e7,4.0\n3e6,6e7,3.6\n1e7,2e8,3.3\n3e7,6e8,3.1\n")
    few = invoke("fit", "--csv", path, "--method", "power", "--bootstrap", "10")
    assert few.exit_code == 0, few.output
    assert "the fit rests on 4 runs, too few to resample (at least 5 are needed): its intervals are unknown" in few.stderr
    none = invoke("fit", "--csv", path, "--method", "power", "--bootstrap", "0")
    assert none.exit_code == 0, none.output
    assert "nan" not in none.stdout and "resample" not in none.stderr


def test_fit_says_how_many_replicates_failed_and_when_its_intervals_are_unknown(tmp_path):
    # the count and the unknown intervals had been in the fit's details only: the table looked like any other
    # five runs (fewer are not resampled at all): three frontier points and two runs they dominate, so that a replicate
    # fits only when it draws all three
    path = tmp_path / "five.csv"
    path.write_text("params,tokens,loss\n1e8,2e9,3.1\n3e8,6e9,2.8\n1e9,2e10,2.6\n1e9,3.333e10,3.0\n2e9,1.667e10,3.05\n")
    result = invoke("fit", "--csv", path, "--method", "frontier", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    title = " ".join(result.stdout.split())
    # most replicates fail: the bootstrap stops once more than half of the 50 have
    found = re.search(r"50 bootstraps, stopped after (\d+) \((\d+) failed\)", title)
    assert found and int(found[2]) == 26 and int(found[1]) < 50, result.stdout
    assert "bootstrap replicates could not be fitted" in result.stderr and "intervals" in result.stderr
    assert result.stderr.count("could not be fitted") == 1


def test_report_and_fit_refuse_options_they_would_ignore(study_db, tmp_path):
    # a misspelt arch is named as one (it had been said to have no finished runs), by compare too
    for command in (["report", "--out", tmp_path / "r"], ["compare"]):
        result = invoke("--db", study_db, *command, "--baseline", "sofmax", "--bootstrap", "0")
        assert result.exit_code == 2 and "--baseline: unknown arch 'sofmax'; expected one of softmax" in result.stderr
    assert not (tmp_path / "r").exists()
    (tmp_path / "afile").write_text("")
    result = invoke("--db", study_db, "report", "--out", tmp_path / "afile", "--bootstrap", "0")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    path = tmp_path / "ext.csv"
    path.write_text("params,tokens,loss\n1e6,2e7,4.0\n3e6,6e7,3.6\n1e7,2e8,3.3\n3e7,6e8,3.1\n")
    result = invoke("fit", "--csv", path, "--arch", "lightning")
    assert result.exit_code == 2 and "--arch selects runs of the database" in result.stderr


def test_compare_warns_for_an_arch_with_few_runs(tmp_path):
    url = _study_db(tmp_path / "few.db", ("softmax", "lightning"), 6)
    result = invoke("--db", url, "compare", "--bootstrap", "5")
    assert "lightning has 3 runs: there is little to resample" in result.stderr, result.output


def test_bad_throughput_values_and_database_fit_with_csv_options_exit_2(study_db, tmp_path):
    tp = tmp_path / "tp.csv"
    tp.write_text("arch,seq_len,tokens_per_s\nsoftmax,2048,abc\nlightning,2048,1000\n")
    result = invoke("--db", study_db, "report", "--out", tmp_path / "r", "--throughput", tp, "--bootstrap", "0")
    assert result.exit_code == 2 and "column 'tokens_per_s' must be a positive number; bad on line(s) 2" in result.stderr
    assert not (tmp_path / "r").exists()  # it had left figures and no report
    result = invoke("--db", study_db, "fit", "--arch", "softmax", "--params-col", "foo", "--loss-col", "bar")
    assert result.exit_code == 2 and "--params-col, --loss-col name columns of a --csv file" in result.stderr
    path = tmp_path / "dup.csv"
    rows = "".join(f"{n:.3g},{20 * n:.3g},{2 + 400 / n ** 0.3:.4f}\n" for n in (1e6, 3e6, 1e7, 3e7, 1e8))
    path.write_text("params,tokens,loss\n" + rows + rows.splitlines()[0] + "\n")
    result = invoke("fit", "--csv", path, "--method", "power", "--bootstrap", "0")
    assert result.exit_code == 0 and "dup.csv: 1 row(s) repeat an earlier row exactly" in result.stderr


def test_report_states_few_runs_once(tmp_path):
    # it printed a warning on stderr and then the same as a finding
    url = _study_db(tmp_path / "few.db", ("softmax", "lightning"), 6)
    result = invoke("--db", url, "report", "--out", tmp_path / "r", "--bootstrap", "5")
    assert result.exit_code == 0, result.output
    assert "little to resample" not in result.stderr
    assert "rest on 3 runs each, too few to resample" in result.stdout
    alone = invoke("--db", _study_db(tmp_path / "one.db", ("softmax",), 3), "report", "--out", tmp_path / "s", "--bootstrap", "5")
    assert alone.exit_code == 0 and "softmax has 3 runs: there is little to resample" in alone.stderr, alone.output


def test_compare_of_a_one_size_ablation_shows_retrieval_by_ratio_and_exits_2(tmp_path):
    # plans/hybrid-ratio.csv's shape: every variant at one size, so no loss-compute law; before, compare exited 2
    # with nothing else, and the report pooled every hybrid ratio into one "hybrid"
    url = f"sqlite:///{tmp_path}/ablation.db"
    engine = open_db(url)
    variants = [("softmax", ""), ("lightning", ""), ("hybrid", "LLLS" * 8), ("hybrid", "LLLLLLLS" * 4)]
    with session(engine) as db:
        for i, (arch, pattern) in enumerate(variants):
            for seed in (0, 1):
                run_id = f"r{i}{seed}"
                spec = {"arch": arch, "d_model": 256, "n_layers": 32, "n_heads": 4, "hybrid": pattern, "seq_len": 1024}
                db.add(Run(run_id=run_id, arch=arch, status="done", params=26_000_000, nonembed_params=25_000_000,
                           tokens=500_000_000, flops=8e16, final_loss=1.0 + i / 10, val_loss=1.1 + i / 10 + seed / 100, spec=spec))
                db.flush()
                db.execute(Eval.__table__.insert(), [
                    {"run_id": run_id, "step": 100, "name": f"niah/len={n}/depth=0.25", "value": (0.9, 0.1, 0.8, 0.5)[i]}
                    for n in (1024, 2048)])
    engine.dispose()
    result = invoke("--db", url, "compare")
    assert result.exit_code == 2 and "no loss comparison" in result.stderr
    assert "final loss by variant and size" in result.stdout
    for variant in ("softmax", "lightning", "hybrid 3:1", "hybrid 7:1"):
        assert variant in result.stdout
    assert "1.105" in result.stdout  # softmax's mean final validation loss over its two seeds
    # NIAH in percent, as the findings are, with the depth as it was (not rounded to 0.2)
    assert re.search(r"softmax\s*│\s*0\.25\s*│\s*90(\.0)?\s*│\s*90(\.0)?\s*│", result.stdout), result.stdout


def test_fit_help_example_runs_as_written(study_db):
    # its example fitted plan isoflop without --arch: the plan holds softmax and lightning, so it was refused
    import shlex

    text = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "300"}).output
    example = next(line.split("Example:", 1)[1] for line in text.splitlines() if "Example: slab fit --plan" in line)
    args = shlex.split(example.replace("│", ""))[2:]  # after 'slab fit'
    args[args.index("--plan") + 1] = "syn"  # the synthetic study's plan, of the same two archs as plans/isoflop.csv
    args[args.index("--bootstrap") + 1] = "10"
    result = invoke("--db", study_db, "fit", *args)
    assert result.exit_code == 0, result.output


def _intervals_shown(stdout: str) -> list[list[str]]:
    """The 95% low and high cells of each row of `slab fit`'s table."""
    return [[c.strip() for c in line.split("│")[3:5]] for line in stdout.splitlines() if line.count("│") == 5]


def test_fit_on_fewer_than_5_runs_shows_its_intervals_as_unknown_as_the_report_does(tmp_path):
    """On 2 runs slab fit printed 'alpha 0.3292 0.3292 0.3292' (one replicate's spread: none), on 3 an interval with the
    estimate at its edge, beside a warning to read them as unknown; the report gives such archs no interval."""
    url = _study_db(tmp_path / "two.db", ("softmax",), 2)
    table = invoke("--db", url, "fit")
    assert table.exit_code == 0, table.output
    shown = _intervals_shown(table.stdout)
    assert len(shown) == 3 and all(cells == ["unknown", "unknown"] for cells in shown), table.stdout
    assert "the fit rests on 2 runs, too few to resample" in table.stderr
    data = json.loads(invoke("--db", url, "fit", "--json").stdout)
    assert data["intervals"] and all(v == [None, None] for v in data["intervals"].values()), data["intervals"]
    stored = json.loads(invoke("--db", url, "sql", "select result from fits", "--json").stdout)
    assert all(json.loads(r["result"])["intervals"] == data["intervals"] for r in stored) and len(stored) == 2
    path = tmp_path / "three.csv"
    path.write_text("params,tokens,loss\n1e6,2e7,4.0\n3e6,6e7,3.6\n1e7,2e8,3.3\n")
    three = invoke("fit", "--csv", path, "--method", "power")
    assert three.exit_code == 0 and _intervals_shown(three.stdout) == [["unknown", "unknown"]] * 2, three.stdout
    # 8 runs are enough to resample: the intervals stand
    enough = json.loads(invoke("--db", _study_db(tmp_path / "eight.db", ("softmax",), 8), "fit", "--json").stdout)
    assert all(lo is not None and lo < hi for lo, hi in enough["intervals"].values()), enough["intervals"]


def test_compare_on_3_runs_an_arch_shows_its_gaps_intervals_as_unknown(tmp_path):
    """compare printed '+0.07 [-1.87, +11.39]' for archs of 3 runs each, which the report gives no interval."""
    url = _study_db(tmp_path / "few.db", ("softmax", "lightning"), 6)
    table = invoke("--db", url, "compare", "--bootstrap", "50")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if line.startswith("│ lightning │ ") and "e+" in line]
    assert len(rows) == 3 and all(line.count("[unknown]") == 2 for line in rows), table.stdout
    data = json.loads(invoke("--db", url, "compare", "--bootstrap", "50", "--json").stdout)
    bounds = [v for row in data["gaps"] for k, v in row.items() if k.endswith(("_lo", "_hi"))]
    assert bounds and all(v is None for v in bounds), data["gaps"]
    assert all(v == [None, None] for f in data["fits"].values() for v in f["intervals"].values())


def test_fit_on_a_read_only_database_prints_the_fit_and_warns_that_it_was_not_stored(tmp_path, monkeypatch):
    """It had computed the fit, then exited 2 with nothing on stdout: 'the fit was made but not saved'."""
    import db.engine

    url = _study_db(tmp_path / "ro.db", ("softmax",), 20)
    monkeypatch.setattr(db.engine, "_writable", lambda path: False)  # as a file this process may not write (not root)
    table = invoke("--db", url, "fit", "--bootstrap", "20")
    assert table.exit_code == 0, table.output
    assert "alpha" in table.stdout and "95% low" in table.stdout
    assert table.stderr.strip().splitlines()[-1].startswith("warning: the fit was not stored in the fits table: cannot "
                                                            "write the database"), table.stderr
    data = json.loads(invoke("--db", url, "fit", "--bootstrap", "20", "--json").stdout)
    assert "fit_id" not in data and data["method"] == "frontier"
    monkeypatch.undo()
    assert json.loads(invoke("--db", url, "sql", "select count(*) as n from fits", "--json").stdout) == [{"n": 0}]
    assert "fit_id" in json.loads(invoke("--db", url, "fit", "--bootstrap", "20", "--json").stdout)


@pytest.mark.parametrize("command", ["fit", "compare", "report"])
def test_edges_help_gives_its_default_as_the_other_options_do(command):
    # fit's --edges (None, so that methods 1-3 can refuse it when given) had shown no [default: auto]
    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "--edges" in line)
    end = next(i for i in range(start + 1, len(lines)) if re.match(r"[│|]\s+-", lines[i]))
    assert "[default: auto]" in " ".join(lines[start:end]), "\n".join(lines[start:end])


def test_fit_on_too_few_runs_runs_no_bootstrap_and_says_so(tmp_path):
    # 200000 replicates had run (17 s) for intervals then discarded, and the title claimed them
    path = tmp_path / "three.csv"
    path.write_text("params,tokens,loss\n1e6,2e7,3.1\n2e6,4e7,2.9\n4e6,8e7,2.7\n")
    result = invoke("fit", "--csv", path, "--bootstrap", "200000")
    assert result.exit_code == 0, result.output
    title = " ".join(result.stdout.split())
    assert "bootstrap skipped: too few runs to resample" in title and "200000" not in title, result.stdout
    assert result.stdout.count("unknown") == 6
    stderr = " ".join(result.stderr.split())
    assert "the fit rests on 3 runs, too few to resample (at least 5 are needed): its intervals are unknown" in stderr
    assert "could not be fitted" not in stderr
    # the frontier's floor ran to 0 on these runs: said, as approach 3's is
    assert "warning: E = " in stderr and "sits at its lower bound 0" in stderr and "every frontier point" in stderr
    data = json.loads(invoke("fit", "--csv", path, "--bootstrap", "200000", "--json").stdout)
    assert data["n_bootstrap"] == 0 and data["details"]["bootstrap_skipped"] == 200000
    assert set(data["intervals"]) == {"E", "A", "alpha"} and all(v == [None, None] for v in data["intervals"].values())
    assert "at_bound" in data["details"]


def test_compare_and_report_skip_the_bootstrap_of_an_arch_on_few_runs(tmp_path):
    url = _study_db(tmp_path / "few.db", ("softmax", "lightning"), 6)
    data = json.loads(invoke("--db", url, "compare", "--bootstrap", "7", "--json").stdout)
    for arch, fit in data["fits"].items():  # 3 runs each: none resampled, none claimed
        assert fit["n_bootstrap"] == 0 and fit["details"]["bootstrap_skipped"] == 7, arch
        assert "too few to resample" in fit["details"]["intervals_unknown"], arch
    result = invoke("--db", url, "report", "--out", tmp_path / "r", "--bootstrap", "7")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "skipped (3 runs: too few to resample)" in md and "7 (3 runs" not in md
    stored = json.loads((tmp_path / "r" / "fits.json").read_text())
    assert all(f["n_bootstrap"] == 0 for k, f in stored.items() if k != "comparison")


def test_compare_warns_of_a_frontier_estimate_at_its_bound(study_db, monkeypatch):
    import analysis.fits

    note = "E = 1e-13 sits at its lower bound 0"
    monkeypatch.setattr(analysis.fits, "_note_frontier_at_bound", lambda *a: {"at_bound": note})
    result = invoke("--db", study_db, "compare", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    stderr = " ".join(result.stderr.split())
    assert f"warning: lightning: {note}" in stderr and f"warning: softmax: {note}" in stderr

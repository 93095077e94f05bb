"""The report writes every file, embeds every figure in one self-contained HTML file, and says what it skipped."""

import base64
import json
import os
import re

import pandas as pd
import pytest

from analysis.fits import FitError, fit_loss_compute
from analysis.report import write_report
from analysis.synthetic import study

FIGURES = {"loss_vs_tokens", "loss_vs_compute", "isoflop", "optimal_allocation", "residuals", "niah", "mqar", "throughput"}


@pytest.fixture(scope="module")
def data():
    return study(150, n_steps=20, seed=1)


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    calls = []
    rf = write_report(data.runs, data.metrics, data.evals, out, throughput=data.throughput, bootstrap=20,
                      title="synthetic study", progress=lambda d, t: calls.append((d, t)))
    return rf, calls


def test_report_writes_every_file(report):
    rf, calls = report
    assert rf.index_html.is_file() and rf.report_md.is_file() and rf.fits_json.is_file()
    assert set(rf.figures) == FIGURES, rf.skipped
    for name, paths in rf.figures.items():
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert b"<svg" in paths["svg"].read_bytes()[:2000], name
    assert rf.skipped == []
    assert calls[-1][0] == calls[-1][1]


def test_html_is_self_contained_and_embeds_every_figure(report):
    rf, _ = report
    text = rf.index_html.read_text()
    # no scheme-qualified URL anywhere (':' is not in the base64 alphabet, so data cannot fake one)
    assert "://" not in text
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.I)
    assert "url(" not in text and "@import" not in text
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {p["png"].read_bytes() for p in rf.figures.values()}
    assert "<h1>synthetic study</h1>" in text


def test_markdown_references_figures_by_relative_path_and_tabulates_fits(report):
    rf, _ = report
    md = rf.report_md.read_text()
    for name in FIGURES:
        assert f"](figures/{name}.png)" in md and f"(figures/{name}.svg)" in md
        assert (rf.report_md.parent / "figures" / f"{name}.png").is_file()
    assert "## Fits" in md and "| arch | E | A | alpha |" in md
    assert re.search(r"\| softmax \| [0-9.e+-]+ \[[0-9.e+-]+, [0-9.e+-]+\]", md)
    assert "## Findings" in md and "frontier loss is" in md


def test_fits_json_holds_every_fit(report):
    rf, _ = report
    payload = json.loads(rf.fits_json.read_text())
    assert {"frontier/softmax", "approach3/softmax", "approach1/lightning", "approach2/hybrid"} <= set(payload)
    assert payload["approach3/softmax"]["method"] == "approach3"
    assert payload["comparison"]["baseline"] == "softmax"


def test_report_skips_figures_without_data_and_says_so(data, tmp_path):
    runs = data.runs[data.runs["arch"].isin(["softmax", "lightning"])]
    rf = write_report(runs, None, None, tmp_path, bootstrap=10)
    assert {"loss_vs_tokens", "niah", "mqar", "throughput"}.isdisjoint(rf.figures)
    assert {"loss_vs_compute", "isoflop", "residuals"} <= set(rf.figures)
    md = rf.report_md.read_text()
    assert "## Not shown" in md
    for why in ("figure loss_vs_tokens: skipped (no training curves", "figure niah: skipped (no NIAH evals",
                "figure throughput: skipped (no throughput table", "approach1/softmax: not fitted (no training curves"):
        assert why in md, why
    assert not (tmp_path / "figures" / "niah.png").exists()
    assert "figure niah: skipped" in rf.index_html.read_text()


def test_a_report_replaces_an_earlier_reports_figures_but_not_a_folder_of_other_files(data, tmp_path):
    """figures/ is replaced whole: a paper's own plot in it had been deleted without a word (exit 0)."""
    runs = data.runs[data.runs["arch"].isin(["softmax", "lightning"])]
    write_report(runs, None, None, tmp_path, bootstrap=0)
    write_report(runs, None, None, tmp_path, bootstrap=0)  # an earlier report's figures alone: replaced
    (tmp_path / "figures" / "my_plot.pdf").write_bytes(b"mine")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"files a report does not write \(my_plot.pdf\)"):
        write_report(runs, None, None, tmp_path, bootstrap=0)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # a folder where a document goes: refused at once (it had failed the last move, after the figures were replaced)
    (tmp_path / "figures" / "my_plot.pdf").unlink()
    (tmp_path / "index.html").unlink()
    (tmp_path / "index.html").mkdir()
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(IsADirectoryError, match="a folder stands where the report writes index.html"):
        write_report(runs, None, None, tmp_path, bootstrap=0)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_report_that_fails_halfway_leaves_the_folder_as_it_was(data, tmp_path, monkeypatch):
    # figures were drawn into the folder as they came: a failure left new figures beside the old documents
    import analysis.report

    runs = data.runs[data.runs["arch"].isin(["softmax", "lightning"])]
    out = tmp_path / "r"
    first = write_report(runs, None, data.evals, out, bootstrap=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "niah" in first.figures

    def broken(*_):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(analysis.report, "_fig_niah", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_report(runs, data.metrics, data.evals, out, bootstrap=0)  # loss_vs_tokens is drawn before niah
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(RuntimeError):
        write_report(runs, None, data.evals, tmp_path / "new", bootstrap=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no new folder, no staging left


def test_a_report_that_cannot_write_its_documents_leaves_the_folder_as_it_was(data, tmp_path, monkeypatch):
    """The documents were written one after another once the new figures were in place: a full disk at report.md left
    new figures and a new fits.json beside the old index.html, and a half-written report.md.tmp."""
    import errno
    from pathlib import Path

    runs = data.runs[data.runs["arch"].isin(["softmax", "lightning"])]
    out = tmp_path / "r"
    write_report(runs, None, data.evals, out, bootstrap=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith("report.md"):
            write_text(self, text[:100], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    for folder in (out, tmp_path / "new"):
        with pytest.raises(OSError, match="No space left"):
            write_report(runs, data.metrics, data.evals, folder, bootstrap=0)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no new folder, no staging left


def test_report_reuses_fits_it_is_given(data, tmp_path):
    runs = data.runs[data.runs["arch"] == "softmax"]
    given = fit_loss_compute(runs, n_bootstrap=5)
    rf = write_report(runs, None, None, tmp_path, bootstrap=5, fits={"frontier/softmax": given})
    assert rf.fits["frontier/softmax"] is given


def test_report_refuses_bad_runs(data, tmp_path):
    with pytest.raises(FitError, match="missing column"):
        write_report(data.runs.drop(columns=["tokens"]), None, None, tmp_path)


def test_fits_json_gives_no_interval_for_an_arch_on_too_few_runs(data, tmp_path):
    """The report called a 4-run arch's intervals unknown, yet fits.json held them as numbers: one-sided intervals
    that a reader of the JSON would take at face value."""
    soft = data.runs[data.runs["arch"] == "softmax"]
    light = data.runs[data.runs["arch"] == "lightning"].sort_values("flops").iloc[::7].iloc[:4]
    rf = write_report(pd.concat([soft, light]), None, None, tmp_path, bootstrap=20)
    # no bootstrap was run for it (its intervals would be discarded): the table says so rather than count replicates
    assert "skipped (4 runs: too few to resample)" in rf.report_md.read_text()
    payload = json.loads(rf.fits_json.read_text())
    few = {k: v for k, v in payload.items() if k.endswith("/lightning")}
    assert set(few) == {"frontier/lightning", "frontier_power/lightning"}
    for key, fit in few.items():
        assert fit["intervals"] and all(v == [None, None] for v in fit["intervals"].values()), key
        assert "rests on 4 runs, too few to resample (at least 5" in fit["details"]["intervals_unknown"], key
        assert fit["estimates"]["alpha"] is not None, key  # the estimates stand
        assert fit["n_bootstrap"] == 0 and fit["details"]["bootstrap_skipped"] == 20, key
    for key in ("frontier/softmax", "approach3/softmax"):  # 30 runs: their intervals stand
        assert "intervals_unknown" not in payload[key]["details"]
        assert payload[key]["intervals"]["alpha"][0] < payload[key]["intervals"]["alpha"][1], key


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_report_goes_into_a_writable_folder_whose_parent_is_not(data, shared_tmp, as_other_user):
    """The figures were staged beside --out, in its parent: `slab report --out $HOME` (or /tmp, or a container's
    mounted /out) failed with Permission denied though the folder itself was writable."""
    runs = data.runs[data.runs["arch"] == "softmax"]
    write_report(runs, None, None, shared_tmp / "warm", bootstrap=0)  # matplotlib's font cache, before the switch
    parent = shared_tmp / "locked"
    out = parent / "out"
    out.mkdir(parents=True)
    out.chmod(0o777)
    parent.chmod(0o555)

    def report():
        rf = write_report(runs, None, None, out, bootstrap=0)
        assert rf.figures and rf.index_html.exists()

    try:
        as_other_user(report)
    finally:
        parent.chmod(0o755)
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["figures", "fits.json", "index.html", "report.md"]

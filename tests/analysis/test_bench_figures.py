"""Figures beside the benchmark tables: drawn from the CSV, told apart by its columns, bad tables refused."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from analysis.bench_figures import BenchTableError, bench_figure

ROOT = Path(__file__).resolve().parents[2]


def _train_rows(mfu=True):
    rows = []
    for arch, rate in (("softmax", [3e5, 2e5, 1e5]), ("lightning", [2.8e5, 2.7e5, 2.8e5])):
        for t, r in zip((2048, 8192, 32768), rate):
            rows.append({"arch": arch, "seq_len": t, "params": 134e6, "tokens_per_s": r,
                         "mfu_989": r * 9e8 / 989e12 if mfu else None})
    return pd.DataFrame(rows)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_pack_table_gets_its_figure(tmp_path):
    csv = tmp_path / "pack.csv"
    pd.DataFrame({"runs": [64, 64], "steps": [40, 200], "device": ["gpu", "gpu"], "serial_s": [73.5, 279.6],
                  "packed_s": [45.9, 78.1], "speedup": [1.6, 3.58]}).to_csv(csv, index=False)
    png = bench_figure(csv)
    assert png == tmp_path / "pack.png"
    w, h = _png_size(png)
    assert w > h > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack.csv", "pack.png"]  # no temp file left


def test_train_tables_with_and_without_mfu(tmp_path):
    for name, frame in (("gpu.csv", _train_rows()), ("cpu.csv", _train_rows(mfu=False)),
                        ("one_length.csv", _train_rows().query("seq_len == 2048"))):
        frame.to_csv(tmp_path / name, index=False)
        assert _png_size(bench_figure(tmp_path / name))[0] > 500


def test_committed_tables_draw():
    """The measured tables in docs/bench are the ones `make bench` redraws."""
    for name in ("pack.csv", "train_135m_compile.csv", "train_throughput_vs_seqlen.csv"):
        table = ROOT / "docs" / "bench" / name
        frame = pd.read_csv(table)
        assert len(frame) >= 2 and frame.filter(like="_s").notna().all().all()
        png = (ROOT / "docs" / "bench" / name).with_suffix(".png")
        assert png.exists(), f"{png} missing: run `slab bench plot {table}`"


DP_TABLE = ("run,gpus,params,step,loss,tokens_per_s,mfu\n"
            "dp,1,1e8,1,5.0,1000,0.1\ndp,1,1e8,2,4.0,1100,0.1\ndp,2,1e8,1,5.0,1900,0.1\ndp,2,1e8,2,4.0,2100,0.1\n")
SPREAD_TABLE = "plan,gpus,device,runs,done,wall_s,wall_vs_1\nsmoke,2,H200,15,15,213.8,0.77\nsmoke,1,H200,15,15,276.0,1.0\n"


@pytest.mark.parametrize("text, match", [
    ("a,b\n1,2\n", "not a table of `slab bench pack`"),
    ("arch,seq_len,tokens_per_s\n", "no rows"),
    ("arch,seq_len,tokens_per_s\nsoftmax,2048,fast\n", "must be numbers"),
    # KeyError 'run' and "ValueError: cannot convert float NaN to integer" had come out as tracebacks
    (DP_TABLE.replace("run,", "name,"), r"t\.csv: a `slab bench dp` table needs column run"),
    (SPREAD_TABLE.replace("15,15,213.8", "15,,213.8"), r"t\.csv: column done has a blank cell \(row 1\)"),
    (SPREAD_TABLE.replace("15,15,276.0", "x,15,276.0"), r"t\.csv: column runs must hold whole numbers, not 'x' \(row 2\)"),
    (SPREAD_TABLE.replace("15,15,276.0", "15,14.5,276.0"), r"t\.csv: column done must hold whole numbers, not 14\.5"),
])
def test_bad_tables_are_refused(tmp_path, text, match):
    csv = tmp_path / "t.csv"
    csv.write_text(text)
    with pytest.raises(BenchTableError, match=match):
        bench_figure(csv)
    assert not (tmp_path / "t.png").exists()


def test_bench_plot_cli(tmp_path):
    good = tmp_path / "train.csv"
    _train_rows().to_csv(good, index=False)
    bad = tmp_path / "other.csv"
    bad.write_text("x,y\n1,2\n")
    cmd = [sys.executable, "-m", "sweep.cli", "bench", "plot"]
    proc = subprocess.run([*cmd, str(good)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "train.png").exists(), proc.stderr
    proc = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "not a table of" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd, str(tmp_path / "missing.csv")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "not a readable CSV" in proc.stderr


def test_mfu_axis_states_that_softmax_attention_is_counted_in_full(monkeypatch, tmp_path):
    """docs/bench/h200's training figure showed softmax at 69.6% MFU at 32k tokens against lightning's 43.7%, with
    no word that the count takes both n^2 attention products (models.config's FLOPS_CONVENTION): causal attention
    runs about half of them, so softmax's bars at long lengths are not work the GPU did."""
    import analysis.bench_figures as bf

    kept = []
    monkeypatch.setattr(bf, "_save", lambda fig, path: kept.append(fig) or path)
    bf.train_figure(_train_rows(), tmp_path / "t.png")
    label = kept[0].axes[1].get_ylabel()
    assert "% of 989 TFLOP/s" in label and "not causally halved" in label


def test_dp_and_spread_tables_draw_without_their_optional_columns(tmp_path):
    for name, text in (("dp.csv", DP_TABLE.replace(",params", "").replace(",mfu", "").replace(",1e8", "")
                        .replace(",0.1", "")), ("spread.csv", SPREAD_TABLE.replace(",done", "").replace("15,15", "15"))):
        (tmp_path / name).write_text(text)
        assert _png_size(bench_figure(tmp_path / name))[0] > 400


def test_bar_times_keep_three_significant_digits_below_100_s():
    from analysis.bench_figures import seconds

    # 0.50 s and 0.55 s had read "0 s" and "1 s" beside a 0.90x speedup
    assert [seconds(v) for v in (0.5, 0.55, 70.74, 294.3, 1234.5)] == ["0.5 s", "0.55 s", "70.7 s", "294 s", "1234 s"]


def test_two_sizes_of_an_arch_draw_two_lines_each_with_its_own_points(monkeypatch, tmp_path):
    """A table holding a 134M and a 1.3B model had joined each arch's rows sorted by length into one line that
    zigzagged between the sizes; each (arch, configuration) is its own line, named in the legend."""
    import analysis.bench_figures as bf

    big = _train_rows().assign(params=1.3e9, tokens_per_s=lambda f: f["tokens_per_s"] / 10)
    kept = []
    monkeypatch.setattr(bf, "_save", lambda fig, path: kept.append(fig) or path)
    bf.train_figure(pd.concat([_train_rows(), big], ignore_index=True), tmp_path / "t.png")
    softmax = bf.arch_colour("softmax", ["softmax", "lightning"])
    drawn = sorted((list(line.get_xdata()), [round(y) for y in line.get_ydata()])
                   for line in kept[0].axes[0].get_lines() if line.get_color() == softmax)
    # the old line was softmax's six rows sorted by length: 300, 30, 200, 20, 100, 10 k tokens/s
    assert drawn == [([2048, 8192, 32768], [30, 20, 10]), ([2048, 8192, 32768], [300, 200, 100])]
    lines = {line.get_label(): line for line in kept[0].axes[0].get_lines()}
    assert set(lines) == {"softmax, 134M", "softmax, 1.3B", "lightning, 134M", "lightning, 1.3B"}
    assert [round(y) for y in lines["softmax, 1.3B"].get_ydata()] == [30, 20, 10]
    assert lines["softmax, 134M"].get_linestyle() != lines["softmax, 1.3B"].get_linestyle()
    # the MFU bars of the two sizes at one arch and length are told apart by their hatch
    assert [bar.get_hatch() or "" for bar in kept[0].axes[1].patches] == [""] * 6 + ["//"] * 6
    bf.plt.close(kept[0])


def test_one_configuration_keeps_one_line_per_arch(monkeypatch, tmp_path):
    import analysis.bench_figures as bf

    kept = []
    monkeypatch.setattr(bf, "_save", lambda fig, path: kept.append(fig) or path)
    bf.train_figure(_train_rows(), tmp_path / "t.png")
    lines = kept[0].axes[0].get_lines()
    assert [(x.get_label(), x.get_linestyle(), x.get_marker(), len(x.get_xdata())) for x in lines] == [
        ("softmax", "-", "o", 3), ("lightning", "-", "o", 3)]
    bf.plt.close(kept[0])

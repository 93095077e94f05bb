"""Each bf16 training of pack_noise_study.py's raw lines against the same run trained in fp32 (the mean of the fp32
study's packed and lone trainings): whether packed bf16 training ends farther from fp32 training than lone bf16 does.

    python docs/bench/pack_vs_fp32.py docs/bench/profiles/h100_2026-12-05f.txt \\
        docs/bench/profiles/h100_2026-12-05e.txt docs/bench/profiles/h100_2026-12-05h.txt    # on a CPU; instant
"""

import sys

import numpy as np


def final_losses(path: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The first per-run table of a pack_noise_study output: its training names, and per run id each one's final loss."""
    lines = open(path).read().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("run_id lr seed"))
    names = lines[i].split("| final:")[1].split("|")[0].split()
    rows = {}
    for line in lines[i + 1:]:
        if line.count("|") != 2 or ":" in line:  # the table ends at the summary lines
            break
        rows[line.split()[0]] = dict(zip(names, map(float, line.split("|")[1].split())))
    return names, rows


def main(fp32_path: str, *bf16_paths: str) -> None:
    """Print each bf16 training's gap from fp32 training per run: median, mean and worst |gap|, mean log ratio, all
    runs and without the run farthest from fp32 in any training."""
    _, fp32 = final_losses(fp32_path)
    ref = {run: np.mean(list(losses.values())) for run, losses in fp32.items()}
    tables = [(path, *final_losses(path)) for path in bf16_paths]
    worst = max(ref, key=lambda run: max(abs(t[run][n] / ref[run] - 1) for _, names, t in tables for n in names))
    print(f"gap = bf16 final loss / fp32 final loss - 1; 'without' leaves out {worst}, the run farthest off")
    for path, names, table in tables:
        for name in names:
            gap = np.array([table[run][name] / ref[run] - 1 for run in table])
            rest = np.array([table[run][name] / ref[run] - 1 for run in table if run != worst])
            print(f"{path.rsplit('/', 1)[-1]} {name:20s} median {np.median(abs(gap)):.2%} mean {np.mean(abs(gap)):.2%} "
                  f"max {abs(gap).max():.2%} mean log {np.mean(np.log1p(gap)):+.2%} | without: mean "
                  f"{np.mean(abs(rest)):.2%} max {abs(rest).max():.2%} mean log {np.mean(np.log1p(rest)):+.2%}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} FP32_STUDY.txt BF16_STUDY.txt [...]")
    main(*sys.argv[1:])

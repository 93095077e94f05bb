"""How far packed training's losses fall from lone training's, against how far two lone trainings (and two packed
ones) fall apart, for every run of one shape of plans/pack-grid.csv (``slab bench pack`` repeats only its worst run,
once). A run that packing changes ends apart from its lone losses in both packs; one that lands there by chance
(cuDNN's attention backward is not deterministic, and a run at a high learning rate amplifies that) does not.

    python docs/bench/pack_noise_study.py softmax 512     # on a GPU; about 4 minutes on one H100
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.packed import pretrain_pack
from models.train import pretrain
from sweep.plan import load_plan


def main(arch: str, d_model: int) -> None:
    """Train the shape's runs packed once and alone twice; print each run's final and validation losses, and the
    spread of packed-against-alone beside alone-against-alone."""
    specs = [r.spec for r in load_plan("plans/pack-grid.csv").runs if r.spec.arch == arch and r.spec.d_model == d_model]
    root = Path(tempfile.mkdtemp())
    quiet = [lambda kind, payload: None] * len(specs)
    packed = [pretrain_pack(specs, quiet, [root / f"pack{k}" / s.run_id for s in specs], device="cuda", share=1.0)
              for k in (1, 2)]
    alone = [[pretrain(s, quiet[0], root / f"alone{k}" / s.run_id, device="cuda") for s in specs] for k in (1, 2)]
    print("run_id lr seed | final: packed1 packed2 alone1 alone2 | val: packed1 packed2 alone1 alone2")
    rows = []
    for s, p1, p2, a1, a2 in zip(specs, *packed, *alone):
        row = [getattr(r, "final_loss", float("nan")) for r in (p1, p2, a1, a2)]
        row += [getattr(r, "val_loss", float("nan")) for r in (p1, p2, a1, a2)]
        rows.append(row)
        print(s.run_id[:10], s.lr, s.seed, "|", " ".join(f"{v:.4f}" for v in row[:4]), "|",
              " ".join(f"{v:.4f}" for v in row[4:]))
    r = np.array(rows)
    for what, (p1, p2, a1, a2) in (("final", (0, 1, 2, 3)), ("val", (4, 5, 6, 7))):
        spread = {"packed1/alone1": (p1, a1), "packed2/alone1": (p2, a1), "packed2/packed1": (p2, p1),
                  "alone2/alone1": (a2, a1)}
        print(f"{what}: " + "; ".join(f"|{k} - 1| median {np.median(np.abs(r[:, a] / r[:, b] - 1)):.4%} "
                                     f"max {np.abs(r[:, a] / r[:, b] - 1).max():.4%}" for k, (a, b) in spread.items()))
        above = (np.minimum(r[:, p1], r[:, p2]) > 1.001 * np.maximum(r[:, a1], r[:, a2])).sum()
        print(f"{what}: runs whose both packed losses lie over 0.1% above both lone ones: {above} of {len(r)}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: needs a GPU (it compares packed and lone training as a GPU runs them)")
    main(sys.argv[1], int(sys.argv[2]))

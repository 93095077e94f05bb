"""How far packed training's losses fall from lone training's, against how far two lone trainings fall apart, for
every run of one shape of plans/pack-grid.csv (``slab bench pack`` repeats only its worst run, once).

    python docs/bench/pack_noise_study.py softmax 512     # on a GPU; about 3 minutes on one H100
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
    packed = pretrain_pack(specs, quiet, [root / "pack" / s.run_id for s in specs], device="cuda", share=1.0)
    alone = [[pretrain(s, quiet[0], root / f"alone{k}" / s.run_id, device="cuda") for s in specs] for k in (1, 2)]
    print("run_id lr seed | final: packed alone1 alone2 | val: packed alone1 alone2")
    rows = []
    for s, p, a1, a2 in zip(specs, packed, *alone):
        row = [getattr(p, "final_loss", float("nan")), a1.final_loss, a2.final_loss,
               getattr(p, "val_loss", float("nan")), a1.val_loss, a2.val_loss]
        rows.append(row)
        print(s.run_id[:10], s.lr, s.seed, "|", " ".join(f"{v:.4f}" for v in row[:3]), "|",
              " ".join(f"{v:.4f}" for v in row[3:]))
    r = np.array(rows)
    for what, (p, a1, a2) in (("final", (0, 1, 2)), ("val", (3, 4, 5))):
        pk, rep = np.abs(r[:, p] / r[:, a1] - 1), np.abs(r[:, a2] / r[:, a1] - 1)
        print(f"{what}: |packed/alone1 - 1| median {np.median(pk):.4%} max {pk.max():.4%}; "
              f"|alone2/alone1 - 1| median {np.median(rep):.4%} max {rep.max():.4%}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: needs a GPU (it compares packed and lone training as a GPU runs them)")
    main(sys.argv[1], int(sys.argv[2]))

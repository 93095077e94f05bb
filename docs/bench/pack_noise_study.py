"""How far packed training's losses fall from lone training's, against how far two lone trainings (and two packed
ones) fall apart, for every run of one shape of plans/pack-grid.csv (``slab bench pack`` repeats only its worst run,
once). A run that packing changes ends apart from its lone losses in both packs; one that lands there by chance
(cuDNN's attention backward is not deterministic, and a run at a high learning rate amplifies that) does not.

Lone trainings with one kernel choice changed (cuDNN attention off; cuBLAS's bf16 GEMMs reducing in fp32) round the
same maths differently, as a pack's large kernels do: how far they land from the plain lone training says how much
any change of rounding moves these runs.

    python docs/bench/pack_noise_study.py softmax 512         # on a GPU; about 6 minutes on one H100
    python docs/bench/pack_noise_study.py softmax 512 fp32    # the same study in fp32 (packed once, alone twice)
    python docs/bench/pack_noise_study.py softmax 512 layers  # bf16: packs of 16, 8, 4 and 2; alone on torch layers

``layers`` separates the two things a pack changes in bf16: its layers are plain torch ones (a lone run takes the
fused kernels) and its kernels see many members at once. Every run trains alone as pretrain does, alone twice on
the plain torch layers a pack stacks, and packed in packs of 16, 8, 4 and 2 (the shape's runs split in plan order).
"""

import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import models.evals
import models.packed
import models.train
from models.packed import pretrain_pack
from models.train import pretrain
from sweep.plan import load_plan


def _alone_with(flag: str):
    """A context that trains alone with one of torch's kernel choices changed: another rounding of the same maths."""
    @contextlib.contextmanager
    def changed():
        matmul = torch.backends.cuda.matmul
        saved = (torch.backends.cuda.cudnn_sdp_enabled(), matmul.allow_bf16_reduced_precision_reduction)
        if flag == "no-cudnn-sdp":
            torch.backends.cuda.enable_cudnn_sdp(False)
        elif flag == "fp32-reduce":
            matmul.allow_bf16_reduced_precision_reduction = False
        try:
            yield
        finally:
            torch.backends.cuda.enable_cudnn_sdp(saved[0])
            matmul.allow_bf16_reduced_precision_reduction = saved[1]
    return changed()


def _in_fp32() -> None:
    """Train in fp32 from here on: no bf16 autocast, no TF32 GEMMs (rounding some 1e4 times finer than bf16's)."""
    for module in (models.packed, models.train, models.evals):
        module.autocast = lambda device: contextlib.nullcontext()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def main(arch: str, d_model: int, fp32: bool = False, layers: bool = False) -> None:
    """Train the shape's runs packed twice, alone twice and alone with other kernels (fp32: packed once, alone twice,
    in fp32 with plain torch layers); print each run's final and validation losses, and each one's spread against
    the first lone training."""
    specs = [r.spec for r in load_plan("plans/pack-grid.csv").runs if r.spec.arch == arch and r.spec.d_model == d_model]
    root = Path(tempfile.mkdtemp())
    quiet = [lambda kind, payload: None] * len(specs)
    if fp32:
        _in_fp32()
    runs = {}
    sizes = (len(specs), 8, 4, 2) if layers else (len(specs),) if fp32 else (len(specs), len(specs))
    for k, size in enumerate(sizes, 1):
        name = f"packed{size}" if layers else f"packed{k}"
        runs[name] = [r for i in range(0, len(specs), size) for r in pretrain_pack(
            specs[i:i + size], quiet[i:i + size], [root / name / s.run_id for s in specs[i:i + size]], device="cuda",
            share=1.0)]
    flags = () if fp32 or layers else ("no-cudnn-sdp", "fp32-reduce") if arch in ("softmax", "hybrid") else ("fp32-reduce",)
    lone = [("alone1", "", None), ("alone2", "", "torch" if layers else None)]
    lone += [("alone3", "", "torch")] if layers else [(f"alone:{f}", f, None) for f in flags]
    for name, flag, kernels in lone:
        with _alone_with(flag):
            runs[name] = [pretrain(s, quiet[0], root / name / s.run_id, device="cuda",
                                   kernels="torch" if fp32 else kernels) for s in specs]
    names = list(runs)
    print(f"run_id lr seed | final: {' '.join(names)} | val: {' '.join(names)}")
    final = np.array([[getattr(r, "final_loss", float("nan")) for r in rs] for rs in zip(*runs.values())])
    val = np.array([[getattr(r, "val_loss", float("nan")) for r in rs] for rs in zip(*runs.values())])
    for s, f, v in zip(specs, final, val):
        print(s.run_id[:10], s.lr, s.seed, "|", " ".join(f"{x:.4f}" for x in f), "|", " ".join(f"{x:.4f}" for x in v))
    base = names.index("alone1")
    for what, r in (("final", final), ("val", val)):
        for j, name in enumerate(names):
            if j != base:
                gap = np.abs(r[:, j] / r[:, base] - 1)
                print(f"{what}: |{name}/alone1 - 1| median {np.median(gap):.4%} max {gap.max():.4%}")
        if layers:
            for j, name in enumerate(names):
                print(f"{what}: {name} mean log ratio to alone1 {np.mean(np.log(r[:, j] / r[:, base])):+.4%}")
            continue
        p, a = r[:, [j for j, k in enumerate(names) if k.startswith("packed")]], r[:, [base, names.index("alone2")]]
        above = (p.min(1) > 1.001 * a.max(1)).sum()
        print(f"{what}: runs whose both packed losses lie over 0.1% above both plain lone ones: {above} of {len(r)}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: needs a GPU (it compares packed and lone training as a GPU runs them)")
    if sys.argv[3:] not in ([], ["fp32"], ["layers"]):
        sys.exit(f"usage: {sys.argv[0]} ARCH D_MODEL [fp32|layers]")
    main(sys.argv[1], int(sys.argv[2]), fp32=sys.argv[3:] == ["fp32"], layers=sys.argv[3:] == ["layers"])

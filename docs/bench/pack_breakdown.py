"""Per-shape breakdown behind the packing figures in the README: fixed cost and step time of a pack of 16
against a lone run, from timing 2- and 42-step trainings of each (arch, d_model) of plans/pack-grid.csv.

    python docs/bench/pack_breakdown.py        # on a GPU; about 2 minutes on one H100
"""

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from models.packed import pretrain_pack
from models.train import pretrain
from sweep.plan import load_plan


def main() -> None:
    """Print, per shape, a pack's and a lone run's step time and fixed cost, and the implied 200-step speedup."""
    groups: dict[tuple, list] = {}
    for run in load_plan("plans/pack-grid.csv").runs:
        groups.setdefault((run.spec.arch, run.spec.d_model), []).append(run.spec)
    root = Path(tempfile.mkdtemp())
    count = iter(range(10**6))

    def cut(spec, steps):
        return dataclasses.replace(spec, tokens=steps * spec.batch_size * spec.seq_len, evals=(), eval_every=0)

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def pack(specs, steps):
        return timed(lambda: pretrain_pack([cut(s, steps) for s in specs], [lambda k, p: None] * len(specs),
                                           [root / str(next(count)) for _ in specs], device="cuda", share=1.0))

    def alone(spec, steps):
        return timed(lambda: pretrain(cut(spec, steps), lambda k, p: None, root / str(next(count)), device="cuda"))

    for key, specs in groups.items():
        pack(specs, 2), alone(specs[0], 2)  # warm-up: kernel compilation and autotuning
        p2, p42, a2, a42 = pack(specs, 2), pack(specs, 42), alone(specs[0], 2), alone(specs[0], 42)
        ps, as_ = (p42 - p2) / 40, (a42 - a2) / 40
        pf, af = p2 - 2 * ps, a2 - 2 * as_
        print(f"{key}: pack of {len(specs)} step {ps * 1e3:.1f} ms, fixed {pf:.2f} s | alone step {as_ * 1e3:.1f} ms, "
              f"fixed {af:.2f} s | 200-step speedup {len(specs) * (af + 200 * as_) / (pf + 200 * ps):.2f}x", flush=True)


if __name__ == "__main__":
    main()

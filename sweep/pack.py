"""Which runs train together: packs of same-shape runs trained as one stacked model (``models.packed``).

``--pack auto`` (the default) packs on GPUs only: runs that differ only in seed and optimiser settings are
grouped, at most ``MAX_PACK`` at a time, until the pack's step does about as much work as a 135M-model
step (``TARGET_STEP_FLOPS``, enough to keep an H100 busy) or its estimated memory would pass 80% of the GPU.
``--pack N`` packs up to N runs per pack whatever the device (CPU included); ``--pack off`` trains each
run alone. A pack asks for the sum of its members' ``gpus``, at most one GPU.
"""

from __future__ import annotations

import math
from collections import defaultdict

from models.config import flops_per_token
from models.packed import pack_key
from models.train import activation_bytes_per_seq, state_bytes
from sweep.spec import RunSpec

#: Most runs one pack trains.
MAX_PACK = 16
#: Work per optimizer step (FLOPs) at which a pack stops growing: a 135M model at 16 x 2048 tokens.
TARGET_STEP_FLOPS = 6 * 135e6 * 16 * 2048
#: Share of a GPU's memory a pack may plan to use.
MEMORY_SHARE = 0.8

Run = tuple[RunSpec, "str | None"]


def parse_pack(text: str) -> int | None:
    """``--pack``: "auto" -> None, "off" -> 1, a whole number -> that many runs at most per pack."""
    if text == "auto":
        return None
    if text == "off":
        return 1
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--pack expects auto, off or a whole number of runs (1 or more), got {text!r}")


def auto_pack_size(spec: RunSpec, gpu_mem_bytes: float) -> int:
    """How many runs of ``spec``'s shape one GPU pack takes: until the step's work reaches the target or
    the estimated memory (training state plus one sequence of activations per member) fills the GPU."""
    cfg = spec.model_config()
    step_flops = flops_per_token(cfg, spec.seq_len) * spec.batch_size * spec.seq_len
    by_work = math.ceil(TARGET_STEP_FLOPS / step_flops)
    per_member = state_bytes(cfg) + activation_bytes_per_seq(cfg, spec.seq_len)
    by_memory = int(MEMORY_SHARE * gpu_mem_bytes // per_member)
    return max(1, min(MAX_PACK, by_work, by_memory))


def plan_packs(runs: list[Run], pack: int | None, *, cpu: bool, gpu_mem_bytes: float) -> list[list[Run]]:
    """Split ``runs`` into packs (lists of runs, in plan order) of at most ``pack`` runs (None: by size and memory), each
    shape's runs in as few packs as that allows, of sizes within one of each other; data-parallel runs always go
    alone."""
    if pack == 1 or (pack is None and cpu):
        return [[r] for r in runs]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    out: list[list[Run]] = []
    for run in runs:
        spec = run[0]
        if spec.gpus > 1:
            out.append([run])
            continue
        key = pack_key(spec)
        if key not in groups:
            out.append(groups[key])  # the pack list is filled in place, keeping the first member's position
        groups[key].append(run)
    packs: list[list[Run]] = []
    for group in out:
        size = pack if pack is not None else auto_pack_size(group[0][0], gpu_mem_bytes)
        # As few packs as the size allows, as even as can be: 17 runs in packs of up to 16 are 9 + 8, which two GPUs
        # (or two shares of one) train side by side, not 16 + 1, whose pack of one trains while the 16 take their time.
        k = -(-len(group) // size)
        bounds = [-(-len(group) * i // k) for i in range(k + 1)]  # the larger packs first
        packs.extend(group[a:b] for a, b in zip(bounds, bounds[1:]))
    return packs


def pack_gpus(pack: list[Run]) -> float:
    """The GPU share a pack asks for: its members' shares added up, at most one GPU."""
    if len(pack) == 1:
        return pack[0][0].gpus
    return min(1.0, sum(spec.gpus for spec, _ in pack))

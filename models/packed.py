"""Packed training: several runs of one model shape trained as one stacked model, ``pretrain_pack``.

Runs that differ only in ``PACK_FREE_FIELDS`` (seed and optimisation settings) share every tensor shape.
Their weights are stacked along a leading member axis and one ``torch.func.vmap`` forward and backward
trains all of them per step, so a GPU runs a few large kernels instead of many small ones per run. Each
member keeps its own data stream, learning-rate schedule, AdamW state (the arithmetic of
``torch.optim.AdamW``), gradient clipping, divergence check, reports and checkpoint folder. Checkpoints
are in ``pretrain``'s format, so a member resumes alone or in another pack, and members may start from
different steps. A member that diverges stops (its updates are masked) and, as a lone run, records it in its
folder, so that it stays diverged in a later attempt; the others go on. A member's step
without a labelled token leaves that member as it was, as ``pretrain`` leaves a lone run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from models.config import count_params, flops_per_token
from models.data import Batches, open_data
from models.evals import autocast, check_evals, run_evals, validation_batches
from models.lm import LM
from models.train import (
    BETAS, MAX_TRAIN_REPORTS, CheckpointUnreadable, Diverged, Interrupted, OutOfMemory, Summary,
    Unlabelled,
    _param_groups, _parse_fault, _run_key, build_model, check_resumable, check_spec, checkpoint_steps, decayed,
    default_microbatch, load_checkpoint, lr_at, model_config, peak_flops, record_divergence, recorded_divergence,
    rejected_validation, save_checkpoint, summarize,
)

log = logging.getLogger(__name__)

#: Spec fields that may differ between the members of one pack; every other field must be equal.
PACK_FREE_FIELDS = ("seed", "lr", "warmup", "schedule", "min_lr_ratio", "weight_decay", "grad_clip")
#: Spec fields that say where a run trains, not what (they may differ too).
PLACEMENT = ("gpus",)
ADAM_EPS = 1e-8
#: Threads writing a pack's checkpoints at once.
CKPT_WRITERS = 8


class _StackedLinear(nn.Module):
    """``nn.Linear`` (no bias) of n members, weight (n, out, in), on inputs whose batch axis is members x batch."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, out = self.weight.shape[:2]
        y = torch.bmm(x.reshape(n, -1, x.shape[-1]), self.weight.transpose(1, 2))
        return y.view(*x.shape[:-1], out)


class _StackedRMSNorm(nn.Module):
    """``nn.RMSNorm`` of n members, weight (n, d): the unweighted norm over all members, then each member's scale."""

    def __init__(self, weight: torch.Tensor, eps: float | None):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        n, d = self.weight.shape
        # With a gate, lightning's GatedRMSNorm in fp32 as its kernel computes it (backend names that kernel, which
        # takes one weight, so it is not used here).
        y = F.rms_norm(x if gate is None else x.float(), (d,), eps=self.eps)
        y = (y.view(n, -1, d) * self.weight[:, None]).view(x.shape)
        return y if gate is None else (torch.sigmoid(gate.float()) * y).to(x.dtype)


class _StackedEmbedding(nn.Module):
    """``nn.Embedding`` of n members, weight (n, vocab, d), on token ids whose batch axis is members x batch."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n, vocab, d = self.weight.shape
        member = torch.arange(n, device=idx.device).repeat_interleave(idx.shape[0] // n)
        return F.embedding(idx + (member * vocab).view(-1, *(1,) * (idx.dim() - 1)), self.weight.reshape(n * vocab, d))


def stack_layers(model: LM, params: dict[str, torch.Tensor]) -> LM | None:
    """``model`` with its layers swapped for ones applying the stacked ``params`` (name -> (n, ...)) to a batch
    of members x sequences, or None when some weight lies outside a Linear, RMSNorm or Embedding (Mamba2).

    The swapped model runs every member in plain large kernels: about twice as fast as ``vmap`` over
    ``functional_call``, whose batching rules copy and loop where these layers do one bmm or one norm.
    """
    owners = dict(model.named_modules())
    for name, _ in model.named_parameters():
        module = owners[name.rpartition(".")[0]]
        if not isinstance(module, (nn.Linear, nn.RMSNorm, nn.Embedding)) or getattr(module, "bias", None) is not None:
            return None
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            swapped = _StackedLinear(params[f"{name}.weight"])
        elif isinstance(module, nn.RMSNorm):
            swapped = _StackedRMSNorm(params[f"{name}.weight"], module.eps)
        elif isinstance(module, nn.Embedding):
            swapped = _StackedEmbedding(params[f"{name}.weight"])
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(owners[parent] if parent else model, child, swapped)
    return model


def stacked_losses(model: LM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy over its labelled tokens, for ids and targets (n, B, T), on a
    ``stack_layers`` model."""
    n = x.shape[0]
    logits = model.head(model.norm_f(model.trunk(x.flatten(0, 1))))
    ce = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), ignore_index=-100, reduction="none")
    labelled = (y != -100).flatten(1).sum(1)
    return ce.view(n, -1).sum(1) / labelled.clamp(min=1)


def pack_key(spec) -> tuple:
    """What members of one pack must share: every spec field but seed, optimiser settings and placement."""
    # The spec's fields, not vars(): that also holds what the spec caches (its run_id, which differs per member).
    names = sorted(f.name for f in dataclasses.fields(spec) if f.name not in PACK_FREE_FIELDS + PLACEMENT)
    return tuple((n, getattr(spec, n)) for n in names)


class StackedAdamW:
    """AdamW over stacked (member, ...) parameters, with a learning rate and weight decay per member.

    Same update as ``torch.optim.AdamW`` (decoupled decay, bias-corrected moments, eps outside the square
    root); ``step`` counts per member, and a member outside ``active`` is left exactly as it was.
    """

    def __init__(self, params: dict[str, torch.Tensor], n: int):
        self.params = params
        self.n = n
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = torch.zeros(n, dtype=torch.float64)
        self.decay = {k: decayed(k, p.dim() - 1) for k, p in params.items()}

    @torch.no_grad()
    def step(self, lr: Sequence[float], weight_decay: Sequence[float], active: Sequence[bool]) -> None:
        """One update of the active members with their own ``lr`` and ``weight_decay``."""
        b1, b2 = BETAS
        mask = torch.tensor(active)
        self.steps += mask.double()
        t = self.steps.clamp(min=1)
        lr_t = torch.tensor(lr, dtype=torch.float64) * mask.double()
        # Per-member factors, moved to the GPU once per step (not once per parameter).
        dev = next(iter(self.params.values())).device
        factors = torch.stack([
            lr_t / (1 - b1**t), torch.sqrt(1 - b2**t), 1 - lr_t * torch.tensor(weight_decay, dtype=torch.float64),
            mask.double(),
        ]).float().to(dev)
        step_size, c2_sqrt, shrink, keep_all = factors
        everyone = all(active)
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            shape = (self.n,) + (1,) * (p.dim() - 1)
            if self.decay[name]:
                p.mul_(shrink.view(shape))  # 1 for a member outside ``active`` (its lr counts as 0)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            # In place while every member trains (about half the memory passes of the masked form).
            if everyone:
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                keep = keep_all.view(shape) > 0
                # The in-place form's own ops on copies: an active member's moments round exactly as when every
                # member trains (v * b2 + (1 - b2) * g * g did not), so a pack-mate's divergence changes no one else.
                m.copy_(torch.where(keep, m.lerp(g, 1 - b1), m))
                v.copy_(torch.where(keep, v.mul(b2).addcmul_(g, g, value=1 - b2), v))
            denom = (v.sqrt() / c2_sqrt.view(shape)).add_(ADAM_EPS)
            p.addcdiv_(m * step_size.view(shape), denom, value=-1)

    def host_moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Both stacked moments copied to the host, for writing several members' states at once."""
        return ({k: m.detach().cpu() for k, m in self.exp_avg.items()},
                {k: v.detach().cpu() for k, v in self.exp_avg_sq.items()})

    def member_state(self, i: int, order: list[str], template: list[dict], lr: float, weight_decay: float,
                     moments: tuple[dict, dict] | None = None) -> dict:
        """Member ``i``'s moments (from ``moments`` when given, see ``host_moments``) as a
        ``torch.optim.AdamW`` state_dict (params numbered in ``order``)."""
        exp_avg, exp_avg_sq = moments or (self.exp_avg, self.exp_avg_sq)
        step = torch.tensor(float(self.steps[i]))
        state = {
            j: {"step": step.clone(), "exp_avg": exp_avg[k][i].detach().clone(),
                "exp_avg_sq": exp_avg_sq[k][i].detach().clone()}
            for j, k in enumerate(order)
        }
        groups = [dict(g) for g in template]
        groups[0].update(lr=lr, weight_decay=weight_decay)
        groups[1].update(lr=lr)
        return {"state": state, "param_groups": groups}

    def load_member(self, i: int, order: list[str], state: dict) -> None:
        """Set member ``i``'s moments from a ``torch.optim.AdamW`` state_dict numbered in ``order``."""
        entries = state["state"]
        with torch.no_grad():
            for j, k in enumerate(order):
                if j in entries:
                    self.exp_avg[k][i].copy_(entries[j]["exp_avg"])
                    self.exp_avg_sq[k][i].copy_(entries[j]["exp_avg_sq"])
                    self.steps[i] = float(entries[j]["step"])


def pretrain_pack(
    specs: Sequence,
    reporters: Sequence[Callable[[str, dict], None]],
    ckpt_dirs: Sequence[str | os.PathLike],
    *,
    device: str | torch.device | None = None,
    microbatch: int | None = None,
    share: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    faults: Sequence[str | None] | None = None,
    ckpt_every_steps: int = 1000,
    ckpt_every_s: float = 1800.0,
) -> list[Summary | Exception]:
    """Train the runs ``specs`` (one shape) together; returns per member its ``Summary``, the ``Diverged`` /
    ``Interrupted`` that ended it, ``Unlabelled`` where none of its steps had a labelled token, or what kept it from
    resuming (``CheckpointUnreadable``, ``ValueError`` for a checkpoint of another run or data, or the ``Diverged`` an
    earlier attempt recorded). Reports and
    checkpoints per member as ``pretrain`` does.

    Raises ``OutOfMemory`` for the pack as a whole (retry the members alone), and any other error. ``faults``
    are ``pretrain``'s test hooks per member: "nan@K" diverges that member; "raise@K" and "exit@K" end the pack.
    """
    t_start = time.perf_counter()
    n = len(specs)
    if not (n == len(reporters) == len(ckpt_dirs)):
        raise ValueError("pretrain_pack needs one reporter and one checkpoint folder per spec")
    keys = {pack_key(s) for s in specs}
    if len(keys) != 1:
        raise ValueError(f"a pack's runs must differ only in {', '.join(PACK_FREE_FIELDS)}")
    spec0 = specs[0]
    for s in specs:
        check_spec(s)
    ckpt_dirs = [Path(d) for d in ckpt_dirs]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    faults = [_parse_fault(f) for f in (faults or [None] * n)]

    cfg = model_config(spec0)
    counts = count_params(cfg)
    fpt = flops_per_token(cfg, spec0.seq_len)
    total_steps = spec0.steps
    tokens_per_step = spec0.batch_size * spec0.seq_len
    data = open_data(spec0.data, spec0.vocab_size)
    data.check(spec0.seq_len)
    check_evals(spec0.evals, data, spec0.seq_len, spec0.vocab_size)
    microbatch = microbatch or default_microbatch(spec0, cfg, device, members=n, share=share)
    if spec0.batch_size % microbatch:
        raise ValueError(f"microbatch {microbatch} does not divide the batch {spec0.batch_size}")
    n_micro = spec0.batch_size // microbatch

    # Members start as pretrain's models do (seeded init), then resume from their own checkpoints.
    members, batches, starts, prior_wall, last_loss = [], [], [], [], []
    resumed: list[dict | None] = []
    refused: list[Exception | None] = [None] * n
    for i, (spec, ckpt_dir) in enumerate(zip(specs, ckpt_dirs)):
        model = build_model(cfg, spec.seed, device)
        stream = Batches(data, spec.seq_len, microbatch, seed=spec.seed)
        try:
            # A member that diverged in an earlier attempt stays diverged, as a lone run does.
            earlier = recorded_divergence(ckpt_dir, spec)
            if earlier is not None:
                raise earlier
            state = load_checkpoint(ckpt_dir)
            if state is not None:
                check_resumable(state, spec, data, ckpt_dir)
        except (CheckpointUnreadable, ValueError, Diverged) as exc:
            # This member's own folder stops it, as it would stop the run alone; its pack-mates train on (it stays
            # in the stack, never updated, rather than the pack being rebuilt).
            refused[i], state = exc, None
        if state is not None:
            model.load_state_dict(state["model"])
            stream.load_state_dict(state["data"])
            log.info("resuming %s from step %d", ckpt_dir, state["step"])
            reporters[i]("resume", {"step": state["step"]})
        members.append(model)
        batches.append(stream)
        resumed.append(state)
        starts.append(state["step"] if state else 0)
        prior_wall.append(state["wall_s"] if state else 0.0)
        last_loss.append(state["loss"] if state else float("nan"))

    eval_model = members[0]  # a plain LM that members are loaded into for evaluation
    template = torch.optim.AdamW(
        _param_groups(eval_model, 0.0), lr=1e-3, betas=BETAS, fused=True if on_cuda else None
    ).state_dict()["param_groups"]
    order = [k for k, p in eval_model.named_parameters() if decayed(k, p.dim())]
    order += [k for k, p in eval_model.named_parameters() if not decayed(k, p.dim())]
    state_keys = list(eval_model.state_dict())
    params, buffers = stack_module_state(members)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    with torch.device(device):
        stacked = stack_layers(LM(cfg), params)  # a plain LM whose layers read the stacked params
    if stacked is None:
        with torch.device("meta"):
            base = LM(cfg)
    del members
    optimizer = StackedAdamW(params, n)
    for i, state in enumerate(resumed):
        if state is not None:
            optimizer.load_member(i, order, state["optimizer"])
    del resumed

    def member_loss(p, b, x, y):
        return functional_call(base, (p, b), (x, y))[1]

    def batched_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's loss on its own batch: x, y (n, B, T) -> (n,)."""
        if stacked is not None:
            return stacked_losses(stacked, x, y)
        return vmap(member_loss)(params, buffers, x, y)  # layers stack_layers cannot swap

    def member_state(i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights and persistent buffers under ``LM.state_dict()`` names (views, not copies)."""
        return {k: (params[k] if k in params else buffers[k])[i].detach() for k in state_keys}

    def load_member(i: int) -> LM:
        with torch.no_grad():
            eval_model.load_state_dict(member_state(i))
        return eval_model

    def checkpoint(due: dict[int, int]) -> None:
        """Checkpoint the members ``due`` ({member: step}): one host copy of each stacked tensor, then
        the members' files written side by side (their fsyncs overlap instead of queueing)."""
        if not due:
            return
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if on_cuda else None}
        host = {k: (params[k] if k in params else buffers[k]).detach().cpu() for k in state_keys}
        moments = optimizer.host_moments()
        now = time.perf_counter()

        def write(i: int) -> None:
            spec, step = specs[i], due[i]
            save_checkpoint(ckpt_dirs[i], step, {
                "step": step, "run": _run_key(spec), "model": {k: t[i].clone() for k, t in host.items()},
                "optimizer": optimizer.member_state(i, order, template, lr_at(step, spec), spec.weight_decay, moments),
                "data": batches[i].state_dict(), "rng": rng, "loss": last_loss[i],
                "wall_s": prior_wall[i] + now - t_start, "microbatch": microbatch, "data_sha256": data.sha256,
            })

        with ThreadPoolExecutor(max_workers=min(CKPT_WRITERS, len(due))) as pool:
            list(pool.map(write, due))  # list() re-raises a failed write here
        for i, step in due.items():
            reporters[i]("ckpt", {"step": step})

    @torch.no_grad()
    def stacked_validation(ids: list[int]) -> list[float | None]:
        """``validation_loss`` of several members in one vmapped pass over the shared validation batches (None for
        each where no validation sequence holds a labelled token, as ``validation_loss`` gives)."""
        sel = torch.tensor(ids, device=device)
        if stacked is None:
            p = {k: v.detach().index_select(0, sel) for k, v in params.items()}
            b = {k: v.index_select(0, sel) for k, v in buffers.items()}
        total, count = torch.zeros(len(ids), dtype=torch.float64, device=device), 0
        for x, y, labelled in validation_batches(data, spec0.seq_len, device=device, batch=microbatch):
            with autocast(device):
                if stacked is not None:  # all members score the batch; the others' losses are dropped
                    losses = stacked_losses(stacked, x.expand(n, *x.shape), y.expand(n, *y.shape)).index_select(0, sel)
                else:
                    losses = vmap(member_loss, in_dims=(0, 0, None, None))(p, b, x, y)
            total += losses.double() * labelled
            count += labelled
        return (total / count).tolist() if count else [None] * len(ids)

    def evaluate(ids: list[int], step: int) -> dict[int, float]:
        """Validation loss (one pass for all of ``ids``) and the plan's evals (member by member)."""
        if not ids:
            return {}
        try:
            vals = dict(zip(ids, stacked_validation(ids)))
        except torch.OutOfMemoryError:
            raise OutOfMemory(step, microbatch) from None
        tokens = step * tokens_per_step
        scored = []  # members whose validation loss is recorded, so whose evals run too
        for i in ids:
            if vals[i] is None:  # no labelled validation token: no loss to record or judge, as in pretrain
                scored.append(i)
                continue
            reason = rejected_validation(vals[i], specs[i].vocab_size, final=step == total_steps)
            if reason and not math.isfinite(vals[i]):  # as pretrain: not finite on held-out text
                diverge(i, Diverged(step, reason))
                del vals[i]
                continue
            reporters[i]("val", {"step": step, "tokens": tokens, "flops": float(fpt) * tokens, "val_loss": vals[i]})
            scored.append(i)
            if reason:  # as pretrain: no better than a uniform guess at the end, recorded and then diverged
                diverge(i, Diverged(step, reason))
                del vals[i]
        for i in scored:  # after the val reports, as pretrain: a failing eval loses no loss
            try:
                results = run_evals(spec0.evals, load_member(i).eval(), data, spec0.seq_len, device=device)
            except torch.OutOfMemoryError:
                raise OutOfMemory(step, microbatch) from None
            for name, value in results.items():
                reporters[i]("eval", {"step": step, "name": name, "value": value})
        return vals

    outcome: list[Summary | Exception | None] = list(refused)
    active = [True] * n  # set per step below; evaluate() clears a member whose validation loss rules it out

    def diverge(i: int, exc: Diverged) -> None:
        """End member ``i`` as ``exc``, recorded in its folder at once (a later crash of the pack returns nothing)."""
        record_divergence(ckpt_dirs[i], specs[i], exc)
        outcome[i] = exc
        active[i] = False

    def ever_labelled(ids: list[int]) -> list[int]:
        """Those of ``ids`` at their last step that ever had a labelled token; the others end ``Unlabelled``."""
        for i in ids:
            if math.isnan(last_loss[i]):  # NaN only where no step of any attempt had one, as pretrain judges it
                outcome[i] = Unlabelled.of_run(specs[i].data, total_steps)
        return [i for i in ids if outcome[i] is None]

    finished = ever_labelled([i for i, start in enumerate(starts) if start >= total_steps and outcome[i] is None])
    # checkpointed at their last step but not reported as done: finish them
    for i, val in evaluate(finished, total_steps).items():
        outcome[i] = summarize(specs[i], counts, fpt, val_loss=val, final_loss=last_loss[i], wall_s=prior_wall[i],
                               train_time=0.0, trained_steps=0, start=starts[i], data_sha256=data.sha256,
                               microbatch=microbatch)
    exits = {f[1] for f in faults if f and f[0] == "exit"}
    exit_at = {k for k in exits if all(max(checkpoint_steps(d), default=0) < k for d in ckpt_dirs)}
    report_every = max(1, total_steps // MAX_TRAIN_REPORTS)
    peak = peak_flops(device)
    train_time = [0.0] * n
    window_t, window_steps = [0.0] * n, [0] * n
    last_ckpt_t = time.perf_counter()
    for t in range(1, total_steps - min(starts) + 1):
        steps = [s + t for s in starts]
        active = [outcome[i] is None and steps[i] <= total_steps for i in range(n)]
        if not any(active):
            break
        t0 = time.perf_counter()
        micro = []
        for i in range(n):
            b = batches[i]
            b.position = (min(steps[i], total_steps) - 1) * spec0.batch_size
            micro.append([b.next() for _ in range(n_micro)])
            b.position = min(steps[i], total_steps) * spec0.batch_size
        labels = [[int((y != -100).sum()) for _, y in mb] for mb in micro]  # per member, per microbatch
        n_valid = [sum(mb) for mb in labels]
        try:
            loss_sum = torch.zeros(n, device=device)
            for j in range(n_micro):
                x = torch.stack([micro[i][j][0] for i in range(n)]).to(device, non_blocking=True)
                # Under vmap a member's mean over no target is 0 / 0 = NaN, and NaN * 0 is NaN: any valid target at
                # weight 0 gives its zero gradient exactly, as in pretrain (stacked_losses divides by at least 1).
                y = torch.stack([micro[i][j][1] if labels[i][j] or stacked is not None
                                 else torch.zeros_like(micro[i][j][1]) for i in range(n)]).to(device, non_blocking=True)
                share_j = torch.tensor([labels[i][j] / max(n_valid[i], 1) for i in range(n)], device=device)
                with autocast(device):
                    losses = batched_loss(x, y)
                # Each member's step loss is the mean over its labelled tokens, as in pretrain.
                (losses * share_j).sum().backward()
                loss_sum += losses.detach() * share_j
            for i, f in enumerate(faults):
                if f and f[0] == "raise" and f[1] == steps[i]:
                    raise RuntimeError(f"injected failure at step {steps[i]}")
            for i, f in enumerate(faults):
                if f == ("nangrad", steps[i]):
                    next(p for p in params.values() if p.grad is not None).grad[i].fill_(float("nan"))
            norms = _member_grad_norms(params, n)
            # A member whose gradient is NaN or inf under a finite loss would poison its weights at this update.
            values, norm_values = torch.stack([loss_sum, norms.to(loss_sum.device)]).tolist()
            for i, f in enumerate(faults):
                if f == ("nan", steps[i]):
                    values[i] = float("nan")
            # A member's batch without a labelled token has nothing to learn from: AdamW would still move its weights
            # (momentum, decay), so it is left out of the update as pretrain skips its step; it has no loss to check.
            update = [active[i] and n_valid[i] > 0 for i in range(n)]
            for i in range(n):
                if update[i]:
                    if not (math.isfinite(values[i]) and math.isfinite(norm_values[i])):
                        diverge(i, Diverged(steps[i]))
                        update[i] = False
                    else:
                        last_loss[i] = values[i]
            _clip_and_mask(params, specs, update, norms)
            optimizer.step(
                [lr_at(min(s, total_steps), spec) for s, spec in zip(steps, specs)],
                [spec.weight_decay for spec in specs], update,
            )
            for p in params.values():
                p.grad = None
        except torch.OutOfMemoryError:
            for p in params.values():
                p.grad = None
            raise OutOfMemory(min(steps), microbatch) from None
        dt = time.perf_counter() - t0
        for i in range(n):
            if active[i]:
                train_time[i] += dt
                window_t[i] += dt
                window_steps[i] += 1

        due_eval = []
        for i in range(n):
            if not active[i]:
                continue
            step = steps[i]
            # An unlabelled step reports nothing; its time counts in the next report's throughput.
            if n_valid[i] and (step % report_every == 0 or step in (starts[i] + 1, total_steps)):
                tps = window_steps[i] * tokens_per_step / window_t[i]
                tokens = step * tokens_per_step
                reporters[i]("train", {
                    "step": step, "tokens": tokens, "flops": float(fpt) * tokens, "loss": last_loss[i],
                    "lr": lr_at(step, specs[i]), "tokens_per_s": tps,
                    "mfu": fpt * tps / peak if peak else None,
                })
                window_steps[i], window_t[i] = 0, 0.0
            if spec0.eval_every and step % spec0.eval_every == 0 and step != total_steps:
                due_eval.append(i)
        # Members evaluating now are at one step when they started together (the usual case).
        for step in sorted({steps[i] for i in due_eval}):
            evaluate([i for i in due_eval if steps[i] == step], step)
        stopping = should_stop is not None and should_stop()
        timed = time.perf_counter() - last_ckpt_t >= ckpt_every_s
        due_ckpt = {}
        for i in range(n):
            if not active[i]:
                continue
            step = steps[i]
            due = bool(ckpt_every_steps) and step % ckpt_every_steps == 0
            if step == total_steps or due or timed or stopping or step in exit_at:
                due_ckpt[i] = step
            if step != total_steps and stopping:
                outcome[i] = Interrupted(step)
        checkpoint(due_ckpt)
        done_now = ever_labelled([i for i in range(n) if active[i] and steps[i] == total_steps])
        for i, val in evaluate(done_now, total_steps).items():
            outcome[i] = summarize(specs[i], counts, fpt, val_loss=val, final_loss=last_loss[i],
                                   wall_s=prior_wall[i] + time.perf_counter() - t_start, train_time=train_time[i],
                                   trained_steps=steps[i] - starts[i], start=starts[i], data_sha256=data.sha256,
                                   microbatch=microbatch)
        if timed:
            last_ckpt_t = time.perf_counter()
        if any(s in exit_at for s in steps):
            logging.shutdown()
            os._exit(1)
        if stopping:
            break
    return [o if o is not None else Interrupted(starts[i]) for i, o in enumerate(outcome)]


@torch.no_grad()
def _member_grad_norms(params: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Each member's total gradient norm, (n,) fp32 (zeros when no parameter has a gradient)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return torch.zeros(n)
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32) for g in grads])
    return torch.linalg.vector_norm(norms, dim=0)


@torch.no_grad()
def _clip_and_mask(params: dict[str, torch.Tensor], specs: Sequence, active: list[bool], norms: torch.Tensor) -> None:
    """Clip each member's gradient to its own ``grad_clip`` (as clip_grad_norm_, given the members' ``norms``), and
    zero inactive members'."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return
    n = len(specs)
    dev = grads[0].device
    clip = torch.tensor([s.grad_clip if s.grad_clip > 0 else math.inf for s in specs], device=dev)
    coef = torch.clamp(clip / (norms + 1e-6), max=1.0)
    coef = torch.where(torch.tensor(active, device=dev), coef, torch.zeros_like(coef))
    everyone = all(active)
    for g in grads:
        keep = coef.view((n,) + (1,) * (g.dim() - 1))
        if everyone:
            g.mul_(keep)
        else:  # where, not a product: a diverged member's NaN gradient must become 0, not NaN * 0
            g.copy_(torch.where(keep > 0, g * keep, torch.zeros_like(g)))


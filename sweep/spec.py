"""RunSpec: one fully resolved training run, its canonical JSON and its content-hash id."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
from dataclasses import dataclass, field, fields
from functools import cached_property

from models.config import ModelConfig, count_params, flops_per_token

#: Fields that say where a run trains, not what it trains: they stay out of the run id, so the same run
#: trained on a GPU share or on two GPUs is one run.
PLACEMENT_FIELDS = frozenset({"gpus"})


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; nothing is left to an implicit default."""

    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    hybrid: str
    vocab_size: int
    seq_len: int
    batch_size: int  # sequences per optimizer step
    tokens: int  # training budget; steps = ceil(tokens / (batch_size * seq_len))
    lr: float
    warmup: int  # steps
    schedule: str  # cosine | wsd | constant
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int
    data: str
    evals: tuple[str, ...] = field(default_factory=tuple)
    eval_every: int = 0  # steps between validation/evals; 0 = only at the end
    gpus: float = 1.0  # fraction of one GPU, or an integer count for data-parallel runs
    # content_digest of each file in data ("+"-joined, in order); empty where data names no file. The run id
    # hashes these in place of the paths, so a corpus moved elsewhere is the same run and an edited one is not.
    data_digest: str = ""

    def __post_init__(self) -> None:
        # Normalise types so that equal runs hash equally however they were built. Written to the instance's dict, as
        # object.__setattr__ would (frozen), once per field; an int or a tuple already is its own normal form.
        values = self.__dict__
        for name in _INT_FIELDS:
            if type(values[name]) is not int:
                values[name] = int(values[name])
        for name in _FLOAT_FIELDS:
            values[name] = _norm_float(values[name])
        if type(values["evals"]) is not tuple:
            values["evals"] = tuple(values["evals"])

    @property
    def steps(self) -> int:
        """Optimizer steps this run takes."""
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    @property
    def trained_tokens(self) -> int:
        """Tokens this run trains: whole steps, so its budget rounded up to a multiple of batch_size x seq_len."""
        return self.steps * self.batch_size * self.seq_len

    @cached_property  # a spec is frozen: its id, asked for several times per run while a plan loads, is hashed once
    def run_id(self) -> str:
        """sha256 of the canonical JSON (placement fields excluded), first 16 hex digits."""
        return _digest(self._identity())

    @property
    def trained_id(self) -> str:
        """The run id of the run as it trains: budgets rounded up to the same whole steps train alike, and share it."""
        if self.tokens == self.trained_tokens:
            return self.run_id
        # the id of dataclasses.replace(self, tokens=trained), without building that spec (a third of a plan's load)
        return _digest({**self._identity(), "tokens": self.trained_tokens})

    def model_config(self) -> ModelConfig:
        """The model shape this run trains."""
        return ModelConfig(self.arch, self.d_model, self.n_layers, self.n_heads, self.vocab_size, self.hybrid)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        # Every field is a scalar or a tuple of strings: no deep copy (dataclasses.asdict's) is needed.
        out = dict(zip(_FIELD_NAMES, _field_values(self)))
        out["evals"] = list(self.evals)
        if not self.data_digest:  # runs on built-in data keep the JSON (and the ids) they had before the field
            del out["data_digest"]
        return out

    def canonical_json(self, identity: bool = False) -> str:
        """Sorted keys, no whitespace; ``identity`` drops the placement fields (what the id hashes)."""
        return _canonical(self._identity() if identity else self.to_dict())

    def _identity(self) -> dict:
        """to_dict() less the placement fields, a corpus's path standing as 'file' (its digest says which)."""
        data = self.to_dict()
        for name in PLACEMENT_FIELDS:
            del data[name]
        if self.data_digest:  # where a corpus lies is placement too: its digest stands for it
            parts = (part.partition("@") for part in self.data.split("+"))
            data["data"] = "+".join(("file" if os.path.isabs(name) else name) + at + weight for name, at, weight in parts)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        """Rebuild a spec from ``to_dict()`` output (unknown keys are an error)."""
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Rebuild a spec from its JSON."""
        return cls.from_dict(json.loads(text))

    def derived(self) -> dict:
        """Sizes and costs implied by the spec: params, non-embedding params, FLOPs per token, and the total FLOPs
        of the tokens it trains (whole steps)."""
        return dict(self._derived)

    @cached_property  # asked for twice per run while a plan loads (its storable counts, its name)
    def _derived(self) -> dict:
        cfg = self.model_config()
        counts = count_params(cfg)
        fpt = flops_per_token(cfg, self.seq_len)
        return {
            "params": counts.total,
            "nonembed_params": counts.nonembed,
            "flops_per_token": fpt,
            "flops": float(fpt) * self.trained_tokens,
        }


#: RunSpec's fields, by name and by the type its __post_init__ makes them (dataclasses.fields per spec was a tenth of
#: a plan's load).
_FIELD_NAMES = tuple(f.name for f in fields(RunSpec))
_INT_FIELDS = tuple(f.name for f in fields(RunSpec) if f.type == "int")
_FLOAT_FIELDS = tuple(f.name for f in fields(RunSpec) if f.type == "float")
#: A spec's field values in _FIELD_NAMES' order, read in one call.
_field_values = operator.attrgetter(*_FIELD_NAMES)
#: json.dumps with these options builds an encoder per call; this one holds only its options.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def _canonical(data: dict) -> str:
    """A spec's dict as canonical JSON: sorted keys, no whitespace."""
    return _ENCODER.encode(data)


def _digest(identity: dict) -> str:
    """A run id: the first 16 hex digits of the sha256 of an identity dict's canonical JSON."""
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()[:16]


def _norm_float(value: float) -> float:
    """Round to 12 significant digits so 0.1 + 0.2 and 0.3 hash the same, and -0.0 as 0.0."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite value {value} in a run spec")
    return float(f"{value:.12g}") + 0.0  # + 0.0 turns -0.0 into 0.0: a weight_decay of -0 had its own run id

"""The launcher's progress view: counts, tokens and an ETA that stay sane when runs resume."""

import io
import json
import time

from rich.console import Console

from sweep import task
from sweep.plan import load_plan, si
from sweep.progress import LaunchView

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup\n"


def test_a_resumed_run_replays_its_journal_as_earlier_work(tmp_path, monkeypatch):
    """A resumed run first replays its journal (steps the launch before it trained); the ETA is the rate of this
    launch's own training, not of the replay, which arrives in an instant."""
    sent = []

    class Sink:
        class put:
            @staticmethod
            def remote(events):
                sent.extend(events)
                return False

    monkeypatch.setattr(task.ray, "get", lambda value: value)
    journal = tmp_path / "events.jsonl"
    journal.write_text("".join(json.dumps(["train", {"step": s, "tokens": 256 * s, "loss": 2.0}]) + "\n" for s in (2, 90)))
    assert task.Reporter(Sink(), "r1", 2, journal=journal).replay() == 2
    assert [payload.get("replayed") for *_, payload in sent] == [True, True]

    plan = tmp_path / "p.csv"
    plan.write_text(HEADER + "r,softmax,32,2,2,64,4,25000,3e-3,0,2\n")  # 98 steps of 256 tokens
    spec = load_plan(plan).runs[0].spec
    view = LaunchView(Console(file=io.StringIO()), live=False)
    view.begin([(spec, "r")])
    view.run_started(spec.run_id, spec, "r", 2)
    for *_, kind, payload in sent:  # the previous launch got to step 90; its newest checkpoint was step 80
        view.run_event(spec.run_id, kind, payload)
    view.t0 = time.monotonic() - 10  # this launch has run 10 s
    for step in (81, 82):
        view.run_event(spec.run_id, "train", {"step": step, "tokens": 256 * step, "loss": 2.0, "tokens_per_s": 51.2})
    line = view._line()
    # 2 steps in 10 s, 16 left (the whole steps it trains, 25,088 tokens): 80 s; replayed steps taken as this
    # launch's work said 2 s.
    assert f"/{si(spec.trained_tokens)} tokens" in line and "ETA 1.3 min" in line, line
    assert view.running[spec.run_id]["step"] == 82

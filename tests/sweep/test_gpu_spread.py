"""Runs of a GPU or less spread over a host's GPUs, largest first (Ray alone would stack them on GPU 0).

Ray is started with two logical GPUs on this CPU machine: tasks get GPU ids from Ray as on a real host and
train on the CPU, since torch sees no CUDA.
"""

import os

import pytest
from rich.console import Console

from db.engine import open_db
from sweep.launch import Driver, Flight, LaunchOptions, launch
from sweep.plan import load_plan
from sweep.progress import LaunchView

pytestmark = pytest.mark.slow

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup,gpus\n"


class Recorder(LaunchView):
    """A quiet view that keeps the GPU ids each run's task got."""

    def __init__(self):
        super().__init__(Console(file=open(os.devnull, "w")), live=False)
        self.gpu_ids: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}

    def run_started(self, run_id, spec, name, attempt):
        self.names[run_id] = name
        super().run_started(run_id, spec, name, attempt)

    def run_event(self, run_id, kind, payload):
        if kind == "start":
            self.gpu_ids[self.names[run_id]] = payload["gpu_ids"]
        super().run_event(run_id, kind, payload)


@pytest.fixture(scope="module")
def two_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_shares_spread_over_gpus_by_work(two_gpus, tmp_path, write_plan):
    plan = write_plan(HEADER + "w{d_model},lightning,64|48|32|16,2,2,64,4,=4*64*4,3e-3,0,2,0.5\n")
    view = Recorder()
    opts = LaunchOptions(db_url=f"sqlite:///{tmp_path}/slab.db", ckpt_dir=tmp_path / "ckpt", pack=1, heartbeat_s=1.0)
    result = launch([load_plan(plan)], opts, view)
    assert result.ok, result.rows
    gpu = {name: ids[0] for name, ids in view.gpu_ids.items()}
    assert all(len(ids) == 1 for ids in view.gpu_ids.values())
    # Largest first: w64 takes one GPU, w48 the idle other; then each goes to the GPU with less work.
    assert gpu["w64"] != gpu["w48"]
    assert gpu["w32"] == gpu["w48"] and gpu["w16"] == gpu["w64"]
    assert not two_gpus.util.placement_group_table() or all(
        g["state"] == "REMOVED" for g in two_gpus.util.placement_group_table().values()
    )  # the slots are given back when the launch ends


def test_data_parallel_run_takes_idle_slots_gpus(two_gpus, tmp_path, write_plan):
    plan = load_plan(write_plan(HEADER + "a,lightning,32,2,2,64,4,1k,3e-3,0,2,0.5\nb,lightning,32,2,2,64,4,1k,3e-3,0,2,2\n"))
    engine = open_db(f"sqlite:///{tmp_path}/slab.db", create=True)
    driver = Driver(engine, LaunchOptions(ckpt_dir=tmp_path / "ckpt"), Recorder())
    small, dp = ([Flight(spec=r.spec, name=r.name, attempt=0, tries=0, microbatch=None)] for r in plan.runs)

    def fits(unit):  # whether the driver would start this unit now
        return driver._fits(*driver._needs(unit))

    assert driver.spread and fits(small) and fits(dp)
    slot = driver._slot_for(0.5)
    slot.share = 0.5  # a running share: the data-parallel run must wait for it
    assert not fits(dp) and fits(small)
    slot.share = 0.0  # idle again: its GPU may be given back
    assert fits(dp)
    driver._release_idle_slots(2)
    assert driver.slots == [] and driver._free_gpus() == 2
    engine.dispose()

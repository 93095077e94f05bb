"""The launcher's bookkeeping at the scale of a study (thousands of queued runs), without Ray: a pass over the queue
stops once nothing fits, and a task that ends is collected without waiting for the others."""

import time

from sweep.launch import Driver, Flight, LaunchOptions, Task
from sweep.plan import load_plan

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup,gpus\n"
QUEUED = 5000


def _driver(tmp_path, *, cpu: bool, cpus: float, gpus: float = 0.0) -> Driver:
    driver = Driver.__new__(Driver)
    driver.opts = LaunchOptions(cpu=cpu, ckpt_dir=tmp_path / "ck")
    driver.stopping, driver.units, driver.slots, driver.spread = False, {}, [], False
    driver.total_cpus, driver.total_gpus = cpus, gpus
    return driver


def _spec(write_plan, text: str):
    [run] = load_plan(write_plan(HEADER + text)).runs
    return run.spec


def _counted(driver) -> list:
    """Count the units whose needs a pass works out (each one it checks)."""
    calls = []
    needs = driver._needs

    def counting(unit):
        calls.append(unit)
        return needs(unit)

    driver._needs = counting
    return calls


def _pass_over_full(driver, spec, busy_gpus: float) -> list:
    """One pass over QUEUED copies of a run while four running tasks hold everything; the units it checked."""
    driver.queue = [[Flight(spec=spec, name=None, attempt=0, tries=0, microbatch=None)] for _ in range(QUEUED)]
    driver.units = {f"busy{i}": Task([f"x{i}"], cpus=1.0, gpus=busy_gpus) for i in range(4)}
    driver._claim_and_submit = lambda unit: (_ for _ in ()).throw(AssertionError("started a unit that does not fit"))
    calls = _counted(driver)
    driver._start_ready()
    return calls


def test_a_pass_over_a_long_queue_stops_once_no_cpu_is_left(write_plan, tmp_path):
    """With every CPU taken, a pass had checked each of the thousands of queued runs against every running task, on
    every poll: 33 s of the launcher's time over a launch of 12,000 runs on 16 CPUs, quadratic in the runs."""
    spec = _spec(write_plan, "a,softmax,32,2,2,64,4,5120,3e-3,0,2,1\n")
    driver = _driver(tmp_path, cpu=True, cpus=4.0)
    calls = _pass_over_full(driver, spec, busy_gpus=0.0)
    assert len(calls) <= 2, f"a pass checked {len(calls)} queued units with no CPU free"
    assert len(driver.queue) == QUEUED


def test_a_pass_over_a_long_queue_stops_once_no_gpu_share_is_left(write_plan, tmp_path):
    """The same on GPUs, where the GPU shares run out before the CPUs (162 s over 12,000 runs of a quarter GPU)."""
    spec = _spec(write_plan, "a,softmax,32,2,2,64,4,5120,3e-3,0,2,0.25\n")
    driver = _driver(tmp_path, cpu=False, cpus=64.0, gpus=1.0)
    driver.least_gpus = 0.25
    calls = _pass_over_full(driver, spec, busy_gpus=0.25)
    assert len(calls) <= 2, f"a pass checked {len(calls)} queued units with no GPU share free"


def test_a_small_unit_behind_one_that_does_not_fit_still_starts(write_plan, tmp_path):
    """Stopping early is only for when nothing fits: a one-CPU run queued behind a two-worker run starts on the one CPU
    left, and a second one-CPU run after it waits."""
    big = _spec(write_plan, "b,softmax,32,2,2,64,4,5120,3e-3,0,2,2\n")  # two data-parallel workers: two CPUs
    small = [_spec(write_plan, f"s{i},softmax,32,2,2,64,4,5120,3e-3,{i},2,1\n") for i in (1, 2)]
    driver = _driver(tmp_path, cpu=True, cpus=2.0)
    driver.units = {"busy": Task(["x"], cpus=1.0, gpus=0.0)}
    units = [[Flight(spec=s, name=None, attempt=0, tries=0, microbatch=None)] for s in (big, big, *small)]
    driver.queue = list(units)
    started = []

    def submit(unit):
        started.append(unit)
        driver.units[f"u{len(started)}"] = Task([unit[0].spec.run_id], *driver._needs(unit))

    driver._claim_and_submit = submit
    driver._start_ready()
    assert started == [units[2]] and driver.queue == [units[0], units[1], units[3]]


class _Ray:
    """Ray's wait and get over refs that have ended or not; a wait that must time out says so."""

    def __init__(self, ended):
        self.ended, self.timed_out = set(ended), 0.0

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r in self.ended][:num_returns]
        if len(ready) < num_returns:
            self.timed_out += timeout or 0.0
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        return []


class _Sink:
    class drain:  # noqa: N801 (an actor method's handle)
        @staticmethod
        def remote():
            return "drain"


def test_a_task_that_ends_is_collected_without_waiting_for_the_others(tmp_path):
    """The loop had waited for every running task or the whole poll, so the CPU or GPU of a run that ended early sat
    idle until then (about 0.3 s a run of 1 s): it now takes a task as soon as one ends."""
    driver = _driver(tmp_path, cpu=True, cpus=2.0)
    driver.opts = LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck", poll_s=0.5)
    driver.units = {"ended": Task(["a"], 1.0, 0.0), "running": Task(["b"], 1.0, 0.0), "also": Task(["c"], 1.0, 0.0)}
    driver.ray, driver.sink = _Ray({"ended"}), _Sink()
    driver._write_events = lambda events: None
    finished = []

    def finish(ref):
        finished.append(ref)
        driver.units.pop(ref)

    driver._finish_unit = finish
    t0 = time.monotonic()
    driver._collect()
    assert finished == ["ended"] and driver.ray.timed_out == 0.0 and time.monotonic() - t0 < 0.4
    driver.ray.ended |= {"running", "also"}
    driver._collect()
    assert finished == ["ended", "running", "also"], "tasks that ended together are collected together"


def test_a_launch_reads_its_runs_a_batch_of_ids_a_statement(write_plan, tmp_path, monkeypatch):
    """Every run id of a launch in one IN list passes PostgreSQL's 65,535 parameters (or SQLite's variable limit) in
    a study of that many runs; the launch's final read takes ID_BATCH ids a statement and still finds every run."""
    from sqlalchemy import event

    import sweep.launch as launch
    from db.engine import open_db
    from sweep.registry import add_plans

    plan = load_plan(write_plan(HEADER + "r{seed},softmax,32,1,2,16,2,=32*3,1e-3,0..9+1,0,1\n"))
    engine = open_db(f"sqlite:///{tmp_path / 'slab.db'}")
    add_plans(engine, [plan])
    monkeypatch.setattr(launch, "ID_BATCH", 3)
    widest = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, params, context, many: widest.append(len(params or ())))
    ids = [r.spec.run_id for r in plan.runs]
    assert set(launch._read_runs(engine, ids)) == set(ids)
    assert max(widest) <= 3 + 1, widest  # the ids, and at most one more bound value

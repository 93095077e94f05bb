"""The multi-node path: a two-node Ray cluster (ray.cluster_utils.Cluster) on this machine runs a plan."""

import os

import pytest
from sqlalchemy import select

from db.engine import open_db
from db.schema import Run
from sweep.launch import LaunchError, LaunchOptions, launch
from sweep.plan import load_plan
from sweep.progress import LaunchView

pytestmark = pytest.mark.slow

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup,gpus\n"


def quiet():
    from rich.console import Console

    return LaunchView(Console(file=open(os.devnull, "w")), live=False)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    c.add_node(num_cpus=1, num_gpus=0)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_two_node_cluster_runs_a_plan(cluster, tmp_path, write_plan):
    plan = write_plan(HEADER + "m-{seed},lightning,32,2,2,64,4,5120,3e-3,0|1|2|3,2,1\n")
    db = f"sqlite:///{tmp_path}/slab.db"
    opts = LaunchOptions(db_url=db, address=cluster.address, cpu=True, ckpt_dir=tmp_path / "ckpt", heartbeat_s=1.0)
    result = launch([load_plan(plan)], opts, quiet())
    assert result.ok and len(result.rows) == 4
    engine = open_db(db)
    with engine.connect() as conn:
        assert set(conn.scalars(select(Run.status))) == {"done"}
    engine.dispose()


def test_run_larger_than_the_cluster_is_refused(cluster, tmp_path, write_plan):
    plan = write_plan(HEADER + "big,lightning,32,2,2,64,4,5120,3e-3,0,2,4\n")
    opts = LaunchOptions(db_url=f"sqlite:///{tmp_path}/slab.db", address=cluster.address, ckpt_dir=tmp_path / "ckpt")
    with pytest.raises(LaunchError, match="asks for 4 GPUs but the cluster has 0"):
        launch([load_plan(plan)], opts, quiet())
    assert not (tmp_path / "slab.db").exists() and not (tmp_path / "ckpt").exists()  # refused before anything is written


def test_a_launch_without_address_starts_its_own_ray_beside_a_running_cluster(cluster):
    """`slab launch` without --address starts a Ray of its own, as its help says. With another Ray running on the host
    (here the cluster; on a user's machine `ray start`), ray.init had found that one, and with num_cpus or num_gpus
    set (--cpu sets num_gpus 0) refused to join it: a ValueError traceback instead of a launch."""
    import ray

    from sweep.launch import init_ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        init_ray(LaunchOptions(cpu=True, num_cpus=1))
        assert ray.get_runtime_context().gcs_address != cluster.address
        assert ray.cluster_resources().get("CPU") == 1  # its own: the cluster has two nodes of one CPU
    finally:
        ray.shutdown()

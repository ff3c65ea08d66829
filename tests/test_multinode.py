"""Placement by role on a simulated multi-node cluster (ray.cluster_utils.Cluster): every actor
lands on its node type, a new reward node lets the reward pool grow there, and a full run
completes across nodes."""

import json

import pytest

from learner.driver import train
from learner.fleet import role_options
from learner.wiring import OnRay

REWARD = "reward_jpeg_compressibility"


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the other modules' shared instance (conftest.ray_instance)
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {
        "sampler": c.add_node(num_cpus=2, num_gpus=1, resources={"sampler": 1}),
        "learner": c.add_node(num_cpus=2, num_gpus=1, resources={"learner": 1}),
        "reward": c.add_node(num_cpus=1, resources={REWARD: 1}),
    }
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def node_of(actor):
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


@pytest.mark.slow
def test_gpu_runs_ask_for_a_gpu_on_their_node_type(cluster):
    import ray

    c, nodes = cluster

    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_node_id(), ray.get_gpu_ids()

    wiring = OnRay(None, min_cpus=0, resources={})
    for role in ("sampler", "learner"):
        probe = wiring.create(Probe, options=role_options(role, gpu=True))
        node, gpus = ray.get(probe.where.remote())
        assert node == nodes[role].node_id and len(gpus) == 1
        ray.kill(probe)


@pytest.mark.slow
def test_roles_placement_pool_growth_and_a_full_run(cluster, small_config, tmp_path):
    from learner.driver import Driver

    c, nodes = cluster
    config = small_config(system={"reward_workers_range": ("jpeg_compressibility=1:2",)})
    driver = Driver(config)
    assert node_of(driver.samplers[0]) == nodes["sampler"].node_id
    assert node_of(driver.learner) == nodes["learner"].node_id
    pool = driver.pools["jpeg_compressibility"]
    assert [node_of(a) for a in pool.actors] == [nodes["reward"].node_id]

    # A second reward node joins; asking for 2 reward workers places the new one there.
    new_node = c.add_node(num_cpus=1, resources={REWARD: 1})
    c.wait_for_nodes()
    (tmp_path / "control.json").write_text(
        json.dumps({"reward_workers": {"jpeg_compressibility": 2}})
    )
    driver.resize_rewards()
    assert len(pool) == 2
    assert {node_of(a) for a in pool.actors} == {nodes["reward"].node_id, new_node.node_id}

    history = driver.run()
    assert len(history) == 2 and all(h["samples"] == 8 for h in history)
    assert all(h["reward_workers/jpeg_compressibility"] == 2 for h in history)
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_async_run_across_nodes(cluster, small_config):
    history = train(small_config(run={"epochs": 3}, system={"mode": "async"}))
    assert len(history) == 3 and all(h["staleness_max"] <= 1 for h in history)


def remove_when(c, node, metrics, after_epochs, removed):
    """Remove `node` from the cluster once `after_epochs` epochs are logged (in a thread)."""
    import threading
    import time

    def remover():
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after_epochs:
            time.sleep(0.02)
        removed["epochs_logged"] = len(metrics.read_text().splitlines())
        c.remove_node(node)

    thread = threading.Thread(target=remover, daemon=True)
    thread.start()
    return thread


def sampler_node(c, nodes, node_id):
    return next(n for n in [nodes["sampler"], *c.list_all_nodes()] if n.node_id == node_id)


# The two tests below remove nodes: they run last in this module.
@pytest.mark.slow
def test_a_lost_sampler_node_moves_its_sampler_to_another(cluster, small_config):
    from learner.driver import Driver

    c, nodes = cluster
    c.add_node(num_cpus=2, resources={"sampler": 1})  # a second node that can take a sampler
    c.wait_for_nodes()
    config = small_config(run={"epochs": 5})
    driver = Driver(config)
    first = node_of(driver.samplers[0])
    removed: dict = {}
    thread = remove_when(
        c, sampler_node(c, nodes, first), config.run.dir / "metrics.jsonl", 1, removed
    )
    history = driver.run()
    thread.join(timeout=30)
    assert removed["epochs_logged"] < config.run.epochs  # the node went during the run
    assert first not in {n.node_id for n in c.list_all_nodes()}  # so the sampler moved
    assert [h["epoch"] for h in history] == list(range(config.run.epochs))
    assert all(h["samples"] == 8 for h in history)
    assert [h["policy_version"] for h in history] == list(range(config.run.epochs))


@pytest.mark.slow
def test_with_no_node_left_for_a_sampler_the_run_waits_then_says_why(cluster, small_config):
    from learner.driver import Driver

    c, nodes = cluster
    config = small_config(run={"epochs": 50}, system={"restart_wait_s": 5.0})
    driver = Driver(config)
    node = sampler_node(c, nodes, node_of(driver.samplers[0]))
    thread = remove_when(c, node, config.run.dir / "metrics.jsonl", 1, {})
    with pytest.raises(RuntimeError, match="sampler 0 did not come back within 5s.*--resume"):
        driver.run()
    thread.join(timeout=30)
    assert (config.run.dir / "checkpoints").is_dir()  # what it learned so far is resumable

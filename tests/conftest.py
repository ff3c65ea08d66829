import functools
import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: one intra-op thread per process keeps Ray workers and pytest from oversubscribing.
torch.set_num_threads(int(os.environ.get("DDPO_TEST_THREADS", "2")))
# Fixed thread counts (the driver's split of the cores, never adapted): the bit-exact resume
# tests need them, since training's reductions differ across thread counts.
os.environ.setdefault("DDPO_THREADS", "fixed")


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with the suite's thread count: an in-process run's thread governor
    sets torch's (process-wide) count and leaves it, and float sums differ across counts."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pipe():
    from ddpo.policy import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    """cluster.yaml, parsed (the deploy tests)."""
    from deploy_files import read_cluster_yaml

    return read_cluster_yaml()


@pytest.fixture(scope="module")
def raycluster() -> dict:
    from deploy_files import read_kuberay

    return read_kuberay("raycluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    from deploy_files import read_kuberay

    return read_kuberay("rayjob")


@pytest.fixture(scope="module")
def server(request):
    """A jpeg_compressibility reward service in a thread, for the test module, with the module's
    TOKEN and LIMITS."""
    import threading

    from rewards import make_reward
    from rewards.serve import make_server

    reward = make_reward("jpeg_compressibility")
    module = request.module
    server = make_server(reward, "jpeg_compressibility", module.TOKEN, module.LIMITS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance, started by the first module that asks and kept for the next ones
    (starting and stopping Ray costs about 5 s on 2 cores); a module that needs its own cluster
    (test_multinode) shuts it down, and the next module to ask starts it again. Ray stops
    with the test process."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # As the driver's own local instance (learner/wiring.py): workers at Ray's default nice
        # 15 all but stop while any other process keeps a core busy (a 26 s run of the
        # alignment task had not finished after 13 minutes beside a training run).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Logical CPUs: room for samplers, the learner and grown reward pools (actors mostly wait).
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def small_config_in():
    """small_config_in(run_dir, task, **changes): small_config in a run directory of the caller's
    choosing, for runs that a whole module shares."""
    from ddpo.config import SampleConfig, TrainConfig, override
    from ddpo.presets import task_config

    def make(run_dir, task="compressibility", **changes):
        settings = {
            "run.epochs": 2,
            "run.dir": run_dir,
            "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
            "train": TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
            "grid_prompts": 2,
            "grid_seeds": 2,
        }
        return override(task_config(task, "tiny"), settings | changes)

    return make


@pytest.fixture
def small_config(tmp_path, small_config_in):
    """A tiny-model config with a few steps and samples: small_config(task, **changes), the
    changes as `ddpo.config.override` takes them (run={"epochs": 4}, grid_prompts=3)."""
    return functools.partial(small_config_in, tmp_path)


@pytest.fixture
def cli_error(capsys):
    """cli_error(argv): run learner.run's main on argv, assert that it stopped with exit status 2
    and one line on stderr, and return that line."""
    from learner.run import main

    def run(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2, (stopped.value.code, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run

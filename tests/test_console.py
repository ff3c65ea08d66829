"""The console (issue 13, finding 12): no third-party warnings, and a heartbeat without a TTY."""

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.heartbeat import Heartbeat

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def beats(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("still ")]


def test_heartbeat_names_the_phase_every_interval_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="learner")
    beat = Heartbeat(interval=0.1, stream=io.StringIO())  # a pipe or a file, as under `ray job`
    with beat.phase("epoch 3"):
        time.sleep(0.35)
        with beat.phase("the start evaluation"):  # the innermost phase is named
            time.sleep(0.35)
    after_phases = len(beats(caplog))
    time.sleep(0.3)  # no phase: silence
    beat.close()
    lines = beats(caplog)
    outer, inner = "still epoch 3: 0 s", "still the start evaluation: 0 s"
    assert len(lines) == after_phases, lines
    assert lines == [outer] * lines.count(outer) + [inner] * lines.count(inner), lines
    assert lines.count(outer) >= 2 and lines.count(inner) >= 2, lines


def test_heartbeat_waits_a_full_interval_after_a_line_and_is_off_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="learner")
    beat = Heartbeat(interval=0.5, stream=io.StringIO())
    with beat.phase("epoch 0"):
        for _ in range(12):  # an epoch line every 0.05 s: nothing to add
            time.sleep(0.05)
            beat.touch()
    beat.close()
    on_terminal = Heartbeat(interval=0.05, stream=Terminal())  # tqdm's bar shows progress there
    with on_terminal.phase("epoch 0"):
        time.sleep(0.2)
    on_terminal.close()
    assert not on_terminal.enabled and beats(caplog) == []


class NoActors:
    """Wiring whose actors are names: the driver is built without loading a model."""

    def create(self, cls, *args, options=None):
        return cls.__name__

    def wait_started(self, actors, report_s, timeout_s):
        time.sleep(0.25)  # actors loading their models

    def call(self, actor, method, *args, num_returns=1):
        return (None,) * num_returns if num_returns > 1 else None

    def get(self, ref):
        return ref


def test_the_driver_beats_through_a_silent_start(small_config, caplog, monkeypatch):
    """Without a TTY (`ray job submit`, a RayJob), the driver printed nothing between starting
    its actors and the first epoch line, 70-90 s on the paper's models: now it beats."""
    from learner import driver as driver_module
    from learner import session

    monkeypatch.setattr(session, "Heartbeat", lambda: Heartbeat(0.1, io.StringIO()))
    monkeypatch.setattr(session, "save_lora", lambda state, path: None)
    caplog.set_level(logging.INFO, logger="learner")
    config = small_config(run={"save_every": 0})
    driver = driver_module.Driver(config, NoActors())
    driver.publish = lambda: 0
    driver.grid = lambda when, image=True: time.sleep(0.25)
    driver._epochs = lambda: None
    driver.run()
    lines = beats(caplog)
    for phase in ("starting the actors", "the start evaluation", "the end evaluation"):
        assert f"still {phase}: 0 s" in lines, lines


def test_importing_the_policy_prints_no_third_party_warning():
    """Each process printed transformers' "`CLIPImageProcessor` requires torchvision (not
    installed); falling back to `CLIPImageProcessorPil`" and its Siglip twin, from diffusers'
    IP-adapter import. The same fallback still warns elsewhere; not through ddpo."""
    script = (
        "import sys, logging\n"
        "import ddpo.policy\n"  # imports StableDiffusionPipeline, which imports the processors
        "print('---', file=sys.stderr, flush=True)\n"
        "from ddpo.quiet import FALLBACK_LOGGER\n"
        "logging.getLogger(FALLBACK_LOGGER).filters.clear()\n"  # as before the fix
        "import transformers\n"
        "transformers.ViTImageProcessor\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    ours, unfiltered = done.stderr.split("---\n")
    assert ours == "", ours
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "`ViTImageProcessor` requires torchvision" in unfiltered, unfiltered
    else:
        pytest.skip("torchvision is installed: transformers has nothing to fall back from")

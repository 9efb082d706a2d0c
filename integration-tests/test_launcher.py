"""The launcher's supervision: clean shutdown on SIGINT, a crashed shard tearing the
server down, and clear errors for bad flags. Each test runs its own launcher."""

import os
import signal
import time

from launcher_harness import Launcher, alive, assert_all_gone, cmdline, descendants

# Short sequences: the shard's warmup (a full-size prefill) is quick even on a small CPU.
SMALL = ("--max-total-tokens", "512")


def test_sigint_stops_every_process():
    launcher = Launcher(*SMALL)
    launcher.wait_healthy()
    children = descendants(launcher.process.pid)
    names = [cmdline(p) for p in children]
    assert any("text-generation-shard" in n for n in names), names
    assert any("text-generation-router" in n for n in names), names

    assert launcher.stop() == 0, launcher.tail()
    assert_all_gone(children, launcher)
    assert launcher.shard_sockets() == [], "shard sockets left behind"
    output = launcher.output()
    assert "Stopping router" in output and "Stopping shard-0" in output
    # The router is stopped before the shards.
    assert output.index("Stopping router") < output.index("Stopping shard-0")


def test_killed_shard_fails_the_launcher():
    launcher = Launcher(*SMALL)
    launcher.wait_healthy()
    children = descendants(launcher.process.pid)
    shard = next(p for p in children if "text-generation-shard" in cmdline(p))

    os.kill(shard, signal.SIGKILL)
    status = launcher.wait_exit()
    assert status != 0, launcher.tail()
    assert "shard-0 exited unexpectedly (killed by signal SIGKILL)" in launcher.output(), launcher.tail()
    assert_all_gone(children, launcher)


def test_missing_model_path_is_a_clear_error():
    started = time.monotonic()
    launcher = Launcher(model="/no/such/model.gguf")
    status = launcher.wait_exit(timeout=30)
    assert status != 0
    assert "model path /no/such/model.gguf does not exist" in launcher.output(), launcher.tail()
    assert time.monotonic() - started < 30


def test_inconsistent_token_limits_name_the_flag():
    launcher = Launcher("--max-input-tokens", "100", "--max-total-tokens", "100")
    assert launcher.wait_exit(timeout=60) != 0
    assert "`--max-input-tokens` (100) must be < `--max-total-tokens` (100)" in launcher.output(), launcher.tail()
    assert not alive(launcher.process.pid)

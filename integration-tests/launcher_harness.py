"""Runs the real `text-generation-launcher` (from target/release) on a free port with its
own shard socket path, and inspects the processes it starts."""

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "target" / "release" / "text-generation-launcher"
MODEL = Path(os.environ.get("TGI_TEST_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
STARTUP_TIMEOUT_S = 600
SHUTDOWN_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Pids of every live process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) is parenthesised and may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if state != "Z":
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Launcher:
    """One launcher process, its combined output captured in a file."""

    def __init__(self, *extra_args: str, model: Path | str = MODEL, env: dict[str, str] | None = None):
        self.model_id = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uds_path = f"{tempfile.gettempdir()}/tgi-test-{uuid.uuid4().hex[:8]}"
        self.log = tempfile.NamedTemporaryFile(prefix="launcher-", suffix=".log", delete=False)
        args = [
            str(LAUNCHER),
            "--model-id", self.model_id,
            "--hostname", "127.0.0.1",
            "--port", str(self.port),
            "--shard-uds-path", self.uds_path,
            "--graceful-termination-timeout", "30",
            *extra_args,
        ]
        assert LAUNCHER.is_file(), f"{LAUNCHER} is missing: run `cargo build --release` first"
        self.process = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"launcher exited with {self.process.returncode} during startup:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.process.kill()
        pytest.fail(f"server not healthy after {timeout}s:\n{self.tail()}")

    def wait_exit(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"launcher still running after {timeout}s:\n{self.tail()}")

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.wait_exit()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def shard_sockets(self) -> list[Path]:
        return list(Path(self.uds_path).parent.glob(Path(self.uds_path).name + "-*"))


def assert_all_gone(pids: set[int], launcher: Launcher) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = {p: cmdline(p) for p in pids if alive(p)}
    assert not left, f"processes left behind: {left}\n{launcher.tail()}"

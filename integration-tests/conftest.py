"""Session fixtures: one launcher serving the default model for the API tests, stopped
(and checked to leave no process behind) at the end of the session."""

import pytest

from launcher_harness import Launcher, assert_all_gone, descendants


@pytest.fixture(scope="session")
def launcher():
    server = Launcher()
    try:
        server.wait_healthy()
        children = descendants(server.process.pid)
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"launcher exited with {status}:\n{server.tail()}"
    assert_all_gone(children, server)


@pytest.fixture(scope="session")
def url(launcher) -> str:
    return launcher.url

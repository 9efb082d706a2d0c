"""Schema-driven fuzzing: schemathesis generates requests from the server's own
`/openapi.json` (valid ones and, in negative mode, ones that break the schema) for every
route. None may get a 5xx, and the server must stay healthy and never panic.

The server has tiny token limits so that every accepted generation is short; the number
of examples per operation and mode is TGI_FUZZ_EXAMPLES (default 15)."""

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from launcher_harness import Launcher, assert_all_gone, descendants

EXAMPLES = int(os.environ.get("TGI_FUZZ_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def fuzz_server():
    launcher = Launcher("--max-total-tokens", "24", "--max-input-tokens", "16")
    try:
        launcher.wait_healthy()
        children = descendants(launcher.process.pid)
        yield launcher
        assert requests.get(f"{launcher.url}/health", timeout=10).status_code == 200
    finally:
        status = launcher.stop()
    assert status == 0, launcher.tail()
    assert_all_gone(children, launcher)
    assert "panicked" not in launcher.output(), launcher.tail()


def fuzz_operation(operation, mode: GenerationMode, base_url: str) -> None:
    """EXAMPLES requests of `mode` for one operation; hypothesis shrinks a failing one."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=60)

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation with no parameters or body: nothing to break.
        assert mode == GenerationMode.NEGATIVE


# schemathesis' own pytest plugin does not run under pytest 9: the operations are walked here.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_server_error_for_any_request(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures = []
    for operation in operations:
        try:
            fuzz_operation(operation, mode, fuzz_server.url)
        except Exception as error:  # noqa: BLE001 - every operation runs; all failures are reported
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)

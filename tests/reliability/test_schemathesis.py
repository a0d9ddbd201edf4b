"""Schema fuzzing with every schemathesis check over the running server's /openapi.json.

``schemathesis run`` (the CLI, as vLLM runs it over its own schema) loads the schema from the real
``promptdistill serve`` child process and runs its four phases — the schema's examples, coverage
of boundary values, random fuzzing (valid and invalid data) and stateful sequences that follow the
declared links (create a label set, add classes, list, delete). All checks run: no 5xx, every
status, content type, header and body as documented (problem details for every error), invalid
data refused, valid data accepted, deleted resources gone, created ones there, and the API key
honoured (``ignored_auth`` drops the key and expects 401). The server has a key, which the run
sends, so the mutating routes are fuzzed too. tests/reliability/schemathesis.toml says where a
schema-valid request may still get 422 and why. Examples per operation and the seed are fixed, so
the run is reproducible and takes well under 2 minutes on 2 cores.

(schemathesis' pytest integration, ``schemathesis.pytest.from_fixture``, uses a pytest-internal
attribute that pytest 9 removed, hence the CLI.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.reliability.conftest import ServerProcess, start_server, stop_server

MAX_EXAMPLES = 40
MAX_TIME_S = 60  # fuzzing and stateful phases repeat (new seeds) until the budget is spent
SEED = 20261123
KEY = "schemathesis-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_server(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with an API key for the module (schemathesis runs thousands of requests against it)."""
    work = tmp_path_factory.mktemp("schemathesis")
    bundle = Path(shutil.copytree(tiny_bundle_dir, work / "bundle"))
    server = start_server(bundle, work, env={"PROMPTDISTILL_API_KEY": KEY})
    try:
        yield server
    finally:
        stop_server(server)


def test_every_check_passes(keyed_server: ServerProcess, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
        "run", f"{keyed_server.url}/openapi.json",
        "--checks", "all",
        "--header", f"X-API-Key: {KEY}",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--request-timeout", "60",
        "--max-time", str(MAX_TIME_S),
        "--workers", "1",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert keyed_server.proc.poll() is None, f"the server died under fuzzing:\n{keyed_server.output()}"
    assert run.returncode == 0, f"schemathesis found failures (exit {run.returncode}):\n{out[-6000:]}"
    # a run that tested nothing would also exit 0: check the schema was really exercised
    tested = re.search(r"Tested: (\d+)", out)
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert tested and cases, out[-3000:]
    assert int(tested.group(1)) >= 8, f"only {tested.group(1)} operations tested:\n{out[-3000:]}"
    assert int(cases.group(1)) >= 300 and cases.group(1) == cases.group(2), out[-3000:]
    assert httpx2.get(keyed_server.url + "/readyz", timeout=10).status_code == 200
    print(f"schemathesis, all checks: {tested.group(1)} operations, {cases.group(0)}")


# Server errors schemathesis found earlier, replayed deterministically (each was a 500 once).
REGRESSIONS = [
    # class id beyond SQLite's 64-bit INTEGER: OverflowError in the store
    ("DELETE", "/v1/label-sets/default/classes/22297072147366597743345664"),
    ("DELETE", "/v1/label-sets/default/classes/9223372036854775808"),
    ("DELETE", "/v1/label-sets/default/classes/-9223372036854775809"),
]


@pytest.mark.parametrize(("method", "path"), REGRESSIONS)
def test_fuzz_regressions(keyed_server: ServerProcess, method: str, path: str) -> None:
    r = httpx2.request(method, keyed_server.url + path, headers={"X-API-Key": KEY}, timeout=30)
    assert 400 <= r.status_code < 500, f"{method} {path} -> {r.status_code}: {r.text[:300]}"

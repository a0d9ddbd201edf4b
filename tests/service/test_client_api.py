"""The client side of the API: cursor pagination, typed exceptions from problem details, bounded
retries that honour Retry-After, and a CLI that imports no heavy module and logs no request line."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import httpx2
import pytest

from service.client import Client, Conflict, InvalidRequest, NotFound, Overloaded, Unauthorized
from tests.service.conftest import ROOT

KEY = "client-key"
HEAVY = ("torch", "numpy", "fastapi", "onnxruntime", "open_clip", "faiss", "PIL")


def test_class_list_pages_by_cursor(live: Any) -> None:
    with live(api_key=KEY) as server, Client(server.url, api_key=KEY) as client, server.client() as http:
        client.add_classes([f"animal {i}" for i in range(30)])
        full = http.get("/v1/label-sets/default/classes", params={"limit": 10_000}).json()
        assert full["next_cursor"] is None and len(full["classes"]) == 38
        ids = [c["id"] for c in full["classes"]]
        assert ids == sorted(ids)
        pages = list(client.class_pages(page_size=7))
        assert [len(p["classes"]) for p in pages] == [7, 7, 7, 7, 7, 3]
        assert [c["id"] for p in pages for c in p["classes"]] == ids
        assert client.classes(page_size=5)["classes"] == full["classes"]
        # a removal between two pages neither repeats nor skips a surviving class
        first = http.get("/v1/label-sets/default/classes", params={"limit": 10}).json()
        client.remove_class(class_id=ids[3])
        client.remove_class(class_id=ids[12])
        rest = http.get("/v1/label-sets/default/classes", params={"limit": 100, "cursor": first["next_cursor"]})
        seen = [c["id"] for c in first["classes"]] + [c["id"] for c in rest.json()["classes"]]
        assert seen == [i for i in ids if i != ids[12]]
        bad = http.get("/v1/label-sets/default/classes", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and "cursor" in bad.json()["detail"]
        assert http.get("/v1/label-sets/default/classes", params={"limit": 10_001}).status_code == 422


def test_typed_exceptions_from_problem_details(live: Any) -> None:
    with live(api_key=KEY) as server:
        with Client(server.url) as anonymous, pytest.raises(Unauthorized) as unauth:
            anonymous.add_classes(["okapi"])
        assert unauth.value.status == 401 and unauth.value.code == "unauthorized"
        with Client(server.url, api_key=KEY) as client:
            with pytest.raises(NotFound) as missing:
                client.classes("nope")
            assert missing.value.code == "unknown_label_set" and "nope" in missing.value.detail
            with pytest.raises(Conflict):
                client.add_classes(["cat"])
            with pytest.raises(InvalidRequest) as invalid:
                client.classify_bytes([b"x"], top_k=0)
            assert [e["field"] for e in invalid.value.errors] == ["top_k"]
            assert "top_k" in str(invalid.value) and "[{" not in str(invalid.value), "no Python repr of a list"


def test_retries_honour_retry_after(flaky: Any) -> None:
    url, arrivals = flaky(429, failures=2, retry_after="1")
    with Client(url, retries=3) as client:
        assert client.label_sets() == {"label_sets": []}
    assert len(arrivals) == 3
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(g >= 0.9 for g in gaps), gaps  # waited what the server asked, not a fixed backoff


def test_retries_are_bounded(flaky: Any) -> None:
    url, arrivals = flaky(503, failures=100, retry_after="0")
    with Client(url, retries=2) as client, pytest.raises(Overloaded) as err:
        client.label_sets()
    assert len(arrivals) == 3 and err.value.status == 503 and err.value.retry_after_s == 0
    url, arrivals = flaky(429, failures=100, retry_after="0")
    with Client(url, retries=0) as client, pytest.raises(Overloaded):
        client.label_sets()
    assert len(arrivals) == 1


_PROBE = (
    "import sys\n"
    "from promptdistill.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    f"sys.stderr.write('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules) + '\\n')\n"
    "sys.exit(rc)\n"
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=60)


def test_client_commands_import_nothing_heavy_and_stay_quiet(live: Any) -> None:
    with live() as server:
        quiet = _cli("classes", "list", "--url", server.url)
        loud = _cli("-v", "classes", "list", "--url", server.url)
        with httpx2.Client(base_url=server.url) as http:
            n = len(http.get("/v1/label-sets/default/classes").json()["classes"])
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stdout.strip().splitlines()) == n + 1 and "version" in quiet.stdout
    assert quiet.stderr.strip() == "HEAVY=", quiet.stderr  # no torch & co, and no log line at all
    assert loud.returncode == 0 and "HTTP Request: GET" in loud.stderr, loud.stderr

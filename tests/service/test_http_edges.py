"""Small HTTP-layer promises: OPTIONS and 405 name every method, deleted label sets leave /metrics,
/readyz names the bundle without its path, a blank --api-key fails with one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.service.conftest import ROOT

API_KEY = "k" * 24


def test_options_answers_with_every_method_of_the_path(live: Callable[..., Any]) -> None:
    with live() as server, server.client() as c:
        r = c.options("/v1/label-sets")
        assert r.status_code == 204, r.text
        assert set(r.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
        r = c.options("/v1/label-sets/default/classes")
        assert {"GET", "POST", "DELETE"} <= set(r.headers["allow"].split(", "))
        assert c.options("/no/such/path").status_code == 404


def test_405_lists_all_methods_not_just_the_first_route(live: Callable[..., Any]) -> None:
    with live() as server, server.client() as c:
        r = c.request("PATCH", "/v1/label-sets")
        assert r.status_code == 405
        # GET and POST /v1/label-sets are two routes; Starlette alone names only the first one's method
        assert set(r.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
        assert c.put("/livez").headers["allow"] == "GET, OPTIONS"


def _series(text: str, label_set: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#") and f'label_set="{label_set}"' in line]


def test_metrics_drop_the_series_of_a_deleted_label_set(live: Callable[..., Any]) -> None:
    with live() as server, server.client() as c:
        r = c.post("/v1/label-sets", json={"name": "pets", "names": ["cat", "dog"]})
        assert r.status_code in (200, 201), r.text
        assert len(_series(c.get("/metrics").text, "pets")) == 2  # version and classes gauges
        assert c.delete("/v1/label-sets/pets").status_code in (200, 204)
        text = c.get("/metrics").text
        assert _series(text, "pets") == [], text
        assert _series(text, "default")  # the others stay


def test_metrics_drop_a_label_set_deleted_by_another_worker(live: Callable[..., Any], tmp_path: Path) -> None:
    # two apps on one database = two workers (or replicas); only the second sees the delete
    shared = tmp_path / "shared"
    with live(state_dir=shared) as first, live(state_dir=shared) as second, first.client() as a, second.client() as b:
        assert a.post("/v1/label-sets", json={"name": "pets", "names": ["cat", "dog"]}).status_code in (200, 201)
        assert _series(a.get("/metrics").text, "pets")
        assert b.delete("/v1/label-sets/pets").status_code in (200, 204)
        text = a.get("/metrics").text
    assert _series(text, "pets") == [], text
    assert _series(text, "default")


def test_readyz_names_the_bundle_without_its_path(live: Callable[..., Any], tiny_bundle_dir: Path) -> None:
    with live() as server, server.client() as c:
        r = c.get("/readyz")
    assert r.status_code == 200, r.text
    bundle = r.json()["checks"]["bundle"]
    assert str(tiny_bundle_dir) not in r.text and str(tiny_bundle_dir.parent) not in r.text
    assert re.fullmatch(rf"{tiny_bundle_dir.name} \(\w+, files sha256:[0-9a-f]{{12}}\)", bundle), bundle


@pytest.mark.parametrize("key", ["", "   "])
def test_blank_api_key_fails_with_one_clear_line(tiny_bundle_dir: Path, tmp_path: Path, key: str) -> None:
    cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(tiny_bundle_dir)]
    cmd += ["--state-dir", str(tmp_path / "state"), "--port", "0", "--api-key", key]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2, lines
    assert len(lines) == 1 and "--api-key is blank" in lines[0], lines
    assert "pydantic" not in lines[0] and "validation error" not in lines[0]


@pytest.mark.parametrize("value", ["+0.0", "1e2", " 7", "0x1", "3.0"])
def test_integers_in_paths_and_queries_are_digits_only(live: Callable[..., Any], value: str) -> None:
    """Pydantic's lax mode reads "+0.0" as 0: the schema says integer, so it is a 422 (schemathesis ST201)."""
    with live() as server, server.client() as http:
        for path, params in (
            ("/v1/label-sets", {"min_version": value}),
            ("/v1/label-sets/default/classes", {"limit": value}),
            ("/v1/label-sets/default/classes", {"min_version": value}),
        ):
            got = http.get(path, params=params)
            assert got.status_code == 422 and "digits" in got.text, (path, params, got.text)
        gone = http.delete(f"/v1/label-sets/default/classes/{quote(value, safe='')}")
        assert gone.status_code == 422, gone.text
        assert http.get("/v1/label-sets", params={"min_version": "1"}).status_code == 200
        spec = http.get("/openapi.json").json()  # the check leaves the documented bounds as they were
        (param,) = spec["paths"]["/v1/label-sets/{name}/classes/{class_id}"]["delete"]["parameters"][1:]
        assert param["schema"]["minimum"] == 0 and "ge" not in param["schema"], param

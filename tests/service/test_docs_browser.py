"""/docs (Swagger UI) and /redoc render in a real headless Chromium with no network but loopback.

Their scripts come from the fastapi-offline wheel: with every non-loopback host unresolvable, the
pages must still build the operation list from /openapi.json (a CDN-backed page stays blank).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx2
import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [  # /work/shared/docs/environment.md, plus: resolve nothing but loopback
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=20000",  # let the page's scripts fetch /openapi.json and render
]


def _dom(url: str, profile: Path) -> str:
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run installs it)"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_docs_render_offline(live: Any, tmp_path: Path) -> None:
    with live() as server:
        html = httpx2.get(server.url + "/docs").text
        assert "cdn" not in html.lower() and "/static-offline-docs/swagger-ui-bundle.js" in html
        swagger = _dom(server.url + "/docs", tmp_path / "p1")
        redoc = _dom(server.url + "/redoc", tmp_path / "p2")
    # Swagger UI: one block per operation, with its path, and the Authorize button of the apiKey scheme
    assert swagger.count('class="opblock opblock-') >= 11, swagger[-3000:]
    for path in ("/v1/classify", "/v1/label-sets/{name}/classes", "/v1/label-sets/{name}/classes/{class_id}"):
        assert f'data-path="{path}"' in swagger, path
    assert "authorize" in swagger.lower()
    # ReDoc: the operations' summaries are rendered as the menu and section headings
    for summary in ("classes of a set, a page at a time", "classify images against a label set"):
        assert summary in redoc, summary

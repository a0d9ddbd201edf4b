"""The red team's aspect-ratio amplifier against the real ``promptdistill serve``.

A 7 KB 16 x 2,400,000 1-bit PNG used to cost +3.7 GB and 12-60 s (the whole strip was resized
before the centre crop). Now the header check refuses it (aspect-ratio cap), and with the cap
lifted the crop-first preprocessing answers it with a result. Either way: a quick 4xx or a 200,
several in parallel, and the server's peak memory stays small. (Speed figures: bench/hostile.py.)
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from PIL import Image

from tests.reliability.conftest import start_server, stop_server

MiB = 1024 * 1024


def _strip() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (16, 2_400_000)).save(buf, "PNG")
    return buf.getvalue()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.slow
@pytest.mark.parametrize("aspect_cap", ["default", "lifted"])
def test_aspect_ratio_amplifier_is_cheap(bundle_copy: Path, tmp_path: Path, aspect_cap: str) -> None:
    env = {"PROMPTDISTILL_MAX_ASPECT_RATIO": "1000000000"} if aspect_cap == "lifted" else {}
    server = start_server(bundle_copy, tmp_path, env)
    try:
        body = {"images": [base64.b64encode(_strip()).decode()], "top_k": 3}
        url = server.url + "/v1/classify"
        with httpx2.Client(timeout=60) as http:
            assert http.post(url, json=body).status_code in (200, 422)  # warm-up: first-call allocations
        before = _peak_rss_mib(server.proc.pid)
        with ThreadPoolExecutor(4) as pool:  # "a few in parallel OOM the server"
            answers = list(pool.map(lambda _: httpx2.post(url, json=body, timeout=60), range(4)))
        growth = _peak_rss_mib(server.proc.pid) - before
        want = 422 if aspect_cap == "default" else 200
        assert [a.status_code for a in answers] == [want] * 4, [a.text[:200] for a in answers]
        if want == 422:
            assert "aspect ratio" in answers[0].json()["detail"]
        else:
            assert len(answers[0].json()["results"][0]["predictions"]) == 3
        # the decoded 1-bit bitmap is ~38 MB per image in flight (2 decode workers); resizing it whole was GBs
        assert growth < 200, f"peak RSS grew by {growth:.0f} MiB"
        assert httpx2.get(server.url + "/readyz", timeout=30).status_code == 200
    finally:
        stop_server(server)

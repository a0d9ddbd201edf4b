"""Opt-in capture of classified images: off by default, sampled, opt-out honoured, re-encoded, named by
content hash, never a failed classify (a broken folder stops capture and says so), and the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from promptdistill.cli import main
from service.capture import MAX_SIDE
from tests.service.conftest import png_bytes
from tests.service.test_classify import metric


def _png(photo: Any, size: tuple[int, int]) -> bytes:
    return png_bytes(photo.resize(size))


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _kept(folder: Path, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return folder / sha[:2] / f"{sha}.jpg"


def test_capture_is_off_unless_configured(live: Any, photos: list[Any], tmp_path: Path) -> None:
    with live() as server, server.client() as http:
        image = base64.b64encode(_png(photos[0], (64, 64))).decode()
        assert http.post("/v1/classify", json={"images": [image]}).status_code == 200
        assert http.get("/readyz").json()["checks"]["capture"] == "off"
        assert metric(http.get("/metrics").text, "promptdistill_capture_active") == 0
    assert not any(tmp_path.rglob("*.jpg"))


def test_captured_images_are_sampled_deduplicated_reencoded_and_opt_out_is_honoured(
    live: Any, photos: list[Any], tmp_path: Path
) -> None:
    folder = tmp_path / "captures"
    big, small, private, later = (
        _png(photos[i], s) for i, s in ((1, (900, 700)), (2, (80, 60)), (3, (90, 90)), (4, (70, 70)))
    )
    with live(capture_dir=folder, capture_rate=1.0) as server, server.client() as http:
        assert http.get("/readyz").json()["checks"]["capture"].startswith("on (0 images")
        body = {"images": [base64.b64encode(b).decode() for b in (big, small, big)]}  # big twice: kept once
        assert http.post("/v1/classify", json=body).status_code == 200
        files = [("files", ("p.png", private, "image/png"))]
        assert http.post("/v1/classify", files=files, data={"capture": "false"}).status_code == 200  # opt out
        files = [("files", ("l.png", later, "image/png"))]
        assert http.post("/v1/classify", files=files).status_code == 200
        _wait_for(_kept(folder, later))  # one writer thread, in order: the opted-out one came before it
        assert not _kept(folder, private).exists(), "an image of a request that opted out was kept"
        assert _kept(folder, big).exists() and _kept(folder, small).exists()
        assert len(list(folder.rglob("*.jpg"))) == 3
        with Image.open(_kept(folder, big)) as im:
            assert im.format == "JPEG" and max(im.size) == MAX_SIDE and im.mode == "RGB"
        bad = http.post("/v1/classify", json={**body, "capture": "no"})
        assert bad.status_code == 422  # strictly a boolean
        text = http.get("/metrics").text
        assert metric(text, "promptdistill_capture_images") == 3 and metric(text, "promptdistill_capture_skipped") == 0


def test_a_broken_capture_folder_never_fails_a_request(live: Any, photos: list[Any], tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    first, second = _png(photos[0], (64, 64)), _png(photos[1], (64, 64))
    folder.mkdir()
    blocker = folder / hashlib.sha256(second).hexdigest()[:2]
    blocker.write_text("not a folder")  # the second image's sub-folder cannot be made: a write error
    with live(capture_dir=folder, capture_rate=1.0) as server, server.client() as http:
        for data in (first, second, second):
            r = http.post("/v1/classify", json={"images": [base64.b64encode(data).decode()]})
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while "stopped" not in (capture := http.get("/readyz").json()["checks"]["capture"]):
            assert time.monotonic() < deadline, capture
            time.sleep(0.01)
        ready = http.get("/readyz")
        assert ready.status_code == 200 and "write failed" in capture
        text = http.get("/metrics").text
        assert (
            metric(text, "promptdistill_capture_active") == 0
            and metric(text, "promptdistill_capture_write_errors") == 1
        )
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with live(capture_dir=not_a_folder, capture_rate=1.0) as server, server.client() as http:
        assert http.post("/v1/classify", json={"images": [base64.b64encode(first).decode()]}).status_code == 200
        assert "stopped: cannot use" in http.get("/readyz").json()["checks"]["capture"]


def test_caps_pause_capture(live: Any, photos: list[Any], tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    images = [_png(photos[i], (64, 64)) for i in range(3)]
    with live(capture_dir=folder, capture_rate=1.0, capture_max_images=1) as server, server.client() as http:
        for data in images:
            assert http.post("/v1/classify", json={"images": [base64.b64encode(data).decode()]}).status_code == 200
        deadline = time.monotonic() + 30
        while "full" not in (capture := http.get("/readyz").json()["checks"]["capture"]):
            assert time.monotonic() < deadline, capture
            time.sleep(0.01)
    assert len(list(folder.rglob("*.jpg"))) == 1


def test_the_captures_cli_lists_exports_and_deletes(tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "captures"
    shas = []
    for colour in ((255, 0, 0), (0, 255, 0)):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, "JPEG")
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        (folder / sha[:2]).mkdir(parents=True, exist_ok=True)
        (folder / sha[:2] / f"{sha}.jpg").write_bytes(buf.getvalue())
        shas.append(sha)
    (folder / "README.txt").write_text("not ours")  # foreign files are left alone
    assert main(["captures", "list", "--dir", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert main(["captures", "export", "--dir", str(folder), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{s}.jpg" for s in shas)
    capsys.readouterr()
    assert main(["captures", "delete", "--dir", str(folder)]) == 2  # nothing said: nothing deleted
    assert main(["captures", "delete", "--dir", str(folder), "--hash", shas[0]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"deleted": 1}
    assert main(["captures", "delete", "--dir", str(folder), "--older-than", "1"]) == 0  # not old: stays
    assert main(["captures", "list", "--dir", str(folder), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["sha256"] for line in lines[-1:]] == [shas[1]] and (folder / "README.txt").exists()

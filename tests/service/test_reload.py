"""Hot swap of the image tower (same embedding space), the model card, and what a reload refuses."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.service.conftest import png_bytes, subprocess_server


def _torch_variant(bundle: Path, dest: Path) -> Path:
    """The same bundle without its ONNX graph: the same space, another image-tower runtime (torch)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for spec in manifest["image_encoder"]["onnx"]:
        for rel in (spec["file"], spec.get("data_file")):
            if rel:
                manifest["files"].pop(rel, None)
                (dest / rel).unlink(missing_ok=True)
    manifest["image_encoder"]["onnx"] = []
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _switch(link: Path, target: Path) -> None:
    """Point the symlink at another bundle the way an operator would: atomically (rename over it)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_a_same_space_bundle_swaps_in_under_load_without_a_failed_request(
    live: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    variant = _torch_variant(tiny_bundle_dir, tmp_path / "torch-variant")
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    image = base64.b64encode(png_bytes(photos[1])).decode()
    with live(bundle=link, api_key="k") as server, server.client(headers={"X-API-Key": "k"}) as http:
        before = http.get("/v1/model").json()
        assert before["loaded"]["backend"] == "onnx" and before["reloads"] == []
        assert before["card"]["method"] == "zeroshot" and before["card"]["space"] == before["loaded"]["space"]
        first = http.post("/v1/classify", json={"images": [image]}).json()
        assert first["model"] == before["loaded"]["version"]
        answers: list[httpx2.Response] = []
        stop = threading.Event()

        def client() -> None:
            with server.client() as own:
                while not stop.is_set():
                    answers.append(own.post("/v1/classify", json={"images": [image]}))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while len(answers) < 8:  # load is on
            time.sleep(0.01)
        _switch(link, variant)
        swapped = http.post("/v1/admin/reload")
        seen = len(answers)
        while len(answers) < seen + 8:  # and stays on after the swap
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(30)
        assert swapped.status_code == 200 and swapped.json()["outcome"] == "swapped", swapped.text
        assert [r.status_code for r in answers if r.status_code != 200] == []  # no request failed
        models = [r.json()["model"] for r in answers]
        after = http.get("/v1/model").json()
        assert after["loaded"]["backend"] == "torch" and after["loaded"]["version"] != before["loaded"]["version"]
        assert set(models) == {before["loaded"]["version"], after["loaded"]["version"]}  # old first, then new
        assert models.index(after["loaded"]["version"]) > 0 and models[-1] == after["loaded"]["version"]
        assert after["reloads"][-1]["outcome"] == "swapped" and after["loaded"]["space"] == before["loaded"]["space"]
        again = http.post("/v1/classify", json={"images": [image]}).json()
        for old, new in zip(first["results"][0]["predictions"], again["results"][0]["predictions"], strict=True):
            assert old["label"] == new["label"] and abs(old["cosine"] - new["cosine"]) < 1e-4  # ONNX vs torch
        assert http.get("/readyz").status_code == 200


def test_a_bad_or_foreign_bundle_is_refused_and_the_old_one_keeps_serving(
    live: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    empty = tmp_path / "not-a-bundle"
    empty.mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle_dir, damaged)
    (damaged / "class_vectors.safetensors").write_bytes(b"garbage")
    foreign = tmp_path / "foreign"  # another text side: another embedding space
    shutil.copytree(tiny_bundle_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["{}"]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    image = base64.b64encode(png_bytes(photos[0])).decode()
    with live(bundle=link, api_key="k") as server, server.client() as http:
        assert http.post("/v1/admin/reload").status_code == 401  # mutating: the key is required
        version = http.get("/v1/model").json()["loaded"]["version"]
        cases = [(empty, 422, "manifest.json is missing"), (damaged, 422, "corrupted"), (foreign, 409, "space")]
        for target, status, words in cases:
            _switch(link, target)
            refused = http.post("/v1/admin/reload", headers={"X-API-Key": "k"})
            assert refused.status_code == status and words in refused.json()["detail"], refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert http.get("/readyz").status_code == 200
            served = http.post("/v1/classify", json={"images": [image]})
            assert served.status_code == 200 and served.json()["model"] == version
        history = http.get("/v1/model").json()["reloads"]
        assert [h["outcome"] for h in history] == ["refused"] * 3


@pytest.mark.slow  # a real process: SIGHUP reaches the server's own signal handler
def test_sighup_reloads_the_configured_bundle(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    variant = _torch_variant(tiny_bundle_dir, tmp_path / "torch-variant")
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    with subprocess_server(link, tmp_path / "state") as server:
        proc, url = server.proc, server.url
        assert proc is not None
        before = httpx2.get(url + "/v1/model", timeout=10).json()["loaded"]
        _switch(link, variant)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while (now := httpx2.get(url + "/v1/model", timeout=10).json())["loaded"]["version"] == before["version"]:
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        assert now["loaded"]["backend"] == "torch" and now["reloads"][-1]["trigger"] == "SIGHUP"
        assert proc.poll() is None and httpx2.get(url + "/readyz", timeout=10).status_code == 200

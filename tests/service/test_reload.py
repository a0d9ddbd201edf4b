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
    partial = tmp_path / "partial"  # a copy cut short: one file listed in the manifest is missing
    shutil.copytree(tiny_bundle_dir, partial)
    (partial / "class_vectors.safetensors").unlink()
    smaller = _other_size(tmp_path)
    image = base64.b64encode(png_bytes(photos[0])).decode()
    with live(bundle=link, api_key="k") as server, server.client() as http:
        assert http.post("/v1/admin/reload").status_code == 401  # mutating: the key is required
        version = http.get("/v1/model").json()["loaded"]["version"]
        classes = server.services.registry.store.load("default")
        cases = [(empty, 422, "manifest.json is missing"), (damaged, 422, "corrupted"), (foreign, 409, "space"),
                 (partial, 422, "class_vectors.safetensors"), (smaller, 422, "size 32")]  # fmt: skip
        for target, status, words in cases:
            _switch(link, target)
            refused = http.post("/v1/admin/reload", headers={"X-API-Key": "k"})
            assert refused.status_code == status and words in refused.json()["detail"], refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert http.get("/readyz").status_code == 200
            served = http.post("/v1/classify", json={"images": [image]})
            assert served.status_code == 200 and served.json()["model"] == version
        history = http.get("/v1/model").json()["reloads"]
        assert [h["outcome"] for h in history] == ["refused"] * len(cases)
        after = server.services.registry.store.load("default")  # the stored classes are untouched
        assert after.version == classes.version and after.names == classes.names


def _other_size(tmp_path: Path) -> Path:
    """A real bundle whose embeddings have 32 dimensions (the served one: 64)."""
    import torch

    from models.zeroshot import build_zeroshot_bundle, named_templates
    from tests.conftest import TINY_CONFIG

    config = json.loads(Path(TINY_CONFIG).read_text())
    config["embed_dim"] = 32
    path = tmp_path / "tiny-32.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    out = tmp_path / "tiny-32"
    build_zeroshot_bundle(str(path), None, ["cat", "dog"], named_templates("simple"), out, progress=False)
    return out


def test_a_reload_while_another_runs_or_while_classes_are_encoded_is_refused(
    live: Any, tiny_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import service.migration
    import service.reload
    from service.store import SqliteStore
    from tests.service.fleet.test_registry_sync import wait_until

    state = tmp_path / "state"
    state.mkdir()
    other = SqliteStore(state, 64, "another-space")  # classes with no vector in the served space
    with other.transaction() as db:
        other.create_set(db, "waiting", ["okapi", "tapir"], np.ones((2, 64), np.float32), "runtime")
    other.close()
    loading, encoding, release = threading.Event(), threading.Event(), threading.Event()
    load, commit = service.reload.load_checked_bundle, service.migration.Migrator._commit

    def slow_load(settings: Any) -> Any:
        loading.set()
        release.wait(60)
        return load(settings)

    def slow_commit(self: Any, *args: Any) -> int:
        encoding.set()
        release.wait(60)
        return commit(self, *args)

    monkeypatch.setattr(service.reload, "load_checked_bundle", slow_load)
    monkeypatch.setattr(service.migration.Migrator, "_commit", slow_commit)
    key = {"X-API-Key": "k"}
    with live(bundle=tiny_bundle_dir, state_dir=state, api_key="k") as server, server.client(headers=key) as http:
        try:
            assert encoding.wait(30)  # the migrator holds a batch of the set's classes
            busy = http.post("/v1/admin/reload")
            assert busy.status_code == 409 and "encoding class vectors" in busy.json()["detail"], busy.text
            assert not loading.is_set()  # refused before anything was read
        finally:
            release.set()
        wait_until(lambda: "vectors" not in http.get("/readyz").json()["checks"], 30)
        release.clear()
        first: dict[str, httpx2.Response] = {}
        with server.client(headers=key) as other_http:
            runner = threading.Thread(target=lambda: first.update(r=other_http.post("/v1/admin/reload")))
            runner.start()
            try:
                assert loading.wait(30)  # the first reload is reading the bundle
                second = http.post("/v1/admin/reload")
                assert second.status_code == 409 and "already running" in second.json()["detail"], second.text
            finally:
                release.set()
                runner.join(30)
        assert first["r"].status_code == 200 and first["r"].json()["outcome"] == "unchanged", first["r"].text
        assert [h["outcome"] for h in http.get("/v1/model").json()["reloads"]] == ["refused", "unchanged"]
        assert server.services.registry.store.load("waiting").names == ["okapi", "tapir"]


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


def _versions_by_worker(url: str, want: set[str], deadline_s: float) -> dict[str, str]:
    """GET /v1/model on fresh connections (the kernel spreads them over the workers) until ``want``
    workers (pids) have answered with the version each serves; the last version seen per pid."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        loaded = httpx2.get(url + "/v1/model", timeout=10).json()["loaded"]
        seen[loaded["worker_pid"]] = loaded["version"]
        if len(seen) >= 2 and set(seen.values()) <= want:
            return seen
    raise AssertionError(f"workers and the versions they serve: {seen}, wanted all in {want}")


@pytest.mark.slow  # a real supervisor with two worker processes
def test_with_two_workers_sighup_and_the_admin_route_swap_every_worker(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    variant = _torch_variant(tiny_bundle_dir, tmp_path / "torch-variant")
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    with subprocess_server(link, tmp_path / "state", "--workers", "2") as server:
        proc, url = server.proc, server.url
        assert proc is not None
        first = _versions_by_worker(url, {httpx2.get(url + "/v1/model").json()["loaded"]["version"]}, 60)
        _switch(link, variant)
        proc.send_signal(signal.SIGHUP)  # to the supervisor: forwarded to each worker
        deadline = time.monotonic() + 90
        while (new := httpx2.get(url + "/v1/model").json()["loaded"])["version"] in first.values():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        after = _versions_by_worker(url, {new["version"]}, 90)
        assert after.keys() == first.keys()  # the same two workers, swapped in place (no restart)
        assert new["backend"] == "torch" and proc.poll() is None
        _switch(link, tiny_bundle_dir)  # back, through the admin route of whichever worker answers
        swapped = httpx2.post(url + "/v1/admin/reload", timeout=60).json()
        assert swapped["outcome"] == "swapped" and "other 1 worker(s) were signalled" in swapped["detail"]
        back = _versions_by_worker(url, {swapped["version"]}, 90)
        assert back.keys() == first.keys() and set(back.values()) == set(first.values())
        assert httpx2.get(url + "/readyz", timeout=10).status_code == 200

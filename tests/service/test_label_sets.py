"""Runtime label sets: immediate effect, increasing versions, deletion, restart from the database."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from safetensors.numpy import load_file

from service import create_app
from service.store import DB_FILE
from tests.service.conftest import assert_same_answer, png_bytes


def _classify(http: Any, image: str, label_set: str = "default", top_k: int = 100) -> dict[str, Any]:
    resp = http.post("/v1/classify", json={"images": [image], "label_set": label_set, "top_k": top_k})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_added_classes_are_classifiable_at_once_and_deleted_ones_vanish(shared_server: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[2])).decode()
    server = shared_server
    with server.client() as http:
        v0 = _classify(http, image)["version"]
        added = http.post("/v1/label-sets/default/classes", json={"names": ["red panda", "okapi"]})
        assert added.status_code == 201, added.text
        v1 = added.json()["version"]
        assert v1 > v0
        ids = {c["name"]: c["id"] for c in added.json()["classes"]}
        out = _classify(http, image)
        assert out["version"] == v1
        labels = {p["label"] for p in out["results"][0]["predictions"]}
        assert {"red panda", "okapi"} <= labels
        # the new class's cosine is the image embedding against its text-side vector
        vec = server.services.text.side.class_vectors(["okapi"]).numpy()[0]  # the reference
        emb = server.services.encoder.encode(_pixels(server, photos[2]))[0]
        okapi = next(p for p in out["results"][0]["predictions"] if p["label"] == "okapi")
        assert abs(okapi["cosine"] - float(emb @ vec)) < 1e-4

        by_id = http.delete(f"/v1/label-sets/default/classes/{ids['okapi']}")
        assert by_id.status_code == 200 and by_id.json()["version"] > v1
        by_name = http.delete("/v1/label-sets/default/classes", params={"name": "red panda"})
        assert by_name.status_code == 200, by_name.text
        v3 = by_name.json()["version"]
        assert v3 > by_id.json()["version"]
        out = _classify(http, image)
        assert out["version"] == v3
        assert not {"red panda", "okapi"} & {p["label"] for p in out["results"][0]["predictions"]}
        listed = http.get("/v1/label-sets/default/classes").json()
        assert listed["version"] == v3 and listed["index_size"] == len(listed["classes"])
        assert http.delete(f"/v1/label-sets/default/classes/{ids['okapi']}").status_code == 404
        assert http.delete("/v1/label-sets/default/classes", params={"name": "nope"}).status_code == 404


def _pixels(server: Any, photo: Any) -> np.ndarray:
    from models.preprocess import preprocess_batch

    return preprocess_batch([photo], server.services.bundle.manifest.image_encoder.preprocess.to_config())


def test_named_sets_duplicates_and_protection(shared_server: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0])).decode()
    with shared_server.client() as http:
        made = http.post("/v1/label-sets", json={"name": "pets", "names": ["cat", "dog", "hamster"]})
        assert made.status_code == 201, made.text
        assert [c["id"] for c in made.json()["classes"]] == [0, 1, 2]
        assert http.post("/v1/label-sets", json={"name": "pets", "names": ["x"]}).status_code == 409
        dup = http.post("/v1/label-sets/pets/classes", json={"names": ["dog"]})
        assert dup.status_code == 409 and "dog" in dup.json()["detail"]
        assert http.post("/v1/label-sets/pets/classes", json={"names": ["emu", "emu"]}).status_code == 409
        assert http.post("/v1/label-sets/nope/classes", json={"names": ["emu"]}).status_code == 404
        out = _classify(http, image, "pets")
        assert out["label_set"] == "pets" and len(out["results"][0]["predictions"]) == 3
        sets = {s["name"]: s for s in http.get("/v1/label-sets").json()["label_sets"]}
        assert sets["pets"]["n_classes"] == 3 and "default" in sets
        templated = http.post(
            "/v1/label-sets/pets/classes", json={"names": ["ferret"], "templates": ["a photo of a {}."]}
        )
        assert templated.status_code == 201, templated.text
        bad_t = http.post("/v1/label-sets/pets/classes", json={"names": ["gecko"], "templates": ["no placeholder"]})
        assert bad_t.status_code == 422 and "{}" in bad_t.json()["detail"]
        assert http.delete("/v1/label-sets/default").status_code == 409
        gone = http.delete("/v1/label-sets/pets")
        assert gone.status_code == 200
        assert http.post("/v1/classify", json={"images": [image], "label_set": "pets"}).status_code == 404
        remade = http.post("/v1/label-sets", json={"name": "pets", "names": ["cat"]})
        assert remade.json()["version"] > gone.json()["version"], "versions must never go back"
        assert http.delete("/v1/label-sets/pets/classes/0").status_code == 200
        empty = http.post("/v1/classify", json={"images": [image], "label_set": "pets"})
        assert empty.status_code == 409 and "no classes" in empty.json()["detail"]


def test_if_exists_skip_makes_adds_and_creates_repeatable(shared_server: Any) -> None:
    url = "/v1/label-sets/default/classes"
    with shared_server.client() as http:
        first = http.post(url, json={"names": ["quokka", "wombat"], "if_exists": "skip"})
        assert first.status_code == 201, first.text
        assert [c["name"] for c in first.json()["classes"]] == ["quokka", "wombat"] and first.json()["skipped"] == []
        again = http.post(url, json={"names": ["quokka", "wombat"], "if_exists": "skip"})
        assert again.status_code == 200, again.text  # nothing added: same version, nothing encoded
        assert again.json()["classes"] == [] and again.json()["skipped"] == ["quokka", "wombat"]
        assert again.json()["version"] == first.json()["version"]
        mixed = http.post(url, json={"names": ["wombat", "numbat"], "if_exists": "skip"})
        assert mixed.status_code == 201 and mixed.json()["version"] > first.json()["version"]
        assert [c["name"] for c in mixed.json()["classes"]] == ["numbat"] and mixed.json()["skipped"] == ["wombat"]
        names = [c["name"] for c in http.get(url).json()["classes"]]
        assert all(names.count(n) == 1 for n in ("quokka", "wombat", "numbat")), names
        assert http.post(url, json={"names": ["wombat"]}).status_code == 409  # the default stays strict
        assert http.post(url, json={"names": ["emu"], "if_exists": "maybe"}).status_code == 422
        for n in ("quokka", "wombat", "numbat"):  # leave the shared server's default set as it was
            assert http.delete(url, params={"name": n}).status_code == 200

        made = http.post("/v1/label-sets", json={"name": "marsupials", "names": ["koala"], "if_exists": "skip"})
        assert made.status_code == 201, made.text
        kept = http.post("/v1/label-sets", json={"name": "marsupials", "names": ["other"], "if_exists": "skip"})
        assert kept.status_code == 200, kept.text  # the existing set is returned untouched
        assert kept.json()["classes"] == made.json()["classes"] and kept.json()["version"] == made.json()["version"]
        assert http.post("/v1/label-sets", json={"name": "marsupials", "names": ["koala"]}).status_code == 409
        assert http.delete("/v1/label-sets/marsupials").status_code == 200


def test_restart_rebuilds_everything_from_the_database(make_settings: Any, photos: list[Any]) -> None:
    settings = make_settings()
    image = base64.b64encode(png_bytes(photos[3])).decode()
    with TestClient(create_app(settings)) as http:
        http.post("/v1/label-sets/default/classes", json={"names": ["koala", "lynx"]})
        http.delete("/v1/label-sets/default/classes", params={"name": "cat"})
        http.post("/v1/label-sets", json={"name": "tools", "names": ["hammer", "saw"]})
        before = {s: _classify(http, image, s) for s in ("default", "tools")}
        listing = http.get("/v1/label-sets").json()
    with TestClient(create_app(settings)) as http:
        assert http.get("/v1/label-sets").json() == listing
        for s, out in before.items():  # same classes, ids, labels and versions; scores to float32 precision
            assert_same_answer(_classify(http, image, s), out, where=s)
    db = sqlite3.connect(settings.state_dir / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in db.execute("SELECT name FROM classes WHERE label_set = 'default'")}
    assert {"koala", "lynx"} <= names and "cat" not in names
    db.close()


def test_a_bundle_of_another_space_keeps_every_class_and_encodes_what_it_lacks(
    make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    """Names are the truth, vectors per space: a bundle whose text side encodes names differently
    (another space) takes its own vectors for the classes it ships, encodes the runtime classes
    through its own text side in the background, and the first bundle still has its vectors after."""
    image = base64.b64encode(png_bytes(photos[2])).decode()
    with TestClient(create_app(make_settings())) as a:
        assert a.post("/v1/label-sets/default/classes", json={"names": ["okapi"]}).status_code == 201
        assert a.post("/v1/label-sets", json={"name": "zoo", "names": ["zebra", "lion"]}).status_code == 201
        before = a.get("/v1/label-sets").json()["label_sets"]
        first = _classify(a, image)
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["{}"]  # encodes names differently: another vector space
    (other / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(make_settings(bundle=other))) as b:
        deadline = time.monotonic() + 60
        while (ready := b.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert b.get("/v1/label-sets").json()["label_sets"] == before  # same sets, versions, counts
        services = b.app.state.services  # type: ignore[attr-defined]
        snap = services.registry.get("default")
        reference = services.text.side.class_vectors(["okapi"]).numpy()[0]  # the new space's text side
        assert np.abs(snap.vectors[snap.names.index("okapi")] - reference).max() < 1e-5
        shipped = load_file(str(other / "class_vectors.safetensors"))["default"]  # the bundle's own, not re-encoded
        for k, cls in enumerate(json.loads((other / "manifest.json").read_text())["label_sets"][0]["classes"]):
            assert np.abs(snap.vectors[snap.names.index(cls["name"])] - shipped[k]).max() < 1e-5
        zoo = services.registry.get("zoo")
        assert sorted(zoo.names) == ["lion", "zebra"]
        spaces = services.registry.store.spaces()
        assert len(spaces) == 2 and set(spaces.values()) == {before[0]["n_classes"] + 2}, spaces
    with TestClient(create_app(make_settings())) as a:  # back to the first bundle: its vectors are there
        assert a.get("/readyz").status_code == 200
        again = _classify(a, image)
        assert again["results"][0]["label"] == first["results"][0]["label"]
        assert (
            abs(again["results"][0]["predictions"][0]["cosine"] - first["results"][0]["predictions"][0]["cosine"])
            < 1e-5
        )


def test_two_workers_on_one_database_see_each_others_changes(make_settings: Any, photos: list[Any]) -> None:
    """Like ``serve --workers 2``: each process rebuilds its snapshot when the stored version moved."""
    image = base64.b64encode(png_bytes(photos[4])).decode()
    settings = make_settings()
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        before = _classify(b, image)["version"]
        added = a.post("/v1/label-sets/default/classes", json={"names": ["narwhal"]}).json()
        out = _classify(b, image)
        assert out["version"] == added["version"] > before
        assert "narwhal" in {p["label"] for p in out["results"][0]["predictions"]}
        b.delete("/v1/label-sets/default/classes", params={"name": "narwhal"})
        out = _classify(a, image)
        assert "narwhal" not in {p["label"] for p in out["results"][0]["predictions"]}
        a.post("/v1/label-sets", json={"name": "sea", "names": ["orca"]})
        assert _classify(b, image, "sea")["results"][0]["label"] == "orca"
        a.delete("/v1/label-sets/sea")
        assert b.post("/v1/classify", json={"images": [image], "label_set": "sea"}).status_code == 404
        assert a.get("/readyz").status_code == 200 and b.get("/readyz").status_code == 200

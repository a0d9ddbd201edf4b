"""Classes from example images over HTTP (JSON, multipart, more examples later), against the real app:
vectors match the prototype math on the engine's own embeddings, examples are kept bounded, and every
bad input is a problem-details 4xx that stores nothing."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.prototypes import Gap, centroid, class_vector, combine, image_prototype
from promptdistill.cli import main
from service.client import Client, ServiceClientError
from service.examples import ExampleLimits, near_duplicate_cosine
from service.images import EncodedImage
from tests.service.conftest import jpeg_bytes, png_bytes


def variants(photos: list[Any], n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct PNG examples: crops of the sample photos."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = p.size
        x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        out.append(png_bytes(p.crop((x, y, x + w // 2, y + h // 2)).resize((96, 80))))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed(server: Any, images: list[bytes]) -> np.ndarray:
    enc = server.services.encoder
    pixels = np.stack([enc.preprocess(EncodedImage(b)) for b in images])  # [K, 3, H, W]
    return np.asarray(enc.encode(pixels), dtype=np.float64)  # [K, D]


def vector_of(server: Any, label_set: str, class_id: int) -> np.ndarray:
    snap = server.services.registry.get(label_set)
    return np.asarray(snap.vectors[list(snap.ids).index(class_id)], dtype=np.float64)


def no_gap(server: Any) -> Gap:
    return Gap.between(server.services.bundle.class_vectors["default"].float().numpy(), None)


def state(server: Any, label_set: str) -> tuple[int, list[str], dict[int, int]]:
    store = server.services.registry.store
    rows = store.load(label_set)
    return rows.version, rows.names, store.example_counts(label_set)


def test_named_example_only_and_both_in_one_request(shared_server: Any, photos: list[Any]) -> None:
    server = shared_server
    imgs = variants(photos, 5)
    with server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "ex1", "names": ["cat", "dog"]}).status_code == 201
        body = {"names": ["okapi", "astronaut"], "examples": {"part 7-B": [b64(imgs[0]), b64(imgs[1])],
                                                              "astronaut": [b64(imgs[2])]}}  # fmt: skip
        resp = http.post("/v1/label-sets/ex1/classes", json=body)
        assert resp.status_code == 201, resp.text
        out = resp.json()
    by_name = {c["name"]: c for c in out["classes"]}
    assert out["gap"] == "none"  # the tiny bundle carries no in-domain image sample
    assert by_name["okapi"]["provenance"] == "runtime" and by_name["okapi"]["examples"] == 0
    assert by_name["part 7-B"]["provenance"] == "examples" and by_name["part 7-B"]["examples"] == 2
    assert by_name["astronaut"]["provenance"] == "runtime+examples" and by_name["astronaut"]["examples"] == 1
    gap = no_gap(server)
    example_only = image_prototype(embed(server, imgs[:2]), gap)
    np.testing.assert_allclose(vector_of(server, "ex1", by_name["part 7-B"]["id"]), example_only, atol=1e-5)
    text = server.services.text.side.class_vectors(["astronaut"]).numpy()[0]
    both = combine(text, image_prototype(embed(server, imgs[2:3]), gap))
    np.testing.assert_allclose(vector_of(server, "ex1", by_name["astronaut"]["id"]), both, atol=1e-5)
    np.testing.assert_allclose(
        vector_of(server, "ex1", by_name["okapi"]["id"]),
        server.services.text.side.class_vectors(["okapi"]).numpy()[0],
        atol=1e-5,
    )
    # kept: bounded re-encodings, in request order, tied to the class
    kept = server.services.registry.store.examples("ex1", by_name["part 7-B"]["id"])
    assert [k.media_type for k in kept] == ["image/png", "image/png"]
    assert Image.open(io.BytesIO(kept[0].data)).size == (96, 80)
    np.testing.assert_allclose(kept[1].embedding, embed(server, imgs[1:2])[0], atol=1e-5)
    # an example image is classified as its class
    with server.client() as http:
        answer = http.post("/v1/classify", json={"images": [b64(imgs[0])], "label_set": "ex1", "top_k": 5}).json()
    assert answer["results"][0]["label"] == "part 7-B"
    big = jpeg_bytes(photos[2].resize((1200, 900)))  # kept at the long-side cap, whatever the model's input size
    with server.client() as http:
        resp = http.post("/v1/label-sets/ex1/classes", json={"examples": {"large": [b64(big)]}})
    assert resp.status_code == 201, resp.text
    (large,) = server.services.registry.store.examples("ex1", resp.json()["classes"][0]["id"])
    assert Image.open(io.BytesIO(large.data)).size == (512, 384) and len(large.data) <= 256 * 1024


def test_with_an_image_sample_the_prototype_crosses_the_gap(live: Any, photos: list[Any]) -> None:
    imgs = variants(photos, 3, seed=1)
    with live() as server:
        sample = torch.nn.functional.normalize(torch.as_tensor(embed(server, variants(photos, 12, seed=2))), dim=-1)
        server.services.bundle.calibration = sample.to(torch.float16)  # as a bundle with a calibration sample
        with server.client() as http:
            resp = http.post("/v1/label-sets/default/classes", json={"examples": {"gizmo": [b64(b) for b in imgs]}})
        assert resp.status_code == 201, resp.text
        assert resp.json()["gap"] == "standardised"
        shipped = server.services.bundle.class_vectors["default"].float().numpy()
        gap = Gap.between(shipped, sample.to(torch.float16).float().numpy())
        assert gap.mode == "standardised" and np.linalg.norm(gap.shift) > 0.01
        want = class_vector(None, embed(server, imgs), gap)
        got = vector_of(server, "default", resp.json()["classes"][0]["id"])
        np.testing.assert_allclose(got, want, atol=1e-5)
        plain = image_prototype(embed(server, imgs), Gap.between(shipped, None))
        assert float(got @ plain) < 0.9999  # the shift is really applied
        np.testing.assert_allclose(centroid(shipped) - centroid(sample.float().numpy()), gap.shift, atol=1e-2)
        # near-duplicates: the same example re-encoded (JPEG) or resized is refused, by embedding
        near = near_duplicate_cosine(sample.to(torch.float16).float().numpy())
        assert near is not None
        gizmo = resp.json()["classes"][0]["id"]
        again = [
            jpeg_bytes(Image.open(io.BytesIO(imgs[0]))),
            png_bytes(Image.open(io.BytesIO(imgs[1])).resize((120, 100))),
        ]
        assert all(float(e @ embed(server, imgs[:1])[0]) >= near for e in embed(server, again[:1]))  # the premise
        before = state(server, "default")
        with server.client() as http:
            resp = http.post(
                "/v1/label-sets/default/classes", json={"examples": {"twin": [b64(imgs[0]), b64(again[0])]}}
            )
            assert resp.status_code == 409 and resp.json()["code"] == "duplicate_example", resp.text
            assert "near-duplicate of example 0" in resp.json()["detail"]
            resp = http.post(f"/v1/label-sets/default/classes/{gizmo}/examples", json={"examples": [b64(again[1])]})
            assert resp.status_code == 409 and "already stored" in resp.json()["detail"], resp.text
            assert state(server, "default") == before
            other = variants(photos, 6, seed=21)
            cos = embed(server, other) @ embed(server, imgs).T  # [6, 3]
            distinct = other[int(cos.max(1).argmin())]
            assert float(cos.max(1).min()) < near  # the premise: a different picture
            resp = http.post(f"/v1/label-sets/default/classes/{gizmo}/examples", json={"examples": [b64(distinct)]})
            assert resp.status_code == 201, resp.text


def test_multipart_and_more_examples_later(shared_server: Any, photos: list[Any]) -> None:
    server = shared_server
    imgs = variants(photos, 6, seed=3)
    with server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "ex2", "names": ["cat"]}).status_code == 201
        files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs[:2])]
        resp = http.post("/v1/label-sets/ex2/classes", data={"name": "widget"}, files=files)
        assert resp.status_code == 201, resp.text
        widget = resp.json()["classes"][0]
        assert (widget["name"], widget["provenance"], widget["examples"]) == ("widget", "examples", 2)
        files = [("files", ("c.jpg", jpeg_bytes(photos[3]), "image/jpeg"))]
        resp = http.post("/v1/label-sets/ex2/classes", data={"name": "kitten", "names": "kitten"}, files=files)
        assert resp.status_code == 201 and resp.json()["classes"][0]["provenance"] == "runtime+examples"
        # more examples for the example-only class: a new id, same name, all examples in its vector
        more = http.post(f"/v1/label-sets/ex2/classes/{widget['id']}/examples", json={"examples": [b64(imgs[2])]})
        assert more.status_code == 201, more.text
        moved = more.json()["classes"][0]
        assert moved["name"] == "widget" and moved["replaces"] == widget["id"] and moved["id"] != widget["id"]
        assert moved["examples"] == 3 and moved["provenance"] == "examples"
        want = image_prototype(embed(server, imgs[:3]), no_gap(server))
        np.testing.assert_allclose(vector_of(server, "ex2", moved["id"]), want, atol=1e-5)
        gone = http.post(f"/v1/label-sets/ex2/classes/{widget['id']}/examples", json={"examples": [b64(imgs[3])]})
        assert gone.status_code == 404
        # examples for a class made from its name: text vector and prototype combined, by multipart
        cat = http.get("/v1/label-sets/ex2/classes").json()["classes"][0]
        files = [("files", ("a.png", imgs[4], "image/png"))]
        resp = http.post(f"/v1/label-sets/ex2/classes/{cat['id']}/examples", files=files)
        assert resp.status_code == 201, resp.text
        cat2 = resp.json()["classes"][0]
        assert cat2["provenance"] == "runtime+examples" and cat2["examples"] == 1
        text = server.services.text.side.class_vectors(["cat"]).numpy()[0]
        want = combine(text, image_prototype(embed(server, imgs[4:5]), no_gap(server)))
        np.testing.assert_allclose(vector_of(server, "ex2", cat2["id"]), want, atol=1e-5)
        again = http.post(f"/v1/label-sets/ex2/classes/{cat2['id']}/examples", files=files)
        assert again.status_code == 409 and again.json()["code"] == "duplicate_example"
        listed = {c["name"]: c["provenance"] for c in http.get("/v1/label-sets/ex2/classes").json()["classes"]}
    assert listed == {"cat": "runtime+examples", "widget": "examples", "kitten": "runtime+examples"}


def _tiny_png() -> bytes:
    return png_bytes(Image.new("RGB", (4, 4), "red"))


BAD = [
    ("not an image", {"examples": {"x": [b64(b"hello, not an image")]}}, 422, "bad_image"),
    ("a URL", {"examples": {"x": ["https://example.com/a.png"]}}, 422, "invalid_input"),
    ("too small", {"examples": {"x": [b64(b"")]}}, 422, "bad_image"),
    ("no examples", {"examples": {"x": []}}, 422, "invalid_input"),
    ("nothing", {"names": [], "examples": {}}, 422, "invalid_input"),
    ("bad base64", {"examples": {"x": ["%%%"]}}, 422, "invalid_input"),
    ("name clash", {"examples": {"x": [], " x": []}}, 409, "duplicate_class"),
    ("existing", {"examples": {"cat": ["AAAA"]}}, 409, "duplicate_class"),
]


@pytest.mark.parametrize(("what", "body", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_example_requests_are_refused_and_store_nothing(
    shared_server: Any, photos: list[Any], what: str, body: dict[str, Any], status: int, code: str
) -> None:
    server = shared_server
    with server.client() as http:
        http.post("/v1/label-sets", json={"name": "ex3", "names": ["cat"], "if_exists": "skip"})
        good = b64(variants(photos, 1, seed=9)[0])
        body = {**body, "examples": {**body["examples"], "fine": [good]}} if what not in ("nothing",) else body
        before = state(server, "ex3")
        resp = http.post("/v1/label-sets/ex3/classes", json=body)
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["code"] == code
    assert state(server, "ex3") == before  # nothing half-added: not even the good class


def test_limits_duplicates_and_sizes_are_refused_and_store_nothing(live: Any, photos: list[Any]) -> None:
    with live(max_image_bytes=200_000, max_images_per_request=4) as server, server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "ex4", "names": ["cat"]}).status_code == 201
        before = state(server, "ex4")
        one = variants(photos, 1)[0]
        dup = http.post("/v1/label-sets/ex4/classes", json={"examples": {"a": [b64(one), b64(one)]}})
        assert dup.status_code == 409 and dup.json()["code"] == "duplicate_example"
        many = [b64(b) for b in variants(photos, 65)]
        assert http.post("/v1/label-sets/ex4/classes", json={"examples": {"a": many}}).status_code == 422
        big = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)))
        assert len(big) > 200_000
        resp = http.post("/v1/label-sets/ex4/classes", json={"examples": {"a": [b64(one), b64(big)]}})
        assert resp.status_code == 413 and "examples['a'][1]" in resp.json()["detail"]
        files = [("files", ("x.txt", b"plain text", "text/plain"))]
        resp = http.post("/v1/label-sets/ex4/classes", data={"name": "a"}, files=files)
        assert resp.status_code == 422 and resp.json()["code"] == "bad_image"
        files = [("files", ("a.png", one, "image/png"))]
        assert http.post("/v1/label-sets/ex4/classes", files=files).status_code == 422  # files without a name
        assert http.post("/v1/label-sets/nope/classes", json={"examples": {"a": [b64(one)]}}).status_code == 404
        assert http.post("/v1/label-sets/ex4/classes/99/examples", json={"examples": [b64(one)]}).status_code == 404
        assert http.post("/v1/label-sets/ex4/classes/0/examples", json={"examples": []}).status_code == 422
        assert state(server, "ex4") == before
        # more than one engine call's worth (max_images_per_request=4) is fine: embedded in chunks
        six = [b64(b) for b in variants(photos, 6, seed=5)]
        resp = http.post("/v1/label-sets/ex4/classes", json={"examples": {"a": six}})
        assert resp.status_code == 201 and resp.json()["classes"][0]["examples"] == 6


def test_client_and_cli_add_examples(live: Any, tmp_path: Path, photos: list[Any], capsys: Any) -> None:
    imgs = variants(photos, 4, seed=7)
    for cls, chunk in (("gadget", imgs[:2]), ("gear", imgs[2:3])):
        (tmp_path / "ex" / cls).mkdir(parents=True)
        for i, data in enumerate(chunk):
            (tmp_path / "ex" / cls / f"{i}.png").write_bytes(data)
    (tmp_path / "ex" / "gadget" / "notes.txt").write_text("not an example")
    with live() as server:
        assert main(["classes", "add", "gear", "--examples", str(tmp_path / "ex"), "--url", server.url]) == 0
        out = json.loads(capsys.readouterr().out)
        got = {c["name"]: (c["provenance"], c["examples"]) for c in out["classes"]}
        assert got == {"gadget": ("examples", 2), "gear": ("runtime+examples", 1)}
        assert main(["classes", "add", "--url", server.url]) == 2  # neither names nor examples
        with Client(server.url) as client:
            gadget = next(c for c in out["classes"] if c["name"] == "gadget")
            more = client.add_examples(gadget["id"], [imgs[3]])
            assert more["classes"][0]["examples"] == 3
            with pytest.raises(ServiceClientError) as err:
                client.add_examples(more["classes"][0]["id"], [tmp_path / "ex" / "gadget" / "0.png"])
            assert err.value.status == 409
            made = client.add_classes([], examples={"thing": [imgs[0]]}, label_set="default", if_exists="skip")
            assert made["classes"][0]["provenance"] == "examples"


def test_creating_a_set_takes_names_only(shared_server: Any, photos: list[Any]) -> None:
    image = b64(variants(photos, 1)[0])
    with shared_server.client() as http:
        resp = http.post("/v1/label-sets", json={"name": "ex5", "names": ["a"], "examples": {"b": [image]}})
        assert resp.status_code == 422 and "examples" in resp.json()["detail"]
        assert http.get("/v1/label-sets/ex5/classes").status_code == 404


def test_examples_embedded_by_another_model_are_embedded_again(shared_server: Any, photos: list[Any]) -> None:
    server = shared_server
    imgs = variants(photos, 3, seed=11)
    store = server.services.registry.store
    with server.client() as http:
        http.post("/v1/label-sets", json={"name": "ex6", "names": ["cat"]})
        made = http.post("/v1/label-sets/ex6/classes", json={"examples": {"w": [b64(imgs[0]), b64(imgs[1])]}})
        cid = made.json()["classes"][0]["id"]
        with store.transaction() as db:  # as if another model (space) had embedded the kept examples
            db.execute("UPDATE examples SET space = 'another model', embedding = ? WHERE label_set = 'ex6'",
                       (np.zeros(store.embed_dim, np.float32).tobytes(),))  # fmt: skip
        more = http.post(f"/v1/label-sets/ex6/classes/{cid}/examples", json={"examples": [b64(imgs[2])]})
        assert more.status_code == 201, more.text
    want = image_prototype(embed(server, imgs), no_gap(server))  # the kept PNGs are the uploads' pixels
    new_id = more.json()["classes"][0]["id"]
    np.testing.assert_allclose(vector_of(server, "ex6", new_id), want, atol=1e-5)
    rows = store.examples("ex6", new_id)  # the two embedded again were written back in this space
    assert [e.space for e in rows] == [store.space] * 3
    np.testing.assert_allclose(np.stack([e.embedding for e in rows]), embed(server, imgs), atol=1e-5)


def test_example_classes_get_the_quality_check(shared_server: Any, photos: list[Any]) -> None:
    server = shared_server
    imgs = [b64(b) for b in variants(photos, 2, seed=13)]
    with server.client() as http:
        http.post("/v1/label-sets", json={"name": "ex7", "names": ["cat"]})
        assert http.post("/v1/label-sets/ex7/classes", json={"examples": {"a": imgs}}).status_code == 201
        before = state(server, "ex7")
        same = {"examples": {"b": imgs}, "if_similar": "error"}  # the same examples under another name
        refused = http.post("/v1/label-sets/ex7/classes", json=same)
        assert refused.status_code == 409, refused.text
        assert state(server, "ex7") == before
        warned = http.post("/v1/label-sets/ex7/classes", json={"examples": {"b": imgs}})
        assert warned.status_code == 201, warned.text
    (check,) = warned.json()["quality"]
    assert check["name"] == "b" and check["flagged"] and check["nearest"][0]["name"] == "a"


def test_a_new_space_rebuilds_example_classes_from_their_kept_examples(
    live: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    """A bundle of another space re-embeds the kept examples with its own image tower (never the name
    of an example-only class), and mixes in the name's vector of its own text side where there is one."""
    imgs = variants(photos, 3)
    other = tmp_path / "other-space"
    shutil.copytree(tiny_bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["a {}."]  # another text side: another space
    (other / "manifest.json").write_text(json.dumps(manifest))
    state = tmp_path / "state"
    with live(state_dir=state) as server, server.client() as http:
        body = {"examples": {"part 7-B": [b64(imgs[0]), b64(imgs[1])], "comet": [b64(imgs[2])]},
                "names": ["comet"]}  # fmt: skip
        assert http.post("/v1/label-sets/default/classes", json=body).status_code == 201
    with live(state_dir=state, bundle=other) as server, server.client() as http:
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, http.get("/readyz").text
            time.sleep(0.05)
        snap = server.services.registry.get("default")
        ids = dict(zip(snap.names, (int(i) for i in snap.ids), strict=True))
        store, gap = server.services.registry.store, no_gap(server)
        kept = {n: embed(server, [e.data for e in store.examples("default", ids[n])]) for n in ("part 7-B", "comet")}
        text = server.services.text.side.class_vectors(["comet", "part 7-B"]).numpy()
        got = vector_of(server, "default", ids["part 7-B"])
        np.testing.assert_allclose(got, image_prototype(kept["part 7-B"], gap), atol=1e-5)
        assert float(got @ text[1]) < 0.999  # not the name's vector
        want = class_vector(text[0], kept["comet"], gap, ExampleLimits().text_weight)
        np.testing.assert_allclose(vector_of(server, "default", ids["comet"]), want, atol=1e-5)
        for n in ("part 7-B", "comet"):  # the re-embedded examples were written back in the new space
            rows = store.examples("default", ids[n])
            assert {e.space for e in rows} == {store.space}
            np.testing.assert_allclose(np.stack([e.embedding for e in rows]), kept[n], atol=1e-5)

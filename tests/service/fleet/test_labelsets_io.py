"""Backup and move: a label-set export imported into an empty database gives the same sets, ids,
versions, provenance, vectors, kept example images and name vectors (SQLite and PostgreSQL); bad
files are refused whole; a restore served by a bundle of another space re-encodes the names and
re-embeds the example classes from their kept images."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from promptdistill.cli import main
from service.labelsets_io import ImportError_, export_lines, import_lines
from service.store import SqliteStore, Store
from service.stores.base import ExampleRow
from tests.service.fleet.conftest import EMBED_DIM
from tests.service.fleet.test_stores import vecs


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4 + i, 3), (i * 40 % 256, 7, 9)).save(buf, "PNG")
    return buf.getvalue()


def _example(i: int) -> ExampleRow:
    return ExampleRow(f"{i:064x}", "image/png", _png(i), vecs(1, 100 + i)[0])


def _fill(store: Store) -> None:
    with store.transaction() as db:
        store.create_set(db, "animals", ["cat", "dog", "emu"], vecs(3), "runtime")
        store.create_set(db, "tools", ["saw"], vecs(1, seed=1), ["bundle"], index_kind="ivf")
    with store.transaction() as db:
        store.lock_version(db, "animals")
        store.remove_class(db, "animals", None, "dog")  # a gap in the ids
    with store.transaction() as db:  # an example-only class, and one of a name and examples (its text vector)
        store.lock_version(db, "animals")
        store.add_classes(
            db, "animals", ["k\u00e4fer", "gnu"], vecs(2, seed=2), ["examples", "runtime+examples"],
            text_vectors=[None, vecs(1, seed=3)[0]], examples=[[_example(1), _example(2)], [_example(3)]],
        )  # fmt: skip


def _same_examples(a: Store, b: Store, name: str) -> None:
    for class_id in a.load(name).ids.tolist():
        got, want = b.examples(name, class_id), a.examples(name, class_id)
        assert [(e.digest, e.media_type, e.data) for e in got] == [(e.digest, e.media_type, e.data) for e in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.embedding, w.embedding)
        with a.read() as da, b.read() as db:
            ta, tb = a.class_row(da, name, class_id).text_vector, b.class_row(db, name, class_id).text_vector
        assert (ta is None and tb is None) or (ta is not None and tb is not None and np.array_equal(ta, tb))


def _other_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if backend == "sqlite":
        (tmp_path / "other").mkdir()
        return SqliteStore(tmp_path / "other", EMBED_DIM, "test")
    from service.stores.postgres import PostgresStore

    postgres = request.getfixturevalue("postgres")
    postgres.sql("CREATE DATABASE io_target")
    return PostgresStore(postgres.url.rsplit("/", 1)[0] + "/io_target", EMBED_DIM, "test")


def test_export_then_import_gives_identical_sets_ids_versions_and_vectors(
    backend: str,
    make_store: Callable[..., Store],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.labelsets_io.EXAMPLE_PAGE", 2)  # examples read over several pages
    source = make_store()
    _fill(source)
    lines = list(export_lines(source, vectors=True))
    target = _other_database(backend, request, tmp_path)
    try:
        assert import_lines(target, lines) == {"sets": 2, "classes": 5, "vectors": 5, "examples": 3}
        assert target.versions() == source.versions()
        for name in ("animals", "tools"):
            a, b = source.load(name), target.load(name)
            assert list(a.ids) == list(b.ids) and a.names == b.names and a.provenance == b.provenance
            assert a.index_kind == b.index_kind and np.array_equal(a.vectors, b.vectors)
            assert target.example_counts(name) == source.example_counts(name)
            _same_examples(source, target, name)
        assert target.example_counts("animals") == {3: 2, 4: 1}
        again = list(export_lines(target, vectors=True))
        assert again[1:] == lines[1:]  # every set and class line, byte for byte
        with target.transaction() as db:  # writes go on after the imported versions and ids
            version, ids = target.add_classes(db, "animals", ["owl"], vecs(1, seed=4), "runtime")
        assert version > max(source.versions().values()) and ids == [5]
        with pytest.raises(ImportError_, match="already exist"):  # a second import: sets exist, nothing written
            import_lines(target, lines)
        assert target.load("animals").names == ["cat", "emu", "k\u00e4fer", "gnu", "owl"]
    finally:
        target.close()


def test_bad_files_are_refused_whole_with_the_line_named(make_store: Callable[..., Store], tmp_path: Path) -> None:
    source = make_store()
    _fill(source)
    lines = list(export_lines(source, vectors=True))
    cls = json.loads(lines[3])
    ex = json.loads(lines[-1])
    assert ex["kind"] == "example" and cls["kind"] == "class"
    head = lines[:-1]
    cases = {
        "not JSON": [lines[0], "{oops"],
        "appears twice": [*lines[:2], lines[1]],
        "twice": [*lines, lines[-1]],
        "Extra inputs": [lines[0], json.dumps({**json.loads(lines[1]), "colour": "red"})],
        "header": lines[1:],
        "no earlier line": [lines[0], *lines[3:]],
        "base64": [*lines[:3], json.dumps({**cls, "vectors": {"test": "!!"}})],
        "next_id": [*lines[:3], json.dumps({**cls, "id": 999})],
        "kind": [lines[0], json.dumps({"kind": "table"})],
        "image twice": [*lines, json.dumps({**ex, "seq": 7})],
        "which no earlier line defines": [*head, json.dumps({**ex, "class_id": 1})],
        "not a image/png": [*head, json.dumps({**ex, "data": "aGVsbG8gd29ybGQ="})],
        "media_type": [*head, json.dumps({**ex, "media_type": "image/gif"})],
        "digest": [*head, json.dumps({**ex, "digest": "xyz"})],
        "the example image is not base64": [*head, json.dumps({**ex, "data": "!!!!"})],
        "bytes, others": [*head, json.dumps({**ex, "embedding": "AAAAAA=="})],
    }
    (tmp_path / "target").mkdir()
    target = SqliteStore(tmp_path / "target", EMBED_DIM, "test")
    try:
        for words, bad in cases.items():
            with pytest.raises(ImportError_, match=words):
                import_lines(target, bad)
            assert target.versions() == {} and target.spaces() == {}, words  # nothing half-imported
    finally:
        target.close()


def test_the_cli_exports_imports_and_lists_spaces(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "a").mkdir()
    source = SqliteStore(tmp_path / "a", EMBED_DIM, "space-a")
    _fill(source)
    source.close()
    out = tmp_path / "sets.jsonl"
    assert main(["labelsets", "export", "--state-dir", str(tmp_path / "a"), "--vectors", "-o", str(out)]) == 0
    assert main(["labelsets", "import", str(out), "--state-dir", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out) == {"sets": 2, "classes": 5, "vectors": 5, "examples": 3}
    assert main(["labelsets", "spaces", "--state-dir", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out) == {"space-a": 5}
    assert main(["labelsets", "import", str(out), "--state-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptdistill labelsets: error: ") and len(err.strip().splitlines()) == 1, err
    assert main(["labelsets", "export", "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["labelsets", "spaces", "--state-dir", str(tmp_path / "b"), "--remove", "space-a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": "space-a", "vectors": 5}


@pytest.mark.slow  # two in-process servers of two spaces
def test_a_restore_served_by_another_space_re_encodes_names_and_re_embeds_examples(
    live: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    from tests.service.fleet.test_registry_sync import wait_until
    from tests.service.fleet.test_spaces import _other_space
    from tests.service.test_examples import b64, variants

    imgs = variants(photos, 3)
    body = {"names": ["okapi", "astronaut"], "examples": {"part 7-B": [b64(imgs[0]), b64(imgs[1])],
                                                          "astronaut": [b64(imgs[2])]}}  # fmt: skip
    with live(state_dir=tmp_path / "a") as a, a.client() as http:
        assert http.post("/v1/label-sets", json={"name": "kept", "names": ["cat"]}).status_code == 201
        assert http.post("/v1/label-sets/kept/classes", json=body).status_code == 201
        source = a.services.registry.store
        before, counts = source.load("kept"), source.example_counts("kept")
    backup = tmp_path / "backup.jsonl"  # names, provenance and kept images; no vectors
    assert main(["labelsets", "export", "--state-dir", str(tmp_path / "a"), "-o", str(backup)]) == 0
    assert main(["labelsets", "import", str(backup), "--state-dir", str(tmp_path / "b")]) == 0
    assert SqliteStore(tmp_path / "b", EMBED_DIM, "none").spaces() == {}  # nothing to serve until re-encoded
    other = _other_space(tiny_bundle_dir, tmp_path / "v2")
    with live(state_dir=tmp_path / "b", bundle=other) as b, b.client() as http:
        wait_until(lambda: http.get("/readyz").status_code == 200, 90)
        store, side = b.services.registry.store, b.services.text.side
        after = store.load("kept")
        assert after.ids.tolist() == before.ids.tolist() and after.names == before.names
        assert after.provenance == before.provenance and after.version == before.version and not after.missing
        assert store.example_counts("kept") == counts
        by_name = dict(zip(after.names, after.vectors, strict=True))
        for name in ("cat", "okapi"):  # names: through the new space's text side
            np.testing.assert_allclose(by_name[name], side.class_vectors([name]).numpy()[0], atol=1e-5)
        # example-only: re-embedded from the kept images by the same image tower (no gap): as before
        old = dict(zip(before.names, before.vectors, strict=True))
        np.testing.assert_allclose(by_name["part 7-B"], old["part 7-B"], atol=1e-4)
        both = after.ids[after.names.index("astronaut")]
        with store.read() as db:  # a name and examples: its name's vector in the new space is kept too
            text = store.class_row(db, "kept", int(both)).text_vector
        assert text is not None
        np.testing.assert_allclose(text, side.class_vectors(["astronaut"]).numpy()[0], atol=1e-5)
        assert not np.allclose(by_name["astronaut"], old["astronaut"], atol=1e-3)  # the new space's text part
        classified = http.post("/v1/classify", json={"images": [b64(imgs[0])], "label_set": "kept", "top_k": 4})
        assert classified.status_code == 200 and len(classified.json()["results"][0]["predictions"]) == 4

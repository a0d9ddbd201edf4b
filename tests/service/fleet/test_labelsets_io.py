"""Backup and move: a label-set export imported into an empty database gives the same sets, ids,
versions, provenance and vectors (SQLite and PostgreSQL); bad files are refused whole."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from promptdistill.cli import main
from service.labelsets_io import ImportError_, export_lines, import_lines
from service.store import SqliteStore, Store
from tests.service.fleet.conftest import EMBED_DIM
from tests.service.fleet.test_stores import vecs


def _fill(store: Store) -> None:
    with store.transaction() as db:
        store.create_set(db, "animals", ["cat", "dog", "emu"], vecs(3), "runtime")
        store.create_set(db, "tools", ["saw"], vecs(1, seed=1), ["bundle"], index_kind="ivf")
    with store.transaction() as db:
        store.lock_version(db, "animals")
        store.remove_class(db, "animals", None, "dog")  # a gap in the ids
    with store.transaction() as db:
        store.lock_version(db, "animals")
        store.add_classes(db, "animals", ["k\u00e4fer"], vecs(1, seed=2), "examples")


def _other_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if backend == "sqlite":
        (tmp_path / "other").mkdir()
        return SqliteStore(tmp_path / "other", EMBED_DIM, "test")
    from service.stores.postgres import PostgresStore

    postgres = request.getfixturevalue("postgres")
    postgres.sql("CREATE DATABASE io_target")
    return PostgresStore(postgres.url.rsplit("/", 1)[0] + "/io_target", EMBED_DIM, "test")


def test_export_then_import_gives_identical_sets_ids_versions_and_vectors(
    backend: str, make_store: Callable[..., Store], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = make_store()
    _fill(source)
    lines = list(export_lines(source, vectors=True))
    target = _other_database(backend, request, tmp_path)
    try:
        assert import_lines(target, lines) == {"sets": 2, "classes": 4, "vectors": 4}
        assert target.versions() == source.versions()
        for name in ("animals", "tools"):
            a, b = source.load(name), target.load(name)
            assert list(a.ids) == list(b.ids) and a.names == b.names and a.provenance == b.provenance
            assert a.index_kind == b.index_kind and np.array_equal(a.vectors, b.vectors)
        again = list(export_lines(target, vectors=True))
        assert again[1:] == lines[1:]  # every set and class line, byte for byte
        with target.transaction() as db:  # writes go on after the imported versions and ids
            version, ids = target.add_classes(db, "animals", ["owl"], vecs(1, seed=4), "runtime")
        assert version > max(source.versions().values()) and ids == [4]
        with pytest.raises(ImportError_, match="already exist"):  # a second import: sets exist, nothing written
            import_lines(target, lines)
        assert target.load("animals").names == ["cat", "emu", "k\u00e4fer", "owl"]
    finally:
        target.close()


def test_bad_files_are_refused_whole_with_the_line_named(make_store: Callable[..., Store], tmp_path: Path) -> None:
    source = make_store()
    _fill(source)
    lines = list(export_lines(source, vectors=True))
    cls = json.loads(lines[3])
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
    assert json.loads(capsys.readouterr().out) == {"sets": 2, "classes": 4, "vectors": 4}
    assert main(["labelsets", "spaces", "--state-dir", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out) == {"space-a": 4}
    assert main(["labelsets", "import", str(out), "--state-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptdistill labelsets: error: ") and len(err.strip().splitlines()) == 1, err
    assert main(["labelsets", "export", "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["labelsets", "spaces", "--state-dir", str(tmp_path / "b"), "--remove", "space-a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": "space-a", "vectors": 4}

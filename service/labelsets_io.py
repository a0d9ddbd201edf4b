"""Backup and move of label sets: ``promptdistill labelsets export | import | spaces``.

The format is JSON Lines: a header, then one line per set and one per class, each with a ``kind``.
Classes keep their ids, provenance and creation time; sets their versions and next ids, so an
export imported into an empty database gives the same sets, ids and versions. Vectors are
optional (``--vectors``), each tagged with its embedding space: imported into a deployment of
another space they are kept under their tag, and the service encodes what its own space lacks at
start-up (service/migration.py). Import is one transaction: a damaged line, a duplicate, an unknown
field or a set that already exists stops it with one line naming the problem, and nothing is written.

It works on the store itself (``--state-dir`` or ``--database-url``), so it needs no bundle and no
running server; a running service on the same database sees an import like any other write.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT: Literal["promptdistill-labelsets"] = "promptdistill-labelsets"
FORMAT_VERSION = 1


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Header(_Line):
    kind: Literal["header"]
    format: Literal["promptdistill-labelsets"] = FORMAT
    version: int = Field(ge=1, le=FORMAT_VERSION)
    exported_at: str
    store_id: str = ""
    clock: int = Field(ge=0)
    applied: list[str] = Field(default_factory=list)  # bundles' label sets already brought in (registry.APPLIED)


class SetLine(_Line):
    kind: Literal["set"]
    name: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=0)
    next_id: int = Field(ge=0)
    created_at: str
    index_kind: Literal["flat", "ivf"] | None = None


class ClassLine(_Line):
    kind: Literal["class"]
    set: str = Field(min_length=1, max_length=200)
    id: int = Field(ge=0, le=2**62)
    name: str = Field(min_length=1, max_length=10_000)
    provenance: str = Field(min_length=1, max_length=200)
    created_at: str
    vectors: dict[str, str] = Field(default_factory=dict)  # space -> base64 of little-endian float32


class ImportError_(ValueError):
    """The file cannot be imported; the message names the line and the problem."""


def export_lines(store: Any, *, vectors: bool) -> Iterator[str]:
    """The whole store as JSON Lines (one consistent read)."""
    with store.read() as db:
        q = store._sql
        clock = max([int(r[0]) for r in db.execute(q("SELECT version FROM label_sets")).fetchall()] or [0])
        head = Header(kind="header", version=FORMAT_VERSION, exported_at=_now(),
                      store_id=store.meta("store_id") or "", clock=clock,
                      applied=json.loads(store.meta("applied_label_sets") or "[]"))  # fmt: skip
        yield head.model_dump_json()
        sets = db.execute(q("SELECT name, version, next_id, created_at, index_kind FROM label_sets ORDER BY name"))
        for name, version, next_id, created, kind in sets.fetchall():
            yield SetLine(kind="set", name=name, version=int(version), next_id=int(next_id), created_at=str(created),
                          index_kind=kind).model_dump_json()  # fmt: skip
        vecs: dict[tuple[str, int], dict[str, str]] = {}
        if vectors:
            for s, i, space, blob in db.execute(q("SELECT label_set, class_id, space, vector FROM vectors")).fetchall():
                vecs.setdefault((s, int(i)), {})[space] = base64.b64encode(bytes(blob)).decode("ascii")
        rows = db.execute(q("SELECT label_set, id, name, provenance, created_at FROM classes ORDER BY label_set, id"))
        for s, i, name, prov, created in rows.fetchall():
            line = ClassLine(kind="class", set=s, id=int(i), name=name, provenance=prov, created_at=str(created),
                             vectors=vecs.get((s, int(i)), {}))  # fmt: skip
            yield line.model_dump_json(exclude_defaults=not vectors)


def parse(lines: Iterable[str]) -> tuple[Header, list[SetLine], list[ClassLine]]:
    """Validate a whole file before anything is written (ImportError_ names the first bad line)."""
    reader = _Reader()
    for n, raw in enumerate(lines, 1):
        if raw.strip():
            reader.take(n, _line(n, raw))
    if reader.header is None:
        raise ImportError_("the file is empty: no header line")
    return reader.header, list(reader.sets.values()), reader.classes


_KINDS: dict[str, type[_Line]] = {"header": Header, "set": SetLine, "class": ClassLine}


def _line(n: int, raw: str) -> _Line:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ImportError_(f"line {n}: not JSON ({e})") from e
    model = _KINDS.get(str(data.get("kind"))) if isinstance(data, dict) else None
    if model is None:
        raise ImportError_(f"line {n}: 'kind' must be header, set or class")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ImportError_(f"line {n}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from e


class _Reader:
    """The checks across lines: one header first, sets before their classes, no duplicates."""

    def __init__(self) -> None:
        self.header: Header | None = None
        self.sets: dict[str, SetLine] = {}
        self.classes: list[ClassLine] = []
        self.ids: set[tuple[str, int]] = set()
        self.names: set[tuple[str, str]] = set()
        self.sizes: dict[str, int] = {}  # space -> bytes of one vector

    def take(self, n: int, item: _Line) -> None:
        if isinstance(item, Header):
            if self.header is not None or self.sets or self.classes:
                raise ImportError_(f"line {n}: a second header, or a header after the data")
            self.header = item
        elif self.header is None:
            raise ImportError_(f"line {n}: the file must start with its header line (is it a label-set export?)")
        elif isinstance(item, SetLine):
            if item.name in self.sets:
                raise ImportError_(f"line {n}: label set {item.name!r} appears twice")
            self.sets[item.name] = item
        elif isinstance(item, ClassLine):
            self._take_class(n, item)

    def _take_class(self, n: int, c: ClassLine) -> None:
        s = self.sets.get(c.set)
        if s is None:
            raise ImportError_(f"line {n}: class {c.name!r} of label set {c.set!r}, which no earlier line defines")
        if (c.set, c.id) in self.ids or (c.set, c.name) in self.names:
            raise ImportError_(f"line {n}: label set {c.set!r} has class id {c.id} or name {c.name!r} twice")
        if c.id >= s.next_id:
            raise ImportError_(f"line {n}: class id {c.id} is not below its set's next_id {s.next_id}")
        _check_vectors(c, n, self.sizes)
        self.ids.add((c.set, c.id))
        self.names.add((c.set, c.name))
        self.classes.append(c)


def _check_vectors(item: ClassLine, n: int, sizes: dict[str, int]) -> None:
    for space, b64 in item.vectors.items():
        try:
            size = len(base64.b64decode(b64, validate=True))
        except ValueError as e:
            raise ImportError_(f"line {n}: the vector of space {space!r} is not base64") from e
        if size == 0 or size % 4 or sizes.setdefault(space, size) != size:
            raise ImportError_(f"line {n}: the vector of space {space!r} has {size} bytes, others {sizes[space]}")


def import_lines(store: Any, lines: Iterable[str]) -> dict[str, int]:
    """Write a parsed export into ``store`` in one transaction; returns counts. Sets that exist are refused."""
    import numpy as np

    header, sets, classes = parse(lines)
    q = store._sql
    with store.transaction() as db:
        store.lock_all(db)
        existing = [s.name for s in sets if store.version(s.name) is not None]
        if existing:
            raise ImportError_(
                f"label sets {existing[:5]} already exist in {store.where}; import into an empty database "
                "(a fresh --state-dir, or delete those sets first)"
            )
        sql = q("INSERT INTO label_sets (name, version, next_id, created_at, index_kind) VALUES (?, ?, ?, ?, ?)")
        for s in sets:
            db.execute(sql, (s.name, s.version, s.next_id, s.created_at, s.index_kind))
        store._insert_classes(db, [(c.set, c.id, c.name, c.provenance, c.created_at) for c in classes])
        vectors = []
        for c in classes:
            for space, b64 in c.vectors.items():
                blob = base64.b64decode(b64, validate=True)
                if store.embed_dim and len(blob) != 4 * store.embed_dim:
                    raise ImportError_(f"class {c.name!r} of {c.set!r}: a vector of {len(blob) // 4} floats in space "
                                       f"{space!r}, --embed-dim says {store.embed_dim}")  # fmt: skip
                vectors.append((c.set, c.id, space, store._blob(np.frombuffer(blob, dtype="<f4"))))
        store._insert_vectors(db, vectors)
        store.advance_clock(db, max([header.clock, *[s.version for s in sets]]))
        applied = set(json.loads(store.meta("applied_label_sets") or "[]")) | set(header.applied)
        store.set_meta(db, "applied_label_sets", json.dumps(sorted(applied)))  # a restart re-adds nothing deleted
        for s in sets:
            store.notify(db, s.name, s.version)
    return {"sets": len(sets), "classes": len(classes), "vectors": len(vectors)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------- CLI
def register(sub: Any) -> None:
    p = sub.add_parser("labelsets", help="back up, move and inspect label sets in a state dir or database")
    lsub = p.add_subparsers(dest="labelsets_cmd", required=True)
    ex = lsub.add_parser("export", help="write every set and class (ids, versions, provenance) as JSON Lines")
    _store_args(ex)
    ex.add_argument("--vectors", action="store_true", help="include every space's vectors (base64 float32)")
    ex.add_argument("-o", "--out", help="file to write (default: standard output)")
    ex.set_defaults(func=_export)
    im = lsub.add_parser("import", help="load an export into an empty database (ids and versions kept)")
    im.add_argument("file", help="a JSON Lines export ('-': standard input)")
    _store_args(im)
    im.set_defaults(func=_import)
    sp = lsub.add_parser("spaces", help="list the embedding spaces with stored vectors, or remove one")
    _store_args(sp)
    sp.add_argument("--remove", metavar="SPACE", help="delete this space's vectors (not undoable)")
    sp.set_defaults(func=_spaces)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="the SQLite database's folder (a stopped or running service's)")
    p.add_argument("--database-url", help="postgresql://... (a fleet's database; or PROMPTDISTILL_DATABASE_URL)")
    p.add_argument("--embed-dim", type=int, default=0, help="import: check vectors against this size")


def _open(args: argparse.Namespace) -> Any:
    import os

    from service.stores.sqlite import DB_FILE, SqliteStore

    url = args.database_url or os.environ.get("PROMPTDISTILL_DATABASE_URL")
    tool_space = "(labelsets tool)"  # reads and writes no space of its own
    if url:
        from service.stores.postgres import PostgresStore

        return PostgresStore(url, args.embed_dim, tool_space)
    if not args.state_dir:
        raise ImportError_("give --state-dir DIR or --database-url URL")
    state = Path(args.state_dir)
    if args.func is not _import and not (state / DB_FILE).is_file():
        raise ImportError_(f"no label-set database in {state} ({DB_FILE} is missing)")
    state.mkdir(parents=True, exist_ok=True)
    return SqliteStore(state, args.embed_dim, tool_space)


def _run(args: argparse.Namespace, work: Any) -> int:
    from service.errors import ServiceError, StartupError

    try:
        store = _open(args)
    except (ImportError_, StartupError, OSError) as e:
        print(f"promptdistill labelsets: error: {e}", file=sys.stderr)  # noqa: T201 - the CLI's one line
        return 2
    try:
        return int(work(store))
    except (ImportError_, ServiceError, OSError) as e:
        print(f"promptdistill labelsets: error: {getattr(e, 'message', e)}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        store.close()


def _export(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        out: TextIO = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
        try:
            for line in export_lines(store, vectors=args.vectors):
                out.write(line + "\n")
        finally:
            if args.out:
                out.close()
        return 0

    return _run(args, work)


def _import(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        src = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        try:
            counts = import_lines(store, src)
        finally:
            if src is not sys.stdin:
                src.close()
        print(json.dumps(counts))  # noqa: T201 - the command's result
        return 0

    return _run(args, work)


def _spaces(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        if args.remove:
            with store.transaction() as db:
                removed = store.drop_space(db, args.remove)
            print(json.dumps({"removed": args.remove, "vectors": removed}))  # noqa: T201
            return 0
        print(json.dumps(store.spaces(), indent=2))  # noqa: T201
        return 0

    return _run(args, work)

"""Backup and move of label sets: the format behind ``promptdistill labelsets export | import``
(the commands: service/labelsets_cli.py).

The format is JSON Lines: a header, then one line per set, one per class and one per kept example
image, each with a ``kind``. Classes keep their ids, provenance and creation time; sets their
versions and next ids, so an export imported into an empty database gives the same sets, ids and
versions. Example images (service/examples.py keeps them so that another model can re-embed them)
always travel, each with its embedding and that embedding's space: a class made from examples stays
re-embeddable after a restore. Vectors are optional (``--vectors``): class vectors and the name's own
vectors of classes that mix a name and examples (``text_vectors``), each tagged with its space.
Imported into a deployment of another space they are kept under their tag, and the service encodes
what its own space lacks at start-up (service/migration.py: names through the text side, example
classes re-embedded from their images).

Import is one transaction, written as the file is read (memory stays bounded by one batch of
classes, not by the file): a damaged line, a duplicate, an unknown field or a set that already
exists stops it with one line naming the problem, and the transaction rolls back: nothing is written.

It works on the store itself (``--state-dir`` or ``--database-url``), so it needs no bundle and no
running server; a running service on the same database sees an import like any other write.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT: Literal["promptdistill-labelsets"] = "promptdistill-labelsets"
FORMAT_VERSION = 2  # 2: example lines and text_vectors; version 1 files import unchanged
MAX_EXAMPLE_BYTES = 2 * 1024 * 1024  # a kept example is at most ExampleLimits.keep_bytes (256 KiB) by default
_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
_FLUSH = 1000  # classes inserted together while importing
EXAMPLE_PAGE = 64  # example lines read together while exporting (each image up to keep_bytes)


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
    text_vectors: dict[str, str] = Field(default_factory=dict)  # space -> the name's own vector (name + examples)


class ExampleLine(_Line):
    """One kept example image of a class (table ``examples``), with its embedding in ``space``."""

    kind: Literal["example"]
    set: str = Field(min_length=1, max_length=200)
    class_id: int = Field(ge=0, le=2**62)
    seq: int = Field(ge=0, le=2**31 - 1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the bytes the client sent (duplicate check)
    media_type: Literal["image/png", "image/jpeg"]
    data: str = Field(min_length=4, max_length=(MAX_EXAMPLE_BYTES * 4) // 3 + 4)  # base64 of the kept image
    space: str = Field(min_length=1, max_length=500)
    embedding: str = Field(min_length=4)  # base64 of little-endian float32 [D] in ``space``
    created_at: str


class ImportError_(ValueError):
    """The file cannot be imported; the message names the line and the problem."""


def export_lines(store: Any, *, vectors: bool) -> Iterator[str]:
    """The whole store as JSON Lines (one consistent read): header, sets, classes, then examples."""
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
        vecs = _vectors_of(db, q, "vectors") if vectors else {}
        texts = _vectors_of(db, q, "text_vectors") if vectors else {}
        rows = db.execute(q("SELECT label_set, id, name, provenance, created_at FROM classes ORDER BY label_set, id"))
        for s, i, name, prov, created in rows.fetchall():
            key = (s, int(i))
            line = ClassLine(kind="class", set=s, id=int(i), name=name, provenance=prov, created_at=str(created),
                             vectors=vecs.get(key, {}), text_vectors=texts.get(key, {}))  # fmt: skip
            yield line.model_dump_json(exclude_defaults=not vectors)
        yield from _example_lines(db, q)


def _vectors_of(db: Any, q: Any, table: str) -> dict[tuple[str, int], dict[str, str]]:
    out: dict[tuple[str, int], dict[str, str]] = {}
    for s, i, space, blob in db.execute(q(f"SELECT label_set, class_id, space, vector FROM {table}")).fetchall():
        out.setdefault((s, int(i)), {})[space] = _b64(blob)
    return out


def _example_lines(db: Any, q: Any) -> Iterator[str]:
    """Every kept example, a page at a time (images are up to keep_bytes each: never all in memory)."""
    page = EXAMPLE_PAGE
    cols = "label_set, class_id, seq, digest, media_type, data, space, embedding, created_at"
    after: tuple[str, int, int] = ("", -1, -1)
    while True:
        sql = (
            f"SELECT {cols} FROM examples WHERE (label_set, class_id, seq) > (?, ?, ?) "
            f"ORDER BY label_set, class_id, seq LIMIT {page}"
        )
        rows = db.execute(q(sql), after).fetchall()
        for s, i, seq, digest, media, data, space, emb, created in rows:
            yield ExampleLine(kind="example", set=s, class_id=int(i), seq=int(seq), digest=digest, media_type=media,
                              data=_b64(data), space=space, embedding=_b64(emb),
                              created_at=str(created)).model_dump_json()  # fmt: skip
        if len(rows) < page:
            return
        after = (rows[-1][0], int(rows[-1][1]), int(rows[-1][2]))


def _b64(blob: Any) -> str:
    return base64.b64encode(bytes(blob)).decode("ascii")


_KINDS: dict[str, type[_Line]] = {"header": Header, "set": SetLine, "class": ClassLine, "example": ExampleLine}


def _line(n: int, raw: str) -> _Line:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ImportError_(f"line {n}: not JSON ({e})") from e
    model = _KINDS.get(str(data.get("kind"))) if isinstance(data, dict) else None
    if model is None:
        raise ImportError_(f"line {n}: 'kind' must be header, set, class or example")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ImportError_(f"line {n}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from e


class _Reader:
    """The checks across lines: one header first, sets before their classes, classes before their
    examples, no duplicates. Keeps ids and names (not vectors or images): bounded by the class count."""

    def __init__(self) -> None:
        self.header: Header | None = None
        self.sets: dict[str, SetLine] = {}
        self.ids: set[tuple[str, int]] = set()
        self.names: set[tuple[str, str]] = set()
        self.examples: set[tuple[str, int, int | str]] = set()  # (set, class, seq) and (set, class, digest)
        self.sizes: dict[str, int] = {}  # space -> bytes of one vector

    def take(self, n: int, item: _Line) -> None:
        if isinstance(item, Header):
            if self.header is not None or self.sets or self.ids:
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
        elif isinstance(item, ExampleLine):
            self._take_example(n, item)

    def _take_class(self, n: int, c: ClassLine) -> None:
        s = self.sets.get(c.set)
        if s is None:
            raise ImportError_(f"line {n}: class {c.name!r} of label set {c.set!r}, which no earlier line defines")
        if (c.set, c.id) in self.ids or (c.set, c.name) in self.names:
            raise ImportError_(f"line {n}: label set {c.set!r} has class id {c.id} or name {c.name!r} twice")
        if c.id >= s.next_id:
            raise ImportError_(f"line {n}: class id {c.id} is not below its set's next_id {s.next_id}")
        for space, b64 in [*c.vectors.items(), *c.text_vectors.items()]:
            _vector_size(n, space, b64, self.sizes)
        self.ids.add((c.set, c.id))
        self.names.add((c.set, c.name))

    def _take_example(self, n: int, e: ExampleLine) -> None:
        if (e.set, e.class_id) not in self.ids:
            raise ImportError_(
                f"line {n}: an example of class {e.class_id} of {e.set!r}, which no earlier line defines"
            )
        keys: tuple[tuple[str, int, int | str], ...] = ((e.set, e.class_id, e.seq), (e.set, e.class_id, e.digest))
        if any(k in self.examples for k in keys):
            raise ImportError_(f"line {n}: class {e.class_id} of {e.set!r} has example {e.seq} or its image twice")
        data = _decode(n, "the example image", e.data)
        if not data.startswith(_MAGIC[e.media_type]) or len(data) > MAX_EXAMPLE_BYTES:
            raise ImportError_(
                f"line {n}: the example image is not a {e.media_type} of at most {MAX_EXAMPLE_BYTES} bytes"
            )
        _vector_size(n, e.space, e.embedding, self.sizes)
        self.examples.update(keys)


def _decode(n: int, what: str, b64: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error) as e:
        raise ImportError_(f"line {n}: {what} is not base64") from e


def _vector_size(n: int, space: str, b64: str, sizes: dict[str, int]) -> int:
    size = len(_decode(n, f"the vector of space {space!r}", b64))
    if size == 0 or size % 4 or sizes.setdefault(space, size) != size:
        raise ImportError_(f"line {n}: the vector of space {space!r} has {size} bytes, others {sizes[space]}")
    return size


def import_lines(store: Any, lines: Iterable[str]) -> dict[str, int]:
    """Write an export into ``store`` in one transaction as it is read; returns counts. A set that
    exists, or any bad line, rolls the whole import back."""
    reader = _Reader()
    with store.transaction() as db:
        store.lock_all(db)
        writer = _Writer(store, db)
        for n, raw in enumerate(lines, 1):
            if raw.strip():
                item = _line(n, raw)
                reader.take(n, item)
                writer.write(n, item)
        if reader.header is None:
            raise ImportError_("the file is empty: no header line")
        writer.finish(reader.header)
    return writer.counts


class _Writer:
    """Inserts checked lines inside the import's transaction (classes and their vectors in batches)."""

    def __init__(self, store: Any, db: Any) -> None:
        self.store, self.db, self.q = store, db, store._sql
        self.counts = {"sets": 0, "classes": 0, "vectors": 0, "examples": 0}
        self.pending: list[ClassLine] = []
        self.sets: list[tuple[str, int]] = []  # imported sets and their versions

    def write(self, n: int, item: _Line) -> None:
        if isinstance(item, SetLine):
            self._set(item)
        elif isinstance(item, ClassLine):
            self.pending.append(item)
            if len(self.pending) >= _FLUSH:
                self._flush()
        elif isinstance(item, ExampleLine):
            self._flush()
            self._example(item)

    def _set(self, s: SetLine) -> None:
        if self.db.execute(self.q("SELECT 1 FROM label_sets WHERE name = ?"), (s.name,)).fetchone() is not None:
            raise ImportError_(
                f"label set {s.name!r} already exists in {self.store.where}; import into an empty database "
                "(a fresh --state-dir, or delete that set first)"
            )
        sql = self.q("INSERT INTO label_sets (name, version, next_id, created_at, index_kind) VALUES (?, ?, ?, ?, ?)")
        self.db.execute(sql, (s.name, s.version, s.next_id, s.created_at, s.index_kind))
        self.sets.append((s.name, s.version))
        self.counts["sets"] += 1

    def _flush(self) -> None:
        if not self.pending:
            return
        store, classes, self.pending = self.store, self.pending, []
        store._insert_classes(self.db, [(c.set, c.id, c.name, c.provenance, c.created_at) for c in classes])
        for table, field in (("vectors", "vectors"), ("text_vectors", "text_vectors")):
            rows = [
                (c.set, c.id, space, self._vector(c, space, b64))
                for c in classes
                for space, b64 in getattr(c, field).items()
            ]
            store._insert_vectors(self.db, rows, table)
            if table == "vectors":
                self.counts["vectors"] += len(rows)
        self.counts["classes"] += len(classes)

    def _vector(self, c: ClassLine, space: str, b64: str) -> Any:
        import numpy as np

        blob = base64.b64decode(b64, validate=True)
        if self.store.embed_dim and len(blob) != 4 * self.store.embed_dim:
            raise ImportError_(f"class {c.name!r} of {c.set!r}: a vector of {len(blob) // 4} floats in space "
                               f"{space!r}, --embed-dim says {self.store.embed_dim}")  # fmt: skip
        return self.store._blob(np.frombuffer(blob, dtype="<f4"))

    def _example(self, e: ExampleLine) -> None:
        emb = base64.b64decode(e.embedding, validate=True)
        sql = (
            "INSERT INTO examples (label_set, class_id, seq, digest, media_type, data, space, embedding, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        data = base64.b64decode(e.data, validate=True)
        params = (e.set, e.class_id, e.seq, e.digest, e.media_type, data, e.space, emb, e.created_at)
        self.db.execute(self.q(sql), params)
        self.counts["examples"] += 1

    def finish(self, header: Header) -> None:
        self._flush()
        store, db = self.store, self.db
        store.advance_clock(db, max([header.clock, *[v for _, v in self.sets]]))
        applied = set(json.loads(store.meta("applied_label_sets") or "[]")) | set(header.applied)
        store.set_meta(db, "applied_label_sets", json.dumps(sorted(applied)))  # a restart re-adds nothing deleted
        for name, version in self.sets:
            store.notify(db, name, version)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

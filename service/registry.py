"""Label-set registry: the store (truth) + one immutable FAISS snapshot per set (derived).

Writes take vectors (service/curator.py encodes names first, holding no lock): one committed
transaction -> build the next snapshot -> swap the reference. Reads take the current snapshot reference and
finish on it.

Keeping snapshots fresh depends on the store:
- SQLite (one host): before serving a set its stored version is compared with the snapshot's, so
  a change committed by another worker process is picked up at once (one local query).
- PostgreSQL (a fleet): reads never touch the database. The store's watcher delivers other
  replicas' commits (LISTEN/NOTIFY, a re-check on reconnect, a poll as a safety net) and only the
  added / removed rows are read. A request with ``min_version`` is answered from a snapshot at
  least that new: the registry waits briefly for it, then reads the database (503 if it cannot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.bundle import CLASS_VECTORS, DEFAULT_LABEL_SET, Bundle, bundle_space
from service.errors import (
    DuplicateClass,
    Encoding,
    InvalidInput,
    LabelSetExists,
    ProtectedLabelSet,
    StartupError,
    UnknownLabelSet,
)
from service.index import IndexKind, SearchCfg, Snapshot
from service.stores.base import LEGACY, ExampleRow, SetDelta, SetRows, Store

log = logging.getLogger(__name__)
RUNTIME = "runtime"


@dataclass(frozen=True)
class Change:
    """The result of a committed write."""

    snapshot: Snapshot | None
    version: int
    ids: list[int]
    names: list[str]
    skipped: list[str] = field(default_factory=list)  # names already there (skip_existing)
    quality: list[Any] = field(default_factory=list)  # service.quality.ClassCheck per new class (the curator's)


STORE_ID = "store_id"  # meta key of the database identity
APPLIED = "applied_label_sets"  # meta key: digests of the bundle label sets already brought in


def _label_sets_digest(bundle: Bundle) -> str:
    """Identifies a bundle's shipped label sets (names of sets and classes), so that restarting with a
    bundle never re-adds a class the user removed; a bundle with other label sets adds what is new."""
    spec = [[ls.name, [c.name for c in ls.classes]] for ls in bundle.manifest.label_sets]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _applied(raw: str | None) -> set[str]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        value = []
    return {str(v) for v in value} if isinstance(value, list) else set()


def bundle_fingerprint(bundle: Bundle) -> str:
    """Identifies the vector space: stored vectors from another bundle would be meaningless here."""
    m = bundle.manifest
    parts = [
        str(m.embed_dim),
        m.files.get(CLASS_VECTORS, ""),
        str(m.text_encoder.model_dump() if m.text_encoder else None),
    ]
    for key, ref in sorted(m.backbones.items()):
        parts.append(f"{key}:{ref.weights_file}:{m.files.get(ref.weights_file or '', ref.pretrained)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def check_store_matches(store: Store, bundle: Bundle) -> None:
    """Refuse a bundle that cannot serve every stored class: one without a text side, in a space where
    stored classes have no vectors and the bundle ships none for them (a start-up check; reads only)."""
    if bundle.manifest.text_encoder is not None:
        return
    legacy = store.meta("bundle_fingerprint")
    if legacy is not None and legacy == bundle_fingerprint(bundle):
        return  # the database was made for this very bundle: its vectors are this space's
    shipped = {ls.name: {c.name for c in ls.classes} for ls in bundle.manifest.label_sets}
    lacking: list[str] = []
    for name, n in store.missing_counts().items():
        _, names, provenance = store.missing(name, n)
        lacking += [  # classes made from examples alone need only the image tower
            f"{name}/{x}"
            for x, p in zip(names, provenance, strict=True)
            if x not in shipped.get(name, set()) and p != "examples"
        ]
    if lacking:
        raise StartupError(
            f"the label-set database {store.where} holds {len(lacking)} classes (e.g. {lacking[:3]}) with no "
            f"vector in this bundle's embedding space ({bundle_space(bundle)}), and the bundle has no text side "
            "to encode them; serve a bundle with a text side, or the bundle they were made with (their vectors "
            "are kept), or use another --state-dir"
        )


class Registry:
    """Named, versioned, durable label sets with atomically swapped FAISS snapshots."""

    def __init__(
        self,
        store: Store,
        use_gpu: bool = False,
        on_version: Callable[[str, int, int], None] | None = None,
        min_version_wait_s: float = 1.0,
        search: SearchCfg | None = None,
    ) -> None:
        self.store = store
        self.use_gpu = use_gpu
        self.search = search or SearchCfg(use_gpu=use_gpu)
        self.min_version_wait_s = min_version_wait_s
        self._snapshots: dict[str, Snapshot] = {}
        self._deleted: dict[str, int] = {}  # name -> clock of its deletion, as told by the watcher
        self._pending: dict[str, int] = {}  # name -> classes without a vector in this space (being encoded)
        #: Called (from any thread) when a set is found with classes lacking vectors; the migrator listens.
        self.on_missing: Callable[[str], None] = lambda name: None
        self._seen = 0  # every change up to this clock value has been applied here (notify order, syncs)
        self._write_lock = threading.RLock()  # get() may refresh a stale set while a writer holds it
        self._changed = threading.Condition()  # wakes min_version waiters after each install
        self._on_version = on_version or (lambda name, version, n: None)
        #: This database's identity (made on its first start): versions are only comparable within one
        #: store, so clients that keep versions across runs key them by it (the X-Store-Id header).
        self.store_id = ""

    # ----------------------------------------------------------------- start-up
    def open(self, bundle: Bundle) -> None:
        """Bring the database to this bundle, then build every snapshot from it.

        A new database is seeded with the bundle's label sets. An existing one keeps every class: a
        bundle of the same space serves the stored vectors; a bundle of a new space adds its own
        vectors for the classes it ships (by name), and the rest are encoded after start-up
        (service/migration.py); a bundle whose label sets this database never saw adds the classes it
        ships that are not there yet. Several workers may start together: one writer at a time.
        """
        with self.store.transaction() as db:
            self.store.lock_all(db)
            self.store_id = self.store.meta(STORE_ID) or ""
            if not self.store_id:  # first start of this database (or one made before identities)
                self.store_id = uuid.uuid4().hex
                self.store.set_meta(db, STORE_ID, self.store_id)
            legacy = self.store.meta("bundle_fingerprint")  # a database made before spaces
            applied = _applied(self.store.meta(APPLIED))
            if legacy is not None and legacy == bundle_fingerprint(bundle):
                moved = self.store.retag(db, LEGACY + legacy, self.store.space)
                applied.add(_label_sets_digest(bundle))
                log.info("database made before spaces: its %d vectors are this bundle's (%s)", moved, self.store.space)
            # A database the previous release served (its bundle_fingerprint, no APPLIED record) never gets
            # classes back that its users removed: nothing is added to its existing sets then.
            known = bool(applied) or legacy is None  # made by this release, or by a tool (bench, import)
            self._apply_bundle(db, bundle, add_new=known and _label_sets_digest(bundle) not in applied)
            applied.add(_label_sets_digest(bundle))
            self.store.set_meta(db, APPLIED, json.dumps(sorted(applied)))
        self.sync()
        log.info("label sets ready: %s", {n: (s.version, len(s)) for n, s in self._snapshots.items()})
        if self._pending:
            log.info("class vectors to encode for space %s: %s", self.store.space, dict(self._pending))
        if self.store.shared:
            self.store.watch(self._on_notify, self.sync)

    def _apply_bundle(self, db: Any, bundle: Bundle, add_new: bool) -> None:
        """The bundle's vectors for stored classes of the same name that have none in this space; with
        ``add_new``, also the bundle's label sets and classes that the database lacks."""
        for spec in bundle.manifest.label_sets:
            vectors = bundle.class_vectors[spec.name].float().numpy()  # [N, D] stored, not recomputed
            names, prov = [c.name for c in spec.classes], [c.provenance for c in spec.classes]
            stored = self.store.class_ids(db, spec.name)
            exists = bool(stored) or self.store.version(spec.name) is not None
            if not exists and not add_new:
                continue  # the user deleted it: a restart does not bring it back
            if not exists:
                ids = [c.id for c in spec.classes]
                self.store.create_set(db, spec.name, names, vectors, prov, ids=ids)
                log.info("label set %r seeded from the bundle (%d classes)", spec.name, len(names))
                continue
            known = [k for k, n in enumerate(names) if n in stored]
            self.store.put_vectors(db, spec.name, [stored[names[k]] for k in known], vectors[known])
            new = [k for k, n in enumerate(names) if n not in stored]
            if new and add_new:
                self.store.lock_version(db, spec.name)
                self.store.add_classes(db, spec.name, [names[k] for k in new], vectors[new], [prov[k] for k in new])
                log.info("label set %r: %d classes of the bundle added", spec.name, len(new))

    def pending(self) -> dict[str, int]:
        """Label sets with classes whose vectors this space lacks -> how many (as last read)."""
        with self._changed:
            return dict(self._pending)

    # ----------------------------------------------------------------- reads
    def get(self, name: str, min_version: int | None = None) -> Snapshot:
        """The snapshot of ``name`` to answer from, at least ``min_version`` new when given.

        Raises UnknownLabelSet (404), StoreUnavailable (503 + Retry-After) when the database would
        have to answer and cannot, InvalidInput (422) for a token this database never issued.
        """
        if not self.store.shared:
            snap = self._get_local(name)
        else:
            held = self._snapshots.get(name)
            fresh = held is not None and (min_version is None or held.version >= min_version)
            snap = held if held is not None and fresh else self._catch_up(name, min_version)
        if min_version is not None and snap.version < min_version and name in self._pending:
            raise Encoding(
                f"label set {name!r} at version {min_version} has classes whose vectors this replica's embedding "
                "space is still encoding; retry shortly"
            )
        if min_version is not None and snap.version < min_version:
            # snap came from the database itself, which holds every version ever acknowledged: this
            # token was not issued by this database (another deployment, or a wiped one).
            raise InvalidInput(
                f"min_version {min_version} is newer than label set {name!r} has ever been in this database "
                f"(version {snap.version}); the token comes from another deployment or a re-created database"
            )
        return snap

    def _get_local(self, name: str) -> Snapshot:
        """SQLite: the stored version decides (another worker process may have changed the set)."""
        version = self.store.version(name)
        if version is None:
            self._drop(name)
            raise UnknownLabelSet(f"label set {name!r} does not exist; GET /v1/label-sets lists them")
        snap = self._snapshots.get(name)
        if snap is None or snap.version != version:
            snap = self.refresh(name)
        return snap

    def _catch_up(self, name: str, min_version: int | None) -> Snapshot:
        """Shared store, snapshot missing or too old: wait for the watcher, then ask the database."""
        if min_version is not None:
            deadline = time.monotonic() + self.min_version_wait_s
            with self._changed:
                while True:
                    snap = self._snapshots.get(name)
                    if snap is not None and snap.version >= min_version:
                        return snap
                    if snap is None and self._deleted.get(name, -1) >= min_version:
                        raise UnknownLabelSet(f"label set {name!r} does not exist; GET /v1/label-sets lists them")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
        return self.refresh(name)

    def summaries(self, min_version: int | None = None) -> list[tuple[str, int, int]]:
        """(name, version, number of classes) per set.

        SQLite: fresh from the database. Shared store: this replica's snapshots; with ``min_version``
        at least every change up to that clock value is included (waits, then re-reads the database).
        """
        if not self.store.shared:
            out = []
            for name in sorted(self.store.versions()):
                try:
                    snap = self.get(name)
                except UnknownLabelSet:  # deleted between the two reads: it is simply not listed
                    continue
                out.append((name, snap.version, len(snap)))
            return out
        if min_version is not None and not self._wait_seen(min_version):
            self.sync()  # the database itself: fresh, or StoreUnavailable (503) if it cannot answer
        return [(n, s.version, len(s)) for n, s in sorted(self._snapshots.items())]

    def _wait_seen(self, clock: int) -> bool:
        deadline = time.monotonic() + self.min_version_wait_s
        with self._changed:
            while self._seen < clock:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def served_versions(self) -> dict[str, int]:
        return {n: s.version for n, s in sorted(self._snapshots.items())}

    def snapshots(self) -> dict[str, Snapshot]:
        return dict(self._snapshots)

    # ----------------------------------------------------------------- propagation
    def refresh(self, name: str) -> Snapshot:
        """Bring ``name`` up to the database, reading only the rows this replica lacks."""
        with self._write_lock:
            old = self._snapshots.get(name)
            try:
                delta = self.store.delta(name, old.ids if old is not None else np.zeros(0, dtype=np.int64))
            except UnknownLabelSet:
                self._drop(name)
                raise UnknownLabelSet(f"label set {name!r} does not exist; GET /v1/label-sets lists them") from None
            waiting = name in self._pending  # vectors filled in since: same version, new rows
            if old is not None and delta.version <= old.version and not waiting:
                return old  # versions only increase: never install an older read
            if delta.added.missing:  # never serve a set with classes left out: keep the last complete one
                self._set_pending(name, len(delta.added.missing))
                if old is not None:
                    return old
                raise Encoding(
                    f"label set {name!r}: {len(delta.added.missing)} classes have no vector in this bundle's "
                    "embedding space yet; they are being encoded, retry shortly"
                )
            self._set_pending(name, 0)
            return self._install(self._build(_merge(old, delta)))

    def _set_pending(self, name: str, missing: int) -> None:
        with self._changed:
            if not missing:
                self._pending.pop(name, None)
                return
            self._pending[name] = missing
        self.on_missing(name)

    def sync(self) -> None:
        """Re-check every version against the database (start-up, listener (re)connect, poll)."""
        with self._write_lock:
            versions = self.store.versions()
            for name in [n for n in self._snapshots if n not in versions]:
                self._drop(name)
            for name, version in versions.items():
                snap = self._snapshots.get(name)
                if snap is None or snap.version < version:
                    try:
                        self.refresh(name)
                    except (UnknownLabelSet, Encoding):  # deleted since versions() was read; or encoding
                        continue
            self._saw(max(versions.values(), default=0))

    def _on_notify(self, name: str, version: int) -> None:
        """Another replica (or this one) committed ``name`` at ``version``; notifications come in commit order."""
        snap = self._snapshots.get(name)
        if snap is None or snap.version < version or name in self._pending:  # pending: vectors may have come
            try:
                self.refresh(name)
            except UnknownLabelSet:
                with self._changed:
                    self._deleted[name] = max(version, self._deleted.get(name, 0))
            except Encoding:
                pass  # no complete snapshot yet: the migrator encodes what this space lacks
        self._saw(version)

    def _saw(self, clock: int) -> None:
        with self._changed:
            self._seen = max(self._seen, clock)
            self._changed.notify_all()

    # ----------------------------------------------------------------- writes
    # The registry takes vectors and never runs an encoder (service/curator.py encodes before calling
    # these): its lock is held only for the database commit and the snapshot swap.
    def existing(self, name: str, names: Sequence[str]) -> set[str]:
        """The ``names`` already in set ``name`` (UnknownLabelSet if there is no such set)."""
        with self.store.read() as db:
            if self.store.version(name) is None:
                raise UnknownLabelSet(f"label set {name!r} does not exist; GET /v1/label-sets lists them")
            return set(self.store.existing_names(db, name, names))

    def create(
        self,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: Sequence[str],
        *,
        skip_existing: bool = False,
        index: IndexKind | None = None,
    ) -> Change:
        """Create a set of ``names`` with their ``vectors`` [N, D]; an existing one is a 409, or
        (``skip_existing``) left as it is and returned.

        ``index`` (stored with the set) picks exact or approximate search; None: the service default.
        """
        with self._write_lock:
            if self.store.version(name) is not None:
                if not skip_existing:
                    raise LabelSetExists(f"label set {name!r} already exists")
                snap = self.get(name)
                return Change(snap, snap.version, [], [], skipped=list(names))
            vecs = np.asarray(vectors, dtype=np.float32)  # [N, D]
            with self.store.transaction() as db:
                version = self.store.create_set(db, name, names, vecs, list(provenance), index_kind=index)
            ids = np.arange(len(names), dtype=np.int64)  # a new set numbers its classes from 0
            rows = SetRows(name, version, ids, list(names), list(provenance), vecs, index)
            snap = self._install(self._build(rows))
        return Change(snap, version, [int(i) for i in snap.ids], list(names))

    def add(
        self,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: Sequence[str],
        *,
        skip_existing: bool = False,
    ) -> Change:
        """Add classes with their ``vectors`` [N, D] atomically (all or none); names already in the set
        (added meanwhile by another writer) -> 409, or (``skip_existing``) left out."""
        vecs = np.asarray(vectors, dtype=np.float32)
        with self._write_lock:
            existing = self.existing(name, names)
            if existing and not skip_existing:
                raise DuplicateClass(f"label set {name!r} already has {sorted(existing)[:10]}")
            keep = [i for i, n in enumerate(names) if n not in existing]
            skipped = [n for n in names if n in existing]
            if not keep:
                snap = self.get(name)
                return Change(snap, snap.version, [], [], skipped=skipped)
            names, vecs, prov = [names[i] for i in keep], vecs[keep], [provenance[i] for i in keep]
            with self.store.transaction() as db:
                before = self.store.lock_version(db, name)
                version, ids = self.store.add_classes(db, name, names, vecs, prov)
            old = self._snapshots.get(name)
            if old is not None and old.version == before:
                added = SetRows(name, version, np.asarray(ids, dtype=np.int64), list(names), prov, vecs)
                rows = _merge(old, SetDelta(version, np.concatenate([old.ids, added.ids]), added))
            else:
                rows = self.store.load(name)
            snap = self._install(self._build(rows))
        return Change(snap, version, ids, list(names), skipped=skipped)

    def add_vectors(
        self,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: Sequence[str],
        text_vectors: Sequence[np.ndarray | None],
        examples: Sequence[Sequence[ExampleRow]],
    ) -> Change:
        """Add classes whose vectors are already computed, with their examples, in one transaction."""
        with self._write_lock:
            with self.store.transaction() as db:
                version, ids = self.store.add_classes(
                    db, name, names, vectors, provenance, text_vectors=text_vectors, examples=examples
                )
            snap = self.refresh(name)
        return Change(snap, version, ids, list(names))

    def replace_class(
        self,
        name: str,
        class_id: int,
        vector: np.ndarray,
        provenance: str,
        text_vector: np.ndarray | None,
        examples: Sequence[ExampleRow],
    ) -> Change:
        """A class's new vector with more examples: one transaction; the class gets a new id."""
        with self._write_lock:
            with self.store.transaction() as db:
                version, new_id = self.store.replace_class(
                    db, name, class_id, vector, provenance, text_vector, examples
                )
                row_name = self.store.class_row(db, name, new_id).name
            snap = self.refresh(name)
        return Change(snap, version, [new_id], [row_name])

    def remove(self, name: str, class_id: int | None = None, class_name: str | None = None) -> Change:
        with self._write_lock:
            with self.store.transaction() as db:
                before = self.store.lock_version(db, name)
                version, removed_id, removed_name = self.store.remove_class(db, name, class_id, class_name)
            old = self._snapshots.get(name)
            if old is not None and old.version == before:
                empty = SetRows(name, version, old.ids[:0], [], [], old.vectors[:0])
                rows = _merge(old, SetDelta(version, old.ids[old.ids != removed_id], empty))
            else:
                rows = self.store.load(name)
            snap = self._install(self._build(rows))
        return Change(snap, version, [removed_id], [removed_name])

    def delete(self, name: str) -> Change:
        if name == DEFAULT_LABEL_SET:
            raise ProtectedLabelSet("the 'default' label set comes from the bundle and cannot be deleted")
        with self._write_lock:
            with self.store.transaction() as db:
                version = self.store.delete_set(db, name)
            self._drop(name, version)
        return Change(None, version, [], [])

    # ----------------------------------------------------------------- health
    def check(self) -> list[str]:
        """Problems that make the service unready: an index that disagrees with its rows, a stale version.

        Sets created or deleted while this runs are not problems (the race behind spurious 503s).
        """
        problems: list[str] = []
        versions = self.store.versions()
        for name, version in versions.items():
            try:
                snap = self.get(name) if not self.store.shared else self._snapshots.get(name)
                if snap is None or snap.version < version:  # the watcher lags: catch up rather than fail
                    snap = self.refresh(name)
            except UnknownLabelSet:
                continue  # deleted since versions() was read
            except Encoding as e:
                problems.append(e.message)  # no complete snapshot yet: a new space's first encode
                continue
            if snap.version < version and name not in self._pending:
                problems.append(f"label set {name!r}: index version {snap.version} < database {version}")
        for name, snap in self.snapshots().items():
            if int(snap.index.ntotal) != len(snap.ids) or not np.array_equal(snap.index_ids(), np.sort(snap.ids)):
                problems.append(
                    f"label set {name!r}: index holds {snap.index.ntotal} vectors, database {len(snap.ids)}"
                )
        if DEFAULT_LABEL_SET not in versions:
            problems.append("the default label set is missing from the database")
        return problems

    def _build(self, rows: SetRows) -> Snapshot:
        """The next snapshot of a set (an IVF set keeps the current snapshot's trained centroids)."""
        return Snapshot.from_rows(rows, self.use_gpu, self.search, self._snapshots.get(rows.name))

    def _install(self, snap: Snapshot) -> Snapshot:
        with self._changed:
            self._snapshots[snap.name] = snap  # one reference assignment: the atomic swap
            self._changed.notify_all()
        self._on_version(snap.name, snap.version, len(snap))
        return snap

    def _drop(self, name: str, version: int | None = None) -> None:
        with self._changed:
            self._pending.pop(name, None)
            if self._snapshots.pop(name, None) is not None:
                self._on_version(name, -1, 0)
            if version is not None:
                self._deleted[name] = max(version, self._deleted.get(name, 0))
            self._changed.notify_all()


def _merge(old: Snapshot | None, delta: SetDelta) -> SetRows:
    """The rows ``delta`` describes: ``old``'s rows still present plus the added ones, in id order."""
    added = delta.added
    if old is None:
        return added
    keep = np.isin(old.ids, delta.current_ids)
    ids = np.concatenate([old.ids[keep], added.ids])
    order = np.argsort(ids, kind="stable")
    names = [*[n for n, k in zip(old.names, keep, strict=True) if k], *added.names]
    prov = [*[p for p, k in zip(old.provenance, keep, strict=True) if k], *added.provenance]
    vectors = np.concatenate([old.vectors[keep], added.vectors])  # [N, D]
    kind = added.index_kind or old.kind  # rows built here carry no kind; the set's kind never changes
    return SetRows(
        old.name, delta.version, ids[order], [names[i] for i in order], [prov[i] for i in order], vectors[order], kind
    )

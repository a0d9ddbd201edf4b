"""Label-set registry: the SQLite store (truth) + one immutable FAISS snapshot per set (derived).

Writes: validate -> encode names through the bundle's text side -> one committed transaction ->
build the next snapshot -> swap the reference. Reads take the current snapshot reference and
finish on it. Before serving a set, its stored version is compared with the snapshot's, so a
change committed by another worker process is picked up (rebuilt from the database).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.bundle import CLASS_VECTORS, DEFAULT_LABEL_SET, Bundle
from service.errors import DuplicateClass, LabelSetExists, ProtectedLabelSet, StartupError, UnknownLabelSet
from service.index import IndexKind, SearchCfg, Snapshot
from service.store import LabelSetStore, SetRows
from service.text import TextEncoder

log = logging.getLogger(__name__)
RUNTIME = "runtime"


@dataclass(frozen=True)
class Change:
    """The result of a committed write."""

    snapshot: Snapshot | None
    version: int
    ids: list[int]
    names: list[str]


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


class Registry:
    """Named, versioned, durable label sets with atomically swapped FAISS snapshots."""

    def __init__(
        self,
        store: LabelSetStore,
        text: TextEncoder,
        use_gpu: bool = False,
        on_version: Callable[[str, int, int], None] | None = None,
        search: SearchCfg | None = None,
    ) -> None:
        self.store = store
        self.text = text
        self.use_gpu = use_gpu
        self.search = search or SearchCfg(use_gpu=use_gpu)
        self._snapshots: dict[str, Snapshot] = {}
        self._write_lock = threading.RLock()  # get() may refresh a stale set while a writer holds it
        self._on_version = on_version or (lambda name, version, n: None)

    # ----------------------------------------------------------------- start-up
    def open(self, bundle: Bundle) -> None:
        """Seed the bundle's label sets on first start; then build every snapshot from the database."""
        fingerprint = bundle_fingerprint(bundle)
        with self.store.transaction() as db:  # one writer at a time: several workers may start together
            stored = self.store.meta("bundle_fingerprint")
            if stored is None:
                for spec in bundle.manifest.label_sets:
                    vectors = bundle.class_vectors[spec.name].float().numpy()  # [N, D] stored, not recomputed
                    self.store.create_set(
                        db, spec.name, [c.name for c in spec.classes], vectors,
                        [c.provenance for c in spec.classes], ids=[c.id for c in spec.classes],
                    )  # fmt: skip
                self.store.set_meta(db, "bundle_fingerprint", fingerprint)
                log.info("seeded label sets %s from the bundle", [s.name for s in bundle.manifest.label_sets])
        if stored is not None and stored != fingerprint:
            raise StartupError(
                f"the state directory's database {self.store.path} was created for a different bundle "
                "(its class vectors live in another embedding space); use a fresh --state-dir / "
                "PROMPTDISTILL_STATE_DIR for this bundle, or delete that database to start over"
            )
        for name in self.store.set_names():
            self._install(self._build(self.store.load(name)))
        log.info("label sets ready: %s", {n: (s.version, len(s)) for n, s in self._snapshots.items()})

    # ----------------------------------------------------------------- reads
    def get(self, name: str) -> Snapshot:
        """The current snapshot of ``name`` (rebuilt first if another process changed the set)."""
        version = self.store.version(name)
        if version is None:
            self._snapshots.pop(name, None)
            raise UnknownLabelSet(f"label set {name!r} does not exist; GET /v1/label-sets lists them")
        snap = self._snapshots.get(name)
        if snap is None or snap.version != version:
            with self._write_lock:
                snap = self._snapshots.get(name)
                if snap is None or snap.version != self.store.version(name):
                    snap = self._install(self._build(self.store.load(name)))
        return snap

    def summaries(self) -> list[tuple[str, int, int]]:
        """(name, version, number of classes) per set, fresh from the database."""
        return [(n, s.version, len(s)) for n in self.store.set_names() for s in [self.get(n)]]

    def snapshots(self) -> dict[str, Snapshot]:
        return dict(self._snapshots)

    # ----------------------------------------------------------------- writes
    def create(
        self, name: str, names: Sequence[str], templates: Sequence[str] | None, index: IndexKind | None = None
    ) -> Change:
        """A new set; ``index`` (stored with it) picks exact or approximate search, None: the default."""
        with self._write_lock:
            if self.store.version(name) is not None:
                raise LabelSetExists(f"label set {name!r} already exists")
            vectors = self.text.encode(names, templates)  # [N, D]
            with self.store.transaction() as db:
                version = self.store.create_set(db, name, names, vectors, RUNTIME, index_kind=index)
            snap = self._install(self._build(self.store.load(name)))
        return Change(snap, version, [int(i) for i in snap.ids], list(names))

    def add(self, name: str, names: Sequence[str], templates: Sequence[str] | None) -> Change:
        """Add classes atomically (all or none); duplicates of existing names -> 409 before encoding."""
        with self._write_lock:
            self.get(name)  # 404 early and refresh
            with self.store.transaction() as db:
                existing = self.store.existing_names(db, name, names)
            if existing:
                raise DuplicateClass(f"label set {name!r} already has {sorted(existing)[:10]}")
            vectors = self.text.encode(names, templates)  # [N, D]; outside the transaction (slow)
            with self.store.transaction() as db:
                before = self.store.version(name)
                version, ids = self.store.add_classes(db, name, names, vectors, RUNTIME)
            old = self._snapshots.get(name)
            if old is not None and old.version == before:
                rows = SetRows(
                    name,
                    version,
                    np.concatenate([old.ids, np.asarray(ids, dtype=np.int64)]),
                    [*old.names, *names],
                    [*old.provenance, *[RUNTIME] * len(names)],
                    np.concatenate([old.vectors, vectors.astype(np.float32)]),
                    old.kind,
                )
            else:
                rows = self.store.load(name)
            snap = self._install(self._build(rows))
        return Change(snap, version, ids, list(names))

    def remove(self, name: str, class_id: int | None = None, class_name: str | None = None) -> Change:
        with self._write_lock:
            with self.store.transaction() as db:
                before = self.store.version(name)
                version, removed_id, removed_name = self.store.remove_class(db, name, class_id, class_name)
            old = self._snapshots.get(name)
            if old is not None and old.version == before:
                keep = old.ids != removed_id
                rows = SetRows(
                    name,
                    version,
                    old.ids[keep],
                    [n for n, k in zip(old.names, keep, strict=True) if k],
                    [p for p, k in zip(old.provenance, keep, strict=True) if k],
                    old.vectors[keep],
                    old.kind,
                )
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
            self._snapshots.pop(name, None)
            self._on_version(name, -1, 0)
        return Change(None, version, [], [])

    # ----------------------------------------------------------------- health
    def check(self) -> list[str]:
        """Problems that make the service unready: index vs database disagreement, stale versions."""
        problems: list[str] = []
        versions = self.store.versions()
        for name, version in versions.items():
            snap = self.get(name)
            if snap.version != version:
                problems.append(f"label set {name!r}: index version {snap.version} != database {version}")
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
        self._snapshots[snap.name] = snap  # one reference assignment: the atomic swap
        self._on_version(snap.name, snap.version, len(snap))
        return snap

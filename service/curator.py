"""The one write pipeline every label-set write walks (the write-path twin of service/classifier.py):

1. clean the names and templates (the same rules as the exporter's names; 422 before any work);
2. leave out what is there already: an existing set (409, or returned as it is with
   ``if_exists='skip'``), names already in the set (409, or left out);
3. encode the remaining names on the text engine, *urgent* (ahead of anonymous text work), holding
   no lock: reads, snapshot refreshes and other replicas' notifications go on meanwhile;
4. commit through the registry (one transaction, then the snapshot swap). A writer that added the
   same names meanwhile is caught there (409, or left out).

Routes only parse, call the curator and build their schema.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from service.errors import DuplicateClass, LabelSetExists
from service.index import IndexKind
from service.names import clean_names, clean_set_name, clean_templates
from service.quality import QualityGate
from service.registry import RUNTIME, Change, Registry
from service.settings import Settings
from service.text import TextTower

NO_DEADLINE = float("inf")  # a write is bounded by its request's size limits, not a deadline


class Curator:
    """Creates label sets and adds classes: clean -> leave out existing -> encode (urgent) -> commit."""

    def __init__(
        self, settings: Settings, registry: Registry, text: TextTower, gate: QualityGate | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.text = text
        self.gate = gate  # the quality check before each commit (service/quality.py); None: none

    def _clean(self, names: Sequence[str], templates: Sequence[str] | None) -> tuple[list[str], list[str] | None]:
        s = self.settings
        cleaned = clean_names(names, s.max_labels_per_request, s.max_name_length)
        tpl = clean_templates(templates, s.max_templates)
        self.text.check_templates(tpl)
        return cleaned, tpl

    async def create(
        self,
        set_name: str,
        names: Sequence[str],
        templates: Sequence[str] | None,
        *,
        skip_existing: bool = False,
        index: IndexKind | None = None,
        if_similar: str = "warn",
    ) -> Change:
        """A new set of ``names``; an existing set is a 409, or (``skip_existing``) returned unchanged."""
        set_name = clean_set_name(set_name)
        cleaned, tpl = self._clean(names, templates)
        if await asyncio.to_thread(self.registry.store.version, set_name) is not None:
            if not skip_existing:
                raise LabelSetExists(f"label set {set_name!r} already exists")
            snap = await asyncio.to_thread(self.registry.get, set_name)
            return Change(snap, snap.version, [], [], skipped=cleaned)
        vectors = await self._encode(cleaned, tpl)
        checks = await self.gate.check(None, cleaned, vectors, if_similar) if self.gate else []
        commit = functools.partial(
            self.registry.create, set_name, cleaned, vectors, [RUNTIME] * len(cleaned),
            skip_existing=skip_existing, index=index,
        )  # fmt: skip
        return dataclasses.replace(await asyncio.to_thread(commit), quality=checks)

    async def add(
        self,
        set_name: str,
        names: Sequence[str],
        templates: Sequence[str] | None,
        *,
        skip_existing: bool = False,
        if_similar: str = "warn",
    ) -> Change:
        """Add classes atomically (all or none); names already in the set -> 409 before encoding, or
        (``skip_existing``) left out, so that repeating a request changes nothing."""
        cleaned, tpl = self._clean(names, templates)
        existing = await asyncio.to_thread(self.registry.existing, set_name, cleaned)
        if existing and not skip_existing:
            raise DuplicateClass(f"label set {set_name!r} already has {sorted(existing)[:10]}")
        fresh = [n for n in cleaned if n not in existing]
        if not fresh:
            snap = await asyncio.to_thread(self.registry.get, set_name)
            return Change(snap, snap.version, [], [], skipped=[n for n in cleaned if n in existing])
        vectors = await self._encode(fresh, tpl)
        current = await asyncio.to_thread(self.registry.get, set_name) if self.gate else None
        checks = await self.gate.check(current, fresh, vectors, if_similar) if self.gate else []
        commit = functools.partial(
            self.registry.add, set_name, fresh, vectors, [RUNTIME] * len(fresh), skip_existing=skip_existing
        )
        change = await asyncio.to_thread(commit)
        skipped = [n for n in cleaned if n in existing]
        return Change(
            change.snapshot, change.version, change.ids, change.names, skipped=skipped + change.skipped, quality=checks
        )

    async def _encode(self, names: list[str], templates: list[str] | None) -> np.ndarray:
        """[N, D] on the text engine's urgent queue."""
        return await self.text.encode(names, templates, urgent=True, timeout_s=NO_DEADLINE)

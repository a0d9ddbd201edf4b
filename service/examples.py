"""Classes from example images: the write path the curator calls.

One request, in this order (nothing is stored before the last step, and the last step is one
transaction, so a refusal anywhere leaves the set as it was):

1. cheap checks: every class has a name or examples, counts within :class:`ExampleLimits`,
   base64 decoded (the classify limits), no example twice (by the sha256 of its bytes);
2. names already in the set: 409, or left out (``if_exists="skip"``);
3. the examples through the image engine with classify's admission, decode limits and deadline
   (:meth:`service.classifier.Classifier.embed_images`), one class at a time; an example as close to
   an earlier one of its class (in the request or stored) as the same image re-encoded or resized is
   refused too: cosine >= :func:`near_duplicate_cosine`, the 99th percentile of the nearest-neighbour
   cosines of the bundle's calibration sample (no such check without a sample);
4. each example re-encoded for keeping (RGB, long side capped, PNG if small enough else JPEG), so
   that another model can re-embed it later;
5. the names' text vectors (``encode_names``: the text engine's urgent queue, as the curator's);
6. class vectors in the served space (:mod:`models.prototypes`: gap-corrected prototype, combined
   with the text vector when the class also has a name);
7. one commit with the classes and their examples (:meth:`service.registry.Registry.add_vectors` /
   :meth:`~service.registry.Registry.replace_class`).

A kept example has one embedding, tagged with its space. After a model change the migration's
rebuild (:func:`rebuilt_vector`) and ``add_examples`` re-embed the examples of another space and write
the new embeddings back, so neither a restart nor the next change embeds them again.

Provenance: ``examples`` (no name encoded), ``<origin>+examples`` (a name and examples, e.g.
``runtime+examples``); classes from names alone keep ``runtime``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.prototypes import Gap, GapMode, class_vector
from service.classifier import Classifier, Disconnected
from service.errors import (
    BadImage,
    DuplicateClass,
    DuplicateExample,
    ImageTooLarge,
    InvalidInput,
    ServiceError,
    StoreUnavailable,
    UnknownLabelSet,
)
from service.images import EncodedImage, ImagePreprocessor, decode_base64_image
from service.names import clean_name
from service.quality import ClassCheck, QualityGate, nearest_others
from service.registry import RUNTIME, Change, Registry
from service.stores.base import ClassRow, ExampleRow

EXAMPLES = "examples"
SUFFIX = "+" + EXAMPLES
EncodeNames = Callable[[list[str], list[str] | None], Awaitable[np.ndarray]]
NEAR_QUANTILE = 0.99  # near-duplicate examples: cosine above 99 % of in-domain nearest-neighbour cosines
MAX_NEAR_SAMPLE = 2000  # sample images the near-duplicate threshold is derived from


@dataclass(frozen=True)
class ExampleLimits:
    """What one class and one request may hold, and the size an example is kept at."""

    per_class: int = 64  # examples stored per class, ever
    per_request: int = 256  # examples in one request, all classes together
    keep_side: int = 512  # long side of a kept example, pixels (larger ones are downscaled)
    keep_bytes: int = 256 * 1024  # a kept example's bytes at most (PNG if it fits, else JPEG)
    text_weight: float = 0.5  # a class with a name and examples: weight of the text vector


@dataclass
class NewClass:
    """One class of an add request: a name, whether the name is encoded as text, its examples."""

    name: str
    named: bool
    images: list[EncodedImage] = field(default_factory=list)


@dataclass(frozen=True)
class Added:
    """A committed change plus what the response reports per class."""

    change: Change
    provenance: list[str]
    examples: list[int]  # examples stored per class (after this change)
    gap: GapMode  # how prototypes crossed the modality gap
    replaced: int | None = None  # add_examples: the id the class had before
    quality: list[ClassCheck] = field(default_factory=list)  # add_classes: the quality check of the new classes


async def rebuilt_vector(
    classifier: Classifier, registry: Registry, gap: Gap, set_name: str, class_id: int, text: np.ndarray | None
) -> np.ndarray:
    """[D] a class's vector in the served space from its kept examples, combined with ``text`` (its name's
    vector there) when it has a name: the migration's rebuild. Examples embedded in another space are
    re-embedded by the served image tower and their new embeddings written back (one transaction per
    chunk), so a restart or a later ``add_examples`` reuses them instead of embedding them again."""
    store = registry.store
    kept = await asyncio.to_thread(store.examples, set_name, class_id)
    if not kept:
        raise InvalidInput(f"class {class_id} of {set_name!r} is made of examples but none is kept")
    emb = np.stack([e.embedding for e in kept]).astype(np.float32)  # [K, D]; rows of other spaces replaced below
    stale = [k for k, e in enumerate(kept) if e.space != store.space]
    chunk = classifier.settings.max_images_per_request
    for start in range(0, len(stale), chunk):
        rows = stale[start : start + chunk]
        deadline = asyncio.get_running_loop().time() + classifier.settings.request_timeout_s
        emb[rows] = await classifier.embed_images([EncodedImage(kept[k].data) for k in rows], deadline)
        await asyncio.to_thread(write_back, store, set_name, class_id, {kept[k].digest: emb[k] for k in rows})
    return class_vector(text, emb, gap, ExampleLimits().text_weight)


def write_back(store: Any, set_name: str, class_id: int, embeddings: dict[str, np.ndarray]) -> int:
    """Store re-embedded examples' embeddings (digest -> [D]) in the store's space; returns how many."""
    with store.transaction() as db:
        return int(store.put_example_embeddings(db, set_name, class_id, embeddings))


def near_duplicate_cosine(sample: np.ndarray | None, quantile: float = NEAR_QUANTILE) -> float | None:
    """The cosine at or above which two examples count as the same image (re-encoded, resized): the
    ``quantile`` of the sample's nearest-neighbour cosines (each in-domain image with its nearest *other*
    one), so about 1 - ``quantile`` of distinct in-domain images would be flagged against their nearest
    neighbour. None without a sample (then only identical bytes are refused)."""
    if sample is None or len(sample) < 2:
        return None
    _, nearest = nearest_others(normalise_rows(sample[:MAX_NEAR_SAMPLE]), k=1, rows=512)  # [M, 1]
    return float(np.quantile(nearest[:, 0], quantile))


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def image_sample(bundle: object) -> np.ndarray | None:
    """The bundle's calibration sample [M, D] (in-domain image embeddings), or None without one."""
    sample = getattr(bundle, "calibration", None)  # an optional bundle file (issue 22's calibration sample)
    return None if sample is None else np.asarray(sample.float().numpy(), dtype=np.float32)


def bundle_gap(class_vectors: Sequence[np.ndarray], sample: np.ndarray | None) -> Gap:
    """The text centroid of every class vector the bundle ships; the image centroid of its sample."""
    return Gap.between(np.concatenate([np.asarray(v, dtype=np.float32) for v in class_vectors]), sample)


class ExampleWriter:
    """Adds classes with examples, and examples to existing classes (see the module docstring)."""

    def __init__(
        self,
        classifier: Classifier,
        registry: Registry,
        gap: Gap,
        encode_names: EncodeNames,
        limits: ExampleLimits | None = None,
        gate: QualityGate | None = None,
        near_duplicate: float | None = None,
    ) -> None:
        self.near_duplicate = near_duplicate  # cosine of two examples counted as one image (near_duplicate_cosine)
        self.gate = gate  # the curator's quality check of new classes (service/quality.py); None: none
        self.classifier = classifier
        self.registry = registry
        self.gap = gap
        self.limits = limits or ExampleLimits()
        self._encode_names = encode_names

    @property
    def preprocess(self) -> ImagePreprocessor:
        return self.classifier.preprocess

    # ----------------------------------------------------------------- parsing
    def new_classes(
        self, names: Sequence[str], examples: dict[str, list[EncodedImage | str]], max_name_length: int
    ) -> list[NewClass]:
        """The request's classes, names first then example-only ones; checks counts, decodes base64."""
        named = set(names)
        images: dict[str, list[EncodedImage | str]] = {}
        for i, (raw, given) in enumerate(examples.items()):
            key = clean_name(raw, i, max_name_length)
            if key in images:
                raise DuplicateClass(f"examples: {key!r} is given twice")
            images[key] = given
        order = [*names, *[k for k in images if k not in named]]
        total = sum(len(v) for v in images.values())
        if total > self.limits.per_request:
            raise InvalidInput(f"examples: {total} images, at most {self.limits.per_request} per request")
        out = []
        for name in order:
            own = images.get(name)
            if own is not None and not own:
                raise InvalidInput(f"examples[{name!r}]: empty; give at least one image, or leave the class out")
            out.append(NewClass(name, name in named, self.decode(name, own or [])))
        if not out:
            raise InvalidInput("no classes: give 'names', 'examples' or both")
        for cls in out:
            self._check_count(cls.name, len(cls.images), 0)
            _no_repeats(cls.name, [_digest(im) for im in cls.images], [])
        return out

    def decode(self, name: str, images: Sequence[EncodedImage | str]) -> list[EncodedImage]:
        """base64 / data: URIs to bytes with classify's byte limit; errors name the class and example."""
        out = []
        for k, im in enumerate(images):
            if isinstance(im, EncodedImage):
                out.append(im)
                continue
            try:
                out.append(decode_base64_image(im, k, self.classifier.settings.max_image_bytes))
            except (BadImage, ImageTooLarge, InvalidInput) as e:
                raise _named(e, name, 0) from e
        return out

    def _check_count(self, name: str, new: int, stored: int) -> None:
        if stored + new > self.limits.per_class:
            raise InvalidInput(
                f"examples[{name!r}]: {stored} stored + {new} new, at most {self.limits.per_class} per class"
            )

    # ----------------------------------------------------------------- writes
    async def add_classes(
        self,
        set_name: str,
        classes: list[NewClass],
        templates: list[str] | None,
        *,
        skip_existing: bool = False,
        if_similar: str = "warn",
        is_disconnected: Disconnected | None = None,
    ) -> Added:
        """Add named, example-only and named+example classes in one commit (all or none), after the
        quality check every added class gets (``if_similar="error"``: a flagged class refuses the request)."""
        existing = await asyncio.to_thread(self.registry.existing, set_name, [c.name for c in classes])
        if existing and not skip_existing:
            raise DuplicateClass(f"label set {set_name!r} already has {sorted(existing)[:10]}")
        skipped = [c.name for c in classes if c.name in existing]
        classes = [c for c in classes if c.name not in existing]
        if not classes:
            snap = await asyncio.to_thread(self.registry.get, set_name)
            return Added(Change(snap, snap.version, [], [], skipped=skipped), [], [], self.gap.mode)
        deadline = asyncio.get_running_loop().time() + self.classifier.settings.request_timeout_s
        kept = [await self._embed_and_keep(c.name, c.images, deadline, is_disconnected) for c in classes]
        for cls, rows in zip(classes, kept, strict=True):
            self._no_near_repeats(cls.name, [r.embedding for r in rows], np.zeros((0, 0), np.float32))
        text_names = [c.name for c in classes if c.named]
        texts = await self._encode_names(text_names, templates) if text_names else np.zeros((0, 0), np.float32)
        text_of = dict(zip(text_names, texts, strict=True))
        vectors, provenance, text_vectors = [], [], []
        for cls, rows in zip(classes, kept, strict=True):
            text = text_of.get(cls.name)
            emb = np.stack([r.embedding for r in rows]) if rows else None  # [K, D]
            vectors.append(class_vector(text, emb, self.gap, self.limits.text_weight))
            provenance.append(EXAMPLES if text is None else RUNTIME + SUFFIX if rows else RUNTIME)
            text_vectors.append(text if rows else None)
        names = [c.name for c in classes]
        checks = []
        if self.gate is not None:
            current = await asyncio.to_thread(self.registry.get, set_name)
            checks = await self.gate.check(current, names, np.stack(vectors), if_similar)
        add = self.registry.add_vectors
        change = await asyncio.to_thread(add, set_name, names, np.stack(vectors), provenance, text_vectors, kept)
        change.skipped.extend(skipped)
        return Added(change, provenance, [len(k) for k in kept], self.gap.mode, quality=checks)

    async def add_examples(
        self,
        set_name: str,
        class_id: int,
        images: Sequence[EncodedImage | str],
        is_disconnected: Disconnected | None = None,
    ) -> Added:
        """More examples for an existing class: its vector is rebuilt from all of them (new id, same name)."""
        if not images:
            raise InvalidInput("examples: at least one image is required")
        if len(images) > self.limits.per_request:
            raise InvalidInput(f"examples: {len(images)} images, at most {self.limits.per_request} per request")
        row, stored_digests, stored = await asyncio.to_thread(self._class_state, set_name, class_id)
        example_only = row.provenance == EXAMPLES
        text = None if example_only else row.text_vector if row.text_vector is not None else row.vector
        if not example_only and text is None:
            raise StoreUnavailable(
                f"class {class_id} of {set_name!r} has no vector for this model yet (it is being encoded); retry later",
                retry_after_s=self.classifier.settings.retry_after_s,
            )
        decoded = self.decode(row.name, images)
        self._check_count(row.name, len(decoded), len(stored_digests))
        _no_repeats(row.name, [_digest(im) for im in decoded], stored_digests)
        deadline = asyncio.get_running_loop().time() + self.classifier.settings.request_timeout_s
        if len(stored) < len(stored_digests):  # kept examples embedded by another model: embed them again
            kept_before = await asyncio.to_thread(self.registry.store.examples, set_name, class_id)
            stored = await self._embed_only(
                row.name, [EncodedImage(e.data) for e in kept_before], deadline, is_disconnected
            )
            again = {e.digest: v for e, v in zip(kept_before, stored, strict=True)}
            await asyncio.to_thread(write_back, self.registry.store, set_name, class_id, again)
        kept = await self._embed_and_keep(row.name, decoded, deadline, is_disconnected)
        self._no_near_repeats(row.name, [k.embedding for k in kept], stored)
        emb = np.concatenate([stored, np.stack([k.embedding for k in kept])])  # [K, D]
        provenance = row.provenance if example_only or row.provenance.endswith(SUFFIX) else row.provenance + SUFFIX
        vector = class_vector(text, emb, self.gap, self.limits.text_weight)
        replace = self.registry.replace_class
        change = await asyncio.to_thread(replace, set_name, class_id, vector, provenance, text, kept)
        return Added(change, [provenance], [len(emb)], self.gap.mode, replaced=class_id)

    def _class_state(self, set_name: str, class_id: int) -> tuple[ClassRow, list[str], np.ndarray]:
        store = self.registry.store
        with store.read() as db:
            if store.version(set_name) is None:
                raise UnknownLabelSet(f"label set {set_name!r} does not exist; GET /v1/label-sets lists them")
            row = store.class_row(db, set_name, class_id)
            return row, store.example_digests(db, set_name, class_id), store.example_embeddings(db, set_name, class_id)

    async def _embed_and_keep(
        self, name: str, images: list[EncodedImage], deadline: float, is_disconnected: Disconnected | None
    ) -> list[ExampleRow]:
        """Embeddings through the image engine (classify's admission and limits), then the kept copies."""
        if not images:
            return []
        emb = await self._embed_only(name, images, deadline, is_disconnected)  # [K, D]
        kept = await asyncio.to_thread(
            lambda: [keep(im, self.preprocess, self.limits, k) for k, im in enumerate(images)]
        )
        return [ExampleRow(_digest(im), mime, data, e) for im, (mime, data), e in zip(images, kept, emb, strict=True)]

    async def _embed_only(
        self, name: str, images: list[EncodedImage], deadline: float, is_disconnected: Disconnected | None
    ) -> np.ndarray:
        """[K, D] through the image engine, in chunks of one classify request's images."""
        chunk = self.classifier.settings.max_images_per_request
        parts = []
        for start in range(0, len(images), chunk):
            try:
                parts.append(
                    await self.classifier.embed_images(images[start : start + chunk], deadline, is_disconnected)
                )
            except (BadImage, ImageTooLarge, InvalidInput) as e:
                raise _named(e, name, start) from e
        return np.concatenate(parts)

    def _no_near_repeats(self, name: str, new: Sequence[np.ndarray], stored: np.ndarray) -> None:
        """Refuse an example whose embedding is as close to an earlier one of the request's class, or to one
        stored for the class, as the same image re-encoded (cosine >= ``near_duplicate``); no check without
        a threshold (a bundle without a calibration sample)."""
        if self.near_duplicate is None or not new:
            return
        fresh = normalise_rows(np.stack(new))  # [K, D]
        kept = normalise_rows(stored) if len(stored) else np.zeros((0, fresh.shape[1]))
        for k in range(1 if not len(kept) else 0, len(fresh)):
            others = np.concatenate([fresh[:k], kept])  # [k + S, D]
            cos = others @ fresh[k]
            j = int(cos.argmax())
            if cos[j] >= self.near_duplicate:
                where = f"example {j} of the request" if j < k else "an example already stored for this class"
                raise DuplicateExample(
                    f"examples[{name!r}][{k}]: a near-duplicate of {where} (cosine {cos[j]:.5f} >= "
                    f"{self.near_duplicate:.5f}, the bundle's threshold for the same image re-encoded or resized)"
                )


def keep(
    image: EncodedImage, preprocess: ImagePreprocessor, limits: ExampleLimits, index: int = 0
) -> tuple[str, bytes]:
    """The copy of an example that is stored: RGB, long side <= ``keep_side``; PNG when it fits in
    ``keep_bytes``, else JPEG at the highest quality that fits."""
    from PIL import Image

    # the classify decode limits; JPEGs decoded at a DCT scale that still leaves keep_side pixels
    keeper = ImagePreprocessor(preprocess.cfg, preprocess.limits, limits.keep_side / max(preprocess.cfg.size))
    picture = keeper.decode(image, index).convert("RGB")
    picture.thumbnail((limits.keep_side, limits.keep_side), Image.Resampling.LANCZOS)
    tries: list[tuple[str, dict[str, Any]]] = [("PNG", {"optimize": True})]
    tries += [("JPEG", {"quality": q}) for q in (92, 85, 75, 60, 45)]
    for fmt, options in tries:
        buf = io.BytesIO()
        picture.save(buf, fmt, **options)
        if buf.tell() <= limits.keep_bytes:
            return f"image/{fmt.lower()}", buf.getvalue()
    raise ImageTooLarge(f"example {index}: cannot be kept within {limits.keep_bytes} bytes")  # unreachable at 512 px


def _digest(image: EncodedImage) -> str:
    return hashlib.sha256(image.data).hexdigest()


def _no_repeats(name: str, digests: list[str], stored: list[str]) -> None:
    seen = set(stored)
    for k, d in enumerate(digests):
        if d in seen:
            where = "is already stored for this class" if d in stored else "appears twice in the request"
            raise DuplicateExample(f"examples[{name!r}][{k}]: the same image {where}")
        seen.add(d)


def _named(e: ServiceError, name: str, offset: int) -> ServiceError:
    """The same refusal, naming the class and the example's position in its list."""
    msg = re.sub(r"^image (\d+)", lambda m: f"examples[{name!r}][{int(m[1]) + offset}]", e.message)
    if msg == e.message:
        msg = f"examples[{name!r}]: {e.message}"
    return type(e)(msg, headers=e.headers)

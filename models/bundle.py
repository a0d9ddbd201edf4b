"""Bundle format v1: the only artifact that passes from training to serving.

A bundle is a folder::

    manifest.json                  schema version, backbones, encoders, label sets, file hashes
    class_vectors.safetensors      one [N, D] float32 tensor per label set (rows in class order)
    prompts.safetensors            learned prompt rows: "image" [J, n, w], "text" [J, n, w]
    probes.safetensors             preprocessed probe images "pixels" [B, 3, H, W] (optional; models/precision.py)
    projector.safetensors          PromptKD projector state (optional)
    backbones/<key>.safetensors    embedded backbone weights (optional; required for random init)
    image_encoder.onnx[.data]      exported image tower (optional)
    calibration.safetensors        in-domain image embeddings "sample" [M, D] (optional; models/calibration.py)

``save_bundle`` stages everything next to the destination and moves the manifest in last
(:mod:`models.staging`), so a folder with a manifest is always complete. ``load_bundle``
validates everything it reads and raises a :class:`BundleError` subclass naming the exact
problem. Reading needs only ``models/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from models.backbone import PreprocessConfig, sha256_file
from models.staging import staged_dir

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CLASS_VECTORS = "class_vectors.safetensors"
PROBES = "probes.safetensors"
PROMPTS = "prompts.safetensors"
PROJECTOR = "projector.safetensors"
CALIBRATION = "calibration.safetensors"
MAX_CALIBRATION = 2000  # calibration vectors a bundle may hold (the service bounds its work by it)
DEFAULT_LABEL_SET = "default"


class BundleError(ValueError):
    """A bundle cannot be used; the message names the file and the problem."""


class BundleMissingFile(BundleError):
    """manifest.json or a file the manifest lists is absent."""


class BundleUnreadable(BundleError):
    """A bundle file or folder exists but this process may not read it (ownership / mode)."""


class BundleChecksumError(BundleError):
    """A file's sha256 differs from the manifest's."""


class BundleSchemaError(BundleError):
    """The manifest was written by a newer promptdistill, or is malformed."""


class BundleDimensionError(BundleError):
    """Tensor shapes disagree with the manifest or with each other."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneRef(_Model):
    """How to rebuild one backbone: open_clip config + weights reference."""

    name: str  # as the user gave it: architecture name, config path, local-dir:, hf-hub:
    open_clip_config: dict[str, Any]  # resolved model config (no external file needed)
    pretrained: str | None = None  # tag or original weights file path
    weights_file: str | None = None  # embedded weights, relative to the bundle (wins over pretrained)
    weights_sha256: str | None = None  # of the original weights file, where it was a file
    # "text": weights_file holds the text tower only (a text side's backbone; serving never runs
    # that backbone's image tower, so it does not travel)
    towers: Literal["image+text", "text"] = "image+text"


class PreprocessSpec(_Model):
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def to_config(self) -> PreprocessConfig:
        return PreprocessConfig(**self.model_dump())

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> PreprocessSpec:
        return cls(**cfg.__dict__)


class PromptSpec(_Model):
    n_tokens: int = 0
    depth: int = 1
    init: str | None = None  # text prompts only: the phrase row 0 started from


class ProjectorSpec(_Model):
    in_dim: int
    out_dim: int


class OnnxSpec(_Model):
    file: str  # relative path of the .onnx file
    data_file: str | None = None  # external weights written next to it, if any
    opset: int
    input_name: str = "pixels"
    output_name: str = "embedding"  # L2-normalised [B, embed_dim]
    max_abs_diff: float  # measured against torch at export time
    quantization: Literal["none", "dynamic-int8"] = "none"
    parity: dict[str, float] = Field(default_factory=dict)  # extra checks (top-1 agreement, ...)


class ParityFloor(_Model):
    """The least parity with the fp32 tower a reduced-precision image tower must show to be served.

    Measured on the bundle's probe images (models/precision.py); schema 1, additive.
    """

    cosine_min: float = 0.99  # smallest per-image cosine (reduced vs fp32 embedding)
    top1_agreement: float | None = None  # per shipped label set: fraction of probes keeping fp32's arg-max class


class ProbeSpec(_Model):
    """Stored probe images: what every reduced-precision tower is scored on against fp32."""

    file: str = PROBES  # one tensor "pixels" [n_images, 3, H, W] float32, preprocessed as the manifest says
    n_images: int = Field(ge=1)
    source: str  # where the images came from, e.g. "sample photos + mirror images"


class ImageEncoderSpec(_Model):
    backbone: str  # key into Manifest.backbones
    preprocess: PreprocessSpec
    prompts: PromptSpec = PromptSpec()
    projector: ProjectorSpec | None = None
    output_dim: int
    onnx: list[OnnxSpec] = Field(default_factory=list)
    probes: ProbeSpec | None = None  # optional: without it the gate scores the shipped sample photos
    parity_floors: dict[str, ParityFloor] = Field(default_factory=dict)  # fp16/bf16/int8 -> floor; absent: defaults


class TextEncoderSpec(_Model):
    """The text side: encodes a new class name exactly as the exporter encoded the stored ones."""

    backbone: str
    prompts: PromptSpec = PromptSpec()
    templates: list[str]  # each with one "{}"; class vector = normalised mean over templates
    output_dim: int


class ClassEntry(_Model):
    id: int
    name: str
    provenance: str = "bundle"  # e.g. "zeroshot", "promptkd:base", "promptkd:novel", "runtime"


class LabelSetSpec(_Model):
    name: str
    classes: list[ClassEntry]  # index order = row order of the class-vector tensor


class CalibrationSpec(_Model):
    """A bounded sample of in-domain image embeddings (the exporter's image tower), for calibration.

    Schema note: an optional, additive field of schema 1 (bundles without it load as before; the
    service then refuses calibrated requests with a 422). The file holds one tensor ``sample``
    [count, embed_dim], L2-normalised rows, stored as ``dtype``.
    """

    file: str = CALIBRATION
    count: int = Field(ge=1, le=MAX_CALIBRATION)
    dtype: Literal["float16", "float32"] = "float16"
    source: str  # where the images came from, e.g. "distillation: unlabeled train images"
    seed: int | None = None  # the draw of the sample from a larger pool, if any


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    producer: dict[str, str] = Field(default_factory=dict)  # method, promptdistill version, ...
    backbones: dict[str, BackboneRef]
    embed_dim: int  # dimension of class vectors and image embeddings
    logit_scale: float  # exp(logit_scale): softmax temperature multiplier (100 for OpenAI CLIP)
    image_encoder: ImageEncoderSpec
    text_encoder: TextEncoderSpec | None = None  # None: no runtime class addition possible
    label_sets: list[LabelSetSpec]
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256
    calibration: CalibrationSpec | None = None  # optional (see CalibrationSpec)
    extra: dict[str, Any] = Field(default_factory=dict)  # method-specific facts (metrics, configs)
    # The embedding space its class vectors live in (see bundle_space); set by exporters whose class
    # vectors come from another bundle (a PromptKD student: its teacher's). None: derived.
    space: str | None = None


@dataclass
class Bundle:
    """An in-memory bundle: manifest plus tensors. ``root`` is set when loaded from disk."""

    manifest: Manifest
    class_vectors: dict[str, torch.Tensor]  # label-set name -> [N, D]
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # "image"/"text" -> [J, n, w]
    projector: dict[str, torch.Tensor] | None = None
    backbone_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # to embed
    root: Path | None = None
    calibration: torch.Tensor | None = None  # [M, D] in-domain image embeddings (manifest.calibration)

    def path(self, relative: str) -> Path:
        if self.root is None:
            raise BundleError("bundle has no folder yet; save it first")
        return self.root / relative

    def label_set(self, name: str = DEFAULT_LABEL_SET) -> LabelSetSpec:
        for ls in self.manifest.label_sets:
            if ls.name == name:
                return ls
        raise KeyError(name)


def bundle_space(bundle: Bundle) -> str:
    """The identity of what makes a class vector comparable with this bundle's image embeddings.

    Two bundles of one space share class vectors: a re-distilled student, or an int8 / fp16 variant
    of a tower, serves the same vectors. It is the manifest's ``space`` when the exporter set it (a
    PromptKD student names its teacher's), else derived from what encodes a new name: the text side
    (its backbone's architecture and weights, its learned text prompts, its templates) and the
    embedding size; never the image tower. A bundle without a text side is its own class vectors.
    """
    m = bundle.manifest
    if m.space:
        return m.space
    h = hashlib.sha256(f"embed_dim={m.embed_dim}".encode())
    if m.text_encoder is None:
        h.update(f"class_vectors={m.files.get(CLASS_VECTORS, '')}".encode())
        return "vectors-" + h.hexdigest()[:16]
    ref = m.backbones[m.text_encoder.backbone]
    weights = ref.weights_sha256 or (m.files.get(ref.weights_file, "") if ref.weights_file else "") or ref.pretrained
    h.update(json.dumps([m.text_encoder.model_dump(), ref.open_clip_config, weights], sort_keys=True).encode())
    text = bundle.prompts.get("text")
    if text is not None:
        h.update(text.detach().float().contiguous().cpu().numpy().tobytes())
    return "text-" + h.hexdigest()[:16]


def save_bundle(
    bundle: Bundle,
    out_dir: str | Path,
    extra_files: dict[str, Path] | None = None,
    *,
    exports: Callable[[Path], dict[str, Path]] | None = None,
) -> Path:
    """Write ``bundle`` into ``out_dir`` (created; a bundle already there is replaced).

    Everything is staged in a hidden folder inside ``out_dir`` (same filesystem, whatever
    ``$TMPDIR`` is) and moved into place with ``manifest.json`` last (:func:`models.staging.staged_dir`):
    an interrupted write never leaves a folder that looks finished. Files follow the umask.

    Args:
        bundle: manifest + tensors. The manifest's ``files`` are recomputed here.
        out_dir: target folder.
        extra_files: relative path -> existing file to include (copied in).
        exports: called with the staging folder before the manifest is written; writes files
            there (ONNX graphs) and returns them as relative path -> path, like ``extra_files``.
    """
    out = Path(out_dir)
    _validate(bundle)
    with staged_dir(out, marker=MANIFEST, replaces=_previous_files(out)) as stage:
        extra = dict(extra_files or {})
        if exports is not None:
            extra |= exports(stage)
        manifest = _write_into(bundle, stage, extra)
    bundle.manifest, bundle.root = manifest, out
    return out


def _write_into(bundle: Bundle, stage: Path, extra_files: dict[str, Path]) -> Manifest:
    """Write tensors, carried-over files and (last) the manifest into the staging folder."""
    written: list[str] = [CLASS_VECTORS]
    vectors = {k: v.detach().float().contiguous().cpu() for k, v in bundle.class_vectors.items()}
    save_file(vectors, stage / CLASS_VECTORS)
    if bundle.prompts:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in bundle.prompts.items()}, stage / PROMPTS)
        written.append(PROMPTS)
    if bundle.projector is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in bundle.projector.items()}, stage / PROJECTOR)
        written.append(PROJECTOR)
    if bundle.calibration is not None and bundle.manifest.calibration is not None:
        spec = bundle.manifest.calibration
        dtype = torch.float16 if spec.dtype == "float16" else torch.float32
        save_file({"sample": bundle.calibration.detach().to(dtype).contiguous().cpu()}, stage / spec.file)
        written.append(spec.file)
    backbones = dict(bundle.manifest.backbones)
    for key, state in bundle.backbone_states.items():
        rel = f"backbones/{key}.safetensors"
        (stage / "backbones").mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, stage / rel)
        backbones[key] = backbones[key].model_copy(update={"weights_file": rel})
        written.append(rel)
    for rel, src in extra_files.items():
        if Path(src).resolve() != (stage / rel).resolve():
            copy_into(stage, Path(src), rel)
        written.append(rel)
    # Files a loaded bundle already had (embedded weights, ONNX graphs) travel with it.
    if bundle.root is not None:
        for rel in bundle.manifest.files:
            if rel not in written:
                copy_into(stage, bundle.root / rel, rel)
                written.append(rel)
    files = {rel: sha256_file(stage / rel) for rel in written}
    manifest = bundle.manifest.model_copy(update={"files": files, "backbones": backbones})
    (stage / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def _previous_files(out: Path) -> list[str]:
    """Files of the bundle ``out`` holds now (replaced by the new one); none if it holds none."""
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [rel for rel in files if isinstance(rel, str) and ".." not in Path(rel).parts]


def load_bundle(bundle_dir: str | Path, *, verify: bool = True) -> Bundle:
    """Read and validate a bundle folder.

    Raises:
        BundleMissingFile: no manifest, or a listed file is absent.
        BundleSchemaError: schema newer than this reader, or a malformed manifest.
        BundleChecksumError: a file's sha256 differs from the manifest (skipped if ``verify=False``).
        BundleDimensionError: tensor shapes disagree with the manifest.
        BundleUnreadable: a file or folder of the bundle may not be read by this user.
    """
    root = Path(bundle_dir)
    try:
        return _load(root, verify)
    except PermissionError as e:
        raise BundleUnreadable(unreadable_message(root, e)) from e


def unreadable_message(root: Path, e: OSError) -> str:
    """One line: which file, as whom, and how to fix it."""
    who = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    return (
        f"bundle {root}: cannot read {e.filename or root} ({e.strerror or e}) as {who}; make the bundle "
        f"readable for that user (chmod -R a+rX {root}) or re-export it with umask 022"
    )


def _load(root: Path, verify: bool) -> Bundle:
    manifest = read_manifest(root)
    for rel, digest in manifest.files.items():
        path = root / rel
        if not path.is_file():
            if path.parent.is_dir() and not os.access(path.parent, os.X_OK):
                raise PermissionError(13, "folder not searchable", str(path.parent))
            raise BundleMissingFile(f"bundle {root}: file {rel} listed in manifest.json is missing")
        if verify and sha256_file(path) != digest:
            raise BundleChecksumError(
                f"bundle {root}: {rel} is corrupted (sha256 differs from manifest.json); re-export the bundle"
            )
    if CLASS_VECTORS not in manifest.files:
        raise BundleSchemaError(f"bundle {root}: manifest lists no {CLASS_VECTORS}")
    bundle = Bundle(
        manifest=manifest,
        class_vectors=load_file(root / CLASS_VECTORS),
        prompts=load_file(root / PROMPTS) if PROMPTS in manifest.files else {},
        projector=load_file(root / PROJECTOR) if PROJECTOR in manifest.files else None,
        root=root,
        calibration=_load_calibration(root, manifest),
    )
    _validate(bundle)
    return bundle


def _load_calibration(root: Path, manifest: Manifest) -> torch.Tensor | None:
    spec = manifest.calibration
    if spec is None:
        return None
    if spec.file not in manifest.files:
        raise BundleSchemaError(f"bundle {root}: manifest names calibration file {spec.file} but does not list it")
    tensors = load_file(root / spec.file)
    if "sample" not in tensors:
        raise BundleSchemaError(f"bundle {root}: {spec.file} has no tensor 'sample'")
    return tensors["sample"].float()


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        # is_file() below would answer False and the error would wrongly say "missing"
        raise PermissionError(13, "folder not readable", str(root))
    if not path.is_file():
        hint = " (the folder does not exist)" if not root.exists() else ""
        raise BundleMissingFile(f"not a bundle: {path} is missing{hint}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleSchemaError(f"bundle {root}: manifest.json is not valid JSON: {e}") from e
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise BundleSchemaError(f"bundle {root}: manifest.json has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleSchemaError(
            f"bundle {root} has schema version {version}, newer than this reader "
            f"(supports <= {SCHEMA_VERSION}); upgrade promptdistill to read it"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise BundleSchemaError(f"bundle {root}: manifest.json is invalid: {e}") from e


def _validate(bundle: Bundle) -> None:
    """Cross-check tensors against the manifest."""
    m = bundle.manifest
    for ref_key in [m.image_encoder.backbone] + ([m.text_encoder.backbone] if m.text_encoder else []):
        if ref_key not in m.backbones:
            raise BundleSchemaError(f"encoder refers to backbone {ref_key!r}, not in backbones {list(m.backbones)}")
    if m.backbones[m.image_encoder.backbone].towers == "text":
        raise BundleSchemaError(f"the image encoder's backbone {m.image_encoder.backbone!r} holds no image tower")
    names = [ls.name for ls in m.label_sets]
    if len(set(names)) != len(names):
        raise BundleSchemaError(f"duplicate label-set names: {names}")
    for ls in m.label_sets:
        vec = bundle.class_vectors.get(ls.name)
        if vec is None:
            raise BundleMissingFile(f"class vectors for label set {ls.name!r} are missing from {CLASS_VECTORS}")
        if vec.ndim != 2 or vec.shape[0] != len(ls.classes) or vec.shape[1] != m.embed_dim:
            raise BundleDimensionError(
                f"label set {ls.name!r}: class vectors have shape {tuple(vec.shape)}, manifest says "
                f"[{len(ls.classes)}, {m.embed_dim}]"
            )
        ids = [c.id for c in ls.classes]
        if len(set(ids)) != len(ids):
            raise BundleSchemaError(f"label set {ls.name!r} has duplicate class ids")
    if m.image_encoder.output_dim != m.embed_dim:
        raise BundleDimensionError(f"image encoder output_dim {m.image_encoder.output_dim} != embed_dim {m.embed_dim}")
    if m.text_encoder is not None and m.text_encoder.output_dim != m.embed_dim:
        raise BundleDimensionError(f"text encoder output_dim {m.text_encoder.output_dim} != embed_dim {m.embed_dim}")
    _validate_calibration(bundle)
    proj = m.image_encoder.projector
    if proj is not None and proj.out_dim != m.embed_dim:
        raise BundleDimensionError(f"projector out_dim {proj.out_dim} != embed_dim {m.embed_dim}")
    if (proj is None) != (bundle.projector is None):
        raise BundleSchemaError("manifest projector spec and projector tensors must both be present or absent")
    for side, spec in (
        ("image", m.image_encoder.prompts),
        ("text", m.text_encoder.prompts if m.text_encoder else None),
    ):
        rows = bundle.prompts.get(side)
        want = spec is not None and spec.n_tokens > 0
        if want != (rows is not None):
            raise BundleSchemaError(f"{side} prompts: manifest and {PROMPTS} disagree about their presence")
        if rows is not None and spec is not None and tuple(rows.shape[:2]) != (spec.depth, spec.n_tokens):
            raise BundleDimensionError(
                f"{side} prompts have shape {tuple(rows.shape)}, "
                f"manifest says depth {spec.depth} x {spec.n_tokens} tokens"
            )


def _validate_calibration(bundle: Bundle) -> None:
    spec, sample = bundle.manifest.calibration, bundle.calibration
    if (spec is None) != (sample is None):
        raise BundleSchemaError("manifest calibration spec and calibration sample must both be present or absent")
    if spec is not None and sample is not None:
        want = (spec.count, bundle.manifest.embed_dim)
        if sample.ndim != 2 or tuple(sample.shape) != want:
            raise BundleDimensionError(
                f"calibration sample has shape {tuple(sample.shape)}, manifest says {list(want)}"
            )


def copy_into(bundle_dir: Path, src: Path, rel: str) -> str:
    """Copy a file into the bundle folder (a copy, not a link: its mode is then ours to set); returns ``rel``."""
    dst = bundle_dir / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return rel

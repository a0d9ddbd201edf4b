"""Everything the lifespan loads: bundle, encoders, engine, label-set registry (on ``app.state``)."""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from models.bundle import Bundle, BundleError, bundle_space, load_bundle
from models.card import bundle_version
from models.towers import TextSide, check_backbone_weights, needed_backbones
from service.admission import Admission, AdmissionCfg
from service.calibration import bundle_calibrator
from service.capture import Capture, CaptureCfg
from service.classifier import Classifier, PipelineHooks
from service.curator import Curator
from service.encoders import (
    ImageEncoder,
    OnnxImageEncoder,
    TorchImageEncoder,
    bundle_preprocessor,
    check_precision,
    cuda_wanted,
    onnx_graph,
)
from service.engine import Engine, EngineCfg
from service.errors import StartupError
from service.images import EncodedImage, ImageLimits, configure_pil
from service.index import SearchCfg, limit_blas_threads
from service.metrics import Metrics
from service.migration import Migrator, Rebuild
from service.quality import QualityGate
from service.registry import Registry, check_store_matches
from service.settings import Settings
from service.store import open_store
from service.text import TextTower

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    bundle: Bundle
    encoder: ImageEncoder
    text: TextTower
    registry: Registry
    engine: Engine[np.ndarray]
    classifier: Classifier
    curator: Curator
    migrator: Migrator
    metrics: Metrics
    probe: np.ndarray  # [1, 3, H, W] a fixed synthetic image for readiness checks
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    history: list[dict[str, str]] = field(default_factory=list)  # reloads: when, bundle, outcome

    @property
    def logit_scale(self) -> float:
        return float(self.bundle.manifest.logit_scale)

    def close(self) -> None:
        self.classifier.close()
        self.registry.store.close()


def load_checked_bundle(settings: Settings) -> Bundle:
    if settings.bundle is None:
        raise StartupError("no bundle given: pass --bundle DIR or set PROMPTDISTILL_BUNDLE")
    try:
        return load_bundle(settings.bundle, verify=True)
    except BundleError as e:
        raise StartupError(f"cannot serve bundle {settings.bundle}: {e}") from e


def resolve_backend(settings: Settings, bundle: Bundle) -> str:
    """``onnx`` or ``torch``: ``auto`` takes ONNX Runtime when the bundle has an ONNX graph (int8 is ONNX-only)."""
    if settings.backend != "auto":
        return settings.backend
    if settings.image_precision in ("fp16", "bf16"):  # torch-only precisions
        return "torch"
    if bundle.manifest.image_encoder.onnx or settings.image_precision == "int8":
        return "onnx"
    return "torch"


def preflight(settings: Settings) -> Bundle:
    """The start-up checks that need no model (bundle, image-encoder backend, device, state dir,
    label-set database of this bundle), run before any server starts; raises StartupError."""
    bundle = load_checked_bundle(settings)
    backend = resolve_backend(settings, bundle)
    check_precision(backend, settings.image_precision)
    onnx = backend == "onnx"
    if onnx:
        onnx_graph(bundle, settings.image_precision)
    try:
        check_backbone_weights(bundle, needed_backbones(bundle, image_tower=not onnx))
    except BundleError as e:
        raise StartupError(f"cannot serve bundle {settings.bundle}: {e}") from e
    cuda_wanted(settings.device)  # --device cuda without a CUDA device
    check_state_dir(settings.state_dir)
    store = open_store(settings, bundle.manifest.embed_dim, bundle_space(bundle))
    try:
        check_store_matches(store, bundle)
    finally:
        store.close()
    return bundle


def check_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` and prove we can write (and fsync) a file there."""
    hint = "choose a writable folder with --state-dir or PROMPTDISTILL_STATE_DIR"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".write-test-") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StartupError(f"state directory {state_dir} is not writable ({e.strerror or e}); {hint}") from e


def build_services(settings: Settings, metrics: Metrics) -> Services:
    """Load and check everything; raises :class:`StartupError` with what to fix. (Blocking.)"""
    bundle = load_checked_bundle(settings)
    check_state_dir(settings.state_dir)
    configure_pil(settings.max_image_pixels)
    device = "cuda" if cuda_wanted(settings.device) else "cpu"
    encoder, text_side = build_encoders(bundle, settings, device)
    spec = bundle.manifest.text_encoder
    text = TextTower(
        text_side,
        learned_prompts=bool(spec and spec.prompts.n_tokens > 0),
        max_candidate_prompts=settings.max_candidate_prompts,
        retry_after_s=settings.retry_after_s,
        hooks=metrics,
        on_call=metrics.text_call,
    )
    text.warm_up()
    store = open_store(settings, bundle.manifest.embed_dim, bundle_space(bundle))
    use_gpu = settings.faiss_gpu and device == "cuda"
    # FAISS threads are applied by the searching thread itself (OpenMP's setting is per thread).
    search = SearchCfg(settings.index_kind, settings.ivf_nprobe, use_gpu=use_gpu)
    limit_blas_threads(search.faiss_threads)
    registry = Registry(
        store,
        use_gpu=use_gpu,
        on_version=metrics.version,
        min_version_wait_s=settings.min_version_wait_s,
        search=search,
    )
    try:
        registry.open(bundle)
    except BaseException:
        store.close()
        raise
    metrics.info.labels(encoder.backend, encoder.provider).set(1)
    probe = encoder.preprocess.from_pil(probe_image())[None]  # [1, 3, H, W]
    admission = Admission(_admission_cfg(settings), *_service_times(encoder, probe))
    engine = image_engine(settings, encoder, PipelineHooks(metrics, admission))
    classifier = Classifier(
        settings,
        registry=registry,
        text=text,
        engine=engine,
        preprocess=encoder.preprocess,
        admission=admission,
        logit_scale=float(bundle.manifest.logit_scale),
        on_images=metrics.images.inc,
        model_version=bundle_version(bundle),
        calibration=bundle_calibrator(bundle),
        capture=Capture(capture_cfg(settings)),
    )
    log.info(
        "admission: %d images in flight at most (%s; %.1f ms per image)",
        admission.capacity,
        "max_images_in_flight" if settings.max_images_in_flight else f"target latency {settings.target_latency_s:g} s",
        1000 * admission.image_s,
    )
    curator = Curator(settings, registry, text, QualityGate(classifier.calibration.sample, classifier.logit_scale))
    migrator = Migrator(registry, text, _example_rebuild(bundle, classifier, registry))
    return Services(settings, bundle, encoder, text, registry, engine, classifier, curator, migrator, metrics, probe)


def _example_rebuild(bundle: Bundle, classifier: Classifier, registry: Registry) -> Rebuild:
    """How the migrator rebuilds a class made of examples in this bundle's space (service/examples.py)."""
    from service.examples import bundle_gap, image_sample, rebuilt_vector

    gap = bundle_gap([v.float().numpy() for v in bundle.class_vectors.values()], image_sample(bundle))
    return functools.partial(rebuilt_vector, classifier, registry, gap)


def capture_cfg(settings: Settings) -> CaptureCfg | None:
    if settings.capture_dir is None:
        return None
    return CaptureCfg(
        settings.capture_dir,
        settings.capture_rate,
        settings.capture_max_images,
        settings.capture_max_bytes,
        settings.capture_retention_days,
        settings.max_image_bytes,
    )


def image_engine(settings: Settings, encoder: ImageEncoder, hooks: PipelineHooks) -> Engine[np.ndarray]:
    """The image tower's batching engine (not started)."""
    cfg = EngineCfg(settings.max_batch_size, settings.max_wait_ms, retry_after_s=settings.retry_after_s)
    return Engine(encoder.encode, cfg, hooks)


def _admission_cfg(settings: Settings) -> AdmissionCfg:
    return AdmissionCfg(
        capacity=settings.max_images_in_flight,
        target_latency_s=settings.target_latency_s,
        deadline_s=settings.request_timeout_s,
        min_capacity=settings.decode_workers + 1,
        decode_workers=settings.decode_workers,
        retry_after_s=settings.retry_after_s,
    )


def _service_times(encoder: ImageEncoder, probe: np.ndarray) -> tuple[float, float]:
    """First estimates (seconds per image) of encoding and of decoding a typical photo, timed now."""
    encoder.encode(probe)  # warm-up: first runs allocate
    start = time.perf_counter()
    encoder.encode(probe)
    encode_s = time.perf_counter() - start
    buf = io.BytesIO()
    probe_image().resize((640, 480)).save(buf, "JPEG", quality=90)  # a typical upload
    start = time.perf_counter()
    encoder.preprocess(EncodedImage(buf.getvalue()))
    return encode_s, time.perf_counter() - start


def build_encoders(
    bundle: Bundle, settings: Settings, device: str, *, text: bool = True
) -> tuple[ImageEncoder, TextSide | None]:
    """The bundle's image encoder (ONNX Runtime or torch) and, with ``text``, its text side."""
    import torch

    from models.towers import build_image_tower, build_text_side, build_towers, load_bundle_backbone

    if settings.threads:
        torch.set_num_threads(settings.threads)
    m = bundle.manifest
    limits = ImageLimits(
        settings.max_image_bytes,
        settings.max_image_pixels,
        settings.min_image_side,
        settings.max_aspect_ratio,
        settings.max_decoded_mib * 1024 * 1024,
    )
    pre = bundle_preprocessor(bundle, limits)
    backend = resolve_backend(settings, bundle)
    if settings.backend == "auto":
        has = "has an ONNX image encoder" if m.image_encoder.onnx else "has no ONNX image encoder (export with --onnx)"
        log.info("backend auto: bundle %s %s -> %s", bundle.root, has, backend)
    if backend == "onnx":
        encoder: ImageEncoder = OnnxImageEncoder(
            bundle,
            pre,
            "cuda" if device == "cuda" else settings.device,
            settings.threads,
            settings.image_precision,
        )
        if m.text_encoder is None or not text:
            return encoder, None
        # ONNX runs the image side: the text tower alone is built and loaded
        backbone = load_bundle_backbone(bundle, m.text_encoder.backbone, device, text_only=True)
        return encoder, build_text_side(bundle, device, backbone)
    if not text:
        tower = build_image_tower(bundle, device, load_bundle_backbone(bundle, m.image_encoder.backbone, device))
        return TorchImageEncoder(bundle, tower, pre, device, settings.image_precision), None
    tower, side = build_towers(bundle, device)
    return TorchImageEncoder(bundle, tower, pre, device, settings.image_precision), side


def probe_image() -> Image.Image:
    """A deterministic colour gradient (no file needed)."""
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2.5, y * 2.5, (x + y) * 1.3], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)

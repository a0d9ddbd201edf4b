"""Everything the lifespan loads: bundle, encoders, engine, label-set registry (on ``app.state``)."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.bundle import Bundle, BundleError, load_bundle
from models.towers import TextSide, check_backbone_weights, needed_backbones
from service.admission import Admission, AdmissionCfg
from service.classifier import Classifier, PipelineHooks
from service.encoders import (
    ImageEncoder,
    OnnxImageEncoder,
    TorchImageEncoder,
    bundle_preprocessor,
    cuda_wanted,
    onnx_graph,
)
from service.engine import Engine, EngineCfg
from service.errors import StartupError
from service.images import EncodedImage, ImageLimits, configure_pil
from service.index import SearchCfg, limit_blas_threads
from service.metrics import Metrics
from service.registry import Registry, check_store_matches
from service.settings import Settings
from service.store import open_store
from service.text import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    bundle: Bundle
    encoder: ImageEncoder
    text: TextEncoder
    registry: Registry
    engine: Engine
    classifier: Classifier
    metrics: Metrics
    probe: np.ndarray  # [1, 3, H, W] a fixed synthetic image for readiness checks

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
    if bundle.manifest.image_encoder.onnx or settings.onnx_precision == "int8":
        return "onnx"
    return "torch"


def preflight(settings: Settings) -> Bundle:
    """The start-up checks that need no model (bundle, image-encoder backend, device, state dir,
    label-set database of this bundle), run before any server starts; raises StartupError."""
    bundle = load_checked_bundle(settings)
    onnx = resolve_backend(settings, bundle) == "onnx"
    if onnx:
        onnx_graph(bundle, settings.onnx_precision)
    try:
        check_backbone_weights(bundle, needed_backbones(bundle, image_tower=not onnx))
    except BundleError as e:
        raise StartupError(f"cannot serve bundle {settings.bundle}: {e}") from e
    cuda_wanted(settings.device)  # --device cuda without a CUDA device
    check_state_dir(settings.state_dir)
    store = open_store(settings, bundle.manifest.embed_dim)
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
    encoder, text_side = _encoders(bundle, settings, device)
    spec = bundle.manifest.text_encoder
    text = TextEncoder(
        text_side,
        learned_prompts=bool(spec and spec.prompts.n_tokens > 0),
        cache_size=settings.text_cache_size,
        on_call=metrics.text_call,
        chunk_prompts=settings.text_chunk_prompts,
    )
    store = open_store(settings, bundle.manifest.embed_dim)
    use_gpu = settings.faiss_gpu and device == "cuda"
    # FAISS threads are applied by the searching thread itself (OpenMP's setting is per thread).
    search = SearchCfg(settings.index_kind, settings.ivf_nprobe, settings.faiss_threads, use_gpu)
    limit_blas_threads(settings.faiss_threads)
    registry = Registry(
        store,
        text,
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
    probe = encoder.preprocess.from_pil(_probe_image())[None]  # [1, 3, H, W]
    admission = Admission(_admission_cfg(settings, encoder.lanes), *_service_times(encoder, probe))
    engine = Engine(
        encoder.encode,
        EngineCfg(settings.max_batch_size, settings.max_wait_ms, lanes=encoder.lanes),
        PipelineHooks(metrics, admission),
        encoder.encode_lane,
    )
    classifier = Classifier(
        settings,
        registry=registry,
        text=text,
        engine=engine,
        preprocess=encoder.preprocess,
        admission=admission,
        logit_scale=float(bundle.manifest.logit_scale),
        on_images=metrics.images.inc,
    )
    log.info(
        "admission: %d images in flight at most (%s; %.1f ms per image)",
        admission.capacity,
        "queue_size" if settings.queue_size else f"target latency {settings.target_latency_s:g} s",
        1000 * admission.image_s,
    )
    return Services(settings, bundle, encoder, text, registry, engine, classifier, metrics, probe)


def _admission_cfg(settings: Settings, lanes: int) -> AdmissionCfg:
    return AdmissionCfg(
        capacity=settings.queue_size,
        target_latency_s=settings.target_latency_s,
        deadline_s=settings.request_timeout_s,
        min_capacity=settings.decode_workers + lanes,
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
    _probe_image().resize((640, 480)).save(buf, "JPEG", quality=90)  # a typical upload
    start = time.perf_counter()
    encoder.preprocess(EncodedImage(buf.getvalue()))
    return encode_s, time.perf_counter() - start


def _encoders(bundle: Bundle, settings: Settings, device: str) -> tuple[ImageEncoder, TextSide | None]:
    import torch

    from models.towers import build_text_side, build_towers, load_bundle_backbone

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
    pre = bundle_preprocessor(bundle, limits, settings.jpeg_draft_factor)
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
            settings.onnx_precision,
            encoder_lanes(settings),
        )
        if m.text_encoder is None:
            return encoder, None
        # ONNX runs the image side: the text tower alone is built and loaded
        backbone = load_bundle_backbone(bundle, m.text_encoder.backbone, device, text_only=True)
        return encoder, build_text_side(bundle, device, backbone)
    tower, side = build_towers(bundle, device)
    return TorchImageEncoder(tower, pre, device), side


def encoder_lanes(settings: Settings) -> int:
    """Side-by-side single-thread encoder runs: the setting, else one per thread the encoder may use."""
    if settings.encoder_lanes is not None:
        return settings.encoder_lanes
    return settings.threads or len(os.sched_getaffinity(0))


def _probe_image() -> Image.Image:
    """A deterministic colour gradient (no file needed)."""
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2.5, y * 2.5, (x + y) * 1.3], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)

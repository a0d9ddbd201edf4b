"""Hot swap of the image tower: ``SIGHUP`` or ``POST /v1/admin/reload`` re-reads the configured bundle.

No path ever comes with the request: only ``--bundle`` (a folder, or a symlink the operator switched)
is opened again. The new bundle must be of the served embedding space (a re-distilled student, an
int8 or fp16 variant: the stored class vectors stay valid). Its image tower loads and warms up beside
the old one, on its own batching engine; then one step on the event loop points the classifier and
the readiness probe at it, so every request that already took the old tower finishes on it while
new ones take the new; the old engine then drains and stops. A bundle that fails to load, has
another embedding size or space, or answers the probe badly leaves the old one serving and says why
(the response, the log, ``/readyz`` and ``GET /v1/model``'s history); so does a reload while another
runs, or while class vectors are being encoded for the served space.

With ``serve --workers N`` every worker swaps its own tower: the supervisor forwards SIGHUP to each
worker (service/workers.py), and a worker that swapped on ``POST /v1/admin/reload`` then signals the
supervisor so that the others follow (to itself the bundle it already serves is "unchanged").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import UTC, datetime

import numpy as np

from models.bundle import Bundle, bundle_space
from models.card import bundle_version
from service.calibration import bundle_calibrator
from service.classifier import PipelineHooks
from service.errors import BadBundle, ReloadRefused, StartupError
from service.state import Services, build_encoders, image_engine, load_checked_bundle, probe_image

log = logging.getLogger(__name__)


class Reloader:
    """One reload at a time per process; a second one meanwhile is refused (409), never queued."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._lock = asyncio.Lock()

    async def reload(self, trigger: str) -> dict[str, str]:
        """Swap in the bundle at the configured path; returns the history entry (raises on refusal)."""
        if self._lock.locked():
            log.warning("reload (%s) refused: a reload is already running", trigger)
            raise ReloadRefused("a reload is already running; try again when it has finished")
        async with self._lock:
            try:
                self._not_migrating()
                entry = await self._swap(trigger)
            except (BadBundle, ReloadRefused) as e:
                self._record(trigger, "refused", e.message)
                log.error("reload (%s) refused, the old bundle keeps serving: %s", trigger, e.message)
                raise
            return entry

    def tell_workers(self) -> str:
        """``serve --workers N``: after this worker swapped, ask the supervisor (gunicorn's arbiter, our
        parent) to forward SIGHUP to every worker, so that all N serve the new tower; returns a note."""
        workers = self.services.settings.workers
        if workers <= 1:
            return ""
        os.kill(os.getppid(), signal.SIGHUP)
        return (
            f"; the other {workers - 1} worker(s) were signalled and swap too (each logs its outcome; "
            "GET /v1/model names the worker that answers)"
        )

    def _not_migrating(self) -> None:
        """Classes still being encoded (service/migration.py) would be encoded by one tower and served by
        another halfway: the swap waits until the served space is complete."""
        encoding = self.services.migrator.status()
        if encoding:
            raise ReloadRefused(f"{encoding}; reload when that has finished (/readyz then lists no 'vectors')")

    async def _swap(self, trigger: str) -> dict[str, str]:
        s = self.services
        bundle = await asyncio.to_thread(self._load)
        if bundle_version(bundle) == s.classifier.model_version:  # e.g. a SIGHUP forwarded to every worker
            return self._record(trigger, "unchanged", "the configured bundle is the one serving")
        device = "cuda" if s.encoder.provider.endswith("cuda") or "CUDA" in s.encoder.provider else "cpu"
        try:
            encoder, _ = await asyncio.to_thread(build_encoders, bundle, s.settings, device, text=False)
        except (StartupError, ValueError, OSError, RuntimeError) as e:
            raise BadBundle(f"bundle {s.settings.bundle}: its image tower cannot be loaded: {e}") from e
        probe = encoder.preprocess.from_pil(probe_image())[None]  # [1, 3, H, W]
        emb = await asyncio.to_thread(encoder.encode, probe)  # warm-up and check, before anything swaps
        norm = float(np.linalg.norm(emb[0])) if emb.shape == (1, bundle.manifest.embed_dim) else -1.0
        if abs(norm - 1.0) > 1e-3:
            raise BadBundle(f"bundle {s.settings.bundle}: its image tower answered the probe badly (norm {norm:.4f})")
        calibrator = await asyncio.to_thread(bundle_calibrator, bundle)
        old = s.engine
        engine = image_engine(s.settings, encoder, PipelineHooks(s.metrics, s.classifier.admission))
        engine.start()
        # One synchronous step on the event loop: requests that took the old tower keep it.
        s.bundle, s.encoder, s.engine, s.probe = bundle, encoder, engine, probe
        s.classifier.engine, s.classifier.preprocess = engine, encoder.preprocess
        s.classifier.model_version = bundle_version(bundle)
        s.classifier.calibration = calibrator  # the sample is the new tower's own image embeddings
        s.loaded_at = _now()
        entry = self._record(trigger, "swapped", f"image tower {encoder.backend} ({encoder.provider})")
        log.info("reload (%s): bundle %s now serves; draining the old image tower", trigger, s.settings.bundle)
        await s.classifier.retire(old, s.settings.graceful_shutdown_s)
        return entry

    def _load(self) -> Bundle:
        s = self.services
        try:
            bundle = load_checked_bundle(s.settings)
        except StartupError as e:
            raise BadBundle(str(e)) from e
        if bundle.manifest.embed_dim != s.bundle.manifest.embed_dim:
            raise BadBundle(
                f"bundle {s.settings.bundle} has embeddings of size {bundle.manifest.embed_dim}, the served one "
                f"{s.bundle.manifest.embed_dim}: a bundle of another embedding space needs a restart (the stored "
                "classes are then encoded in its space, and the old space's vectors are kept)"
            )
        space, served = bundle_space(bundle), s.registry.store.space
        if space != served:
            raise ReloadRefused(
                f"bundle {s.settings.bundle} is of embedding space {space}, the served one {served} (another "
                "teacher or text side): restart the service with it; the stored classes are then encoded in its "
                "space in the background, and the old space's vectors are kept for a rollback"
            )
        return bundle

    def _record(self, trigger: str, outcome: str, detail: str) -> dict[str, str]:
        entry = {
            "at": _now(),
            "trigger": trigger,
            "outcome": outcome,
            "detail": detail,
            "bundle": str(self.services.settings.bundle),
        }
        self.services.history.append(entry)
        del self.services.history[:-20]  # the last 20 reloads
        return entry


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

"""The aspect-ratio amplifier (issue 10): a 7 KB 16 x 2,400,000 1-bit PNG against ``promptdistill serve``.

For the tiny bundle (64 px) and a random ViT-B-32 zero-shot bundle (224 px), with the default
settings (the aspect-ratio cap refuses it from the header) and with the cap lifted (the crop-box
preprocessing decodes it and answers): wall time of the answer and growth of the server's peak
RSS (VmHWM) over a warmed-up server. BENCHMARKS.md gives the figures before the pipeline redesign.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.harness import ServerProcess
from bench.http_load import build_bundle, jpegs
from service.client import ServiceClientError

log = logging.getLogger(__name__)


def _strip() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (16, 2_400_000)).save(buf, "PNG")
    return buf.getvalue()


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _measure(bundle: Path, tmp: Path, env: dict[str, str], image: bytes, cfg: BenchCfg) -> dict[str, Any]:
    tag = f"{bundle.name}-{len(env)}"  # a state dir per bundle and setting: databases belong to one bundle
    with (
        ServerProcess.serve(bundle, tmp / f"state-{tag}", env=env, threads=cfg.threads) as server,
        server.client(retries=0, timeout_s=300.0) as client,
    ):
        client.classify_bytes([jpegs()[0]], top_k=5)  # warm-up with a real photo
        before = _hwm_mib(server.pid)
        t0 = time.perf_counter()
        status, detail = 200, None
        try:
            client.classify_bytes([image], top_k=5)
        except ServiceClientError as e:
            status, detail = e.status, e.detail
        seconds = time.perf_counter() - t0
        growth = _hwm_mib(server.pid) - before
        return {"status": status, "seconds": seconds, "peak_rss_growth_mib": growth, "detail": detail}


def run(cfg: BenchCfg) -> dict[str, Any]:
    data = _strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-hostile-") as tmp:
        for arch in (str(TINY_CONFIG), "ViT-B-32"):
            bundle = cached_bundle(arch)
            for label, env in (("default", {}), ("cap lifted", {"PROMPTDISTILL_MAX_ASPECT_RATIO": "1000000000"})):
                r = _measure(bundle, Path(tmp), env, data, cfg)
                r.update({"bundle": Path(arch).stem, "settings": label})
                log.info("%s", r)
                results.append(r)
    payload = {
        "input": f"16 x 2,400,000 1-bit PNG, {len(data)} bytes, base64 JSON",
        "goal": "< 100 MB peak RSS growth and < 1 s, tiny and 224 px bundles",
        "results": results,
    }
    write_result("hostile", payload, cfg)
    return payload


def cached_bundle(arch: str) -> Path:
    """One random-weight zero-shot bundle per architecture for this machine's benchmark runs (read-only reuse)."""
    out = Path(tempfile.gettempdir()) / "promptdistill-bench-bundles" / Path(arch).stem
    if not (out / "manifest.json").is_file():
        build_bundle(arch, out)
    return out

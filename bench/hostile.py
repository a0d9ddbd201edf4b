"""The aspect-ratio amplifier (issue 10): a 7 KB 16 x 2,400,000 1-bit PNG against ``promptdistill serve``.

For the tiny bundle (64 px) and a random ViT-B-32 zero-shot bundle (224 px), with the default
settings (the aspect-ratio cap refuses it from the header) and with the cap lifted (the crop-box
preprocessing decodes it and answers): wall time of the answer and growth of the server's peak
RSS (VmHWM) over a warmed-up server. Before the pipeline redesign the same request cost +3.7 GB
and 12-60 s on the tiny bundle (red-team figures in the issue).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.http_load import Server, _payloads, build_bundle, request

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


def _measure(bundle: Path, tmp: Path, env: dict[str, str], body: bytes, cfg: BenchCfg) -> dict[str, Any]:
    tag = f"{bundle.name}-{len(env)}"  # a state dir per bundle and setting: databases belong to one bundle
    server = Server(bundle, tmp / f"state-{tag}", cfg.threads, tmp / f"server-{tag}.log", env)
    try:
        server.wait_ready()
        request(server.port, "POST", "/v1/classify", _payloads()[0])  # warm-up with a real photo
        before = _hwm_mib(server.proc.pid)
        t0 = time.perf_counter()
        status, data = request(server.port, "POST", "/v1/classify", body)
        seconds = time.perf_counter() - t0
        growth = _hwm_mib(server.proc.pid) - before
        detail = json.loads(data).get("detail") if status != 200 else None
        return {"status": status, "seconds": seconds, "peak_rss_growth_mib": growth, "detail": detail}
    finally:
        server.stop()


def run(cfg: BenchCfg) -> dict[str, Any]:
    data = _strip()
    body = json.dumps({"images": [base64.b64encode(data).decode()], "top_k": 5}).encode()
    results = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-hostile-") as tmp:
        for arch in (str(TINY_CONFIG), "ViT-B-32"):
            bundle = cached_bundle(arch)
            for label, env in (("default", {}), ("cap lifted", {"PROMPTDISTILL_MAX_ASPECT_RATIO": "1000000000"})):
                r = _measure(bundle, Path(tmp), env, body, cfg)
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

"""``python -m bench capture``: issue 23's serving figures (capture of classified images, promotion).

* ``throughput``: servers of the tiny bundle, capture off, on at the default rate and on at rate
  1.0, measured in alternated rounds (off, default, 1.0; the next round starts one further) by the same closed-loop
  clients; every request carries a distinct image (a photo with its request number appended after
  the JPEG's end: decoders ignore it, its hash differs), so capture writes a new file for each sample.
  Figure: throughput with capture on over off, per round and over all rounds [goal >= 0.95x]; a second
  server with capture off runs in the same rotation as a control (its ratio is the noise floor).
* ``failures``: capture at rate 1.0 into a folder that cannot take the files: a read-only folder (the
  server runs without CAP_DAC_OVERRIDE when this runs as root, so the mode bits hold), a
  ``capture_max_bytes`` cap that fills after a few images, a file-size limit (RLIMIT_FSIZE set on the
  running server: every capture write fails with EFBIG, what a full disk's ENOSPC does to the same
  code path; a full filesystem itself needs a mount this machine does not allow), and a path that is
  a file. Figures: classify failures [goal 0]; what ``/readyz`` and the metrics say.
* ``promotion``: 16 closed-loop clients classify with capture on; ``promptdistill shadow`` compares a
  same-space candidate with the serving bundle on the held-out captures, then ``promptdistill promote
  --url`` swaps it in and ``promote --rollback`` swaps back, both inside one load window (the result
  says whether they finished inside it). Figure: requests failed [goal 0].

``BENCH_CAPTURE_PARTS=throughput,failures`` runs some parts. ``--quick``: tiny sizes.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import REPO, TINY_CONFIG, BenchCfg, photo_jpegs, write_result
from bench.harness import Classify, ServerProcess, Window, closed_loop, metrics
from bench.hostile import cached_bundle
from bench.lifecycle import _variant
from service.client import Client

log = logging.getLogger(__name__)
PARTS = ("throughput", "failures", "promotion")
CLIENTS = 16
DEFAULT_RATE = 0.1  # service/settings.py's capture_rate default


class Distinct(Classify):
    """One image per request, each one distinct: the i-th photo with ``i`` (and a run tag) after its end."""

    def __init__(self, url: str, images: list[bytes], tag: bytes) -> None:
        super().__init__(url, images)
        self.tag = tag

    def __call__(self, i: int) -> Any:
        data = self.images[i % len(self.images)] + self.tag + i.to_bytes(8, "big")
        return self.client.classify_bytes([data])


class Unprivileged(ServerProcess):
    """The server without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH when this runs as root (mode bits then hold)."""

    def start(self) -> ServerProcess:
        if os.geteuid() == 0 and shutil.which("setpriv") and self.cmd[0] != "setpriv":
            self.cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *self.cmd]
        return super().start()


def _serve(bundle: Path, state: Path, cfg: BenchCfg, cls: type[ServerProcess] = ServerProcess, **settings: Any) -> Any:
    env = {f"PROMPTDISTILL_{k.upper()}": str(v) for k, v in settings.items()}
    server = cls.serve(bundle, state, "--api-key", "k", env=env, threads=cfg.threads)
    return server


def _capture_state(url: str) -> dict[str, Any]:
    """``/readyz``'s capture check (probe JSON: the project's client only reads its status) and the metrics."""
    import httpx2

    ready = httpx2.get(url + "/readyz", timeout=30.0)
    m = metrics(url, "promptdistill_capture_")
    return {"readyz": ready.json()["checks"]["capture"], "readyz_status": ready.status_code, "metrics": m}


def throughput_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    images = photo_jpegs(32, (320, 240))
    rounds = 1 if cfg.quick else 6  # many short rounds: a shared machine's load drifts within minutes
    window = Window(1.0, 2.0) if cfg.quick else Window(2.0, 6.0)
    configs: dict[str, dict[str, Any]] = {
        "off": {},
        "off (control: a second server, the same)": {},
        f"rate {DEFAULT_RATE} (default)": {"capture_dir": tmp / "tp-default", "capture_rate": DEFAULT_RATE},
        "rate 1.0": {"capture_dir": tmp / "tp-all", "capture_rate": 1.0},
    }
    servers = {name: _serve(bundle, tmp / f"tp-state-{i}", cfg, **s) for i, (name, s) in enumerate(configs.items())}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()
        names = list(servers)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts with another one
                server = servers[name]
                tag = f"/{r}/{name}/".encode()
                res = closed_loop(partial(Distinct, server.url, images, tag), CLIENTS, window=window)
                res["capture"] = _capture_state(server.url)
                runs[name].append(res)
                log.info("round %d %s: %.1f req/s, errors %s", r + 1, name, res["throughput_rps"], res["errors"])
    finally:
        for server in servers.values():
            server.stop()
    off = [x["throughput_rps"] for x in runs["off"]]
    out: dict[str, Any] = {"clients": CLIENTS, "rounds": rounds, "window_s": [window.warm_up_s, window.measure_s]}
    out["configs"] = {}
    for name, rs in runs.items():
        rps = [x["throughput_rps"] for x in rs]
        out["configs"][name] = {
            "throughput_rps": rps,
            "errors": sum(sum(x["errors"].values()) for x in rs),
            "p50_ms": [x["p50_ms"] for x in rs],
            "p99_ms": [x["p99_ms"] for x in rs],
            "over_off_rounds": [a / b for a, b in zip(rps, off, strict=True)],
            "over_off": sum(rps) / sum(off),
            "over_off_median_round": statistics.median(a / b for a, b in zip(rps, off, strict=True)),
            "captured_images": rs[-1]["capture"]["metrics"].get("images"),
            "skipped_writer_behind": rs[-1]["capture"]["metrics"].get("skipped"),
            "capture_at_end": rs[-1]["capture"]["readyz"],
        }
    return out


def _failure_case(
    name: str, server: ServerProcess, images: list[bytes], cfg: BenchCfg, setup: Any = None
) -> dict[str, Any]:
    with server:
        if setup is not None:
            setup(server)
        res = closed_loop(
            lambda: Distinct(server.url, images, name.encode()), CLIENTS, requests=60 if cfg.quick else 600
        )
        deadline = time.monotonic() + 30
        state = _capture_state(server.url)
        while "stopped" not in state["readyz"] and time.monotonic() < deadline:
            time.sleep(0.1)
            state = _capture_state(server.url)
    out = {"requests": res["ok"] + sum(res["errors"].values()), "failed": sum(res["errors"].values()),
           "errors": res["errors"], "throughput_rps": res["throughput_rps"], **state}  # fmt: skip
    log.info("failures %s: %s", name, {k: v for k, v in out.items() if k != "metrics"})
    return out


def failures_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    images = photo_jpegs(16, (320, 240))
    cases: dict[str, Any] = {}
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    state = tmp / "ro-state"
    state.mkdir()
    server = _serve(bundle, state, cfg, Unprivileged, capture_dir=ro, capture_rate=1.0)
    cases["read-only folder"] = _failure_case("read-only", server, images, cfg)
    cases["read-only folder"]["privileges"] = "setpriv without CAP_DAC_OVERRIDE" if os.geteuid() == 0 else "user"
    cases["read-only folder"]["files_written"] = sum(1 for p in ro.rglob("*") if p.is_file())
    ro.chmod(0o755)
    server = _serve(bundle, tmp / "cap-state", cfg, capture_dir=tmp / "capped", capture_rate=1.0,
                    capture_max_bytes=2**20)  # fmt: skip
    cases["capture_max_bytes reached (1 MiB)"] = _failure_case("cap", server, images, cfg)

    def limit(server: ServerProcess) -> None:  # every capture is larger than this: each write fails (EFBIG)
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (4096, 4096))

    server = _serve(bundle, tmp / "fsize-state", cfg, capture_dir=tmp / "fsize", capture_rate=1.0)
    server.log = Path(os.devnull)  # its log is a file too: the limit would cut it
    cases["file-size limit (RLIMIT_FSIZE 4 KiB: EFBIG)"] = _failure_case("fsize", server, images, cfg, limit)
    not_a_folder = tmp / "a-file"
    not_a_folder.write_text("x")
    server = _serve(bundle, tmp / "file-state", cfg, capture_dir=not_a_folder, capture_rate=1.0)
    cases["path is a file"] = _failure_case("file", server, images, cfg)
    return {"clients": CLIENTS, "cases": cases, "failed_total": sum(c["failed"] for c in cases.values())}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "promptdistill", *args], capture_output=True, text=True, env=env)


def promotion_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    images = photo_jpegs(32, (320, 240))
    link = tmp / "current"
    link.symlink_to(bundle)
    candidate = _variant(bundle, tmp / "candidate", other_space=False)
    folder = tmp / "promo-captures"
    out: dict[str, Any] = {"clients": CLIENTS}
    server = _serve(link, tmp / "promo-state", cfg, capture_dir=folder, capture_rate=1.0)
    with server:
        first = closed_loop(lambda: Distinct(server.url, images, b"seed"), CLIENTS, requests=200 if cfg.quick else 600)
        out["capture_traffic"] = {"requests": first["ok"], "failed": sum(first["errors"].values())}
        shadow = _cli("shadow", "--teacher", str(bundle), "--serving", str(link), "--candidate", str(candidate),
                      "--images", str(folder))  # fmt: skip
        if shadow.returncode != 0:
            raise RuntimeError(f"shadow failed: {shadow.stderr}")
        report = json.loads(shadow.stdout)
        out["shadow"] = {"images": report["images"], "students_disagree": report["students_disagree"]}
        steps: dict[str, Any] = {}
        load_s = 90.0 if cfg.quick else 150.0  # long enough for both CLI runs (each starts a Python + torch)
        start = time.perf_counter()

        def promote_then_roll_back() -> None:
            for name, args in (("promote", ["--candidate", str(candidate)]), ("rollback", ["--rollback"])):
                time.sleep(5.0)
                t0 = time.perf_counter()
                p = _cli("promote", "--link", str(link), *args, "--url", server.url, "--api-key", "k")
                steps[name] = {"rc": p.returncode, "seconds": time.perf_counter() - t0, "stderr": p.stderr[-300:],
                               "done_at_s": time.perf_counter() - start}  # fmt: skip

        stepper = threading.Thread(target=promote_then_roll_back)
        stepper.start()
        load = closed_loop(lambda: Distinct(server.url, images, b"promo"), CLIENTS, window=Window(0.0, load_s))
        stepper.join()
        steps["within_load"] = all(steps[k]["done_at_s"] < load_s for k in ("promote", "rollback"))
        with Client(server.url, timeout_s=30.0) as c:
            history = c.model()["reloads"]
    out |= {"steps": steps, "during": {k: load[k] for k in ("ok", "errors", "throughput_rps", "p50_ms", "p99_ms")}}
    out["failed_requests"] = sum(load["errors"].values())
    out["reloads"] = [h.get("outcome") for h in history]
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    parts = os.environ.get("BENCH_CAPTURE_PARTS", ",".join(PARTS)).split(",")
    bundle = cached_bundle(str(TINY_CONFIG))
    result: dict[str, Any] = {"bundle": "tiny zero-shot (models/configs/tiny-clip.json)"}
    with tempfile.TemporaryDirectory(prefix="pd-bench-capture-") as name:
        tmp = Path(name)
        for part, fn in (("throughput", throughput_part), ("failures", failures_part), ("promotion", promotion_part)):
            if part in parts:
                result[part] = fn(bundle, tmp, cfg)
                log.info("%s: %s", part, json.dumps(result[part], default=str)[:2000])
    write_result("capture", result, cfg)
    return result

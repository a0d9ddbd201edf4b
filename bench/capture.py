"""``python -m bench capture``: issue 23's serving figures (capture of classified images, promotion).

* ``throughput``: per capture rate (the default, 0.1, 1.0) one server of the tiny bundle; in it, blocks
  of requests that opt out (``"capture": false``: nothing of them is kept, capture costs them nothing)
  alternate with blocks that do not, ABBA in each round, sent by the same closed-loop clients; every
  request carries a distinct image (a photo with its request number appended after the JPEG's end:
  decoders ignore it, its hash differs), so capture writes a new file for each sample. Figure:
  throughput captured over opted out, mean over rounds with a 95 % bootstrap interval [goal >= 0.95x
  at the default rate]; the control is the second opted-out block over the first (the noise floor).
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
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, TINY_CONFIG, BenchCfg, photo_jpegs, write_result
from bench.harness import Classify, ServerProcess, Window, closed_loop, metrics
from bench.hostile import cached_bundle
from bench.lifecycle import _variant
from service.client import Client
from service.settings import Settings

log = logging.getLogger(__name__)
PARTS = ("throughput", "failures", "promotion")
CLIENTS = 16
DEFAULT_RATE = float(Settings.model_fields["capture_rate"].default)


class Distinct(Classify):
    """One image per request, each one distinct: the i-th photo with ``i`` (and a run tag) after its end;
    ``capture`` False: every request opts out (the server keeps none of it); None: the field is not sent."""

    def __init__(self, url: str, images: list[bytes], tag: bytes, capture: bool | None = None) -> None:
        super().__init__(url, images)
        self.tag = tag
        self.params = {} if capture is None else {"capture": capture}

    def __call__(self, i: int) -> Any:
        data = self.images[i % len(self.images)] + self.tag + i.to_bytes(8, "big")
        return self.client.classify_bytes([data], **self.params)


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


def _mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and a 95 % bootstrap interval of the mean (seeded: the same rounds give the same interval)."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(0)
    means = rng.choice(x, size=(5000, len(x))).mean(axis=1)
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "sd": sd, "rounds": [float(v) for v in x]}  # fmt: skip


def throughput_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    """Per capture rate, one server; inside it, blocks of requests that opt out (the server keeps
    nothing of them: capture's cost is absent) against blocks that do not, in ABBA order per round.

    One process serves both sides: separate capture-off and capture-on servers differed from process
    to process by more than the effect measured (BENCHMARKS.md); ABBA cancels a drift that is linear
    within the round.
    """
    images = photo_jpegs(32, (320, 240))
    rounds, block = (1, 100) if cfg.quick else (12, 500)
    rates = {f"rate {DEFAULT_RATE} (default)": DEFAULT_RATE, "rate 0.1": 0.1, "rate 1.0": 1.0}
    out: dict[str, Any] = {"clients": CLIENTS, "rounds": rounds, "block_requests": block, "configs": {}}
    for i, (name, rate) in enumerate(rates.items()):
        server = _serve(bundle, tmp / f"tp-state-{i}", cfg, capture_dir=tmp / f"tp-{i}", capture_rate=rate)
        on_over_off, a_over_a, rps_off, rps_on = [], [], [], []
        try:
            server.start()
            server.wait_ready()
            for r in range(rounds):
                got = []
                for k, capture in enumerate((False, True, True, False)):  # A B B A
                    make = partial(Distinct, server.url, images, f"/{i}/{r}/{k}/".encode(), capture)
                    res = closed_loop(make, CLIENTS, requests=block)
                    if sum(res["errors"].values()):
                        raise RuntimeError(f"{name}: classify errors {res['errors']}")
                    got.append(res["throughput_rps"])
                off, on = (got[0] + got[3]) / 2, (got[1] + got[2]) / 2
                rps_off.append(off)
                rps_on.append(on)
                on_over_off.append(on / off)
                a_over_a.append(got[3] / got[0])
                log.info("%s round %d: opted out %.1f, captured %.1f req/s: %.3fx", name, r + 1, off, on, on / off)
            state = _capture_state(server.url)
        finally:
            server.stop()
        out["configs"][name] = {
            "rate": rate,
            "rps_opted_out": rps_off,
            "rps_captured": rps_on,
            "over_off": _mean_ci(on_over_off),
            "control_a_over_a": _mean_ci(a_over_a),
            "captured_images": state["metrics"].get("images"),
            "skipped_writer_behind": state["metrics"].get("skipped"),
            "capture_at_end": state["readyz"],
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

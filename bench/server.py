"""``python -m bench server``: the HTTP layer under slow clients and at SIGTERM, and supervised workers.

Three measurements against ``promptdistill serve`` child processes on the tiny bundle (the encoder's
speed does not matter here), written to ``server.json``:

* ``slow_clients``: 64 slowloris and 64 slow-body connections, each trickling a byte every 0.3 s,
  against 2 s header/body deadlines: how long after its deadline each connection is closed (goal:
  all within 1 s), and what normal clients see meanwhile compared with alone.
* ``sigterm``: rounds of fresh classify requests plus the next request on kept-alive connections, all
  sent just before SIGTERM, against ``promptdistill serve`` and against plain uvicorn serving the same
  app: resets among connections that were accepted (goal: 0).
* ``workers``: starts of ``serve --workers 3`` under a CPU burner (load >= 3): worker boots and timeout
  kills read from gunicorn's log (goal: 3 boots, 0 restarts per start); then ``kill -9`` of the
  supervisor and the time until no worker is alive (goal: < 2 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.burner import cpu_burn
from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.harness import ServerProcess, free_port
from bench.server_clients import drain_round, normal_traffic, slow_connections

log = logging.getLogger(__name__)
DEADLINE_S = 2.0
N_SLOW = 128
WORKERS = 3


def child(bundle: Path, state: Path, *args: str, env: dict[str, str], plain: bool = False) -> ServerProcess:
    """``promptdistill serve`` (or plain uvicorn serving the same app factory) on a free loopback port, started."""
    serve = ServerProcess.serve(bundle, state, *args, env=env)
    if not plain:
        return serve.start()
    port = free_port()  # uvicorn's own CLI, same app factory: what `serve` was before service/server.py
    cmd = [sys.executable, "-m", "uvicorn", "service.app:create_app_from_env", "--factory", "--port", str(port)]
    env = {**serve.env, "PROMPTDISTILL_BUNDLE": str(bundle), "PROMPTDISTILL_STATE_DIR": str(state)}
    return ServerProcess(cmd, port, state.with_name(f"{state.name}-uvicorn.log"), env).start()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pct(values: list[float], q: float) -> float | None:
    return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None


def bench_slow_clients(bundle: Path, work: Path) -> dict[str, Any]:
    env = {"PROMPTDISTILL_HEADER_TIMEOUT_S": str(DEADLINE_S), "PROMPTDISTILL_BODY_TIMEOUT_S": str(DEADLINE_S)}
    server = child(bundle, work / "state-slow", env=env)
    try:
        server.wait_ready(300.0)
        alone = normal_traffic(server.url, seconds=5.0)
        stop, during = threading.Event(), {}
        thread = threading.Thread(target=lambda: during.update(normal_traffic(server.url, stop=stop)))
        thread.start()
        load = os.getloadavg()[0]
        lateness = slow_connections(server.port, N_SLOW, DEADLINE_S, give_up_s=60.0)
        stop.set()
        thread.join(timeout=120)
    finally:
        server.kill()
    closed = [x for x in lateness if x is not None]
    return {
        "deadline_s": DEADLINE_S,
        "connections": N_SLOW,
        "closed": len(closed),
        "late_max_s": round(max(closed), 3) if closed else None,
        "late_median_s": round(statistics.median(closed), 3) if closed else None,
        "all_within_1s": len(closed) == N_SLOW and max(closed) <= 1.0,
        "normal_alone": alone,
        "normal_during": during,
        "load_1min_at_attack": round(load, 2),
    }


def bench_sigterm(bundle: Path, work: Path, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("serve", "plain uvicorn"):
        totals = {"answered": 0, "refused with 429/503": 0, "refused": 0, "reset": 0, "no answer": 0}
        loads = []
        for r in range(rounds):
            state = work / f"state-term-{kind.split()[0]}-{r}"
            server = child(bundle, state, env={}, plain=kind != "serve")
            try:
                server.wait_ready(300.0)
                loads.append(round(os.getloadavg()[0], 2))
                for key, n in drain_round(server.port, partial(server.signal, signal.SIGTERM)).items():
                    totals[key] = totals.get(key, 0) + n
                server.wait(120)
            finally:
                server.kill()
        out[kind] = {**totals, "rounds": rounds, "load_1min": loads}
    return out


def bench_workers(bundle: Path, work: Path, starts: int) -> dict[str, Any]:
    runs = []
    with cpu_burn(3, max_s=1800):
        time.sleep(5)  # let the burners lift the load average before the first start (it is a 1-min mean)
        for i in range(starts):
            state = work / f"state-workers-{i}"
            server = child(bundle, state, "--workers", str(WORKERS), env={})
            load = os.getloadavg()[0]
            try:
                ready_s = server.wait_ready(300.0)  # 200 only once every worker serves
                text = server.output(10**7)
                pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", text)]
                server.kill()  # the supervisor only
                killed = time.monotonic()
                while any(_alive(p) for p in pids) and time.monotonic() - killed < 30:
                    time.sleep(0.01)
                gone_s = time.monotonic() - killed
                runs.append(
                    {
                        "load_1min": round(load, 2),
                        "ready_s": round(ready_s, 2),
                        "boots": len(pids),
                        "restarts": len(pids) - WORKERS,
                        "timeout_kills": text.count("WORKER TIMEOUT"),
                        "workers_gone_s": round(gone_s, 3),
                        "orphans": sum(_alive(p) for p in pids),
                    }
                )
                log.info("workers start %d: %s", i, runs[-1])
            finally:
                server.kill()
    return {
        "workers": WORKERS,
        "starts": runs,
        "restarts_total": sum(r["restarts"] + r["timeout_kills"] for r in runs),
        "orphans_total": sum(r["orphans"] for r in runs),
        "workers_gone_max_s": max(r["workers_gone_s"] for r in runs),
        "min_load_1min": min(r["load_1min"] for r in runs),
    }


def _tiny_bundle(out: Path) -> Path:
    import torch

    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    names = ["cat", "dog", "astronaut", "coffee cup", "rocket", "flower"]
    build_zeroshot_bundle(str(TINY_CONFIG), None, names, named_templates("simple"), out, onnx=True, progress=False)
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    """All three parts; ``BENCH_SERVER_PARTS=workers`` (comma-separated) runs some of them and keeps the
    other parts of an existing server.json, so the long workers part can run on its own."""
    parts = os.environ.get("BENCH_SERVER_PARTS", "slow_clients,sigterm,workers").split(",")
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(tmp)
        bundle = _tiny_bundle(work / "bundle")
        result: dict[str, Any] = {}
        if "slow_clients" in parts:
            result["slow_clients"] = bench_slow_clients(bundle, work)
        if "sigterm" in parts:
            result["sigterm"] = bench_sigterm(bundle, work, rounds=1 if cfg.quick else 3)
        if "workers" in parts:
            result["workers"] = bench_workers(bundle, work, starts=2 if cfg.quick else 10)
    previous = cfg.out_dir / "server.json"
    if previous.is_file():  # parts not run this time keep their last measurement (each has its own load)
        old = json.loads(previous.read_text())
        result = {**{k: old[k] for k in ("slow_clients", "sigterm", "workers") if k in old}, **result}
    write_result("server", result, cfg)
    return result

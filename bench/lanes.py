"""``python -m bench lanes``: do the encoder lanes earn their place (issue 20, item 3)?

Our server in three configurations, on the same ViT-B/32 bundle and JPEGs as ``bench peers``
(its steady-state levels, c = 1 / 4 / 16, clients honour ``Retry-After``): ``lanes_on`` (the
defaults: one lane per thread), ``lanes_off`` (``PROMPTDISTILL_ENCODER_LANES=1``) and ``workers_2``
(``serve --workers 2``, one thread and one lane each). Rounds run back to back, the configurations'
order rotated each round so that none always runs first. The rule: keep the lanes only if, at a
level, their median beats both others' medians by more than the rounds' spread (max - min of the
per-round throughputs, the larger of the two systems compared).
"""

from __future__ import annotations

import logging
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.harness import Classify, ServerProcess
from bench.http_load import build_bundle, jpegs
from bench.peers import _levels, median_levels

log = logging.getLogger(__name__)

ROUNDS = 3
CONFIGS: dict[str, tuple[int, dict[str, str], tuple[str, ...]]] = {  # threads, environment, serve arguments
    "lanes_on": (2, {}, ()),
    "lanes_off": (2, {"PROMPTDISTILL_ENCODER_LANES": "1"}, ()),
    "workers_2": (1, {"PROMPTDISTILL_ENCODER_LANES": "1"}, ("--workers", "2")),
}


def one_run(name: str, bundle: Path, tmp: Path, images: list[bytes], cfg: BenchCfg) -> list[dict[str, Any]]:
    threads, env, args = CONFIGS[name]
    with ServerProcess.serve(bundle, tmp / f"state-{name}", *args, env=env, threads=threads) as server:
        return _levels(partial(Classify, server.url, images, top_k=5), cfg)


def verdict(systems: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per level: the lanes' margin over each other system, that pair's spread, and whether they beat it."""
    out: dict[str, Any] = {}
    for i, lv in enumerate(systems["lanes_on"]):
        mine = lv["rounds_throughput_rps"]
        row: dict[str, Any] = {"lanes_on_median": lv["throughput_rps"]}
        for other in ("lanes_off", "workers_2"):
            theirs = systems[other][i]["rounds_throughput_rps"]
            spread = max(max(mine) - min(mine), max(theirs) - min(theirs))
            margin = float(np.median(mine) - np.median(theirs))
            row[other] = {"median": float(np.median(theirs)), "margin": margin, "spread": spread,
                          "lanes_beat_it": margin > spread}  # fmt: skip
        row["lanes_beat_both"] = row["lanes_off"]["lanes_beat_it"] and row["workers_2"]["lanes_beat_it"]
        out[str(lv["concurrency"])] = row
    out["keep_lanes"] = all(out[c]["lanes_beat_both"] for c in ("4", "16"))  # c=1: a lone image uses every thread
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else "ViT-B-32"
    images = jpegs()
    rounds = 1 if cfg.quick else ROUNDS
    per_round: list[dict[str, Any]] = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="pd-bench-lanes-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = build_bundle(arch, tmp / "bundle")
        names = list(CONFIGS)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            entry: dict[str, Any] = {"order": order}
            for name in order:
                log.info("round %d of %d: %s", r + 1, rounds, name)
                entry[name] = one_run(name, bundle, tmp, images, cfg)
            per_round.append(entry)
    systems = {name: median_levels([entry[name] for entry in per_round]) for name in CONFIGS}
    result = {
        "model": f"{'tiny' if cfg.quick else 'ViT-B-32'}, random init (seed 0), ONNX fp32, 100 classes",
        "configs": {name: {"threads": t, "env": e, "args": list(a)} for name, (t, e, a) in CONFIGS.items()},
        "rounds": per_round,
        "systems": systems,
        "verdict": verdict(systems),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    log.info("verdict: %s", result["verdict"])
    write_result("lanes", result, cfg)
    return result

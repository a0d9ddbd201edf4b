"""``promptdistill experiment capture-loop --out DIR``: distil on your own traffic, end to end, on Fashion-MNIST.

Per seed:

1. The Fashion-MNIST experiment's PromptKD recipe (training/fashion.py: its pre-trained tiny CLIPs, its
   PromptSRC teacher, its student) distils a student on ``train_per_class`` x 10 unlabeled train images
   (1,000 by default). That student serves: ``promptdistill serve --bundle DIR/seedN/serving`` (a symlink),
   capture on (``capture_rate``, a folder of its own).
2. ``traffic`` *other* train images (never in the first pool; the same ones for every seed) are sent as
   classify requests by ``clients`` closed-loop clients; the service captures them.
3. Re-distillation: the first student's own run config, with ``data.capture_dir`` the capture folder
   (its training part; the held-out tenth is never read), from the same pre-trained student backbone.
4. Shadow evaluation (training/shadow.py) of the candidate against the serving student on the held-out
   captures, written into the candidate's model card.
5. Promotion under load: ``promptdistill promote --link ... --url ...`` while ``clients`` clients keep
   classifying; the served model version is read back.

Figures, serving student before vs after (the same test subsample, the distillation run's own
evaluation): teacher top-1 agreement on the test images, base / novel / HM; mean ± sample std over the
seeds and the paired differences; requests failed during traffic and promotion.
Outputs: ``DIR/summary.json``, ``DIR/table.md``; each seed's runs, captures and server log under ``DIR/seedN/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from training.config import Cfg, DataCfg
from training.evaluate import mean_std, save_json
from training.variants import FASHION_MNIST_ROOT

log = logging.getLogger(__name__)
METRICS = ("agreement", "base", "novel", "hm")


class CaptureLoopCfg(Cfg):
    root: Path = FASHION_MNIST_ROOT
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    train_per_class: int = Field(default=100, ge=16)  # the first student's unlabeled pool (x 10 classes)
    test_per_class: int | None = Field(default=None, ge=1)  # None: all 1,000 per class
    traffic: int = Field(default=5000, ge=10)  # other train images sent as traffic (the issue: 20,000)
    capture_rate: float = Field(default=1.0, gt=0, le=1)
    clients: int = Field(default=16, ge=1)
    server_threads: int = Field(default=2, ge=1)
    promotion_seconds: float = Field(default=20.0, gt=0)
    # FashionCfg fields to override (training/fashion.py: epochs of its stages, ...), e.g. {"distill_epochs": 5}
    fashion: dict[str, Any] = Field(default_factory=dict)


def _fashion_cfg(cfg: CaptureLoopCfg) -> Any:
    from training.fashion import FashionCfg

    raw = {"root": cfg.root, "seeds": cfg.seeds, "train_per_class": cfg.train_per_class,
           "test_per_class": cfg.test_per_class, "progress": False, **cfg.fashion}  # fmt: skip
    return FashionCfg.model_validate(raw)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def traffic_images(cfg: CaptureLoopCfg, size: int, pool: list[Any]) -> list[bytes]:
    """``cfg.traffic`` train images (PNG) that are not in the first student's pool, a fixed random draw."""
    from training.variants import fashion_mnist_split

    seen = {hashlib.sha256(im.tobytes()).digest() for im in pool}
    images, _ = fashion_mnist_split(cfg.root, "train", size)
    others = [i for i, im in enumerate(images) if hashlib.sha256(im.tobytes()).digest() not in seen]
    if len(others) < cfg.traffic:
        raise ValueError(f"only {len(others)} train images are outside the first pool; traffic={cfg.traffic}")
    return [_png(images[i]) for i in sorted(random.Random(0).sample(others, cfg.traffic))]


def _wait_for_captures(url: str, timeout_s: float = 300.0) -> float:
    """Until the capture writer has caught up (its count unchanged for 2 s); the count."""
    from bench.harness import metrics

    last, since = -1.0, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = metrics(url, "promptdistill_capture_").get("images", 0.0)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 2.0:
            break
        time.sleep(0.2)
    return last


def _row(results: dict[str, Any]) -> dict[str, float]:
    return {"agreement": 100.0 * float(results["agreement"]["after"]),
            **{k: float(results["last"][k]) for k in ("base", "novel", "hm")}}  # fmt: skip


def _promote_under_load(
    server: Any, link: Path, candidate: Path, images: list[bytes], cfg: CaptureLoopCfg
) -> dict[str, Any]:
    from bench.harness import Classify, Window, closed_loop
    from promptdistill.cli import main

    load: dict[str, Any] = {}

    def clients() -> None:
        load.update(
            closed_loop(lambda: Classify(server.url, images), cfg.clients, window=Window(0, cfg.promotion_seconds))
        )

    t = threading.Thread(target=clients)
    t.start()
    time.sleep(cfg.promotion_seconds / 3)
    t0 = time.perf_counter()
    rc = main(["promote", "--link", str(link), "--candidate", str(candidate), "--url", server.url, "--api-key", "k"])
    seconds = time.perf_counter() - t0
    t.join()
    return {"rc": rc, "seconds": seconds, "requests": load["ok"] + sum(load["errors"].values()),
            "failed": sum(load["errors"].values()), "throughput_rps": load["throughput_rps"],
            "p99_ms": load["p99_ms"]}  # fmt: skip


def one_seed(
    seed: int, out: Path, cfg: CaptureLoopCfg, fcfg: Any, bbs: tuple[Any, Any], traffic: list[bytes]
) -> dict[str, Any]:
    from bench.harness import Classify, ServerProcess, closed_loop
    from models.bundle import load_bundle
    from models.card import bundle_version
    from service.client import Client
    from training.config import load_config
    from training.distill import DistillRunConfig, run_distill
    from training.fashion import _promptkd
    from training.shadow import shadow, write_into_card
    from training.teacher import teacher_bundle_dir

    teacher_bb, student_bb = bbs
    t0 = time.perf_counter()
    _, first = _promptkd(teacher_bb, student_bb, fcfg, seed, out)  # out/teacher, out/student
    seconds = {"first distillation": time.perf_counter() - t0}
    link, captures = out / "serving", out / "captures"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(first["bundle"]).resolve())
    env = {"PROMPTDISTILL_CAPTURE_DIR": str(captures), "PROMPTDISTILL_CAPTURE_RATE": str(cfg.capture_rate)}
    server = ServerProcess.serve(link, out / "state", "--api-key", "k", env=env, threads=cfg.server_threads,
                                 log=out / "server.log")  # fmt: skip
    with server:
        t0 = time.perf_counter()
        sent = closed_loop(lambda: Classify(server.url, traffic), cfg.clients, requests=len(traffic))
        kept = _wait_for_captures(server.url)
        seconds["traffic"] = time.perf_counter() - t0
        log.info("seed %d: %d requests (%s failed), %d images captured", seed, sent["ok"], sent["errors"], kept)
        t0 = time.perf_counter()
        rcfg = load_config(DistillRunConfig, out / "student" / "config.yaml")
        rcfg = rcfg.model_copy(update={"out_dir": out / "redistilled",
                                       "data": rcfg.data.model_copy(update={"capture_dir": captures})})  # fmt: skip
        again = run_distill(DistillRunConfig.model_validate(rcfg.model_dump()), student=student_bb)
        seconds["re-distillation"] = time.perf_counter() - t0
        candidate = Path(again["bundle"])
        report = shadow(teacher_bundle_dir(out / "teacher"), link, candidate, captures)
        write_into_card(candidate, report)
        promotion = _promote_under_load(server, link, candidate, traffic[: 4 * cfg.clients], cfg)
        with Client(server.url) as c:
            served = c.model()["loaded"]["version"]
    return {
        "seed": seed,
        "before": _row(first),
        "after": _row(again),
        "traffic": {
            "requests": sent["ok"] + sum(sent["errors"].values()),
            "failed": sum(sent["errors"].values()),
            "throughput_rps": sent["throughput_rps"],
            "captured": kept,
        },
        "captures_read": again.get("captures"),
        "n_unlabeled": {"before": first["n_unlabeled_images"], "after": again["n_unlabeled_images"]},
        "shadow": {k: report[k] for k in ("images", "serving", "candidate", "students_disagree")},
        "promotion": promotion,
        "serving_after_promotion_is_candidate": served == bundle_version(load_bundle(candidate)),
        "seconds": seconds,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for k in METRICS:
        before, after = [r["before"][k] for r in runs], [r["after"][k] for r in runs]
        b, a = mean_std(before), mean_std(after)
        delta = mean_std([y - x for x, y in zip(before, after, strict=True)])
        spread = max(b["std"], a["std"])
        table[k] = {"before": b, "after": a, "delta": delta, "seed_spread": spread, "up_by_more_than_spread":
                    a["mean"] - b["mean"] > spread}  # fmt: skip
    return table


def format_table(table: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    names = {"agreement": "teacher agreement", "base": "base", "novel": "novel", "hm": "HM"}
    lines = [f"| serving student (%, mean ± std over {len(runs)} seeds) | before | after | after - before "
             "(paired) | up by more than the seed spread |", "|---|---|---|---|---|"]  # fmt: skip
    for k, r in table.items():
        cells = [f"{r[x]['mean']:.2f} ± {r[x]['std']:.2f}" for x in ("before", "after", "delta")]
        lines.append(f"| {names[k]} | " + " | ".join(cells) + f" | {'yes' if r['up_by_more_than_spread'] else 'no'} |")
    return "\n".join(lines) + "\n"


def pretrain_cfg(cfg: CaptureLoopCfg) -> Any:
    """The Fashion-MNIST experiment's pre-training: its tiny CLIPs on *all* train images (the fixed starting
    point, the same cache as ``promptdistill experiment fashion-mnist``), whatever the loop's own pools."""
    return _fashion_cfg(cfg).model_copy(update={"train_per_class": None})


def _backbones(cfg: CaptureLoopCfg) -> tuple[int, Any, tuple[Any, Any]]:
    """Image size, the benchmark (train / test subsamples) and the pre-trained (teacher, student) CLIPs
    (training/fashion.py's, from its cache: :func:`pretrain_cfg`)."""
    from models.backbone import configured_image_size
    from training.benchmark import load_benchmark
    from training.fashion import STUDENT_CONFIG, TEACHER_CONFIG, pretrained

    pcfg = pretrain_cfg(cfg)
    size = configured_image_size(str(STUDENT_CONFIG)) or 32
    data = DataCfg(kind="fashion_mnist", root=cfg.root, subsample_train=cfg.train_per_class,
                   subsample_test=cfg.test_per_class)  # fmt: skip
    bench = load_benchmark(data, image_size=size)
    bbs = (pretrained(TEACHER_CONFIG, None, pcfg, what="teacher"),
           pretrained(STUDENT_CONFIG, None, pcfg, what="student"))  # fmt: skip
    return size, bench, bbs


def run_capture_loop(out: str | Path, cfg: CaptureLoopCfg | None = None) -> dict[str, Any]:
    cfg = cfg or CaptureLoopCfg()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fcfg = _fashion_cfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Fashion experiment: a tiny model trains fastest on one thread
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        size, bench, bbs = _backbones(cfg)
        traffic = traffic_images(cfg, size, bench.train_items)
        for seed in cfg.seeds:
            runs.append(one_seed(seed, out / f"seed{seed}", cfg, fcfg, bbs, traffic))
            log.info("capture loop seed %d: before %s after %s", seed, runs[-1]["before"], runs[-1]["after"])
            _write(out, cfg, runs, time.perf_counter() - t0)  # partial results survive
    finally:
        torch.set_num_threads(threads)
    return _write(out, cfg, runs, time.perf_counter() - t0)


def steps_control(out: str | Path) -> dict[str, Any]:
    """On a finished run's folder: per seed, the first student's config on its own 1,000 images with the
    epochs scaled by (images after / images before), i.e. about the re-distillation's optimiser steps
    without the captures. Separates "more in-domain images" from "more steps"; ``DIR/steps_control.json``."""
    from training.config import load_config
    from training.distill import DistillRunConfig, run_distill

    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    cfg = CaptureLoopCfg.model_validate(summary["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        _, _, (_, student_bb) = _backbones(cfg)
        for run in summary["runs"]:
            d = out / f"seed{run['seed']}"
            first = load_config(DistillRunConfig, d / "student" / "config.yaml")
            epochs = round(first.optim.epochs * run["n_unlabeled"]["after"] / run["n_unlabeled"]["before"])
            # evaluated at its last epoch only: the "last" figures compared here do not depend on it
            ccfg = first.model_copy(update={"out_dir": d / "steps-control",
                                            "optim": first.optim.model_copy(update={"epochs": epochs}),
                                            "loop": first.loop.model_copy(update={"eval_every": epochs})})  # fmt: skip
            res = run_distill(DistillRunConfig.model_validate(ccfg.model_dump()), student=student_bb)
            rows.append({"seed": run["seed"], "epochs": epochs, "before": run["before"], "after": run["after"],
                         "steps_control": _row(res)})  # fmt: skip
            save_json({"runs": rows}, out / "steps_control.json")
    finally:
        torch.set_num_threads(threads)
    return {"runs": rows}


def _write(out: Path, cfg: CaptureLoopCfg, runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    table = summarise(runs)
    summary = {"config": cfg.model_dump(mode="json"), "table": table, "runs": runs, "seconds": seconds,
               "failed_requests": sum(r["traffic"]["failed"] + r["promotion"]["failed"] for r in runs),
               "load_average_at_end": list(os.getloadavg())}  # fmt: skip
    save_json(summary, out / "summary.json")
    (out / "table.md").write_text(format_table(table, runs))
    return summary


# ----------------------------------------------------------------- CLI
def cli(args: Any) -> int:
    """`promptdistill experiment capture-loop` (its arguments: training/cli.py)."""
    import sys

    if args.steps_control:
        for r in steps_control(args.out)["runs"]:
            sys.stdout.write(f"seed {r['seed']}: {r['epochs']} epochs on the first images: {r['steps_control']}\n")
        return 0

    fields = ("root", "seeds", "train_per_class", "test_per_class", "traffic", "capture_rate")
    raw = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    try:
        cfg = CaptureLoopCfg.model_validate(raw | {"fashion": json.loads(args.fashion)})
    except ValueError as e:  # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
        sys.stderr.write(f"promptdistill experiment capture-loop: error: {e}\n")
        return 2
    summary = run_capture_loop(args.out, cfg)
    sys.stdout.write(format_table(summary["table"], summary["runs"]))
    sys.stdout.write(f"failed requests: {summary['failed_requests']}; wall time: {summary['seconds']:.0f} s\n")
    return 0

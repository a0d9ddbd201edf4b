"""``python -m bench towers``: issue 20's figures (one engine, two towers), this code against an older commit.

Every part runs the same measurement against this checkout ("new") and against an export of an older
commit ("old", default ``35d5d75``: ``git archive`` into a temporary folder, served from there with
its own code on ``PYTHONPATH``), on the same bundle, through the public HTTP API only:

* ``refresh``: two ``serve`` processes on one SQLite database (what ``serve --workers 2`` runs, but
  each addressed on its own port). Set ``a`` gets a big add (5,000 names x 10 templates; ``--quick``:
  100 x 2) through the "busy" process; while it encodes, set ``b`` gets one class through the other
  process, then 12 concurrent classify requests on ``b`` go to the busy one, each sending ``b``'s new
  version as ``min_version`` (so it must refresh ``b``). Figures: their latency over the same 12
  requests sent at once before the big add (median over median, max over max) [goal: <= 100 ms],
  whether the big add was still encoding when the last answer came (else the round proves nothing);
  then one more class for ``b`` through the busy process itself.
* ``disconnect``: 8 open-vocabulary requests at once (the most candidate labels allowed, fresh names)
  whose clients give up after ``GIVE_UP_S``; the text encoder's batches (``/metrics``) counted when the
  last client has gone and again once the server is idle: batches run after the disconnect [goal: 0].
* ``throughput``: classify c = 1 / 4 / 16 (``bench peers``' steady-state levels, one JPEG per
  request), old and new alternated for 3 rounds; new / old per round and its median [goal: >= 0.95x].
* ``lines``: lines of the Python files in ``service/``, ``models/`` and ``bench/`` at the old commit and
  at this checkout's HEAD (``git``).

``BENCH_TOWERS_PARTS=refresh,lines`` (comma-separated) runs some parts; ``BENCH_OLD_COMMIT`` names the
older commit. The fairness figure (a class add during an open-vocabulary flood) is ``bench fairness``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, TINY_CONFIG, BenchCfg, part_run, with_part_run, write_result
from bench.harness import Classify, ServerProcess, metrics
from bench.hostile import cached_bundle
from bench.http_load import ARCH, jpegs
from bench.peers import _levels, median_levels
from service.client import Client, ServiceClientError

log = logging.getLogger(__name__)

OLD_COMMIT = os.environ.get("BENCH_OLD_COMMIT", "35d5d75")
PARTS = ("refresh", "disconnect", "throughput", "lines")
BIG_ADD, BIG_TEMPLATES = 5_000, 10  # names, templates (the first of OpenAI's ImageNet set)
PROBES = 12  # concurrent classify requests on the other set
PAIRS = 6  # (a classify that must refresh b, one right after that need not), while a's big add encodes
FLOOD, GIVE_UP_S = 8, 1.0
ROUNDS = 3
LINE_DIRS = ("service", "models", "bench")


def export_commit(commit: str, out: Path) -> Path:
    """The tree of ``commit`` as plain files under ``out`` (``git archive``: no worktree, no .git)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out


def _checkouts(tmp: Path) -> dict[str, Path]:
    return {"old": export_commit(OLD_COMMIT, tmp / "old"), "new": REPO}


# --- refresh: a set's change while another set's big add is encoding


def refresh_round(repo: Path, bundle: Path, work: Path, quick: bool) -> dict[str, Any]:
    from models.zeroshot import named_templates

    names, templates = (100, named_templates("simple")) if quick else (BIG_ADD, named_templates("imagenet"))
    templates = templates[: 2 if quick else BIG_TEMPLATES]
    image = jpegs()[0]
    env = {"PROMPTDISTILL_MAX_LABELS_PER_REQUEST": str(names), "PROMPTDISTILL_REQUEST_TIMEOUT_S": "600"}
    # two processes on one SQLite database (what `serve --workers 2` runs), addressed one by one
    busy = ServerProcess.serve(bundle, work / "state", env=env, repo=repo, log=work / "busy.log")
    other = ServerProcess.serve(bundle, work / "state", env=env, repo=repo, log=work / "other.log")
    with busy, other, busy.client(timeout_s=900.0) as setup:
        setup.create_label_set("a", ["a seed"])
        setup.create_label_set("b", ["b seed"])
        quiet = [_classify_b(busy.url, image, setup.seen)[0] for _ in range(6)]
        quiet_together = _probes(busy.url, image, setup.seen)  # the same 12 at once, nothing else running
        big: dict[str, Any] = {}

        def big_add() -> None:
            t0 = time.perf_counter()
            with busy.client(timeout_s=1800.0, retries=0) as c:
                try:
                    c.add_classes([f"a class {i}" for i in range(names)], "a", templates)
                    big["status"] = 201
                except ServiceClientError as e:
                    big["status"] = e.status
            big["seconds"] = time.perf_counter() - t0

        adder = threading.Thread(target=big_add)
        adder.start()
        time.sleep(2.0)  # the big add is parsed and encoding (it takes minutes; quick: seconds)
        with other.client(timeout_s=900.0) as writer:
            t0 = time.perf_counter()
            writer.add_classes(["b class 1"], "b")
            write_b_ms = (time.perf_counter() - t0) * 1000
            probes = _probes(busy.url, image, writer.seen)
            still_encoding = adder.is_alive()
            # the refresh alone: a classify that must refresh b next to one that need not, both while a encodes
            pairs = []
            for i in range(PAIRS):
                writer.add_classes([f"b class p{i}"], "b")
                must, need_not = (_classify_b(busy.url, image, writer.seen)[0] for _ in range(2))
                pairs.append((must, need_not))
            pairs_encoding = adder.is_alive()
        t0 = time.perf_counter()  # last: a small write through the busy process itself
        with busy.client(timeout_s=1800.0) as c:
            c.add_classes(["b class 2"], "b")
        write_b_busy_ms = (time.perf_counter() - t0) * 1000
        busy_still_encoding = adder.is_alive()
        adder.join()
    busy_ms, quiet_ms = [ms for ms, _ in probes], [ms for ms, _ in quiet_together]
    return {
        "big_add": {"names": names, "templates": len(templates), **big},
        "quiet_classify_ms": quiet,
        "quiet_together_ms": quiet_ms,
        "write_b_other_process_ms": write_b_ms,
        "classify_b_ms": [ms for ms, _ in probes],
        "classify_b_status": [s for _, s in probes],
        "baseline": f"the same {PROBES} requests at once on the quiet server",
        "refresh_pairs_ms": pairs,
        "refresh_wait_median_ms": statistics.median(r - p for r, p in pairs),
        "refresh_wait_max_ms": max(r - p for r, p in pairs),
        "big_add_still_encoding_after_pairs": pairs_encoding,
        "wait_max_ms": max(busy_ms) - max(quiet_ms),
        "wait_median_ms": statistics.median(busy_ms) - statistics.median(quiet_ms),
        "big_add_still_encoding_after_probes": still_encoding,
        "write_b_busy_process_ms": write_b_busy_ms,
        "big_add_still_encoding_after_busy_write": busy_still_encoding,
    }


def _probes(url: str, image: bytes, seen: dict[str, int]) -> list[tuple[float, int]]:
    """``PROBES`` classify requests on set ``b`` at once: (ms, status) each."""
    out: list[tuple[float, int]] = [(0.0, 0)] * PROBES

    def probe(k: int) -> None:
        out[k] = _classify_b(url, image, seen)

    threads = [threading.Thread(target=probe, args=(k,)) for k in range(PROBES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _classify_b(url: str, image: bytes, seen: dict[str, int]) -> tuple[float, int]:
    """One classify on set ``b`` on a fresh connection, sending the version the writer saw: (ms, status)."""
    with Client(url, timeout_s=900.0, retries=0) as c:
        c.seen.update(seen)  # one logical client: it reads its own write, whichever worker answers
        t0 = time.perf_counter()
        try:
            c.classify_bytes([image], label_set="b", top_k=1)
            status = 200
        except ServiceClientError as e:
            status = e.status
        return (time.perf_counter() - t0) * 1000, status


# --- disconnect: open-vocabulary work for clients that left


def text_state(url: str) -> tuple[float, float]:
    """(text-encoder batches so far, text items queued): the text engine's batch count and queue depth
    (new), else the text encoder's calls and 0 (old: no text queue gauge)."""
    m = metrics(url, "promptdistill_")
    if "queue_depth{tower=image}" in m:  # the engines' metrics are labelled by tower
        return m.get("batch_seconds_count{tower=text}", 0.0), m.get("queue_depth{tower=text}", 0.0)
    return m.get("text_encoder_calls_total", 0.0), 0.0


def text_batches(url: str) -> float:
    return text_state(url)[0]


def disconnect_round(repo: Path, bundle: Path, work: Path, quick: bool) -> dict[str, Any]:
    templates = len(json.loads((bundle / "manifest.json").read_text())["text_encoder"]["templates"])
    labels = 256 // templates  # the default max_candidate_prompts
    image = jpegs()[0]
    with ServerProcess.serve(bundle, work / "state", repo=repo, log=work / "log") as server:
        before, dropped_before = text_batches(server.url), _text_dropped(server.url)

        def gone(k: int) -> None:
            # the client gives up (a read timeout closes its connection), or is refused
            with Client(server.url, timeout_s=GIVE_UP_S, retries=0) as c, contextlib.suppress(ServiceClientError):
                c.classify_bytes([image], candidate_labels=[f"gone {k} label {j}" for j in range(labels)])

        threads = [threading.Thread(target=gone, args=(k,)) for k in range(FLOOD)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        at_disconnect = text_batches(server.url)
        dropped_at = _text_dropped(server.url)
        idle_after = _until_idle(server.url)
        after = text_batches(server.url)
        dropped = _text_dropped(server.url) - dropped_at
        dropped_all = _text_dropped(server.url) - dropped_before
        # the same requests answered in full, for scale: what the work costs when nobody leaves
        one_full = _full_request_batches(server.url, image, labels)
    return {
        "requests": FLOOD,
        "labels_per_request": labels,
        "give_up_s": GIVE_UP_S,
        "batches_before_disconnect": at_disconnect - before,
        "batches_after_disconnect": after - at_disconnect,
        "labels_dropped_after_disconnect": dropped,  # queued, or in a batch stopped between blocks (new)
        "labels_dropped_in_all": dropped_all,
        "idle_after_s": idle_after,
        "batches_for_one_answered_request": one_full,
    }


def _text_dropped(url: str) -> float:
    """Text items dropped because their requests had gone (new: labelled by tower; old: none counted)."""
    return metrics(url, "promptdistill_").get("dropped_images_total{reason=cancelled,tower=text}", 0.0)


def _until_idle(url: str, quiet_s: float = 10.0, limit_s: float = 900.0) -> float:
    """Seconds until nothing is queued for the text encoder and its batch count stood still for ``quiet_s``."""
    start = last_change = time.monotonic()
    seen = text_state(url)
    while time.monotonic() - start < limit_s:
        time.sleep(0.2)
        now = text_state(url)
        if now != seen:
            seen, last_change = now, time.monotonic()
        elif now[1] == 0 and time.monotonic() - last_change >= quiet_s:
            break
    return last_change - start


def _full_request_batches(url: str, image: bytes, labels: int) -> float:
    before = text_batches(url)
    with Client(url, timeout_s=900.0) as c:
        c.classify_bytes([image], candidate_labels=[f"kept label {j}" for j in range(labels)])
    return text_batches(url) - before


# --- throughput: classify before and after, alternated


def throughput(checkouts: dict[str, Path], bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    images = jpegs()
    rounds: list[dict[str, Any]] = []
    for r in range(1 if cfg.quick else ROUNDS):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        entry: dict[str, Any] = {"order": order}
        for who in order:
            log.info("throughput round %d: %s", r + 1, who)
            work = tmp / f"tp-{who}-{r}"
            with ServerProcess.serve(
                bundle, work / "state", threads=cfg.threads, repo=checkouts[who], log=work / "log"
            ) as server:
                entry[who] = _levels(partial(Classify, server.url, images, top_k=5), cfg)
        rounds.append(entry)
    per_round = {
        str(lv["concurrency"]): [e["new"][i]["throughput_rps"] / e["old"][i]["throughput_rps"] for e in rounds]
        for i, lv in enumerate(rounds[0]["new"])
    }
    return {
        "rounds": rounds,
        "systems": {who: median_levels([e[who] for e in rounds]) for who in ("old", "new")},
        "new_over_old_rounds": per_round,
        "new_over_old": {c: float(np.median(v)) for c, v in per_round.items()},
    }


# --- lines


def lines(commit: str) -> dict[str, int]:
    """Lines of the ``.py`` files under each of ``LINE_DIRS`` at ``commit``."""
    out = {}
    for d in LINE_DIRS:
        files = subprocess.run(
            ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", commit, "--", d],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        total = 0
        for f in (f for f in files if f.endswith(".py")):
            blob = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{f}"], capture_output=True, check=True)
            total += blob.stdout.count(b"\n")
        out[d] = total
    out["total"] = sum(out[d] for d in LINE_DIRS)
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    parts = os.environ.get("BENCH_TOWERS_PARTS", ",".join(PARTS)).split(",")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result: dict[str, Any] = {"old_commit": OLD_COMMIT, "new_commit": head.stdout.strip()}
    with tempfile.TemporaryDirectory(prefix="pd-bench-towers-") as tmp_name:
        tmp = Path(tmp_name)
        checkouts = _checkouts(tmp) if set(parts) - {"lines"} else {}
        tiny = cached_bundle(str(TINY_CONFIG))
        big = cached_bundle(str(TINY_CONFIG) if cfg.quick else ARCH)
        result["bundles"] = {"refresh": "tiny", "disconnect/throughput": "tiny" if cfg.quick else ARCH}
        for who, repo in checkouts.items():
            if "refresh" in parts:
                log.info("refresh: %s", who)
                result.setdefault("refresh", {"ran": part_run()})[who] = refresh_round(
                    repo, tiny, tmp / f"refresh-{who}", cfg.quick
                )
                log.info("  %s", result["refresh"][who])
            if "disconnect" in parts:
                log.info("disconnect: %s", who)
                result.setdefault("disconnect", {"ran": part_run()})[who] = disconnect_round(
                    repo, big, tmp / f"gone-{who}", cfg.quick
                )
                log.info("  %s", result["disconnect"][who])
        if "throughput" in parts:
            ran = part_run()
            result["throughput"] = {**throughput(checkouts, big, tmp, cfg), "ran": ran}
    if "lines" in parts:
        result["lines"] = {"old": lines(OLD_COMMIT), "new": lines("HEAD"), "ran": part_run()}
    previous = cfg.out_dir / "towers.json"
    if previous.is_file():  # parts not run this time keep their last measurement
        old = json.loads(previous.read_text())
        result = {**{k: with_part_run(old[k], old) for k in PARTS if k in old and k not in parts}, **result}
    write_result("towers", result, cfg)
    return result

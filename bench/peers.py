"""Peers: our service vs Infinity vs a FastAPI wrapper around the Hugging Face pipeline, same weights.

One random ViT-B/32 (seed 0) serves everywhere: our zero-shot bundle (ONNX fp32, 100 ImageNet
classes); its open_clip weights converted to a Hugging Face ``CLIPModel`` folder
(bench/peer_hf.py, checked against open_clip on a probe image) for Infinity 0.0.78 (torch engine,
``POST /embeddings`` with image data URIs) and for the naive baseline (``zero-shot-image-classification``
pipeline over the same 100 labels: it re-encodes every label on every call). The peers live in
their own virtualenv (made here, torch pinned to our CPU build; Infinity needs ``aiohttp`` beyond
its ``[all]`` extra and our torchvision shim, installed as a ``.pth`` start-up hook). Same JPEGs,
concurrency 1 / 4 / 16, one server at a time; clients honour ``Retry-After`` (a refused
request is retried after the delay, its latency counted from the first attempt), as ours does.
Throughput is steady state: answers inside a timed window after a warm-up (bench/harness.py).
Also our in-process limit, before and after our server runs: the service's own pipeline
(``service.state.build_services``, ``Classifier.classify``) one image at a time, no HTTP; and,
while our server is up, 3 pairs per round of an in-process block and an HTTP c=1 block of the same
24 images back to back: the c=1 ratios (throughput, p50) are the medians over those pairs. Ours and
Infinity run 3 rounds, back to back; the table holds the per-level medians and the ratios are
medians of the per-round ratios. If the peers cannot be installed, the result file says why (pip's
own error) and only our figures are measured.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, TINY_CONFIG, BenchCfg, real_photos, save_figure, write_result
from bench.harness import Classify, PostJson, Send, ServerProcess, Window, closed_loop, free_port, metrics
from bench.http_load import build_bundle, jpegs

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
ROUNDS = 3  # ours then Infinity, this many times: one pair of runs drifts on a shared machine
PAIRS_PER_ROUND, PAIR_IMAGES, PAIR_IMAGES_QUICK = 3, 24, 4
INFINITY = "infinity-emb[all]==0.0.78"
PEER_PINS = (INFINITY, "aiohttp==3.14.5", "torch==2.13.0", "torchvision==0.28.0")
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptdistill" / "peers-venv"
SHIM = REPO / "models" / "_compat.py"


class PeerUnavailable(RuntimeError):
    """The peers' virtualenv could not be made; the message is pip's (or python's) own error."""


def ensure_peer_venv(venv: Path, install: bool = True) -> Path:
    """The peers' python (Infinity + transformers), creating the virtualenv on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import infinity_emb, transformers"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=300).returncode == 0:
        return python
    if not install:
        raise PeerUnavailable(f"no peers virtualenv at {venv} and installing was not allowed")
    log.info("creating the peers' virtualenv %s (%s; a few minutes)", venv, ", ".join(PEER_PINS))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PINS], capture_output=True, text=True)
    if pip.returncode != 0:
        raise PeerUnavailable(f"pip install {' '.join(PEER_PINS)} failed:\n{pip.stderr[-3000:]}")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "_pd_torchvision_shim.py").write_text(SHIM.read_text())
    (Path(site) / "_pd_torchvision_shim.pth").write_text("import _pd_torchvision_shim\n")
    check = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        raise PeerUnavailable(f"the peers' virtualenv does not import infinity_emb:\n{check.stderr[-3000:]}")
    return python


def _tokenizer_files(out: Path) -> None:
    """open_clip's BPE as Hugging Face CLIPTokenizer files (vocab.json + merges.txt), same ids."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer uses
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def export_open_clip(bundle_dir: Path, out: Path) -> None:
    """Our bundle's image+text backbone as a state dict + dims + a probe (pixels, open_clip embedding)."""
    import torch
    from safetensors.torch import save_file

    from models.bundle import load_bundle
    from models.preprocess import preprocess_image
    from models.towers import load_bundle_backbone

    bundle = load_bundle(bundle_dir)
    ref = bundle.manifest.image_encoder.backbone
    model = load_bundle_backbone(bundle, ref).model.eval()
    cfg = bundle.manifest.backbones[ref].open_clip_config
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    dims = {
        "embed_dim": cfg["embed_dim"],
        "vision": {"width": v["width"], "layers": v["layers"], "heads": v["width"] // v.get("head_width", 64),
                   "image_size": v["image_size"], "patch_size": v["patch_size"]},
        "text": {"width": t["width"], "layers": t["layers"], "heads": t["heads"], "vocab_size": t["vocab_size"],
                 "context": t["context_length"]},
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "dims.json").write_text(json.dumps(dims))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip.safetensors"))
    pixels = preprocess_image(real_photos(mirror=False)[0], bundle.manifest.image_encoder.preprocess.to_config())[None]
    with torch.no_grad():
        emb = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.save(out / "probe_pixels.npy", pixels)
    np.save(out / "probe_embedding.npy", emb)
    _tokenizer_files(out)
    names = [c.name for c in bundle.manifest.label_sets[0].classes]
    (out / "labels.json").write_text(json.dumps(names))


def peer_process(cmd: list[str], port: int, log_path: Path, threads: int) -> ServerProcess:
    """A peer server (a command on 127.0.0.1, its own virtualenv) that is ready when ``GET /health`` answers 200."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return ServerProcess(cmd, port, log_path, env, health="/health", cwd=log_path.parent)


def _levels(make_send: Callable[[], Send], cfg: BenchCfg, slow: bool = False) -> list[dict[str, Any]]:
    """Concurrency 1 / 4 / 16 in steady-state windows (2 s warm-up, then 8 s measured; 12 s at c=16).

    ``slow`` (the Hugging Face pipeline: it re-encodes every label on every call, and never refuses): a
    fixed count of requests instead, since a window would need minutes to hold a few answers per client.
    """
    closed_loop(make_send, 2, requests=4, max_seconds=cfg.max_seconds)  # warm-up
    out = []
    for c in CONCURRENCY:
        before = [round(x, 2) for x in os.getloadavg()]
        if slow:
            n = 2 * c if cfg.quick else 2 * c + 6
            lv = closed_loop(make_send, c, requests=n, max_seconds=2 * cfg.max_seconds)
        else:
            window = Window(0.5, 2.0) if cfg.quick else Window(2.0, 12.0 if c >= 16 else 8.0)
            lv = closed_loop(make_send, c, window=window)
        lv["loadavg_before"] = before
        if lv["ok"] == 0:
            raise RuntimeError(f"c={c}: no request succeeded (status counts {lv['errors']})")
        out.append(lv)
        log.info(
            "  c=%d: %.2f img/s, p50 %.0f ms (%d ok, %d refusals retried)",
            c, lv["throughput_rps"], lv["p50_ms"], lv["ok"], lv["refusals_retried"],
        )  # fmt: skip
    return out


def run_ours(
    bundle_dir: Path, tmp: Path, images: list[bytes], cfg: BenchCfg, in_process: InProcess | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Our levels, then (server still up, idle between blocks) the paired c=1 rounds against in-process
    (none when ``in_process`` is None)."""
    with ServerProcess.serve(bundle_dir, tmp / "state", threads=cfg.threads, log=tmp / "ours.log") as server:
        send = partial(Classify, server.url, images, top_k=5)
        levels = _levels(send, cfg)
        levels[-1]["admission_after"] = metrics(server.url, "promptdistill_admission_")
        pairs = [] if in_process is None else paired_c1(send, in_process, cfg)
        return levels, pairs


def paired_c1(send: Callable[[], Send], in_process: InProcess, cfg: BenchCfg) -> list[dict[str, Any]]:
    """c=1 over HTTP against the in-process loop, in alternating blocks of the same images.

    A pair is one in-process block then one HTTP block, back to back, so both sides of its ratio see
    the same machine; the medians over all pairs are the figures (one pair drifts on a shared machine).
    """
    n_pairs, n = (1, PAIR_IMAGES_QUICK) if cfg.quick else (PAIRS_PER_ROUND, PAIR_IMAGES)
    out = []
    for _ in range(n_pairs):
        before = [round(x, 2) for x in os.getloadavg()]
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            in_process.one(i)
            lat.append((time.perf_counter() - t) * 1000.0)
        ip_wall = time.perf_counter() - t0
        lv = closed_loop(send, 1, requests=n, max_seconds=3 * cfg.max_seconds)
        out.append({
            "in_process_images_per_s": n / ip_wall,
            "in_process_p50_ms": float(np.median(lat)),
            "http_images_per_s": lv["throughput_rps"],
            "http_p50_ms": lv["p50_ms"],
            "loadavg_before": before,
        })  # fmt: skip
    return out


def pairs_summary(pairs: list[dict[str, Any]], per_block: int) -> dict[str, Any]:
    """The c=1 figures: medians of the per-pair ratios (HTTP over in-process)."""
    throughput = [r["http_images_per_s"] / r["in_process_images_per_s"] for r in pairs]
    p50 = [r["http_p50_ms"] / r["in_process_p50_ms"] for r in pairs]
    return {
        "rounds": pairs,
        "images_per_block": per_block,
        "throughput_ratios": throughput,
        "p50_ratios": p50,
        "throughput_ratio_median": float(np.median(throughput)),
        "p50_ratio_median": float(np.median(p50)),
    }


def median_levels(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency, the medians over rounds (throughput, percentiles); counts are summed."""
    out = []
    for levels in zip(*rounds, strict=True):
        errors: dict[str, int] = {}
        for lv in levels:
            for status, n in lv["errors"].items():
                errors[str(status)] = errors.get(str(status), 0) + n
        merged = {
            "concurrency": levels[0]["concurrency"],
            "ok": sum(lv["ok"] for lv in levels),
            "errors": errors,
            "refusals_retried": sum(lv["refusals_retried"] for lv in levels),
            "rounds_throughput_rps": [lv["throughput_rps"] for lv in levels],
            "loadavg_before": levels[0]["loadavg_before"],
        }
        for key in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms"):
            merged[key] = float(np.median([lv[key] for lv in levels]))
        for key in ("window_s", "admission_after"):
            if key in levels[-1]:
                merged[key] = levels[-1][key]
        out.append(merged)
    return out


def run_infinity(python: Path, hf_dir: Path, tmp: Path, images: list[str], cfg: BenchCfg) -> list[dict[str, Any]]:
    port = free_port()
    exe = python.parent / "infinity_emb"
    cmd = [str(exe), "v2", "--model-id", str(hf_dir), "--engine", "torch", "--device", "cpu", "--host",
           "127.0.0.1", "--port", str(port), "--served-model-name", "clip", "--no-model-warmup"]  # fmt: skip
    body = [{"model": "clip", "input": [f"data:image/jpeg;base64,{b}"], "modality": "image"} for b in images]
    with peer_process(cmd, port, tmp / "infinity.log", cfg.threads) as peer:
        return _levels(partial(PostJson, peer.url, "/embeddings", body), cfg)


def run_hf_pipeline(python: Path, hf_dir: Path, labels: Path, tmp: Path, images: list[str], cfg: BenchCfg) -> Any:
    port = free_port()
    cmd = [str(python), str(REPO / "bench" / "peer_hf.py"), "serve", str(hf_dir), str(labels), str(port)]
    body = [{"inputs": b} for b in images]
    with peer_process(cmd, port, tmp / "hf.log", cfg.threads) as peer:
        return _levels(partial(PostJson, peer.url, "/classify", body), cfg, slow=True)


class InProcess:
    """The service's own pipeline in this process, no HTTP: the app's lifespan builds and starts what
    the server runs (``service.state.build_services``: admission, decode pool, batching engines,
    label-set snapshots), then ``Classifier.classify`` answers one JSON image string at a time."""

    def __init__(self, bundle_dir: Path, state_dir: Path, images: list[str], threads: int) -> None:
        from service.app import create_app
        from service.settings import Settings

        self.images = images
        self.loop = asyncio.new_event_loop()
        app = create_app(Settings(bundle=bundle_dir, state_dir=state_dir, threads=threads))
        self._lifespan = app.router.lifespan_context(app)
        self.loop.run_until_complete(self._lifespan.__aenter__())
        self.services = app.state.services
        self.one(0)  # warm-up

    def one(self, i: int) -> Any:
        """base64 + JPEG decode, preprocess, encode (through the engine), search: one image."""
        from service.classifier import ClassifyJob

        job = ClassifyJob([self.images[i % len(self.images)]], top_k=5)
        return self.loop.run_until_complete(self.services.classifier.classify(job))

    def pixels(self, b64: str) -> np.ndarray:
        """The service's decode + preprocess of one JSON image string: [1, 3, H, W]."""
        from service.images import decode_base64_image

        s = self.services
        pixels: np.ndarray = s.encoder.preprocess(decode_base64_image(b64, 0, s.settings.max_image_bytes), 0)
        return pixels[None]

    def close(self) -> None:
        self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        self.loop.close()


def in_process_limit(pipeline: InProcess, cfg: BenchCfg) -> dict[str, Any]:
    """Our own ceiling: the service's pipeline one image at a time, no HTTP; also where that time goes:
    decode + preprocess alone, and the encoder alone at batch 1 and batch 8."""
    encoder, images = pipeline.services.encoder, pipeline.images
    n = 4 if cfg.quick else 48
    t0 = time.perf_counter()
    for i in range(n):
        pipeline.one(i)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = [pipeline.pixels(b) for b in images]  # [1, 3, H, W] each
    decode_ms = (time.perf_counter() - t0) * 1000 / len(images)
    t0 = time.perf_counter()
    for x in batch:
        encoder.encode(x)
    b1_ms = (time.perf_counter() - t0) * 1000 / len(batch)
    eight = np.concatenate((batch * 8)[:8])  # [8, 3, H, W]
    encoder.encode(eight)
    t0 = time.perf_counter()
    for _ in range(1 if cfg.quick else 3):
        encoder.encode(eight)
    b8_ms = (time.perf_counter() - t0) * 1000 / (8 if cfg.quick else 24)
    return {
        "images": n,
        "wall_s": wall,
        "images_per_s": n / wall,
        "decode_preprocess_ms": decode_ms,
        "encode_b1_ms": b1_ms,
        "encode_b8_ms_per_image": b8_ms,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def run(cfg: BenchCfg, venv: Path | None = None, install: bool = True) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else "ViT-B-32"
    raw = jpegs()
    images = [base64.b64encode(j).decode() for j in raw]
    result: dict[str, Any] = {
        "model": f"{'tiny' if cfg.quick else 'ViT-B-32'}, random init (seed 0), same weights in every system",
        "images": f"{len(images)} real photos as JPEG (quality 90), one per request",
        "threads": cfg.threads,
        "systems": {},
    }
    with tempfile.TemporaryDirectory(prefix="pd-bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        bundle_dir = build_bundle(arch, tmp / "bundle")
        pipeline = InProcess(bundle_dir, tmp / "in-process-state", images, cfg.threads)
        try:
            _measure(pipeline, bundle_dir, tmp, raw, images, cfg, venv, install, result)
        finally:
            pipeline.close()
    _ratios(result)
    write_result("peers", result, cfg)
    _plot(result, cfg)
    return result


def _measure(
    pipeline: InProcess,
    bundle_dir: Path,
    tmp: Path,
    raw: list[bytes],
    images: list[str],
    cfg: BenchCfg,
    venv: Path | None,
    install: bool,
    result: dict[str, Any],
) -> None:
    """In-process, then rounds of ours (and the peers, when installed), then in-process again."""
    rounds = 1 if cfg.quick else ROUNDS
    result["in_process"] = in_process_limit(pipeline, cfg)
    log.info("in-process limit: %.2f img/s", result["in_process"]["images_per_s"])
    python = None
    try:
        python = _peer_setup(venv, install, bundle_dir, tmp, result)
    except PeerUnavailable as e:
        log.error("peers not measured: %s", e)
        result["peers_unavailable"] = str(e)
    per_round: list[dict[str, list[dict[str, Any]]]] = []
    pairs: list[dict[str, Any]] = []
    for r in range(rounds):
        log.info("round %d of %d: ours", r + 1, rounds)
        levels, round_pairs = run_ours(bundle_dir, tmp, raw, cfg, pipeline)
        pairs += round_pairs
        entry = {"ours": levels}
        if python is not None:
            log.info("round %d of %d: infinity", r + 1, rounds)
            entry["infinity"] = run_infinity(python, tmp / "hf", tmp, images, cfg)
        per_round.append(entry)
    result["in_process_after"] = in_process_limit(pipeline, cfg)  # the machine's drift, bracketed
    log.info("in-process limit again: %.2f img/s", result["in_process_after"]["images_per_s"])
    result["rounds"] = per_round
    for name in per_round[0]:
        result["systems"][name] = median_levels([entry[name] for entry in per_round])
    result["c1_paired"] = pairs_summary(pairs, PAIR_IMAGES_QUICK if cfg.quick else PAIR_IMAGES)
    log.info(
        "c=1 paired with in-process (median of %d pairs): throughput %.3fx, p50 %.3fx",
        len(pairs),
        result["c1_paired"]["throughput_ratio_median"],
        result["c1_paired"]["p50_ratio_median"],
    )
    if python is not None:
        log.info("hf pipeline (once: it is slow):")
        result["systems"]["hf_pipeline"] = run_hf_pipeline(
            python, tmp / "hf", tmp / "oc" / "labels.json", tmp, images, cfg
        )


def _peer_setup(venv: Path | None, install: bool, bundle_dir: Path, tmp: Path, result: dict[str, Any]) -> Path:
    """The peers' python, with our weights converted to a Hugging Face folder at ``tmp / "hf"``."""
    python = ensure_peer_venv(venv or DEFAULT_VENV, install)
    export_open_clip(bundle_dir, tmp / "oc")
    conv = subprocess.run(
        [str(python), str(REPO / "bench" / "peer_hf.py"), "convert", str(tmp / "oc"), str(tmp / "hf")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if conv.returncode != 0:
        raise PeerUnavailable(f"converting the weights to Hugging Face CLIPModel failed:\n{conv.stderr[-3000:]}")
    result["conversion"] = json.loads(conv.stdout.strip().splitlines()[-1])
    log.info("conversion: %s", result["conversion"])
    return python


def _ratios(result: dict[str, Any]) -> None:
    systems = result["systems"]
    ours = {lv["concurrency"]: lv["throughput_rps"] for lv in systems["ours"]}
    if "infinity" in systems:  # per round (ours and Infinity back to back), then the median
        per_round: dict[str, list[float]] = {}
        for entry in result["rounds"]:
            for mine, theirs in zip(entry["ours"], entry["infinity"], strict=True):
                per_round.setdefault(str(mine["concurrency"]), []).append(
                    mine["throughput_rps"] / theirs["throughput_rps"]
                )
        result["ours_over_infinity_rounds"] = per_round
        result["ours_over_infinity"] = {c: float(np.median(r)) for c, r in per_round.items()}
    limit = max(result[k]["images_per_s"] for k in ("in_process", "in_process_after") if k in result)
    result["ours_c1_over_in_process_unpaired"] = ours[1] / limit  # against the better of the two in-process runs
    paired = result.get("c1_paired")
    if paired is not None:  # the figures: medians of back-to-back pairs
        result["ours_c1_over_in_process"] = paired["throughput_ratio_median"]
        result["ours_c1_p50_over_in_process"] = paired["p50_ratio_median"]
    else:
        result["ours_c1_over_in_process"] = result["ours_c1_over_in_process_unpaired"]


def _plot(result: dict[str, Any], cfg: BenchCfg) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in result["systems"].items():
        cs = [lv["concurrency"] for lv in levels]
        a.plot(cs, [lv["throughput_rps"] for lv in levels], marker="o", label=name)
        b.plot(cs, [lv["p50_ms"] for lv in levels], marker="o", label=name)
    a.axhline(result["in_process"]["images_per_s"], linestyle="--", color="gray", label="ours in-process limit")
    a.set(xscale="log", xlabel="concurrency", ylabel="images / s", title="throughput (same weights, same JPEGs)")
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p50 ms", title="median latency")
    for ax in (a, b):
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.legend(fontsize=8)
    return save_figure(fig, "peers", cfg)

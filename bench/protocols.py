"""gRPC vs REST throughput for one client sending 32-image batches (self-contained; issue 25).

``python -m bench.protocols [--seconds 20] [--rounds 3] [--batch 32] [--out bench/results/protocols.json]``

Starts ``promptdistill serve --grpc-port`` on a tiny zero-shot bundle (random weights, 64 px input,
so the encoder is cheap and the protocols' own costs show) and, from one client, sends back-to-back
requests of ``--batch`` real photos (JPEG) for ``--seconds`` per protocol and round, the protocols
interleaved round by round (machine drift hits every protocol alike):

* ``oip-grpc``: OIP v2 ModelInfer, images as ``raw_input_contents`` (the service's own stubs);
* ``oip-rest-binary``: OIP v2 REST with the binary-data extension (raw bytes both ways);
* ``oip-rest-json``: OIP v2 REST, images base64 in JSON;
* ``v1-multipart``: the native ``/v1/classify`` with multipart uploads (reference).

Every answer is top-5 classification of the default label set. Reported: images/s (median over
rounds, and the spread) and per-request latency p50. The load average is recorded: these 2 cores
are shared.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx2

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "models" / "configs" / "tiny-clip.json"
K = 5


def _jpegs(n: int) -> list[bytes]:
    import io

    from models.samples import sample_photos

    photos = sample_photos()
    out = []
    for i in range(n):
        buf = io.BytesIO()
        photos[i % len(photos)].convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _bundle(folder: Path) -> Path:
    import torch

    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    names = ["cat", "dog", "astronaut", "coffee cup", "rocket", "flower", "temple", "coins"]
    build_zeroshot_bundle(str(TINY_CONFIG), None, names, named_templates("simple"), folder, onnx=True, progress=False)
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(bundle: Path, state: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    port, grpc_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(bundle), "--state-dir", str(state),
           "--port", str(port), "--grpc-port", str(grpc_port)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTDISTILL_", "OTEL_"))}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx2.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, grpc_port
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server not ready")


def _senders(url: str, grpc_port: int, jpegs: list[bytes]) -> dict[str, Callable[[], None]]:
    from service.oip import join_bytes
    from service.oip_proto import grpc_predict_v2_pb2 as pb
    from service.oip_proto import grpc_predict_v2_pb2_grpc as pb_grpc

    n = len(jpegs)
    http = httpx2.Client(base_url=url, timeout=120)
    limit = 64 * 1024 * 1024
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", limit)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    raw = join_bytes(jpegs)
    request = pb.ModelInferRequest(model_name="default", raw_input_contents=[raw])
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[n])
    request.outputs.add(name="SCORES").parameters["classification"].int64_param = K
    head = json.dumps({
        "inputs": [{"name": "IMAGE", "shape": [n], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "SCORES", "parameters": {"classification": K, "binary_data": True}}],
    }).encode()  # fmt: skip
    binary = head + raw
    binary_headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    as_json = {
        "inputs": [{"name": "IMAGE", "shape": [n], "datatype": "BYTES",
                    "data": [base64.b64encode(j).decode() for j in jpegs]}],
        "outputs": [{"name": "SCORES", "parameters": {"classification": K}}],
    }  # fmt: skip
    files = [("files", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)]

    def ok(r: httpx2.Response) -> None:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")

    def grpc_call() -> None:
        answer = stub.ModelInfer(request, timeout=120)
        assert list(answer.outputs[0].shape) == [n, K]

    return {
        "oip-grpc": grpc_call,
        "oip-rest-binary": lambda: ok(http.post("/v2/models/default/infer", content=binary, headers=binary_headers)),
        "oip-rest-json": lambda: ok(http.post("/v2/models/default/infer", json=as_json)),
        "v1-multipart": lambda: ok(http.post("/v1/classify", files=files, data={"top_k": str(K)})),
    }


def _measure(send: Callable[[], None], seconds: float, images: int) -> dict[str, float]:
    send()  # warm (connection, first-call costs)
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        send()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"img_s": images * len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="per protocol and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "protocols.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pd-bench-protocols-") as tmp:
        work = Path(tmp)
        proc, url, grpc_port = _serve(_bundle(work / "bundle"), work / "state", work / "server.log")
        try:
            jpegs = _jpegs(args.batch)
            senders = _senders(url, grpc_port, jpegs)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in senders}
            load = [os.getloadavg()[0]]
            for r in range(args.rounds):
                for name, send in senders.items():
                    runs[name].append(_measure(send, args.seconds, args.batch))
                    print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
                load.append(os.getloadavg()[0])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    summary = _summary(runs, args, load, sum(len(j) for j in jpegs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(_table(summary))
    return 0


def _summary(runs: dict[str, list[dict[str, float]]], args: Any, load: list[float], nbytes: int) -> dict[str, Any]:
    rows = {}
    for name, got in runs.items():
        rates = [g["img_s"] for g in got]
        rows[name] = {
            "img_s_median": statistics.median(rates),
            "img_s_min": min(rates),
            "img_s_max": max(rates),
            "p50_ms_median": statistics.median(g["p50_ms"] for g in got),
        }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "batch": args.batch,
        "batch_jpeg_bytes": nbytes,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "loadavg_1m": load,
        "cpus": os.cpu_count(),
        "protocols": rows,
    }


def _table(s: dict[str, Any]) -> str:
    lines = ["| protocol | img/s (median of rounds) | min-max | p50 per 32-image request |", "|---|---|---|---|"]
    for name, r in s["protocols"].items():
        lines.append(
            f"| {name} | {r['img_s_median']:.1f} | {r['img_s_min']:.1f}-{r['img_s_max']:.1f} | "
            f"{r['p50_ms_median']:.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

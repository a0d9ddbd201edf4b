"""Kill-during-write: a subprocess server is SIGKILLed while a client adds classes; nothing acknowledged is lost.

After each kill the server restarts on the same state directory; every class whose add got a 2xx must
be there, and the FAISS index must agree with the SQLite database (same ids, names, versions and the
same vectors, checked through classification cosines against the stored BLOBs).
"""

from __future__ import annotations

import base64
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

from service.client import Client
from service.store import DB_FILE
from tests.service.conftest import png_bytes, subprocess_server

KILL_POINTS = 3
MAX_ADDS_PER_ROUND = 400
ROUND_TIMEOUT_S = 20.0
SERVER_ENV = {"PROMPTDISTILL_MAX_TOP_K": "100000"}


class Writer(threading.Thread):
    """Adds classes one request at a time until the server dies (bounded in count and time)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.url, self.prefix = url, prefix
        self.acked: dict[str, int] = {}  # name -> version acknowledged
        self.sent = 0

    def run(self) -> None:
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        with httpx2.Client(base_url=self.url, timeout=5.0) as http:
            for i in range(MAX_ADDS_PER_ROUND):
                if time.monotonic() > deadline:
                    return
                names = [f"{self.prefix}-{i}-a", f"{self.prefix}-{i}-b"]
                self.sent += 1
                try:
                    resp = http.post("/v1/label-sets/default/classes", json={"names": names})
                except httpx2.TransportError:
                    return  # the server was killed
                if resp.status_code == 201:
                    for n in names:
                        self.acked[n] = resp.json()["version"]


def _db_rows(state_dir: Path) -> tuple[int, dict[int, str], dict[int, np.ndarray]]:
    db = sqlite3.connect(state_dir / DB_FILE)
    try:
        (version,) = db.execute("SELECT version FROM label_sets WHERE name = 'default'").fetchone()
        rows = db.execute(
            "SELECT c.id, c.name, v.vector FROM classes c LEFT JOIN vectors v ON v.label_set = c.label_set "
            "AND v.class_id = c.id WHERE c.label_set = 'default'"
        ).fetchall()
        spaces = db.execute("SELECT COUNT(DISTINCT space) FROM vectors").fetchone()[0]
    finally:
        db.close()
    assert spaces == 1 and all(r[2] is not None for r in rows), "a class was stored without its vector"
    return int(version), {r[0]: r[1] for r in rows}, {r[0]: np.frombuffer(r[2], dtype="<f4") for r in rows}


def _image_embedding(bundle: Path, photo: Any) -> np.ndarray:
    import onnxruntime as ort

    from models.bundle import load_bundle
    from models.preprocess import preprocess_batch

    b = load_bundle(bundle)
    session = ort.InferenceSession(
        str(bundle / b.manifest.image_encoder.onnx[0].file), providers=["CPUExecutionProvider"]
    )
    pixels = preprocess_batch([photo], b.manifest.image_encoder.preprocess.to_config())
    return np.asarray(session.run(["embedding"], {"pixels": pixels})[0][0])  # [D]


def _check_consistent(url: str, state_dir: Path, image: str, embedding: np.ndarray) -> dict[int, str]:
    version, names, vectors = _db_rows(state_dir)
    with Client(url, timeout_s=30.0) as client:
        pages = list(client.class_pages(page_size=250))  # several pages however fast the machine
    with httpx2.Client(base_url=url, timeout=30.0) as http:
        out = http.post("/v1/classify", json={"images": [image], "top_k": len(names)}).json()
    assert {p["version"] for p in pages} == {version} == {out["version"]}
    assert {c["id"]: c["name"] for p in pages for c in p["classes"]} == names
    assert {p["index_size"] for p in pages} == {len(names)}
    preds = out["results"][0]["predictions"]
    assert {p["class_id"]: p["label"] for p in preds} == names, "the FAISS index disagrees with the database"
    worst = max(abs(p["cosine"] - float(embedding @ vectors[p["class_id"]])) for p in preds)
    assert worst < 1e-4, f"index vectors differ from stored vectors by {worst}"
    return names


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_acknowledged(
    tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    rng = random.Random(20251123)
    state = tmp_path / "state"
    image = base64.b64encode(png_bytes(photos[0])).decode()
    embedding = _image_embedding(tiny_bundle_dir, photos[0])
    acked: dict[str, int] = {}
    survived = []
    for round_no in range(KILL_POINTS + 1):  # each start first verifies the previous round's kill
        with subprocess_server(tiny_bundle_dir, state, env=SERVER_ENV) as server:
            proc, url = server.proc, server.url
            assert proc is not None
            names = _check_consistent(url, state, image, embedding)
            missing = set(acked) - set(names.values())
            assert not missing, f"acknowledged classes lost after SIGKILL: {sorted(missing)[:10]}"
            assert _db_rows(state)[0] >= max(acked.values(), default=0)
            if round_no == KILL_POINTS:
                break
            writer = Writer(url, f"r{round_no}")
            writer.start()
            # Kill at a random point, but only once some add was acknowledged (else the round proves
            # nothing): on a loaded machine the first answer can take longer than the random delay.
            kill_after = rng.uniform(0.2, 1.5)
            deadline = time.monotonic() + kill_after
            give_up = time.monotonic() + ROUND_TIMEOUT_S
            while writer.is_alive() and (time.monotonic() < deadline or not writer.acked):
                assert time.monotonic() < give_up, f"round {round_no}: no add acknowledged in {ROUND_TIMEOUT_S} s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            writer.join(timeout=30)
            assert not writer.is_alive()
        assert writer.acked, f"round {round_no}: no add was acknowledged before the kill ({kill_after:.2f}s)"
        acked.update(writer.acked)
        survived.append((round(kill_after, 2), len(writer.acked) // 2, writer.sent))
    print(f"durability: kill points (s, acked adds, sent adds) = {survived}; {len(acked)} acked classes all present")

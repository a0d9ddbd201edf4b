"""The capture folder's held-out slice: fixed by hash, disjoint from the training part, about a tenth."""

from __future__ import annotations

import hashlib
from pathlib import Path

from models.captures import HELD_OUT_EVERY, capture_images, is_held_out


def test_held_out_and_training_parts_partition_a_capture_folder(tmp_path: Path) -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    for sha in shas:
        (tmp_path / sha[:2]).mkdir(exist_ok=True)
        (tmp_path / sha[:2] / f"{sha}.jpg").write_bytes(b"x")
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "notes.jpg").write_bytes(b"x")  # not a capture name: neither part
    held, train = capture_images(tmp_path, held_out=True), capture_images(tmp_path, held_out=False)
    assert not set(held) & set(train) and len(held) + len(train) == 400
    assert {p.stem for p in held} == {s for s in shas if int(s[:8], 16) % HELD_OUT_EVERY == 0}
    assert 20 <= len(held) <= 60  # about a tenth of 400
    assert capture_images(tmp_path, held_out=True) == held  # a fixed order, run after run
    assert all(is_held_out(p.stem) for p in held)

"""``train distill`` on a service's capture folder: the captures join the unlabeled images, the held-out
tenth is never read, foreign and damaged files are skipped and counted, an empty folder is one clear
error, and a run interrupted after its first epoch resumes to the same weights even though the service
kept capturing meanwhile. The folder is written by the service's own capture code (service/capture.py)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import training.data
from models.captures import capture_images, is_held_out
from promptdistill.cli import main
from service.capture import Capture, CaptureCfg
from service.images import EncodedImage
from tests.training.test_student_bundle import _teacher_run
from training.data import load_digits_images
from training.loop import CHECKPOINT, Trainer

pytestmark = pytest.mark.slow  # short distillation runs


def _capture(folder: Path, images: list[Any]) -> None:
    """Classified images as the service keeps them: through :class:`service.capture.Capture`."""
    cap = Capture(CaptureCfg(folder, 1.0, 10**6, 2**40, 30.0, 2**24))
    cap.start()
    try:
        for start in range(0, len(images), 32):  # the writer's queue holds 64
            want = cap.kept + len(images[start : start + 32])
            for im in images[start : start + 32]:
                buf = io.BytesIO()
                im.save(buf, "PNG")
                cap.offer([EncodedImage(buf.getvalue(), "image/png")])
            deadline = time.monotonic() + 60
            while cap.kept < want:
                assert cap.problem is None and time.monotonic() < deadline, (cap.problem, cap.kept, want)
                time.sleep(0.01)
    finally:
        cap.stop()


def _distill(teacher: Path, out: Path, tiny_config: Path, *extra: str) -> int:
    # The student's backbone is random-init, drawn from torch's global generator: a fresh process starts it
    # from the same fixed state, so each run here does too.
    torch.manual_seed(0)
    sets = [f"student.name={tiny_config}", f"teacher_dir={teacher}", "distill.vision_depth=2", "data.kind=digits",
            "optim.epochs=2", "loop.max_steps_per_epoch=3", "loop.progress=false", "loop.tensorboard=false",
            "data.batch_size=16", *extra]  # fmt: skip
    return main(["train", "distill", *[a for s in sets for a in ("--set", s)], "--out", str(out)])


def test_distill_reads_the_captures_but_never_the_held_out_tenth(
    tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    teacher = _teacher_run(tmp_path / "teacher", tiny_config)
    folder = tmp_path / "captures"
    images, _, _ = load_digits_images(64)
    _capture(folder, images[:60])
    train, held = capture_images(folder, held_out=False), capture_images(folder, held_out=True)
    assert len(train) + len(held) == 60 and held, "the test needs a held-out slice"
    (folder / "README.txt").write_text("not a capture")  # foreign: skipped and counted
    (folder / train[0].parent.name / "copy.jpg").write_bytes(train[0].read_bytes())  # foreign: another name
    damaged = folder / "ab" / ("ab" + "0" * 62 + ".jpg")  # a capture's name, not an image
    assert not is_held_out(damaged.name[:-4])
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_bytes(b"\xff\xd8 truncated")
    (folder / train[1].parent.name / f".{'c' * 64}.123.tmp").write_bytes(b"in progress")  # a writer mid-way: ignored

    opened: set[Path] = set()
    load = training.data._load_rgb

    def recording(path: Path) -> Any:
        opened.add(Path(path))
        return load(path)

    monkeypatch.setattr(training.data, "_load_rgb", recording)
    out = tmp_path / "student"
    assert _distill(teacher, out, tiny_config, "data.capture_dir=" + str(folder), "loop.max_steps_per_epoch=null") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["captures"] == {
        "folder": str(folder), "images": len(train), "held_out_not_read": len(held), "foreign_skipped": 2,
        "damaged_skipped": 1, "list_reused_on_resume": False,
    }  # fmt: skip
    digits_train = 1797 - round(1797 * 0.3)  # digits_benchmark's split (within a class or two of rounding)
    assert abs(results["n_unlabeled_images"] - len(train) - digits_train) <= 10
    listed = (out / "captures.txt").read_text().split()
    assert sorted(folder / n for n in listed) == sorted(train)
    assert opened & set(train), "the captures were not read"
    assert not opened & set(held), "training read a held-out capture"
    assert damaged not in opened

    empty = tmp_path / "empty"
    (empty / "ab").mkdir(parents=True)
    (empty / "photo.png").write_bytes(b"x")
    capsys.readouterr()
    assert _distill(teacher, tmp_path / "refused", tiny_config, f"data.capture_dir={empty}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no readable capture" in err[0] and "1 foreign" in err[0], err
    assert _distill(teacher, tmp_path / "refused", tiny_config, f"data.capture_dir={tmp_path / 'nope'}") == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_interrupted_run_resumes_on_the_same_captures(
    tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = _teacher_run(tmp_path / "teacher", tiny_config)
    folder = tmp_path / "captures"
    images, _, _ = load_digits_images(64)
    _capture(folder, images[:40])
    capture = "data.capture_dir=" + str(folder)
    assert _distill(teacher, tmp_path / "full", tiny_config, capture) == 0

    save = Trainer.save_checkpoint

    def save_then_stop(self: Trainer, path: Path) -> None:
        save(self, path)
        raise KeyboardInterrupt  # the process dies right after its first epoch's checkpoint

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _distill(teacher, tmp_path / "resumed", tiny_config, capture)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["epoch"] == 1
    _capture(folder, images[40:80])  # the service captured more meanwhile: the resumed run must not see it
    assert _distill(teacher, tmp_path / "resumed", tiny_config, capture) == 0

    full = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert resumed["epoch"] == full["epoch"] == 2
    assert set(full["model"]) == set(resumed["model"]) and full["model"]
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["captures"]["list_reused_on_resume"] is True
    assert (
        results["n_unlabeled_images"]
        == json.loads((tmp_path / "full" / "results.json").read_text())["n_unlabeled_images"]
    )
    assert (tmp_path / "resumed" / "captures.txt").read_text() == (tmp_path / "full" / "captures.txt").read_text()

"""A candidate student: shadow evaluation, then promotion and rollback through a live hot swap."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from models.bundle import load_bundle
from models.card import bundle_version
from promptdistill.cli import main
from service.client import Client
from service.reload import Reloader
from tests.service.test_reload import _torch_variant


@pytest.mark.slow
def test_shadow_then_promote_and_roll_back_through_a_live_reload(
    tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any], live: Any, capsys: Any
) -> None:
    candidate = _torch_variant(tiny_bundle_dir, tmp_path / "candidate")  # same space, other files
    images = tmp_path / "held-out"
    for i, photo in enumerate(photos[:4]):
        (images / ("cat" if i % 2 else "rocket")).mkdir(parents=True, exist_ok=True)
        photo.save(images / ("cat" if i % 2 else "rocket") / f"{i}.png")
    (images / "rocket" / "damaged.png").write_bytes(b"\x89PNG not really")  # skipped and counted
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    promote = ["promote", "--link", str(link), "--candidate", str(candidate)]
    assert main(promote) == 2 and "no shadow report" in capsys.readouterr().err  # not evaluated yet
    args = ["shadow", "--teacher", str(tiny_bundle_dir), "--serving", str(link), "--candidate", str(candidate)]
    assert main([*args, "--images", str(images), "--out", str(tmp_path / "shadow.json")]) == 0
    report = json.loads((tmp_path / "shadow.json").read_text())
    assert report["images"] == 4 and report["labelled_images"] == 4 and report["students_disagree"] == 0.0
    assert report["damaged_skipped"] == 1
    assert report["serving"] == report["candidate"]  # one tower in two packagings: the same answers
    assert load_bundle(candidate).manifest.extra["shadow"]["serving_version"] == bundle_version(load_bundle(link))
    with live(bundle=link, api_key="k") as server:
        capsys.readouterr()
        assert main([*promote, "--url", server.url, "--api-key", "k"]) == 0, capsys.readouterr().err
        assert link.resolve() == candidate.resolve() and (tmp_path / "current.previous").resolve() == tiny_bundle_dir
        assert server.services.classifier.model_version == bundle_version(load_bundle(candidate))
        assert main(["promote", "--link", str(link), "--rollback", "--url", server.url, "--api-key", "k"]) == 0
        assert link.resolve() == tiny_bundle_dir.resolve()
        assert server.services.classifier.model_version == bundle_version(load_bundle(tiny_bundle_dir))
    foreign = tmp_path / "foreign"
    shutil.copytree(candidate, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["{}"]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    assert main(["promote", "--link", str(link), "--candidate", str(foreign), "--force"]) == 0  # forced: allowed
    capsys.readouterr()
    assert main(["promote", "--link", str(link), "--candidate", str(candidate)]) == 2  # now: another space
    assert "embedding space" in capsys.readouterr().err


@pytest.mark.slow
def test_a_foreign_candidate_and_a_promotion_during_a_reload_change_nothing(
    tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any], live: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "held-out"
    images.mkdir()
    for i, photo in enumerate(photos[:2]):
        photo.save(images / f"{i}.png")
    foreign = tmp_path / "foreign"  # not a student of this teacher: another text side, another space
    shutil.copytree(tiny_bundle_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["{}"]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    before = (foreign / "manifest.json").read_text()
    for serving in (tiny_bundle_dir, foreign):  # against the serving bundle, and against the teacher
        args = ["shadow", "--teacher", str(tiny_bundle_dir), "--serving", str(serving), "--candidate", str(foreign)]
        assert main([*args, "--images", str(images)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "embedding space" in err[0], err
    assert (foreign / "manifest.json").read_text() == before  # no report written into its card

    candidate = _torch_variant(tiny_bundle_dir, tmp_path / "candidate")
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    entered, gate = threading.Event(), threading.Event()
    load = Reloader._load

    def slow_load(self: Reloader) -> Any:  # a reload that takes its time: promotion comes meanwhile
        entered.set()
        assert gate.wait(60)
        return load(self)

    monkeypatch.setattr(Reloader, "_load", slow_load)
    with live(bundle=link, api_key="k") as server:
        version = server.services.classifier.model_version
        answers: list[Any] = []

        def first_reload() -> None:
            with Client(server.url, "k", timeout_s=120, retries=0) as c:
                answers.append(c.reload())

        running = threading.Thread(target=first_reload)
        running.start()
        try:
            assert entered.wait(60)
            capsys.readouterr()
            promote = ["promote", "--link", str(link), "--candidate", str(candidate), "--force"]
            assert main([*promote, "--url", server.url, "--api-key", "k"]) == 2
            err = capsys.readouterr().err
            assert "already running" in err and "link is restored" in err, err
            assert link.resolve() == tiny_bundle_dir.resolve()
            assert server.services.classifier.model_version == version
        finally:
            gate.set()
            running.join(60)
        assert answers and answers[0]["outcome"] == "unchanged"  # the first reload finishes: the same bundle again
        assert server.services.classifier.model_version == version

"""A candidate student: shadow evaluation, then promotion and rollback through a live hot swap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.bundle import load_bundle
from models.card import bundle_version
from promptdistill.cli import main
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
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle_dir)
    promote = ["promote", "--link", str(link), "--candidate", str(candidate)]
    assert main(promote) == 2 and "no shadow report" in capsys.readouterr().err  # not evaluated yet
    args = ["shadow", "--teacher", str(tiny_bundle_dir), "--serving", str(link), "--candidate", str(candidate)]
    assert main([*args, "--images", str(images), "--out", str(tmp_path / "shadow.json")]) == 0
    report = json.loads((tmp_path / "shadow.json").read_text())
    assert report["images"] == 4 and report["labelled_images"] == 4 and report["students_disagree"] == 0.0
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

"""``train mopd`` CLI: parsing, shortcuts and a one-epoch run through the handler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from training.mopd import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptdistill")
    train = parser.add_subparsers(dest="command").add_parser("train").add_subparsers(dest="train_cmd")
    cli.register(train)
    return parser


def test_shortcuts_become_overrides() -> None:
    argv = ["train", "mopd", "--dataset", "DTD", "--pool", "mixed", "--out", "x", "--set", "a.b=1", "--device", "cpu"]
    args = _parser().parse_args(argv)
    assert cli._overrides(args) == ["a.b=1", "mopd.dataset=DTD", "mopd.pool=mixed", "out_dir=x", "loop.device=cpu"]


def test_train_mopd_runs_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [
        "backbone.name=models/configs/tiny-clip.json", "backbone.pretrained=null", "data.kind=digits",
        "data.shots=2", "data.batch_size=5", "optim.epochs=1", "loop.progress=false", "loop.tensorboard=false",
        "export.bundle=false",
    ]  # fmt: skip
    argv = ["train", "mopd", "--pool", "nonsense", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"base", "novel", "hm", "zeroshot_pool"} <= set(printed)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["gate"]["test_base"]["templates"][0]["template"] == "a collection of {} floating in the sky"
    assert not (tmp_path / "run" / "bundle").exists()

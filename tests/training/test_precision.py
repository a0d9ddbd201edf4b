"""The loop's precision per device, and one set of DataLoader workers per epoch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from training import precision as precision_mod
from training.config import LoopCfg, OptimCfg
from training.loop import Trainer
from training.precision import choose_precision


class _Linear(nn.Module):
    """A minimal method: a linear classifier with CE loss; records the dtype its matmul ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[torch.dtype] = []

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.fc.named_parameters())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc(x)
        self.seen.append(logits.dtype)
        return {"loss": nn.functional.cross_entropy(logits.float(), y)}


class _PidRecorder(Dataset[Any]):
    """Each item touches ``<folder>/<pid>``: the set of files is the set of processes that loaded data."""

    def __init__(self, folder: Path, n: int = 64) -> None:
        self.folder, self.n = folder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        (self.folder / str(os.getpid())).touch()
        return torch.full((4,), float(i)), i % 3


def _trainer(tmp_path: Path, amp: bool, num_workers: int = 0, steps: int | None = None) -> Trainer:
    data = tmp_path / "pids"
    data.mkdir(exist_ok=True)
    loop = LoopCfg(device="cpu", amp=amp, progress=True, tensorboard=False, checkpoint=False, max_steps_per_epoch=steps)
    return Trainer(_Linear(), _PidRecorder(data), OptimCfg(epochs=1, warmup_epochs=0), loop, tmp_path / "run",
                   batch_size=4, num_workers=num_workers)  # fmt: skip


@pytest.mark.parametrize("native", [False, True])
def test_cpu_amp_uses_bf16_only_where_the_cpu_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool
) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="training.precision"):
        trainer = _trainer(tmp_path, amp=True, steps=2)
    trainer.fit()
    want = torch.bfloat16 if native else torch.float32
    assert trainer.method.seen == [want, want]  # type: ignore[union-attr]
    assert not trainer.scaler.is_enabled()
    assert f"cpu: {'bfloat16' if native else 'fp32'}" in caplog.text  # the choice and its reason are logged
    assert ("native bf16" in caplog.text) and (native or "no native bf16" in caplog.text)


def test_cuda_gets_fp16_with_a_scaler_and_amp_off_is_fp32() -> None:
    cuda = choose_precision(torch.device("cuda"), amp=True)
    assert (cuda.autocast, cuda.grad_scaler) == (torch.float16, True)
    off = choose_precision(torch.device("cuda"), amp=False)
    assert (off.autocast, off.grad_scaler, off.name) == (None, False, "fp32")


def test_each_epoch_starts_its_workers_once(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, amp=False, num_workers=2)
    trainer.fit()
    pids = {p.name for p in (tmp_path / "pids").iterdir()}
    assert str(os.getpid()) not in pids  # the data came from workers
    assert len(pids) == 2, f"{len(pids)} worker processes loaded data in one epoch of 2 workers"

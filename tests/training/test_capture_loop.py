"""The capture loop's verdict: "up by more than the seed spread" against a hand computation (the loop itself
runs end to end with `promptdistill experiment capture-loop`; its parts have their own tests:
tests/training/test_capture_distill.py, tests/service/test_promotion.py, tests/service/test_capture.py)."""

from __future__ import annotations

import statistics

from training.capture_loop import format_table, summarise


def _run(before: float, after: float) -> dict[str, dict[str, float]]:
    return {"before": dict.fromkeys(("agreement", "base", "novel", "hm"), before),
            "after": dict.fromkeys(("agreement", "base", "novel", "hm"), after)}  # fmt: skip


def test_up_by_more_than_the_seed_spread() -> None:
    runs = [_run(50.0, 53.0), _run(52.0, 54.0), _run(54.0, 58.0)]
    table = summarise(runs)
    hm = table["hm"]
    assert abs(hm["before"]["mean"] - 52.0) < 1e-9 and abs(hm["after"]["mean"] - 55.0) < 1e-9
    spread = max(statistics.stdev([50.0, 52.0, 54.0]), statistics.stdev([53.0, 54.0, 58.0]))
    assert abs(hm["seed_spread"] - spread) < 1e-9  # 2.65: the after column's
    assert hm["up_by_more_than_spread"] is True  # 3.0 > 2.65
    assert abs(hm["delta"]["mean"] - 3.0) < 1e-9
    close = summarise([_run(50.0, 53.0), _run(52.0, 51.0), _run(54.0, 58.0)])["hm"]  # +2.0 < spread 3.6
    assert close["up_by_more_than_spread"] is False
    text = format_table(table, runs)
    assert "| HM | 52.00 ± 2.00 | 55.00 ± 2.65 | 3.00 ± 1.00 | yes |" in text


def test_the_loop_starts_from_the_fashion_experiments_pretrained_clips() -> None:
    """The CLIPs are the fixed starting point: pre-trained on all train images, the Fashion-MNIST
    experiment's cache, whatever the loop's first pool or its recipe overrides."""
    from training.capture_loop import CaptureLoopCfg, _fashion_cfg, pretrain_cfg
    from training.fashion import STUDENT_CONFIG, TEACHER_CONFIG, FashionCfg, cache_path

    cfg = CaptureLoopCfg(train_per_class=100, test_per_class=10, fashion={"distill_epochs": 3})
    assert pretrain_cfg(cfg).train_per_class is None
    for config in (TEACHER_CONFIG, STUDENT_CONFIG):
        assert cache_path(config, pretrain_cfg(cfg)) == cache_path(config, FashionCfg())
        assert cache_path(config, _fashion_cfg(cfg)) != cache_path(config, FashionCfg())  # a 1,000-image one
    assert _fashion_cfg(cfg).train_per_class == 100 and _fashion_cfg(cfg).distill_epochs == 3

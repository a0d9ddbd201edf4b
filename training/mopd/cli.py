"""``promptdistill train mopd`` and ``promptdistill train mopd-promptkd``.

Registered under the ``train`` command by training/cli.py (one line there). Same conventions as
the PromptKD commands: a YAML/JSON config (``--config``) plus dotted overrides (``--set``),
progress bars, per-epoch checkpoints with automatic resume, history.csv + TensorBoard, PNG plots.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  promptdistill train mopd --set data.kind=digits --set backbone.name=models/configs/tiny-clip.json \\
      --set backbone.pretrained=null --set optim.epochs=2 --out runs/mopd-digits
  promptdistill train mopd --config configs/mopd.yaml --set mopd.dataset=Flowers102 \\
      --set data.kind=coop_split --set data.root=/data/flowers --set data.split_file=/data/split_zhou_OxfordFlowers.json
  promptdistill train mopd --pool nonsense ...        (ablation: a pool of nonsense sentences)
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON run config (see docs/mopd.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=5")
    p.add_argument("--out", default=None, help="output folder (overrides out_dir in the config)")
    p.add_argument("--dataset", default=None, help="shortcut for --set mopd.dataset=NAME (pool + §2.4 defaults)")
    p.add_argument("--pool", default=None, help="dataset | generic | mixed | nonsense | BENCHMARK | FILE")


def register(train_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``mopd`` and ``mopd-promptkd`` to the ``train`` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = train_sub.add_parser(
        "mopd",
        help="MoPD: CoOp prompt distilled from a gated mixture of hard prompts",
        epilog=EXAMPLE,
        formatter_class=fmt,
    )
    _common(p)
    p.set_defaults(func=_mopd)
    c = train_sub.add_parser(
        "mopd-promptkd",
        help="experiment: MoPD-tuned teacher text prompt, then PromptKD's student (docs/mopd.md)",
        formatter_class=fmt,
    )
    _common(c)
    c.set_defaults(func=_combined)


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set)
    if args.dataset:
        sets.append(f"mopd.dataset={args.dataset}")
    if args.pool:
        sets.append(f"mopd.pool={args.pool}")
    if args.out:
        sets.append(f"out_dir={args.out}")
    return sets


def _mopd(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.mopd.config import MoPDRunCfg
    from training.mopd.trainer import run_mopd

    cfg = load_config(MoPDRunCfg, args.config, _overrides(args))
    run = run_mopd(cfg)
    r = run.results
    log.info("base %.2f  novel %.2f  HM %.2f", r["base"], r["novel"], r["hm"])
    return 0


def _combined(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.mopd.combined import CombinedRunCfg, run_combined

    cfg = load_config(CombinedRunCfg, args.config, _overrides(args))
    run_combined(cfg)
    return 0

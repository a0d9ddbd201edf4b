"""``promptdistill train mopd`` and ``promptdistill train mopd-promptkd``.

Registered under the ``train`` command by training/cli.py (one line there). Same conventions as
the PromptKD commands: a YAML/JSON config (``--config``) plus dotted overrides (``--set``),
progress bars, per-epoch checkpoints with automatic resume, history.csv + TensorBoard, PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from training.cli import LOOP_FIELDS  # one text for every train command

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  promptdistill train mopd --set data.kind=digits --set backbone.name=models/configs/tiny-clip.json \\
      --set backbone.pretrained=null --set optim.epochs=2 --out runs/mopd-digits
  promptdistill train mopd --config configs/mopd.yaml --set mopd.dataset=Flowers102 \\
      --set data.kind=coop_split --set data.root=/data/flowers --set data.split_file=/data/split_zhou_OxfordFlowers.json
  promptdistill train mopd --pool nonsense ...        (ablation: a pool of nonsense sentences)
"""


SET_HELP = "override a config field, e.g. --set optim.epochs=5 (repeatable; values parsed as YAML)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON run config (see docs/mopd.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--out", default=None, help="shortcut for --set out_dir=OUT")
    p.add_argument("--device", default=None, help="shortcut for --set loop.device=DEVICE (auto|cpu|cuda|cuda:1)")
    p.add_argument("--dataset", default=None, help="shortcut for --set mopd.dataset=NAME (pool + §2.4 defaults)")
    p.add_argument("--pool", default=None, help="dataset | generic | mixed | nonsense | BENCHMARK | FILE")


def register(train_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``mopd`` and ``mopd-promptkd`` to the ``train`` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = train_sub.add_parser(
        "mopd",
        help="MoPD: CoOp prompt distilled from a gated mixture of hard prompts",
        epilog=EXAMPLE + "\n" + LOOP_FIELDS,
        formatter_class=fmt,
    )
    _common(p)
    p.set_defaults(func=_mopd)
    c = train_sub.add_parser(
        "mopd-promptkd",
        help="experiment: MoPD-tuned teacher text prompt, then PromptKD's student (docs/mopd.md)",
        epilog=LOOP_FIELDS,
        formatter_class=fmt,
    )
    _common(c)
    c.set_defaults(func=_combined)


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.overrides)
    if args.dataset:
        sets.append(f"mopd.dataset={args.dataset}")
    if args.pool:
        sets.append(f"mopd.pool={args.pool}")
    if args.out:
        sets.append(f"out_dir={args.out}")
    if args.device:
        sets.append(f"loop.device={args.device}")
    return sets


def _emit(obj: dict[str, Any]) -> None:
    """The command's result on stdout as JSON (per-class lists left out), like the PromptKD commands."""

    def strip(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if not k.endswith("per_class")}
        return o

    sys.stdout.write(json.dumps(strip(obj), indent=2) + "\n")


def _mopd(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.mopd.config import MoPDRunCfg
    from training.mopd.trainer import run_mopd

    cfg = load_config(MoPDRunCfg, args.config, _overrides(args))
    r = run_mopd(cfg).results
    _emit({k: r[k] for k in ("base", "novel", "hm", "zeroshot_pool", "loss_weights", "top_k", "epochs") if k in r})
    return 0


def _combined(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.mopd.combined import CombinedRunCfg, run_combined

    cfg = load_config(CombinedRunCfg, args.config, _overrides(args))
    r = run_combined(cfg)
    student = {k: r["student"][k] for k in ("last", "best", "bundle") if k in r["student"]}
    _emit({"teacher_mopd": r["teacher_mopd"], "student": student})
    return 0

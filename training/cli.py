"""``promptdistill train teacher|distill``, ``promptdistill evaluate``, ``promptdistill demo``.

Every run is driven by a YAML/JSON config (training/configs/promptkd/*.yaml); any field can be
overridden with ``--set section.field=value`` (repeatable). Heavy imports happen in handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# a run's protocol -> the metric `evaluate` reports (training/protocols.py)
EVAL_PROTOCOL = {"base2novel": "base2novel", "all": "all", "cross_dataset": "all", "domain_generalization": "all"}
SET_HELP = "override a config field, e.g. --set optim.lr=0.01 (repeatable; values parsed as YAML)"
LOOP_FIELDS = """loop fields often set with --set:
  loop.max_steps_per_epoch=N   stop each epoch after N optimiser steps (a quick look, a smoke test;
                               evaluation and export still run on the capped run)
  loop.amp=true                mixed precision where the device has it: fp16 + grad scaler on CUDA,
                               bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs
                               (the choice and its reason are logged)
  loop.progress=false          no progress bars;   loop.resume=false   start over, ignore checkpoint.pt
  loop.device=cuda|cpu|auto    where to train;     loop.seed=N         the run's seed
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = sub.add_parser("train", help="train a PromptKD teacher (PromptSRC) or distill a student")
    tsub = train.add_subparsers(dest="train_cmd", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    teacher = tsub.add_parser(
        "teacher", help="PromptSRC teacher on the k-shot base classes", epilog=LOOP_FIELDS, formatter_class=fmt
    )
    _common(teacher)
    teacher.set_defaults(func=_train_teacher)
    distill = tsub.add_parser(
        "distill",
        help="PromptKD student on unlabeled images; ends by exporting a bundle",
        epilog=LOOP_FIELDS,
        formatter_class=fmt,
    )
    _common(distill)
    distill.add_argument("--onnx", action="store_true", help="also export the student image tower to ONNX")
    distill.add_argument("--int8", action="store_true", help="also a dynamically quantised int8 ONNX graph")
    distill.set_defaults(func=_train_distill)
    __import__("training.mopd.cli", fromlist=["register"]).register(tsub)  # MoPD (issue 4): train mopd, mopd-promptkd

    ev = sub.add_parser(
        "evaluate", help="a bundle (student or teacher) on a dataset under a protocol, or mean/std of result files"
    )
    ev.add_argument("--bundle", help="bundle folder to evaluate")
    ev.add_argument("--config", help="YAML/JSON config whose `data` section names the dataset")
    ev.add_argument("--set", dest="overrides", action="append", default=[], help=SET_HELP)
    ev.add_argument(
        "--protocol",
        choices=["base2novel", "all", "cross_dataset", "domain_generalization"],
        help="base2novel: base/novel/HM; all (= cross_dataset, domain_generalization): all-class accuracy "
        "(default: the config's top-level `protocol`, else base2novel)",
    )
    ev.add_argument("--out", help="write the results JSON here")
    ev.add_argument("--summarize", nargs="+", metavar="RESULTS_JSON", help="mean/std over seeds of results.json files")
    ev.set_defaults(func=_evaluate)

    _register_convert(sub)

    exp = sub.add_parser("experiment", help="offline benchmarks beyond the demo (docs/experiments.md)")
    esub = exp.add_subparsers(dest="experiment_cmd", required=True)
    fm = esub.add_parser(
        "fashion-mnist", help="base-to-novel on Fashion-MNIST: zero-shot, CoOp, MoPD, PromptSRC, PromptKD"
    )
    fm.add_argument("--out", required=True, help="output folder (summary.json, table.md, fashion_mnist.png)")
    fm.add_argument("--root", help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    fm.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 3 4 5")
    fm.add_argument("--train-per-class", type=int, help="train images kept per class (default: all 6,000)")
    fm.add_argument("--test-per-class", type=int, help="test images kept per class (default: all 1,000)")
    fm.add_argument("--pretrain-epochs", type=int, help="contrastive pre-training epochs of both CLIPs (default 4)")
    fm.add_argument("--teacher-epochs", type=int, help="PromptSRC epochs (default 20)")
    fm.add_argument("--prompt-epochs", type=int, help="CoOp / MoPD epochs (default 25)")
    fm.add_argument("--distill-epochs", type=int, help="PromptKD epochs over the unlabeled pool (default 5)")
    fm.add_argument("--pools", type=int, nargs="+", help="unlabeled images per class, 0 = all (default 100 1000 0)")
    fm.add_argument("--cache-dir", help="pre-trained CLIPs (default ~/.cache/promptdistill/fashion-clip)")
    fm.add_argument("--jobs", type=int, help="seeds run at once, one process each (default 1)")
    fm.add_argument("--no-progress", action="store_true", help="no progress bar")
    fm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any FashionCfg field, e.g. --set kd_weight=10 --set distill_lr=0.01")  # fmt: skip
    fm.set_defaults(func=_fashion)
    ec = esub.add_parser(
        "example-classes", help="classes from 1/5/16 example images vs by name, gap-corrected vs plain mean"
    )
    ec.add_argument("--bundle", required=True, help="a trained student bundle (e.g. the demo's DIR/bundle)")
    ec.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits", help="the bundle's data")
    ec.add_argument("--out", required=True, help="output folder (summary.json, table.md)")
    ec.add_argument("--draws", type=int, default=10, help="random draws of the examples per count")
    ec.set_defaults(func=_example_classes)
    p = esub.add_parser("capture-loop", help="Fashion-MNIST: serve a student, capture traffic, re-distil, promote")
    p.add_argument("--out", required=True, help="output folder (summary.json, table.md, seedN/)")
    p.add_argument("--root", help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--train-per-class", type=int, help="the first student's unlabeled images per class (100)")
    p.add_argument("--test-per-class", type=int, help="test images per class (all 1,000)")
    p.add_argument("--traffic", type=int, help="other train images sent as classify requests (5000)")
    p.add_argument("--capture-rate", type=float, help="the service's capture_rate (1.0)")
    p.add_argument("--fashion", default="{}", help="FashionCfg overrides as JSON, e.g. '{\"distill_epochs\": 5}'")
    p.add_argument(
        "--steps-control",
        action="store_true",
        help="on a finished --out folder: the first students trained for as many steps, without captures",
    )
    p.set_defaults(func=_capture_loop)

    demo = sub.add_parser("demo", help="offline end-to-end PromptKD run on scikit-learn digits (~1 min on CPU)")
    demo.add_argument("--out", required=True, help="output folder (the bundle goes to OUT/bundle)")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of the student image tower")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    demo.set_defaults(func=_demo)


def _capture_loop(args: argparse.Namespace) -> int:
    from training.capture_loop import cli

    return cli(args)


def _register_convert(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    conv = sub.add_parser("convert", help="turn released / older teachers into teacher bundles")
    csub = conv.add_subparsers(dest="convert_cmd", required=True)
    pk = csub.add_parser(
        "promptkd-teacher", help="the authors' PromptSRC/PromptKD teacher (Dassl model-best.pth.tar / model.pth.tar-N)"
    )
    pk.add_argument("checkpoint", help="Dassl checkpoint file")
    names = pk.add_mutually_exclusive_group(required=True)
    names.add_argument("--dataset", help="dataset config name (training/configs/promptkd/NAME.yaml) or path")
    names.add_argument("--classnames", help="file with one class name per line, in label-id order")
    pk.add_argument("--out", required=True, help="bundle folder to write")
    pk.add_argument("--backbone", default="ViT-L-14-quickgelu", help="open_clip architecture (default: the teachers')")
    pk.add_argument("--pretrained", default="openai", help="weights tag or file (default: openai)")
    pk.add_argument("--n-base", type=int, help="base classes (default: ceil(N/2), the CoCoOp split)")
    pk.add_argument("--trust-pickle", action="store_true", help="allow a full unpickle (the file runs code)")
    pk.set_defaults(func=_convert_promptkd)
    lg = csub.add_parser("legacy-teacher", help="a pre-bundle `train teacher` folder (teacher.json)")
    lg.add_argument("folder")
    lg.add_argument("--out", required=True, help="bundle folder to write (e.g. FOLDER/bundle)")
    lg.set_defaults(func=_convert_legacy)


def _dataset_class_names(dataset: str) -> list[str]:
    from training.benchmark import load_benchmark
    from training.config import DataCfg, read_config_file

    path = Path(dataset)
    if not path.suffix:
        path = Path(__file__).resolve().parent / "configs" / "promptkd" / f"{dataset}.yaml"
    return load_benchmark(DataCfg.model_validate(read_config_file(path).get("data", {}))).class_names


def _convert_promptkd(args: argparse.Namespace) -> int:
    from models.zeroshot import read_class_names
    from training.convert import convert_promptkd_teacher
    from training.data import prompt_name

    names = [prompt_name(n) for n in read_class_names(args.classnames)] if args.classnames else None
    names = names or _dataset_class_names(args.dataset)
    out = convert_promptkd_teacher(
        args.checkpoint, names, args.out, backbone=args.backbone, pretrained=args.pretrained,
        n_base=args.n_base, trust_pickle=args.trust_pickle, dataset=args.dataset,
    )  # fmt: skip
    _emit({"bundle": str(out), "classes": len(names)})
    return 0


def _convert_legacy(args: argparse.Namespace) -> int:
    from training.convert import convert_legacy_teacher

    _emit({"bundle": str(convert_legacy_teacher(args.folder, args.out))})
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON run config (see training/configs/promptkd/)")
    p.add_argument(
        "--data-config",
        help="take the dataset (data.kind/root/split_file/...; not shots or batch sizes) from this config",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help=SET_HELP)
    p.add_argument("--out", help="shortcut for --set out_dir=OUT")
    p.add_argument("--device", help="shortcut for --set loop.device=DEVICE (auto|cpu|cuda|cuda:1)")


def _overrides(args: argparse.Namespace) -> list[str]:
    items: list[str] = []
    if getattr(args, "data_config", None):
        from training.config import dataset_fields, read_config_file

        # only the dataset's identity; the method config keeps its shots / batch sizes / augmentation
        data, ignored = dataset_fields(read_config_file(args.data_config).get("data", {}))
        if ignored:
            log.info("--data-config %s: kept the run config's %s", args.data_config, ", ".join(sorted(ignored)))
        items += [f"data.{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in data.items()]
        dataset = Path(args.data_config).stem
        items += [f"out_dir=runs/teacher/{dataset}"] if args.func is _train_teacher else []
    items += list(args.overrides)
    if getattr(args, "out", None):
        items.append(f"out_dir={args.out}")
    if getattr(args, "device", None):
        items.append(f"loop.device={args.device}")
    return items


def _train_teacher(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.teacher import TeacherRunConfig, run_teacher

    cfg = load_config(TeacherRunConfig, args.config, _overrides(args))
    r = run_teacher(cfg)
    log.info("teacher ready in %s (base %.2f, novel %.2f, HM %.2f)", cfg.out_dir, r["base"], r["novel"], r["hm"])
    return 0


def _train_distill(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.distill import DistillRunConfig, run_distill

    items = _overrides(args) + (["export.onnx=true"] if args.onnx else []) + (["export.int8=true"] if args.int8 else [])
    cfg = load_config(DistillRunConfig, args.config, items)
    r = run_distill(cfg)
    _emit({k: r[k] for k in ("last", "best", "teacher", "bundle") if k in r}, strip_per_class=True)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import save_json

    if args.summarize:
        from training.evaluate import summarize_seeds

        results = [json.loads(Path(p).read_text()) for p in args.summarize]
        # distill results nest the protocols; teacher results are flat
        summary: dict[str, Any] = {}
        for key in ("best", "last"):
            if all(key in r for r in results):
                summary[key] = summarize_seeds([r[key] for r in results])
        if not summary:
            summary = summarize_seeds(results)
        _emit(summary)
        if args.out:
            save_json(summary, args.out)
        return 0
    if not args.bundle:
        raise ValueError("evaluate needs --bundle DIR (or --summarize FILES)")
    from training.bundle_eval import EvalRunConfig, evaluate_bundle
    from training.config import deep_merge, parse_overrides, read_config_file

    file = read_config_file(args.config) if args.config else {}
    protocol = args.protocol or file.get("protocol") or "base2novel"
    raw = {"bundle": args.bundle, "data": file.get("data", {}), "protocol": EVAL_PROTOCOL[protocol]}
    raw = deep_merge(raw, parse_overrides(args.overrides))
    result = evaluate_bundle(EvalRunConfig.model_validate(raw))
    _emit(result, strip_per_class=True)
    if args.out:
        save_json(result, args.out)
    return 0


def _fashion(args: argparse.Namespace) -> int:
    from training.config import deep_merge, parse_overrides
    from training.fashion import FashionCfg, format_claims, format_table, run_fashion

    fields = ("seeds", "train_per_class", "test_per_class", "pretrain_epochs", "teacher_epochs", "prompt_epochs",
              "distill_epochs", "pools", "root", "cache_dir", "jobs")  # fmt: skip
    raw = {k: getattr(args, k) for k in fields if getattr(args, k) is not None} | {"progress": not args.no_progress}
    cfg = FashionCfg.model_validate(deep_merge(raw, parse_overrides(args.set)))
    summary = run_fashion(args.out, cfg)
    sys.stdout.write(format_table(summary["table"], len(cfg.seeds)))
    sys.stdout.write(format_claims(summary["claims"]))
    sys.stdout.write(f"wall time: {summary['seconds']['total']:.0f} s\n")
    return 0


def _example_classes(args: argparse.Namespace) -> int:
    from training.example_classes import ExampleClassesCfg, format_table, run_example_classes

    cfg = ExampleClassesCfg(bundle=args.bundle, dataset=args.dataset, draws=args.draws)
    sys.stdout.write(format_table(run_example_classes(args.out, cfg)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.demo import DemoCfg, format_summary, run_demo

    summary = run_demo(args.out, DemoCfg(seed=args.seed, onnx=not args.no_onnx, progress=not args.no_progress))
    sys.stdout.write(format_summary(summary) + "\n")
    return 0


def _emit(obj: dict[str, Any], strip_per_class: bool = False) -> None:
    """The command's result on stdout (JSON), per-class lists left out for readability."""

    def strip(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if not (strip_per_class and k.endswith("per_class"))}
        return o

    sys.stdout.write(json.dumps(strip(obj), indent=2) + "\n")

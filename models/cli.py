"""``promptdistill bundle ...``: build and inspect bundles."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    bundle = sub.add_parser("bundle", help="build or inspect bundles")
    bsub = bundle.add_subparsers(dest="bundle_cmd", required=True)
    zs = bsub.add_parser("zeroshot", help="zero-shot bundle from a (pre)trained CLIP and class names")
    zs.add_argument("--model", required=True, help="open_clip name, model-config JSON, local-dir: or hf-hub:")
    zs.add_argument("--pretrained", default=None, help="tag, local weights file, or 'none' for random init")
    zs.add_argument("--classes", required=True, help="file with one class name per line (or a JSON list)")
    zs.add_argument("--templates", default="imagenet", help="imagenet | simple | PATH (one template per line with {})")
    zs.add_argument("--out", required=True, help="bundle folder to write")
    zs.add_argument("--onnx", action="store_true", help="also export the image tower to ONNX (parity-checked)")
    zs.add_argument(
        "--int8", action="store_true", help="also add a dynamically quantised int8 ONNX image tower (implies --onnx)"
    )
    zs.add_argument(
        "--int8-min-cosine",
        type=float,
        default=None,
        help="refuse the int8 graph if a check photo's cosine to fp32 is lower (default 0.99)",
    )
    zs.add_argument(
        "--calibration-images",
        default=None,
        metavar="DIR",
        help="held-out in-domain images (a folder); up to 2,000 are embedded into the bundle's calibration "
        "sample, which calibrated 'unknown' answers and the class quality check need",
    )
    zs.add_argument("--device", default="cpu")
    zs.set_defaults(func=_zeroshot)
    show = bsub.add_parser("inspect", help="validate a bundle and print its manifest summary")
    show.add_argument("bundle_dir")
    show.set_defaults(func=_inspect)


def _zeroshot(args: argparse.Namespace) -> int:
    from models.zeroshot import build_zeroshot_bundle, named_templates, read_class_names

    build_zeroshot_bundle(
        args.model,
        args.pretrained,
        read_class_names(args.classes),
        named_templates(args.templates),
        args.out,
        onnx=args.onnx,
        int8=args.int8,
        int8_min_cosine=args.int8_min_cosine,
        device=args.device,
        calibration_images=args.calibration_images,
    )
    log.info("bundle ready: promptdistill serve --bundle %s", args.out)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from models.bundle import load_bundle
    from models.card import model_card

    b = load_bundle(args.bundle_dir)
    m = b.manifest
    summary = {
        "schema_version": m.schema_version,
        "producer": m.producer,
        "backbones": {
            k: {"name": v.name, "pretrained": v.pretrained, "embedded": v.weights_file} for k, v in m.backbones.items()
        },
        "embed_dim": m.embed_dim,
        "logit_scale": m.logit_scale,
        "label_sets": {ls.name: len(ls.classes) for ls in m.label_sets},
        "onnx": [o.file for o in m.image_encoder.onnx],
        "text_side": m.text_encoder is not None,
        "card": model_card(b),
        "calibration": m.calibration.model_dump() if m.calibration else None,
    }
    print(json.dumps(summary, indent=2))  # noqa: T201 - this command's output is the summary
    return 0

"""Shadow evaluation and promotion of a re-distilled student: ``promptdistill shadow`` and ``promote``.

Before a candidate student serves, it is compared with the serving student on held-out images (the
capture folder's held-out slice, or any image folder): each student's top-1 agreement with the
teacher and KL(teacher || student) on the teacher's class vectors, how often the two students
disagree with each other, and accuracy where the images are in class sub-folders. The report goes
into the candidate's manifest (``extra.shadow``: the model card's evaluation) and to a JSON file.

``promote`` switches the served bundle through the service's hot swap: it refuses a candidate of
another embedding space, or one whose shadow report is worse than the serving student's by more than
``--margin`` (teacher agreement), unless ``--force``; it points the ``--link`` symlink at the
candidate atomically (the previous target is kept in ``<link>.previous``), then asks the running
service to reload (``POST /v1/admin/reload``). ``promote --rollback`` points the link back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI registers these commands without importing torch or numpy
    import numpy as np

    from models.bundle import Bundle

MANIFEST = "manifest.json"  # models.bundle.MANIFEST (not imported here: it loads torch)

log = logging.getLogger(__name__)
BATCH = 32


def embed_images(bundle: Bundle, paths: list[Path]) -> np.ndarray:
    """The bundle's image tower on these image files: [N, D] normalised embeddings (CPU, fp32)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from models.towers import build_image_tower
    from training.data import build_transform

    tower = build_image_tower(bundle, "cpu")
    transform = build_transform(bundle.manifest.image_encoder.preprocess.to_config(), train=False)
    out: list[np.ndarray] = []
    name = bundle.root.name if bundle.root is not None else "bundle"
    for start in tqdm(range(0, len(paths), BATCH), desc=f"embedding with {name}", unit="batch"):
        x = torch.stack([transform(_rgb(p)) for p in paths[start : start + BATCH]])  # [B, 3, H, W]
        with torch.no_grad():
            out.append(tower(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, bundle.manifest.embed_dim), np.float32)


def _rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))


def compare(
    teacher: np.ndarray, serving: np.ndarray, candidate: np.ndarray, vectors: np.ndarray, scale: float,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Agreement with the teacher, KL(teacher || student) and the students' disagreement on N images.

    teacher/serving/candidate: [N, D] image embeddings; vectors: [C, D] the teacher's class vectors;
    labels: [N] class indices (-1: unknown) or None.
    """
    import numpy as np

    t = _log_softmax(scale * teacher @ vectors.T)  # [N, C]
    out: dict[str, Any] = {"images": len(teacher)}
    tops = {"teacher": t.argmax(1)}
    for name, emb in (("serving", serving), ("candidate", candidate)):
        s = _log_softmax(scale * emb @ vectors.T)
        tops[name] = s.argmax(1)
        out[name] = {
            "teacher_top1_agreement": float((tops[name] == tops["teacher"]).mean()),
            "kl_teacher_student": float((np.exp(t) * (t - s)).sum(1).mean()),
        }
    out["students_disagree"] = float((tops["serving"] != tops["candidate"]).mean())
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        for name in ("teacher", "serving", "candidate"):
            acc = float((tops[name][known] == labels[known]).mean())
            out.setdefault(name, {})["accuracy"] = acc
        out["labelled_images"] = int(known.sum())
    return out


def _images(folder: Path, names: list[str]) -> tuple[list[Path], np.ndarray, int]:
    """Image files under ``folder`` (sorted), their class index from a sub-folder name (else -1), and how
    many damaged ones (not readable images) were skipped."""
    import numpy as np

    from models.captures import capture_images, scan
    from training.data import IMAGE_EXTENSIONS, readable_image

    captures = next(scan(folder), None) is not None
    if captures:  # a capture folder: its held-out slice only, unlabelled
        paths = capture_images(folder, held_out=True)
    else:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    readable = [p for p in paths if readable_image(p)]
    if len(readable) < len(paths):
        bad = sorted(set(paths) - set(readable))
        log.warning("shadow: skipped %d damaged images, not readable (first: %s)", len(bad), bad[0])
    skipped, paths = len(paths) - len(readable), readable
    if captures:
        return paths, np.full(len(paths), -1, dtype=np.int64), skipped
    index = {n: i for i, n in enumerate(names)}
    labels = [index.get(p.parent.name.replace("_", " "), -1) if p.parent != folder else -1 for p in paths]
    return paths, np.asarray(labels, dtype=np.int64), skipped


def shadow(teacher_dir: Path, serving_dir: Path, candidate_dir: Path, images: Path) -> dict[str, Any]:
    from models.bundle import bundle_space, load_bundle
    from models.card import bundle_version

    teacher, serving, candidate = (load_bundle(d) for d in (teacher_dir, serving_dir, candidate_dir))
    spaces = {bundle_space(b) for b in (serving, candidate)}
    if len(spaces) != 1:
        raise ValueError(f"the candidate's embedding space differs from the serving bundle's ({sorted(spaces)})")
    if bundle_space(teacher) not in spaces:  # a student's space is its teacher's (training/distill.py)
        raise ValueError("the students are not students of this teacher: its embedding space is another one")
    spec = teacher.manifest.label_sets[0]
    vectors = teacher.class_vectors[spec.name].float().numpy()  # [C, D]
    paths, labels, damaged = _images(images, [c.name for c in spec.classes])
    if not paths:
        raise ValueError(f"no images under {images}")
    report = compare(
        embed_images(teacher, paths), embed_images(serving, paths), embed_images(candidate, paths), vectors,
        float(teacher.manifest.logit_scale), labels,
    )  # fmt: skip
    report |= {
        "serving_version": bundle_version(serving),
        "teacher": bundle_version(teacher),
        "images_dir": str(images),
        "damaged_skipped": damaged,
    }
    return report


def write_into_card(candidate_dir: Path, report: dict[str, Any]) -> None:
    """Put the report into the candidate's manifest (extra.shadow), atomically; its files stay as they are."""
    path = candidate_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("extra", {})["shadow"] = report
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


def promotion_problem(candidate: Bundle, serving: Bundle, margin: float) -> str | None:
    """Why the candidate must not replace the serving student (None: it may)."""
    from models.bundle import bundle_space
    from models.card import bundle_version

    if bundle_space(candidate) != bundle_space(serving):
        return "the candidate is of another embedding space than the serving bundle (restart with it instead)"
    report = candidate.manifest.extra.get("shadow")
    if not isinstance(report, dict) or report.get("serving_version") != bundle_version(serving):
        return "the candidate has no shadow report against the serving bundle; run `promptdistill shadow` first"
    new = report["candidate"]["teacher_top1_agreement"]
    old = report["serving"]["teacher_top1_agreement"]
    if new < old - margin:
        return f"the candidate agrees with the teacher less ({new:.3f}) than the serving student ({old:.3f}) - margin"
    return None


def switch_link(link: Path, target: Path) -> Path | None:
    """Point ``link`` at ``target`` atomically; the old target goes to ``<link>.previous``; returns it."""
    previous = link.resolve() if link.is_symlink() else None
    tmp = link.with_name(link.name + ".switching")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve())
    os.replace(tmp, link)
    if previous is not None:
        keep = link.with_name(link.name + ".previous")
        keep.unlink(missing_ok=True)
        keep.symlink_to(previous)
    return previous


# ----------------------------------------------------------------- CLI
def register(sub: Any) -> None:
    p = sub.add_parser("shadow", help="compare a candidate student with the serving one on held-out images")
    p.add_argument("--teacher", required=True, help="the teacher bundle both students were distilled from")
    p.add_argument("--serving", required=True, help="the bundle serving now")
    p.add_argument("--candidate", required=True, help="the re-distilled student")
    p.add_argument(
        "--images",
        required=True,
        help="held-out images: a capture folder (its held-out tenth) or an image folder "
        "(class sub-folders give accuracy)",
    )
    p.add_argument("--out", help="also write the report here (JSON)")
    p.set_defaults(func=_shadow)
    q = sub.add_parser("promote", help="swap a candidate in through the service's hot reload (or --rollback)")
    q.add_argument("--link", required=True, help="the symlink the service's --bundle points at")
    q.add_argument("--candidate", help="the bundle to serve (with a shadow report against the serving one)")
    q.add_argument("--rollback", action="store_true", help="point the link back at <link>.previous")
    q.add_argument("--margin", type=float, default=0.01, help="teacher agreement the candidate may lose at most")
    q.add_argument("--force", action="store_true", help="promote despite a missing or worse shadow report")
    q.add_argument("--url", default=os.environ.get("PROMPTDISTILL_URL"), help="the service to reload (optional)")
    q.add_argument("--api-key", default=os.environ.get("PROMPTDISTILL_API_KEY"))
    q.set_defaults(func=_promote)


def _fail(command: str, why: str) -> int:
    print(f"promptdistill {command}: error: {why}", file=sys.stderr)  # noqa: T201 - the CLI's one line
    return 2


def _shadow(args: argparse.Namespace) -> int:
    from models.bundle import BundleError

    try:
        report = shadow(Path(args.teacher), Path(args.serving), Path(args.candidate), Path(args.images))
    except (BundleError, ValueError, OSError) as e:
        return _fail("shadow", str(e))
    write_into_card(Path(args.candidate), report)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)  # noqa: T201 - the command's result
    return 0


def _promote(args: argparse.Namespace) -> int:
    from models.bundle import BundleError, load_bundle

    link = Path(args.link)
    if not link.is_symlink():
        return _fail("promote", f"{link} is not a symlink (serve --bundle LINK, then promote switches LINK)")
    if args.rollback:
        previous = link.with_name(link.name + ".previous")
        if not previous.is_symlink():
            return _fail("promote", f"nothing to roll back to: {previous} does not exist")
        target = previous.resolve()
    elif args.candidate:
        target = Path(args.candidate)
        try:
            problem = promotion_problem(load_bundle(target), load_bundle(link), args.margin)
        except BundleError as e:
            return _fail("promote", str(e))
        if problem and not args.force:
            return _fail("promote", problem + " (--force to promote anyway)")
    else:
        return _fail("promote", "give --candidate DIR or --rollback")
    switch_link(link, target)
    if args.url:
        from service.client import Client, ServiceClientError

        try:
            with Client(args.url, args.api_key) as client:
                answer = client.reload()
        except ServiceClientError as e:
            previous = link.with_name(link.name + ".previous")
            switch_link(link, previous.resolve())  # the service refused it: the link goes back as well
            return _fail("promote", f"the service refused the reload, the link is restored: {e}")
        print(json.dumps(answer))  # noqa: T201
    return 0

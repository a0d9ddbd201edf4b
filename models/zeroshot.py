"""Zero-shot bundles: a frozen CLIP + template-ensemble class vectors, no training needed.

The first producer of bundles, so the service can start before any training exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from models import __version__
from models.backbone import Backbone, load_backbone
from models.bundle import (
    DEFAULT_LABEL_SET,
    Bundle,
    ClassEntry,
    ImageEncoderSpec,
    LabelSetSpec,
    Manifest,
    ParityFloor,
    PreprocessSpec,
    TextEncoderSpec,
    save_bundle,
)
from models.class_vectors import encode_class_names, validate_templates
from models.listfiles import read_string_list
from models.precision import PROBE_SOURCE, add_probes, set_floor
from models.preprocess import preprocess_batch
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from models.samples import sample_photos
from models.towers import ImageTower, backbone_ref, needs_embedded_weights

log = logging.getLogger(__name__)
BACKBONE_KEY = "clip"


def named_templates(which: str) -> list[str]:
    """``imagenet`` (OpenAI's 80), ``promptsrc`` (PromptSRC's 60 of them, models/template_sets.py),
    ``simple`` (open_clip's 2), or a file with one template per line."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if which == "promptsrc":
        from models.template_sets import PROMPTSRC_TEMPLATES

        return list(PROMPTSRC_TEMPLATES)
    if which == "imagenet":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if which == "simple":
        return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    if not Path(which).is_file():
        raise FileNotFoundError(f"templates: {which!r} is neither 'imagenet', 'promptsrc', 'simple' nor a file")
    return validate_templates(read_string_list(which, "templates file"))


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines and ``#`` comments skipped), or a JSON list."""
    names = read_string_list(path, "class file")
    if not names:
        raise ValueError(f"{path}: no class names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate class names {dupes[:5]}")
    return names


def zeroshot_bundle(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str], progress: bool = True
) -> Bundle:
    """An in-memory zero-shot bundle for a loaded backbone."""
    templates = validate_templates(templates)
    model = backbone.model
    text = PromptedTextEncoder(model, backbone.tokenizer)
    vectors = encode_class_names(text, list(class_names), templates, progress=progress)
    embed_dim = int(vectors.shape[1])
    manifest = Manifest(
        producer={"method": "zeroshot", "promptdistill": __version__},
        backbones={BACKBONE_KEY: backbone_ref(backbone)},
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.exp().item()),
        image_encoder=ImageEncoderSpec(
            backbone=BACKBONE_KEY, preprocess=PreprocessSpec.from_config(backbone.preprocess), output_dim=embed_dim
        ),
        text_encoder=TextEncoderSpec(backbone=BACKBONE_KEY, templates=templates, output_dim=embed_dim),
        label_sets=[
            LabelSetSpec(
                name=DEFAULT_LABEL_SET,
                classes=[ClassEntry(id=i, name=n, provenance="zeroshot") for i, n in enumerate(class_names)],
            )
        ],
    )
    states = {BACKBONE_KEY: model.state_dict()} if needs_embedded_weights(backbone) else {}
    return Bundle(manifest=manifest, class_vectors={DEFAULT_LABEL_SET: vectors}, backbone_states=states)


def add_onnx(
    bundle: Bundle,
    tower: ImageTower,
    out: Path,
    sample: torch.Tensor | None = None,
    *,
    int8: bool = False,
    int8_min_cosine: float | None = None,
) -> dict[str, Path]:
    """Export the image tower into ``out`` and record it in the manifest; returns files to checksum.

    With ``int8`` a dynamically quantised copy is added after the fp32 graph (``onnx[1]``), its
    int8-vs-fp32 parity (cosine, top-1 agreement over the bundle's first label set) measured on the
    sample photos and their mirror images and stored in its ``OnnxSpec.parity``; the int8 graph is
    refused below ``int8_min_cosine`` (default: the exporter's 0.99), which becomes the bundle's int8
    floor for the service's precision gate. The check images are stored as the bundle's probe images
    (models/precision.py).
    """
    from models.onnx_export import DEFAULT_MIN_COSINE, INT8_NAME, export_image_tower, quantize_image_tower

    source = PROBE_SOURCE if sample is None else "the exporter's sample images + mirror images"
    if sample is None:
        cfg = bundle.manifest.image_encoder.preprocess.to_config()
        sample = torch.from_numpy(preprocess_batch(sample_photos(), cfg))
    spec = export_image_tower(tower, out, sample)
    specs = [spec]
    parity_pixels = torch.cat([sample, sample.flip(-1)])  # [2B, 3, H, W]: photos + mirror images
    if int8:
        first_set = bundle.manifest.label_sets[0].name if bundle.manifest.label_sets else None
        vectors = bundle.class_vectors.get(first_set) if first_set else None
        floor = DEFAULT_MIN_COSINE if int8_min_cosine is None else int8_min_cosine
        specs.append(quantize_image_tower(out / spec.file, out / INT8_NAME, parity_pixels, vectors, min_cosine=floor))
        set_floor(bundle, "int8", ParityFloor(cosine_min=floor))
    enc = bundle.manifest.image_encoder.model_copy(update={"onnx": specs})
    bundle.manifest = bundle.manifest.model_copy(update={"image_encoder": enc})
    files: dict[str, Path] = add_probes(bundle, out, parity_pixels, source)
    for s in specs:
        files[s.file] = out / s.file
        if s.data_file:
            files[s.data_file] = out / s.data_file
    return files


def add_calibration_images(bundle: Bundle, tower: ImageTower, folder: str | Path, seed: int = 0) -> Bundle:
    """Embed (a bounded seeded draw of) the images under ``folder`` as ``bundle``'s calibration sample."""
    from PIL import Image

    from models.calibration import attach, chunks, draw, embed_batches, image_files

    files = image_files(folder)
    picked = draw(len(files), seed=seed).tolist()
    cfg = bundle.manifest.image_encoder.preprocess.to_config()
    device = next(tower.parameters()).device

    def batches() -> Iterator[torch.Tensor]:
        for part in chunks(picked, 64):
            images = []
            for i in part:
                with Image.open(files[i]) as im:
                    images.append(im.convert("RGB"))
            yield torch.from_numpy(preprocess_batch(images, cfg)).to(device)

    was_training = tower.training
    sample = embed_batches(tower.eval(), batches())
    tower.train(was_training)
    source = f"held-out images: {len(picked)} of {len(files)} under {Path(folder).name}"
    return attach(bundle, sample, source, seed=seed if len(picked) < len(files) else None)


def build_zeroshot_bundle(
    model: str,
    pretrained: str | None,
    class_names: Sequence[str],
    templates: Sequence[str],
    out: str | Path,
    *,
    onnx: bool = False,
    int8: bool = False,
    int8_min_cosine: float | None = None,
    device: str = "cpu",
    progress: bool = True,
    calibration_images: str | Path | None = None,
) -> Bundle:
    """Build, optionally ONNX-export, and save a zero-shot bundle; returns it loaded from ``out``.

    ``int8`` adds a dynamically quantised ONNX image tower next to the fp32 one (implies ``onnx``),
    refused below ``int8_min_cosine`` (see :func:`add_onnx`). ``calibration_images``: a folder of
    held-out in-domain images; at most ``MAX_CALIBRATION`` of them (a seeded draw) are embedded and
    stored as the bundle's calibration sample.
    """
    backbone = load_backbone(model, pretrained, device=device)
    bundle = zeroshot_bundle(backbone, class_names, templates, progress=progress)
    if calibration_images is not None:
        add_calibration_images(bundle, ImageTower(PromptedImageEncoder(backbone.model)), calibration_images)
    out = Path(out)

    def exports(stage: Path) -> dict[str, Path]:
        if not (onnx or int8):
            return add_probes(bundle, stage)  # the precision gate's images (models/precision.py)
        tower = ImageTower(PromptedImageEncoder(backbone.model))
        return add_onnx(bundle, tower, stage, int8=int8, int8_min_cosine=int8_min_cosine)

    save_bundle(bundle, out, exports=exports)
    log.info("wrote zero-shot bundle with %d classes to %s", len(class_names), out)
    return bundle

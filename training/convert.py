"""Turn the authors' released PromptSRC / PromptKD teachers (and pre-bundle teacher folders) into
teacher bundles (training/teacher.py).

``promptdistill convert promptkd-teacher CHECKPOINT --dataset NAME --out DIR``

The released teachers are Dassl checkpoints (``VLPromptLearner/model-best.pth.tar`` or
``model.pth.tar-N``): a pickled dict whose ``state_dict`` holds the CustomCLIP state, prompts in
fp16. The learned prompts map onto our ``[depth, n_tokens, width]`` rows as their IVLP code
places them (clip/model.py, trainers/promptsrc.py of zhengli97/PromptKD)::

    prompt_learner.ctx                                         -> text row 0 (after SOS)
    text_encoder.transformer.resblocks.{i}.VPT_shallow         -> text row i (replaced before block i)
    image_encoder.VPT                                          -> image row 0 (appended after pos. emb.)
    image_encoder.transformer.resblocks.{i}.VPT_shallow        -> image row i

Everything else (``prompt_learner.token_prefix/suffix``, which encode the training class names,
the frozen CLIP weights, the frozen zero-shot copy) is ignored: the backbone is rebuilt from its
reference (``ViT-L-14-quickgelu`` / ``openai`` for the released teachers) and the class vectors
are re-encoded for the names of ``--dataset``, base block then novel block.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from models.backbone import load_backbone
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg
from training.export import write_bundle
from training.teacher import prompted_teacher_bundle

log = logging.getLogger(__name__)

TEXT_CTX = "prompt_learner.ctx"
IMAGE_CTX = "image_encoder.VPT"
_DEEP = re.compile(r"^(text|image)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Dassl checkpoint (``module.`` prefixes of DataParallel removed).

    Loads with ``weights_only=True`` (no code runs); ``trust_pickle`` allows a full unpickle for
    checkpoints that also pickle other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: holds objects a weights-only load refuses ({e}); pass --trust-pickle if you trust the file"
        ) from e
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a Dassl checkpoint (no state_dict mapping)")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def prompt_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"text": [J, n, w], "image": [J, n, w]}`` from the official key names (float32)."""
    for key in (TEXT_CTX, IMAGE_CTX):
        if key not in state:
            raise ValueError(f"checkpoint has no {key!r}: not a PromptSRC / PromptKD (IVLP) teacher")
    rows: dict[str, dict[int, torch.Tensor]] = {"text": {0: state[TEXT_CTX]}, "image": {0: state[IMAGE_CTX]}}
    for key, value in state.items():
        m = _DEEP.match(key)
        if m:
            rows[m.group(1)][int(m.group(2))] = value
    out = {}
    for side, by_layer in rows.items():
        layers = sorted(by_layer)
        if layers != list(range(len(layers))):
            raise ValueError(f"{side} prompts: deep rows for layers {layers[1:]} are not 1..{len(layers) - 1}")
        shapes = {tuple(v.shape) for v in by_layer.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{side} prompts: rows must all be [n_tokens, width], got {sorted(shapes)}")
        out[side] = torch.stack([by_layer[i].float() for i in layers])
    return out


def convert_promptkd_teacher(
    checkpoint: str | Path,
    class_names: list[str],
    out: str | Path,
    *,
    backbone: str = "ViT-L-14-quickgelu",
    pretrained: str | None = "openai",
    n_base: int | None = None,
    trust_pickle: bool = False,
    dataset: str | None = None,
) -> Path:
    """Write a teacher bundle for ``class_names`` (label-id order) from an official checkpoint."""
    rows = prompt_rows(read_checkpoint(checkpoint, trust_pickle))
    bb = load_backbone(backbone, pretrained)
    (jt, nt, _), (ji, ni, _) = rows["text"].shape, rows["image"].shape
    text = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(n_tokens=nt, depth=jt))
    image = PromptedImageEncoder(bb.model, VisualPromptCfg(n_tokens=ni, depth=ji))
    for side, enc in (("text", text), ("image", image)):
        assert enc.prompts is not None
        if enc.prompts.shape != rows[side].shape:
            raise ValueError(
                f"{side} prompts are {tuple(rows[side].shape)}; {backbone} needs {tuple(enc.prompts.shape)}"
            )
        with torch.no_grad():
            enc.prompts.copy_(rows[side])
    m = math.ceil(len(class_names) / 2) if n_base is None else n_base
    bundle = prompted_teacher_bundle(
        bb, image.eval(), text.eval(), class_names, m, float(bb.model.logit_scale.exp().item()),
        producer={"method": "promptsrc", "converted_from": "promptkd-dassl"},
        extra={"source_checkpoint": str(checkpoint), "dataset": dataset, "metrics": {}},
    )  # fmt: skip
    write_bundle(bundle, out)
    log.info("teacher bundle (%d classes, %d base) -> %s", len(class_names), m, out)
    return Path(out)


def convert_legacy_teacher(folder: str | Path, out: str | Path) -> Path:
    """A pre-bundle ``train teacher`` folder (teacher.json + teacher.safetensors) -> teacher bundle."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    info_path = folder / "teacher.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} holds no teacher.json (the pre-bundle teacher format)")
    info = json.loads(info_path.read_text())
    ref = info["backbone"]
    weights = str(folder / info["embedded_weights"]) if info.get("embedded_weights") else ref["pretrained"]
    bb = load_backbone(ref["name"], weights, model_config=ref.get("open_clip_config") or None)
    tensors = load_file(folder / "teacher.safetensors")
    rows = {"text": tensors["text_prompts"], "image": tensors["image_prompts"]}
    text = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(rows["text"].shape[1], rows["text"].shape[0]))
    image = PromptedImageEncoder(bb.model, VisualPromptCfg(rows["image"].shape[1], rows["image"].shape[0]))
    with torch.no_grad():
        assert text.prompts is not None and image.prompts is not None
        text.prompts.copy_(rows["text"])
        image.prompts.copy_(rows["image"])
    bundle = prompted_teacher_bundle(
        bb, image.eval(), text.eval(), list(info["class_names"]), int(info["n_base"]), float(info["logit_scale"]),
        producer={"method": "promptsrc", "converted_from": "teacher.json"},
        extra={"promptsrc": info.get("promptsrc", {}), "metrics": _legacy_metrics(folder)},
        embed_weights=True if info.get("embedded_weights") else None,  # embedded weights stay embedded
    )  # fmt: skip
    write_bundle(bundle, out)
    return Path(out)


def _legacy_metrics(folder: Path) -> dict[str, float]:
    import json

    path = folder / "results.json"
    r = json.loads(path.read_text()) if path.is_file() else {}
    return {k: float(r[k]) for k in ("base", "novel", "hm") if k in r}

"""CLIP-style contrastive pre-training of BOTH towers of a tiny CLIP on in-memory images.

Stands in for web-scale CLIP pre-training in the offline Fashion-MNIST experiment
(training/fashion.py, docs/experiments.md): every image is paired with a caption of its class
drawn from a pool of templates (PromptSRC's 60 ImageNet templates by default: "a bad photo of a
{}.", "a sculpture of a {}.", ...), and image tower, text tower and logit scale are trained
together with the symmetric InfoNCE loss of CLIP.

With ten classes a batch of images holds many images of one class, and a batch of captions many
captions of one class, so a plain one-to-one InfoNCE would push apart pairs that match. The
targets are therefore label-aware (UniCL, Yang et al. 2022): an image's positives are all the
captions of its class in the batch and a caption's positives all images of its class, each row's
target uniform over its positives. Per step a few templates are drawn and every class name is
captioned with each of them (``templates_per_step x n_classes`` captions).

Cost control on 2 CPU cores: augmentation runs on whole uint8 batches (random resized crop and
flip through one ``affine_grid``), and the 49,408-row token embedding gets *sparse* gradients
(``SparseAdam``) so a step touches only the rows of the caption tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from models.backbone import Backbone
from training.config import Cfg

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of steps just done


class ContrastiveCfg(Cfg):
    """Pre-training schedule (AdamW, linear warm-up then cosine, as CLIP)."""

    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=256, ge=2)
    templates_per_step: int = Field(default=4, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    min_scale: float = Field(default=0.5, gt=0, le=1)  # random resized crop: area share kept
    hflip: bool = True
    init_logit_scale: float = Field(default=1 / 0.07, gt=0)  # CLIP's initial temperature
    max_logit_scale: float = Field(default=100.0, gt=0)  # CLIP's clamp
    seed: int = 0


def pixels_of(images: Sequence[Image.Image]) -> torch.Tensor:
    """Grey (or RGB) PIL images of one size as a uint8 tensor [N, H, W] (first channel)."""
    return torch.from_numpy(np.stack([np.asarray(im)[..., 0] if im.mode == "RGB" else np.asarray(im) for im in images]))


def augment(
    pixels: torch.Tensor,
    gen: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float = 0.5,
    hflip: bool = True,
) -> torch.Tensor:
    """uint8 [B, H, W] -> normalised float [B, 3, H, W] through a per-image random resized crop
    (area share in ``[min_scale, 1]``, aspect ratio in ``[3/4, 4/3]``) and horizontal flip."""
    b, h, w = pixels.shape
    x = pixels.float().div(255.0).unsqueeze(1)
    area = torch.empty(b).uniform_(min_scale, 1.0, generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half-extent of the crop, in [-1, 1] units
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sx)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return to_model_input(x, mean, std)


def to_model_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1] -> [B, 3, H, W] normalised with the backbone's per-channel mean/std."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - m) / s


def unicl_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, text_labels: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Symmetric InfoNCE with label-aware targets (see the module docstring).

    image [B, D], text [T, D] normalised; labels [B] / text_labels [T] class ids. Rows without a
    positive (a caption whose class has no image in the batch) are left out of their direction.
    """
    logits = scale * image @ text.t()  # [B, T]
    pos = (labels[:, None] == text_labels[None, :]).float()

    def direction(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        keep = p.sum(1) > 0
        target = p[keep] / p[keep].sum(1, keepdim=True)
        return -(target * F.log_softmax(lg[keep], dim=1)).sum(1).mean()

    return 0.5 * (direction(logits, pos) + direction(logits.t(), pos.t()))


def _param_groups(model: Any) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(decayed, not decayed, sparse): weight matrices decay; gains, biases, embeddings, the scale do not."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if name == "token_embedding.weight":
            continue
        plain = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("ln")
        (no_decay if plain else decay).append(p)
    return decay, no_decay, [model.token_embedding.weight]


def pretrain_contrastive(
    bb: Backbone,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    cfg: ContrastiveCfg,
    progress: Progress | None = None,
    what: str = "clip",
) -> list[float]:
    """Train ``bb.model`` in place (both towers and the logit scale); returns the mean loss per epoch.

    pixels: uint8 [N, H, W] at the backbone's input size; labels: [N] ids into ``class_names``.
    Leaves the model frozen in eval mode, as :func:`models.backbone.load_backbone` hands it out.
    """
    model: Any = bb.model
    size = bb.preprocess.size
    if tuple(pixels.shape[1:]) != tuple(size):
        raise ValueError(f"images are {tuple(pixels.shape[1:])}, the backbone takes {tuple(size)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        tokens = torch.stack([bb.tokenizer([t.format(n) for n in class_names]) for t in templates])  # [P, C, L]
        model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    model.requires_grad_(True)
    model.train()
    model.token_embedding.sparse = True
    decay, no_decay, sparse = _param_groups(model)
    dense = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sparse_opt = torch.optim.SparseAdam(sparse, lr=cfg.lr)
    batch = min(cfg.batch_size, len(pixels))
    steps_per_epoch = len(pixels) // batch
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    n_cls = len(class_names)
    losses: list[float] = []
    step = 0
    try:
        for epoch in range(cfg.epochs):
            t0, running = time.perf_counter(), 0.0
            order = torch.randperm(len(pixels), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch : (i + 1) * batch]
                x = augment(pixels[idx], gen, bb.preprocess.mean, bb.preprocess.std, cfg.min_scale, cfg.hflip)
                chosen = torch.randperm(len(templates), generator=gen)[: cfg.templates_per_step]
                text_labels = torch.arange(n_cls).repeat(len(chosen))
                image = F.normalize(model.encode_image(x), dim=-1)
                text = F.normalize(model.encode_text(tokens[chosen].flatten(0, 1)), dim=-1)
                loss = unicl_loss(image, text, labels[idx], text_labels, model.logit_scale.exp())
                for opt in (dense, sparse_opt):
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step)
                    opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                dense.step()
                sparse_opt.step()  # type: ignore[no-untyped-call]
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
                running += loss.item()
                step += 1
                if progress is not None:
                    progress(1)
            losses.append(running / max(1, steps_per_epoch))
            log.info("pre-training %s: epoch %d/%d loss %.3f scale %.1f (%.0f s)", what, epoch + 1, cfg.epochs,
                     losses[-1], model.logit_scale.exp().item(), time.perf_counter() - t0)  # fmt: skip
    finally:
        model.token_embedding.sparse = False
        model.requires_grad_(False)
        model.eval()
    return losses


@torch.no_grad()
def zero_shot_accuracy(
    bb: Backbone, pixels: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], template: str,
    batch_size: int = 500,
) -> float:  # fmt: skip
    """All-class top-1 accuracy (%) of ``template`` captions on un-augmented images."""
    model: Any = bb.model
    text = F.normalize(model.encode_text(bb.tokenizer([template.format(n) for n in class_names])), dim=-1)
    correct = 0
    for i in range(0, len(pixels), batch_size):
        x = to_model_input(
            pixels[i : i + batch_size].float().div(255.0).unsqueeze(1), bb.preprocess.mean, bb.preprocess.std
        )
        pred = (F.normalize(model.encode_image(x), dim=-1) @ text.t()).argmax(1)
        correct += int((pred == labels[i : i + batch_size]).sum())
    return 100.0 * correct / len(pixels)

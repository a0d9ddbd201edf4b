"""Class vectors: the one function that turns class names into classifier rows.

Used by the zero-shot bundle builder, the trainers' exporters and the service's runtime class
addition, so a name encoded at serving time equals the row the exporter stored for it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.prompts import PromptedTextEncoder

PLACEHOLDER = "{}"


def class_name(raw: str) -> str:
    """THE spelling of a class name, for training and serving alike: Unicode NFC, ``_`` as a space
    (every official prompt learner does ``name.replace("_", " ")``: "apple_pie" is "apple pie"),
    no surrounding whitespace. A name given either way is then one class, not two."""
    return unicodedata.normalize("NFC", raw).replace("_", " ").strip()


def format_template(template: str, name: str) -> str:
    """Insert a class name into a template (``{}`` marks the spot; braces in names are safe)."""
    return template.replace(PLACEHOLDER, name)


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Templates must be non-empty strings holding exactly one ``{}``."""
    out = list(templates)
    if not out:
        raise ValueError("at least one template is needed")
    for t in out:
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' where the class name goes")
    return out


@torch.no_grad()
def encode_class_names(
    encoder: PromptedTextEncoder,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class vectors [N, D]: the normalised mean of the normalised template embeddings per name.

    Args:
        encoder: the bundle's text side (frozen backbone + learned prompts, if any).
        names: class names, in index order.
        templates: strings with one ``{}``; learned-prompt text sides use ``["{}."]``.
        batch_size: texts per forward pass.
        progress: show a tqdm bar over class names.
        on_batch: optional callback with the number of names finished so far.
    """
    templates = validate_templates(templates)
    if not names:
        raise ValueError("no class names to encode")
    texts = [format_template(t, n) for n in names for t in templates]  # name-major
    was_training = encoder.training
    encoder.eval()
    feats: list[torch.Tensor] = []
    bar = tqdm(total=len(names), desc="encoding class names", unit="class", disable=not progress)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        feats.append(encoder.encode(chunk, normalize=True).float().cpu())
        done = min(len(names), (start + len(chunk)) // len(templates))
        bar.update(done - bar.n)
        if on_batch is not None:
            on_batch(done)
    bar.close()
    encoder.train(was_training)
    per_template = torch.cat(feats).reshape(len(names), len(templates), -1)  # [N, T, D]
    return F.normalize(per_template.mean(dim=1), dim=-1)

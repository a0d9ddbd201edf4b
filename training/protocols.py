"""THE evaluation of a classifier "image features x class vectors" under the papers' protocols.

Every method (PromptSRC teacher, PromptKD student, MoPD, zero-shot pools, exported bundles) is a
pair (normalised image features, class vectors for all names in label-id order) and goes through
:func:`evaluate_classifier`; nothing else computes an accuracy.

Protocols (PromptKD Tables 1-3, algorithms.md §0, §1.5):

* ``base2novel``: base test images classified among the base rows ``[0, m)``, novel test images
  among the novel rows ``[m, N)``; reports ``base``, ``novel``, ``hm`` (+ per class).
* ``all``: every test image among all N rows, the metric of the cross-dataset and
  domain-generalisation tables; reports ``accuracy`` (+ per class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from training.benchmark import Benchmark
from training.data import Subset
from training.evaluate import accuracy, base_novel_result, per_class_accuracy, predict

EvalProtocol = Literal["base2novel", "all"]
Features = Callable[[torch.Tensor], torch.Tensor]  # pixels [B, 3, H, W] -> normalised [B, D]

_KEYS: dict[Subset, str] = {"base": "base", "new": "novel", "all": "accuracy"}


def evaluate_classifier(
    features: Features,
    class_vectors: torch.Tensor,
    logit_scale: float,
    bench: Benchmark,
    transform: Any,
    device: torch.device | str = "cpu",
    *,
    protocol: EvalProtocol = "base2novel",
    subsets: Sequence[Subset] | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Top-1 accuracies (percent) of ``logit_scale * features(x) @ class_vectors[rows].T``.

    Args:
        features: normalised image features (the model is put in eval mode by the caller).
        class_vectors: [N, D] rows in the benchmark's label-id order (base block, then novel).
        protocol: ``base2novel`` (base / novel / HM) or ``all`` (all-class accuracy).
        subsets: evaluate only these (e.g. ``("base",)`` for the per-epoch base-test check).
    """
    if class_vectors.shape[0] != len(bench.class_names):
        raise ValueError(f"{class_vectors.shape[0]} class vectors for {len(bench.class_names)} classes")
    chosen: Sequence[Subset] = subsets or (("base", "new") if protocol == "base2novel" else ("all",))
    out: dict[str, Any] = {}
    for subset in chosen:
        w = class_vectors[bench.rows(subset)].to(device).float()

        def logits_fn(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            return logit_scale * features(x).float() @ w.t()

        logits, labels = predict(
            logits_fn, bench.dataset("test", subset, transform), device=device, batch_size=batch_size
        )
        key = _KEYS[subset]
        out[key] = accuracy(logits, labels)
        out[f"{key}_per_class"] = per_class_accuracy(logits, labels)
    if "base" in out and "novel" in out:
        return base_novel_result(out.pop("base"), out.pop("novel"), **out)
    return out


def headline(result: dict[str, Any]) -> str:
    """One log line for a result of either protocol."""
    if "hm" in result:
        return f"base {result['base']:.2f} novel {result['novel']:.2f} HM {result['hm']:.2f}"
    return f"accuracy {result['accuracy']:.2f}"

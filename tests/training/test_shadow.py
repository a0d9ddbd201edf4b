"""Shadow evaluation: the comparison against a reference computation (the end-to-end run with a live
reload: tests/service/test_promotion.py)."""

from __future__ import annotations

import numpy as np
import torch

from training.shadow import compare


def test_compare_matches_a_reference_computation() -> None:
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    vectors, teacher = unit(rng.standard_normal((5, 8))), unit(rng.standard_normal((20, 8)))
    serving, candidate = unit(teacher + 0.3 * rng.standard_normal((20, 8))), unit(rng.standard_normal((20, 8)))
    labels = np.array([i % 5 if i % 3 else -1 for i in range(20)])
    got = compare(teacher, serving, candidate, vectors, 10.0, labels)
    t = torch.log_softmax(torch.from_numpy(10.0 * teacher @ vectors.T), 1)
    for name, emb in (("serving", serving), ("candidate", candidate)):
        s = torch.log_softmax(torch.from_numpy(10.0 * emb @ vectors.T), 1)
        kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
        assert abs(got[name]["kl_teacher_student"] - float(kl)) < 1e-9
        assert got[name]["teacher_top1_agreement"] == float((s.argmax(1) == t.argmax(1)).double().mean())
        known = labels >= 0
        assert got[name]["accuracy"] == float((s.argmax(1).numpy()[known] == labels[known]).mean())
    assert got["students_disagree"] == float(
        (serving @ vectors.T).argmax(1).__ne__((candidate @ vectors.T).argmax(1)).mean()
    )

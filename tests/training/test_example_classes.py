"""The example-classes experiment's scoring: parity with a per-image loop, and its table."""

from __future__ import annotations

import numpy as np

from training.example_classes import accuracy, format_table


def test_accuracy_counts_only_the_asked_images_among_the_given_classes() -> None:
    rng = np.random.default_rng(0)
    vectors, emb = rng.standard_normal((4, 8)), rng.standard_normal((50, 8))
    labels = rng.integers(0, 6, 50)
    classes = [5, 1, 2, 3]  # row r of vectors is class classes[r]
    hits = [classes[int(np.argmax(vectors @ e))] == y for e, y in zip(emb, labels, strict=True) if y in (1, 5)]
    assert abs(accuracy(vectors, classes, emb, labels, [1, 5]) - 100 * np.mean(hits)) < 1e-9


def test_table_lists_every_count_and_vector_kind() -> None:
    cell = {"example_classes": {"mean": 50.0, "std": 1.0}, "named_classes": {"mean": 60.0, "std": 2.0}}
    r = {"named_alone": 90.0, "all_by_name": {"example_classes": 30.0, "named_classes": 70.0}, "gap_norm": 1.0,
         "shots": {"1": {"gap": cell, "plain": cell}, "16": {"gap": cell}}}  # fmt: skip
    table = format_table(r)
    assert "| 1 | plain | 50.00 ± 1.00 | 60.00 ± 2.00 |" in table and "| 16 | gap |" in table
    assert "before): 90.00" in table

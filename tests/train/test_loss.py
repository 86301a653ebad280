"""The loss parts: masked CE and the typed per-part record that becomes metrics.jsonl fields."""

import math

import pytest
import torch

from longcat2.train.config import IGNORE
from longcat2.train.loss import LossParts, first_token_ce, first_token_labels, masked_ce


def test_masked_ce_ignores_labels_and_counts_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    loss, n = masked_ce(logits, labels)
    keep = labels != IGNORE
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert n == 3 and torch.allclose(loss, want)
    none, zero = masked_ce(logits, torch.full_like(labels, IGNORE))
    assert zero == 0 and float(none) == 0.0


def test_mean_over_micro_batches_and_metric_names():
    a = LossParts(ce=2.0, z=0.5, indexer_kl=1.0, indexer_recall=0.5, indexer_recall_per_layer=[0.25, 0.75])
    b = LossParts(ce=4.0, z=1.5, indexer_kl=3.0, indexer_recall=1.0, indexer_recall_per_layer=[0.75, 1.0])
    m = LossParts.mean([a, b])
    assert (m.ce, m.z, m.indexer_kl, m.mtp) == (3.0, 1.0, 2.0, None)
    assert m.indexer_recall_per_layer == [0.5, 0.875]
    rec = m.metrics()
    assert rec == {
        "z_loss": 1.0,
        "indexer_kl": 2.0,
        "indexer_recall": 0.75,
        "indexer_recall_per_layer": [0.5, 0.875],
    }  # ce is the record's `loss`; parts a run does not compute stay out
    assert math.isclose(LossParts.mean([LossParts(ce=0.1)] * 3).ce, 0.1)
    with pytest.raises(ValueError, match="no parts"):
        LossParts.mean([])


def test_first_token_labels_keep_the_first_label_of_each_run():
    labels = torch.tensor(
        [[IGNORE, 5, 6, 7, IGNORE, IGNORE, 8, 9], [3, 4, IGNORE, 2, IGNORE, IGNORE, IGNORE, IGNORE]]
    )
    want = torch.tensor(
        [
            [IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE, 8, IGNORE],
            [3, IGNORE, IGNORE, 2, IGNORE, IGNORE, IGNORE, IGNORE],
        ]
    )
    assert torch.equal(first_token_labels(labels), want)
    none = torch.full_like(labels, IGNORE)
    assert torch.equal(first_token_labels(none), none)
    logits = torch.randn(2, 8, 10)
    loss, n = first_token_ce(logits, labels)
    full_pass, n_full = masked_ce(logits, want)  # the same CE over the whole batch with the kept labels
    assert n == n_full == 4 and torch.allclose(loss, full_pass)
    assert first_token_ce(logits, none)[1] == 0
    assert LossParts(ce=1.0, first_token=0.5).metrics() == {"first_token_loss": 0.5}

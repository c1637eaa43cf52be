import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hybrid_lora import evaluate_loss_and_token_acc
from hybrid_lora.data import IGNORE_INDEX


class TableLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a fixed bigram model with known outputs."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})


TABLE = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.5], [1.0, 1.0, 0.0]]


def hand_nll(prev: int, nxt: int) -> float:
    row = TABLE[prev]
    return -(row[nxt] - math.log(sum(math.exp(v) for v in row)))


def hand_hit(prev: int, nxt: int) -> int:
    row = TABLE[prev]
    return int(max(range(3), key=lambda j: row[j]) == nxt)


# three sequences, padded to length 5 with very uneven padding (pad id 0, label -100)
SEQS = [[1, 2, 0, 1, 1], [2, 1], [0, 2, 2]]


def loader(batch_size):
    ids = torch.zeros(len(SEQS), 5, dtype=torch.long)
    mask = torch.zeros(len(SEQS), 5, dtype=torch.long)
    for i, s in enumerate(SEQS):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size)


def test_defect6_loss_and_accuracy_are_token_weighted_over_the_loader():
    pairs = [(s[t], s[t + 1]) for s in SEQS for t in range(len(s) - 1)]
    want_loss = sum(hand_nll(p, n) for p, n in pairs) / len(pairs)
    want_acc = sum(hand_hit(p, n) for p, n in pairs) / len(pairs)
    model = TableLM(TABLE)
    model.train()
    for bs in (1, 2, 3):  # the batching must not matter
        got = evaluate_loss_and_token_acc(model, loader(bs))
        assert got["tokens"] == len(pairs) == 7
        assert got["loss"] == pytest.approx(want_loss, rel=1e-6)
        assert got["acc"] == pytest.approx(want_acc, rel=1e-12)
    assert model.training  # mode restored
    # the original's per-batch mean of means gives a different number on this data
    per_seq = [sum(hand_nll(s[t], s[t + 1]) for t in range(len(s) - 1)) / (len(s) - 1) for s in SEQS]
    assert abs(sum(per_seq) / len(per_seq) - want_loss) > 1e-3


def test_evaluation_builds_no_graph():
    model = TableLM(TABLE)
    evaluate_loss_and_token_acc(model, loader(2))
    assert model.table.grad is None


@pytest.mark.parametrize("block", [None, 1, 3, 7])
def test_sequence_sums_match_a_per_token_float64_reference(block):
    """The blocked one-pass sums (labels shifted instead of logits) against a position-by-
    position reference in float64, with blocks that split sequences and uneven padding."""
    from hybrid_lora.evaluate import sequence_sums

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, 4:], labels[2, 1:] = IGNORE_INDEX, IGNORE_INDEX
    nll, tokens, hits = sequence_sums(logits, labels, block=block)
    for b in range(3):
        ref_nll, ref_n, ref_hits = 0.0, 0, 0
        for t in range(5):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            ref_nll += (torch.logsumexp(row, 0) - row[y]).item()
            ref_n += 1
            ref_hits += int(row.argmax().item() == y)
        assert nll[b].item() == pytest.approx(ref_nll, rel=1e-6, abs=1e-6)
        assert (tokens[b].item(), hits[b].item()) == (ref_n, ref_hits)
    assert tokens.tolist() == [3, 5, 0]

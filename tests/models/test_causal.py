"""Log-likelihood multiple-choice scoring (the lm-evaluation-harness method) on a hand-made case,
and the instruction-tuning loss, with a bigram "language model" whose probabilities are known."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flux.data.instructions import EncodedChoices, EncodedInstructions
from flux.models.causal import MoECausalLM, answer_logprobs, choice_metrics

V = 5
# P(next | current) as a table: row = current token, column = next token
TABLE = torch.tensor([
    [0.10, 0.20, 0.30, 0.30, 0.10],
    [0.25, 0.25, 0.25, 0.15, 0.10],
    [0.05, 0.05, 0.10, 0.20, 0.60],
    [0.40, 0.30, 0.10, 0.10, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
], dtype=torch.float64)


class Bigram(nn.Module):
    """A causal LM with ``.model`` (one-hot hidden state of the current token) and ``.lm_head``
    (log of the table), so log P(token t | tokens < t) = log TABLE[x_{t-1}, x_t] exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(TABLE.log().T.float())  # logits[j] = W[j, cur] = log TABLE[cur, j]
        self.model = _OneHot()


class _OneHot(nn.Module):
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, V).float())


def _lp(seq):
    return sum(math.log(TABLE[a, b]) for a, b in zip(seq[:-1], seq[1:]))


def _choices():
    # example 0: prompt [0, 2], choices [4] and [3, 0]; answer 1
    # example 1: prompt [1], choices [0], [1], [3]; answer 0
    rows = [[0, 2, 4], [0, 2, 3, 0], [1, 0], [1, 1], [1, 3]]
    starts = [2, 2, 1, 1, 1]
    s = 4
    ids = torch.zeros(len(rows), s, dtype=torch.long)
    att = torch.zeros_like(ids)
    lm = torch.zeros_like(ids)
    for i, (r, a) in enumerate(zip(rows, starts)):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
        lm[i, a:len(r)] = 1
    return EncodedChoices(ids, att, lm, example=torch.tensor([0, 0, 1, 1, 1]), choice=torch.tensor([0, 1, 0, 1, 2]),
                          answers=torch.tensor([1, 0]), choice_chars=torch.tensor([2, 4, 2, 2, 2]),
                          tasks=["a", "b"]), rows, starts


def test_answer_logprobs_match_hand_computed_bigram():
    data, rows, starts = _choices()
    lp, n = answer_logprobs(Bigram(), data.input_ids, data.attention_mask, data.loss_mask)
    for i, (r, a) in enumerate(zip(rows, starts)):
        expected = sum(math.log(TABLE[r[t - 1], r[t]]) for t in range(a, len(r)))
        assert lp[i].item() == pytest.approx(expected, rel=1e-5)
        assert n[i].item() == len(r) - a


def test_loglikelihood_ranking_picks_the_most_likely_choice():
    data, rows, _ = _choices()
    model = MoECausalLM(Bigram(), mc_metric="acc")
    out = model.evaluate(data, batch_size=2)
    assert out["accuracy_acc"] == out["accuracy"]
    # example 0: log P(4|2) = log .6 > log P(3|2) + log P(0|3) = log .2 + log .4 -> picks 0, answer 1: wrong
    # example 1: P(0|1) = .25 = P(1|1) > P(3|1) = .15 -> tie goes to the lower index 0 = answer: right
    assert out["accuracy"] == pytest.approx(0.5)
    # per-character: ex 0: log .6 / 2 = -0.255 vs log .08 / 4 = -0.631 -> still choice 0
    assert out["accuracy_norm"] == pytest.approx(0.5)
    nll0 = -(math.log(0.2) + math.log(0.4)) / 2  # the correct choice's per-token NLL
    nll1 = -math.log(0.25)
    assert out["loss"] == pytest.approx((nll0 + nll1) / 2, rel=1e-5)
    assert out["accuracy_per_task"] == {"a": 0.0, "b": 1.0}  # mc_metric's ranking, per task
    assert out["loss_per_task"] == pytest.approx({"a": nll0, "b": nll1}, rel=1e-5)  # each task's own loss


def test_length_normalisation_can_change_the_pick():
    data, _, _ = _choices()
    scores = torch.tensor([-3.0, -4.0, -1.0, -2.0, -3.0], dtype=torch.float64)
    chars = torch.tensor([1, 8, 2, 2, 2])
    data = EncodedChoices(data.input_ids, data.attention_mask, data.loss_mask, data.example, data.choice,
                          data.answers, chars, data.tasks)
    out = choice_metrics(scores, torch.ones(5, dtype=torch.long), data)
    assert out["accuracy"] == pytest.approx(0.5)  # ex 0 picks choice 0 (-3 > -4): wrong; ex 1 right
    assert out["accuracy_norm"] == pytest.approx(1.0)  # -4/8 > -3/1: choice 1, right
    # tasks "a" (example 0) and "b" (example 1): per task, each ranking's own hits
    # (the correct answer's loss: example 0's choice 1 scores -4 over 1 token, example 1's choice 0 -1)
    assert out["per_task"] == {"a": {"acc": 0.0, "acc_norm": 1.0, "loss": 4.0},
                               "b": {"acc": 1.0, "acc_norm": 1.0, "loss": 1.0}}
    pooled = EncodedChoices(data.input_ids, data.attention_mask, data.loss_mask, data.example, data.choice,
                            data.answers, chars, ["a", "a"])
    assert choice_metrics(scores, torch.ones(5, dtype=torch.long), pooled)["per_task"] == {
        "a": {"acc": 0.5, "acc_norm": 1.0, "loss": 2.5}}


def test_instruction_loss_is_mean_answer_token_nll():
    rows = [[0, 2, 4, 1], [3, 0, 1, 0]]
    ids = torch.tensor(rows)
    att = torch.ones_like(ids)
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    data = EncodedInstructions(ids, att, loss_mask, tasks=["a", "b"])
    model = MoECausalLM(Bigram())
    batch = next(data.batches(2, shuffle=False))
    per = [-(math.log(TABLE[2, 4]) + math.log(TABLE[4, 1])) / 2, -math.log(TABLE[1, 0])]
    assert model.loss(batch, "mean").item() == pytest.approx(sum(per) / 2, rel=1e-5)
    assert model.loss(batch, "sum").item() == pytest.approx(sum(per), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        model.loss(batch, "none")


def test_subset_and_batches_trim_padding():
    data, _, _ = _choices()
    sub = data.subset([1])
    assert len(sub) == 1 and sub.rows == 3 and sub.answers.tolist() == [0] and sub.example.tolist() == [0, 0, 0]
    widths = [b["input_ids"].shape[1] for b in data.batches(2)]
    assert widths == [4, 2, 2]  # each batch only as wide as its longest row
    with pytest.raises(ValueError, match="shuffle"):
        next(data.batches(2, shuffle=True))


def test_mc_metric_selects_the_reported_accuracy():
    data, _, _ = _choices()
    out = MoECausalLM(Bigram()).evaluate(data)  # default: length-normalised
    assert out["accuracy"] == out["accuracy_norm"]
    with pytest.raises(ValueError, match="mc_metric"):
        MoECausalLM(Bigram(), mc_metric="f1")

"""Instruction-style fine-tuning of a causal MoE language model, scored like the
lm-evaluation-harness: held-out answer loss and multiple-choice accuracy by log-likelihood
ranking of the choices.

:class:`MoECausalLM` has the same task interface as :class:`flux.models.MoEClassifier`
(``lm``, ``backbone``, ``head``, ``loss(batch, reduction)``, ``evaluate(data)``), so the
federation engine trains and evaluates either without knowing which task it runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _answer_targets(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor):
    """The logits (float32 ``[N_targets, V]``) at the positions that predict a masked token, those
    tokens (int64 ``[N_targets]``), the row of each, and the masked tokens per row (int64 ``[B]``)."""
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target_mask = loss_mask[:, 1:].bool()  # [B, S-1]: position t-1 predicts token t
    rows = target_mask.nonzero(as_tuple=True)[0]
    logits = lm.lm_head(hidden[:, :-1][target_mask]).float()  # [N_targets, V]
    return logits, input_ids[:, 1:][target_mask], rows, target_mask.sum(dim=1)


def answer_logprobs(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the summed log-probability of the masked tokens and their number.

    Only the positions that predict a masked token go through ``lm_head`` (the vocabulary
    projection is the largest matmul of a small LM; answers are a few tokens of each row).

    Args:
        input_ids, attention_mask, loss_mask: int64 ``[B, S]``; ``loss_mask[b, t] = 1`` scores
            token t given tokens < t (t >= 1).

    Returns:
        ``(logprob float32 [B], tokens int64 [B])``.
    """
    logits, targets, rows, tokens = _answer_targets(lm, input_ids, attention_mask, loss_mask)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprob = torch.zeros(input_ids.shape[0], dtype=token_logp.dtype, device=token_logp.device)
    logprob = logprob.index_add(0, rows, token_logp)
    return logprob, tokens


def answer_token_stats(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                       loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the summed log-probability of the masked tokens, their number, and how many of
    them are the model's most likely next token (teacher forcing: the true prefix is given).

    Returns ``(logprob float32 [B], tokens int64 [B], correct int64 [B])``.
    """
    logits, targets, rows, tokens = _answer_targets(lm, input_ids, attention_mask, loss_mask)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    b = input_ids.shape[0]
    logprob = torch.zeros(b, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)
    hits = (logits.argmax(dim=-1) == targets).long()
    correct = torch.zeros(b, dtype=torch.long, device=hits.device).index_add(0, rows, hits)
    return logprob, tokens, correct


MC_METRICS = ("acc_norm", "acc")  # which ranking gives "accuracy" (both are always reported)


class MoECausalLM(nn.Module):
    """A ``*ForCausalLM`` fine-tuned on prompt -> answer pairs.

    Attributes: ``lm`` (the ``*ForCausalLM``), ``head`` (its ``lm_head``: the "head" of the
    ``non_expert = "head"`` mode).
    """

    def __init__(self, lm: nn.Module, mc_metric: str = "acc_norm") -> None:
        super().__init__()
        if mc_metric not in MC_METRICS:
            raise ValueError(f"mc_metric must be one of {MC_METRICS}, got {mc_metric!r}")
        self.lm = lm
        self.mc_metric = mc_metric

    @property
    def backbone(self) -> nn.Module:
        """The base model (``lm.model``)."""
        return self.lm.model

    @property
    def head(self) -> nn.Module:
        return self.lm.lm_head

    def loss(self, batch: dict, reduction: str = "mean") -> Tensor:
        """Answer-token cross-entropy, per sample averaged over its answer tokens, then averaged
        (``"mean"``) or summed (``"sum"``) over samples.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``loss_mask`` int64 ``[B, S]``.
        """
        logprob, tokens = answer_logprobs(self.lm, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        per_sample = -logprob / tokens.clamp_min(1).to(logprob.dtype)
        if reduction == "sum":
            return per_sample.sum()
        if reduction == "mean":
            return per_sample.mean()
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    @torch.no_grad()
    def evaluate(self, data, batch_size: int = 64) -> dict:
        """Held-out metrics over ``data``: multiple-choice scoring for
        ``flux.data.instructions.EncodedChoices`` (below), response-token metrics for
        ``EncodedInstructions`` (a user's prompt -> response pairs, :func:`response_metrics`).

        Multiple choice (``EncodedChoices``):

        ``accuracy_acc``: share of examples whose correct choice has the highest summed
        log-likelihood (ties go to the lower index; the harness's ``acc``); ``accuracy_norm``: the
        same with log-likelihood per character of the choice (``acc_norm``); ``accuracy``: the one
        of the two named by ``mc_metric``; ``loss``: mean per-token negative log-likelihood of the
        correct choice; ``accuracy_per_task``: ``{task: accuracy}`` (``mc_metric``'s), to compare
        with each task's majority answer (:mod:`flux.models.majority`); ``loss_per_task``:
        ``{task: loss}`` (which tasks a pooled loss comes from).
        """
        from flux.data.instructions import EncodedInstructions

        if len(data) == 0:
            raise ValueError("evaluate needs a non-empty dataset")
        if isinstance(data, EncodedInstructions):
            return response_metrics(self, data, batch_size)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        scores = torch.empty(data.rows, dtype=torch.float64)
        tokens = torch.empty(data.rows, dtype=torch.long)
        try:
            start = 0
            for batch in data.batches(batch_size):
                lp, nt = answer_logprobs(self.lm, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                         batch["loss_mask"].to(device))
                scores[start:start + lp.shape[0]] = lp.double().cpu()
                tokens[start:start + lp.shape[0]] = nt.cpu()
                start += lp.shape[0]
        finally:
            self.train(was_training)
        out = choice_metrics(scores, tokens, data)
        out["accuracy_acc"] = out["accuracy"]
        out["accuracy"] = out["accuracy_norm"] if self.mc_metric == "acc_norm" else out["accuracy_acc"]
        per_task = out.pop("per_task")
        out["accuracy_per_task"] = {task: v[self.mc_metric] for task, v in per_task.items()}
        out["loss_per_task"] = {task: v["loss"] for task, v in per_task.items()}
        return out


def choice_metrics(scores: Tensor, tokens: Tensor, data) -> dict:
    """Accuracy, length-normalised accuracy and correct-answer loss from per-row log-likelihoods.

    Args:
        scores: float64 ``[M]`` summed log-likelihood of each row's continuation.
        tokens: int64 ``[M]`` its number of tokens.
        data: the ``EncodedChoices`` the rows come from.

    Returns ``{"accuracy", "accuracy_norm", "loss"}`` floats and ``"per_task"``:
    ``{task: {"acc", "acc_norm", "loss"}}``.
    """
    n = len(data)
    neg = torch.finfo(torch.float64).min
    best = torch.full((n,), neg, dtype=torch.float64)
    best_norm = torch.full((n,), neg, dtype=torch.float64)
    pick = torch.zeros(n, dtype=torch.long)
    pick_norm = torch.zeros(n, dtype=torch.long)
    nll = torch.zeros(n, dtype=torch.float64)
    norm = scores / data.choice_chars.clamp_min(1).double()
    for r in range(scores.shape[0]):  # rows are in (example, choice) order: first maximum wins
        e, c = int(data.example[r]), int(data.choice[r])
        if scores[r] > best[e]:
            best[e], pick[e] = scores[r], c
        if norm[r] > best_norm[e]:
            best_norm[e], pick_norm[e] = norm[r], c
        if c == int(data.answers[e]):
            nll[e] = -scores[r] / max(1, int(tokens[r]))
    return {"accuracy": float((pick == data.answers).double().mean()),
            "accuracy_norm": float((pick_norm == data.answers).double().mean()),
            "loss": float(nll.mean()),
            "per_task": _per_task(pick == data.answers, pick_norm == data.answers, nll, data.tasks)}


def _per_task(hit: Tensor, hit_norm: Tensor, nll: Tensor, tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{task: {"acc": share correct, "acc_norm": same, length-normalised, "loss": mean
    correct-answer loss}}`` from per-example bool ``[N]`` hits and float64 ``[N]`` losses: a
    pooled number hides which tasks learn and which sit at their prior."""
    rows: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        rows.setdefault(task, []).append(i)
    out = {}
    for task, indices in sorted(rows.items()):
        idx = torch.tensor(indices)
        out[task] = {"acc": float(hit[idx].double().mean()), "acc_norm": float(hit_norm[idx].double().mean()),
                     "loss": float(nll[idx].mean())}
    return out


@torch.no_grad()
def response_metrics(model: MoECausalLM, data, batch_size: int = 64) -> dict[str, float]:
    """Held-out metrics of a generative task (``EncodedInstructions``: prompt -> response rows).

    ``loss``: the training loss on held-out rows (per row, the mean negative log-likelihood of its
    response tokens, then the mean over rows); ``accuracy`` (= ``token_accuracy``): the share of
    all response tokens that are the model's most likely next token given the true prefix
    (teacher-forced next-token accuracy); ``exact_match``: the share of rows whose every response
    token is (a teacher-forced greedy decode would reproduce the response exactly);
    ``response_tokens``: how many tokens were scored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens_total, correct_total, exact, rows = 0.0, 0, 0, 0, 0
    try:
        for batch in data.batches(batch_size, shuffle=False):
            lp, nt, nc = answer_token_stats(model.lm, batch["input_ids"].to(device),
                                            batch["attention_mask"].to(device), batch["loss_mask"].to(device))
            nll += float((-lp.double() / nt.clamp_min(1).double()).sum())
            tokens_total += int(nt.sum())
            correct_total += int(nc.sum())
            exact += int(((nc == nt) & (nt > 0)).sum())
            rows += lp.shape[0]
    finally:
        model.train(was_training)
    accuracy = correct_total / tokens_total if tokens_total else 0.0
    return {"accuracy": accuracy, "loss": nll / max(1, rows), "token_accuracy": accuracy,
            "exact_match": exact / max(1, rows), "response_tokens": tokens_total}

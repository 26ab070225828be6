"""Token tensors for instruction-style fine-tuning (prompt -> answer) and for multiple-choice
scoring by log-likelihood (the lm-evaluation-harness method).

Training rows are ``<bos> prompt " answer" <eos>``; the loss covers only the answer tokens and
the ``<eos>`` (``loss_mask``).  Scoring rows are one per (example, choice): ``<bos> prompt
" choice"``, with ``loss_mask`` over the choice's tokens, so the summed log-probability of the
masked tokens is log P(choice | prompt).  Over-long rows lose tokens from the *left* of the prompt:
the answer is what is scored, it is never cut.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass
class EncodedInstructions:
    """Tokenized prompt -> answer pairs.

    Attributes:
        input_ids: int64 ``[N, S]``, right-padded.
        attention_mask: int64 ``[N, S]`` (1 = token).
        loss_mask: int64 ``[N, S]``: 1 where the token is a target (answer tokens and ``<eos>``).
            The loss at position t predicts token t from tokens < t.
        tasks: per row, the task it comes from.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    tasks: list[str]

    def __post_init__(self) -> None:
        if not (self.input_ids.shape == self.attention_mask.shape == self.loss_mask.shape) or self.input_ids.dim() != 2:
            raise ValueError("input_ids, attention_mask and loss_mask must all be [N, S]")
        if len(self.tasks) != self.input_ids.shape[0]:
            raise ValueError(f"tasks has {len(self.tasks)} entries for {self.input_ids.shape[0]} rows")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, indices) -> "EncodedInstructions":
        idx = torch.as_tensor(indices if isinstance(indices, Tensor) else list(indices), dtype=torch.long)
        return EncodedInstructions(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx],
                                   [self.tasks[i] for i in idx.tolist()])

    def batches(self, batch_size: int, *, shuffle: bool,
                generator: torch.Generator | None = None) -> Iterator[dict[str, Tensor]]:
        """Mini-batches ``{"input_ids", "attention_mask", "loss_mask"}`` (int64 ``[B, S]``) and
        ``"index"`` (int64 ``[B]``, positions in this dataset); the last batch may be smaller."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start:start + batch_size]
            cols = _width(self.attention_mask[index])
            yield {"input_ids": self.input_ids[index, :cols], "attention_mask": self.attention_mask[index, :cols],
                   "loss_mask": self.loss_mask[index, :cols], "index": index}


@dataclasses.dataclass
class EncodedChoices:
    """Multiple-choice examples as one scoring row per (example, choice).

    Attributes:
        input_ids, attention_mask, loss_mask: int64 ``[M, S]`` (``loss_mask`` = the choice's tokens).
        example: int64 ``[M]``: which example a row belongs to (0..N-1, rows of an example adjacent).
        choice: int64 ``[M]``: the choice's index within its example.
        answers: int64 ``[N]``: the correct choice of each example.
        choice_chars: int64 ``[M]``: characters of the scored continuation (for length-normalised
            accuracy, as the harness's ``acc_norm``).
        tasks: per example, its task.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    example: Tensor
    choice: Tensor
    answers: Tensor
    choice_chars: Tensor
    tasks: list[str]

    def __len__(self) -> int:
        """Number of examples (not rows)."""
        return self.answers.shape[0]

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, examples: Sequence[int]) -> "EncodedChoices":
        """The rows of the given examples (renumbered 0..len-1 in the given order)."""
        keep = list(examples)
        where = {e: i for i, e in enumerate(keep)}
        rows = [r for r in range(self.rows) if int(self.example[r]) in where]
        rows.sort(key=lambda r: (where[int(self.example[r])], int(self.choice[r])))
        idx = torch.tensor(rows, dtype=torch.long)
        return EncodedChoices(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx],
                              torch.tensor([where[int(self.example[r])] for r in rows], dtype=torch.long),
                              self.choice[idx], self.answers[torch.tensor(keep, dtype=torch.long)],
                              self.choice_chars[idx], [self.tasks[e] for e in keep])

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[dict[str, Tensor]]:
        """Row batches ``{"input_ids", "attention_mask", "loss_mask"}`` (int64 ``[B, S]``) in order
        (``shuffle`` is accepted for interface parity and must be False: scoring needs no order).
        Also ``"index"``: the example of each row, so per-example statistics (profiling) work."""
        if shuffle:
            raise ValueError("EncodedChoices is scored in order; shuffle must be False")
        for start in range(0, self.rows, batch_size):
            sl = slice(start, start + batch_size)
            cols = _width(self.attention_mask[sl])
            yield {"input_ids": self.input_ids[sl, :cols], "attention_mask": self.attention_mask[sl, :cols],
                   "loss_mask": self.loss_mask[sl, :cols], "index": self.example[sl]}


def _width(attention_mask: Tensor) -> int:
    """Columns a right-padded batch needs (its longest row): shorter batches compute less."""
    return max(1, int(attention_mask.sum(dim=1).max())) if attention_mask.numel() else 1


def _row(tokenizer, prompt_ids: list[int], answer_ids: list[int], seq_len: int, *, eos: bool) -> tuple[list[int], int]:
    """``<bos> prompt answer [<eos>]`` cut from the left of the prompt to fit; returns the ids and
    where the answer starts."""
    tail = answer_ids + ([tokenizer.eos_id] if eos and tokenizer.eos_id is not None else [])
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # a user's tokenizer may have no <bos>
    room = seq_len - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"an answer of {len(answer_ids)} tokens does not fit seq_len={seq_len}")
    prompt = prompt_ids[-room:]
    ids = [*head, *prompt, *tail]
    return ids, len(head) + len(prompt)


def _pack(rows: list[list[int]], starts: list[int], ends: list[int], seq_len: int, pad_id: int):
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (row, a, b) in enumerate(zip(rows, starts, ends)):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, :len(row)] = 1
        loss_mask[i, a:b] = 1
    return input_ids, attention, loss_mask


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_instructions(tokenizer, examples: Sequence, *, seq_len: int) -> EncodedInstructions:
    """Training rows for ``examples`` (``flux.data.bigbench.MCExample``: prompt, choices, answer,
    task): the prompt followed by ``" " + choices[answer]`` and ``<eos>``."""
    if not examples:
        raise ValueError("encode_instructions needs at least one example")
    prompts = _ids(tokenizer, [e.prompt for e in examples])
    answers = _ids(tokenizer, [" " + e.choices[e.answer] for e in examples])
    rows, starts, ends = [], [], []
    for p, a in zip(prompts, answers):
        ids, start = _row(tokenizer, p, a, seq_len, eos=True)
        rows.append(ids)
        starts.append(start)
        ends.append(len(ids))
    input_ids, attention, loss_mask = _pack(rows, starts, ends, seq_len, tokenizer.pad_id)
    return EncodedInstructions(input_ids, attention, loss_mask, [e.task for e in examples])


def encode_choices(tokenizer, examples: Sequence, *, seq_len: int) -> EncodedChoices:
    """Scoring rows for ``examples``: one per choice, ``<bos> prompt " choice"``, the choice's
    tokens masked for scoring (no ``<eos>``: the harness scores the continuation alone)."""
    if not examples:
        raise ValueError("encode_choices needs at least one example")
    prompts = _ids(tokenizer, [e.prompt for e in examples])
    flat = [(i, j, " " + c) for i, e in enumerate(examples) for j, c in enumerate(e.choices)]
    conts = _ids(tokenizer, [text for _, _, text in flat])
    rows, starts, ends = [], [], []
    for (i, _, _), c in zip(flat, conts):
        ids, start = _row(tokenizer, prompts[i], c, seq_len, eos=False)
        rows.append(ids)
        starts.append(start)
        ends.append(len(ids))
    input_ids, attention, loss_mask = _pack(rows, starts, ends, seq_len, tokenizer.pad_id)
    return EncodedChoices(
        input_ids, attention, loss_mask,
        example=torch.tensor([i for i, _, _ in flat], dtype=torch.long),
        choice=torch.tensor([j for _, j, _ in flat], dtype=torch.long),
        answers=torch.tensor([e.answer for e in examples], dtype=torch.long),
        choice_chars=torch.tensor([len(text) for _, _, text in flat], dtype=torch.long),
        tasks=[e.task for e in examples],
    )


def encode_pairs(tokenizer, pairs: Sequence, *, seq_len: int, chat_template: bool = False,
                 min_prompt_tokens: int = 16) -> EncodedInstructions:
    """Training (and held-out) rows for a user's prompt -> response pairs
    (``flux.data.tables.Pair``: prompt, response, domain); ``loss_mask`` marks the response.

    * ``chat_template`` (the tokenizer must have one, ``tokenizer.has_chat_template``): the prompt
      is the template applied to one user message with the generation prompt; the response is
      what the template adds for the assistant's answer (the response and the template's closing
      tokens); no ``<bos>`` is added (the template writes what the model expects) and ``<eos>``
      only when the template's answer does not contain it.
    * otherwise: ``[<bos>] prompt " response" [<eos>]`` (no space added when the prompt ends or
      the response starts with whitespace), as :func:`encode_instructions`.

    Over-long rows lose prompt tokens from the left down to ``min_prompt_tokens`` (at most half
    the row; the whole prompt if shorter), then response tokens from the right (a warning counts
    those rows).
    ``tasks`` = each pair's domain (``"all"`` without one).
    """
    import warnings

    if not pairs:
        raise ValueError("encode_pairs needs at least one pair")
    if chat_template:
        prompt_texts, completions = [], []
        for p in pairs:
            user = [{"role": "user", "content": p.prompt}]
            prompt_text = tokenizer.chat_text(user, add_generation_prompt=True)
            full = tokenizer.chat_text(user + [{"role": "assistant", "content": p.response}], add_generation_prompt=False)
            prompt_texts.append(prompt_text)
            completions.append(full[len(prompt_text):] if full.startswith(prompt_text) else p.response)
    else:
        prompt_texts = [p.prompt for p in pairs]
        completions = [("" if p.prompt[-1:].isspace() or p.response[:1].isspace() else " ") + p.response
                       for p in pairs]
    head = [] if chat_template or tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = tokenizer.eos_id
    rows, starts, ends, cut = [], [], [], 0
    for prompt, answer in zip(_ids(tokenizer, prompt_texts), _ids(tokenizer, completions)):
        tail = list(answer)
        if eos is not None and not (chat_template and eos in tail):
            tail.append(eos)
        room = seq_len - len(head) - min(len(prompt), min_prompt_tokens, (seq_len - len(head)) // 2)
        if room < 1:
            raise ValueError(f"seq_len={seq_len} leaves no room for a response")
        if len(tail) > room:
            tail, cut = tail[:room], cut + 1
        keep = seq_len - len(head) - len(tail)
        prompt = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
        ids = [*head, *prompt, *tail]
        rows.append(ids)
        starts.append(len(head) + len(prompt))
        ends.append(len(ids))
    if cut:
        warnings.warn(f"encode_pairs: {cut} of {len(pairs)} responses were cut to fit seq_len={seq_len} "
                      "(raise dataset.seq_len)", RuntimeWarning, stacklevel=2)
    input_ids, attention, loss_mask = _pack(rows, starts, ends, seq_len, tokenizer.pad_id)
    return EncodedInstructions(input_ids, attention, loss_mask, [p.domain or "all" for p in pairs])

"""The accuracy a model gets from the answer prior alone: the floor a fine-tuned model must beat.

A classifier that always predicts the most frequent class, or a multiple-choice model that always
picks each task's most frequent correct choice, learns nothing about the input. On tasks whose
answers are skewed (the OpenAI-evals multiple-choice tasks: the correct choice of ``crepe`` is
"more likely" 77% of the time) a fine-tuned model's accuracy can rise well above the pretrained
model's by learning that prior only, so the bench reports this number next to every curve.

It is computed on the test set itself (the best constant answer per task in hindsight), so no
predictor that knows the task but not the input scores more there.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional


def majority_accuracy(data) -> Optional[float]:
    """Share of ``data``'s examples whose answer is the most frequent answer of their task.

    Args:
        data: an ``EncodedDataset`` (``labels`` int64 ``[N]``: the majority class's share) or an
            ``EncodedChoices`` (``answers`` int64 ``[N]`` and ``tasks``: per task, the most frequent
            correct choice index's share, pooled over tasks). Anything else (a user's free-form
            prompt -> response pairs) has no answer prior: None.

    Returns:
        float in (0, 1], or None.

    Raises:
        ValueError: ``data`` is empty.
    """
    if hasattr(data, "answers") and hasattr(data, "tasks"):
        answers, groups = data.answers.tolist(), list(data.tasks)
    elif hasattr(data, "labels"):
        answers = data.labels.tolist()
        groups = [None] * len(answers)
    else:
        return None
    if not answers:
        raise ValueError("majority_accuracy needs a non-empty dataset")
    by_group: dict = {}
    for group, answer in zip(groups, answers):
        by_group.setdefault(group, Counter())[answer] += 1
    hits = sum(max(counts.values()) for counts in by_group.values())
    return hits / len(answers)

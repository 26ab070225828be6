"""The majority-answer floor (flux.models.majority) on hand-made datasets."""
import pytest
import torch

from flux.data.encode import EncodedDataset
from flux.data.instructions import EncodedChoices, EncodedInstructions
from flux.models.majority import majority_accuracy


def _choices(answers: list[int], tasks: list[str]) -> EncodedChoices:
    # two choices per example; only answers and tasks matter to the floor
    m = 2 * len(answers)
    ids = torch.ones(m, 3, dtype=torch.long)
    return EncodedChoices(ids, torch.ones_like(ids), torch.ones_like(ids),
                          example=torch.arange(len(answers)).repeat_interleave(2), choice=torch.tensor([0, 1] * len(answers)),
                          answers=torch.tensor(answers), choice_chars=torch.ones(m, dtype=torch.long), tasks=tasks)


def test_classification_floor_is_the_majority_class_share():
    labels = torch.tensor([0, 2, 2, 1, 2, 0, 2])
    data = EncodedDataset(torch.ones(7, 4, dtype=torch.long), torch.ones(7, 4, dtype=torch.long), labels, ["a", "b", "c"])
    assert majority_accuracy(data) == pytest.approx(4 / 7)


def test_multiple_choice_floor_takes_each_tasks_own_majority():
    # task x: answer 0 three times of four; task y: answer 1 two times of three. One answer for
    # every example (pooled majority: 0, 4 of 7) would score less than a per-task prior (5 of 7).
    data = _choices([0, 0, 1, 0, 1, 1, 0], ["x", "x", "x", "x", "y", "y", "y"])
    assert majority_accuracy(data) == pytest.approx((3 + 2) / 7)
    assert majority_accuracy(_choices([1, 0], ["x", "x"])) == pytest.approx(0.5)


def test_free_form_pairs_have_no_floor_and_empty_data_is_an_error():
    ids = torch.ones(2, 3, dtype=torch.long)
    assert majority_accuracy(EncodedInstructions(ids, torch.ones_like(ids), torch.ones_like(ids), tasks=["a", "b"])) is None
    empty = EncodedDataset(torch.ones(0, 4, dtype=torch.long), torch.ones(0, 4, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        majority_accuracy(empty)

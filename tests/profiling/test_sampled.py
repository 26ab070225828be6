"""Sampled profiling (flux.profile_samples): the draw, the batches keep local indices, the
scaled |D_e| estimate of Eq. 3, and the ablation's sampled_profiling_error."""
from __future__ import annotations

import pytest
import torch

from flux.data.encode import EncodedDataset
from flux.methods.flux import routed_sample_counts
from flux.federation.runner import profile_batches, profile_sample
from flux.profiling import LayerProfile, ModelProfile, profile_model
from tests.profiling import make_batches, tiny_mixtral

torch.set_num_threads(1)


def _dataset() -> EncodedDataset:
    """18 right-padded samples of 12 tokens (make_batches' 3 x 6)."""
    parts = make_batches()
    ids = torch.cat([b["input_ids"] for b in parts])
    return EncodedDataset(ids, torch.cat([b["attention_mask"] for b in parts]), torch.zeros(len(ids), dtype=torch.long),
                          ["x"])


def test_profile_sample_is_seeded_sorted_and_none_means_all():
    def draw(n, limit, seed=0):
        return profile_sample(n, limit, torch.Generator().manual_seed(seed))

    assert draw(10, 0) is None and draw(10, 10) is None and draw(10, 50) is None
    s = draw(10, 4)
    assert s.dtype == torch.int64 and s.tolist() == sorted(set(s.tolist())) and len(s) == 4
    assert 0 <= int(s.min()) and int(s.max()) < 10
    assert torch.equal(s, draw(10, 4)) and not all(torch.equal(s, draw(10, 4, seed)) for seed in range(1, 6))
    with pytest.raises(ValueError):
        draw(10, -1)


def test_a_sampled_profile_keeps_local_indices_and_zero_rows_elsewhere():
    model, data = tiny_mixtral(), _dataset()
    full = profile_model(model, profile_batches(data, None), bits=None, num_samples=len(data))
    assert torch.equal(full.indices, torch.arange(len(data)))
    indices = profile_sample(len(data), 7, torch.Generator().manual_seed(3))
    part = profile_model(model, profile_batches(data, indices, batch_size=4), bits=None, num_samples=len(data))
    assert torch.equal(part.indices, indices)
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[indices] = False
    for a, b in zip(part.layers, full.layers):
        assert a.sample_tokens.shape == b.sample_tokens.shape == (len(data), a.num_experts)
        assert int(a.sample_tokens[rest].abs().sum()) == 0
        assert torch.equal(a.sample_tokens[indices], b.sample_tokens[indices])  # routing is per token
        assert a.num_tokens == int(data.attention_mask[indices].sum())
    again = ModelProfile.from_dict(part.to_dict())
    assert torch.equal(again.indices, indices)


def _one_layer(tokens: list[list[int]], indices) -> ModelProfile:
    st = torch.tensor(tokens, dtype=torch.int32)
    counts = st.sum(0).long()
    layer = LayerProfile(counts, counts.double() / counts.sum(), st, torch.zeros(st.shape[1], dtype=torch.float64),
                         int(counts.sum()))
    return ModelProfile([layer], 4, 0.0, None if indices is None else torch.tensor(indices))


def test_routed_sample_counts_scale_by_trained_over_profiled_and_trained():
    # 6 samples x 2 experts; rows 1, 3, 5 were not profiled (zero)
    tokens = [[2, 0], [0, 0], [1, 1], [0, 0], [0, 3], [0, 0]]
    sampled = _one_layer(tokens, [0, 2, 4])
    # trained {0, 1, 2, 3}: profiled among them {0, 2}: expert 0 reached by 2 of them, expert 1 by 1
    assert routed_sample_counts(sampled, [3, 0, 1, 2, 0]).pop().tolist() == [2 * 4 / 2, 1 * 4 / 2]
    assert routed_sample_counts(sampled, [1, 3]) is None  # none profiled: nothing to measure
    assert routed_sample_counts(sampled, []) is None
    # a profile of every sample (or one without indices): the plain count, scale exactly 1
    full = [[2, 0], [1, 0], [1, 1], [0, 2], [0, 3], [4, 0]]
    for indices in (list(range(6)), None):
        assert routed_sample_counts(_one_layer(full, indices), [0, 1, 2, 3]).pop().tolist() == [3.0, 2.0]


def test_sampled_profiling_error_is_small_and_n_beyond_the_data_is_the_int4_error():
    from flux.ablation import sampled_profiling_error

    model, data = tiny_mixtral(), _dataset()
    full = profile_model(model, profile_batches(data, None), bits=None, num_samples=len(data))
    errors = sampled_profiling_error(model, data, full, sizes=(6, 12, 64), seed=0)
    assert list(errors) == [6, 12, 64] and all(0 <= e < 1 for e in errors.values())
    int4 = profile_model(model, profile_batches(data, None), bits=4, num_samples=len(data)).relative_l1(full)
    assert errors[64] == pytest.approx(int4)

"""StaleProfiler: a background profile of a snapshot while the live model trains."""
from __future__ import annotations

import copy

import pytest
import torch

from flux.profiling import StaleProfiler, profile_model, quantize_model
from tests.profiling import MODELS, make_batches

torch.set_num_threads(1)


def _train(model, batches, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_background_profile_equals_a_synchronous_one_while_the_model_trains(family):
    model = MODELS[family]()
    frozen = copy.deepcopy(model)
    batches = make_batches()
    with StaleProfiler() as profiler:
        future = profiler.submit(model, iter(batches), bits=4, num_samples=18)  # a one-shot iterator
        _train(model, batches, steps=3)  # meanwhile, in this thread
        stale = future.result(timeout=120)
    expected = profile_model(frozen, batches, bits=4, num_samples=18)
    live = profile_model(model, batches, bits=4, num_samples=18)
    assert stale.bits == 4
    for s, e, now in zip(stale.layers, expected.layers, live.layers):
        assert torch.equal(s.counts, e.counts) and torch.equal(s.sample_tokens, e.sample_tokens)
        assert torch.allclose(s.attention, e.attention, rtol=0, atol=1e-12)
        assert not torch.allclose(s.attention, now.attention, rtol=0, atol=1e-9)  # training did move the model


def test_accepts_a_snapshot_and_reports_errors_through_the_future():
    model = MODELS["mixtral"]()
    batches = make_batches(num=1)
    snapshot = quantize_model(model, 8)
    with StaleProfiler() as profiler:
        ok = profiler.submit(snapshot, batches)
        bad = profiler.submit(model, batches, num_samples=1)  # indices up to 5 do not fit
        assert ok.result(timeout=60).bits == 8
        with pytest.raises(ValueError, match="index"):
            bad.result(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        profiler.submit(model, batches)

"""Warm-start pretraining: the loss falls, the cache hits with identical weights, partial entries
are ignored, concurrent callers train once; routing statistics; the CLI."""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
import torch

import flux
from flux.data.encode import lm_blocks
from flux.data.sources import load_pydoc
from flux.data.tokenizer import get_tokenizer
from flux.models import build_config, build_lm, pretrain_lm, pretrained_lm, routing_frequencies, routing_summary
from flux.models.cli import add_pretrain_arguments, pretrain_command

TINY = {"preset": "mixtral-tiny", "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2}
FAST = dict(steps=4, seq_len=16, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def corpus():
    return load_pydoc().texts[:120]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return get_tokenizer(corpus, vocab_size=384, cache_dir=tmp_path_factory.mktemp("tok"))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-tiny"])
def test_pretraining_reduces_loss(preset, tokenizer, corpus, capsys):
    spec = {"preset": preset, "hidden_size": 32, "num_hidden_layers": 2}
    lm = build_lm(build_config(spec, tokenizer.vocab_size), seed=0)
    blocks = lm_blocks(tokenizer, corpus, seq_len=32)
    result = pretrain_lm(lm, blocks, steps=30, batch_size=8, lr=3e-3, seed=0, progress=True)
    losses = result["losses"]
    assert len(losses) == 30 and result["seconds"] > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert not lm.training
    assert capsys.readouterr().err.count("pretrain step") == 10  # a line every 10%


def test_cache_hit_returns_identical_weights(tokenizer, corpus, tmp_path):
    lm, info = pretrained_lm(TINY, tokenizer, corpus, cache_dir=tmp_path, **FAST)
    assert info["cache_hit"] is False and len(info["losses"]) == 4
    meta = json.loads((Path(info["path"]) / "meta.json").read_text())
    assert meta["losses"] == info["losses"] and meta["fields"]["settings"]["steps"] == 4
    assert list(Path(info["path"]).glob("*.safetensors"))
    again, hit = pretrained_lm(TINY, tokenizer, corpus, cache_dir=tmp_path, **FAST)
    assert hit["cache_hit"] is True and hit["path"] == info["path"]
    assert hit["final_loss"] == info["final_loss"] and hit["seconds"] == info["seconds"]
    assert _same_weights(lm, again) and not _same_weights(lm, build_lm(again.config, seed=0))
    assert again.config._attn_implementation == "eager"
    other, miss = pretrained_lm(TINY, tokenizer, corpus, cache_dir=tmp_path, **{**FAST, "steps": 5})
    assert miss["cache_hit"] is False and miss["path"] != info["path"]


def test_partial_entries_are_ignored(tokenizer, corpus, tmp_path):
    _, first = pretrained_lm(TINY, tokenizer, corpus, cache_dir=tmp_path / "a", **FAST)
    name = Path(first["path"]).name
    cache = tmp_path / "b"
    (cache / f".{name}.x1y2.tmp").mkdir(parents=True)  # a killed writer's temporary folder
    (cache / f".{name}.x1y2.tmp" / "config.json").write_text("{not json")
    (cache / name).mkdir()  # a target folder without meta.json: not a complete entry
    (cache / name / "model.safetensors").write_bytes(b"truncated")
    lm, info = pretrained_lm(TINY, tokenizer, corpus, cache_dir=cache, **FAST)
    assert info["cache_hit"] is False and Path(info["path"]) == cache / name
    _, hit = pretrained_lm(TINY, tokenizer, corpus, cache_dir=cache, **FAST)
    assert hit["cache_hit"] is True and hit["losses"] == first["losses"]  # same recipe, same training


def test_concurrent_callers_train_once(tokenizer, corpus, tmp_path):
    results = []

    def call():
        results.append(pretrained_lm(TINY, tokenizer, corpus, cache_dir=tmp_path, **FAST))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(info["cache_hit"] for _, info in results) == [False, True]
    assert _same_weights(results[0][0], results[1][0])


def test_routing_frequencies(tokenizer, corpus):
    lm = build_lm(build_config(TINY, tokenizer.vocab_size), seed=0)
    freqs = routing_frequencies(lm, lm_blocks(tokenizer, corpus[:20], seq_len=16))
    assert len(freqs) == 2 and all(f.shape == (8,) for f in freqs)
    assert all(f.sum().item() == pytest.approx(1.0) for f in freqs)
    rows = routing_summary([torch.full((4,), 0.25), torch.tensor([1.0, 0, 0, 0])])
    assert rows[0]["entropy"] == pytest.approx(1.0) and rows[0]["variance"] == pytest.approx(0.0)
    assert rows[1]["max_share"] == 1.0 and rows[1]["entropy"] == pytest.approx(0.0)
    flux.patch(lm).restore()  # raises if routing_frequencies had left the model patched


def test_cli_trains_then_hits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUX_CACHE", str(tmp_path))
    parser = add_pretrain_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "deepseek-tiny", "--steps", "2", "--seq-len", "16", "--vocab-size", "512",
                              "--batch-size", "2", "--quiet"])
    assert args.func is pretrain_command
    assert pretrain_command(args) == 0
    assert "trained" in capsys.readouterr().out
    assert pretrain_command(args) == 0
    out = capsys.readouterr().out
    assert "cache hit" in out and str(tmp_path / "pretrain") in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "nope"])

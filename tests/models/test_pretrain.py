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
    assert "pretrain" in capsys.readouterr().err  # the progress bar


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
    # An empty cache: the corpus is the two sources that ship with installed packages, so the test
    # does not depend on fetching the 358 MB BIG-bench sdist (the bigbench source has its own tests).
    monkeypatch.setenv("FLUX_CACHE", str(tmp_path))
    parser = add_pretrain_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "deepseek-tiny", "--steps", "2", "--seq-len", "16", "--vocab-size", "512",
                              "--batch-size", "2", "--corpus", "pydoc,chatterbot", "--quiet"])
    assert args.corpus == ["pydoc", "chatterbot"]
    assert args.func is pretrain_command
    assert pretrain_command(args) == 0
    assert "trained" in capsys.readouterr().out
    assert pretrain_command(args) == 0
    out = capsys.readouterr().out
    assert "cache hit" in out and str(tmp_path / "pretrain") in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "nope"])


_KILLED_PRETRAIN = r"""
import sys, torch
torch.set_num_threads(1)
from flux.data.sources import load_pydoc
from flux.data.tokenizer import get_tokenizer
from flux.models import pretrained_lm
corpus = load_pydoc().texts[:120]
tok = get_tokenizer(corpus, vocab_size=384, cache_dir=sys.argv[1])
pretrained_lm(__TINY__, tok, corpus, steps=400, seq_len=16, batch_size=4, progress=False, cache_dir=sys.argv[2])
"""


def test_killed_pretraining_resumes_to_the_same_weights(tmp_path, corpus):
    """SIGKILL during pretraining, rerun: it continues from the resume file and ends with the
    weights of an uninterrupted run (one thread: deterministic)."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from flux.federation.runner import model_sha256

    tok_dir, killed, clean = tmp_path / "tok", tmp_path / "killed", tmp_path / "clean"
    script = _KILLED_PRETRAIN.replace("__TINY__", repr(TINY))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tok_dir), str(killed)], env={**os.environ})
    deadline = time.monotonic() + 240
    while not list(killed.glob("*.resume.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "pretraining ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume = list(killed.glob("*.resume.pt"))
    assert resume and not list(killed.glob("*/meta.json"))
    step = torch.load(resume[0], weights_only=True)["step"]
    assert 0 < step < 400

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = get_tokenizer(corpus, vocab_size=384, cache_dir=tok_dir)
        args = dict(steps=400, seq_len=16, batch_size=4, progress=False)
        resumed, info = pretrained_lm(TINY, tok, corpus, cache_dir=killed, **args)
        fresh, _ = pretrained_lm(TINY, tok, corpus, cache_dir=clean, **args)
    finally:
        torch.set_num_threads(before)
    assert info["cache_hit"] is False and len(info["losses"]) == 400
    assert not list(killed.glob("*.resume.pt"))  # removed once the entry is complete
    assert model_sha256(resumed) == model_sha256(fresh)
    assert hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in resumed.parameters())).hexdigest() == \
        hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in fresh.parameters())).hexdigest()


def test_quality_report_beats_unigram_after_training(tokenizer, corpus):
    """lm_quality: perplexity vs the unigram baseline on held-out text, routing entropy in [0, 1],
    per-source top-expert shares at least the uniform share."""
    from flux.models.pretrain import lm_quality

    train, held = corpus[:100], {"a": corpus[100:110], "b": corpus[110:120]}
    lm = build_lm(build_config(TINY, tokenizer.vocab_size), seed=0)
    blocks = lm_blocks(tokenizer, train, seq_len=16)
    pretrain_lm(lm, blocks, steps=60, batch_size=8, lr=3e-3, seed=0, progress=False)
    q = lm_quality(lm, tokenizer, blocks, held, seq_len=16)
    assert q["heldout_ppl"] < q["unigram_ppl"]
    assert set(q["per_domain_ppl"]) == {"a", "b"} and q["heldout_tokens"] > 0
    assert len(q["routing"]) == 2 and all(0 <= r["entropy"] <= 1 for r in q["routing"])
    assert all(v >= q["top_fraction"] - 1e-9 for v in q["top_expert_share_mean"].values())

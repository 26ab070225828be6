"""`flux pretrain`: warm-start a preset on local text (pydoc + chatterbot) and cache it."""
from __future__ import annotations

import argparse
import sys

from flux.models.pretrain import DEFAULT_STEPS



def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``flux pretrain``; sets ``func=pretrain_command``."""
    from flux.models.presets import PRESETS

    parser.add_argument("--model", default="mixtral-tiny", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pretraining steps (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per block (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed (default %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default <FLUX_CACHE>/pretrain)")
    parser.add_argument("--routing", action="store_true",
                        help="also print expert routing statistics on the evaluation tasks' prompts (never pretrained on), random init vs pretrained")
    parser.add_argument("--corpus", default="pydoc,chatterbot,openai-evals", type=lambda s: [x for x in s.split(",") if x],
                        help="pretraining sources, comma-separated (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=pretrain_command)
    return parser


def pretrain_command(args: argparse.Namespace) -> int:
    """Run ``flux pretrain``; prints the cache entry and the loss; returns the exit status."""
    from flux.data.corpus import pretraining_corpus
    from flux.data.tokenizer import get_tokenizer
    from flux.models.pretrain import pretrained_lm

    corpus = pretraining_corpus(args.corpus)
    tokenizer = get_tokenizer(corpus.train, vocab_size=args.vocab_size)
    lm, info = pretrained_lm(args.model, tokenizer, corpus.train, steps=args.steps, seq_len=args.seq_len,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, cache_dir=args.cache_dir,
                             progress=not args.quiet, heldout=corpus.heldout)
    first = f"{info['losses'][0]:.3f}" if info["losses"] else "-"
    final = f"{info['final_loss']:.3f}" if info["final_loss"] is not None else "-"
    print(f"{args.model}: {'cache hit' if info['cache_hit'] else 'trained'}  {info['path']}\n"
          f"  steps {args.steps}  loss {first} -> {final}  training {info['seconds']:.1f} s")
    if info.get("quality"):
        print(format_quality(info["quality"]))
    if args.routing:
        _print_routing(lm, tokenizer, args)
    return 0


def _print_routing(lm, tokenizer, args: argparse.Namespace) -> None:
    """Per-layer routing statistics of the random-init model (same seed) and the pretrained one on
    the prompts of the evaluation tasks (the openai-evals fine-tuning tasks and the sarcasm
    headlines, never pretrained on), plus the domain divergence (mean pairwise JS between the
    tasks' routing)."""
    from itertools import combinations

    from flux.data.encode import lm_blocks
    from flux.data.openai_evals import evals_cached, load_mc_examples, load_sarcasm
    from flux.models.presets import build_lm
    from flux.models.pretrain import js_divergence, routing_frequencies, routing_summary

    if evals_cached() is None:
        print("--routing needs the openai-evals tasks in the cache (any flux run or pretrain on the "
              "default corpus fetches them)", file=sys.stderr)
        return
    texts = {"sarcasm": [e.text for e in load_sarcasm()][:200]}
    for e in load_mc_examples(max_per_task=200):
        texts.setdefault(e.task, []).append(e.prompt)
    domains = sorted(texts)
    by_domain = {d: lm_blocks(tokenizer, texts[d], seq_len=args.seq_len) for d in domains}
    print("moe_layer  model       max_share  variance   entropy  domain_JS")
    for label, model in (("random", build_lm(lm.config, seed=args.seed)), ("pretrained", lm)):
        per_domain = {d: routing_frequencies(model, b) for d, b in by_domain.items()}
        n_layers = len(next(iter(per_domain.values())))
        overall = [sum(per_domain[d][i] for d in domains) / len(domains) for i in range(n_layers)]
        for i, row in enumerate(routing_summary(overall)):
            js = [js_divergence(per_domain[a][i], per_domain[b][i]) for a, b in combinations(domains, 2)]
            print(f"{i:9d}  {label:10s}  {row['max_share']:9.3f}  {row['variance']:.2e}  {row['entropy']:8.3f}  "
                  f"{sum(js) / len(js):9.4f}")


def format_quality(q: dict) -> str:
    """The quality report of ``flux.models.pretrain.lm_quality`` as a few readable lines."""
    lines = [f"  held-out perplexity {q['heldout_ppl']:.1f} (unigram model {q['unigram_ppl']:.1f}) over "
             f"{q['heldout_tokens']} tokens; per source: "
             + ", ".join(f"{d} {p:.1f}" for d, p in q["per_domain_ppl"].items())]
    lines.append("  routing entropy per MoE layer (1 = uniform): "
                 + " ".join(f"{r['entropy']:.3f}" for r in q["routing"]))
    share = q["top_fraction"]
    lines.append(f"  share of a source's routing taken by its own top {share:.0%} of experts (uniform = {share:.2f}): "
                 + ", ".join(f"{d} {v:.3f}" for d, v in q["top_expert_share_mean"].items()))
    return "\n".join(lines)

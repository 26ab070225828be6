"""Step time of a whole patched MoE model: fwd+bwd of the LM loss, CPU, fp32.

    python -m benchmarks.bench_patched_model                 # both models, default sizes
    python -m benchmarks.bench_patched_model --models olmoe --reps 7 --json out.json

Providers (the same model and batch; only the experts implementation differs):

* ``eager``      transformers' per-expert loop (``set_experts_implementation("eager")``)
* ``grouped_mm`` transformers' grouped GEMM (the default on CPU)
* ``flux``       ``flux.patch(model)``, full expert set, through ``flux.ops.merged_moe``
* ``flux_merged`` FLUX layout per layer: max(2, E/8) tuning experts (trainable), the other
  experts merged into as many frozen groups
* ``flux_merged_int4`` the same with the frozen groups stored int4

Everything else of the model is trainable in every provider.  Providers are timed
interleaved (round r runs each once), median of ``--reps`` after ``--warmup`` rounds, so
background load hits them alike and the ratios stay meaningful on a shared machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

import flux
import flux.ops

MODELS = {
    # name: (transformers config class, kwargs); T = batch * seq tokens per step
    "mixtral": ("MixtralConfig", dict(hidden_size=512, intermediate_size=1024, num_local_experts=8,
                                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=1024)),
    "olmoe": ("OlmoeConfig", dict(hidden_size=512, intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                  vocab_size=1024)),
}
CAUSAL_LM = {"MixtralConfig": "MixtralForCausalLM", "OlmoeConfig": "OlmoeForCausalLM"}


def build(name: str, seed: int = 0):
    import transformers

    cfg_name, kw = MODELS[name]
    config = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, CAUSAL_LM[cfg_name])(config)
    return model.float().train()


def merged_layout(num_experts: int) -> dict:
    n = max(2, num_experts // 8)
    tuning = list(range(0, num_experts, max(1, num_experts // n)))[:n]
    rest = [e for e in range(num_experts) if e not in tuning]
    groups = max(1, min(n, len(rest)))
    clusters = [rest[i::groups] for i in range(groups)]
    return dict(tuning=tuning, clusters=clusters)


def providers(name: str) -> dict:
    base = build(name)
    out = {}
    for impl in ("eager", "grouped_mm"):
        m = copy.deepcopy(base)
        m.set_experts_implementation(impl)
        out[impl] = m
    out["flux"] = copy.deepcopy(base)
    flux.patch(out["flux"])
    for key, bits in (("flux_merged", None), ("flux_merged_int4", 4)):
        m = copy.deepcopy(base)
        handle = flux.patch(m)
        for layer in handle.moe_layers:
            layer.install_merged_view(**merged_layout(layer.num_experts), quantize_bits=bits)
        out[key] = m
    return out


def step_fn(model, ids):
    def run():
        for p in model.parameters():
            p.grad = None
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
    return run


def bench(name: str, batch: int, seq: int, reps: int, warmup: int) -> dict:
    models = providers(name)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODELS[name][1]["vocab_size"], (batch, seq), generator=gen)
    fns = {k: step_fn(m, ids) for k, m in models.items()}
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cfg = MODELS[name][1]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    return {
        "model": name, "tokens": batch * seq, "experts": experts, "top_k": cfg["num_experts_per_tok"],
        "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
        "merged_layout": {k: (len(v) if isinstance(v, list) else v) for k, v in merged_layout(experts).items()},
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "vs_eager": {k: med["eager"] / v for k, v in med.items()},
        "vs_grouped_mm": {k: med["grouped_mm"] / v for k, v in med.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mixtral,olmoe")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, _ = flux.ops.resolve("merged_moe_fwd", "cpu")
    print(f"# fwd+bwd step of a patched model (fp32, CPU, {torch.get_num_threads()} threads, "
          f"flux.ops backend: {backend}, torch {torch.__version__})")
    results = []
    for name in args.models.split(","):
        res = bench(name, args.batch, args.seq, args.reps, args.warmup)
        results.append(res)
        print(f"\n## {name}: E={res['experts']} k={res['top_k']} H={res['hidden']} I={res['intermediate']} "
              f"layers={res['layers']} T={res['tokens']}; merged: {res['merged_layout']['tuning']} tuning + "
              f"{res['merged_layout']['clusters']} frozen groups per layer")
        print("| provider | median ms | min ms | speed-up vs eager | vs grouped_mm |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for k in res["median_ms"]:
            print(f"| {k} | {res['median_ms'][k]:.1f} | {res['min_ms'][k]:.1f} | {res['vs_eager'][k]:.2f}x | "
                  f"{res['vs_grouped_mm'][k]:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backend": backend, "threads": torch.get_num_threads(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()

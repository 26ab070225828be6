"""What merging from int-N downloaded copies costs FLUX (``download_bits``, docs/federation.md
"Downloads"): the merged model's output error on held-out data, merged from the originals vs
from the participant's int-8 / int-4 copies of its non-tuning experts, on the default job's
round-1 roles of every participant sampled in round 1.

    python benchmarks/download_merge_error.py [--out benchmarks/results/download-merge-error.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    import torch

    from flux.ablation import _hidden, _rel
    from flux.federation.config import load_config
    from flux.federation.runner import Run, sample_participants
    from flux.merging.install import merge_model, uninstall
    from flux.methods.flux import participant_stacks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/download-merge-error.json")
    args = parser.parse_args()
    cfg = load_config(None, ["rounds=1"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp) / "r", resume=False, progress=False)
        handle, backbone = run.work.handle, run.work.model.backbone
        held_out = run.work.test.subset(range(256))
        sampled = sample_participants(cfg, 0)
        profiles = {p: run._profile_now(p, 0) for p in sampled}
        roles = run.method.plan(run.ctx, 0, sampled, profiles)
        with torch.no_grad():
            h_ref = _hidden(backbone, held_out)
        rows = []
        for pid in sampled:
            tuning = [sorted(t.tolist()) for t in roles[pid].tuning]
            budget = run.method.merged_total(pid, tuning, [layer.num_experts for layer in handle.moe_layers])
            row = {"participant": pid, "tuning_experts": sum(map(len, tuning)), "merged_groups": budget}
            for bits in (0, 8, 4):
                merge_model(handle, tuning, profiles[pid].frequencies(), profiles[pid].attention_scores(),
                            total_budget=budget, seed=cfg.seed, stacks=participant_stacks(handle, tuning, bits))
                with torch.no_grad():
                    row[f"error_bits{bits}"] = _rel(_hidden(backbone, held_out), h_ref)
                uninstall(handle)
            rows.append(row)
    result = {"config": "default job (flux run), round-1 roles", "held_out_examples": 256,
              "metric": "||h_merged - h|| / ||h|| of the final hidden states", "participants": rows,
              "median": {f"error_bits{b}": statistics.median(r[f"error_bits{b}"] for r in rows) for b in (0, 8, 4)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()

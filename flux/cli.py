"""The `flux` command line.  Sub-commands grow with the library; each lives in its own module."""
from __future__ import annotations

import argparse
import sys


def _env(_: argparse.Namespace) -> int:
    from flux.env import env_report

    print(env_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux", description="Federated fine-tuning of MoE LLMs (FLUX).")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, devices and available kernel backends")
    env.set_defaults(func=_env)
    from flux.data.cli import add_partition_arguments  # light: heavy imports happen when it runs

    add_partition_arguments(sub.add_parser(
        "partition", help="partition a dataset among participants and print the per-participant label table"))
    from flux.federation.cli import add_run_arguments

    add_run_arguments(sub.add_parser(
        "run", help="run a federated fine-tuning job (FLUX or a baseline) and print its result table"))
    from flux.federation.cli import add_export_arguments

    add_export_arguments(sub.add_parser(
        "export", help="save a run's fine-tuned model (newest checkpoint) with save_pretrained: flux export RUN_DIR OUT_DIR"))
    from flux.federation.cli import add_evaluate_arguments

    add_evaluate_arguments(sub.add_parser(
        "evaluate", help="score a run's newest checkpoint on its held-out data (per task): flux evaluate RUN_DIR"))
    from flux.models.cli import add_pretrain_arguments

    add_pretrain_arguments(sub.add_parser(
        "pretrain", help="warm-start a small MoE model on local text (cached)"))
    from flux.ablation import add_ablate_arguments

    add_ablate_arguments(sub.add_parser(
        "ablate", help="measure the paper's claims on the three techniques (writes DIR/ablation.json)"))
    from flux.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser(
        "bench", help="time-to-accuracy of FLUX vs the baselines (results.json, table.md, tta.png)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

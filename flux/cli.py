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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

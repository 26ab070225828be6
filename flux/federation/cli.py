"""``flux run``: one command for a federated job (config file, overrides, processes, resume)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_BAD_CONFIG = 2


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="TOML file (keys: see docs/federation.md); default: the built-in small job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set rounds=5 --set dataset.alpha=0.3 (repeatable)")
    parser.add_argument("--nproc", type=int, default=1, help="spawn this many local ranks (gloo on CPU); "
                        "under torchrun leave it at 1")
    parser.add_argument("--out", help="run directory (default: runs/<method>-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    from flux.federation.config import ConfigError, load_config

    config_path = args.config
    if args.resume and not config_path:
        saved = Path(args.resume) / "config.toml"
        if saved.exists():
            config_path = str(saved)
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as exc:
        print(f"flux run: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except FileNotFoundError as exc:
        print(f"flux run: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    out = args.resume or args.out or f"runs/{cfg.method.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    from flux.federation.errors import RunDirectoryInUse, StorageError
    from flux.federation.runner import RankFailure, run

    try:
        summary = run(cfg, out, resume=bool(args.resume), nproc=args.nproc, progress=not args.quiet)
    except (RankFailure, StorageError, RunDirectoryInUse) as exc:
        print(f"flux run: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # impossible budgets are only known once the model is built
        print(f"flux run: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if summary is not None:
        table = Path(out) / "table.md"
        if table.exists():
            print(table.read_text())
        tta = summary["time_to_accuracy"]
        reached = (f"reached {summary['target']:.2f} after {tta['sim_s']:.1f} s simulated / {tta['wall_s']:.1f} s wall"
                   if tta else f"did not reach {summary['target']:.2f}")
        print(f"{summary['method']}: final accuracy {summary['final_accuracy']:.4f}; {reached}; "
              f"results in {out}/ (metrics.jsonl, summary.json, accuracy.png)")
    return 0

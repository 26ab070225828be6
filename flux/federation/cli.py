"""``flux run``: one command for a federated job (config file, overrides, processes, resume);
``flux export RUN_DIR OUT_DIR``: the run's fine-tuned model in its transformers format;
``flux evaluate RUN_DIR``: that model's held-out metrics (per task where there are several)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

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


# ---------------------------------------------------------------- flux export / flux evaluate
def _run_dir_arguments(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int]) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a flux run directory (config.toml + checkpoints/)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=command)


def _on_run_dir(command: str, run_dir: str, action: Callable[[], Any]) -> tuple[int, Any]:
    """``(exit status, action's result)``: what a command that rebuilds RUN_DIR prints and
    returns when the directory is not a run, has no checkpoint or holds a config invalid here."""
    from flux.federation.config import ConfigError

    try:
        return 0, action()
    except ConfigError as exc:
        print(f"flux {command}: bad config in {run_dir}/config.toml: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG, None
    except (FileNotFoundError, LookupError) as exc:
        print(f"flux {command}: {exc}", file=sys.stderr)
        return 1, None


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _run_dir_arguments(parser, export_command)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the model (replaced if it exists)")
    return parser


def export_command(args: argparse.Namespace) -> int:
    """Rebuild RUN_DIR's model, load its newest checkpoint and save it with save_pretrained to
    OUT_DIR (plus head.safetensors/head.json for a classification task and the tokenizer)."""
    from flux.models.export import export_run

    status, done = _on_run_dir("export", args.run_dir,
                               lambda: export_run(args.run_dir, args.out_dir, progress=not args.quiet))
    if status == 0:
        out, rounds = done
        print(f"flux export: the model after round {rounds} of {args.run_dir} is in {out}/ "
              "(AutoModelForCausalLM.from_pretrained loads it)")
    return status


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _run_dir_arguments(parser, evaluate_command)
    parser.add_argument("--json", metavar="PATH", help="also write the metrics as JSON to PATH")
    parser.add_argument("--views", nargs="?", const="", metavar="FORMATS",
                        help="also score each device class's FLUX view of the model (the merged model its "
                             "participants train in), for the run's flux.frozen_format or each of the "
                             "comma-separated FORMATS, e.g. --views full,int8,int4")
    return parser


def evaluate_command(args: argparse.Namespace) -> int:
    """Score RUN_DIR's newest checkpoint on the run's held-out data and print the metrics (a
    table per task for multiple choice)."""
    from flux.federation.metrics import write_json_atomic
    from flux.federation.reload import evaluate_run

    views = None
    if args.views is not None:
        from flux.moe.merged_view import FROZEN_FORMATS

        views = [f.strip() for f in args.views.split(",") if f.strip()]
        unknown = [f for f in views if f not in FROZEN_FORMATS]
        if unknown:
            print(f"flux evaluate: unknown frozen format(s) {', '.join(unknown)} for --views; choose from "
                  f"{', '.join(sorted(FROZEN_FORMATS))}", file=sys.stderr)
            return 2
    status, result = _on_run_dir("evaluate", args.run_dir,
                                 lambda: evaluate_run(args.run_dir, progress=not args.quiet, views=views))
    if status == 0:
        print(evaluation_text(result, args.run_dir))
        if "views" in result:
            from flux.federation.views import views_text

            print("\nWhat each device class trains in (FLUX's round-1 view: most-activated experts tuned, "
                  "the rest merged):\n" + views_text({"global": result, "views": result["views"]}))
        if args.json:
            write_json_atomic(args.json, result)
    return status


def evaluation_text(result: dict, run_dir: str) -> str:
    """``flux evaluate``'s report: the scalar metrics, then one row per task when there are several."""
    scalars = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
    lines = [f"{run_dir} after round {result['round']} ({result['task']}, {result['test_examples']} held-out "
             f"examples): {scalars}"]
    accuracy, loss = result.get("accuracy_per_task") or {}, result.get("loss_per_task") or {}
    if accuracy:
        lines += ["", "| task | accuracy | loss |", "|---|---|---|"]
        lines += [f"| {task} | {accuracy[task]:.3f} | " + (f"{loss[task]:.3f}" if task in loss else "-") + " |"
                  for task in accuracy]
    return "\n".join(lines)

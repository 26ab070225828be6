"""``flux partition``: load a dataset, partition it among participants, print the label table."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_partition_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``flux partition`` options to ``parser`` (shared by flux/cli.py and partition_main)."""
    parser.add_argument("--dataset", required=True,
                        help="sarcasm | chatterbot | pydoc | multiemo (cached sdist only) | a local .jsonl/.json/.csv/.tsv file")
    parser.add_argument("--participants", type=int, default=10, help="number of participants (default 10)")
    parser.add_argument("--scheme", choices=("iid", "dirichlet", "domain"), default="dirichlet",
                        help="iid, dirichlet over labels, or by natural key (domain); default dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    parser.add_argument("--min-size", type=int, default=1, help="minimum examples per participant (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", choices=("text", "sentence"), default="text",
                        help="MultiEmo: whole reviews or single sentences (default text)")
    parser.add_argument("--text-key", default="text", help="local file: text column (default text)")
    parser.add_argument("--label-key", default="label", help="local file: label column (default label)")
    parser.add_argument("--domain-key", default=None, help="local file: domain column (default none)")
    parser.add_argument("--max-labels", type=int, default=24,
                        help="label columns shown; the rest are summed under (other) (default 24)")
    parser.add_argument("--no-fetch", action="store_true", help="MultiEmo: fail instead of downloading when not cached")
    parser.set_defaults(func=partition_command)
    return parser


def partition_command(args: argparse.Namespace) -> int:
    """Run ``flux partition`` from parsed arguments; returns the exit code."""
    from flux.data.partition import PartitionError, label_skew, label_table, partition
    from flux.data.sources import DataUnavailableError, load_dataset

    kwargs: dict = {}
    if args.dataset == "multiemo":
        kwargs = {"level": args.level, "fetch": not args.no_fetch}
    elif args.dataset not in ("chatterbot", "pydoc", "sarcasm"):
        kwargs = {"text_key": args.text_key, "label_key": args.label_key, "domain_key": args.domain_key}
    try:
        ds = load_dataset(args.dataset, **kwargs)
        parts = partition(ds.labels, ds.domains, args.participants, scheme=args.scheme, alpha=args.alpha,
                          min_size=args.min_size, seed=args.seed)
    except (DataUnavailableError, PartitionError, ValueError, FileNotFoundError) as exc:
        print(f"flux partition: error: {exc}", file=sys.stderr)
        return 2
    # The domain column only says something when domains decide the split.
    show_domains = args.scheme == "domain"
    scheme = f"dirichlet(alpha={args.alpha:g})" if args.scheme == "dirichlet" else args.scheme
    print(f"# {ds.name}: {len(ds)} examples, {len(ds.label_counts())} labels, {len(ds.domain_counts())} domains; "
          f"{args.participants} participants, scheme={scheme}, min_size={args.min_size}, seed={args.seed}")
    print()
    print(label_table(parts, ds.labels, ds.domains if show_domains else None, max_labels=args.max_labels))
    print()
    sizes = [len(p) for p in parts]
    print(f"sizes: min {min(sizes)}, max {max(sizes)}; label skew (mean TV distance to the global label mix): "
          f"{label_skew(parts, ds.labels):.3f}")
    return 0


def partition_main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``partition_main(["--dataset", "chatterbot", "--participants", "5"])``."""
    parser = add_partition_arguments(argparse.ArgumentParser(
        prog="flux partition", description="Partition a dataset among participants and print the label table."))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(partition_main())

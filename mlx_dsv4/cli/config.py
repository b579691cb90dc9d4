"""`mlx-dsv4 config init FILE` writes a commented runtime configuration; `mlx-dsv4 config check
FILE` reads one and names each bad setting with its line."""

import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("action", choices=["init", "check"], help="init: write a commented template; check: validate")
    p.add_argument("file", type=Path, help="the configuration file (YAML or JSON)")
    p.add_argument("--force", action="store_true", help="init: replace an existing file")


def load_or_report(path):
    """The RuntimeConfig of ``path``, or None after printing each of its problems."""
    from ..runtime_config import ConfigFileError, load_config

    try:
        return load_config(path)
    except ConfigFileError as err:
        print("\n".join(f"error: {line}" for line in err.lines()), file=sys.stderr)
        return None


def run(args):
    from ..runtime_config import TEMPLATE

    if args.action == "init":
        if args.file.exists() and not args.force:
            print(f"error: {args.file} exists; use --force to replace it", file=sys.stderr)
            return 2
        try:
            args.file.write_text(TEMPLATE, encoding="utf-8")
        except OSError as err:
            print(f"error: {args.file}: {err.strerror or err}", file=sys.stderr)
            return 1
        print(f"wrote {args.file}; use it with: mlx-dsv4 --config {args.file} chat")
        return 0
    config = load_or_report(args.file)
    if config is None:
        return 1
    print(f"{args.file}: {len(config.values)} settings, all valid")
    for key, value in config.values.items():
        print(f"  {key} = {value!r}")
    return 0

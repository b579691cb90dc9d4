"""The ``mlx-dsv4`` command: one entry point, one module per subcommand.

Each subcommand module has ``add_arguments(parser)`` and ``run(args) -> int | None``. Their
top-level imports stay light (argparse, pathlib, modules that import nothing heavy), and
``run`` imports what the command needs, so building the parser and ``--help`` start fast.
"""

import argparse
import importlib
import sys

# subcommand -> (module in this package, help)
SUBCOMMANDS = {
    "demo": ("demo", "Run the built-in walk-through on the trained tiny model"),
    "make-tiny": ("make_tiny", "Write a small random checkpoint in the official layout"),
    "train-tiny": ("train_tiny", "Train the small V4 on synthetic tasks (CPU)"),
    "convert": ("convert", "Convert a Hub DeepSeek-V4 checkpoint to MLX"),
    "generate": ("generate", "Generate a reply to one prompt"),
    "chat": ("chat", "Interactive chat"),
    "serve": ("serve", "OpenAI- and Anthropic-compatible HTTP server"),
    "bench": ("bench", "Long-context speed and memory benchmark"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-dsv4", description="DeepSeek-V4 on MLX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"{__name__}.{module_name}")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

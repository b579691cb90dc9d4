"""The ``mlx-dsv4`` command: one entry point, one module per subcommand.

Each subcommand module has ``add_arguments(parser)`` and ``run(args) -> int | None``. Their
top-level imports stay light (argparse, pathlib, modules that import nothing heavy), and
``run`` imports what the command needs, so building the parser and ``--help`` start fast.
"""

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> (module in this package, help)
SUBCOMMANDS = {
    "demo": ("demo", "Run the built-in walk-through on the tiny trained model"),
    "make-tiny": ("make_tiny", "Write a small random checkpoint in the official layout"),
    "train-tiny": ("train_tiny", "Train the small V4 on synthetic tasks (CPU)"),
    "convert": ("convert", "Convert a Hub DeepSeek-V4 checkpoint to MLX"),
    "generate": ("generate", "Generate a reply to one prompt"),
    "chat": ("chat", "Interactive chat"),
    "serve": ("serve", "OpenAI- and Anthropic-compatible HTTP server"),
    "bench": ("bench", "Long-context speed and memory benchmark"),
    "top": ("top", "Show a running server's figures (/metrics) live in the terminal"),
    "config": ("config", "Write or check a runtime configuration file (used with --config)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-dsv4", description="DeepSeek-V4 on MLX")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="runtime configuration (YAML or JSON) for generate, chat and serve; flags override it "
                             "(mlx-dsv4 config init FILE writes a commented one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"{__name__}.{module_name}")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        parser.commands[name] = p
    return parser


def _apply_config(parser, argv) -> int:
    """Make the --config file's settings the defaults of the command named in ``argv``."""
    # only a --config before the command is this file (convert has a --config of its own)
    at = next((i for i, a in enumerate(argv) if a in parser.commands), len(argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv[:at])
    if known.config is None:
        return 0
    rest = argv[at:]
    from .config import load_or_report

    config = load_or_report(known.config)
    if config is None:
        return 2
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in parser.commands:
        return 0
    defaults = config.command_defaults(command)
    for action in parser.commands[command]._actions:
        if action.dest in defaults:
            action.default = defaults[action.dest]
            action.required = False
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if _apply_config(parser, argv):
        return 2
    args = parser.parse_args(argv)
    args._argv = argv  # what a command that starts copies of itself gives them
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if "mlx_dsv4.distributed" in sys.modules:
        from ..distributed import leave

        return leave(code)
    return code

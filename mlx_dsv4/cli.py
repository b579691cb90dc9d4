"""The ``mlx-dsv4`` command: one entry point, one module per subcommand."""

import argparse
import importlib
import sys

# subcommand -> module exposing add_arguments(parser) and run(args) -> int | None
SUBCOMMANDS = {
    "demo": ("mlx_dsv4.demo", "Run the built-in walk-through on a tiny random model"),
    "make-tiny": ("mlx_dsv4.tiny", "Write a small random checkpoint in the official layout"),
    "convert": ("mlx_dsv4.convert.cli", "Convert a Hub DeepSeek-V4 checkpoint to MLX"),
    "generate": ("mlx_dsv4.cli_generate", "Generate a reply to one prompt"),
    "chat": ("mlx_dsv4.cli_chat", "Interactive chat"),
    "serve": ("mlx_dsv4.server.cli", "OpenAI- and Anthropic-compatible HTTP server"),
    "bench": ("mlx_dsv4.bench", "Long-context speed and memory benchmark"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-dsv4", description="DeepSeek-V4 on MLX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

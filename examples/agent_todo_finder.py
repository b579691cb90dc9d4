"""A coding agent that finds TODOs in a repository with a shell tool run in the sandbox
substrate: no network, the repository read-only, only a scratch directory writable.

    python examples/agent_todo_finder.py [--model DIR] [--repo PATH]

Without --model it runs the tiny V4 shipped in the package, which was trained on weather and
arithmetic questions only: it cannot plan this task, so point --model at a converted checkpoint.
The sandbox needs bubblewrap (Linux) or sandbox-exec (macOS) and refuses to start without it.
"""

import argparse
import sys
from pathlib import Path

from mlx_dsv4.cli.common import add_draft_arguments, load_options

SYSTEM = (
    "You are a coding assistant. The repository is at {repo} (read-only). Use the shell tool "
    "(grep, find, sed, wc, ...) to inspect it, then answer with a short list of file:line: TODO text."
)


def build_agent(model, tokenizer, repo, **options):
    from mlx_dsv4.agent import Agent, SandboxSubstrate, shell_tool

    repo = Path(repo).resolve()
    sandbox = SandboxSubstrate(read_only=[repo], timeout=20.0, output_bytes=32 << 10)
    shell = shell_tool(description="Run a shell command line in a sandbox (no network; the repository is "
                                   "read-only). Returns stdout, stderr and the exit status.", substrate=sandbox)
    return Agent(model, tokenizer, tools=[shell], system=SYSTEM.format(repo=repo), **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd())
    parser.add_argument("--model", type=Path, help="converted checkpoint (default: the tiny trained one)")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--log", type=Path, help="JSONL step log")
    add_draft_arguments(parser, what="each step")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from agent_weather_calculator import load_model_or_trained, print_events

    model, tokenizer = load_model_or_trained(args.model, **load_options(args))
    with build_agent(model, tokenizer, args.repo, max_steps=args.max_steps, max_tokens=args.max_tokens,
                     log_path=args.log, on_event=print_events, draft=args.draft,
                     num_draft=args.num_draft) as agent:
        result = agent.run(f"Find the TODO comments in {args.repo.resolve()}.")
    print(f"\n[{result.stop_reason} after {result.steps} step(s), {len(result.tool_calls)} tool call(s)]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

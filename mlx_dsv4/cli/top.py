"""`mlx-dsv4 top URL`: a running server's /metrics figures, live in the terminal."""

import sys
import time

DEFAULT_INTERVAL_S = 2.0
TIMEOUT_S = 5.0


def add_arguments(p):
    p.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8080 (its /metrics is read)")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                   help=f"seconds between two reads (default {DEFAULT_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")


class ServerProblem(Exception):
    """The URL does not answer, or what answers is not an mlx-dsv4 server."""


def metrics_url(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def read_figures(url: str) -> dict:
    """The figures the server at ``url`` (its /metrics address) reports; ServerProblem otherwise."""
    import urllib.error
    import urllib.request

    from ..metrics import figures_from_prometheus

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise ServerProblem(f"{url} answered HTTP {e.code}: not an mlx-dsv4 server") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerProblem(f"{url} does not answer ({reason})") from None
    except ValueError as e:  # a malformed URL
        raise ServerProblem(f"{url}: {e}") from None
    try:
        return figures_from_prometheus(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ServerProblem(f"{url} is not an mlx-dsv4 server's metrics ({e})") from None


def render(figures: dict, url: str, problem: str = None):
    """The figures as rich renderables."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ..metrics import LAYER_TYPE_TITLES
    from ..sizes import format_bytes

    parts = []
    requests = figures["requests"]
    head = Text()
    head.append(f"mlx-dsv4 {figures['model']}", style="bold")
    head.append(f"  {url}\n", style="dim")
    head.append(f"requests: {requests.get('completed', 0)} completed, {requests.get('cancelled', 0)} cancelled, "
                f"{requests.get('failed', 0)} failed | running {figures['active_generations']} | "
                f"queue depth {figures['queue_depth']}\n")
    head.append(f"tokens: {figures['prompt_tokens']} prompt, {figures['generated_tokens']} generated | "
                f"prefill {figures['prefill_tokens_per_s']:.1f} tok/s | "
                f"decode {figures['decode_tokens_per_s']:.1f} tok/s\n")
    head.append(f"context {figures['context_tokens']} tokens | active parameters "
                f"{figures['active_parameters']:,} | {figures['flops_per_token']:,} FLOP for the next token")
    if problem:
        head.append(f"\n{problem}", style="bold red")
    parts.append(head)

    kv = Table(title="KV cache of the latest sequence", title_justify="left")
    for column in ("layer type", "layers", "bytes", "window rows", "compressed entries"):
        kv.add_column(column, justify="left" if column == "layer type" else "right")
    for kind, entry in figures["kv_cache"].items():
        kv.add_row(LAYER_TYPE_TITLES.get(kind, kind), str(entry["layers"]), format_bytes(entry["bytes"]),
                   str(entry["window_rows"]), str(entry["compressed_entries"]))
    parts.append(kv)

    store = figures["prompt_cache"]
    parts.append(Text(f"prompt cache: {store['hits']} hits, {store['misses']} misses, "
                      f"{format_bytes(store['memory_bytes'])} in memory, {format_bytes(store['disk_bytes'])} on disk"))

    if figures["experts"]:
        experts = Table(title="Expert routing (tokens per routed expert)", title_justify="left")
        for column in ("layer", "routed tokens", "imbalance max/mean", "busiest experts"):
            experts.add_column(column, justify="left" if column == "busiest experts" else "right")
        for layer in figures["experts"]:
            tokens = layer["tokens"]
            busiest = sorted(range(len(tokens)), key=lambda e: -tokens[e])[:3]
            experts.add_row(str(layer["layer"]), str(sum(tokens)), f"{layer['imbalance']:.2f}",
                            ", ".join(f"#{e}: {tokens[e]}" for e in busiest))
        parts.append(experts)

    if figures["tool_calls"]:
        tools = Table(title="Tool calls", title_justify="left")
        for column in ("substrate", "calls", "mean latency"):
            tools.add_column(column, justify="left" if column == "substrate" else "right")
        for substrate, entry in figures["tool_calls"].items():
            mean = entry["seconds"] / entry["calls"] if entry["calls"] else 0.0
            tools.add_row(substrate, str(entry["calls"]), f"{mean * 1000:.1f} ms")
        parts.append(tools)

    draft = figures["draft"]
    if draft:
        parts.append(Text(f"draft: {draft['accepted']} of {draft['proposed']} proposed tokens accepted "
                          f"({100 * draft['acceptance_rate']:.1f}%)"))
    return Group(*parts)


def run(args) -> int:
    from rich.console import Console

    if not args.interval > 0:
        print(f"error: --interval must be a positive number of seconds, got {args.interval:g}", file=sys.stderr)
        return 2
    url = metrics_url(args.url)
    try:
        figures = read_figures(url)
    except ServerProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    console = Console()
    if args.once:
        console.print(render(figures, url))
        return 0

    from rich.live import Live

    problem = None
    try:
        with Live(render(figures, url), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    figures, problem = read_figures(url), None
                except ServerProblem as e:
                    problem = f"{time.strftime('%H:%M:%S')}: {e}; showing the last figures read"
                live.update(render(figures, url, problem), refresh=True)
    except KeyboardInterrupt:
        return 0

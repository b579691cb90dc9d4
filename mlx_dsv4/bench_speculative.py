"""`mlx-dsv4 bench --speculative`: plain greedy decode against speculative decode with the
checkpoint's MTP layer (or its DSpark drafter, when it has one), side by side in one process,
on one prompt per context length.

The checkpoint is ``--checkpoint``; without it, a random one of the shape the flags give when any
shape flag differs from its default, otherwise the trained checkpoint shipped with the package.
On trained weights each prompt is real text of the kind the model learned: a held-out key-value
lookup of about the context's length, so the drafter's own acceptance is a real figure. A lookup's
reply is the value and the end-of-sentence token; the timed decode does not stop there, so that
figure also covers what the model emits after its reply (the run logs the reply and its length). On
random weights the prompt is random token ids and the drafter's own proposals are nearly always wrong.

Next to the drafter's own runs, the acceptance is forced: the drafter's proposals are replaced by
the target's known greedy continuation (accepted) or by other tokens (rejected), in the proportion
asked for. The verification then costs exactly what it costs with a drafter of that acceptance;
only the drafter's own compute is that of the real head. Every speculative run is checked to emit
the plain greedy tokens. Random weights are built in float32 by default: in bfloat16 the rounding
of a (k+1)-token verification pass differs from that of single-token steps, and on random weights,
whose logits are nearly flat, that flips near-tied argmaxes (the run notes where).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_ACCEPTANCES = "0,0.5,0.8,1"
DEFAULT_DRAFTS = "1,2,3,4"
DEFAULT_SPEC_CONTEXTS = "1024,8192"
DEFAULT_SPEC_STEPS = 64
SWITCH_STEPS = 256  # runs with the switch on: long enough for its probes to settle as in a reply
SPEC_ACCEPTANCE = 0.8
TARGET_VS_PLAIN = 1.6
TARGET_VS_VLM = 1.5
TARGET_AT_ZERO = 0.9
DRAFTER_NAMES = {"mtp": "1 MTP layer", "dspark": "the DSpark drafter"}
PROMPT_KINDS = {"retrieval": "held-out key-value lookup (real text)", "random": "random token ids"}


def parse_acceptances(text: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--acceptance: expected numbers in 0..1 separated by commas, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"--acceptance: expected numbers in 0..1 separated by commas, got {text!r}")
    return values


def parse_drafts(text: str) -> List[int]:
    from .speculative import MAX_DRAFT

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= MAX_DRAFT for v in values):
        raise ValueError(f"--num-draft: expected draft counts in 1..{MAX_DRAFT} separated by commas, got {text!r}")
    return values


class ForcedAcceptance:
    """Replaces the drafter's proposals so that, over the run, the accepted share of the proposed
    drafts follows ``acceptance``: the first ``a`` proposals of a round are the target's known
    continuation, the rest are other tokens."""

    def __init__(self, continuation: Sequence[int], prompt_len: int, acceptance: float, vocab: int):
        self.continuation, self.prompt_len = list(continuation), prompt_len
        self.acceptance, self.vocab = acceptance, vocab
        self.proposed = self.accepted = 0

    def __call__(self, tokens: List[int], drafts: List[int]) -> List[int]:
        k = len(drafts)
        start = len(tokens) - self.prompt_len
        right = self.continuation[start : start + k]
        if len(right) < k:
            raise ValueError("the reference continuation is too short for this run")
        a = math.floor(self.acceptance * (self.proposed + k) + 1e-9) - self.accepted
        a = min(k, max(0, a))
        self.proposed += k
        self.accepted += a
        return right[:a] + [(t + 1) % self.vocab for t in right[a:]]


def _drafting(model, cache):
    """The drafting state of the checkpoint's drafter: its DSpark drafter when it has one."""
    from .speculative import Drafting, DSparkDrafting

    return (Drafting if model.dspark is None else DSparkDrafting)(model, cache)


def _restore(model, prefilled):
    main_state, draft_state, last_hidden, prompt = prefilled
    drafting = _drafting(model, model.make_cache())
    drafting.cache.load_state(*main_state)
    drafting.draft_cache.load_state(*draft_state)
    drafting.last_hidden = last_hidden
    drafting.tokens = list(prompt)
    return drafting


def plain_decode(model, prefilled, first: int, steps: int) -> tuple:
    """(the greedy tokens after ``first``, seconds per token) from the prefilled main cache."""
    import mlx.core as mx

    cache = _restore(model, prefilled).cache
    out, token = [], first
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(mx.array([[token]], dtype=mx.int32), cache, last_only=True)
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
    return out, (time.perf_counter() - t0) / steps


def speculative_decode(model, prefilled, first: int, steps: int, k: int, adjust=None, switch=None) -> dict:
    """Speculative greedy decoding of ``steps`` tokens after ``first`` (with ``switch``, speculation
    turned off while plain steps are faster, as generation does): tokens, seconds per token,
    acceptance."""
    drafting = _restore(model, prefilled)
    if adjust is not None:
        drafting.adjust_drafts = adjust
    out, token = [], first
    t0 = time.perf_counter()
    while len(out) < steps:
        kept = drafting.advance(token, k, switch)
        out += [t for t, _ in kept]
        token = kept[-1][0]
    seconds = time.perf_counter() - t0
    return {"tokens": out[:steps], "s_per_token": seconds / len(out),
            "acceptance": drafting.accepted / max(1, drafting.proposed)}


def _vlm_plain(path, prompt: np.ndarray, chunk: int, steps: int, log) -> Optional[float]:
    """mlx-vlm's plain greedy decode, seconds per token, or None when it cannot run."""
    from .bench import VlmRunner, _prefill, decode_step

    try:
        runner = VlmRunner(path)
    except ImportError as e:
        log(f"mlx-vlm: skipped: not installed ({e}); pip install 'mlx-dsv4[bench]'")
        return None
    except Exception as e:  # noqa: BLE001 - reported, the other figures still stand
        log(f"mlx-vlm: skipped: cannot load the checkpoint: {type(e).__name__}: {e}")
        return None
    import mlx.core as mx

    cache, out, _, _ = _prefill(runner, mx.array(prompt[None].astype(np.int32)), chunk)
    out, _ = decode_step(runner, out, cache)
    seconds = []
    for _ in range(steps):
        out, s = decode_step(runner, out, cache)
        seconds.append(s)
    return float(np.mean(seconds))


def speculative_checkpoint(args, log: Callable[[str], None]) -> Path:
    """--checkpoint; without it, a random checkpoint of the flags' shape when a shape flag differs
    from its default, otherwise the shipped trained checkpoint."""
    from .bench import ensure_checkpoint, shape_flags_given

    if args.checkpoint:
        return Path(args.checkpoint)
    given = shape_flags_given(args)
    if given:
        log(f"{' '.join(given)} given: random weights of that shape")
        return ensure_checkpoint(args, log, mtp=True)
    from .train import trained_checkpoint

    path = trained_checkpoint()
    log(f"no --checkpoint or shape flags: the trained checkpoint {path}")
    return path


def make_prompts(path, config: dict, contexts: Sequence[int], vocab: int, seed: int) -> Tuple[str, Dict, object]:
    """(prompt kind, {context: (ids, meta)}, tokenizer): random ids for random weights (prefixes of
    one draw, meta None), otherwise a held-out key-value lookup of about each context's length
    (meta: its key and answer; tokenizer: the checkpoint's, else None)."""
    from .tiny import has_random_weights

    if has_random_weights(config):
        ids = np.random.default_rng(seed + 1).integers(0, vocab, size=max(contexts)).astype(np.int32)
        return "random", {c: (ids[:c].tolist(), None) for c in contexts}, None
    from .tokenizer import load_tokenizer
    from .train.data import TaskGenerator
    from .train.evaluate import retrieval_prompt

    tokenizer = load_tokenizer(path)
    generator = TaskGenerator(tokenizer, seed=seed, split="eval")
    return "retrieval", {c: retrieval_prompt(generator, c) for c in contexts}, tokenizer


def run_speculative(args, log: Callable[[str], None] = print) -> dict:
    """Measure and report plain vs speculative decode; returns the summary (JSON-able)."""
    import mlx.core as mx

    from .loader import load_model, read_checkpoint_config
    from .speculative import DraftSwitch

    contexts = [int(c) for c in args.spec_contexts]
    acceptances = parse_acceptances(args.acceptance)
    drafts = parse_drafts(args.spec_drafts)
    steps = args.decode_steps or DEFAULT_SPEC_STEPS
    path = speculative_checkpoint(args, log)
    _, config, model_args = read_checkpoint_config(path)
    model = load_model(path, mtp=True)
    if not model.mtp_layers and model.dspark is None:
        raise ValueError(f"{path} has no MTP layer or DSpark drafter (mtp.* tensors): speculative decoding needs one")
    drafter = "mtp" if model.dspark is None else "dspark"
    if drafter == "dspark":
        block = model.dspark.block_size
        if any(k > block for k in drafts):
            log(f"the DSpark drafter proposes at most {block} tokens per pass (dspark_block_size): "
                f"skipping k={','.join(str(k) for k in drafts if k > block)}")
            drafts = [k for k in drafts if k <= block]
        if not drafts:
            raise ValueError(f"--num-draft: the DSpark drafter of {path} proposes 1..{block} tokens per pass")
    dtype = str(model.dtype).replace("mlx.core.", "")
    log(f"checkpoint {path}: {model_args.num_hidden_layers} layers + {DRAFTER_NAMES[drafter]}, ratios "
        f"{model_args.compress_ratios}, hidden {model_args.hidden_size}, vocab {model_args.vocab_size}, "
        f"{dtype} activations")
    kind, prompts, tokenizer = make_prompts(path, config, contexts, model_args.vocab_size, args.seed)
    log(f"prompts: {PROMPT_KINDS[kind]}")
    summary: Dict = {"command": "mlx-dsv4 bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"]
                     else " ".join(sys.argv), "checkpoint": str(path), "dtype": dtype, "decode_steps": steps,
                     "prompt": kind, "contexts": {}}
    for context in contexts:
        prompt, meta = prompts[context]
        log(f"context {context}: {len(prompt)}-token prompt, prefill (main model and {DRAFTER_NAMES[drafter]}) ...")
        drafting = _drafting(model, model.make_cache())
        logits = drafting.prefill(prompt, args.chunk)
        first = int(mx.argmax(logits).item())
        prefilled = (drafting.cache.to_state(), drafting.draft_cache.to_state(), drafting.last_hidden, prompt)
        del drafting
        plain_decode(model, prefilled, first, 2)  # one-off compilations, untimed
        reference, plain_s = plain_decode(model, prefilled, first, max(steps, SWITCH_STEPS) + max(drafts) + 1)
        continuation = [first] + reference
        row: Dict = {"prompt_tokens": len(prompt), "plain_tok_s": 1 / plain_s, "runs": []}
        if meta is not None:
            eos = tokenizer.eos_token_id
            reply_tokens = continuation.index(eos) + 1 if eos in continuation else len(continuation)
            reply = tokenizer.decode(continuation[:reply_tokens])
            row.update(key=meta["key"], answer=meta["answer"], reply=reply, reply_tokens=reply_tokens)
            log(f"  lookup of key {meta['key']} (value {meta['answer']}): greedy reply {reply!r}, {reply_tokens} "
                f"token(s); the decode runs on past it")
        vlm_s = None if args.no_vlm else _vlm_plain(path, np.array(prompt), args.chunk, steps, log)
        row["vlm_tok_s"] = None if vlm_s is None else 1 / vlm_s
        log(f"  plain decode {1 / plain_s:.1f} tok/s" + ("" if vlm_s is None else f"; mlx-vlm {1 / vlm_s:.1f} tok/s"))
        runs = [(None, k, False) for k in drafts] + [(a, k, False) for a in acceptances for k in drafts]
        runs += [(a, max(drafts), True) for a in acceptances]
        for forced, k, switched in runs:
            adjust = None
            if forced is not None:
                adjust = ForcedAcceptance(continuation, len(prompt), forced, model_args.vocab_size)
            # the plain timing is repeated next to each run: the machine's load moves
            n = max(steps, SWITCH_STEPS) if switched else steps
            _, plain_again = plain_decode(model, prefilled, first, n)
            result = speculative_decode(model, prefilled, first, n, k, adjust, DraftSwitch() if switched else None)
            same = next((i for i, (a, b) in enumerate(zip(result["tokens"], reference)) if a != b), None)
            if same is not None:
                log(f"  note: k={k}, forced acceptance {forced}: token {same} differs from plain greedy decoding "
                    f"({dtype} rounding of a {k + 1}-token pass against a 1-token pass decides a near tie)")
            entry = {"drafter": drafter, "forced": forced, "k": k, "switch": switched,
                     "acceptance": result["acceptance"],
                     "first_difference": same,
                     "tok_s": 1 / result["s_per_token"], "vs_plain": plain_again / result["s_per_token"]}
            if vlm_s is not None:
                entry["vs_vlm"] = vlm_s / result["s_per_token"]
            row["runs"].append(entry)
            label = _label(entry)
            log(f"  {label}: acceptance {entry['acceptance']:.2f}, {entry['tok_s']:.1f} tok/s, "
                f"{entry['vs_plain']:.2f}x plain")
        summary["contexts"][context] = row
    report_speculative(summary, log)
    return summary


def _label(run: dict) -> str:
    own = "own DSpark drafter" if run.get("drafter") == "dspark" else "own MTP drafter"
    label = f"{own}, real acceptance" if run["forced"] is None else f"forced {run['forced']:g}"
    return f"{label}, k={run['k']}" + (", switch" if run["switch"] else "")


def _best(row: dict, forced, switch: Optional[bool] = None) -> Optional[dict]:
    runs = [r for r in row["runs"] if r["forced"] == forced and switch in (None, r["switch"])]
    return max(runs, key=lambda r: r["vs_plain"]) if runs else None


def report_speculative(summary: dict, out=print) -> None:
    kind = summary.get("prompt")
    for context, row in summary["contexts"].items():
        prompt = "" if kind is None else f", {row['prompt_tokens']}-token prompt: {PROMPT_KINDS[kind]}"
        if "reply" in row:
            prompt += f" (greedy reply {row['reply']!r}: {row['reply_tokens']} of the decoded tokens)"
        out(f"\ncontext {context}{prompt}: plain decode {row['plain_tok_s']:.1f} tok/s"
            + ("" if row["vlm_tok_s"] is None else f", mlx-vlm plain {row['vlm_tok_s']:.1f} tok/s"))
        out("| drafts | acceptance | tok/s | vs plain | vs mlx-vlm |")
        out("|---|---:|---:|---:|---:|")
        for r in row["runs"]:
            vlm = f"{r['vs_vlm']:.2f}x" if "vs_vlm" in r else "-"
            out(f"| {_label(r)} | {r['acceptance']:.2f} | {r['tok_s']:.1f} | {r['vs_plain']:.2f}x | {vlm} |")
        verdicts = []
        best = _best(row, SPEC_ACCEPTANCE, switch=False)
        if best is not None:
            verdicts.append((f"forced {SPEC_ACCEPTANCE:g}, best k={best['k']}: >= {TARGET_VS_PLAIN}x plain",
                             best["vs_plain"] >= TARGET_VS_PLAIN, f"{best['vs_plain']:.2f}x"))
            if "vs_vlm" in best:
                verdicts.append((f"forced {SPEC_ACCEPTANCE:g}, best k={best['k']}: >= {TARGET_VS_VLM}x mlx-vlm plain",
                                 best["vs_vlm"] >= TARGET_VS_VLM, f"{best['vs_vlm']:.2f}x"))
        zero = _best(row, 0.0, switch=True)
        if zero is not None:
            verdicts.append((f"forced 0, k={zero['k']}, switch on: >= {TARGET_AT_ZERO}x plain",
                             zero["vs_plain"] >= TARGET_AT_ZERO, f"{zero['vs_plain']:.2f}x"))
        for text, ok, value in verdicts:
            out(f"{'PASS' if ok else 'FAIL'}  {text}: {value}")
        row["verdicts"] = [{"target": t, "pass": ok, "value": v} for t, ok, v in verdicts]

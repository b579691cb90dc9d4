"""`mlx-dsv4 demo`: build a tiny random V4 checkpoint, load it, and decode with the cache.

The tiny model's weights are random, so its tokens are meaningless; the demo
shows the whole path (checkpoint -> load -> prefill -> cached decoding) works
and how fast it runs here.
"""

import tempfile
import time
from pathlib import Path

import mlx.core as mx

PROMPT_LEN = 300  # crosses several ratio-4 and two ratio-128 compression windows


def add_arguments(p):
    p.add_argument("--dir", type=Path, default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode greedily")
    p.add_argument("--seed", type=int, default=0)


def greedy_decode(model, prompt: mx.array, n_tokens: int):
    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token)
    t1 = time.perf_counter()
    out = [token]
    for _ in range(n_tokens - 1):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(token)
        out.append(token)
    generated = mx.stack(out, axis=1)
    mx.eval(generated)
    t2 = time.perf_counter()
    return generated, cache, t1 - t0, t2 - t1


def run(args):
    from . import load_model
    from .tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or Path(tmp) / "tiny-v4"
        print(f"Writing a tiny random DeepSeek-V4 checkpoint (official layout) to {path}")
        write_tiny_checkpoint(path, preset="flash", seed=args.seed)
        model = load_model(path)
        a = model.args
        print(
            f"Loaded: {a.num_hidden_layers} layers (compress ratios {a.compress_ratios}), hidden {a.hidden_size}, "
            f"{a.n_routed_experts} experts, vocab {a.vocab_size}"
        )
        prompt = mx.array([[0] + [(97 * i + 13) % 128000 + 100 for i in range(PROMPT_LEN - 1)]])
        tokens, cache, t_prefill, t_decode = greedy_decode(model, prompt, args.tokens)
        print(f"Greedy continuation ids (random weights, so random tokens): {tokens[0].tolist()[:16]} ...")
        print(f"prompt: {PROMPT_LEN} tokens in {t_prefill:.3f} s = {PROMPT_LEN / t_prefill:.1f} tok/s")
        steps = args.tokens - 1  # the first token comes out of the prefill
        print(f"decode: {steps} cached steps in {t_decode:.3f} s = {steps / max(t_decode, 1e-9):.1f} tok/s")
        print(f"cache: {cache.nbytes} bytes for {cache.offset} tokens")
    return 0

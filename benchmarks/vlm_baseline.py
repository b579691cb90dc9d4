"""Check that mlx-vlm's DeepSeek-V4 runs a benchmark checkpoint, and that it computes
the same function as ours on the same weights (before trusting speed ratios).

    python benchmarks/vlm_baseline.py [CHECKPOINT_DIR] [--tokens 256]

Without a directory, a small official-layout checkpoint is written to a temporary folder.
Prints mlx-vlm's version, the max logit difference against our model (float cache) over a
prompt, the argmax agreement, and one prefill + decode step of mlx-vlm with its own caches.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)

    try:
        import mlx_vlm
    except ImportError as e:
        print(f"mlx-vlm is not installed ({e}); pip install 'mlx-dsv4[bench]'")
        return 1
    import mlx.core as mx

    from mlx_dsv4.bench import OursRunner, VlmRunner, agreement
    from mlx_dsv4.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else None
        if path is None:
            from mlx_dsv4.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(Path(tmp) / "ckpt", dtype="bfloat16", mtp=False, vocab_size=1024,
                                         compress_ratios=[0, 4, 128], index_topk=16, num_hash_layers=0)
        ours = OursRunner(load_model(path), "ours", "float", "float")
        vlm = VlmRunner(path)
        prompt = np.random.default_rng(0).integers(0, ours.model.args.vocab_size, args.tokens).astype(np.int32)
        ag = agreement(ours, vlm, prompt, print, n=args.tokens)
        print(f"mlx-vlm {getattr(mlx_vlm, '__version__', '?')} on {path}")
        print(f"logits vs ours over {ag['tokens']} tokens: max |diff| {ag['max_abs_diff']:.3g} "
              f"(logit scale {ag['max_abs']:.3g}), argmax agreement {100 * ag['argmax_agree']:.1f}%")
        cache = vlm.make_cache()
        t0 = time.perf_counter()
        out = vlm.step(mx.array(prompt[None]), cache)
        vlm.evaluate(out, cache)
        t1 = time.perf_counter()
        out = vlm.step(mx.argmax(out[:, -1], axis=-1).astype(mx.int32)[:, None], cache)
        vlm.evaluate(out, cache)
        t2 = time.perf_counter()
        print(f"mlx-vlm prefill {args.tokens} tokens: {t1 - t0:.2f}s; one decode step: {1e3 * (t2 - t1):.1f} ms; "
              f"cache {vlm.cache_bytes(cache)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of each cache storage on the tiny parity models against the float reference.

For the Flash-like and Pro-like tiny checkpoints of the parity tests, 2 x 640 random tokens
(one prefill): mean KL(reference || ours) over positions and argmax agreement of our logits
with transformers' DeepseekV4ForCausalLM in float32, for every kv / indexer storage pair
given, and for the default cache also against the reference run in the precision V4 was
trained with (tests/parity.py, storage="as-trained").

    python benchmarks/cache_precision.py [--storages fp8/fp4 bf16/bf16 float/float]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from parity import reference_logits  # noqa: E402
from test_parity import mean_kl  # noqa: E402

from mlx_dsv4.loader import load_model  # noqa: E402
from mlx_dsv4.tiny import write_tiny_checkpoint  # noqa: E402

PRESETS = {"flash": 0, "pro": 1}  # preset: seed, as tests/conftest.py writes them
VOCAB, LENGTH = 512, 640


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storages", nargs="+", default=["fp8/fp4", "bf16/bf16", "float/float"],
                        help="kv_dtype/index_dtype pairs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=11, help="token seed (default: %(default)s)")
    args = parser.parse_args(argv)
    tokens = np.random.default_rng(args.seed).integers(0, VOCAB, (2, LENGTH))
    print(f"{'model':<6} {'storage':<12} {'reference':<11} {'mean KL':>9} {'argmax agree':>13}")
    with tempfile.TemporaryDirectory() as root:
        for preset, seed in PRESETS.items():
            path = write_tiny_checkpoint(Path(root) / preset, preset=preset, seed=seed, vocab_size=VOCAB)
            model = load_model(path)
            references = {"float": reference_logits(path, tokens)}
            for storage in args.storages:
                kv, index = storage.split("/")
                ours = np.array(model(mx.array(tokens), cache=model.make_cache(kv, index)))
                against = ["float"] + (["as-trained"] if storage == "fp8/fp4" else [])
                for name in against:
                    if name not in references:
                        references[name] = reference_logits(path, tokens, storage=name)
                    ref = references[name]
                    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
                    print(f"{preset:<6} {storage:<12} {name:<11} {mean_kl(ours, ref):>9.2e} {agree:>13.3f}")


if __name__ == "__main__":
    sys.exit(main())

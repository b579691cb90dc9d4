"""Greedy decoding with the KV cache on any V4 checkpoint directory (token ids in, ids out).

    python examples/generate_ids.py [PATH] [--tokens 32]

PATH defaults to the tiny trained checkpoint shipped in the package.
"""

import argparse

import mlx.core as mx

import mlx_dsv4
from mlx_dsv4.demo import greedy_decode
from mlx_dsv4.train import trained_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("path", nargs="?")
parser.add_argument("--tokens", type=int, default=32)
args = parser.parse_args()

model = mlx_dsv4.load_model(args.path or trained_checkpoint())
prompt = mx.array([[model.args.bos_token_id, 100, 200, 300]])
ids, cache, t_prefill, t_decode = greedy_decode(model, prompt, args.tokens)
print(ids[0].tolist())
print(f"cache holds {cache.offset} tokens in {cache.nbytes} bytes")

"""Predicted KV-cache size: what `ModelCache.nbytes` will report after `tokens` tokens."""

import math
from typing import Union

import mlx.core as mx

from .cache import ENTRY_STEP
from .config import ModelArgs
from .kvcodec import IndexCodec, KVCodec


def _compressor_bytes(tokens: int, ratio: int, width: int, row_bytes: int, act_bytes: int, batch: int) -> int:
    c = 2 if ratio == 4 else 1
    entries = tokens // ratio
    total = math.ceil(entries / ENTRY_STEP) * ENTRY_STEP * row_bytes  # encoded entries, block-allocated
    total += (tokens % ratio) * c * width * (act_bytes + 4)  # open window: kv + float32 gate
    if ratio == 4 and entries:
        total += ratio * width * (act_bytes + 4)  # overlap half of the last closed window
    return batch * total


def kv_bytes(config: Union[dict, ModelArgs], tokens: int, kv_dtype: str = "fp8", index_dtype: str = "fp4",
             dtype=mx.bfloat16, batch: int = 1) -> int:
    """Bytes of KV cache for `tokens` tokens of one sequence (times `batch`).

    dtype is the model's activation dtype (bfloat16 for released checkpoints).
    """
    args = config if isinstance(config, ModelArgs) else ModelArgs.from_dict(config)
    if tokens <= 0:
        return 0
    act = dtype.size
    kv = KVCodec(kv_dtype, args.head_dim, args.qk_rope_head_dim, dtype)
    index = IndexCodec(index_dtype, args.index_head_dim, dtype)
    total = 0
    for ratio in args.compress_ratios:
        total += batch * args.sliding_window * kv.row_bytes()
        if ratio:
            total += _compressor_bytes(tokens, ratio, args.head_dim, kv.row_bytes(), act, batch)
        if ratio == 4:
            total += _compressor_bytes(tokens, 4, args.index_head_dim, index.row_bytes(), act, batch)
    return total

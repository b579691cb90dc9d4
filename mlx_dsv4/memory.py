"""KV-cache sizes: the byte count of each stored row, and what `ModelCache.nbytes` will report after
`tokens` tokens. Pure arithmetic on the config, so size estimates need no model and no MLX."""

import math
from typing import Union

from .config import ModelArgs

ENTRY_STEP = 64  # compressed entries are allocated in blocks of this many rows
FP8_GROUP = 64  # kv rows in FP8 carry one power-of-two scale byte per this many values
INDEX_GROUP = 32  # mxfp4 / mxfp8 indexer keys: one scale byte per this many values
INDEX_BITS = {"fp4": 4, "fp8": 8}
KV_DTYPES = ("fp8", "bf16", "float")  # storages of kv rows and compressed entries
INDEX_DTYPES = ("fp4", "fp8", "bf16", "float")  # storages of indexer keys
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def dtype_bytes(dtype) -> int:
    """Bytes per value of an activation dtype: an MLX dtype or its name."""
    size = getattr(dtype, "size", None)
    if isinstance(size, int):
        return size
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown activation dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def kv_row_bytes(kind: str, head_dim: int, rope_dim: int, act_bytes: int) -> int:
    """One stored kv row: "fp8" (E4M3 non-RoPE dims + scales, BF16 RoPE dims), "bf16" or "float"."""
    if kind == "fp8":
        nope = head_dim - rope_dim
        return nope + math.ceil(nope / FP8_GROUP) + 2 * rope_dim
    if kind == "bf16":
        return 2 * head_dim
    return act_bytes * head_dim



def index_row_bytes(kind: str, head_dim: int, act_bytes: int) -> int:
    """One stored indexer key: "fp4"/"fp8" (MX formats), "bf16" or "float"."""
    if kind in INDEX_BITS:
        return head_dim * INDEX_BITS[kind] // 8 + head_dim // INDEX_GROUP
    if kind == "bf16":
        return 2 * head_dim
    return act_bytes * head_dim


def _compressor_bytes(tokens: int, ratio: int, width: int, row_bytes: int, act_bytes: int, batch: int) -> int:
    c = 2 if ratio == 4 else 1
    entries = tokens // ratio
    total = math.ceil(entries / ENTRY_STEP) * ENTRY_STEP * row_bytes  # encoded entries, block-allocated
    total += (tokens % ratio) * c * width * (act_bytes + 4)  # open window: kv + float32 gate
    if ratio == 4 and entries:
        total += ratio * width * (act_bytes + 4)  # overlap half of the last closed window
    return batch * total


def kv_bytes(config: Union[dict, ModelArgs], tokens: int, kv_dtype: str = "fp8", index_dtype: str = "fp4",
             dtype="bfloat16", batch: int = 1) -> int:
    """Bytes of KV cache for `tokens` tokens of one sequence (times `batch`).

    dtype is the model's activation dtype (bfloat16 for released checkpoints).
    """
    args = config if isinstance(config, ModelArgs) else ModelArgs.from_dict(config)
    return sum(layer_kv_bytes(args, ratio, tokens, kv_dtype, index_dtype, dtype, batch)
               for ratio in args.compress_ratios)


def layer_kv_bytes(args: ModelArgs, ratio: int, tokens: int, kv_dtype: str = "fp8", index_dtype: str = "fp4",
                   dtype="bfloat16", batch: int = 1) -> int:
    """Bytes of KV cache one layer of compress ``ratio`` holds after ``tokens`` tokens (see kv_bytes)."""
    if tokens <= 0:
        return 0
    act = dtype_bytes(dtype)
    kv_row = kv_row_bytes(kv_dtype, args.head_dim, args.qk_rope_head_dim, act)
    total = batch * args.sliding_window * (kv_row + args.head_dim * act)  # the ring, stored and decoded
    if ratio:
        total += _compressor_bytes(tokens, ratio, args.head_dim, kv_row, act, batch)
    if ratio == 4:
        index_row = index_row_bytes(index_dtype, args.index_head_dim, act)
        total += _compressor_bytes(tokens, 4, args.index_head_dim, index_row, act, batch)
    return total


# Peak of a prefill chunk beyond the cache: the larger of two phases.
# - every layer: the float32 hyper-connection streams [chunk, hc_mult, hidden] and what is computed from
#   them (mixes, normed input, MoE routing and gathered experts). Measured: the peak is proportional to
#   the chunk and about this many stream-sized float32 copies per token (reduced widths hidden 512,
#   hc 4, CSA + HCA layer, bf16: 63.5 MiB for a 1024-token chunk after 4096 tokens, 7.9 copies; the
#   same per token at 2048 tokens, at 0, 2048 or 6144 tokens of context);
# - an attention layer: per token, the stream, the queries and what is derived from them (normed,
#   rotated, the output, its inverse rotation and grouped layout: ATTENTION_COPIES activation-sized
#   copies of [heads, head_dim]), each compressor's projected kv and float32 gates, the indexer's
#   queries; once, the entries decoded whole (CSA when a query block would pick more, HCA always);
#   and for each query block in flight its scores and probabilities, its indexer score block over at
#   most INDEX_ENTRY_BLOCK entries and its gathered entries. Fitted on a 2048-token chunk at hidden 128
#   (where this phase dominates) with 8 or 16 heads of 128 and 2 heads of 512: 10.75 query copies,
#   1.9 compressor copies.
STREAM_COPIES = 8
ATTENTION_COPIES = 11
COMPRESSOR_COPIES = 2
# The attention's block sizes live here so that the prediction and the attention share them.
QUERY_BLOCK = 128
# Indexer entries a 128-query block scores at a time (Indexer.select; fewer queries score
# proportionally more, so one decoding query scores up to 128 x this many in one piece). Measured on
# the CPU backend at V4-Flash's indexer widths (64 heads x 128, top-512), one 128-query block over
# 16384 entries: entry blocks of 16384 (all) / 8192 / 4096 / 2048 / 1024 took 11.1 / 12.5 / 10.5 /
# 9.7 / 8.2 s (2 busy cores, noisy) with a peak of 530 / 535 / 269 / 135 / 69 MiB. 2048 bounds a
# query block's scores to ~135 MiB at any context length, at no measured cost in speed.
INDEX_ENTRY_BLOCK = 2048
PREFILL_CHUNK = 2048  # generate's default prefill step
# Entries a dense (HCA) layer's full query block attends to at most; beyond, its query blocks
# shrink in proportion, so a block's scores stay bounded (ratio 128: 128K tokens of context).
DENSE_ENTRY_BLOCK = 1024
DECODE_COPIES = 2  # peak of decoding FP8 rows to bfloat16, in copies of the output (kvcodec)


def _attention_transient(args: ModelArgs, ratio: int, chunk: int, context: int, act: int, streams: int) -> int:
    """Peak bytes of one attention layer of compress `ratio` over a chunk (see above)."""
    H, hd, W = args.num_attention_heads, args.head_dim, args.sliding_window
    block = min(QUERY_BLOCK, chunk)
    per_token = args.hc_mult * args.hidden_size * 4 + ATTENTION_COPIES * H * hd * act
    once = 0
    per_block = 3 * H * block * (W + block + 1) * 4  # window scores, probabilities
    if ratio:
        per_token += COMPRESSOR_COPIES * (2 if ratio == 4 else 1) * hd * (act + 4)
    if ratio == 4:
        Hi, di, k = args.index_n_heads, args.index_head_dim, args.index_topk
        entries = (context + chunk) // 4
        per_token += COMPRESSOR_COPIES * 2 * di * (act + 4) + Hi * (di + 1) * 4
        entry_block = INDEX_ENTRY_BLOCK * max(1, QUERY_BLOCK // block)
        scored = min(entries, entry_block)
        decode_all = entries <= block * k  # Attention: else each block decodes its own picks
        if decode_all:
            once += DECODE_COPIES * entries * hd * act
        per_block += (2 * Hi * block * scored * 4 + scored * di * (act + 8)  # scores, weighted; keys decoded
                      + (1 if decode_all else DECODE_COPIES + 1) * block * k * hd * act  # gathered entries
                      + 3 * H * block * k * 4)  # their scores, probabilities
    elif ratio:
        entries = (context + chunk) // ratio
        once += DECODE_COPIES * entries * hd * act
        block = max(1, block * DENSE_ENTRY_BLOCK // max(DENSE_ENTRY_BLOCK, entries))
        per_block = 3 * H * block * (W + block + entries + 1) * 4
    in_flight = min(streams, -(-chunk // block))
    return chunk * per_token + once + in_flight * per_block


def prefill_transient_bytes(config: Union[dict, ModelArgs], chunk: int, context: int, dtype="bfloat16",
                            batch: int = 1, streams: int = 1) -> int:
    """Predicted peak bytes, beyond the cache, of prefilling `chunk` tokens after `context` tokens.

    streams: the CPU streams query blocks run on (mlx_dsv4.streams); dtype: the activation dtype.
    """
    args = config if isinstance(config, ModelArgs) else ModelArgs.from_dict(config)
    if chunk <= 0:
        return 0
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens, got {context}")
    act = dtype_bytes(dtype)
    peak = chunk * STREAM_COPIES * args.hc_mult * args.hidden_size * 4
    for ratio in set(args.compress_ratios):
        peak = max(peak, _attention_transient(args, ratio, chunk, context, act, streams))
    return batch * peak


def prefill_peak_bytes(config: Union[dict, ModelArgs], chunk: int, context: int, kv_dtype: str = "fp8",
                       index_dtype: str = "fp4", dtype="bfloat16", batch: int = 1, streams: int = 1) -> int:
    """Predicted peak bytes a prefill chunk adds to what was held before it: the cache it adds plus
    the transient (`prefill_transient_bytes`)."""
    growth = (kv_bytes(config, context + chunk, kv_dtype, index_dtype, dtype, batch)
              - kv_bytes(config, context, kv_dtype, index_dtype, dtype, batch))
    return growth + prefill_transient_bytes(config, chunk, context, dtype, batch, streams)


def run_bytes(config: Union[dict, ModelArgs], tokens: int, weight_bytes: int = 0, prefill_chunk: int = PREFILL_CHUNK,
              kv_dtype: str = "fp8", index_dtype: str = "fp4", dtype="bfloat16", batch: int = 1,
              streams: int = 1) -> int:
    """Peak bytes of running a sequence of `tokens` tokens: the weights, the cache at `tokens` tokens
    and the transient of the prefill chunk that ends there (the largest one: the transient only
    grows with context). What every memory guard compares with its limit."""
    if tokens <= 0:
        return weight_bytes
    chunk = min(prefill_chunk, tokens)
    return (weight_bytes + kv_bytes(config, tokens, kv_dtype, index_dtype, dtype, batch)
            + prefill_transient_bytes(config, chunk, tokens - chunk, dtype, batch, streams))

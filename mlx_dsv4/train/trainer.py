"""Training a small V4 with MLX autograd through this package's own Model and MTP modules.

Objectives:
- next-token cross-entropy on assistant tokens (`TaskGenerator` masks);
- the MTP layer's cross-entropy on the next-but-one token, at the same targets;
- the lightning indexer's auxiliary objective: at sampled query positions, KL divergence from
  the main attention's distribution over the compressed entries (a stop-gradient target: the
  heads' mean softmax of query . entry) to the indexer's softmax over its scores. The top-k
  choice has no gradient, so this is how the indexer learns which entries matter;
- optionally (`guide_weight`), attention guidance for copying: the first head of `copy_layer`
  should attend, at each target whose token occurs earlier in the window (one to four times),
  to those occurrences, and the first head of `previous_layer` to the previous position. Copying
  a token from the context needs such heads; from the prediction loss alone a model this small
  forms them only after many more tokens than a CPU run affords (docs/tiny-model.md);
- optionally (`copy_output_weight`), the copy head's own prediction: at the same targets, the
  first head of `copy_layer` alone, through the layer's output projection, the final norm and the
  vocabulary head, should predict the target (cross-entropy). Attention on the right position
  copies nothing unless the head's value and output projection carry which token sits there;
- optionally (`copy_value_weight`), that map on its own: the copy head's output projection,
  applied to the value at a position, should name the token at that position (cross-entropy at
  up to `copy_value_positions` positions whose token occurs at most twice in the sequence). The
  copy targets alone (a few numbers per sequence, their value mixed with others by the
  attention) do not teach it: the value of a late layer is mostly one direction shared by every
  position, and the part that tells the numbers apart is learned only from many examples;
- optionally (`entry_guide_weight`), at a retrieval answer, the CSA layers' first head and
  indexer should put their mass on the compressed entry of the asked key's value's block;
- optionally (`key_guide_weight`), head 1 of `previous_layer` should attend `key_offset` tokens
  back, where a retrieval line's key sits before its value and the asked key before the answer;
- optionally (`key_output_weight`), that head's own output (through its layer's output projection, the
  final norm and the vocabulary head) should name the token `key_offset` back, at positions that
  far after a token that occurs at most twice: attending to the key moves nothing unless the head's
  value and output projection carry which key it is;
- optionally (`key_readback_weight`), a map trained alongside and never saved should read, from the
  first CSA layer's attention input at those of the same positions whose own token is common, the
  token `key_offset` back: the key then reaches the layer that matches it in directions of its own,
  apart from the embedding directions that already name the position's own token (which a tied
  vocabulary head reads);
- optionally (`entry_key_weight`), in a retrieval list, another such map should read each line's key
  from the first CSA layer's compressed entry of the line's value: the entry that retrieval has to
  find by its key must carry it;
- optionally (`entry_value_weight`), the first CSA layer's first head's output projection, applied to
  the compressed entry of a list line's value (as if the head attended to it alone), should name the
  value: the entry that retrieval picks must carry what the answer copies;
- optionally (`answer_output_weight`), at a retrieval answer, that head's own output (through the
  layer's output projection, the final norm and the vocabulary head) should name the answer;
- optionally (`answer_attention_weight`), at a retrieval answer, that head's attention as the layer
  computes it (the window, the entries the indexer picked and the sink) should be on the answer's
  entries: the entry guide's dense softmax over the entries alone leaves the window free to outweigh them;
- optionally (`argument_weight`), a tool call's argument tokens count that many times in the
  next-token cross-entropy (the call's template is learned long before its arguments).

The vocabulary head (129280 x hidden) dominates a step's arithmetic while only the assistant
positions need it: the head and its cross-entropy run in numpy at those positions only (MLX's
CPU matmul is several times slower for this shape), joined to the MLX graph by a custom VJP.

`Trainer` computes a step through `fast` (the whole sequence from position 0, without caches);
`Trainer(reference=True)` through the inference modules and their caches (`trunk` here), which
the training path must agree with.
"""

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..chat.special import DSML, EOS, PARAMETER_TAG, THINK_CLOSE, USER as USER_TOKEN
from ..config import ModelArgs
from ..hc import collapse, expand
from ..loader import _MTPLayers, to_mlx_layout
from ..model import Block, Model
from ..spec import official_tensors, official_to_mlx
from ..tiny import PRESETS, tiny_config, tiny_weights
from . import fast
from .data import KINDS, TaskGenerator


STATE_DIR = "train_state"
TRAINED_LAYERS = 4  # the preset's first four layers: its schedule, at a size CPU training affords


def trained_config(preset: str = "flash", **overrides) -> dict:
    """The trained model's config: the tiny V4 (real vocabulary, the preset's layer schedule cut to
    TRAINED_LAYERS layers) with one MTP layer; ``overrides``: other config.json values."""
    ratios = list(PRESETS[preset][:TRAINED_LAYERS])
    return tiny_config(preset, **{"compress_ratios": ratios, "num_hidden_layers": len(ratios),
                                  "num_nextn_predict_layers": 1, **overrides})


@dataclass
class TrainOptions:
    steps: int = 500
    seed: int = 0
    lr: float = 4e-3
    min_lr: float = 4e-4
    warmup: int = 30
    weight_decay: float = 0.0
    mtp_weight: float = 0.5
    index_weight: float = 0.2
    index_queries: int = 64  # strided query positions per sequence for the indexer objective
    max_tokens: int = 1024  # a packed sequence's length bound
    retrieval_tokens: tuple = (1024, 1536)
    retrieval_questions: int = 1  # keys asked in turn after each retrieval list
    preset: str = "flash"
    log_every: int = 1
    mix: dict | None = None  # task kind -> weight; None is data.DEFAULT_MIX
    config: dict | None = None  # config.json values over trained_config's
    guide_weight: float = 0.0  # the attention-guidance objective's weight; 0: off
    head_from_embed: bool = False  # start the vocabulary head as the embedding (see Trainer)
    tie_head: bool = False  # the head is the scaled embedding throughout training (see Trainer)
    embed_scale: float = 1.0  # the initial embedding's multiple of the tiny draw's (see Trainer)
    embed_lr_scale: float = 1.0  # the embedding's learning rate as a multiple of the others'
    copy_output_weight: float = 0.0  # the copy head's own prediction objective's weight; 0: off
    copy_value_weight: float = 0.0  # the copy head's value-to-token objective's weight; 0: off
    copy_value_positions: int = 256
    copy_head_scale: float = 1.0  # the copy head's columns of the output projection start this many times the draw
    answer_head_scale: float = 1.0  # the same for the first CSA layer's first head (retrieval answers)
    init_from: str | None = None  # a run directory whose weights replace the draw (see Trainer)
    entry_guide_weight: float = 0.0  # the retrieval answer's compressed-entry objective's weight; 0: off
    key_guide_weight: float = 0.0  # the key-mover objective's weight (see `offset_loss`); 0: off
    key_offset: int = 3  # a retrieval line's value sits this many tokens after its key
    argument_weight: int = 1  # a tool call's argument tokens count this many times in the main loss
    key_output_weight: float = 0.0  # the key-mover head's own prediction of the key; 0: off
    key_readback_weight: float = 0.0  # the CSA layer input's readback of the key (see `key_readback_loss`); 0: off
    entry_key_weight: float = 0.0  # a list line's key read back from its value's CSA entry; 0: off
    entry_value_weight: float = 0.0  # a list line's value named from its CSA entry by the first head; 0: off
    answer_output_weight: float = 0.0  # the first CSA head's own naming of a retrieval answer; 0: off
    answer_attention_weight: float = 0.0  # the first CSA head's attention on a retrieval answer's entries; 0: off
    argument_guide_weight: float = 0.0  # heads on where call arguments and repeated replies come from; 0: off
    spell_head: int = 0  # the copy layer's head guided where an argument is spelled from other tokens
    copy_layer: int = 3
    previous_layer: int = 0
    head_sample: int = 0  # the head's softmax: the tasks' tokens and this many drawn others; 0: all
    composed_questions: float = 0.0  # the share of training tool questions composed from parts (see data)
    filler_leads: float = 0.0  # the share of training tool questions opened by random filler words (see data)
    processes: int = 1  # data-parallel processes: each step averages the gradients of one sequence per process

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainOptions":
        """The options a run's train_options.json (or a training.json entry) holds; other keys are
        left out and JSON's lists are read back as the tuples the fields hold."""
        fields = {k: v for k, v in saved.items() if k in vars(cls())}
        if isinstance(fields.get("retrieval_tokens"), list):
            fields["retrieval_tokens"] = tuple(fields["retrieval_tokens"])
        return cls(**fields)


def saved_step(out_dir):
    """The step of the last save `Trainer.save_official` made in `out_dir` (None: no state saved)."""
    state = Path(out_dir) / STATE_DIR / "step.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


# -- the numpy head --------------------------------------------------------------------------------

def _head_forward(w: np.ndarray, feats: np.ndarray, targets: np.ndarray):
    if not len(targets):
        return 0.0, np.zeros((0, w.shape[0]), np.float32)
    logits = feats @ w.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(targets))
    loss = -np.log(np.maximum(p[rows, targets], 1e-30)).mean()
    return loss, p


@mx.custom_function
def head_cross_entropy(feats, weight, targets):
    """Mean cross-entropy of `weight @ feats` (rows of feats [N, D]) against targets [N]."""
    loss, _ = _head_forward(np.array(weight), np.array(feats), np.array(targets))
    return mx.array(loss, dtype=mx.float32)


@head_cross_entropy.vjp
def _head_cross_entropy_vjp(primals, cotangent, output):
    feats, weight, targets = primals
    w, f, t = np.array(weight), np.array(feats), np.array(targets)
    _, p = _head_forward(w, f, t)
    p[np.arange(len(t)), t] -= 1.0
    p *= float(cotangent.item()) / max(1, len(t))
    return mx.array(p @ w), mx.array(p.T @ f), mx.zeros_like(targets)


# -- the model pieces the objectives read ---------------------------------------------------------

class Recorder:
    """Keeps, per CSA layer, the attention queries and the indexer's queries of the last forward."""

    def __init__(self, model: Model):
        self.records = {}
        for i, layer in enumerate(model.layers):
            if getattr(layer.attn, "ratio", 0) == 4:
                self._wrap(i, layer.attn)

    def _wrap(self, i, attn):
        project, queries = attn._project, attn.indexer.queries

        def recorded_project(x, offset):
            q_lora, q, kv = project(x, offset)
            self.records.setdefault(i, {})["q"] = q
            return q_lora, q, kv

        def recorded_queries(x, q_lora, rope, offset, codec):
            # The indexer's objective should move the indexer, not the layers feeding it.
            q, w = queries(mx.stop_gradient(x), mx.stop_gradient(q_lora), rope, offset, codec)
            self.records.setdefault(i, {}).update(iq=q, iw=w)
            return q, w

        object.__setattr__(attn, "_project", recorded_project)
        object.__setattr__(attn.indexer, "queries", recorded_queries)


def trunk(model: Model, tokens: mx.array):
    """(normed final features [B, L, D], last hc streams, cache) — Model.__call__ without its head."""
    a = model.args
    cache = model.make_cache("float", "float")
    x = model.embed(tokens)
    h = expand(x, a.hc_mult)
    for layer, layer_cache in zip(model.layers, cache.layers):
        h = layer(h, tokens, layer_cache, cache.query_block)
    x = collapse(h, model, a)
    return model.norm(x), h, cache


def mtp_features(mtp, hidden: mx.array, next_tokens: mx.array, embed, cache) -> mx.array:
    """MTP.__call__ without the shared head: its normed features [B, L, D] for token i + 2."""
    a = mtp.args
    e = mtp.e_proj(mtp.enorm(embed(next_tokens)))
    h = e[:, :, None, :] + mtp.h_proj(mtp.hnorm(hidden.astype(e.dtype)))
    h = Block.__call__(mtp, h, next_tokens, cache.layers[0], cache.query_block)
    x = collapse(h, mtp, a)
    return mtp.norm(x)


def indexer_kl(model: Model, recorder: Recorder, cache, positions: np.ndarray) -> mx.array:
    """Mean KL(main attention over compressed entries || indexer) at query `positions`, over CSA layers."""
    losses = []
    for i, rec in recorder.records.items():
        layer_cache = cache.layers[i]
        if not layer_cache.compressor.n_entries or "iq" not in rec:
            continue
        losses.append(index_kl(rec["q"], layer_cache.compressor.entries(), layer_cache.indexer.entries(),
                               rec["iq"], rec["iw"], positions, model.layers[i].attn.scale,
                               model.layers[i].attn.ratio))
    recorder.records.clear()
    return sum(losses) / len(losses) if losses else mx.array(0.0)


def visible_entries(n_entries: int, positions, ratio: int) -> mx.array:
    """[P, T]: the compressed entries each query position sees (an entry once its last token is in)."""
    return mx.arange(n_entries)[None, :] < ((mx.array(positions) + 1) // ratio)[:, None]


def indexer_scores(iq: mx.array, iw: mx.array, keys: mx.array) -> mx.array:
    """The lightning indexer's scores [B, P, T], differentiable: iq [B, P, H, d], iw [B, P, H],
    keys [B, T, d] (as `fast.index_scores` computes them without gradient)."""
    s = nn.relu(iq @ keys.astype(mx.float32)[:, None].swapaxes(-1, -2))  # [B, P, H, T]
    return (s * iw[..., None]).sum(axis=2)


def index_kl(q, entries, keys, iq, iw, positions: np.ndarray, scale: float, ratio: int) -> mx.array:
    """One CSA layer's KL at query `positions`: attention queries q [B, L, H, hd], entries [B, T, hd],
    indexer keys [B, T, d], indexer queries iq [B, L, H, d] and head weights iw [B, L, H]; `ratio`
    tokens per compressed entry."""
    pos = mx.array(positions)
    visible = visible_entries(entries.shape[1], positions, ratio)  # [P, T]
    q = q[:, pos].transpose(0, 2, 1, 3)  # [B, H, P, hd]
    s = (q @ entries[:, None].swapaxes(-1, -2)) * scale
    s = mx.where(visible, s, -mx.inf)
    target = mx.stop_gradient(mx.softmax(s, axis=-1, precise=True).mean(axis=1))  # [B, P, T]
    masked = mx.where(visible, indexer_scores(iq[:, pos], iw[:, pos], keys), -mx.inf)
    log_q = masked - mx.logsumexp(masked, axis=-1, keepdims=True)
    kl = mx.where(visible & (target > 0), target * (mx.log(mx.maximum(target, 1e-30)) - log_q), 0.0)
    return kl.sum(axis=-1).mean()


def copy_sources(ids: np.ndarray, positions: np.ndarray, window: int, block: int):
    """(query positions [P], slot masks [P, 2 * block]) for the copy guidance: the positions j among
    `positions` whose next token ids[j + 1] occurs one to four times in ids[j - window + 1 .. j],
    and those occurrences marked in j's row of `fast._banded`'s window slots."""
    queries, masks = [], []
    for j in positions:
        lo = max(0, j - window + 1)
        sources = np.nonzero(ids[lo: j + 1] == ids[j + 1])[0] + lo
        if not 1 <= len(sources) <= 4:
            continue
        row = np.zeros(2 * block, np.float32)
        row[fast.window_slot(sources, j, block)] = 1
        queries.append(j)
        masks.append(row)
    return np.array(queries, np.int32), np.array(masks, np.float32).reshape(-1, 2 * block)


def guide_loss(copy_probs: mx.array, previous_probs: mx.array, block: int, copy_queries: np.ndarray,
               copy_masks: np.ndarray) -> mx.array:
    """-log of the first head's attention on the copy sources (mean over `copy_queries`), plus -log of
    its attention on the previous position in the previous-token layer (mean over positions 1..L-1);
    *_probs: `fast._banded`'s probabilities [1, L, H, ...] of the two layers."""
    loss = mx.array(0.0)
    if copy_queries is not None and len(copy_queries):
        p = copy_probs[0, mx.array(copy_queries), 0, : 2 * block]
        loss = loss - mx.log((p * mx.array(copy_masks)).sum(-1) + 1e-6).mean()
    return loss + offset_loss(previous_probs, block, head=0, offset=1)


def offset_loss(probs: mx.array, block: int, head: int, offset: int) -> mx.array:
    """-log of `head`'s attention on the position `offset` before each query (mean over positions
    offset..L-1); probs: `fast._banded`'s probabilities [1, L, H, ...], `offset` at most `block`."""
    j = np.arange(offset, probs.shape[1])
    slot = fast.window_slot(j - offset, j, block)
    on = mx.take_along_axis(probs[0, mx.array(j), head], mx.array(slot[:, None]), axis=-1)[:, 0]
    return -mx.log(on + 1e-6).mean()


def copy_head_features(model: Model, layer: int, heads: mx.array, queries: np.ndarray, index: int = 0) -> mx.array:
    """The normed features [P, D] at `queries` of head `index` of `layer` alone: its output (heads
    [1, L, H, hd]: the layer's head outputs before the output projection, as `fast.attention`
    records them) through the layer's output projection and the final norm."""
    attn = model.layers[layer].attn
    only = mx.array(np.arange(heads.shape[2]) == index, heads.dtype)[:, None]
    return model.norm(attn._output(heads * only, 0)[0, mx.array(queries)])


def copy_output_loss(model: Model, layer: int, heads: mx.array, tokens: mx.array, queries: np.ndarray,
                     head: mx.array = None, index: int = 0) -> mx.array:
    """Mean cross-entropy, at `queries`, of the next token under the vocabulary head (`head`, or the
    model's) of `copy_head_features`: the copy head's (or head `index`'s) own prediction."""
    return _copy_head_cross_entropy(model, layer, heads, queries, tokens[0, mx.array(queries + 1)], head, index)


def copy_value_loss(model: Model, layer: int, kv: mx.array, tokens: mx.array, positions: np.ndarray,
                    head: mx.array = None) -> mx.array:
    """Mean cross-entropy, at `positions`, of the token there under the vocabulary head (`head`, or the
    model's) of `copy_head_features` of the layer's own value kv [1, L, hd] (as if the copy head
    attended only to the query's own position)."""
    heads = mx.broadcast_to(kv[:, :, None, :], (*kv.shape[:2], model.args.num_attention_heads, kv.shape[-1]))
    return _copy_head_cross_entropy(model, layer, heads, positions, tokens[0, mx.array(positions)], head)


def entry_value_loss(model: Model, layer: int, entries: mx.array, tokens: mx.array, positions: np.ndarray,
                     head: mx.array = None) -> mx.array:
    """Mean cross-entropy, at `positions`, of the token there under the vocabulary head of
    `copy_head_features` of the compressed entry [1, T, hd] of each position's block (as if head 0 of
    `layer`, at that position, attended to that entry alone)."""
    ratio = model.layers[layer].attn.ratio
    blocks = np.minimum(np.arange(tokens.shape[1]) // ratio, entries.shape[1] - 1)
    return copy_value_loss(model, layer, entries[:, mx.array(blocks)], tokens, positions, head)


def key_output_loss(model: Model, layer: int, heads: mx.array, tokens: mx.array, positions: np.ndarray, offset: int,
                    head: mx.array = None) -> mx.array:
    """Mean cross-entropy, at `positions`, of the token `offset` before each under the vocabulary head
    of `copy_head_features` of head 1 of `layer`: the key-mover head's own naming of the key."""
    return _copy_head_cross_entropy(model, layer, heads, positions, tokens[0, mx.array(positions - offset)], head,
                                    index=1)


def key_readback_loss(readback: nn.Linear, x: mx.array, tokens: mx.array, positions: np.ndarray, offset: int,
                      head: mx.array) -> mx.array:
    """Mean cross-entropy, at `positions`, of the token `offset` before each under the vocabulary head
    of `readback` applied to x [1, L, D] (a layer's attention input there)."""
    return fast.head_cross_entropy(readback(x[0, mx.array(positions)]), head, tokens[0, mx.array(positions - offset)])


def first_csa_layer(compress_ratios) -> int | None:
    """Index of the first CSA layer (compress ratio 4) of a layer schedule; None without one."""
    return next((i for i, ratio in enumerate(compress_ratios) if ratio == 4), None)


def list_lines(ids: np.ndarray, colon: int, space: int) -> np.ndarray:
    """Positions of the keys of a retrieval list's lines ("K", ":", " ", "V"), the value three on."""
    k = np.arange(max(0, len(ids) - 3))
    return k[(ids[k + 1] == colon) & (ids[k + 2] == space)].astype(np.int32)


def _copy_head_cross_entropy(model: Model, layer: int, heads: mx.array, queries: np.ndarray, targets: mx.array,
                             head: mx.array = None, index: int = 0) -> mx.array:
    feats = copy_head_features(model, layer, heads, queries, index)
    return fast.head_cross_entropy(feats, model.head.weight if head is None else head, targets)


def copy_value_positions(ids: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `limit` positions (sorted, drawn by `rng`) whose token occurs at most twice in `ids`: the
    tokens a copy head has to name (numbers, names), not the chat template's."""
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    rare = np.nonzero(counts[inverse] <= 2)[0]
    if len(rare) > limit:
        rare = np.sort(rng.choice(rare, limit, replace=False))
    return rare.astype(np.int32)


_ARGUMENT_VALUE = re.compile(
    f'<{DSML}{PARAMETER_TAG} name="[^"]*" string="(?:true|false)">(.*?)</{DSML}{PARAMETER_TAG}>', re.DOTALL)
_REPLY = re.compile(f"{THINK_CLOSE}([^<]*?){EOS}")  # an assistant reply without markup


def _token_text(ids, tokenizer):
    """(the decoded text of `ids`, each token's start and end offset in it)."""
    text_of = {t: tokenizer.decode([t]) for t in set(np.asarray(ids).tolist())}
    pieces = [text_of[t] for t in np.asarray(ids).tolist()]
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    return "".join(pieces), ends - np.array([len(p) for p in pieces], np.int64), ends


def argument_positions(ids, tokenizer) -> np.ndarray:
    """Positions of the tokens in `ids` that hold part of a DSML parameter's value, the arguments of
    a tool call, and of the token that closes each value (where the value ends is part of writing it)."""
    text, starts, ends = _token_text(ids, tokenizer)
    held = np.zeros(len(starts), bool)
    for m in _ARGUMENT_VALUE.finditer(text):
        held |= (starts <= m.end(1)) & (ends > m.start(1))
    return np.nonzero(held)[0]


def _last_occurrence(text: str, part: str, lo: int, hi: int, starts: set, ends: set):
    """The start of the last occurrence of `part` in text[lo:hi] that begins a token (or follows a
    token's leading space) and ends one, or None."""
    at = text.rfind(part, lo, hi)
    while at >= 0:
        begins = at in starts or (at - 1 in starts and text[at - 1] == " ")
        if begins and at + len(part) in ends:
            return at
        at = text.rfind(part, lo, at + len(part) - 1)
    return None


def argument_sources(ids, tokenizer, window: int) -> dict:
    """Where each tool-call argument token, and each token of a reply that repeats the question (a
    city's name, words to copy), comes from in the question: {j: (source positions, spelled)} for the
    position j before the token, over the sources in j's window. An argument's value, or else each of
    its space-separated parts, is found where it last occurs in the asking turn's last `window` tokens,
    however it was tokenised there (" Krakow" in a question is " Krak", "ow"; as a value "K", "rak",
    "ow"), and each token's sources are the tokens holding its characters there. A part found nowhere
    (the "*" of "3 times 4") comes from the tokens between its neighbours' sources; a reply counts only
    when found whole. `spelled` is true where no source is the token's own: copying it there takes a
    change of tokens, not an identity."""
    ids = np.asarray(ids)
    text, starts, ends = _token_text(ids, tokenizer)
    start_set, end_set = set(starts.tolist()), set(ends.tolist())
    out = {}
    values = [(m.span(1), True) for m in _ARGUMENT_VALUE.finditer(text)]
    values += [(m.span(1), False) for m in _REPLY.finditer(text)]
    for (v0, v1), argument in values:
        if v0 == v1:
            continue
        first = int(np.searchsorted(ends, v0, side="right"))  # the token holding the value's first character
        hi = int(starts[max(0, first - 1)])
        lo = max(int(starts[max(0, first - window)]), text.rfind(USER_TOKEN, 0, hi))  # the asking turn
        value = text[v0:v1]
        found = _last_occurrence(text, value, lo, hi, start_set, end_set)
        parts = [(0, len(value), found)]
        if found is None and not argument:
            continue
        if found is None:  # each part where it last occurs before the next part's occurrence
            parts, bound = [], hi
            for p in reversed(list(re.finditer(r"\S+", value))):
                at = _last_occurrence(text, p.group(), lo, bound, start_set, end_set)
                parts.insert(0, (p.start(), p.end(), at))
                bound = at if at is not None else bound
        # a part's span in the text before the call: where it occurs, or between its found neighbours
        spans = [(at, at + p1 - p0) if at is not None else None for p0, p1, at in parts]
        for i, (p0, p1, at) in enumerate(parts):
            if at is None:
                before = [span for span in spans[:i] if span is not None]
                after = [span for span in spans[i + 1:] if span is not None]
                if not before or not after:
                    continue
                gap = (before[-1][1], after[0][0])
            for k in range(first, len(ids)):
                if starts[k] >= v0 + p1:
                    break
                c0, c1 = max(int(starts[k]), v0 + p0) - v0, min(int(ends[k]), v0 + p1) - v0
                if c1 <= c0:
                    continue
                span = (at + c0 - p0, at + c1 - p0) if at is not None else gap
                sources = np.nonzero((starts < span[1]) & (ends > span[0]))[0]
                sources = sources[(sources > k - 1 - window) & (sources < first)]
                if at is None:  # the words between: not the spaces
                    sources = sources[[bool(text[starts[s]:ends[s]].strip()) for s in sources]]
                if len(sources):
                    out[k - 1] = (sources, not bool(np.any(ids[sources] == ids[k])))
    return out


def argument_guidance(ids, tokenizer, window: int, block: int) -> dict:
    """`argument_sources` as the objective reads them: "queries" [P], their slot masks [P, 2 * block]
    as `copy_sources` marks them ("masks"), whether each query's token is spelled [P] ("changed"),
    the spelled queries whose head should name their token [S] ("spelled") and those queries' source
    positions ("spelled_from"). A head should attend to the sources, and name a token that its sources
    write otherwise the first time the value reads them (" Krakow" names "K", the " times" between
    two numbers "*"; the "rak" after the "K" has the same sources and is the next layers' to write)."""
    queries, masks, changed, spelled, spelled_from, used = [], [], [], [], set(), set()
    for j, (sources, spelt) in sorted(argument_sources(ids, tokenizer, window).items()):
        row = np.zeros(2 * block, np.float32)
        row[fast.window_slot(sources, j, block)] = 1
        queries.append(j)
        masks.append(row)
        changed.append(spelt)
        if spelt and not used & set(sources.tolist()):
            spelled.append(j)
            spelled_from |= set(sources.tolist())
        used |= set(sources.tolist())
    return dict(queries=np.array(queries, np.int32), masks=np.array(masks, np.float32).reshape(-1, 2 * block),
                changed=np.array(changed, bool), spelled=np.array(spelled, np.int32),
                spelled_from=np.array(sorted(spelled_from), np.int64))


def retrieval_source(ids: np.ndarray, query: int) -> int:
    """Where the answer to a retrieval question (`TaskGenerator.retrieval`) sits in its list: the
    value after the asked key's line start ("K", ":", " ", "V"); `query` is the position whose next
    token is the answer, the asked key three positions before it ("K", "?", Assistant, </think>)."""
    key, answer = ids[query - 3], ids[query + 1]
    # the key's token may also be an earlier line's value; three positions after that sits a ":"
    starts = [p for p in np.nonzero(ids[: query - 6] == key)[0] if ids[p + 3] == answer]
    if len(starts) != 1:
        raise ValueError(f"{len(starts)} lines start with the asked key (token {key}) and hold the answer "
                         f"(token {answer}) three positions on; expected one")
    return int(starts[0]) + 3


def entry_guide_loss(q, entries, keys, iq, iw, query: int, held, scale: float, ratio: int) -> mx.array:
    """-log of the mass that the first attention head and the lightning indexer put on the compressed
    entries `held` (those holding the answer) at `query`, each as a softmax over the entries the query
    sees (dense: the top-k selection has no gradient); arrays as `index_kl` takes them."""
    visible = visible_entries(entries.shape[1], [query], ratio)[0]
    on = mx.array(np.isin(np.arange(entries.shape[1]), held))
    attention = mx.where(visible, (q[0, query, 0] @ entries[0].T) * scale, -mx.inf)
    index = mx.where(visible, indexer_scores(iq[:, [query]], iw[:, [query]], keys)[0, 0], -mx.inf)
    return sum(-(mx.logsumexp(mx.where(on, x, -mx.inf)) - mx.logsumexp(x)) for x in (attention, index))


def answer_attention_loss(probs: mx.array, block: int, entry_query: list) -> mx.array:
    """Mean over `entry_query` ((query, held entries) pairs) of -log of the first head's attention at
    the query on the entries `held`; probs: `fast._banded`'s [1, L, H, 2 * block + T + 1]."""
    terms = [-mx.log(probs[0, query, 0, mx.array([2 * block + t for t in held])].sum() + 1e-6)
             for query, held in entry_query]
    return sum(terms) / len(terms)


# -- batches -------------------------------------------------------------------------------------

def pack(stream, max_tokens: int):
    """One training sequence: a retrieval example alone, or short examples packed end to end up to
    `max_tokens` (a retrieval example met while packing waits for the next sequence)."""
    if stream.retrievals:
        first = stream.retrievals.pop(0)
    else:
        first = stream.next_short() if stream.short is not None else next(stream.generator)
    ids, mask, kinds = list(first.ids), list(first.mask), [first.kind]
    if first.kind != "retrieval":
        while True:
            ex = stream.next_short()
            if len(ids) + len(ex.ids) > max_tokens:
                stream.short = ex
                break
            ids += ex.ids
            mask += ex.mask
            kinds.append(ex.kind)
    return np.array(ids, np.int32), np.array(mask, bool), kinds


def task_generator(tokenizer, options: TrainOptions, seed, retrieval_tokens) -> TaskGenerator:
    """A generator of the run's training data (its mix and data options) from `seed`, with retrieval
    lists of `retrieval_tokens` tokens."""
    return TaskGenerator(tokenizer, seed=seed, retrieval_tokens=retrieval_tokens, mix=options.mix,
                         retrieval_questions=options.retrieval_questions, session_tokens=options.max_tokens,
                         composed_questions=options.composed_questions, filler_leads=options.filler_leads)


def task_vocabulary(tokenizer, options: TrainOptions, examples: int = 1000) -> np.ndarray:
    """The tokens of `examples` examples of the run's mix (from a generator of their own, seeded apart
    from the run's data, with short retrieval lists): nearly every token the tasks ever write."""
    gen = task_generator(tokenizer, options, f"vocabulary:{options.seed}", (200, 300))
    return np.unique(np.concatenate([np.array(next(gen).ids, np.int32) for _ in range(examples)]))


class _Stream:
    """Examples from a generator, sorted as they come into retrieval examples (each its own
    sequence) and short ones (packed), with the short one that did not fit the last pack held."""

    def __init__(self, generator):
        self.generator = generator
        self.retrievals = []
        self.short = None

    def next_short(self):
        if self.short is not None:
            ex, self.short = self.short, None
            return ex
        while True:
            ex = next(self.generator)
            if ex.kind != "retrieval":
                return ex
            self.retrievals.append(ex)


# -- the model to train ----------------------------------------------------------------------------

def init_model(cfg: dict, seed: int):
    """(Model, MTP holder) with tiny.py's random draw as the starting point; routing tables and gate
    biases frozen (V4 balances experts without gradients; hash routing is fixed)."""
    args = ModelArgs.from_dict(cfg)
    weights = {k: mx.array(v) for k, v in tiny_weights(cfg, seed=seed, mtp=True).items()}
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    model = Model(args)
    model.load_weights(list(to_mlx_layout(main, args).items()), strict=True)
    holder = _MTPLayers(args)
    holder.load_weights(list(to_mlx_layout(mtp, args).items()), strict=True)
    for m in (model, holder):
        m.freeze(recurse=True, keys=["tid2eid", "bias"])
    mx.eval(model.parameters(), holder.parameters())
    return model, holder


def _load_saved(model: Model, holder, cfg: dict, out_dir) -> None:
    args = ModelArgs.from_dict(cfg)
    weights = mx.load(str(Path(out_dir) / "model.safetensors"))
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    model.load_weights(list(to_mlx_layout(main, args).items()), strict=True)
    holder.load_weights(list(to_mlx_layout(mtp, args).items()), strict=True)


def load_run(out_dir):
    """(Model, MTP holder, TrainOptions) of what `Trainer.save_official` wrote in `out_dir`."""
    saved = json.loads((Path(out_dir) / "train_options.json").read_text())
    options = TrainOptions.from_saved(saved)
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    model, holder = init_model(cfg, options.seed)
    _load_saved(model, holder, cfg, out_dir)
    mx.eval(model.parameters(), holder.parameters())
    return model, holder, options


# every objective a step's loss may hold (each rank's batch decides which it has)
LOSS_PARTS = ("main", "mtp", "indexer_kl", "guide", "key_guide", "key_output", "key_readback", "entry_key",
              "entry_value", "entry_guide", "answer_output", "answer_attention", "copy_output", "copy_value",
              "argument_guide")


def average_over_ranks(ranks, grads, loss, parts, kinds, tokens: int):
    """(grads, loss, parts, per rank) averaged over the ranks in one all_sum of them all laid end to
    end (of the same length on every rank): a part is averaged over the ranks whose batch has it, and
    per rank is each one's own {"main", "kinds", "tokens"}."""
    unknown = set(parts) - set(LOSS_PARTS)
    if unknown:
        raise ValueError(f"loss parts {sorted(unknown)} are missing from LOSS_PARTS")
    flat = tree_flatten(grads)
    mx.eval(loss, [g for _, g in flat], list(parts.values()))
    zero = mx.array(0.0)
    scalars = [loss] + [parts.get(n, zero) for n in LOSS_PARTS] + [mx.array(float(n in parts)) for n in LOSS_PARTS]
    own = np.zeros((ranks.size, 2 + len(KINDS)), np.float32)  # this rank's row: main, tokens, kind counts
    own[ranks.rank, :2] = float(parts["main"]), tokens
    for kind in kinds:
        own[ranks.rank, 2 + KINDS.index(kind)] += 1
    pieces = [g.reshape(-1) for _, g in flat] + [mx.stack(scalars).astype(mx.float32), mx.array(own.reshape(-1))]
    ranks.wait_for_all("waiting for the other ranks' gradients")
    with ranks.busy("averaging the gradients"):
        total = ranks.all_sum(mx.concatenate(pieces))
        mx.eval(total)
    ends = np.cumsum([g.size for _, g in flat])
    averaged = iter(total[end - g.size:end].reshape(g.shape) / ranks.size for (_, g), end in zip(flat, ends))
    sums = np.array(total[int(ends[-1]):])
    k = len(LOSS_PARTS)
    averaged_parts = {n: mx.array(sums[1 + i] / sums[1 + k + i]) for i, n in enumerate(LOSS_PARTS) if sums[1 + k + i]}
    rows = sums[1 + 2 * k:].reshape(ranks.size, 2 + len(KINDS))
    per_rank = [{"main": round(float(r[0]), 5), "tokens": int(r[1]),
                 "kinds": [kind for kind, count in zip(KINDS, r[2:]) for _ in range(int(count))]} for r in rows]
    # tree_map walks the tree in tree_flatten's order, so each leaf gets its own slice back
    return tree_map(lambda _: next(averaged), grads), mx.array(sums[0] / ranks.size), averaged_parts, per_rank


def sequence_losses(record: dict) -> list:
    """(main loss, kinds) of each sequence a logged step trained on: one, or one per rank."""
    if "ranks" in record:
        return [(r["main"], r["kinds"]) for r in record["ranks"]]
    return [(record["main"], record["kinds"])]


class Trainer:
    """reference=True computes the objectives through the inference modules and their caches
    (`trunk`), the slow path the fast one (`fast.trunk`, the default) is checked against."""

    # the read-back maps trained alongside the model; kept in train_state/, never in the checkpoint
    TRAINING_MAPS = ("readback", "entry_readback")

    def __init__(self, tokenizer, options: TrainOptions, reference: bool = False, ranks=None):
        """ranks: the `distributed.Ranks` of `options.processes` processes training together (None:
        this process alone); each draws its own data and every step averages their gradients."""
        if reference and options.head_sample:
            raise ValueError("head_sample: the cache path (reference=True) runs the whole vocabulary head")
        size = 1 if ranks is None else ranks.size
        if size != options.processes:
            raise ValueError(f"processes: the run's options say {options.processes}, and {size} "
                             f"process{'es are' if size > 1 else ' is'} training it")
        self.ranks = ranks if size > 1 else None
        self.rank = 0 if ranks is None else ranks.rank
        self.options = options
        self.cfg = trained_config(options.preset, **(options.config or {}))
        mx.random.seed(options.seed)
        self.model, self.mtp_holder = init_model(self.cfg, options.seed)
        if options.embed_scale != 1.0:
            # The layers soon write vectors tens of times the embedding's norm into the residual
            # streams, and a token's identity is lost there by the last layer (a number's
            # embedding can no longer be read back from the streams); a larger embedding keeps it.
            self.model.embed.weight = self.model.embed.weight * options.embed_scale
            mx.eval(self.model.parameters())
        if options.head_from_embed:
            # Writing back a token read from the context then needs one map shared by all tokens
            # (the features of the attended token's embedding) instead of a head row learned per
            # token, which rare tokens (most numbers) would get only after many more steps.
            self.model.head.weight = self.model.embed.weight * self._tie_scale
            mx.eval(self.model.parameters())
        if options.init_from:
            # Another run's weights (with its embedding scale: give the same embed_scale so that a
            # tied head keeps its scale) and the training-only maps it saved; the optimizer and the
            # schedule start afresh, and the head scales below apply on top.
            source = json.loads((Path(options.init_from) / "config.json").read_text())
            differ = sorted(k for k in set(source) | set(self.cfg)
                            if k != "torch_dtype" and source.get(k) != self.cfg.get(k))
            if differ:
                raise ValueError(f"{options.init_from}/config.json differs from this run's config in "
                                 f"{', '.join(differ)} (give train-tiny the run's --config)")
            _load_saved(self.model, self.mtp_holder, self.cfg, options.init_from)
        self.first_csa = first_csa_layer(self.cfg["compress_ratios"])
        for layer, scale in ((options.copy_layer, options.copy_head_scale),
                             (self.first_csa, options.answer_head_scale)):
            if scale == 1.0:
                continue
            # The last layer's feed-forward writes vectors a hundred times the copy head's output into
            # the residual streams, and the output hardly hears what the head copied (nor what the CSA
            # layer's first head read from an entry); the copy and answer objectives do not see this
            # scale (they read the head's output through the final norm).
            attn = self.model.layers[layer].attn
            factor = np.ones(attn.wo_a.weight.shape, np.float32)  # [groups, rank, heads per group * head_dim]
            factor[0, :, : self.cfg["head_dim"]] = scale  # head 0's columns in group 0
            attn.wo_a.weight = attn.wo_a.weight * mx.array(factor)
            mx.eval(self.model.parameters())
        if options.tie_head:
            # Without it, the rows of rare tokens drift towards a shared direction (a head row of a
            # number ends up closer to every other number's than to its own embedding), and an
            # attended number can no longer be told from the others at the output.
            self.model.head.freeze()
        self.recorder = Recorder(self.model)
        self.tokenizer = tokenizer
        self._colon, self._space = tokenizer.encode(":")[0], tokenizer.encode(" ")[0]
        # rank 0 draws what a single process draws; the others, streams of their own
        data_seed = options.seed if self.rank == 0 else f"{options.seed}/rank{self.rank}"
        self.data = _Stream(task_generator(tokenizer, options, data_seed, options.retrieval_tokens))
        self.rng = np.random.default_rng(options.seed if self.rank == 0 else [options.seed, self.rank])
        self._task_vocabulary = None
        self.optimizer = optim.AdamW(learning_rate=self._lr, weight_decay=options.weight_decay)
        if options.embed_lr_scale != 1.0:
            # Adam's steps do not grow with the weights: a scaled-up embedding learns as fast,
            # relative to its size, as the drawn one only with its learning rate scaled as much.
            embed = optim.AdamW(learning_rate=lambda step: options.embed_lr_scale * self._lr(step),
                                weight_decay=options.weight_decay)
            self.optimizer = optim.MultiOptimizer([embed, self.optimizer],
                                                  [lambda path, _: path == "model.embed.weight"])
        if options.key_readback_weight:
            # A random rotation: what it reads is not the embedding's own directions, where the
            # position's token already sits, so the key has to arrive in others.
            size = self.cfg["hidden_size"]
            rotation = np.linalg.qr(np.random.default_rng(options.seed + 1).standard_normal((size, size)))[0]
            self._joint.readback = nn.Linear(size, size, bias=False)
            self._joint.readback.weight = mx.array(rotation.astype(np.float32))
        if options.entry_key_weight:
            self._joint.entry_readback = nn.Linear(self.cfg["head_dim"], self.cfg["hidden_size"], bias=False)
        if options.init_from:
            self._load_training_maps(Path(options.init_from), required=False)
        self.step = 0
        if reference and (options.guide_weight or options.copy_output_weight or options.copy_value_weight
                          or options.entry_guide_weight or options.key_guide_weight or options.key_output_weight
                          or options.key_readback_weight or options.entry_key_weight
                          or options.entry_value_weight or options.answer_output_weight
                          or options.answer_attention_weight or options.argument_guide_weight):
            raise ValueError("the copy objectives are computed on the fast path only (reference=False)")
        if not reference and fast.NUMPY_KERNELS:
            fast.numpy_products(self._joint)
        self._grad = nn.value_and_grad(self._joint, self._loss if reference else self._fast_loss)

    def _lr(self, step):
        o = self.options
        warm = mx.minimum((step + 1) / o.warmup, 1.0)
        progress = mx.clip((step - o.warmup) / max(1, o.steps - o.warmup), 0.0, 1.0)
        return warm * (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + mx.cos(math.pi * progress)))

    @property
    def _joint(self):
        if not hasattr(self, "_joint_module"):
            joint = nn.Module()
            joint.model = self.model
            joint.mtp = self.mtp_holder
            self._joint_module = joint
        return self._joint_module

    def _loss(self, joint, tokens, main_pos, main_targets, mtp_pos, mtp_targets, index_pos, copy_queries=None,
              copy_masks=None, value_pos=None, entry_query=None, key_pos=None, entry_keys=None, arguments=None,
              vocab=None):
        model, mtp = joint.model, joint.mtp.mtp[0]
        feats, hidden, cache = trunk(model, tokens)
        main = head_cross_entropy(feats[0, main_pos], self._head(model), main_targets)
        next_tokens = mx.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        mtp_cache = mtp.make_cache("float", "float")
        mtp_feats = mtp_features(mtp, hidden, next_tokens, model.embed, mtp_cache)
        mtp_loss = head_cross_entropy(mtp_feats[0, mtp_pos], self._head(model), mtp_targets)
        index_loss = indexer_kl(model, self.recorder, cache, index_pos)
        o = self.options
        total = main + o.mtp_weight * mtp_loss + o.index_weight * index_loss
        return total, {"main": main, "mtp": mtp_loss, "indexer_kl": index_loss}

    def _fast_loss(self, joint, tokens, main_pos, main_targets, mtp_pos, mtp_targets, index_pos, copy_queries=None,
                   copy_masks=None, value_pos=None, entry_query=None, key_pos=None, entry_keys=None,
                   arguments=None, vocab=None):
        model, mtp = joint.model, joint.mtp.mtp[0]
        o = self.options
        records = {}
        guided = (o.copy_layer, o.previous_layer) if o.guide_weight else ()
        probs_of = set(guided) | ({o.copy_layer} if o.copy_output_weight or o.copy_value_weight else set())
        probs_of |= {o.previous_layer} if o.key_guide_weight or o.key_output_weight else set()
        probs_of |= {o.copy_layer} if o.argument_guide_weight else set()
        first_csa = self.first_csa
        answers = o.answer_output_weight or o.answer_attention_weight
        probs_of |= {first_csa} if answers and first_csa is not None else set()
        feats, hidden = fast.trunk(model, tokens, records, probs_of=probs_of)
        head = self._head(model)
        next_tokens = mx.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        if vocab is not None:  # the softmax over the sampled vocabulary: targets become its rows
            head = head[mx.array(vocab)]
            rows = np.zeros(self.cfg["vocab_size"], np.int32)
            rows[vocab] = np.arange(len(vocab))
            rows = mx.array(rows)
            tokens, main_targets, mtp_targets = rows[tokens], rows[main_targets], rows[mtp_targets]
        main = fast.head_cross_entropy(feats[0, main_pos], head, main_targets)
        mtp_feats = fast.mtp_features(mtp, hidden, next_tokens, model.embed)
        mtp_loss = fast.head_cross_entropy(mtp_feats[0, mtp_pos], head, mtp_targets)
        kls = [index_kl(r["q"], r["entries"], r["keys"], r["iq"], r["iw"], index_pos, model.layers[i].attn.scale,
                        model.layers[i].attn.ratio) for i, r in records.items() if "iq" in r]
        index_loss = sum(kls) / len(kls) if kls else mx.array(0.0)
        parts = {"main": main, "mtp": mtp_loss, "indexer_kl": index_loss}
        weights = {"main": 1.0, "mtp": o.mtp_weight, "indexer_kl": o.index_weight}
        if guided:
            copy, previous = records[o.copy_layer], records[o.previous_layer]
            parts["guide"] = guide_loss(copy["probs"], previous["probs"], copy["block"], copy_queries, copy_masks)
            weights["guide"] = o.guide_weight
        if o.key_guide_weight:
            # Head 1 of the previous-token layer brings each token the one `key_offset` before it: in a
            # retrieval list a value's position then holds its key, and so does the question's answer
            # position (the asked key sits as far back), so the CSA layer can match the two.
            previous = records[o.previous_layer]
            parts["key_guide"] = offset_loss(previous["probs"], previous["block"], head=1, offset=o.key_offset)
            weights["key_guide"] = o.key_guide_weight
        if o.key_output_weight and key_pos is not None and len(key_pos):
            parts["key_output"] = key_output_loss(model, o.previous_layer, records[o.previous_layer]["heads"], tokens,
                                                  key_pos, o.key_offset, head)
            weights["key_output"] = o.key_output_weight
        if o.key_readback_weight and key_pos is not None and len(key_pos):
            parts["key_readback"] = key_readback_loss(joint.readback, records[first_csa]["x"], tokens, key_pos,
                                                      o.key_offset, head)
            weights["key_readback"] = o.key_readback_weight
        if o.entry_key_weight and entry_keys is not None and len(entry_keys):
            entries = records[first_csa]["entries"][0, mx.array(entry_keys[:, 1] // model.layers[first_csa].attn.ratio)]
            parts["entry_key"] = fast.head_cross_entropy(joint.entry_readback(entries), head,
                                                         tokens[0, mx.array(entry_keys[:, 0])])
            weights["entry_key"] = o.entry_key_weight
        if o.entry_value_weight and entry_keys is not None and len(entry_keys):
            parts["entry_value"] = entry_value_loss(model, first_csa, records[first_csa]["entries"], tokens,
                                                    entry_keys[:, 1], head)
            weights["entry_value"] = o.entry_value_weight
        if o.answer_output_weight and entry_query:
            queries = np.array([query for query, _ in entry_query], np.int32)
            parts["answer_output"] = copy_output_loss(model, first_csa, records[first_csa]["heads"], tokens, queries,
                                                      head)
            weights["answer_output"] = o.answer_output_weight
        if o.answer_attention_weight and entry_query:
            csa = records[first_csa]
            parts["answer_attention"] = answer_attention_loss(csa["probs"], csa["block"], entry_query)
            weights["answer_attention"] = o.answer_attention_weight
        if o.copy_output_weight and copy_queries is not None and len(copy_queries):
            parts["copy_output"] = copy_output_loss(model, o.copy_layer, records[o.copy_layer]["heads"], tokens,
                                                    copy_queries, head)
            weights["copy_output"] = o.copy_output_weight
        if o.copy_value_weight and value_pos is not None and len(value_pos):
            parts["copy_value"] = copy_value_loss(model, o.copy_layer, records[o.copy_layer]["kv"], tokens, value_pos,
                                                  head)
            weights["copy_value"] = o.copy_value_weight
        if o.argument_guide_weight and arguments is not None and len(arguments["queries"]):
            copy = records[o.copy_layer]
            by_head = mx.array(np.where(arguments["changed"], o.spell_head, 0)[:, None, None])
            p = mx.take_along_axis(copy["probs"][0, mx.array(arguments["queries"])], by_head, axis=1)[:, 0]
            p = p[:, : 2 * copy["block"]]
            parts["argument_guide"] = -mx.log((p * mx.array(arguments["masks"])).sum(-1) + 1e-6).mean()
            if len(arguments["spelled"]):
                parts["argument_guide"] = parts["argument_guide"] + copy_output_loss(
                    model, o.copy_layer, copy["heads"], tokens, arguments["spelled"], head, o.spell_head)
            weights["argument_guide"] = o.argument_guide_weight
        if o.entry_guide_weight and entry_query:
            guides = [entry_guide_loss(r["q"], r["entries"], r["keys"], r["iq"], r["iw"], query, held,
                                       model.layers[i].attn.scale, model.layers[i].attn.ratio)
                      for query, held in entry_query for i, r in records.items() if "iq" in r]
            parts["entry_guide"] = sum(guides) / len(guides)
            weights["entry_guide"] = o.entry_guide_weight
        return sum(weights[k] * v for k, v in parts.items()), parts

    def _head(self, model: Model) -> mx.array:
        """The vocabulary head's weight: the model's, or with `tie_head` the scaled embedding."""
        if self.options.tie_head:
            return model.embed.weight * self._tie_scale
        return model.head.weight

    @property
    def _tie_scale(self) -> float:
        """The head as the embedding times this starts with the logit scale of the tiny draw's."""
        return self.cfg["hidden_size"] ** -0.5 / self.options.embed_scale

    def batch(self):
        ids, mask, kinds = pack(self.data, self.options.max_tokens)
        L = len(ids)
        targets = np.nonzero(mask[1:])[0]  # each target once: the guidance and the indexer's queries
        mtp_pos = np.nonzero(mask[2:])[0]
        main_pos = targets
        if self.options.argument_weight > 1:
            arguments = np.intersect1d(argument_positions(ids, self.tokenizer) - 1, targets)
            main_pos = np.sort(np.concatenate([targets] + [arguments] * (self.options.argument_weight - 1)))
        n = self.options.index_queries
        stride = max(1, (L - 4) // n)
        offset = int(self.rng.integers(0, stride))
        index_pos = np.unique(np.concatenate([np.arange(4 + offset, L, stride), targets[-16:]]))
        index_pos = index_pos[index_pos >= 4].astype(np.int32)
        copy_queries, copy_masks = np.zeros(0, np.int32), np.zeros((0, 1), np.float32)
        if self.options.guide_weight or self.options.copy_output_weight:
            window = self.cfg["sliding_window"]
            copy_queries, copy_masks = copy_sources(ids, targets, window, fast.block_size(window))
        arguments = None
        if self.options.argument_guide_weight:
            window = self.cfg["sliding_window"]
            arguments = argument_guidance(ids, self.tokenizer, window, fast.block_size(window))
        value_pos = np.zeros(0, np.int32)
        if self.options.copy_value_weight:
            value_pos = copy_value_positions(ids, self.options.copy_value_positions, self.rng)
            if arguments is not None:
                # the tokens whose copy names another token (a question's " Krakow") are not named as themselves
                value_pos = value_pos[~np.isin(ids[value_pos], ids[arguments["spelled_from"]])]
        key_pos = np.zeros(0, np.int32)
        if self.options.key_output_weight or self.options.key_readback_weight:
            offset = self.options.key_offset
            key_pos = copy_value_positions(ids[:-offset], self.options.copy_value_positions, self.rng) + offset
            if self.options.key_readback_weight:
                # Where the position's own token is rare too (a list line's value), its embedding fills
                # the same few directions as the key's, and a 64-wide stream cannot hold both apart:
                # read the key back where the position's own token is common (the answer's "</think>").
                _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
                key_pos = key_pos[counts[inverse][key_pos] > 2]
        entry_keys = np.zeros((0, 2), np.int32)  # (key position, value position) of complete blocks
        if (self.options.entry_key_weight or self.options.entry_value_weight) and kinds == ["retrieval"]:
            keys = list_lines(ids, self._colon, self._space)
            keys = keys[(keys + 3) // 4 < L // 4]
            entry_keys = np.stack([keys, keys + 3], axis=1).astype(np.int32)
        entry_query = []
        answers = self.options.answer_output_weight or self.options.answer_attention_weight
        if (self.options.entry_guide_weight or answers) and kinds == ["retrieval"]:
            for query in targets[~np.isin(targets - 1, targets)]:  # each answer's first target
                try:
                    source = retrieval_source(ids, int(query))
                except ValueError:  # keys of two tokens (lists of over 900 lines): no guidance (none logged)
                    continue
                # The value's own block, whose entry the value and key objectives train: guided to either
                # of the two overlapping entries, the indexer and the first head settled on different ones.
                if source // 4 < (query + 1) // 4:
                    entry_query.append((int(query), [source // 4]))
        return dict(tokens=mx.array(ids[None]), main_pos=mx.array(main_pos.astype(np.int32)),
                    main_targets=mx.array(ids[main_pos + 1]), mtp_pos=mx.array(mtp_pos.astype(np.int32)),
                    mtp_targets=mx.array(ids[mtp_pos + 2]), index_pos=index_pos, copy_queries=copy_queries,
                    copy_masks=copy_masks, value_pos=value_pos, entry_query=entry_query, key_pos=key_pos,
                    entry_keys=entry_keys, arguments=arguments, vocab=self._sample_vocabulary(ids)), kinds

    def _sample_vocabulary(self, ids: np.ndarray):
        """The rows of the vocabulary head a step's softmax runs over with `head_sample`: the tokens the
        tasks write (`task_vocabulary`: every token the model could confuse a target with), the
        sequence's own (every target is one) and `head_sample` others drawn uniformly; None: all."""
        if not self.options.head_sample:
            return None
        if self._task_vocabulary is None:
            self._task_vocabulary = task_vocabulary(self.tokenizer, self.options)
        drawn = self.rng.choice(self.cfg["vocab_size"], self.options.head_sample, replace=False)
        return np.union1d(np.union1d(ids, self._task_vocabulary), drawn).astype(np.int32)

    def train_step(self):
        batch, kinds = self.batch()
        t0 = time.perf_counter()
        (loss, parts), grads = self._grad(
            self._joint, batch["tokens"], batch["main_pos"], batch["main_targets"], batch["mtp_pos"],
            batch["mtp_targets"], batch["index_pos"], batch["copy_queries"], batch["copy_masks"], batch["value_pos"],
            batch["entry_query"], batch["key_pos"], batch["entry_keys"], batch["arguments"], batch["vocab"])
        per_rank = None
        if self.ranks is not None:
            grads, loss, parts, per_rank = average_over_ranks(self.ranks, grads, loss, parts, kinds,
                                                              int(batch["tokens"].shape[1]))
        self.optimizer.update(self._joint, grads)
        mx.eval(self._joint.parameters(), self.optimizer.state, loss)
        record = {"step": self.step, "loss": round(float(loss), 5),
                  **{name: round(float(value), 5) for name, value in parts.items()},
                  "lr": round(float(self._lr(mx.array(self.step))), 7), "tokens": int(batch["tokens"].shape[1]),
                  "targets": int(batch["main_pos"].shape[0]), "kinds": kinds,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if per_rank is not None:  # the losses above are the ranks' mean; tokens, targets and kinds rank 0's
            record["ranks"] = per_rank
        self.step += 1
        return record

    # -- output ------------------------------------------------------------------------------------

    def official_weights(self) -> dict:
        """Every trained tensor under its official name and shape (per-expert tensors, 2-D wo_a)."""
        args = ModelArgs.from_dict(self.cfg)
        if self.options.tie_head:
            self.model.head.weight = self._head(self.model)
        params = dict(tree_flatten(self.model.parameters()))
        params.update(tree_flatten(self.mtp_holder.parameters()))
        out = {}
        for name, shape in official_tensors(args, mtp=True).items():
            mlx_name, _, expert = official_to_mlx(name, shape, args)
            value = params[mlx_name]
            if expert is not None:
                value = value[expert]
            out[name] = value.reshape(shape)
        return out

    def save_official(self, out_dir) -> Path:
        """config.json + model.safetensors (float32, official layout) of the model as trained so far,
        and in train_state/ what `resume` needs to go on (optimizer moments, step)."""
        out = Path(out_dir)
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(out / "model.safetensors"), self.official_weights(), metadata={"format": "pt"})
        cfg = dict(self.cfg, torch_dtype="float32")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (out / "train_options.json").write_text(json.dumps(asdict(self.options), indent=2) + "\n")
        mx.save_safetensors(str(out / STATE_DIR / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        (out / STATE_DIR / "step.json").write_text(json.dumps({"step": self.step}) + "\n")
        for name in self.TRAINING_MAPS:
            if hasattr(self._joint, name):
                weight = getattr(self._joint, name).weight
                mx.save_safetensors(str(out / STATE_DIR / f"{name}.safetensors"), {"weight": weight})
        return out

    def _load_training_maps(self, out: Path, required: bool) -> None:
        """This run's training-only maps as `save_official` wrote them in `out` (without `required`:
        those there; the others keep their draw)."""
        for name in self.TRAINING_MAPS:
            path = out / STATE_DIR / f"{name}.safetensors"
            if hasattr(self._joint, name) and (required or path.is_file()):
                getattr(self._joint, name).weight = mx.load(str(path))["weight"]

    def load_weights(self, out_dir) -> None:
        """The model and MTP weights `save_official` wrote in `out_dir`."""
        _load_saved(self.model, self.mtp_holder, self.cfg, out_dir)

    def resume(self, out_dir) -> int:
        """Continue from what `save_official` wrote in `out_dir`: weights, optimizer moments, step, and
        the data stream advanced past the sequences already trained on. Returns the step."""
        out = Path(out_dir)
        step = saved_step(out)
        if step is None:
            raise FileNotFoundError(f"{out / STATE_DIR / 'step.json'}: no saved training state to resume from")
        saved = out / "train_options.json"
        if saved.is_file():
            processes = TrainOptions.from_saved(json.loads(saved.read_text())).processes
            if processes != self.options.processes:
                raise ValueError(f"{saved}: the run was trained with {processes} process(es); resume it with "
                                 f"as many (each draws its own data), not {self.options.processes}")
        self.load_weights(out)
        self._load_training_maps(out, required=True)
        moments = out / STATE_DIR / "optimizer.safetensors"
        if moments.is_file():
            self.optimizer.state = tree_unflatten(list(mx.load(str(moments)).items()))
        else:  # a weights-only save: the moments start afresh
            self.optimizer.init(self._joint.trainable_parameters())
            for single in getattr(self.optimizer, "optimizers", [self.optimizer]):
                single.state["step"] = mx.array(step, mx.uint64)
        for _ in range(step):
            self.batch()
        self.step = step
        mx.eval(self.model.parameters(), self.mtp_holder.parameters(), self.optimizer.state)
        return step

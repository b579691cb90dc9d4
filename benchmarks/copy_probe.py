"""Where a small V4 in training stands on copying: for held-out tool and copy examples, at each
assistant target whose token occurs earlier in the sliding window (`trainer.copy_sources`), the
attention mass that the first head of a layer puts on those occurrences, how often that head's
own prediction (its output alone through the output projection, the final norm and the vocabulary
head: `trainer.copy_head_features`) is the target, and how often the model's greedy next token
(teacher-forced) is, by kind of token: numbers, words of four or more letters, the rest (mostly
the chat and DSML template's tokens). Then how far apart the vocabulary head keeps the numbers
100-999 (`number_rows`): the mean cosine between two numbers' head rows, between a number's head
row and its embedding, and how often a number's embedding scores its own head row above every
other number's. Last, whether each layer can still read which number sits at a position
(`identity_by_layer`): on the lists of held-out retrieval examples, a least-squares map from the
layer's attention input at each number's position to that number's embedding, fitted on three
quarters of the numbers and scored on the other quarter (numbers it never saw): how often the
mapped vector is closest to the right one of the 900 embeddings. And how loud the copy head is
where the model's output is made (`output_norms`): at the number targets, the median norm of the
copy head's output through the output projection, of the layer's whole attention output, of what
the layer's feed-forward adds to the residual streams, and of the final features before the norm.

    python benchmarks/copy_probe.py RUN_DIR [--layer N] [--examples 24] [--seed 77]

RUN_DIR is what `mlx-dsv4 train-tiny` writes (config.json, model.safetensors, train_options.json);
--layer defaults to the run's copy_layer.
"""

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dsv4.hc import hc_head, hc_merge
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import fast
from mlx_dsv4.train.data import TaskGenerator
from mlx_dsv4.train.trainer import copy_head_features, copy_sources, load_run


def token_kind(text: str) -> str:
    text = text.strip()
    if text.isdigit():
        return "number"
    if text.isalpha() and len(text) >= 4:
        return "word"
    return "other"


def probe(model, tokenizer, layer: int, examples: int = 24, seed: int = 77) -> dict:
    """Per kind of target token, the copy measures above for the first head of `layer`."""
    window = model.args.sliding_window
    block = fast.block_size(window)
    gen = TaskGenerator(tokenizer, seed=seed, split="eval", mix={"tool": 1.0, "copy": 1.0})
    rows = {}
    for _ in range(examples):
        ex = next(gen)
        ids, mask = np.array(ex.ids, np.int32), np.array(ex.mask)
        queries, masks = copy_sources(ids, np.nonzero(mask[1:])[0], window, block)
        records = {}
        if not len(queries):
            continue
        feats, _ = fast.trunk(model, mx.array(ids[None]), records, probs_of=(layer,))
        probs = np.array(records[layer]["probs"][0, :, 0, : 2 * block])
        greedy = np.array(mx.argmax(feats[0] @ model.head.weight.T, axis=-1))
        own = copy_head_features(model, layer, records[layer]["heads"], queries)
        own_greedy = np.array(mx.argmax(own @ model.head.weight.T, axis=-1))
        for j, sources, head_pick in zip(queries, masks, own_greedy):
            kind = token_kind(tokenizer.decode([int(ids[j + 1])]))
            rows.setdefault(kind, []).append((float((probs[j] * sources).sum()), float(head_pick == ids[j + 1]),
                                              float(greedy[j] == ids[j + 1])))
    return {kind: {"targets": len(v), "attention_on_sources": float(np.mean([r[0] for r in v])),
                   "copy_head_right": float(np.mean([r[1] for r in v])),
                   "greedy_right": float(np.mean([r[2] for r in v]))} for kind, v in sorted(rows.items())}


def output_norms(model, tokenizer, layer: int, examples: int = 24, seed: int = 77) -> dict:
    """At the number copy targets (as in `probe`), median norms of the copy head's output through the
    output projection, the layer's attention output, its feed-forward's write to the streams and
    the final features before the norm."""
    a = model.args
    opts = dict(iters=a.hc_sinkhorn_iters, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
    block = fast.block_size(a.sliding_window)
    gen = TaskGenerator(tokenizer, seed=seed, split="eval", mix={"tool": 1.0, "copy": 1.0})
    rows = []
    for _ in range(examples):
        ex = next(gen)
        ids = np.array(ex.ids, np.int32)
        queries, _ = copy_sources(ids, np.nonzero(np.array(ex.mask)[1:])[0], a.sliding_window, block)
        at = np.array([j for j in queries if token_kind(tokenizer.decode([int(ids[j + 1])])) == "number"], np.int32)
        if not len(at):
            continue
        tokens = mx.array(ids[None])
        x = model.embed(tokens)
        h = mx.broadcast_to(x[:, :, None, :], (*x.shape[:2], a.hc_mult, x.shape[-1]))
        for i, block_i in enumerate(model.layers):
            if i != layer:
                h = fast.block(block_i, h, tokens)
                continue
            xin, post, comb = block_i._attn_input(h, opts)
            record = {}
            out = fast.attention(block_i.attn, xin, record, probs=True)
            heads = record["heads"]
            copy = block_i.attn._output(heads * mx.array(np.arange(heads.shape[2]) == 0, heads.dtype)[:, None], 0)
            merged = hc_merge(out, h, post, comb)
            h = block_i._ffn(out, h, post, comb, tokens, opts)
            written = (h - merged).reshape(*h.shape[:2], -1)
        final = hc_head(h, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, eps=a.hc_eps,
                        norm_eps=a.rms_norm_eps)
        rows.append(np.stack([np.linalg.norm(np.array(t[0])[at], axis=-1) for t in (copy, out, written, final)], 1))
    if not rows:
        return {"targets": 0}
    rows = np.concatenate(rows)
    names = ("copy_head", "attention", "feed_forward_write", "final_features")
    return {"targets": len(rows), **{n: float(v) for n, v in zip(names, np.median(rows, 0))}}


def number_rows(model, tokenizer) -> dict:
    ids = _numbers(tokenizer)
    embed, head = np.array(model.embed.weight)[ids], np.array(model.head.weight)[ids]
    unit = head / np.linalg.norm(head, axis=1, keepdims=True)
    cos = unit @ unit.T
    own = (embed * unit).sum(1) / np.linalg.norm(embed, axis=1)
    scores = embed @ head.T
    return {"numbers": len(ids), "head_rows_cosine": float(cos[~np.eye(len(ids), dtype=bool)].mean()),
            "head_row_embedding_cosine": float(own.mean()),
            "embedding_picks_own_row": float((scores.argmax(1) == np.arange(len(ids))).mean())}


def _numbers(tokenizer) -> list:
    return sorted({t for n in range(100, 1000) for t in tokenizer.encode(str(n)) if tokenizer.decode([t]) == str(n)})


def identity_by_layer(model, tokenizer, examples: int = 3, tokens: int = 1500, seed: int = 77) -> list:
    """Per layer, the share of held-out numbers read back from its attention input (see above)."""
    numbers = _numbers(tokenizer)
    is_number = np.zeros(model.args.vocab_size, bool)
    is_number[numbers] = True
    a = model.args
    opts = dict(iters=a.hc_sinkhorn_iters, eps=a.hc_eps, norm_eps=a.rms_norm_eps)
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    inputs, targets = [[] for _ in model.layers], []
    for _ in range(examples):
        ids = np.array(gen.retrieval(tokens).ids, np.int32)
        at = np.nonzero(is_number[ids])[0]
        targets.append(ids[at])
        tokens_mx = mx.array(ids[None])
        x = model.embed(tokens_mx)
        h = mx.broadcast_to(x[:, :, None, :], (*x.shape[:2], a.hc_mult, x.shape[-1]))
        for i, layer in enumerate(model.layers):
            inputs[i].append(np.array(layer._attn_input(h, opts)[0][0])[at])
            h = fast.block(layer, h, tokens_mx)
    targets = np.concatenate(targets)
    embed = np.array(model.embed.weight)
    held_out = np.random.default_rng(0).permutation(np.unique(targets))
    held_out = np.isin(targets, held_out[: len(held_out) // 4])
    shares = []
    for per_layer in inputs:
        x = np.concatenate(per_layer).astype(np.float64)
        fit = x[~held_out]
        w = np.linalg.solve(fit.T @ fit + 1e-2 * np.eye(x.shape[1]), fit.T @ embed[targets[~held_out]])
        picked = np.array(numbers)[((x[held_out] @ w) @ embed[numbers].T).argmax(1)]
        shares.append(float((picked == targets[held_out]).mean()))
    return shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--seed", type=int, default=77)
    args = p.parse_args(argv)
    model, _, options = load_run(args.run_dir)
    tokenizer = load_tokenizer(None)
    layer = options.copy_layer if args.layer is None else args.layer
    result = probe(model, tokenizer, layer, args.examples, args.seed)
    print("| target token | targets | copy head's attention on its earlier occurrences | copy head's own "
          "prediction right | greedy token right |")
    print("| --- | --- | --- | --- | --- |")
    for kind, r in result.items():
        print(f"| {kind} | {r['targets']} | {r['attention_on_sources']:.3f} | {r['copy_head_right']:.3f} "
              f"| {r['greedy_right']:.3f} |")
    rows = number_rows(model, tokenizer)
    print(f"\nhead rows of the {rows['numbers']} numbers 100-999: mean cosine between two "
          f"{rows['head_rows_cosine']:.3f}, with the number's embedding {rows['head_row_embedding_cosine']:.3f}; "
          f"the embedding scores its own row highest for {rows['embedding_picks_own_row']:.1%}")
    norms = output_norms(model, tokenizer, layer, args.examples, args.seed)
    print(f"at the {norms['targets']} number targets, median norms: the copy head through the output projection "
          f"{norms['copy_head']:.1f}, the layer's attention output {norms['attention']:.1f}, its feed-forward's "
          f"write to the streams {norms['feed_forward_write']:.1f}, the final features before the norm "
          f"{norms['final_features']:.1f}")
    shares = identity_by_layer(model, tokenizer)
    print("held-out numbers read back from each layer's attention input: "
          + ", ".join(f"layer {i} {share:.1%}" for i, share in enumerate(shares)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

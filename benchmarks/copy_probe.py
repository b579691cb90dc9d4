"""Where a small V4 in training stands on copying: for held-out tool and copy examples, at each
assistant target whose token occurs earlier in the sliding window (`trainer.copy_sources`), the
attention mass that the first head of a layer puts on those occurrences, how often that head's
own prediction (its output alone through the output projection, the final norm and the vocabulary
head: `trainer.copy_head_features`) is the target, and how often the model's greedy next token
(teacher-forced) is, by kind of token: numbers (and among them a number's later tokens, such as
"071" of "126071"), words of four or more letters, the rest (mostly the chat and DSML template's
tokens). Then how far apart the vocabulary head keeps the numbers
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
And where retrieval fails (`retrieval_probe`): whether the CSA layer's indexer picks the compressed
entry that holds the asked key's value, and how much attention that entry gets; and whether a list
line's key can be read back (the same least-squares map) where retrieval needs it (`key_readback`):
at the line's value in each layer's attention input, in the key-mover head's own output there (head 1
of layer 0 before its output projection, with its attention on the key), and in the CSA layer's
compressed entry there (and the line's value from that entry); and whether the asked key reaches the
answer position (`answer_key_readback`), on lists asked 48 questions each (enough answers to fit the
read-back).

    python benchmarks/copy_probe.py RUN_DIR [--layer N] [--examples 24] [--seed 77]

RUN_DIR is what `mlx-dsv4 train-tiny` writes (config.json, model.safetensors, train_options.json);
--layer defaults to the run's copy_layer.
"""

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dsv4.hc import collapse, expand, hc_merge, split_options
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import fast
from mlx_dsv4.train.data import TaskGenerator
from mlx_dsv4.train.trainer import (copy_head_features, copy_sources, first_csa_layer, list_lines, load_run,
                                    retrieval_source)


# numbers' later tokens ("071" of "126071"), also counted under "number": the copy head must find
# where the previous token was written and read the token after it
CONTINUED = "number, continued"


def token_kind(text: str) -> str:
    text = text.strip()
    if text.isdigit():
        return "number"
    if text.isalpha() and len(text) >= 4:
        return "word"
    return "other"


def _forward(model, tokens: mx.array, layer: int):
    """fast.trunk's forward with `layer` taken apart: (normed final features, the layer's attention
    record with probabilities, the copy head's output through the output projection, the layer's
    attention output, what its feed-forward adds to the streams, the final features before the norm)."""
    a = model.args
    opts = split_options(a)
    h = expand(model.embed(tokens), a.hc_mult)
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
    final = collapse(h, model, a)
    return model.norm(final), record, copy, out, written, final


def probe(model, tokenizer, layer: int, examples: int = 24, seed: int = 77):
    """(per kind of target token, the copy measures above for the first head of `layer`; at the
    number targets, the median norms of `output_norms`) from one forward per example."""
    a = model.args
    block = fast.block_size(a.sliding_window)
    gen = TaskGenerator(tokenizer, seed=seed, split="eval", mix={"tool": 1.0, "copy": 1.0})
    rows, norms = {}, []
    for _ in range(examples):
        ex = next(gen)
        ids, mask = np.array(ex.ids, np.int32), np.array(ex.mask)
        queries, masks = copy_sources(ids, np.nonzero(mask[1:])[0], a.sliding_window, block)
        if not len(queries):
            continue
        feats, record, *parts = _forward(model, mx.array(ids[None]), layer)
        probs = np.array(record["probs"][0, :, 0, : 2 * block])
        greedy = np.array(mx.argmax(feats[0] @ model.head.weight.T, axis=-1))
        own = copy_head_features(model, layer, record["heads"], queries)
        own_greedy = np.array(mx.argmax(own @ model.head.weight.T, axis=-1))
        kinds = [token_kind(tokenizer.decode([int(ids[j + 1])])) for j in queries]
        for j, sources, head_pick, kind in zip(queries, masks, own_greedy, kinds):
            row = (float((probs[j] * sources).sum()), float(head_pick == ids[j + 1]), float(greedy[j] == ids[j + 1]))
            rows.setdefault(kind, []).append(row)
            if kind == "number" and token_kind(tokenizer.decode([int(ids[j])])) == "number":
                rows.setdefault(CONTINUED, []).append(row)
        at = np.array([j for j, kind in zip(queries, kinds) if kind == "number"], np.int32)
        if len(at):
            norms.append(np.stack([np.linalg.norm(np.array(t[0])[at], axis=-1) for t in parts], 1))
    by_kind = {kind: {"targets": len(v), "attention_on_sources": float(np.mean([r[0] for r in v])),
                      "copy_head_right": float(np.mean([r[1] for r in v])),
                      "greedy_right": float(np.mean([r[2] for r in v]))} for kind, v in sorted(rows.items())}
    return by_kind, output_norms(norms)


def output_norms(per_example: list) -> dict:
    """Median norms over the number targets of the copy head's output through the output projection,
    the layer's attention output, its feed-forward's write to the streams and the final features
    before the norm."""
    if not per_example:
        return {"targets": 0}
    rows = np.concatenate(per_example)
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


def _number_mask(model, tokenizer):
    """(the ids of the numbers 100-999, a boolean mask over the vocabulary marking them)."""
    numbers = _numbers(tokenizer)
    is_number = np.zeros(model.args.vocab_size, bool)
    is_number[numbers] = True
    return numbers, is_number


def _layer_records(model, ids: np.ndarray) -> list:
    """Each layer's record of `fast.trunk`'s forward of the sequence `ids`: its attention input "x"
    [1, L, D], its probabilities and heads' outputs, and a CSA layer's entries and indexer keys."""
    records = {}
    fast.trunk(model, mx.array(ids[None]), records, probs_of=range(len(model.layers)))
    return [records[i] for i in range(len(model.layers))]


def identity_by_layer(model, tokenizer, examples: int = 3, tokens: int = 1500, seed: int = 77) -> list:
    """Per layer, the share of held-out numbers read back from its attention input (see above)."""
    numbers, is_number = _number_mask(model, tokenizer)
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    inputs, targets = [[] for _ in model.layers], []
    for _ in range(examples):
        ids = np.array(gen.retrieval(tokens).ids, np.int32)
        at = np.nonzero(is_number[ids])[0]
        targets.append(ids[at])
        for per_layer, record in zip(inputs, _layer_records(model, ids)):
            per_layer.append(np.array(record["x"][0])[at])
    targets = np.concatenate(targets)
    return [read_back(model, numbers, np.concatenate(per_layer), targets) for per_layer in inputs]


def read_back(model, numbers: list, x: np.ndarray, targets: np.ndarray) -> float:
    """The share of held-out targets (token ids among `numbers`) that a least-squares map from the
    vectors x [N, d] to the targets' embeddings names (the closest of the numbers' embeddings), fitted
    on the rows of three quarters of the distinct targets and scored on the rest."""
    embed = np.array(model.embed.weight)
    held_out = np.random.default_rng(0).permutation(np.unique(targets))
    held_out = np.isin(targets, held_out[: len(held_out) // 4])
    x = x.astype(np.float64)
    fit = x[~held_out]
    w = np.linalg.solve(fit.T @ fit + 1e-2 * np.eye(x.shape[1]), fit.T @ embed[targets[~held_out]])
    picked = np.array(numbers)[((x[held_out] @ w) @ embed[numbers].T).argmax(1)]
    return float((picked == targets[held_out]).mean())


def key_readback(model, tokenizer, examples: int = 3, tokens: int = 1500, seed: int = 77, offset: int = 3) -> dict:
    """Whether a list line's key reaches the places retrieval reads it from: the share of held-out
    keys read back (`read_back`) from each layer's attention input `offset` tokens after the key (at
    3, the line's value, where `--key-guide-weight` moves it), and from the CSA layer's compressed
    entry of that position's block: the attention entry and the lightning indexer's key; and the
    share of held-out values read back from that attention entry ("CSA entry, the line's value"), with
    `offset` 3 the value's own block."""
    numbers, is_number = _number_mask(model, tokenizer)
    csa = first_csa_layer(model.args.compress_ratios)
    ratio = model.layers[csa].attn.ratio
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    colon, space = tokenizer.encode(":")[0], tokenizer.encode(" ")[0]
    rows = {**{f"layer {i} input": [] for i in range(len(model.layers))}, "CSA entry": [], "indexer key": [],
            "key-mover head output": []}
    keys, values, attention = [], [], []
    for _ in range(examples):
        ids = np.array(gen.retrieval(tokens).ids, np.int32)
        k = list_lines(ids, colon, space)
        k = k[is_number[ids[k]] & is_number[ids[k + 3]]]  # "123", ":", " ", "456"
        at = k + offset
        keep = (at + 1) // ratio < len(ids) // ratio  # the block is complete
        k, at = k[keep], at[keep]
        keys.append(ids[k])
        values.append(ids[k + 3])
        records = _layer_records(model, ids)
        for i, record in enumerate(records):
            rows[f"layer {i} input"].append(np.array(record["x"][0])[at])
        rows["CSA entry"].append(np.array(records[csa]["entries"][0])[at // ratio])
        rows["indexer key"].append(np.array(records[csa]["keys"][0].astype(mx.float32))[at // ratio])
        mover = records[0]
        rows["key-mover head output"].append(np.array(mover["heads"][0])[at, 1])
        b = mover["block"]
        attention.append(np.array(mover["probs"][0])[at, 1, fast.window_slot(k, at, b)])  # the key's window slot
    keys = np.concatenate(keys)
    shares = {name: read_back(model, numbers, np.concatenate(x), keys) for name, x in rows.items()}
    value = read_back(model, numbers, np.concatenate(rows["CSA entry"]), np.concatenate(values))
    return {**shares, "key-mover attention on the key": float(np.concatenate(attention).mean()),
            "CSA entry, the line's value": value}


def answer_key_readback(model, tokenizer, lists: int = 4, tokens: int = 1000, questions: int = 48, seed: int = 77,
                        offset: int = 3) -> dict:
    """Whether the asked key reaches the answer position ("</think>", three tokens after the key in
    the question), where the CSA layer's query and the indexer's are made: the share of held-out keys
    read back (`read_back`) from each layer's attention input `offset` tokens after the asked key."""
    numbers, is_number = _number_mask(model, tokenizer)
    think = tokenizer.token_to_id("</think>")
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    rows, keys = {f"layer {i} input": [] for i in range(len(model.layers))}, []
    for _ in range(lists):
        ids = np.array(gen.retrieval(tokens, questions=questions).ids, np.int32)
        answer = np.nonzero(ids[3:-1] == think)[0] + 3
        answer = answer[is_number[ids[answer - 3]] & is_number[ids[answer + 1]]]
        keys.append(ids[answer - 3])
        for i, record in enumerate(_layer_records(model, ids)):
            rows[f"layer {i} input"].append(np.array(record["x"][0])[answer - 3 + offset])
    keys = np.concatenate(keys)
    return {name: read_back(model, numbers, np.concatenate(x), keys) for name, x in rows.items()}


def retrieval_probe(model, tokenizer, n_tokens: int = 1024, examples: int = 8, seed: int = 77) -> dict:
    """Where retrieval fails, on held-out key-value lists of about `n_tokens` tokens: at the answer
    position, whether the CSA layer's lightning indexer picks the compressed entry of the block of
    `ratio` tokens that holds the asked key's value among its top-k ("picked"; "picked_next": the next
    entry, which overlaps that block), that entry's rank among the visible ones, the attention mass the
    layer's heads put on it (the largest over heads), whether the layer's first head alone names the answer
    (its output through the output projection, the final norm and the vocabulary head:
    `trainer.copy_head_features`), and whether the greedy answer is right."""
    csa = first_csa_layer(model.args.compress_ratios)
    attn = model.layers[csa].attn
    ratio, k = attn.ratio, attn.indexer.topk
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    rows = []
    for _ in range(examples):
        ex = gen.retrieval(n_tokens)
        ids = np.array(ex.ids, np.int32)
        j = len(ids) - 3  # "</think>", whose next token is the answer
        source = retrieval_source(ids, j)
        records = {}
        feats, _ = fast.trunk(model, mx.array(ids[None]), records, probs_of=(csa,))
        r = records[csa]
        scores = fast.index_scores(r["iq"], r["iw"], r["keys"])[0, j]
        visible = np.arange(len(scores)) < (j + 1) // ratio
        held = source // ratio
        chosen = fast.top_k_mask(scores[None, None], visible[None, None], k)[0, 0]
        order = np.argsort(-np.where(visible, scores, -np.inf))
        rank = int(np.nonzero(order == held)[0][0])
        probs = np.array(r["probs"][0, j])  # [H, 2b + T + 1]
        mass = probs[:, 2 * r["block"] + held].max()
        greedy = int(mx.argmax(feats[0, j] @ model.head.weight.T))
        own = int(mx.argmax(copy_head_features(model, csa, r["heads"], np.array([j]))[0] @ model.head.weight.T))
        rows.append((float(chosen[held]), rank, float(mass), float(greedy == ids[j + 1]), float(own == ids[j + 1]),
                     float(held + 1 < len(chosen) and chosen[held + 1])))
    rows = np.array(rows)
    return {"examples": examples, "tokens": int(len(ids)), "entries": int(visible.sum()), "top_k": k,
            "picked": float(rows[:, 0].mean()), "median_rank": float(np.median(rows[:, 1])),
            "attention_mass": float(rows[:, 2].mean()), "greedy_right": float(rows[:, 3].mean()),
            "head_right": float(rows[:, 4].mean()), "picked_next": float(rows[:, 5].mean())}


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
    result, norms = probe(model, tokenizer, layer, args.examples, args.seed)
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
    print(f"at the {norms['targets']} number targets, median norms: the copy head through the output projection "
          f"{norms['copy_head']:.1f}, the layer's attention output {norms['attention']:.1f}, its feed-forward's "
          f"write to the streams {norms['feed_forward_write']:.1f}, the final features before the norm "
          f"{norms['final_features']:.1f}")
    ret = retrieval_probe(model, tokenizer, examples=args.examples // 2)
    print(f"retrieval at ~{ret['tokens']} tokens ({ret['examples']} lists, {ret['entries']} visible compressed "
          f"entries): the indexer's top-{ret['top_k']} holds the entry of the answer's block {ret['picked']:.1%} (the "
          f"next, overlapping entry {ret['picked_next']:.1%}), its median rank "
          f"{ret['median_rank']:.0f}; the layer's heads put at most {ret['attention_mass']:.3f} of their attention "
          f"on it; the first head alone names the answer {ret['head_right']:.1%}; greedy answer right "
          f"{ret['greedy_right']:.1%}")
    shares = identity_by_layer(model, tokenizer)
    print("held-out numbers read back from each layer's attention input: "
          + ", ".join(f"layer {i} {share:.1%}" for i, share in enumerate(shares)))
    keys = key_readback(model, tokenizer)
    print("held-out list keys read back at their line's value: "
          + ", ".join(f"{place} {share:.1%}" for place, share in keys.items()))
    asked = answer_key_readback(model, tokenizer)
    print("held-out asked keys read back at the answer position: "
          + ", ".join(f"{place} {share:.1%}" for place, share in asked.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

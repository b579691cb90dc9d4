"""Seconds per training step of the tiny V4 (value_and_grad + AdamW update), the cache path
(`Trainer(reference=True)`) and the training path side by side on the same batches in one process.

    python benchmarks/train_step.py [--steps 3] [--breakdown]
    python benchmarks/train_step.py --head-sample 4096 [--steps 3]
    python benchmarks/train_step.py --kernels [--steps 8]
    python benchmarks/train_step.py --ops

--breakdown also times, on the first batch, each component's forward and forward + backward
(gradient of the sum of its output) in the training path: per layer the mHC split, attention
and MoE, then the vocabulary head and the indexer objective.

--head-sample N instead times the training path with the vocabulary head's softmax over the whole
vocabulary and over its sample (the tasks' tokens, the sequence's and N drawn others:
`TrainOptions.head_sample`), side by side on the same data, with the objectives and tool-session
mix of docs/tiny-model.md's m1s.

--kernels times the training path with its linear products and attention softmax in numpy (the
default, `fast.NUMPY_KERNELS`) and in MLX, side by side on the same batches, with the options of
the shipped checkpoint's last run (mlx_dsv4/tiny_trained/training.json).

--ops times single float32 operations of a training step's sizes in MLX and in numpy (BLAS on one
thread), one after the other in one process: the reason for the numpy kernels.
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from mlx_dsv4.hc import expand, split_options
from mlx_dsv4.tokenizer import load_tokenizer
from mlx_dsv4.train import fast
from mlx_dsv4.train.recipe import load_recipe
from mlx_dsv4.train.trainer import Trainer, TrainOptions, index_kl


def timed(fn, *args, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def breakdown(trainer: Trainer, batch: dict) -> None:
    model = trainer.model
    a = model.args
    opts = split_options(a)
    tokens = batch["tokens"]
    x = model.embed(tokens)
    h = expand(x, a.hc_mult)
    rows = []

    def both(name, fn, *args):
        grad = mx.grad(lambda *xs: fn(*xs).sum(), argnums=tuple(range(len(args))))
        rows.append((name, timed(fn, *args), timed(grad, *args)))

    layers = [(f"layer {i}", layer) for i, layer in enumerate(model.layers)]
    records = {}
    for name, layer in layers:
        both(f"{name} mHC split", lambda h: layer._attn_input(h, opts)[0], h)
        xa, post, comb = layer._attn_input(h, opts)
        record = {} if layer.attn.ratio == 4 else None
        both(f"{name} attention (ratio {layer.attn.ratio})", lambda xa: fast.attention(layer.attn, xa), xa)
        out = fast.attention(layer.attn, xa, record)
        if record:
            records[name] = (layer, record)
        both(f"{name} MoE", lambda xf: layer.ffn(xf, tokens), layer.ffn_norm(xa))
        h = layer._ffn(out, h, post, comb, tokens, opts)
        mx.eval(h)
    feats = model.norm(h.mean(axis=2))
    main_pos, targets = batch["main_pos"], batch["main_targets"]
    both("head cross-entropy", lambda f: fast.head_cross_entropy(f[0, main_pos], model.head.weight, targets), feats)
    for name, (layer, r) in records.items():
        both(f"{name} indexer objective", lambda iq: index_kl(r["q"], r["entries"], r["keys"], iq, r["iw"],
                                                              batch["index_pos"], layer.attn.scale,
                                                              layer.attn.ratio), r["iq"])
    print(f"{'component':44s} {'forward s':>10s} {'fwd+bwd s':>10s}")
    for name, f, fb in rows:
        print(f"{name:44s} {f:10.4f} {fb:10.4f}")


def compare_head_sample(tokenizer, n: int, steps: int) -> None:
    recipe = dict(mix={"session": 0.45, "name": 0.25, "copy": 0.15, "chat": 0.06, "pattern": 0.06},
                  config={"o_lora_rank": 64, "head_dim": 128}, tie_head=True, copy_output_weight=1,
                  copy_value_weight=1, copy_head_scale=16, embed_scale=32, embed_lr_scale=32, guide_weight=1,
                  argument_weight=4)
    whole = Trainer(tokenizer, TrainOptions(**recipe))
    sampled = Trainer(tokenizer, TrainOptions(head_sample=n, **recipe))
    ratios = []
    for _ in range(steps + 1):
        old, new = whole.train_step(), sampled.train_step()
        if new["step"] == 0:  # the first step builds and warms
            continue
        ratios.append(old["seconds"] / new["seconds"])
        print(f"step {new['step']}: {new['tokens']} tokens, {new['targets']} targets; whole vocabulary "
              f"{old['seconds']:.3f} s; sampled {new['seconds']:.3f} s; ratio {ratios[-1]:.2f}")
    print(f"speed-up (whole vocabulary / sampled seconds per step): {sum(ratios) / len(ratios):.2f}")


def shipped_recipe() -> TrainOptions:
    """The options of the shipped checkpoint's last run, from random weights."""
    import mlx_dsv4

    last = load_recipe(str(Path(mlx_dsv4.__file__).parent / "tiny_trained" / "training.json"))[-1]
    return replace(last.options, init_from=None)


def compare_kernels(tokenizer, steps: int) -> None:
    options = shipped_recipe()
    in_numpy, in_mlx = Trainer(tokenizer, options), Trainer(tokenizer, options)
    fast.numpy_products(in_mlx._joint, enabled=False)
    ratios = []
    for _ in range(steps + 1):
        new = in_numpy.train_step()
        fast.NUMPY_KERNELS = False
        try:
            old = in_mlx.train_step()
        finally:
            fast.NUMPY_KERNELS = True
        if new["step"] == 0:  # the first step builds and warms
            continue
        ratios.append(old["seconds"] / new["seconds"])
        print(f"step {new['step']}: {new['tokens']} tokens ({', '.join(new['kinds'])}); MLX {old['seconds']:.3f} s "
              f"loss {old['loss']:.5f}; numpy {new['seconds']:.3f} s loss {new['loss']:.5f}; ratio {ratios[-1]:.2f}")
    print(f"speed-up (MLX / numpy kernels seconds per step): {sum(ratios) / len(ratios):.2f} "
          f"(per step {', '.join(f'{r:.2f}' for r in ratios)})")


def compare_ops(repeat: int = 20) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    print(f"{'operation':36s} {'MLX ms':>8s} {'numpy ms':>9s} {'ratio':>6s}")
    for m, k, n in [(958, 128, 64), (958, 64, 512), (1916, 256, 64)]:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        A, B = mx.array(a), mx.array(b)
        with fast.one_blas_thread():
            mine, theirs = timed(lambda: A @ B, repeat=repeat), timed(lambda: a @ b, repeat=repeat)
        print(f"{f'product [{m}, {k}] x [{k}, {n}]':36s} {mine * 1e3:8.3f} {theirs * 1e3:9.3f} {mine / theirs:6.1f}")
    x = rng.standard_normal((958 * 4, 260), np.float32)
    X = mx.array(x)
    for name, mine, theirs in [("exp [3832, 260]", lambda: mx.exp(X), lambda: np.exp(x)),
                               ("softmax [3832, 260]", lambda: mx.softmax(X, axis=-1, precise=True),
                                lambda: fast._masked_softmax_numpy(x, True))]:
        m, t = timed(mine, repeat=repeat), timed(theirs, repeat=repeat)  # mx.eval passes numpy through
        print(f"{name:36s} {m * 1e3:8.3f} {t * 1e3:9.3f} {m / t:6.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--head-sample", type=int, default=0, metavar="N")
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--ops", action="store_true")
    args = parser.parse_args()
    if args.ops:
        return compare_ops()
    tokenizer = load_tokenizer(None)
    if args.kernels:
        return compare_kernels(tokenizer, args.steps)
    if args.head_sample:
        return compare_head_sample(tokenizer, args.head_sample, args.steps)
    options = TrainOptions(seed=0)
    reference, trainer = Trainer(tokenizer, options, reference=True), Trainer(tokenizer, options)
    if args.breakdown:
        batch, _ = Trainer(tokenizer, options).batch()
        breakdown(trainer, batch)
    ratios = []
    for _ in range(args.steps):
        old, new = reference.train_step(), trainer.train_step()
        ratios.append(old["seconds"] / new["seconds"])
        print(f"step {new['step']}: {new['tokens']} tokens; cache path {old['seconds']:.3f} s loss {old['loss']:.5f}; "
              f"training path {new['seconds']:.3f} s loss {new['loss']:.5f}; ratio {ratios[-1]:.2f}")
    print(f"speed-up (cache path / training path seconds per step): {sum(ratios) / len(ratios):.2f} "
          f"(per step {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()

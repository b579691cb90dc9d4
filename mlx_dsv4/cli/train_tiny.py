"""`mlx-dsv4 train-tiny`: train the small V4 on the synthetic tasks, on the CPU."""

from pathlib import Path


def add_arguments(p):
    p.add_argument("out", type=Path, help="output directory (official-layout float32 checkpoint + loss log)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: TrainOptions.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-every", type=int, default=50, help="write the checkpoint every N steps")
    p.add_argument("--max-tokens", type=int, default=None, help="packed sequence length bound")
    p.add_argument("--mix", type=parse_mix, default=None, metavar="KIND=W,...",
                   help="task weights, e.g. tool=0.5,copy=0.2,chat=0.1,pattern=0.12,retrieval=0.08 "
                        "(default: the data module's DEFAULT_MIX)")
    p.add_argument("--config", type=parse_config, default=None, metavar="KEY=INT,...",
                   help="model config values over the trained model's, e.g. o_lora_rank=64,moe_intermediate_size=64")
    p.add_argument("--guide-weight", type=float, default=None,
                   help="weight of the attention guidance for copying (a copy head and a previous-token "
                        "head; default 0: off)")
    p.add_argument("--copy-output-weight", type=float, default=None,
                   help="weight of the copy head's own prediction of the copied token (through its output "
                        "projection and the vocabulary head; default 0: off)")
    p.add_argument("--copy-value-weight", type=float, default=None,
                   help="weight of the copy head's output projection naming the token of each position's own "
                        "value (its tokens that occur at most twice in the sequence; default 0: off)")
    p.add_argument("--entry-guide-weight", type=float, default=None,
                   help="weight of the retrieval guidance: at a retrieval answer, the CSA layers' first head and "
                        "lightning indexer should pick the compressed entry of its value's block (default 0: off)")
    p.add_argument("--key-guide-weight", type=float, default=None,
                   help="weight of the key-mover guidance: head 1 of the previous-token layer attends to the "
                        "token three before each position, where a retrieval line's key sits before its value "
                        "(default 0: off)")
    p.add_argument("--key-output-weight", type=float, default=None,
                   help="weight of the key-mover head's own naming of the token three before each position (its "
                        "output through its layer's output projection and the vocabulary head; default 0: off)")
    p.add_argument("--key-readback-weight", type=float, default=None,
                   help="weight of reading the token three before each position whose own token is common back "
                        "from the first CSA layer's input, through a map trained alongside and not saved "
                        "(default 0: off)")
    p.add_argument("--entry-key-weight", type=float, default=None,
                   help="weight of reading each retrieval list line's key back from the first CSA layer's "
                        "compressed entry of its value, through a map trained alongside and not saved (default 0: off)")
    p.add_argument("--entry-value-weight", type=float, default=None,
                   help="weight of the first CSA layer's first head naming each retrieval list line's value from "
                        "the compressed entry of its value alone, through its output projection (default 0: off)")
    p.add_argument("--answer-output-weight", type=float, default=None,
                   help="weight of the first CSA layer's first head naming a retrieval answer from its own output, "
                        "through its layer's output projection (default 0: off)")
    p.add_argument("--answer-attention-weight", type=float, default=None,
                   help="weight of the first CSA layer's first head attending, at a retrieval answer, to the "
                        "compressed entry of its value's block, among its window, picked entries and sink "
                        "(default 0: off)")
    p.add_argument("--argument-guide-weight", type=float, default=None,
                   help="weight of the copy head attending, at each tool-call argument token and each token of a "
                        "reply that repeats the question, to where the question holds it (its words between the "
                        "numbers for an operator), and naming the token that a question's differently tokenised "
                        "name starts with (default 0: off)")
    p.add_argument("--spell-head", type=int, default=None, metavar="H",
                   help="the copy layer's head that --argument-guide-weight guides and has name the token where an "
                        "argument is spelled from other tokens (default 0: the copy head)")
    p.add_argument("--retrieval-questions", type=positive_int, default=None, metavar="N",
                   help="ask N keys in turn after each retrieval list (default 1)")
    p.add_argument("--argument-weight", type=positive_int, default=None, metavar="N",
                   help="count each token of a tool call's arguments N times in the next-token loss (default 1)")
    p.add_argument("--copy-head-scale", type=float, default=None,
                   help="start the copy head's columns of its layer's output projection at this multiple of the "
                        "draw (default 1)")
    p.add_argument("--answer-head-scale", type=float, default=None,
                   help="start the first CSA layer's first head's columns of its output projection at this "
                        "multiple (default 1)")
    p.add_argument("--init-from", type=str, default=None, metavar="RUN_DIR",
                   help="start from the weights of a run train-tiny wrote and the training-only maps it saved (same "
                        "--config; a fresh optimizer and schedule; --copy-head-scale and --answer-head-scale apply "
                        "on top)")
    p.add_argument("--head-from-embed", action="store_true", default=None,
                   help="start the vocabulary head as the embedding scaled by hidden_size**-0.5")
    p.add_argument("--tie-head", action="store_true", default=None,
                   help="keep the vocabulary head equal to the embedding scaled by hidden_size**-0.5 while "
                        "training (the checkpoint still has both tensors)")
    p.add_argument("--embed-scale", type=float, default=None,
                   help="start the embedding at this multiple of the random draw (default 1); a tied or "
                        "embedding-started head is scaled down by as much")
    p.add_argument("--embed-lr-scale", type=float, default=None,
                   help="the embedding's learning rate as a multiple of the others' (default 1)")
    p.add_argument("--head-sample", type=positive_int, default=None, metavar="N",
                   help="run the vocabulary head's softmax over the tokens the tasks write, the sequence's own and N "
                        "others drawn at random each step instead of the whole vocabulary (faster per step)")
    p.add_argument("--composed-questions", type=float, default=None, metavar="F",
                   help="compose this share of the training tool questions from parts (a lead, one of several "
                        "bodies, an ending) instead of the templates (default 0)")
    p.add_argument("--filler-leads", type=float, default=None, metavar="F",
                   help="open this share of the training tool questions with one to six random filler words "
                        "(default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT (the learning-rate schedule follows --steps)")


def positive_int(text: str) -> int:
    from argparse import ArgumentTypeError

    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_mix(text: str) -> dict:
    from argparse import ArgumentTypeError

    from ..train.data import KINDS

    mix = {}
    for part in text.split(","):
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not sep:
            raise ArgumentTypeError(f"{part!r} is not KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise ArgumentTypeError(f"weight of {kind!r} is not a number: {weight!r}") from None
        if mix[kind] < 0:
            raise ArgumentTypeError(f"weight of {kind!r} is negative")
    if not any(mix.values()):
        raise ArgumentTypeError("every weight is zero")
    return mix


def parse_config(text: str) -> dict:
    from argparse import ArgumentTypeError

    from ..train.trainer import trained_config

    known = trained_config()
    config = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known or not isinstance(known[key], int) or isinstance(known[key], bool):
            raise ArgumentTypeError(f"{part!r} is not KEY=INTEGER with KEY an integer value of the model config")
        try:
            config[key] = int(value)
        except ValueError:
            raise ArgumentTypeError(f"value of {key!r} is not an integer: {value!r}") from None
    return config


def run(args):
    import json
    import sys
    import time

    from ..tokenizer import load_tokenizer
    from ..train.trainer import TrainOptions, Trainer

    options = TrainOptions(seed=args.seed)
    for name in ("steps", "lr", "max_tokens", "mix", "config", "guide_weight", "copy_output_weight",
                 "copy_value_weight", "copy_head_scale", "answer_head_scale", "init_from", "head_from_embed",
                 "tie_head", "embed_scale", "embed_lr_scale", "entry_guide_weight", "argument_weight",
                 "key_guide_weight", "retrieval_questions", "key_output_weight", "key_readback_weight",
                 "entry_key_weight", "entry_value_weight", "answer_output_weight", "answer_attention_weight",
                 "argument_guide_weight", "spell_head", "head_sample", "composed_questions",
                 "filler_leads"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    trainer = Trainer(load_tokenizer(None), options)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "loss.jsonl"
    first = trainer.resume(args.out) if args.resume else 0
    if args.resume:  # the log keeps the steps the saved model went through
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < first]
        log_path.write_text("".join(line + "\n" for line in kept))
    start = time.perf_counter()
    with open(log_path, "a" if args.resume else "w", encoding="utf-8") as log:
        for step in range(first, options.steps):
            record = trainer.train_step()
            log.write(json.dumps(record) + "\n")
            log.flush()
            done = step + 1
            elapsed = time.perf_counter() - start
            filled = int(30 * done / options.steps)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{options.steps} loss {record['main']:.3f} "
                  f"mtp {record['mtp']:.3f} kl {record['indexer_kl']:.3f} {elapsed:.0f} s "
                  f"eta {elapsed / (done - first) * (options.steps - done):.0f} s", end="", file=sys.stderr,
                  flush=True)
            if done % args.save_every == 0 or done == options.steps:
                trainer.save_official(args.out)
    print(file=sys.stderr)
    print(f"trained {options.steps} steps in {time.perf_counter() - start:.0f} s -> {args.out} (log {log_path})")
    return 0

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
                   help="continue the run saved in OUT (the learning-rate schedule follows --steps); with "
                        "--recipe, skip the runs already done and continue the one under way")
    p.add_argument("--processes", type=positive_int, default=None, metavar="N",
                   help="train with N processes on this machine (one per core): each step averages the gradients "
                        "of N sequences, one drawn by each; with --recipe, for every run (default: the recipe's, "
                        "else 1)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="run a recipe's runs in turn, each from the weights of the one before, into OUT/<run>: "
                        "'hour' (a curriculum of about an hour) or a file in the form of the shipped "
                        "training.json; no other training option may be given")


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


OPTION_NAMES = ("steps", "lr", "max_tokens", "mix", "config", "guide_weight", "copy_output_weight",
                "copy_value_weight", "copy_head_scale", "answer_head_scale", "init_from", "head_from_embed",
                "tie_head", "embed_scale", "embed_lr_scale", "entry_guide_weight", "argument_weight",
                "key_guide_weight", "retrieval_questions", "key_output_weight", "key_readback_weight",
                "entry_key_weight", "entry_value_weight", "answer_output_weight", "answer_attention_weight",
                "argument_guide_weight", "spell_head", "head_sample", "composed_questions", "filler_leads")


def writes(ranks) -> bool:
    """Whether this process writes the run and shows its progress: alone, or rank 0 of `ranks`."""
    return ranks is None or ranks.rank == 0


def train_run(options, out, save_every: int, resume: bool, stop_at=None, label: str = "", ranks=None) -> float:
    """Train one run into `out` up to step `stop_at` (default: options.steps), with a progress bar
    and the loss log; returns the seconds it took. With `ranks` (options.processes of them), rank 0
    writes and shows everything, and every rank returns once the run is saved."""
    import contextlib
    import json
    import sys
    import time

    from ..tokenizer import load_tokenizer
    from ..train.trainer import Trainer

    stop_at = options.steps if stop_at is None else stop_at
    writer = writes(ranks)
    trainer = Trainer(load_tokenizer(None), options, ranks=ranks)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "loss.jsonl"
    first = trainer.resume(out) if resume else 0
    if resume and writer:  # the log keeps the steps the saved model went through
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] < first]
        log_path.write_text("".join(line + "\n" for line in kept))
    start = time.perf_counter()
    log_file = open(log_path, "a" if resume else "w", encoding="utf-8") if writer else contextlib.nullcontext()
    with log_file as log:
        for step in range(first, stop_at):
            record = trainer.train_step()
            done = step + 1
            if not writer:
                continue
            log.write(json.dumps(record) + "\n")
            log.flush()
            elapsed = time.perf_counter() - start
            filled = int(30 * done / stop_at)
            print(f"\r{label}[{'#' * filled}{'.' * (30 - filled)}] {done}/{stop_at} loss {record['main']:.3f} "
                  f"mtp {record['mtp']:.3f} kl {record['indexer_kl']:.3f} {elapsed:.0f} s "
                  f"eta {elapsed / (done - first) * (stop_at - done):.0f} s", end="", file=sys.stderr,
                  flush=True)
            if done % save_every == 0 or done == stop_at:
                trainer.save_official(out)
    if writer:
        print(file=sys.stderr)
    if ranks is not None:
        ranks.broadcast("saved")  # no rank reads the run (resuming, or the next run's init_from) before it is written
    return time.perf_counter() - start


def run_recipe(args, stages, ranks) -> int:
    from ..train.recipe import recipe_steps
    from ..train.trainer import saved_step

    say = print if writes(ranks) else (lambda *a, **k: None)
    say(f"recipe {args.recipe}: {len(stages)} runs, {recipe_steps(stages)} steps -> {args.out}/<run>")
    total = 0.0
    for i, stage in enumerate(stages):
        out = stage.out_dir(args.out)
        options = stage.options
        if options.init_from is not None:
            options.init_from = str(args.out / options.init_from)
        done = (saved_step(out) or 0) if args.resume else 0
        if done >= stage.stop_at:
            say(f"run {i + 1}/{len(stages)} {stage.name}: done ({done} steps)")
            continue
        seconds = train_run(options, out, args.save_every, resume=done > 0, stop_at=stage.stop_at,
                            label=f"run {i + 1}/{len(stages)} {stage.name} ", ranks=ranks)
        total += seconds
        say(f"run {i + 1}/{len(stages)} {stage.name}: {stage.stop_at} steps in {seconds:.0f} s -> {out}")
    say(f"trained the recipe in {total:.0f} s -> {stages[-1].out_dir(args.out)}")
    return 0


def _recipe_stages(args):
    """The recipe's stages with --processes applied, or an error message."""
    from ..train.recipe import RecipeError, load_recipe

    given = [name for name in OPTION_NAMES if getattr(args, name) is not None]
    if given or args.seed != 0:
        flags = ", ".join("--" + n.replace("_", "-") for n in given + (["seed"] if args.seed != 0 else []))
        return None, f"--recipe sets every training option; drop {flags}"
    try:
        stages = load_recipe(args.recipe)
    except RecipeError as e:
        return None, str(e)
    counts = {stage.options.processes for stage in stages}
    if args.processes is None and len(counts) > 1:
        return None, (f"{args.recipe}: its runs ask for {' and '.join(map(str, sorted(counts)))} processes; "
                      f"give --processes")
    if args.processes is not None:
        for stage in stages:
            stage.options.processes = args.processes
    return stages, None


def run(args):
    import os
    import sys

    from ..train.trainer import TrainOptions

    if args.recipe is not None:
        stages, error = _recipe_stages(args)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        processes = stages[0].options.processes
    else:
        options = TrainOptions(seed=args.seed)
        for name in OPTION_NAMES + ("processes",):
            if getattr(args, name) is not None:
                setattr(options, name, getattr(args, name))
        processes = options.processes
    ranks = None
    if processes > 1:
        from ..distributed import init, run_local_ranks

        if "MLX_RANK" not in os.environ:  # start the ranks, each this same command
            print(f"training with {processes} processes on this machine", flush=True)
            return run_local_ranks([sys.executable, "-m", "mlx_dsv4.cli", *args._argv], processes)
        ranks = init()
    if args.recipe is not None:
        return run_recipe(args, stages, ranks)
    seconds = train_run(options, args.out, args.save_every, args.resume, ranks=ranks)
    if writes(ranks):
        print(f"trained {options.steps} steps in {seconds:.0f} s -> {args.out} "
              f"(log {args.out / 'loss.jsonl'})")
    return 0

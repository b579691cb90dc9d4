"""A tiny random V4 checkpoint with the real vocabulary, shared by the generation tests.

Three layers (sliding-only, CSA ratio 4, HCA ratio 128) keep it fast while covering
every kind of cache state; the vocabulary is the real one so that the V4 tokenizer's
ids are valid.
"""

import atexit
import functools
import shutil
import signal
import tempfile
from pathlib import Path

LAYERS = [0, 4, 128]


@functools.lru_cache(maxsize=None)
def tiny_chat_dir(seed: int = 0) -> Path:
    from mlx_dsv4.tiny import write_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="dsv4-generate-"))
    atexit.register(shutil.rmtree, root, True)
    return write_tiny_checkpoint(root / f"tiny-{seed}", preset="flash", seed=seed,
                                 compress_ratios=LAYERS, num_hash_layers=1)


@functools.lru_cache(maxsize=None)
def tiny_chat_model(seed: int = 0):
    from mlx_dsv4 import load

    return load(tiny_chat_dir(seed), mtp=True)


# (flags, the error message that names them) for sampling flags generation cannot use
BAD_SAMPLING_FLAGS = [
    (["--top-k", "999999"], r"--top-k must be an integer in \[0, 129280\) \(0 turns top-k off\), got 999999"),
    (["--top-p", "0"], r"--top-p must be a number in \(0, 1\], got 0.0"),
    (["--top-p", "1.5"], r"--top-p must be a number in \(0, 1\], got 1.5"),
    (["--temp", "-1"], r"--temp must be a finite number >= 0, got -1.0"),
    (["--temp", "nan"], r"--temp must be a finite number >= 0, got nan"),
    (["--max-tokens", "0"], r"--max-tokens must be a positive integer, got 0"),
    (["--min-p", "2"], r"--min-p must be a number in \[0, 1\], got 2.0"),
    (["--repetition-penalty", "0"], r"--repetition-penalty must be .* > 0, got 0.0"),
    (["--seed", "-1"], r"--seed must be .*, got -1"),
    (["--stop", "x"] * 17, r"--stop may hold at most 16 strings, got 17"),
    (["--stop", "x" * 1025], r"--stop strings may be at most 1024 characters long, item 0 has 1025"),
]


def config_only_dir(tmp_path) -> Path:
    """A checkpoint directory with the tiny model's config and no weights: loading it fails."""
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes((tiny_chat_dir() / "config.json").read_bytes())
    return model_dir


def default_sigint():
    """``preexec_fn`` for a child that must get Ctrl-C: a shell that started the tests in the
    background sets SIGINT to ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def forced_drafts(continuation, prompt_len: int, vocab: int, rng):
    """(adjust_drafts, rounds): replaces a drafter's proposals by the known greedy continuation or by
    wrong tokens, the rounds cycling through: all accepted, none, all, a random number, none, a
    random number (so consecutive rounds also alternate); ``rounds`` records how many were right."""
    rounds = []

    def adjust(tokens, drafts):
        k = len(drafts)
        pos = len(tokens) - prompt_len
        right = (continuation[pos : pos + k] + [0] * k)[:k]
        wrong = [(t + 1) % vocab for t in right]
        kind = ("all", "none", "all", "random", "none", "random")[len(rounds) % 6]
        n_right = {"all": k, "none": 0}.get(kind)
        if n_right is None:
            n_right = rng.randint(0, k)
        rounds.append(n_right)
        return right[:n_right] + wrong[n_right:]

    return adjust, rounds

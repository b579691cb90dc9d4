import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

PARITY_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Official-layout float32 tiny checkpoints: Flash-like and Pro-like ordering."""
    from mlx_dsv4.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {
        "flash": write_tiny_checkpoint(root / "flash", preset="flash", seed=0, vocab_size=PARITY_VOCAB),
        "pro": write_tiny_checkpoint(root / "pro", preset="pro", seed=1, vocab_size=PARITY_VOCAB),
    }

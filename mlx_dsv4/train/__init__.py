"""The small trained V4: synthetic tasks (data), training (trainer), the shipped checkpoint (ship)."""

from pathlib import Path

# The trained checkpoint shipped inside the package, in the converter's MLX format.
TRAINED_DIR = Path(__file__).resolve().parent.parent / "tiny_trained"


def trained_checkpoint() -> Path:
    """The directory of the shipped trained checkpoint; FileNotFoundError naming it when absent."""
    if not (TRAINED_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{TRAINED_DIR}: the trained tiny checkpoint is not installed")
    return TRAINED_DIR

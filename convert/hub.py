"""Hub repo id or local directory -> local checkpoint directory."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConvertError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "encoding/*",
    "LICENSE*",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(hf_path: str, revision: str | None = None, allow_patterns=None) -> Path:
    """A local directory as is; a repo id through huggingface_hub's resumable, cached snapshot
    download (which honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE)."""
    p = Path(hf_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConvertError(f"{p}: not a directory")
        return p
    if not REPO_ID.match(hf_path):
        raise ConvertError(f"{hf_path}: no such directory, and not a Hub repo id (owner/name)")
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(
            repo_id=hf_path, revision=revision, allow_patterns=allow_patterns or ALLOW_PATTERNS)
    except Exception as e:  # the hub raises many types (offline, auth, missing revision, network)
        raise ConvertError(f"{hf_path}: could not fetch from the Hugging Face Hub"
                           f"{' at revision ' + revision if revision else ''}: {type(e).__name__}: {e}") from None
    return Path(local)

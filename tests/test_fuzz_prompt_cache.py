"""Fuzzing prompt-cache files: a damaged file (header fields, tensor entries, array shapes and
dtypes, truncation, flipped bytes) loads into a cache that generates what the intact file
gives, or is refused with PromptCacheError; never another exception."""

import json
import struct

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generate_support import tiny_chat_model
from mlx_dsv4.generate import (
    PromptCache,
    PromptCacheError,
    _arrays_checksum,
    generate,
    load_prompt_cache,
    save_prompt_cache,
)

SYSTEM = "<｜begin▁of▁sentence｜>" + "You are a storyteller who only writes about animals. " * 12
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
HEADER_FIELDS = ["format", "fingerprint", "checksum", "snapshots", "metadata"]
META_FIELDS = ["offset", "ratios", "kv_dtype", "index_dtype"]
DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.uint8, mx.uint32, mx.int32, mx.int64]


class Original:
    """A valid prompt-cache file, the prompt that extends it and what generating it gives."""

    def __init__(self, folder):
        self.model, tok = tiny_chat_model()
        first = tok.encode(SYSTEM + "<｜User｜>Write about a heron.<｜Assistant｜></think>")
        pc = PromptCache(self.model)
        reply = generate(self.model, tok, first, max_tokens=3, prompt_cache=pc, snapshot_at=[40])
        self.prompt = first + reply.tokens + tok.encode("<｜User｜>And an otter?<｜Assistant｜></think>")
        self.dir = folder
        path = self.dir / "original.cache"
        save_prompt_cache(path, pc, metadata={"chat": {"messages": []}})
        self.data = path.read_bytes()
        self.arrays, self.header = mx.load(str(path), format="safetensors", return_metadata=True)
        self.expected = self.generate(load_prompt_cache(path, self.model))
        assert self.expected.stats["cached_tokens"] == len(first) + len(reply.tokens)

    def generate(self, pc):
        return generate(self.model, tiny_chat_model()[1], self.prompt, max_tokens=4, prompt_cache=pc)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return Original(tmp_path_factory.mktemp("fuzz-prompt-cache"))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def split_file(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def header_field_mutations(draw, original):
    """One field of the safetensors metadata removed, blanked, replaced, or (snapshot index)
    edited in place."""
    header, body = split_file(original.data)
    metadata = header["__metadata__"]
    name = draw(st.sampled_from(HEADER_FIELDS))
    how = draw(st.sampled_from(["remove", "blank", "text", "json", "edit"]))
    if how == "remove":
        del metadata[name]
    elif how == "blank":
        metadata[name] = ""
    elif how == "text":
        metadata[name] = draw(st.text(max_size=40))
    elif how == "json":
        metadata[name] = json.dumps(draw(json_values))
    else:
        index = json.loads(metadata["snapshots"])
        entry = index[draw(st.integers(0, len(index) - 1))]
        key = draw(st.sampled_from(["n_tokens", "meta", *("meta." + k for k in META_FIELDS), "extra"]))
        value = draw(st.one_of(json_values, st.integers(-3, 400), st.integers(-3, 400).map(str),
                               st.sampled_from(["0,4,128", "0,4", "fp8", "bf16", "float", "fp4"])))
        if key.startswith("meta."):
            entry["meta"][key[5:]] = value
        elif draw(st.booleans()) and key in entry:
            del entry[key]
        else:
            entry[key] = value
        metadata["snapshots"] = json.dumps(index)
    return join_file(header, body)


@st.composite
def tensor_entry_mutations(draw, original):
    """One tensor's dtype, shape or data offsets rewritten in the safetensors header."""
    header, body = split_file(original.data)
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "U8", "U32", "I32", "I64", "F8_E4M3", "X"]))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 300), max_size=4))
    else:
        entry["data_offsets"] = [draw(st.integers(0, len(body) + 8)), draw(st.integers(0, len(body) + 8))]
    return join_file(header, body)


@st.composite
def array_mutations(draw, original):
    """One array reshaped, cast, dropped or renamed (or one added) and saved again, with the
    checksum recomputed or not: a well-formed file whose layout is wrong."""
    arrays = dict(original.arrays)
    header = dict(original.header)
    name = draw(st.sampled_from(sorted(arrays)))
    value = arrays[name]
    how = draw(st.sampled_from(["cast", "shorter", "longer", "reshape", "drop", "rename", "add"]))
    if how == "cast":
        arrays[name] = value.astype(draw(st.sampled_from([d for d in DTYPES if d != value.dtype])))
    elif how in ("shorter", "longer") and value.ndim:
        axis = draw(st.integers(0, value.ndim - 1))
        if how == "shorter" and value.shape[axis]:
            arrays[name] = mx.take(value, mx.arange(value.shape[axis] - 1), axis=axis)
        else:
            pad = mx.zeros([*value.shape[:axis], 1, *value.shape[axis + 1:]], dtype=value.dtype)
            arrays[name] = mx.concatenate([value, pad], axis=axis)
    elif how == "reshape":
        arrays[name] = value.reshape(-1)
    elif how == "drop":
        del arrays[name]
    elif how == "rename":
        arrays[draw(st.sampled_from(["0.layers.9.ring.0", "7.layers.0.ring.0", "x", "0.layers.0.ring.3",
                                     name + "x"]))] = arrays.pop(name)
    else:
        arrays[draw(st.sampled_from(["0.layers.0.ring.3", "1.extra", "2.__tokens__"]))] = mx.zeros((1, 2))
    if draw(st.booleans()):
        header["checksum"] = _arrays_checksum(arrays)
    path = original.dir / "resaved.safetensors"
    mx.save_safetensors(str(path), arrays, metadata=header)
    return path.read_bytes()


@st.composite
def byte_mutations(draw, original):
    data = bytearray(original.data)
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


@FUZZ
@given(st.data())
def test_a_damaged_file_loads_as_the_original_or_is_refused(original, data):
    mutation = data.draw(st.sampled_from([header_field_mutations, tensor_entry_mutations, array_mutations,
                                          byte_mutations]))
    damaged = data.draw(mutation(original))
    path = original.dir / "damaged.cache"
    path.write_bytes(damaged)
    try:
        pc = load_prompt_cache(path, original.model)
    except PromptCacheError as e:
        assert str(e).startswith(f"{path}: ")
        return
    result = original.generate(pc)
    assert result.tokens == original.expected.tokens
    assert result.stats["cached_tokens"] == original.expected.stats["cached_tokens"]

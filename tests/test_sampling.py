"""Sampling flags and request fields reach generation through one mapping (SamplingParams)."""

import inspect
import re

import pytest

from mlx_dsv4.cli import build_parser
from mlx_dsv4.cli.common import sampling_from_args
from mlx_dsv4.generate import stream_generate
from mlx_dsv4.sampling import SamplingParams
from mlx_dsv4.server.common import parse_sampling

FLAGS = ["--max-tokens", "7", "--temp", "0.7", "--top-p", "0.9", "--top-k", "5", "--min-p", "0.1",
         "--repetition-penalty", "1.1"]
FROM_FLAGS = dict(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1)


def parse(command, *argv):
    required = {"generate": ["--prompt", "p"]}.get(command, [])
    return build_parser().parse_args([command, "--model", "m", *required, *argv])


def test_every_generate_keyword_is_a_stream_generate_argument():
    accepted = inspect.signature(stream_generate).parameters
    assert set(SamplingParams().generate_kwargs()) <= set(accepted)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_flags(command):
    args = parse(command, *FLAGS, "--seed", "3", "--stop", "a", "--stop", "b")
    assert sampling_from_args(args).generate_kwargs() == dict(FROM_FLAGS, seed=3, stop=("a", "b"))
    assert sampling_from_args(parse(command)).generate_kwargs() == dict(
        max_tokens=1024, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=None,
        stop=())


def test_serve_flags_are_the_defaults_of_requests():
    defaults = sampling_from_args(parse("serve"))
    plain = parse_sampling({}, defaults, max_tokens_names=("max_tokens",))
    assert plain.generate_kwargs() == dict(max_tokens=4096, temperature=0.6, top_p=0.95, top_k=0, min_p=0.0,
                                           repetition_penalty=None, seed=None, stop=())
    assert not plain.max_tokens_given

    defaults = sampling_from_args(parse("serve", *FLAGS, "--temperature", "0.2"))
    assert parse_sampling({}, defaults, max_tokens_names=("max_tokens",)).generate_kwargs() == dict(
        FROM_FLAGS, temperature=0.2, seed=None, stop=())
    body = {"max_tokens": 3, "temperature": 1, "top_k": 2, "seed": 4, "stop": "x"}
    sampling = parse_sampling(body, defaults, max_tokens_names=("max_tokens",))
    assert sampling.generate_kwargs() == dict(FROM_FLAGS, max_tokens=3, temperature=1.0, top_k=2, seed=4, stop=("x",))
    assert sampling.max_tokens_given


def test_serve_refuses_bad_default_sampling_before_loading(tmp_path, capsys):
    from generate_support import BAD_SAMPLING_FLAGS, config_only_dir
    from mlx_dsv4.cli import main

    model_dir = config_only_dir(tmp_path)  # loading it would fail: the check comes first
    for flags, message in BAD_SAMPLING_FLAGS:
        if flags[0] in ("--seed", "--stop"):  # set per request only
            continue
        assert main(["serve", "--model", str(model_dir), *flags]) == 2
        assert re.fullmatch(f"error: {message}\n", capsys.readouterr().err)

"""Byte sizes: one reading of size flags in every command, and the printed formats."""

import pytest

from mlx_dsv4.cli import build_parser, main
from mlx_dsv4.sizes import format_bytes, format_decimal_bytes, parse_size

GiB = 2**30


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("1000", 1000),
    ("1000B", 1000),
    ("1000 b", 1000),
    (" 42 ", 42),
    ("8G", 8 * GiB),
    ("8g", 8 * GiB),
    ("8GiB", 8 * GiB),
    ("8gib", 8 * GiB),
    ("8 GiB", 8 * GiB),
    ("8GB", 8 * 10**9),
    ("8gb", 8 * 10**9),
    ("2K", 2048),
    ("2KiB", 2048),
    ("300KB", 300_000),
    ("300kB", 300_000),
    ("512M", 512 * 2**20),
    ("512MiB", 512 * 2**20),
    ("512MB", 512 * 10**6),
    ("1T", 2**40),
    ("1TiB", 2**40),
    ("1TB", 10**12),
    ("1.5G", 3 * GiB // 2),
    (".5K", 512),
    ("1.5", 1),
    ("1e9", 10**9),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8X", "8Gi", "8 G B", "-1G", "8GiBs", "G", "1,000", "0x10"])
def test_parse_size_names_the_bad_text(text):
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert repr(text) in str(err.value) and "8GiB" in str(err.value)


@pytest.mark.parametrize("n, binary, decimal", [
    (0, "0 B", "0 B"),
    (999, "999 B", "999 B"),
    (1000, "1000 B", "1.00 kB"),
    (1023, "1023 B", "1.02 kB"),
    (1024, "1.0 KiB", "1.02 kB"),
    (1536, "1.5 KiB", "1.54 kB"),
    (10**6, "976.6 KiB", "1.00 MB"),
    (5 * 2**20, "5.0 MiB", "5.24 MB"),
    (8 * GiB, "8.0 GiB", "8.59 GB"),
    (8 * 10**9, "7.5 GiB", "8.00 GB"),
    (3 * 2**40, "3.0 TiB", "3298.53 GB"),
    (2**60, "1048576.0 TiB", "1152921504.61 GB"),
])
def test_formats(n, binary, decimal):
    assert format_bytes(n) == binary
    assert format_decimal_bytes(n) == decimal


def test_format_bytes_digits():
    assert format_bytes(1.234 * GiB, digits=2) == "1.23 GiB"
    assert format_bytes(100, digits=2) == "100 B"


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_max_kv_size_means_the_same_in_every_command(command):
    required = {"generate": ["--prompt", "hi"], "chat": [], "serve": []}[command]
    args = build_parser().parse_args([command, "--model", "m", *required, "--max-kv-size", "8G"])
    assert args.max_kv_size == 2**33
    args = build_parser().parse_args([command, "--model", "m", *required, "--max-kv-size", "8GB"])
    assert args.max_kv_size == 8 * 10**9


def test_bad_max_kv_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "m", "--max-kv-size", "8 gigs"])
    assert exit_.value.code == 2
    assert "--max-kv-size: '8 gigs' is not a size" in capsys.readouterr().err


def test_token_count_lists():
    from mlx_dsv4.sizes import parse_token_counts

    assert parse_token_counts("32K,1k,8192,1K,1M") == [1024, 8192, 32768, 1048576]
    with pytest.raises(ValueError, match="'' is not a token count"):
        parse_token_counts("1K,,2K")
    with pytest.raises(ValueError, match="'x' is not a token count"):
        parse_token_counts("1K,x")
    with pytest.raises(ValueError, match="'100' is 100 tokens: at least 512 needed"):
        parse_token_counts("1K,100", minimum=512)
    with pytest.raises(ValueError, match="'0' is 0 tokens: at least 1 needed"):
        parse_token_counts("0")

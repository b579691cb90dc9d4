"""Byte sizes: one reading of size flags, and the formats sizes are printed in.

``parse_size`` reads a number of bytes with an optional unit. K, M, G and T (alone or
followed by iB) are powers of 1024; followed by B they are powers of 1000; case does
not matter. So ``8G`` = ``8GiB`` = 2**33 bytes and ``8GB`` = 8 * 10**9 bytes; a plain
number (or one followed by ``B``) is bytes. Fractions are allowed (``1.5G``); the
result is rounded down to whole bytes.

``parse_token_counts`` reads a comma-separated list of token counts with the same units
(``32K`` = 32768 tokens, ``1M`` = 1048576 tokens).

``format_bytes`` prints binary units (KiB, MiB, GiB, TiB); ``format_decimal_bytes``
prints the decimal units (kB, MB, GB) checkpoint sizes are given in.
"""

import re

_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?:([kmgt])(i?b)?|(b))?\s*", re.IGNORECASE)
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_DECIMAL_UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def parse_size(text: str) -> int:
    """Bytes from text such as ``1000000``, ``512M``, ``8GiB`` or ``8GB`` (see the module's doc)."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with a unit such as "
                         "8G or 8GiB (2**33 bytes), 8GB (8*10**9 bytes), 512M, 64K")
    number, prefix, suffix = float(match.group(1)), match.group(2), match.group(3)
    if prefix is None:
        return int(number)
    power = "kmgt".index(prefix.lower()) + 1
    base = 1000 if suffix is not None and suffix.lower() == "b" else 1024
    return int(number * base**power)


def parse_token_counts(text: str, minimum: int = 1) -> list:
    """Sorted, distinct token counts of at least ``minimum`` from text such as ``"32K,1K,8192"``
    (K = 1024, M = 1048576)."""
    counts = set()
    for item in str(text).split(","):
        try:
            n = parse_size(item)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a token count: give a number with an optional K or M "
                             "(32K = 32768 tokens, 1M = 1048576 tokens), counts separated by commas") from None
        if n < minimum:
            raise ValueError(f"{item.strip()!r} is {n} tokens: at least {minimum} needed")
        counts.add(n)
    return sorted(counts)


def format_bytes(n: float, digits: int = 1) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    n = float(n)
    for unit in _BINARY_UNITS:
        if abs(n) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024


def format_decimal_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``999 B``, ``1.50 kB``, ``160.00 GB``."""
    for unit, size in _DECIMAL_UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"

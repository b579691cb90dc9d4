"""JSON as the wire format writes and reads it, and the check for reserved protocol strings.

Depends only on ``errors`` and ``special``, which import nothing, so every other module
of the package can use it without forming an import cycle.
"""

import json
import math

from .errors import ChatFormatError
from .special import RESERVED_STRINGS


def to_json(value):
    """JSON exactly as the official encoder writes it: default separators, no ASCII escaping.

    NaN and infinities are refused (``ValueError``): they are not JSON.
    """
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def strict_json_loads(text):
    """``json.loads`` for strict JSON: no NaN, Infinity or -Infinity, no number that overflows
    to infinity. Raises ``ValueError`` (``json.JSONDecodeError`` for syntax errors)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def check_reserved(text, *, index=None, field=None):
    """Raise if ``text`` contains a string that would tokenise to a protocol token."""
    for reserved in RESERVED_STRINGS:
        if reserved in text:
            raise ChatFormatError(
                f"contains the reserved protocol string {reserved!r}", index=index, field=field
            )

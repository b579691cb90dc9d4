"""JSON as strict parsers read it: no NaN, Infinity or -Infinity, no number that overflows."""

import json
import math


def _check_finite(value, where="$"):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}, which is not JSON")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def strict_json(text):
    value = json.loads(text)
    _check_finite(value)
    return value

"""The prefill progress bar: tokens done, tokens per second and time left."""

import io

import pytest

from generate_support import tiny_chat_model
from mlx_dsv4.console import ProgressBar, format_duration
from mlx_dsv4.generate import generate


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def _lines(stream):
    return [line for line in stream.getvalue().split("\r") if line]


def test_bar_shows_rate_and_time_left():
    out = Terminal()
    bar = ProgressBar(stream=out, min_total=10, width=10, clock=Clock([100.0, 102.0, 104.0, 108.0]))
    bar(1000, 4000)  # 2 s for 1000 tokens: 500 tok/s, 3000 left
    bar(2000, 4000)  # 4 s for 2000
    bar(4000, 4000)
    first, second, last = _lines(out)
    assert first.startswith("prefill [##........] 1000/4000 tokens, 500 tok/s, ETA 6s")
    assert second.startswith("prefill [#####.....] 2000/4000 tokens, 500 tok/s, ETA 4s")
    assert last.startswith("prefill [##########] 4000/4000 tokens, 500 tok/s") and "ETA" not in last
    bar.clear()
    assert out.getvalue().endswith("\r\x1b[2K")


def test_bar_stays_quiet_off_a_terminal_and_for_short_prompts():
    quiet = io.StringIO()
    ProgressBar(stream=quiet, clock=Clock([0.0, 1.0]))(10, 20)
    short = Terminal()
    ProgressBar(stream=short, min_total=100, clock=Clock([0.0, 1.0]))(10, 20)
    assert quiet.getvalue() == short.getvalue() == ""


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (7620, "2h07m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_generate_drives_the_bar_chunk_by_chunk():
    model, tok = tiny_chat_model()
    ids = tok.encode("the cat sat on the mat" * 10)
    out = Terminal()
    ticks = iter(range(0, 1000, 2))
    bar = ProgressBar(stream=out, min_total=17, clock=lambda: float(next(ticks)))
    generate(model, tok, ids, max_tokens=2, prefill_step=16, progress=bar)
    lines = _lines(out)
    total = len(ids) - 1
    chunks = -(-total // 16)
    assert len(lines) == chunks
    assert all("tok/s, ETA" in line for line in lines[:-1])
    assert f"{total}/{total} tokens, {total / (2 * chunks):.0f} tok/s" in lines[-1]  # one chunk per 2-second tick

"""Sampling parameters, as the command line and the server take them and generation uses them."""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``mlx_dsv4.generate.stream_generate`` / ``generate``."""
        return dict(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
        )

"""Which rank holds what when several machines share the model (mlx_dsv4.distributed): the
pipeline's layer split and the experts' split. No MLX here, so size estimates can use it."""

from typing import List, Sequence


class DistributedError(RuntimeError):
    """A rank was lost, did not answer, or the ranks cannot run the model as asked."""


def pipeline_extras(embed_bytes: int, head_bytes: int, tied: bool) -> tuple:
    """(bytes the first pipeline rank holds beside its layers, bytes the last one does): the
    embedding, and the head with its norms; a tied head (tie_word_embeddings) is the embedding,
    held on the last rank too."""
    return embed_bytes, head_bytes + (embed_bytes if tied else 0)


def split_layers(layer_bytes: Sequence[int], n: int, first_extra: int = 0, last_extra: int = 0) -> List[int]:
    """Layers per rank for a contiguous split of ``layer_bytes`` over ``n`` ranks that makes the
    largest rank smallest, rank 0 also holding ``first_extra`` bytes and the last ``last_extra``."""
    L = len(layer_bytes)
    if not 1 <= n <= L:
        raise DistributedError(f"cannot split {L} layers over {n} ranks: each rank needs at least one layer")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + int(b))

    def cost(rank, a, b):
        c = prefix[b] - prefix[a]
        return c + (first_extra if rank == 0 else 0) + (last_extra if rank == n - 1 else 0)

    # best[r][b]: the smallest largest rank for layers [0, b) over ranks 0..r
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n)]
    choice = [[0] * (L + 1) for _ in range(n)]
    for b in range(1, L + 1):
        best[0][b] = cost(0, 0, b)
    for r in range(1, n):
        for b in range(r + 1, L + 1):
            for a in range(r, b):
                v = max(best[r - 1][a], cost(r, a, b))
                if v < best[r][b]:
                    best[r][b], choice[r][b] = v, a
    counts, b = [], L
    for r in range(n - 1, 0, -1):
        a = choice[r][b]
        counts.append(b - a)
        b = a
    counts.append(b)
    return counts[::-1]


def parse_split(text: str, n_layers: int, n_ranks: int) -> List[int]:
    """'2,3,1' -> [2, 3, 1], checked against the layer and rank counts."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise DistributedError(f"pipeline split {text!r}: expected layer counts separated by commas") from None
    if len(counts) != n_ranks or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise DistributedError(f"pipeline split {text!r}: needs {n_ranks} positive layer counts summing to "
                               f"{n_layers}")
    return counts


def expert_range(n_experts: int, rank: int, size: int) -> tuple:
    """[start, end) of the routed experts of ``rank``."""
    if size > n_experts:
        raise DistributedError(f"cannot split {n_experts} routed experts over {size} ranks")
    return n_experts * rank // size, n_experts * (rank + 1) // size

"""`mlx-dsv4 serve --distributed`: rank 0 serves HTTP and sends each request to the other ranks,
which run the same generation (same token ids, sampling, prompt-cache partition) and, after
every token, learn from rank 0 whether it goes on (a client that went away ends it on all)."""

import hashlib

from .engine import Engine


def partition_key(partition) -> str:
    """The prompt-cache partition as the other ranks know it (API keys do not travel)."""
    return hashlib.sha256(repr(partition).encode()).hexdigest()


class LeaderEngine(Engine):
    """Rank 0's engine: loads rank 0's part and announces every generation to the others."""

    # Every rank must run the same steps: a grammar mask on rank 0 alone would change its samples,
    # and a prefill stopped on rank 0 alone would leave the others waiting mid-chunk.
    constrains = False
    stops_in_prefill = False
    batches = False  # the other ranks replay one generation at a time

    def __init__(self, model_path, ranks, mode, split=None, **options):
        super().__init__(model_path, **options)
        self.ranks, self.mode, self.split = ranks, mode, split

    def _load(self):
        from ..distributed import load_distributed
        from ..tokenizer import load_tokenizer

        return load_distributed(self.model_path, self.ranks, self.mode, self.split), load_tokenizer(self.model_path)

    def _announce(self, ids, options, partition):
        self.ranks.broadcast({"ids": list(ids), "options": options, "partition": partition_key(partition)})

    def _stop_after(self, job, step) -> bool:
        return self.ranks.stop_agreed(super()._stop_after(job, step))

    def _stopping(self):
        self.ranks.broadcast({"stop": True})


def follow(engine: Engine, ranks, model, tokenizer) -> int:
    """The other ranks' loop: run each generation rank 0 announces, until it stops."""
    from ..generate import KVCacheLimitError, PromptCacheError, stream_generate

    engine.model, engine.tokenizer = model, tokenizer
    while True:
        request = ranks.broadcast(idle=True)
        if request.get("stop"):
            return 0
        options = dict(request["options"], stop=tuple(request["options"]["stop"]))
        prompt_cache = engine._prompt_cache(request["partition"])
        try:
            steps = stream_generate(model, tokenizer, request["ids"], prefill_step=engine.prefill_step,
                                    prompt_cache=prompt_cache, kv_cache_limit=engine.kv_cache_limit, **options)
            try:
                for _ in steps:
                    if ranks.stop_agreed():
                        break
            finally:
                steps.close()
        except (KVCacheLimitError, PromptCacheError):
            pass  # rank 0 refused the same request for the same reason

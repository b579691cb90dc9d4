"""Run under `mlx.launch`: the distributed model's logits and generated tokens, one JSON file per rank.

usage: distributed_worker.py OUT_DIR SPEC_JSON
SPEC_JSON: {"runs": [{"name", "checkpoint", "mode", "split"?}], "prompt": [ids], "chunk": int,
            "decode": int, "generate": [{"checkpoint", "mode", "max_tokens", "temperature", "seed"}]?, "die": {...}?}
"""

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dsv4.distributed import init, load_distributed


def forward_logits(model, prompt, chunk, n_decode):
    """Logits of each prefill chunk, then of each greedy decode step (float32 cache)."""
    cache = model.make_cache(kv_dtype="float", index_dtype="float")
    out = []
    for a in range(0, len(prompt), chunk):
        logits = model(mx.array([prompt[a:a + chunk]]), cache=cache)
        mx.eval(logits)
        out.append(logits[0].tolist())
    token = int(mx.argmax(logits[0, -1]).item())
    for _ in range(n_decode):
        logits = model(mx.array([[token]]), cache=cache)
        mx.eval(logits)
        out.append(logits[0].tolist())
        token = int(mx.argmax(logits[0, -1]).item())
    return out


def main():
    out_dir, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    ranks = init()
    result = {"rank": ranks.rank, "size": ranks.size, "runs": {}}
    for run in spec.get("runs", []):
        model = load_distributed(run["checkpoint"], ranks, run["mode"], run.get("split"))
        entry = {"logits": forward_logits(model, spec["prompt"], spec["chunk"], spec["decode"]),
                 "held": {k: list(v.shape) for k, v in tree_flatten(model.parameters())}}
        if run["mode"] == "pipeline":
            entry["layers"] = [model.first, model.end]
        result["runs"][run["name"]] = entry
    result["generate"] = []
    for gen in spec.get("generate", []):
        from mlx_dsv4.generate import generate
        from mlx_dsv4.tokenizer import load_tokenizer

        model = load_distributed(gen["checkpoint"], ranks, gen["mode"])
        tokenizer = load_tokenizer(gen["checkpoint"])
        r = generate(model, tokenizer, spec["prompt"], max_tokens=gen["max_tokens"], temperature=gen["temperature"],
                     seed=gen.get("seed"), prefill_step=spec["chunk"])
        result["generate"].append(r.tokens)
    die = spec.get("die")
    if die:
        model = load_distributed(die["checkpoint"], ranks, die["mode"])
        cache = model.make_cache()
        token = spec["prompt"][0]
        (out_dir / f"ready{ranks.rank}").write_text("")
        with ranks.busy("decoding"):
            for step in range(10**6):
                if ranks.rank == die["rank"] and step == die["step"]:
                    os.kill(os.getpid(), getattr(signal, die["signal"]))
                logits = model(mx.array([[token]]), cache=cache)
                token = int(mx.argmax(logits[0, -1]).item())
    (out_dir / f"rank{ranks.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""Measurements of a trained tiny V4 on held-out synthetic tasks (`TaskGenerator(split="eval")`).

- tool use: the agent loop (real generation, parsing, validation, execution) on held-out numbers,
  cities and phrasings; correct = the expected call with the expected arguments, then the
  expected final answer built from the tool's actual result;
- retrieval: greedy answer to "value of key K" after a key: value list of a given length;
- MTP acceptance: how often the MTP layer's argmax equals the main model's next-but-one greedy token;
- cache precision: mean KL and argmax agreement of each kv / indexer storage against float32.
"""

import json

import mlx.core as mx
import numpy as np

from ..chat import encode_messages
from . import data
from .data import TaskGenerator

STORAGES = ("fp8/fp4", "bf16/bf16", "float/float")


def greedy(model, ids, max_new: int, eos_id: int, kv_dtype="fp8", index_dtype="fp4"):
    """Greedy continuation of token ids (stops after EOS, which it includes)."""
    cache = model.make_cache(kv_dtype, index_dtype)
    logits = model(mx.array([ids]), cache=cache, last_only=True)
    out = []
    for _ in range(max_new):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        if token == eos_id:
            break
        logits = model(mx.array([[token]]), cache=cache)
    return out


def _prompt_ids(tokenizer, messages, **options):
    return tokenizer.encode(encode_messages(messages, **options))


def tool_use(model, tokenizer, n: int = 40, seed: int = 0, max_tokens: int = 96) -> dict:
    """Agent round trips on held-out tool questions; `failures` lists what went wrong first."""
    from ..agent import Agent

    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    functions = {"get_weather": data.get_weather, "calculate": data.calculate, "add": data.add}
    correct = well_formed = 0
    failures = []
    for _ in range(n):
        ex = gen.example("tool")
        m = ex.meta
        tools = [functions[t.name] for t in gen.tools[m["toolset"]]]
        agent = Agent(model, tokenizer, tools=tools, system=m["system"], max_steps=2, max_tokens=max_tokens)
        with agent:
            result = agent.run(m["question"])
        calls = result.tool_calls
        ok_call = bool(calls) and calls[0].name == m["call"] and _arguments(calls[0].arguments) == m["arguments"]
        well_formed += ok_call
        answer = (result.content or "").strip()
        if ok_call and answer == m["answer"]:
            correct += 1
        elif len(failures) < 5:
            failures.append({"question": m["question"], "expected": [m["call"], m["arguments"], m["answer"]],
                             "got": [[c.name, c.arguments] for c in calls], "answer": answer})
    return {"n": n, "correct": correct / n, "well_formed_call": well_formed / n, "failures": failures}


def _arguments(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def retrieval(model, tokenizer, n_tokens: int, n: int = 20, seed: int = 0) -> dict:
    """Share of exact greedy answers to retrieval questions of about `n_tokens` tokens."""
    gen = TaskGenerator(tokenizer, seed=seed + n_tokens, split="eval")
    hits = 0
    lengths = []
    for _ in range(n):
        ex = gen.retrieval(n_tokens)
        messages = [{"role": "user", "content": ex.text.split("<｜User｜>", 1)[1].split("<｜Assistant｜>", 1)[0]}]
        ids = _prompt_ids(tokenizer, messages)
        lengths.append(len(ids))
        out = greedy(model, ids, 4, tokenizer.eos_token_id)
        hits += tokenizer.decode(out).replace(tokenizer.eos_token, "").strip() == ex.meta["answer"]
    return {"n": n, "tokens": int(np.mean(lengths)), "accuracy": hits / n}


def _eval_sequences(tokenizer, n: int, seed: int, kinds=("tool", "chat", "pattern")):
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    return [gen.example(kinds[i % len(kinds)]) for i in range(n)]


def mtp_acceptance(model, tokenizer, n: int = 12, seed: int = 0, new_tokens: int = 24) -> dict:
    """Greedy continuations of held-out prompts; at each generated position i + 2, whether the MTP
    layer (reading the main model's streams at i and token i + 1) predicts the greedy token."""
    if not model.mtp_layers:
        raise ValueError("the model has no MTP layer (load it with mtp=True)")
    mtp = model.mtp_layers[0]
    accepted = total = 0
    for ex in _eval_sequences(tokenizer, n, seed):
        first_target = ex.mask.index(True)
        prompt = ex.ids[:first_target]
        out = greedy(model, prompt, new_tokens, tokenizer.eos_token_id, "float", "float")
        seq = prompt + out
        tokens = mx.array([seq])
        _, hidden = model(tokens, cache=model.make_cache("float", "float"), return_hidden=True)
        next_tokens = mx.array([seq[1:] + [seq[-1]]])
        logits, _ = mtp(hidden, next_tokens, model.embed, model.head, mtp.make_cache("float", "float"))
        guess = np.array(mx.argmax(logits[0], axis=-1))
        # position i predicts seq[i + 2]; the greedy tokens are seq[len(prompt):]
        for i in range(len(prompt) - 1, len(seq) - 2):
            accepted += int(guess[i] == seq[i + 2])
            total += 1
    return {"n": n, "positions": total, "acceptance": accepted / max(1, total)}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def cache_precision(model, tokenizer, n: int = 4, seed: int = 0, prefix_tokens: int = 1024) -> list:
    """Per storage: mean KL(float32 || storage) and argmax agreement of the next-token distributions
    over teacher-forced decode steps that follow a prefilled retrieval prompt (so the cache holds
    compressed entries)."""
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    rows = []
    prompts = []
    for _ in range(n):
        ex = gen.retrieval(prefix_tokens)
        prompts.append(ex.ids)
    reference = {}
    for storage in ("float/float",) + tuple(s for s in STORAGES if s != "float/float"):
        kv, index = storage.split("/")
        kls, agree = [], []
        for j, ids in enumerate(prompts):
            split = len(ids) - 32
            cache = model.make_cache(kv, index)
            steps = [model(mx.array([ids[:split]]), cache=cache, last_only=True)[0, -1]]
            for t in ids[split:-1]:
                steps.append(model(mx.array([[t]]), cache=cache)[0, -1])
            logp = _log_softmax(np.array(mx.stack(steps)).astype(np.float64))
            if storage == "float/float":
                reference[j] = logp
            ref = reference[j]
            kls.append(float((np.exp(ref) * (ref - logp)).sum(-1).mean()))
            agree.append(float((ref.argmax(-1) == logp.argmax(-1)).mean()))
        rows.append({"storage": storage, "mean_kl": float(np.mean(kls)), "argmax_agreement": float(np.mean(agree))})
    return rows

"""Measurements of a trained tiny V4 on held-out synthetic tasks (`TaskGenerator(split="eval")`).

- held-out loss: teacher-forced cross-entropy on the assistant tokens of held-out examples;
- tool use: the agent loop (real generation, parsing, validation, execution) on held-out numbers,
  cities and phrasings; correct = the expected call with the expected arguments, then the
  expected final answer built from the tool's actual result. Its parts apart: how often the call
  names the expected tool, and how often the final answer is right when the expected call and its
  result are given (`answer_after_result`), and how often the call's tokens are right teacher-forced,
  its arguments apart from the rest (`call_token_accuracy`);
- retrieval: greedy answer to "value of key K" after a key: value list of a given length;
- chat: exact greedy replies to single-turn chat questions (capitals, repeating words, greetings);
- MTP acceptance: how often the MTP layer's argmax equals the main model's next-but-one greedy token;
- cache precision: mean KL and argmax agreement of each kv / indexer storage against float32.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..chat import encode_messages, parse_completion
from . import data
from .data import TaskGenerator

STORAGES = ("fp8/fp4", "bf16/bf16", "float/float")


def float32_copy(model):
    """The model with its quantised embedding and head dequantised and every weight float32, so that
    the activations (and the "float" cache) are float32."""
    for name in ("embed", "head"):
        layer = getattr(model, name)
        if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
            w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
            if name == "embed":
                new = nn.Embedding(*w.shape)
            else:
                new = nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight = w.astype(mx.float32)
            setattr(model, name, new)
    model.update(nn.utils.tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                                   model.parameters()))
    mx.eval(model.parameters())
    return model


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


def heldout_loss(model, tokenizer, n: int = 6, seed: int = 0, kinds=("tool", "chat", "pattern")) -> dict:
    """Mean next-token cross-entropy (nats) over the assistant tokens of held-out examples, teacher-forced."""
    total = count = 0.0
    for ex in _eval_sequences(tokenizer, n, seed, kinds):
        ids = np.array(ex.ids)
        logits = model(mx.array(ids[None, :-1]), cache=model.make_cache("float", "float"))[0]
        targets = np.nonzero(np.array(ex.mask[1:]))[0]
        logp = logits[mx.array(targets)].astype(mx.float32)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(ids[targets + 1])[:, None], axis=-1)
        total -= float(picked.sum())
        count += len(targets)
    return {"n": n, "tokens": int(count), "loss": total / max(1, count)}


def tool_use(model, tokenizer, n: int = 40, seed: int = 0, max_tokens: int = 96, unseen_cities: bool = True) -> dict:
    """Agent round trips on held-out tool questions; `failures` lists what went wrong first.
    `unseen_cities`: weather questions ask about cities training never asks about (else training
    cities, with held-out numbers and phrasings as before)."""
    from ..agent import Agent

    functions = {"get_weather": data.get_weather, "calculate": data.calculate, "add": data.add}
    correct = well_formed = right_tool = answered = 0
    failures = []
    toolsets = {"weather": ("get_weather", "calculate"), "add": ("add",)}
    gen = TaskGenerator(tokenizer, seed=seed, split="eval", unseen_cities=unseen_cities)
    for _ in range(n):
        ex = gen.example("tool")  # before the round trip: it sets the weather the tool reports
        m = ex.meta
        tools = [functions[name] for name in toolsets[m["toolset"]]]
        agent = Agent(model, tokenizer, tools=tools, system=m["system"], max_steps=2, max_tokens=max_tokens)
        with agent:
            result = agent.run(m["question"])
        calls = result.tool_calls
        ok_tool = bool(calls) and calls[0].name == m["call"]
        ok_call = ok_tool and _arguments(calls[0].arguments) == m["arguments"]
        right_tool += ok_tool
        well_formed += ok_call
        answered += answer_after_result(model, tokenizer, ex, max_tokens) == m["answer"]
        answer = (result.content or "").strip()
        if ok_call and answer == m["answer"]:
            correct += 1
        elif len(failures) < 5:
            failures.append({"question": m["question"], "expected": [m["call"], m["arguments"], m["answer"]],
                             "got": [[c.name, c.arguments] for c in calls], "answer": answer})
    return {"n": n, "correct": correct / n, "well_formed_call": well_formed / n, "right_tool": right_tool / n,
            "answer_after_result": answered / n, "failures": failures}


def answer_after_result(model, tokenizer, ex, max_tokens: int = 96) -> str:
    """The model's greedy final answer to a tool example (`TaskGenerator.example("tool")`) given
    everything before it: the question, the expected call and the tool's result."""
    mask = ex.mask
    end = len(mask) - mask[::-1].index(True)
    start = end - mask[:end][::-1].index(False)
    out = greedy(model, ex.ids[:start], max_tokens, tokenizer.eos_token_id)
    return tokenizer.decode([t for t in out if t != tokenizer.eos_token_id]).strip()


def call_token_accuracy(model, tokenizer, n: int = 16, seed: int = 0, unseen_cities: bool = True) -> dict:
    """Teacher-forced greedy accuracy on the call turn of held-out tool examples: on its argument
    tokens (the values inside the DSML parameters) and on the rest of the turn (the template, tool
    and parameter names), so that a failing call can be traced to its part."""
    from .trainer import argument_positions

    right, total = {"arguments": 0, "rest": 0}, {"arguments": 0, "rest": 0}
    by_tool = {}  # tool -> [right, total] over its argument tokens
    gen = TaskGenerator(tokenizer, seed=seed, split="eval", unseen_cities=unseen_cities)
    for _ in range(n):
        ex = gen.example("tool")
        ids, mask = np.array(ex.ids), list(ex.mask)
        start = mask.index(True)
        end = start + mask[start:].index(False)  # the call turn: [start, end)
        logits = model(mx.array(ids[None, :-1]), cache=model.make_cache("float", "float"))[0]
        guess = np.array(mx.argmax(logits[start - 1: end - 1], axis=-1))
        arguments = set(argument_positions(ids, tokenizer).tolist())
        tool = by_tool.setdefault(ex.meta["call"], [0, 0])
        for k, g in zip(range(start, end), guess):
            part = "arguments" if k in arguments else "rest"
            right[part] += int(g == ids[k])
            total[part] += 1
            if part == "arguments":
                tool[0] += int(g == ids[k])
                tool[1] += 1
    return {"n": n, **{part: right[part] / max(1, total[part]) for part in right},
            **{f"{part}_tokens": total[part] for part in total},
            "arguments_by_tool": {name: {"right": r, "tokens": t} for name, (r, t) in sorted(by_tool.items())}}


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
        ids, meta = retrieval_prompt(gen, n_tokens)
        lengths.append(len(ids))
        out = greedy(model, ids, 4, tokenizer.eos_token_id)
        hits += tokenizer.decode(out).replace(tokenizer.eos_token, "").strip() == meta["answer"]
    return {"n": n, "tokens": int(np.mean(lengths)), "accuracy": hits / n}


def retrieval_prompt(gen: TaskGenerator, n_tokens: int):
    """(prompt ids, meta) of `gen`'s next retrieval question of about `n_tokens` tokens: the list
    and the question as one user turn, up to the assistant's opener; meta has key, answer, depth."""
    ex = gen.retrieval(n_tokens)
    messages = [{"role": "user", "content": ex.text.split("<｜User｜>", 1)[1].split("<｜Assistant｜>", 1)[0]}]
    return _prompt_ids(gen.tokenizer, messages), ex.meta


def chat_accuracy(model, tokenizer, n: int = 24, seed: int = 0) -> dict:
    """Exact greedy replies to single-turn chat questions of the chat task, in chat mode, taking turns:
    a country's capital, a few words to repeat, a greeting; the share right per kind and overall."""
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    right = {kind: [0, 0] for kind in gen.CHAT_KINDS}
    for i in range(n):
        kind = gen.CHAT_KINDS[i % len(gen.CHAT_KINDS)]
        question, reply, _ = gen.chat_turn(kind)
        out = greedy(model, _prompt_ids(tokenizer, [{"role": "user", "content": question}]), 48,
                     tokenizer.eos_token_id)
        got = parse_completion(tokenizer.decode(out), "chat", strict=False)["content"].strip()
        right[kind][0] += got == reply
        right[kind][1] += 1
    return {"n": n, "accuracy": sum(r for r, _ in right.values()) / n,
            **{kind: r / max(t, 1) for kind, (r, t) in right.items()}}


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
    """Per storage: mean KL(reference || storage) and argmax agreement of the next-token
    distributions of 32 teacher-forced decode steps after a prefilled retrieval prompt (the cache
    then holds compressed entries). The reference is one dense forward over the whole sequence with
    every kv row kept in the activation dtype (float32 for a float32 model)."""
    gen = TaskGenerator(tokenizer, seed=seed, split="eval")
    prompts = [gen.retrieval(prefix_tokens).ids for _ in range(n)]
    reference = []
    for ids in prompts:
        full = model(mx.array([ids[:-1]]), cache=model.make_cache("float", "float", naive=True))[0, -32:]
        reference.append(_log_softmax(np.array(full).astype(np.float64)))
    rows = []
    for storage in STORAGES:
        kv, index = storage.split("/")
        kls, agree = [], []
        for ids, ref in zip(prompts, reference):
            split = len(ids) - 32
            cache = model.make_cache(kv, index)
            steps = [model(mx.array([ids[:split]]), cache=cache, last_only=True)[0, -1]]
            for t in ids[split:-1]:
                steps.append(model(mx.array([[t]]), cache=cache)[0, -1])
            logp = _log_softmax(np.array(mx.stack(steps)).astype(np.float64))
            kls.append(float((np.exp(ref) * (ref - logp)).sum(-1).mean()))
            agree.append(float((ref.argmax(-1) == logp.argmax(-1)).mean()))
        rows.append({"storage": storage, "mean_kl": float(np.mean(kls)), "argmax_agreement": float(np.mean(agree))})
    return rows

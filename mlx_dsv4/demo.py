"""`mlx-dsv4 demo`: the whole path on the tiny V4 shipped in the package, trained on synthetic tasks.

1. load the checkpoint (the converter's MLX format, an 8-bit embedding);
2. a long prompt: a list of key: value lines, then a question about one key, answered through the
   compressed attention; prefill and greedy decode with the FP8 cache (the answer, speed, cache size);
3. a chat turn through the V4 chat encoding and the tokenizer;
4. an agent round trip: the model writes a DSML tool call, the agent parses, validates and runs it,
   and the model answers from the tool's result;
5. save the prompt cache to a file, restore it, and check the continuation matches.

With `random=True` the same path runs on a tiny random checkpoint written in the official layout;
its text is random, so its agent round trip replays scripted model output.
"""

import tempfile
import time
from pathlib import Path

import mlx.core as mx

PROMPT_LEN = 300  # crosses several ratio-4 and two ratio-128 compression windows
RANDOM_NOTE = "(random weights: the text is random)"


def greedy_decode(model, prompt: mx.array, n_tokens: int):
    cache = model.make_cache()
    t0 = time.perf_counter()
    token = mx.argmax(model(prompt, cache=cache, last_only=True)[:, -1], axis=-1)
    mx.eval(token)
    t1 = time.perf_counter()
    out = [token]
    for _ in range(n_tokens - 1):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(token)
        out.append(token)
    generated = mx.stack(out, axis=1)
    mx.eval(generated)
    t2 = time.perf_counter()
    return generated, cache, t1 - t0, t2 - t1


def _decode_speed(model, tokenizer, n_tokens, trained: bool):
    if trained:
        from .train.data import TaskGenerator
        from .train.evaluate import retrieval_prompt

        ids, meta = retrieval_prompt(TaskGenerator(tokenizer, seed=0, split="eval"), 1024)
        prompt = mx.array([ids])
    else:
        prompt = mx.array([[0] + [(97 * i + 13) % 128000 + 100 for i in range(PROMPT_LEN - 1)]])
    tokens, cache, t_prefill, t_decode = greedy_decode(model, prompt, n_tokens)
    if trained:
        answer = tokenizer.decode(tokens[0].tolist()).split(tokenizer.eos_token)[0].strip()
        print(f"long prompt: {prompt.shape[1]} tokens of key: value lines, then \"What is the value of key "
              f"{meta['key']}?\" -> {answer!r} (the list says {meta['answer']})")
    else:
        print(f"Greedy continuation ids {RANDOM_NOTE}: {tokens[0].tolist()[:16]} ...")
    n_prompt = prompt.shape[1]
    print(f"prompt: {n_prompt} tokens in {t_prefill:.3f} s = {n_prompt / t_prefill:.1f} tok/s")
    steps = n_tokens - 1  # the first token comes out of the prefill
    print(f"decode: {steps} cached steps in {t_decode:.3f} s = {steps / max(t_decode, 1e-9):.1f} tok/s")
    print(f"cache: {cache.nbytes} bytes for {cache.offset} tokens "
          f"(kv rows in {cache.kv_dtype}, indexer keys in {cache.index_dtype})")


def _chat_turn(model, tokenizer, trained: bool):
    from .chat import encode_messages, parse_completion
    from .generate import generate

    if trained:
        messages = [{"role": "user", "content": "Who are you?"}]
    else:
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Name three rivers in Europe."}]
    result = generate(model, tokenizer, encode_messages(messages, thinking_mode="chat"), max_tokens=32)
    reply = parse_completion(result.text, "chat", strict=False)
    print(f"chat turn{'' if trained else ' ' + RANDOM_NOTE}: {messages[-1]['content']!r} -> {reply['content'][:80]!r} "
          f"[{result.stats.get('prompt_tokens')} prompt tokens, finish: {result.finish_reason}]")


def _agent_round_trip(model, tokenizer, log_path: Path, trained: bool):
    from .agent import Agent
    from .train.data import add

    completion_fn, note = None, ""
    if not trained:
        script = iter([
            '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="add">\n'
            '<｜DSML｜parameter name="a" string="false">20</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="b" string="false">22</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>',
            "20 + 22 = 42.<｜end▁of▁sentence｜>",
        ])

        def completion_fn(prompt):
            return iter([next(script)])

        note = " (scripted model output, random weights cannot plan)"
    question = "How much is 20 + 22?"
    agent = Agent(model, tokenizer, tools=[add], substrate="function", system="You are a helpful assistant.",
                  log_path=log_path, max_steps=2, max_tokens=96, completion_fn=completion_fn)
    with agent:
        result = agent.run(question)
    calls = ", ".join(f"{c.name}({c.arguments}) -> {c.result.value}" for c in result.tool_calls) or "no tool"
    print(f"agent{note}: {question!r} -> called {calls}; final answer {result.content!r}; "
          f"steps logged to {log_path.name}")


def _cache_round_trip(model, tokenizer, path: Path, trained: bool):
    from .generate import PromptCache, generate, load_prompt_cache, save_prompt_cache

    if trained:
        from .train.data import key_value_list, value_question

        pairs = ((k, k * 7 % 900 + 100) for k in range(300, 420))
        document = "<｜begin▁of▁sentence｜><｜User｜>" + key_value_list(pairs)
        question = document + value_question(377) + "<｜Assistant｜></think>"
    else:
        document = "<｜begin▁of▁sentence｜>" + " ".join(f"fact {i}: the value is {i * 7 % 13}." for i in range(40))
        question = document + "<｜User｜>Which fact is largest?<｜Assistant｜></think>"
    uninterrupted = generate(model, tokenizer, question, max_tokens=12)
    pc = PromptCache(model)
    generate(model, tokenizer, document, max_tokens=1, prompt_cache=pc)
    save_prompt_cache(path, pc)
    restored = load_prompt_cache(path, model)
    again = generate(model, tokenizer, question, max_tokens=12, prompt_cache=restored)
    same = again.tokens == uninterrupted.tokens
    print(f"prompt cache: saved {path.stat().st_size} bytes; restored run reused "
          f"{again.stats.get('cached_tokens')} tokens and {'matches' if same else 'DIFFERS FROM'} "
          f"the uninterrupted generation ({again.text.strip()!r})")
    return same


def run_demo(directory=None, n_tokens: int = 64, seed: int = 0, random: bool = False) -> int:
    """The walk-through above, printed; 0 when the restored prompt cache continues exactly.
    `directory`: where to write the random checkpoint (implies `random`)."""
    from . import load
    from .tiny import write_tiny_checkpoint
    from .train import trained_checkpoint

    trained = not random and directory is None
    with tempfile.TemporaryDirectory() as tmp:
        if trained:
            path = trained_checkpoint()
            print(f"Loading the tiny DeepSeek-V4 trained on synthetic tasks, shipped in the package: {path}")
        else:
            path = Path(directory) if directory else Path(tmp) / "tiny-v4"
            print(f"Writing a tiny random DeepSeek-V4 checkpoint (official layout) to {path}")
            write_tiny_checkpoint(path, preset="flash", seed=seed)
        model, tokenizer = load(path)
        a = model.args
        print(
            f"Loaded: {a.num_hidden_layers} layers (compress ratios {a.compress_ratios}), hidden {a.hidden_size}, "
            f"{a.n_routed_experts} experts, vocab {a.vocab_size}." + ("" if trained else f" {RANDOM_NOTE}")
        )
        _decode_speed(model, tokenizer, n_tokens, trained)
        _chat_turn(model, tokenizer, trained)
        _agent_round_trip(model, tokenizer, Path(tmp) / "agent-steps.jsonl", trained)
        ok = _cache_round_trip(model, tokenizer, Path(tmp) / "prompt-cache.safetensors", trained)
    return 0 if ok else 1

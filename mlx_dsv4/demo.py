"""`mlx-dsv4 demo`: the whole path on the small trained V4 shipped with the package.

1. load the trained checkpoint (MLX format, quantised embedding and head);
2. prefill a prompt and decode greedily with the FP8 cache (speed, cache size);
3. a chat turn through the V4 chat encoding and the tokenizer;
4. an agent round trip: the model writes a DSML tool call, which is parsed, validated,
   executed, and the model answers from its result;
5. save the prompt cache to a file, restore it, and check the continuation matches.

With `random=True` (or a directory) a tiny random checkpoint is written in the official layout
and used instead; its text is random, so its agent round trip replays scripted output.
"""

import tempfile
import time
from pathlib import Path

import mlx.core as mx

PROMPT_LEN = 300  # crosses several ratio-4 and two ratio-128 compression windows
RANDOM_NOTE = "(random weights: the text is random)"
TRAINED_NOTE = "(trained tiny model)"
COUNT_PROMPT = "Count from 100 to 130."


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


def _decode_speed(model, n_tokens, tokenizer=None):
    if tokenizer is None:
        prompt = mx.array([[0] + [(97 * i + 13) % 128000 + 100 for i in range(PROMPT_LEN - 1)]])
    else:
        from .chat import encode_messages

        prompt = mx.array([tokenizer.encode(encode_messages([{"role": "user", "content": COUNT_PROMPT}]))])
    tokens, cache, t_prefill, t_decode = greedy_decode(model, prompt, n_tokens)
    n_prompt = prompt.shape[1]
    if tokenizer is None:
        print(f"Greedy continuation ids {RANDOM_NOTE}: {tokens[0].tolist()[:16]} ...")
    else:
        text = tokenizer.decode(tokens[0].tolist()).split(tokenizer.eos_token)[0]
        print(f"Greedy reply to {COUNT_PROMPT!r} {TRAINED_NOTE}: {text!r}")
    print(f"prompt: {n_prompt} tokens in {t_prefill:.3f} s = {n_prompt / t_prefill:.1f} tok/s")
    steps = n_tokens - 1  # the first token comes out of the prefill
    print(f"decode: {steps} cached steps in {t_decode:.3f} s = {steps / max(t_decode, 1e-9):.1f} tok/s")
    print(f"cache: {cache.nbytes} bytes for {cache.offset} tokens "
          f"(kv rows in {cache.kv_dtype}, indexer keys in {cache.index_dtype})")


def _chat_turn(model, tokenizer, note=RANDOM_NOTE):
    from .chat import encode_messages, parse_completion
    from .generate import generate

    question = "Name three rivers in Europe." if note == RANDOM_NOTE else "What is the capital of Norway?"
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question}]
    prompt = encode_messages(messages, thinking_mode="chat")
    result = generate(model, tokenizer, prompt, max_tokens=24)
    reply = parse_completion(result.text, "chat", strict=False)
    print(f"chat turn {note}: {question!r} -> {reply['content'][:80]!r} "
          f"[{result.stats.get('prompt_tokens')} prompt tokens, finish: {result.finish_reason}]")


def _agent_round_trip(model, tokenizer, log_path: Path, scripted: bool = True):
    from .agent import Agent

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first addend
            b: second addend
        """
        return a + b

    script = iter([
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="add">\n'
        '<｜DSML｜parameter name="a" string="false">20</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="b" string="false">22</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>',
        "20 + 22 = 42.<｜end▁of▁sentence｜>",
    ])
    if not scripted:
        with Agent(model, tokenizer, tools=[add], system="You are a helpful assistant.", substrate="function",
                   log_path=log_path, max_steps=2, max_tokens=96) as agent:
            result = agent.run("What is 20 + 22?")
        if not result.tool_calls:
            print(f"agent (the model's own output): no tool call; reply {result.content!r}")
            return
        call = result.tool_calls[0]
        print(f"agent (the model's own output): called {call.name}({call.arguments}) -> "
              f"{call.result.value if call.result.status == 'ok' else call.result.error}; "
              f"final answer {result.content!r}; steps logged to {log_path.name}")
        return
    agent = Agent(model, tokenizer, tools=[add], substrate="function", log_path=log_path,
                  completion_fn=lambda prompt: iter([next(script)]))
    result = agent.run("What is 20 + 22?")
    call = result.tool_calls[0]
    print(f"agent (scripted model output, the tiny model cannot plan): called {call.name}({call.arguments}) "
          f"-> {call.result.value}; final answer {result.content!r}; steps logged to {log_path.name}")


def _cache_round_trip(model, tokenizer, path: Path):
    from .generate import PromptCache, generate, load_prompt_cache, save_prompt_cache

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
          f"the uninterrupted generation")
    return same


def run_demo(directory=None, n_tokens: int = 64, seed: int = 0, random: bool = False) -> int:
    """The walk-through above, printed; 0 when the restored prompt cache continues exactly.
    The trained model by default; a tiny random one (written to `directory`) with `random` or a
    directory."""
    from . import load

    random = random or directory is not None
    with tempfile.TemporaryDirectory() as tmp:
        if random:
            from .tiny import write_tiny_checkpoint

            path = Path(directory) if directory else Path(tmp) / "tiny-v4"
            print(f"Writing a tiny random DeepSeek-V4 checkpoint (official layout) to {path}")
            write_tiny_checkpoint(path, preset="flash", seed=seed)
        else:
            from .train import trained_checkpoint

            path = trained_checkpoint()
            print(f"Loading the trained tiny DeepSeek-V4 checkpoint shipped in the package: {path}")
        model, tokenizer = load(path)
        a = model.args
        note = RANDOM_NOTE if random else TRAINED_NOTE
        print(
            f"Loaded: {a.num_hidden_layers} layers (compress ratios {a.compress_ratios}), hidden {a.hidden_size}, "
            f"{a.n_routed_experts} experts, vocab {a.vocab_size}. {note}"
        )
        _decode_speed(model, n_tokens, None if random else tokenizer)
        _chat_turn(model, tokenizer, note)
        _agent_round_trip(model, tokenizer, Path(tmp) / "agent-steps.jsonl", scripted=random)
        ok = _cache_round_trip(model, tokenizer, Path(tmp) / "prompt-cache.safetensors")
    return 0 if ok else 1

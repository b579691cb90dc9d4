"""Sessions through the server: alternating conversations and a restart keep their prefixes."""


from test_server_support import API_KEY, MODEL, ServerProcess, openai_client


def session_turns(client, opening, replies=3, label="a"):
    """Yield (prompt_tokens, cached_tokens) of each turn of one conversation, one turn per next()."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": opening}]
    for t in range(replies):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        yield reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"turn {t} of {label}: go on."}]


def test_alternating_sessions_and_a_restart_prefill_only_new_text(tmp_path):
    args = ["--served-model-name", MODEL, "--api-key", API_KEY, "--temperature", "0",
            "--prompt-cache-dir", str(tmp_path / "pc")]
    server = ServerProcess(args)
    try:
        client = openai_client(server)
        a = session_turns(client, "An agent reads a long file. " * 40, label="a")
        b = session_turns(client, "A sub-agent checks the tests. " * 45, label="b")
        counts = []
        previous = {}
        for _ in range(3):
            for name, session in (("a", a), ("b", b)):
                prompt, cached = next(session)
                counts.append((name, prompt, cached, prompt - cached))
                if name in previous:
                    # everything of the earlier turn is reused; only the new messages are prefilled
                    assert cached >= previous[name], counts
                    assert prompt - cached <= 40, counts
                previous[name] = prompt
        print("\n(session, prompt tokens, cached, prefilled):", counts)
        stats = server.health()["prompt_cache"]
        assert stats["written"] > 0 and stats["disk_bytes"] > 0
    finally:
        server.stop()

    # a new server process on the same folder: the first request of a known session reuses its prefix
    restarted = ServerProcess(args)
    try:
        client = openai_client(restarted)
        again = session_turns(client, "An agent reads a long file. " * 40, label="a")
        prompt, cached = next(again)
        assert cached == prompt - 1, (prompt, cached)  # all but the last token, whose logits give the sample
        assert restarted.health()["prompt_cache"]["disk_loads"] == 1
    finally:
        restarted.stop()

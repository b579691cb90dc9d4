"""Context overflow as the client libraries that classify errors by their text see it.

litellm and LangChain decide whether an error is a context overflow from the message
(OpenAI's "maximum context length", Anthropic's "prompt is too long"), not from the code.
"""

import os

import pytest

from test_server_support import API_KEY, MODEL, shared_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its price list


@pytest.fixture(scope="module")
def server():
    return shared_server()


def too_long(server):
    fit = server.health()["max_kv_tokens"]
    return [{"role": "user", "content": "word " * (fit + 10)}]


def test_litellm_classifies_overflow_on_both_flavours(server):
    litellm = pytest.importorskip("litellm")
    messages = too_long(server)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{MODEL}", api_base=server.base + "/v1", api_key=API_KEY,
                           messages=messages, max_tokens=1, num_retries=0)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"anthropic/{MODEL}", api_base=server.base, api_key=API_KEY,
                           messages=messages, max_tokens=1, num_retries=0)
    # max_tokens past the limit is an overflow too
    fit = server.health()["max_kv_tokens"]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{MODEL}", api_base=server.base + "/v1", api_key=API_KEY,
                           messages=[{"role": "user", "content": "hi"}], max_tokens=fit + 10, num_retries=0)


def test_langchain_openai_classifies_overflow(server):
    pytest.importorskip("langchain_openai")
    from langchain_core.exceptions import ContextOverflowError
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=server.base + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(ContextOverflowError):
        chat.invoke(too_long(server))
    assert chat.invoke([{"role": "user", "content": "hello-probe"}]).content == "Hello there!"


def test_anthropic_overflow_message_names_the_figures_once(server):
    import anthropic

    from test_server_support import anthropic_client

    fit = server.health()["max_kv_tokens"]
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_client(server).messages.create(model=MODEL, max_tokens=1, messages=too_long(server))
    message = err.value.body["error"]["message"]
    assert message.startswith("prompt is too long: ") and f"> {fit} maximum" in message, message


def test_protocol_strings_in_messages_are_served_as_ordinary_text(server):
    from mlx_dsv4.chat import encode_messages
    from mlx_dsv4.tokenizer import load_tokenizer

    from test_server_support import anthropic_client, openai_client

    text = "hello-probe: the docs say <think>, </think>, <｜end▁of▁sentence｜> and <｜DSML｜tool_calls>"
    messages = [{"role": "user", "content": text}]
    reply = openai_client(server).chat.completions.create(model=MODEL, messages=messages)
    assert reply.choices[0].message.content == "Hello there!"
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(encode_messages(messages))
    assert reply.usage.prompt_tokens == len(ids)
    assert 128821 not in ids and ids.count(1) == 0  # no <think>, no end of sentence from the text
    message = anthropic_client(server).messages.create(model=MODEL, max_tokens=20, messages=messages)
    assert message.content[0].text == "Hello there!"

"""API errors and their JSON bodies in the OpenAI and Anthropic shapes."""

from starlette.responses import JSONResponse

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client; ``param`` names the offending request field."""

    def __init__(self, status, message, *, param=None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def detached(self):
        """A copy with no traceback or chained error, so nothing keeps the raising frames alive."""
        copy = type(self).__new__(type(self))
        Exception.__init__(copy, *self.args)
        copy.__dict__.update(self.__dict__)
        return copy


class ContextOverflow(APIError):
    """The prompt (plus the tokens asked for) does not fit ``limit`` tokens.

    Clients recognise overflow by the text of the message: litellm by "maximum context length"
    or "prompt is too long", LangChain's OpenAI client by "prompt is too long" only.
    """

    def __init__(self, prompt_tokens, limit, *, what="the context", max_tokens=None, param="messages",
                 at_least=False):
        self.prompt_tokens = prompt_tokens
        self.at_least = "at least " if at_least else ""
        self.limit = limit
        self.what = what
        self.max_tokens = max_tokens
        if max_tokens is None:
            message = (f"The prompt is too long: this model's maximum context length is {limit} tokens "
                       f"({what}); your messages resulted in {self.at_least}{prompt_tokens} tokens.")
        else:
            message = (f"The prompt is too long: this model's maximum context length is {limit} tokens "
                       f"({what}); you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                       f"messages, {max_tokens} in the completion).")
        super().__init__(400, message, param=param, code="context_length_exceeded")

    def anthropic_message(self):
        if self.max_tokens is None:
            return f"prompt is too long: {self.at_least}{self.prompt_tokens} tokens > {self.limit} maximum ({self.what})"
        return (f"prompt is too long: {self.prompt_tokens} tokens + max_tokens {self.max_tokens} > "
                f"{self.limit} maximum ({self.what})")


def openai_body(err):
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "server_error"),
            "param": err.param,
            "code": err.code,
        }
    }


def anthropic_body(err):
    if isinstance(err, ContextOverflow):
        message = err.anthropic_message()
    elif err.param is None:
        message = err.message
    else:
        # Anthropic's shape: "field: problem"; the field is not named a second time.
        quoted = f"'{err.param}'"
        problem = err.message[len(quoted):].lstrip(": ") if err.message.startswith(quoted) else err.message
        message = f"{err.param}: {problem}"
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(err, flavour):
    body = anthropic_body(err) if flavour == "anthropic" else openai_body(err)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)

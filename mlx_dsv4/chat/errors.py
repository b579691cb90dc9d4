"""The one exception type of the chat package."""


class ChatFormatError(ValueError):
    """A conversation that cannot be encoded, or a completion that cannot be parsed.

    ``index`` and ``field`` locate the offending message field (encoding);
    ``offset`` is the UTF-8 byte offset into the completion text (parsing).
    """

    def __init__(self, message, *, index=None, field=None, offset=None):
        where = []
        if index is not None:
            where.append(f"message {index}")
        if field is not None:
            where.append(f"field {field!r}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.index = index
        self.field = field
        self.offset = offset

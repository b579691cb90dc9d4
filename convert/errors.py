"""The one exception type the converter raises for bad input or environment."""


class ConvertError(Exception):
    """A conversion problem the user can act on; the message names file, tensor and offset."""

"""The one exception type effc raises for bad input; the CLI turns it into one line + exit 2."""


class EffcError(Exception):
    """A user-facing error: the message is complete and fits on one line."""

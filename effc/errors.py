"""The one exception type effc raises for bad input; the CLI turns it into one line + exit 2."""


class EffcError(Exception):
    """A user-facing error: the message is complete and fits on one line."""


class EffcFault(Exception):
    """effc's own fault, found and explained (a compiled module that disagrees with ONNX Runtime):
    the CLI prints the one-line message and exits 1."""

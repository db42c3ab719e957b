"""Errors the CLI turns into one-line messages instead of tracebacks."""


class BenchError(Exception):
    """A problem caused by the user's input or environment (bad value, missing file, no GPU).

    The CLI prints ``str(error)`` on one line and exits with code 2; the message must name the bad
    value and say what is allowed or what to do.
    """

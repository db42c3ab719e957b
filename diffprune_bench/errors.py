"""Errors the CLI turns into one-line messages instead of tracebacks."""


class BenchError(Exception):
    """A problem caused by the user's input or environment (bad value, missing file, no GPU).

    The CLI prints ``str(error)`` on one line and exits with code 2; the message must name the bad
    value and say what is allowed or what to do.
    """


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""The one exception type lmopt raises for bad input; the CLI prints its message as one line."""


class LmoptError(Exception):
    """A user-facing error: bad input, unsupported model, missing runtime. Printed without traceback."""


def one_line(message: object, fallback: str = "") -> str:
    """The first non-empty line of a message (an exception's text is often a page), whitespace
    collapsed; `fallback` when there is none."""
    for line in str(message).splitlines():
        if line.strip():
            return " ".join(line.split())
    return fallback

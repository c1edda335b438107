"""The one exception type lmopt raises for bad input; the CLI prints its message as one line."""


class LmoptError(Exception):
    """A user-facing error: bad input, unsupported model, missing runtime. Printed without traceback."""

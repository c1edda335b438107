"""`lmopt` command line: one module per tool (polygraphy's layout), each with add_parser() and run()."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from ..errors import LmoptError, one_line

# Each tool module defines add_parser(subparsers) -> parser and run(args) -> int exit code.
TOOLS = ["inspect", "merge", "profile", "optimize", "build"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (not argparse's usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(
        prog="lmopt",
        description="Latency-aware depth compression for ONNX models (LayerMerge).",
    )
    parser.add_argument("--version", action="version", version=f"lmopt {__version__}")
    subparsers = parser.add_subparsers(dest="tool", metavar="TOOL", parser_class=OneLineParser)
    subparsers.required = True
    for name in TOOLS:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


@contextlib.contextmanager
def show_messages(quiet: bool) -> Iterator[None]:
    """For one command, lmopt's messages (the "lmopt" logger) go to stdout beside the report, warnings
    and errors to stderr; with the report as JSON on stdout, only the warnings. The logger is left as
    it was afterwards (a caller's streams may be gone by then, as in tests)."""
    logger = logging.getLogger("lmopt")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    for handler in (info, warnings):
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [warnings] if quiet else [info, warnings]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def quiet_onnxruntime() -> None:
    """ONNX Runtime logs warnings (graph optimizer notes) to stderr by default: errors only."""
    from ..runtime import set_ort_log_severity

    set_ort_log_severity(3)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        quiet_onnxruntime()
        with show_messages(quiet=getattr(args, "json", None) in ("-", True)):
            return int(args.run(args) or 0)
    except LmoptError as exc:
        print(f"lmopt {args.tool}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C while the interpreter shuts down (threads, atexit) would print
        # "Exception ignored ... KeyboardInterrupt": from here on, Ctrl-C is ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"lmopt {args.tool}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmopt inspect ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("LMOPT_DEBUG"):
            raise
        print(f"lmopt {args.tool}: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(LMOPT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

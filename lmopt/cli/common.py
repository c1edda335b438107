"""Arguments and steps shared by the CLI tools."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

from ..errors import LmoptError
from ..loader import canonicalise, parse_input_shapes
from ..onnxio import check_writable


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to an ONNX model (external data is loaded too)")
    parser.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                        help="fix a dynamic input shape, e.g. input:1,3,224,224 (repeat for each input)")


def check_output(model: str, output: str | Path, flag: str = "-o") -> Path:
    """Refuse to overwrite the input model; check that `output` can be written (before any work)."""
    if Path(output).resolve() == Path(model).resolve():
        raise LmoptError(f"{flag} would overwrite the input model: choose another path")
    return check_writable(output, flag)


def load_canonical(args: argparse.Namespace) -> tuple[onnx.ModelProto, dict]:
    return canonicalise(args.model, parse_input_shapes(args.input_shape))


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")

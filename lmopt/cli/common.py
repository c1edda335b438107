"""Arguments and steps shared by the CLI tools."""
from __future__ import annotations

import argparse
import json
import sys

from ..loader import canonicalise, parse_input_shapes


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to an ONNX model (external data is loaded too)")
    parser.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                        help="fix a dynamic input shape, e.g. input:1,3,224,224 (repeat for each input)")


def load_canonical(args):
    return canonicalise(args.model, parse_input_shapes(args.input_shape))


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")

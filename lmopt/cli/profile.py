"""`lmopt profile`: time every candidate block on this machine and write a latency table."""
from __future__ import annotations

from ..latency.cache import LatencyCache
from ..latency.profiler import write_table
from ..loader import parse_input_shapes
from .common import add_model_arguments, check_output
from .optimize import add_backend_arguments, backend_options


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "profile", help="time every candidate block on this device (e.g. a Jetson) and write a latency table")
    add_model_arguments(parser)
    add_backend_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="latency table to write (JSON)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def run(args) -> int:
    from ..prepare import prepare
    from ..profile import profile_table

    check_output(args.model, args.output)
    if not args.no_cache:
        LatencyCache().close()  # creates, checks (and repairs) the cache before any work
    prepared = prepare(args.model, parse_input_shapes(args.input_shape), args.max_kernel)
    table = profile_table(prepared, args.backend, cache_path=False if args.no_cache else None,
                          progress=not args.quiet, **backend_options(args))
    write_table(args.output, table)
    print(f"{len(table['blocks'])} blocks timed on {table['backend']['backend']} ({table['backend'].get('device')}); "
          f"whole model {table['model_ms']:.3f} ms; wrote {args.output}")
    print(f"plan anywhere with: lmopt optimize {args.model} --target 2x --latency-table {args.output}")
    return 0

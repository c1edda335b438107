"""Write the zoo models as ONNX files.

    python models/build.py [NAME ...] [--out DIR] [--image-size N] [--force] [--seed S]

Default: every model in models.zoo.NAMES, written to this folder as <name>.onnx (git-ignored).
Existing files are kept unless --force. One line per model: name, path, parameters, size, time.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: import from the repository root, not from models/
    _HERE = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

from lmopt.onnxio import save_model  # noqa: E402
from models.zoo import NAMES, build, check_arguments, count_params  # noqa: E402

MODELS_DIR = pathlib.Path(__file__).resolve().parent


def model_path(name: str, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    return pathlib.Path(out_dir if out_dir is not None else MODELS_DIR) / f"{name}.onnx"


def write_model(name: str, out_dir: str | pathlib.Path | None = None, *, image_size: int | None = None,
                seed: int = 0, force: bool = False) -> tuple[pathlib.Path, dict | None]:
    """Build `name` and save it atomically; returns (path, stats) with stats None when the file was kept."""
    check_arguments(name, image_size=image_size)
    path = model_path(name, out_dir)
    if path.is_file() and not force:
        return path, None
    start = time.perf_counter()
    model = build(name, image_size=image_size, seed=seed)
    params = count_params(model)
    save_model(model, path)
    seconds = time.perf_counter() - start
    return path, {"params": params, "mb": path.stat().st_size / 1e6, "seconds": seconds}


def ensure_model(name: str, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Path of <out_dir>/<name>.onnx (default: the models/ folder), built at the default size if missing."""
    path, _ = write_model(name, out_dir)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="models/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to build (default: all of {', '.join(NAMES)})")
    parser.add_argument("--out", type=pathlib.Path, default=MODELS_DIR, help="output folder (default: models/)")
    parser.add_argument("--image-size", type=int, default=None, help="input height and width (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        print(f"models/build.py: unknown model {', '.join(map(repr, unknown))}; known: {', '.join(NAMES)}",
              file=sys.stderr)
        return 2
    for name in args.names or NAMES:
        try:
            path, stats = write_model(name, args.out, image_size=args.image_size, seed=args.seed, force=args.force)
        except ValueError as exc:  # e.g. an image size too small
            print(f"models/build.py: {exc}", file=sys.stderr)
            return 2
        if stats is None:
            print(f"{name:16s} {path}  exists, kept (--force rebuilds)", flush=True)
        else:
            print(f"{name:16s} {path}  {stats['params'] / 1e6:7.2f}M params  {stats['mb']:7.1f} MB  "
                  f"{stats['seconds']:6.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

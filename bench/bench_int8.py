"""INT8 alone, with 8-bit and with 7-bit (reduce_range) weights, on the study data of bench_accuracy.

    python bench/bench_int8.py --models efficientnet_lite0 efficientnet_lite1 --fold 0 --calib-count 512

Both are quantized as `lmopt` quantizes (lmopt.quantize, the fitting half of the calibration data),
then measured interleaved with the fp32 original in one process and compared with it on the
evaluation images. No candidate is scored, so this takes a minute where a Study takes twenty.
lmopt itself picks 7 bits on an x86 CPU without VNNI and 8 bits elsewhere (quantize.settings);
both are asked for here through LMOPT_INT8_WEIGHT_BITS, as a user can.
"""
from __future__ import annotations

import argparse
import os
import sys

from bench_accuracy import add_run_arguments, markdown, model_and_data, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, ["efficientnet_lite0"], [], 0, "int8")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import lmopt.quantize as quantize
    from lmopt.calib import study_data
    from lmopt.latency.base import get_backend
    from lmopt.metrics import compare
    from lmopt.prepare import prepare
    from lmopt.runtime import run_outputs

    print(f"this CPU lacks VNNI: {quantize.cpu_lacks_vnni()}", file=sys.stderr)
    runner = get_backend("ort-cpu", threads=args.threads)
    rows = []
    for name in args.models:
        model_path, calib_path, eval_path = model_and_data(name, args)
        model = prepare(str(model_path)).model
        data = study_data(model, str(calib_path), args.calib_count, args.eval_count, None, str(eval_path))
        reference = run_outputs(model, data.eval)
        for bits in ("8", "7"):
            os.environ[quantize.WEIGHT_BITS_VARIABLE] = bits  # what quantize.settings() reads
            quantized = quantize.quantize_int8(model, data.fit)
            fp32_ms, int8_ms = runner.measure_interleaved([model, quantized])
            rows.append(row(name, f"int8 PTQ, {bits}-bit weights", None,
                            compare(reference, run_outputs(quantized, data.eval)), fp32_ms / int8_ms))
            print(markdown(rows[-1:]), flush=True)
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()

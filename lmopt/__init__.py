"""lmopt: latency-aware depth compression (LayerMerge) for exported ONNX models."""
__version__ = "0.1.0"

from .errors import LmoptError  # noqa: E402


def optimize(model, target: float = 2.0, **options):  # -> (onnx.ModelProto, lmopt.verify.Report)
    """Compress `model` (path or onnx.ModelProto) to run about `target` times faster.

    Returns (optimized onnx.ModelProto, lmopt.verify.Report). See lmopt.optimizer.optimize for options.
    """
    from .optimizer import optimize as _optimize

    return _optimize(model, target=target, **options)


__all__ = ["LmoptError", "optimize", "__version__"]

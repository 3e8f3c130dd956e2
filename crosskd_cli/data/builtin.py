"""The built-in data set: seeded, generated once into a cache folder, in COCO format.

`builtin:shapes` is a real, small detection problem rather than a toy: ten classes that need
both shape and colour to tell apart (each shape comes in two colours, each colour in two
shapes), objects from 8 px to half the image, 2-10 per image, partial occlusion, textured noisy
backgrounds and unlabelled distractors (other shapes, and class shapes in other colours).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crosskd_cli.errors import DataError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 50, 200),
}
DISTRACTOR_COLOURS = [(250, 140, 20), (30, 200, 210), (150, 150, 150), (240, 240, 240)]
# (shape, colour) -> class; category ids are deliberately not contiguous, as COCO's are not.
CLASSES = [
    ("circle", "red"), ("circle", "blue"), ("square", "green"), ("square", "red"),
    ("triangle", "blue"), ("triangle", "yellow"), ("cross", "yellow"), ("cross", "purple"),
    ("diamond", "purple"), ("diamond", "green"),
]  # fmt: skip
CATEGORY_IDS = [1, 2, 3, 5, 7, 8, 11, 13, 17, 19]
DISTRACTOR_SHAPES = ("hexagon", "ring", "bar")
COLOUR_JITTER = 22  # per channel; class colours stay well apart from each other
MANIFEST = "manifest.json"
OCCLUSION = 0.45  # at most this fraction of a labelled box is hidden, so it stays recognisable


@dataclass(frozen=True)
class ShapesParams:
    """Knobs of `builtin:shapes`, settable as builtin:shapes:seed=3,images=2000."""

    seed: int = 0  # everything follows from it
    images: int = 800  # training images
    val: int = 200  # validation images
    size: int = 160  # image width in px; heights are 3/4 or 4/4 of it
    difficulty: int = 1  # 0 easy, 1 normal, 2 hard: clutter, occlusion and noise

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return f"shapes-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def parse_params(text: str) -> ShapesParams:
    """'seed=3,images=2000' -> ShapesParams, naming any unknown or ill-typed knob."""
    valid = {f.name for f in fields(ShapesParams)}
    values: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in valid:
            raise DataError(
                f"builtin:shapes has no parameter '{key or item}'.",
                hint=f"Valid: {', '.join(sorted(valid))}, e.g. builtin:shapes:seed=3,images=2000",
            )
        try:
            values[key] = int(value)
        except ValueError:
            raise DataError(
                f"builtin:shapes parameter {key}='{value}' is not an integer.",
                hint=f"Example: builtin:shapes:{key}=3",
            ) from None
    params = ShapesParams(**values)
    limits = {"images": 1, "val": 1, "size": 64}
    for name, low in limits.items():
        if getattr(params, name) < low:
            raise DataError(f"builtin:shapes {name}={getattr(params, name)} is below {low}.")
    if params.difficulty not in (0, 1, 2):
        raise DataError(f"builtin:shapes difficulty={params.difficulty} must be 0, 1 or 2.")
    return params


def cache_root() -> Path:
    """$CROSSKD_CACHE, else $XDG_CACHE_HOME/crosskd, else ~/.cache/crosskd."""
    if os.environ.get("CROSSKD_CACHE"):
        return Path(os.environ["CROSSKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crosskd"


def builtin_cache_dir() -> Path:
    return cache_root() / "builtin"


def ensure_shapes(params: ShapesParams, progress: Callable[[int, int], None] | None = None) -> Path:
    """The data set's folder, generated on first use and regenerated when damaged."""
    root = builtin_cache_dir() / params.key()
    if _is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _generate(tmp, params, progress)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _is_complete(root: Path, params: ShapesParams) -> bool:
    """The manifest is written last: it must exist and match the files now on disk."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest["params"] != asdict(params):
            return False
        for split, expected in manifest["files"].items():
            ann = root / "annotations" / f"instances_{split}2017.json"
            if hashlib.sha256(ann.read_bytes()).hexdigest() != expected["sha256"]:
                return False
            if len(os.listdir(root / f"{split}2017")) != expected["images"]:
                return False
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False


def _generate(root: Path, params: ShapesParams, progress) -> None:
    (root / "annotations").mkdir(parents=True)
    total = params.images + params.val
    done = 0
    files = {}
    for split, count, offset in (("train", params.images, 0), ("val", params.val, 1)):
        folder = root / f"{split}2017"
        folder.mkdir()
        rng = np.random.default_rng([params.seed, offset])
        images, annotations = [], []
        for k in range(count):
            image_id = k + 1
            picture, boxes = _draw_image(rng, params)
            name = f"{image_id:06d}.jpg"
            picture.save(folder / name, quality=92)
            images.append(
                {
                    "id": image_id,
                    "file_name": name,
                    "width": picture.width,
                    "height": picture.height,
                }
            )
            for label, (x0, y0, x1, y1) in boxes:
                w, h = round(x1 - x0, 2), round(y1 - y0, 2)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORY_IDS[label],
                        "bbox": [round(x0, 2), round(y0, 2), w, h],
                        "area": round(w * h, 2),
                        "iscrowd": 0,
                    }
                )
            done += 1
            if progress is not None:
                progress(done, total)
        categories = [
            {"id": cid, "name": f"{colour}_{shape}", "supercategory": shape}
            for cid, (shape, colour) in zip(CATEGORY_IDS, CLASSES, strict=True)
        ]
        payload = json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}
        ).encode()
        (root / "annotations" / f"instances_{split}2017.json").write_bytes(payload)
        files[split] = {"sha256": hashlib.sha256(payload).hexdigest(), "images": count}
    manifest = {"params": asdict(params), "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


# ----------------------------------------------------------------------------- drawing


def _draw_image(rng: np.random.Generator, p: ShapesParams):
    width = p.size
    height = p.size if rng.random() < 0.5 else p.size * 3 // 4
    canvas = _background(rng, width, height, p.difficulty)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 3 + 2 * p.difficulty)):  # unlabelled clutter first
        _draw_distractor(draw, rng, width, height)
    count = int(rng.integers(2, 6 + 2 * p.difficulty + 1))
    placed: list[tuple[int, tuple[float, float, float, float]]] = []
    for _ in range(count * 4):  # a few tries per object to respect the occlusion limit
        if len(placed) == count:
            break
        label = int(rng.integers(len(CLASSES)))
        box = _sample_box(rng, width, height)
        if any(max(_covered(box, o), _covered(o, box)) > OCCLUSION for _, o in placed):
            continue
        shape, colour = CLASSES[label]
        _draw_shape(draw, shape, box, _jitter(rng, COLOURS[colour]))
        placed.append((label, box))
    if rng.random() < 0.5 * p.difficulty:  # a distractor may partly cover objects
        _draw_distractor(draw, rng, width, height, avoid=[box for _, box in placed])
    if p.difficulty:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.6))))
    noisy = np.asarray(canvas, dtype=np.float32)
    noisy += rng.normal(0, 4 + 4 * p.difficulty, noisy.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), placed


def _background(rng: np.random.Generator, width: int, height: int, difficulty: int) -> Image.Image:
    """A dim gradient with blotches and faint lines: texture the detector must ignore."""
    c0, c1 = rng.uniform(20, 120, 3), rng.uniform(20, 120, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    pixels = c0 + (c1 - c0) * t[..., None]
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8 + 6 * difficulty))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(4, width / 4)
        tone = tuple(int(v) for v in rng.uniform(20, 140, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tone)
    for _ in range(int(rng.integers(2, 6 + 4 * difficulty))):
        pts = rng.uniform(0, 1, 4) * [width, height, width, height]
        tone = tuple(int(v) for v in rng.uniform(40, 170, 3))
        draw.line(list(pts), fill=tone, width=int(rng.integers(1, 3)))
    return image.filter(ImageFilter.GaussianBlur(radius=1.5))


def _sample_box(rng, width: int, height: int) -> tuple[float, float, float, float]:
    """Side log-uniform from 8 px to half the image, aspect 0.6-1.6, inside the image."""
    side = math.exp(rng.uniform(math.log(8), math.log(min(width, height) / 2)))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    w, h = min(side * math.sqrt(aspect), width - 1), min(side / math.sqrt(aspect), height - 1)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (x0, y0, x0 + w, y0 + h)


def _covered(box, other) -> float:
    """Fraction of `box` hidden under `other`."""
    ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    return ix * iy / ((box[2] - box[0]) * (box[3] - box[1]))


def _jitter(rng, colour) -> tuple[int, int, int]:
    return tuple(
        int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in colour
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        tw, th = w / 3, h / 3
        draw.rectangle([x0, cy - th / 2, x1, cy + th / 2], fill=fill)
        draw.rectangle([cx - tw / 2, y0, cx + tw / 2, y1], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, min(w, h) / 2), 6, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(min(w, h) / 6)))
    else:  # bar
        draw.rectangle([x0, cy - h / 8, x1, cy + h / 8], fill=fill)


def _draw_distractor(draw, rng, width: int, height: int, avoid=()) -> None:
    """An unlabelled object: a shape outside the class list, or a class shape in a foreign
    colour, so neither shape nor colour alone identifies a class. It never hides more than the
    occlusion limit of a labelled box in `avoid`."""
    for _ in range(5):
        box = _sample_box(rng, width, height)
        if all(_covered(other, box) <= OCCLUSION for other in avoid):
            break
    else:
        return
    colour = DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]
    if rng.random() < 0.5:
        shape = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
        colour = _jitter(rng, list(COLOURS.values())[int(rng.integers(len(COLOURS)))])
    else:
        shape = CLASSES[int(rng.integers(len(CLASSES)))][0]
    _draw_shape(draw, shape, box, _jitter(rng, colour))

"""The built-in data set `builtin:shapes`: seeded, generated once into a cache, in COCO format.

A small but real detection problem rather than a toy: ten classes that need shape AND colour to
tell apart (each shape comes in two class colours, each colour in two class shapes, and the
other shape/colour pairs appear unlabelled), objects from 8 px to half the image, 2-12 per
image, partial occlusion, textured noisy backgrounds and unlabelled distractors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crosskd_cli.config.safe_read import load_json
from crosskd_cli.errors import DataError

GENERATOR_VERSION = 2  # part of the cache key: bump whenever the pictures or the json change
MANIFEST = "manifest.json"  # written last: a folder without a matching one is incomplete
OCCLUSION = 0.45  # at most this fraction of a labelled box is hidden, so it stays recognisable
COLOUR_JITTER = 22  # per channel; class colours stay well apart from each other

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 50, 200),
}
# (shape, colour) of each class, in category id order; the ids are deliberately not
# contiguous, as COCO's are not, so the label <-> category id mapping is always exercised.
CLASSES = [
    ("circle", "red"), ("circle", "blue"), ("square", "green"), ("square", "red"),
    ("triangle", "blue"), ("triangle", "yellow"), ("cross", "yellow"), ("cross", "purple"),
    ("diamond", "purple"), ("diamond", "green"),
]  # fmt: skip
CATEGORY_IDS = [1, 2, 3, 5, 7, 8, 11, 13, 17, 19]
CLASS_NAMES = [f"{colour}_{shape}" for shape, colour in CLASSES]
# Unlabelled look-alikes: the shape/colour pairs of the class grid that are not classes, so that
# neither the shape nor the colour alone names a class.
LOOKALIKES = [
    (shape, colour)
    for shape in dict.fromkeys(s for s, _ in CLASSES)
    for colour in COLOURS
    if (shape, colour) not in CLASSES
]
FOREIGN_SHAPES = ("hexagon", "ring", "bar", "star")  # never labelled, drawn in class colours
FOREIGN_COLOURS = [(250, 140, 20), (30, 200, 210), (150, 150, 150), (240, 240, 240)]
DIFFICULTIES = {"easy": 0, "normal": 1, "hard": 2}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class ShapesParams:
    """Knobs of `builtin:shapes`, set as builtin:shapes:seed=3,images=2000,difficulty=hard."""

    seed: int = 0  # everything follows from it
    images: int = 800  # training images
    val: int = 200  # validation images
    size: int = 160  # longer image side in px; each image is square, 4:3 or 3:4
    difficulty: int = 1  # 0 easy, 1 normal, 2 hard (or the names): clutter, occlusion, noise

    def key(self) -> str:
        """The cache subfolder: every parameter and the generator version, readable."""
        knobs = "-".join(f"{name}{value}" for name, value in asdict(self).items())
        return f"shapes-v{GENERATOR_VERSION}-{knobs}"


# A spec also arrives from a checkpoint's metadata (`crosskd eval FILE` generates what it
# names), so the limits keep the work a spec can ask for bounded: 200k images of 2048 px is
# already hours of generation; the drawing needs 64 px to place 8 px objects.
LIMITS = {"seed": (0, 2**32 - 1), "images": (1, 200_000), "val": (1, 200_000), "size": (64, 2048)}
LIMITS["difficulty"] = (0, 2)


def parse_params(text: str) -> ShapesParams:
    """'seed=3,images=2000' -> ShapesParams, naming any unknown, repeated or ill-typed knob."""
    valid = ", ".join(f"{f.name}={f.default}" for f in fields(ShapesParams))
    hint = f"Valid parameters (with defaults): {valid}. Example: builtin:shapes:seed=3,images=2000"
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if key not in LIMITS:
            raise DataError(f"builtin:shapes has no parameter '{key}'.", hint=hint)
        if not sep or not raw:
            raise DataError(f"builtin:shapes parameter '{key}' has no value.", hint=hint)
        if key in values:
            raise DataError(f"builtin:shapes parameter '{key}' is given twice.", hint=hint)
        values[key] = _parse_value(key, raw)
    return ShapesParams(**values)


def _parse_value(key: str, raw: str) -> int:
    if key == "difficulty" and raw in DIFFICULTIES:
        return DIFFICULTIES[raw]
    try:
        value = int(raw)
    except ValueError:
        names = " (or easy, normal, hard)" if key == "difficulty" else ""
        raise DataError(
            f"builtin:shapes parameter {key}='{raw}' is not an integer{names}.",
            hint=f"Example: builtin:shapes:{key}={getattr(ShapesParams, key)}",
        ) from None
    low, high = LIMITS[key]
    if not low <= value <= high:
        raise DataError(
            f"builtin:shapes parameter {key}={value} is out of range {low}..{high}.",
            hint=f"Example: builtin:shapes:{key}={getattr(ShapesParams, key)}",
        )
    return value


# ----------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """$CROSSKD_CACHE, else $XDG_CACHE_HOME/crosskd, else ~/.cache/crosskd."""
    if os.environ.get("CROSSKD_CACHE"):
        return Path(os.environ["CROSSKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "crosskd"


def builtin_cache_dir() -> Path:
    """The folder that holds every generated built-in data set."""
    return cache_root() / "builtin"


def ensure_shapes(
    params: ShapesParams,
    *,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The data set's COCO-layout folder, generated on first use and regenerated when damaged.

    It is generated into a temporary sibling folder and renamed into place when complete, so an
    interrupted run never leaves a folder that looks finished. `progress(done, total)` is called
    after each image; nothing is printed.
    """
    root = Path(cache_dir or builtin_cache_dir()) / params.key()
    if _is_complete(root, params):
        return root
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        _generate(tmp, params, progress)
        _install(tmp, root, params)
    except OSError as exc:  # unwritable cache, full disk
        raise DataError(
            f"Cannot write the built-in data set to {root.parent} ({exc.strerror or exc}).",
            hint="Set CROSSKD_CACHE to a writable folder with a few MB free.",
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _install(tmp: Path, root: Path, params: ShapesParams) -> None:
    """Rename the finished folder into place; another process (a DDP rank) may have won."""
    if _is_complete(root, params):
        return
    if root.exists():  # damaged: move it aside first, since a rename cannot replace a folder
        stale = root.with_name(f".{root.name}-stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root, params):
            raise


def _is_complete(root: Path, params: ShapesParams) -> bool:
    """The manifest must exist, match the parameters and match the files now on disk."""
    try:
        manifest = load_json((root / MANIFEST).read_text())
        if manifest["version"] != GENERATOR_VERSION or manifest["params"] != asdict(params):
            return False
        splits = manifest["splits"]
        return set(splits) == {"train", "val"} and all(
            _split_matches(root, split, expected) for split, expected in splits.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _split_matches(root: Path, split: str, expected: dict) -> bool:
    """Checksum of the json; count and total bytes of the images (a cheap stat per file)."""
    ann = (root / "annotations" / f"instances_{split}2017.json").read_bytes()
    if hashlib.sha256(ann).hexdigest() != expected["annotations_sha256"]:
        return False
    with os.scandir(root / f"{split}2017") as entries:
        sizes = [entry.stat().st_size for entry in entries]
    return len(sizes) == expected["images"] and sum(sizes) == expected["image_bytes"]


def _generate(root: Path, params: ShapesParams, progress) -> None:
    (root / "annotations").mkdir()
    counts = {"train": params.images, "val": params.val}
    total, done, splits = sum(counts.values()), 0, {}
    for split_index, (split, count) in enumerate(counts.items()):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations = [], []
        for k in range(count):
            # One generator per image: image k is the same whatever the other counts are.
            rng = np.random.default_rng([params.seed, split_index, k])
            picture, objects = draw_image(rng, params)
            name = f"{k + 1:06d}.jpg"
            picture.save(folder / name, quality=92)
            images.append(
                {"id": k + 1, "file_name": name, "width": picture.width, "height": picture.height}
            )
            annotations += coco_records(k + 1, objects, len(annotations) + 1, CATEGORY_IDS)
            done += 1
            if progress is not None:
                progress(done, total)
        splits[split] = _write_split(root, split, images, annotations)
    manifest = {"version": GENERATOR_VERSION, "params": asdict(params), "splits": splits}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


def coco_records(
    image_id: int, objects: list[tuple[int, Box]], first_id: int, category_ids: Sequence[int]
) -> list[dict]:
    """COCO records of (class index, xyxy box) objects: full boxes in xywh (occlusion is capped,
    see OCCLUSION), `category_ids[class index]` as the category."""
    records = []
    for k, (label, (x0, y0, x1, y1)) in enumerate(objects):
        w, h = round(x1 - x0, 2), round(y1 - y0, 2)
        records.append(
            {
                "id": first_id + k,
                "image_id": image_id,
                "category_id": category_ids[label],
                "bbox": [round(x0, 2), round(y0, 2), w, h],
                "area": round(w * h, 2),
                "iscrowd": 0,
            }
        )
    return records


def _write_split(root: Path, split: str, images: list[dict], annotations: list[dict]) -> dict:
    categories = [
        {"id": cid, "name": name, "supercategory": shape}
        for cid, name, (shape, _) in zip(CATEGORY_IDS, CLASS_NAMES, CLASSES, strict=True)
    ]
    payload = json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}
    ).encode()
    (root / "annotations" / f"instances_{split}2017.json").write_bytes(payload)
    image_bytes = sum((root / f"{split}2017" / i["file_name"]).stat().st_size for i in images)
    return {
        "annotations_sha256": hashlib.sha256(payload).hexdigest(),
        "images": len(images),
        "image_bytes": image_bytes,
    }


# ----------------------------------------------------------------------------- drawing


def draw_image(rng: np.random.Generator, params: ShapesParams):
    """One picture and its labelled objects [(label, box)], all drawn from `rng`."""
    level = params.difficulty
    width, height = _image_size(rng, params.size)
    canvas = background(rng, width, height, level)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(level, 2 + 2 * level))):  # unlabelled clutter underneath
        _draw_distractor(draw, rng, sample_box(rng, width, height))
    visibility = _Visibility(height, width)
    objects = _place_objects(draw, rng, visibility, width, height, level)
    if rng.random() < 0.35 * level:  # and sometimes on top, partly covering objects
        box = sample_box(rng, width, height)
        if visibility.place(box, labelled=False):
            _draw_distractor(draw, rng, box)
    if level:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.6))))
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0, 3 + 4 * level, pixels.shape)  # sensor noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), objects


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height): square, landscape 4:3 or portrait 3:4."""
    short = size * 3 // 4
    return [(size, size), (size, short), (short, size)][int(rng.integers(3))]


def _place_objects(draw, rng, visibility, width: int, height: int, level: int):
    count = int(rng.integers(2, 7 + 3 * level))  # easy 2-6, normal 2-9, hard 2-12
    objects: list[tuple[int, Box]] = []
    for _ in range(count * 4):  # a few tries per object to respect the occlusion cap
        if len(objects) == count:
            break
        box = sample_box(rng, width, height)
        if not visibility.place(box, labelled=True):
            continue
        label = int(rng.integers(len(CLASSES)))
        shape, colour = CLASSES[label]
        draw_shape(draw, shape, box, jitter(rng, COLOURS[colour]))
        objects.append((label, box))
    return objects


class _Visibility:
    """Which labelled object is on top at each pixel (its box standing in for its shape), so
    nothing drawn later hides more than OCCLUSION of any object, however many overlap it."""

    def __init__(self, height: int, width: int) -> None:
        self.top = np.full((height, width), -1, dtype=np.int32)
        self.full = np.zeros(0)  # pixel area of each labelled box
        self.visible = np.zeros(0)  # how much of it is still on top

    def place(self, box: Box, labelled: bool) -> bool:
        """Claim the box's pixels unless an earlier object would lose too much; say which."""
        x0, y0 = int(box[0]), int(box[1])
        x1, y1 = math.ceil(box[2]), math.ceil(box[3])
        region = self.top[y0:y1, x0:x1]
        hidden = np.bincount(region.ravel() + 1, minlength=len(self.full) + 1)[1:]
        left = self.visible - hidden
        if (left < (1 - OCCLUSION) * self.full).any():
            return False
        region[...] = len(self.full) if labelled else -1
        self.visible = left
        if labelled:
            self.full = np.append(self.full, region.size)
            self.visible = np.append(self.visible, region.size)
        return True


def background(rng: np.random.Generator, width: int, height: int, level: int) -> Image.Image:
    """A dim gradient with coarse texture, blotches and lines the detector must ignore."""
    c0, c1 = rng.uniform(20, 120, 3), rng.uniform(20, 120, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    pixels = c0 + (c1 - c0) * t[..., None]
    coarse = rng.normal(128, 10 + 5 * level, (height // 10 + 2, width // 10 + 2, 3))
    texture = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels += np.asarray(texture, dtype=np.float32) - 128
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 6 + 5 * level))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, width / 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_tone(rng, 20, 140))
    for _ in range(int(rng.integers(2, 5 + 4 * level))):
        ends = list(rng.uniform(0, 1, 4) * [width, height, width, height])
        draw.line(ends, fill=_tone(rng, 40, 170), width=int(rng.integers(1, 3)))
    return image.filter(ImageFilter.GaussianBlur(radius=1.5))


def sample_box(rng: np.random.Generator, width: int, height: int) -> Box:
    """Side log-uniform from 8 px to half the image, aspect 0.6-1.6, inside the image."""
    side = math.exp(rng.uniform(math.log(8), math.log(min(width, height) / 2)))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
    w, h = min(w, width - 1), min(h, height - 1)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (x0, y0, x0 + w, y0 + h)


def _tone(rng: np.random.Generator, low: float, high: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.uniform(low, high, 3))


def jitter(rng: np.random.Generator, colour) -> tuple[int, int, int]:
    shifted = np.asarray(colour) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    return tuple(int(v) for v in shifted.clip(0, 255))


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box) -> None:
    """An unlabelled object: a foreign shape in a class colour, a class shape in a foreign
    colour, or a class shape in a class colour that is not its class (a look-alike)."""
    kind = int(rng.integers(3))
    if kind == 0:
        shape = FOREIGN_SHAPES[int(rng.integers(len(FOREIGN_SHAPES)))]
        colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
    elif kind == 1:
        shape = CLASSES[int(rng.integers(len(CLASSES)))][0]
        colour = FOREIGN_COLOURS[int(rng.integers(len(FOREIGN_COLOURS)))]
    else:
        shape, name = LOOKALIKES[int(rng.integers(len(LOOKALIKES)))]
        colour = COLOURS[name]
    draw_shape(draw, shape, box, jitter(rng, colour))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill) -> None:
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
        draw.rectangle([x0, cy - h / 6, x1, cy + h / 6], fill=fill)
        draw.rectangle([cx - w / 6, y0, cx + w / 6, y1], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, min(w, h) / 2), 6, fill=fill)
    elif shape == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)  # alternate outer and inner points
        xs, ys = cx + w * radii * np.cos(angles), cy + h * radii * np.sin(angles)
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(min(w, h) / 6)))
    else:  # bar
        draw.rectangle([x0, cy - h / 8, x1, cy + h / 8], fill=fill)

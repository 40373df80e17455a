"""Procedurally drawn, captioned pictures of coloured shapes: the training data of the built-in model.

Everything is a pure function of a seed. A `Scene` is the attribute record of one picture (what
the evaluation scores against); `render` draws it, `caption` describes it in one of several
phrasings. Some (colour, shape) pairs are held out of training so the evaluation can ask for
combinations the model never saw as a whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from skimage import measure

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (135, 45, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Side of the shape's bounding box as a fraction of the picture side.
SIZES: dict[str, float] = {"small": 0.26, "large": 0.44}
# Centre of the shape as fractions (x, y) of the picture, and how captions say it.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "top left": ("in the top left corner", "at the top left"),
    "top right": ("in the top right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
# Never drawn in training; the evaluation asks for them.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square"),
    ("orange", "triangle"), ("purple", "circle"), ("white", "star"), ("black", "square"),
})

SUPERSAMPLE = 4  # drawn this many times larger, then box-filtered down: antialiased edges
JITTER_POSITION = 0.03
JITTER_SCALE = 0.08


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str
    # Small random offsets (fractions of the picture) and scale, so no two pictures are identical.
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[ShapeSpec, ...]


def _far_apart(a: str, b: str) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return max(abs(ax - bx), abs(ay - by)) >= 0.5


def sample_scene(rng: random.Random, *, two_shape_fraction: float = 0.1,
                 held_out: frozenset = HELD_OUT, only_held_out: bool = False) -> Scene:
    """One random scene. With only_held_out, a single shape whose (colour, shape) is held out."""
    background = rng.choice(list(COLOURS))
    n_shapes = 2 if (not only_held_out and rng.random() < two_shape_fraction) else 1
    positions: list[str] = []
    shapes = []
    for _ in range(n_shapes):
        while True:
            colour = rng.choice([c for c in COLOURS if c != background])
            shape = rng.choice(SHAPES)
            if ((colour, shape) in held_out) == only_held_out:
                break
        # The centre is near every other place, so two-shape scenes never use it.
        candidates = [p for p in POSITIONS if all(_far_apart(p, q) for q in positions)
                      and (n_shapes == 1 or p != "center")]
        position = rng.choice(candidates)
        positions.append(position)
        shapes.append(ShapeSpec(
            shape=shape, colour=colour, size=rng.choice(list(SIZES)), position=position,
            dx=rng.uniform(-JITTER_POSITION, JITTER_POSITION),
            dy=rng.uniform(-JITTER_POSITION, JITTER_POSITION),
            scale=rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)))
    return Scene(background=background, shapes=tuple(shapes))


def _outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon corners for polygonal shapes (None for the circle, drawn as an ellipse)."""
    r = side / 2
    if shape == "square":
        h = r * 0.85  # a full-bbox square looks bigger than a circle of the same size
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        top, base = cy - r, cy + r * 0.8
        return [(cx, top), (cx + r, base), (cx - r, base)]
    if shape == "star":
        r *= 1.15  # thin points: a star needs a larger outline to cover a similar area
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + r * 0.1 + radius * np.sin(angle)))
        return points
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _geometry(s: ShapeSpec, size: float) -> tuple[float, float, float, list[tuple[float, float]] | None]:
    """(centre x, centre y, side, outline) of the shape in a picture `size` pixels wide."""
    px, py = POSITIONS[s.position]
    cx, cy = (px + s.dx) * size, (py + s.dy) * size
    side = SIZES[s.size] * s.scale * size
    return cx, cy, side, _outline(s.shape, cx, cy, side)


def shape_box(s: ShapeSpec, size: int = 64) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in pixels of the shape as render draws it at `size`."""
    cx, cy, side, outline = _geometry(s, size)
    if outline is None:
        r = side / 2
        return cx - r, cy - r, cx + r, cy + r
    xs, ys = zip(*outline)
    return min(xs), min(ys), max(xs), max(ys)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an RGB uint8 array [size, size, 3]."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        cx, cy, side, outline = _geometry(s, big)
        if outline is None:
            r = side / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[s.colour])
        else:
            draw.polygon(outline, fill=COLOURS[s.colour])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


_TEMPLATES = (
    "a {obj}{pos}{bg}",
    "{obj}{pos}{bg}",
    "a picture of a {obj}{pos}{bg}",
    "a drawing of a {obj}{pos}{bg}",
)
_BACKGROUND_PHRASES = (" on a {c} background", ", {c} background", " against a {c} background")


def _object_phrase(s: ShapeSpec, with_size: bool) -> str:
    return f"{s.size} {s.colour} {s.shape}" if with_size else f"{s.colour} {s.shape}"


def caption(scene: Scene, rng: random.Random | None = None, *, drop: float = 0.1) -> str:
    """A caption for the scene. Without rng: the canonical phrasing with every attribute.

    With rng, the phrasing varies and size, position and background are each left out with
    probability `drop`, so short prompts ("a red circle") also mean something.
    """
    def keep() -> bool:
        return rng is None or rng.random() >= drop

    def pick(options):
        return options[0] if rng is None else rng.choice(options)

    with_size, with_pos, with_bg = keep(), keep(), keep()
    parts = []
    for s in scene.shapes:
        pos = " " + pick(POSITION_PHRASES[s.position]) if with_pos else ""
        parts.append((_object_phrase(s, with_size), pos))
    bg = pick(_BACKGROUND_PHRASES).format(c=scene.background) if with_bg else ""
    template = pick(_TEMPLATES)
    obj, pos = parts[0]
    for other_obj, other_pos in parts[1:]:
        pos += f" and a {other_obj}{other_pos}"
    return template.format(obj=obj, pos=pos, bg=bg)


# What a one-attribute caption says about each shape; "shape" stands for any shape.
_FOCUS_PHRASES = {
    "shape": lambda s, pick: s.shape,
    "colour": lambda s, pick: f"{s.colour} shape",
    "size": lambda s, pick: f"{s.size} shape",
    "position": lambda s, pick: f"shape {pick(POSITION_PHRASES[s.position])}",
}
FOCUS_ATTRIBUTES = (*_FOCUS_PHRASES, "background")


def focused_caption(scene: Scene, attribute: str, rng: random.Random) -> str:
    """A caption naming one attribute only ("a shape on the left", "a red shape", "a blue
    background"). In full captions every word comes with the same companions; alone, a word's
    meaning cannot be left to the others."""
    if attribute == "background":
        return f"a {scene.background} background"
    if attribute not in _FOCUS_PHRASES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(FOCUS_ATTRIBUTES)}")
    return " and ".join(f"a {_FOCUS_PHRASES[attribute](s, rng.choice)}" for s in scene.shapes)


def training_examples(n: int, seed: int, *, size: int = 64, two_shape_fraction: float = 0.1
                      ) -> tuple[np.ndarray, list[Scene]]:
    """n pictures (uint8 [n, size, size, 3]) and their scenes, none with a held-out pair."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, two_shape_fraction=two_shape_fraction) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), scenes


def held_out_scenes(n: int, seed: int) -> list[Scene]:
    """n single-shape scenes whose (colour, shape) pair never occurs in training."""
    rng = random.Random(seed)
    return [sample_scene(rng, only_held_out=True) for _ in range(n)]


# ---- Reading a picture back: the attributes of a single-shape picture, for scoring ----

def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    return min(COLOURS, key=lambda name: float(np.sum((np.float32(COLOURS[name]) - rgb) ** 2)))


def _polygon_area(points) -> float:
    x, y = np.asarray(points, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# Area of each shape drawn with a bounding-box side of 1, to turn a measured area into a size.
_UNIT_AREA = {shape: (np.pi / 4 if shape == "circle" else _polygon_area(_outline(shape, 0, 0, 1)))
              for shape in SHAPES}
_SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))
MIN_COLOUR_DISTANCE = 60.0  # a pixel this far (RGB) from the background belongs to a shape


def _classify_shape(extent: float, solidity: float) -> str:
    # A star is the only concave shape; among convex ones the bounding box is filled by
    # a square (~1), a circle (pi/4) and an upright triangle (~1/2).
    if solidity < 0.8:
        return "star"
    if extent > 0.9:
        return "square"
    if extent > 0.64:
        return "circle"
    return "triangle"


def _position_name(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def read_scene(image: np.ndarray) -> dict[str, str | None]:
    """Background, colour, shape, position and size of the largest shape in an RGB uint8 picture.

    Values are names from this module's tables; everything but the background is None when no
    shape stands out from the background.
    """
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    result: dict[str, str | None] = {"background": nearest_colour(background_rgb), "colour": None,
                                     "shape": None, "position": None, "size": None}
    mask = np.linalg.norm(pixels - background_rgb, axis=-1) > MIN_COLOUR_DISTANCE
    labels = measure.label(mask, connectivity=2)
    if labels.max() == 0:
        return result
    region = max(measure.regionprops(labels), key=lambda r: r.area)
    if region.area < 4:
        return result
    inside = labels == region.label
    h, w = mask.shape
    y, x = region.centroid
    shape = _classify_shape(float(region.extent), float(region.solidity))
    side = np.sqrt(region.area / _UNIT_AREA[shape]) / max(h, w)
    result.update(colour=nearest_colour(np.median(pixels[inside], axis=0)), shape=shape,
                  position=_position_name(x / w, y / h),
                  size="large" if side > _SIZE_THRESHOLD else "small")
    return result


def scene_attributes(scene: Scene) -> dict[str, str]:
    """The attributes `read_scene` should find in a single-shape scene."""
    s = scene.shapes[0]
    return {"background": scene.background, "colour": s.colour, "shape": s.shape,
            "position": s.position, "size": s.size}

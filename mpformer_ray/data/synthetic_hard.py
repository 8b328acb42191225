"""The hard embedded benchmark: 20 classes of textured shapes in cluttered, crowded, occluded scenes.

The easy generator (``synthetic.py``) gives every class its own colour on a plain two-region
background, so a small model nearly solves it and methods cannot be told apart. Here:

- 14 thing classes and 6 stuff classes. Every class draws its colours from one shared range; a
  class is its shape plus its texture (two disk classes differ only in texture, several classes
  share a texture and differ in shape), and stuff uses the same texture families as things.
- 4-12 thing instances per image, drawn in order: a later instance covers earlier ones and the
  visible part is the segment (each keeps at least ``_MIN_VISIBLE`` of its drawn shape).
- Thin objects (straight bars and bent wires 1.5-4 px wide) and small objects (dots and sparks
  of a few pixels).
- A cluttered background: 2-4 stuff classes in irregular regions, with unlabelled soft blobs.
- A crowd region in every third image: a cluster of small instances of one class annotated as
  one ``iscrowd`` region, which evaluation ignores as COCO's does.

The medium variant (``colour_cue``) paints the same scenes with a colour cue: thing classes 2k and 2k+1
share a hue (they differ in shape) and every stuff class has a hue of its own, so a tiny model learns it
within a CPU budget, where on the hard variant it stays at the floor.

Scenes are deterministic functions of a seed. ``synthetic.write_coco_layout(..., variant="hard")``
writes them in the same COCO layout as the easy set; unoccluded polygon shapes keep their
polygons (decoding to exactly the panoptic mask), everything else is written as RLE.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator

import numpy as np

from mpformer_ray.data.polygons import rasterize

# (name, shape, texture); textures are shared between classes and with the stuff below.
_THINGS: list[tuple[str, str, str]] = [
    ("square", "square", "checker"),
    ("striped-disk", "disk", "stripes"),
    ("checked-disk", "disk", "checker"),
    ("triangle", "triangle", "stripes"),
    ("ring", "ring", "speckle"),
    ("star", "star", "dots"),
    ("cross", "cross", "stripes"),
    ("hexagon", "hexagon", "speckle"),
    ("ellipse", "ellipse", "waves"),
    ("ell", "ell", "dots"),
    ("bar", "bar", "flat"),  # thin
    ("wire", "wire", "flat"),  # thin
    ("dot", "dot", "flat"),  # small
    ("spark", "spark", "flat"),  # small
]
_STUFF: list[tuple[str, str]] = [
    ("wall", "stripes"), ("floor", "checker"), ("foliage", "blobs"),
    ("water", "waves"), ("gravel", "speckle"), ("fabric", "dots"),
]
HARD_CLASSES: list[dict] = (
    [{"id": i, "name": name, "isthing": True} for i, (name, _, _) in enumerate(_THINGS)]
    + [{"id": len(_THINGS) + i, "name": name, "isthing": False} for i, (name, _) in enumerate(_STUFF)]
)
# Sparse COCO-style ids, things below stuff (as in COCO), so the converter's remapping is exercised.
HARD_SOURCE_IDS: list[int] = [2, 3, 5, 8, 9, 11, 14, 16, 19, 21, 24, 27, 31, 33, 102, 107, 111, 118, 125, 133]
THIN_CLASSES = [i for i, (_, shape, _) in enumerate(_THINGS) if shape in ("bar", "wire")]
SMALL_CLASSES = [i for i, (_, shape, _) in enumerate(_THINGS) if shape in ("dot", "spark")]
# Crowds gather compact shapes; a crowd of bars would read as texture, not as separate objects.
_CROWD_CLASSES = [i for i, (_, shape, _) in enumerate(_THINGS)
                  if shape in ("square", "disk", "triangle", "hexagon", "star", "dot")]

# The medium variant's colour cue: thing classes 2k and 2k+1 share colour family k (they differ in shape),
# every stuff class has a family of its own.
_FAMILIES = (len(_THINGS) + 1) // 2 + len(_STUFF)


def _family(cls: int) -> int:
    """Class ``cls``'s colour family in the medium variant, 0 .. _FAMILIES - 1."""
    return cls // 2 if cls < len(_THINGS) else (len(_THINGS) + 1) // 2 + cls - len(_THINGS)


_MIN_VISIBLE = 0.3  # a later shape may not hide more than 70% of an earlier one (it stays learnable)
_MIN_AREA = 5  # pixels: smaller drawn shapes are redrawn
_TEXTURE_AMPLITUDE = 30.0
_MIN_CONTRAST = 80.0  # RGB distance between a thing's colour and the mean of what it covers


def _plus(arm: float, half_width: float) -> np.ndarray:
    """Outline [12, 2] of a plus sign centred at 0 with arms of length ``arm``."""
    a, w = arm, half_width
    return np.array([(w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
                     (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w)], np.float64)


def _ngon(r: float, sides: int) -> np.ndarray:
    """Outline [sides, 2] of a regular polygon of circumradius ``r`` centred at 0."""
    t = np.arange(sides) * 2 * np.pi / sides
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _outline(shape: str, r: float) -> np.ndarray:
    """Outline [n, 2] (pixels, centred at 0, unrotated) of a compact shape of radius ``r``."""
    if shape == "star":
        star = _ngon(1.0, 10)
        return star * np.where(np.arange(10) % 2 == 0, r, r * 0.45)[:, None]
    if shape == "cross":
        return _plus(r, r * 0.33)
    if shape == "spark":
        return _plus(r, 1.0)  # 2 px wide whatever its size: a small object, not a small cross
    if shape == "ell":
        return np.array([(-0.8, -1.0), (-0.1, -1.0), (-0.1, 0.3), (0.8, 0.3), (0.8, 1.0), (-0.8, 1.0)]) * r
    if shape == "ellipse":
        return _ngon(r, 32) * (1.0, 0.5)
    sides = {"square": 4, "disk": 32, "triangle": 3, "hexagon": 6, "dot": 12}[shape]
    return _ngon(r * 1.15 if shape == "triangle" else r, sides)


def _place(outline: np.ndarray, cx: float, cy: float, angle: float) -> list[float]:
    """Rotate ``outline`` [n, 2] (pixels, centred at 0) by ``angle``, move it to (cx, cy): flat polygon."""
    c, s = np.cos(angle), np.sin(angle)
    pts = outline @ np.array([[c, s], [-s, c]]) + (cx, cy)
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _thin_rectangle(x0: float, y0: float, x1: float, y1: float, width: float) -> list[float]:
    """A ``width``-px rectangle along the segment (x0, y0)-(x1, y1), extended by width / 2 at both
    ends so that consecutive segments of a wire join without a gap."""
    half = float(np.hypot(x1 - x0, y1 - y0)) / 2 + width / 2
    outline = np.array([(-half, -width / 2), (half, -width / 2), (half, width / 2), (-half, width / 2)])
    return _place(outline, (x0 + x1) / 2, (y0 + y1) / 2, float(np.arctan2(y1 - y0, x1 - x0)))


def _draw_shape(rng: np.random.Generator, shape: str, height: int, width: int,
                radius: float | None = None, centre: np.ndarray | None = None) -> dict:
    """One instance's full (unoccluded) extent: {"mask": bool [H, W], "polygons": [...] or None}.
    ``radius`` / ``centre`` (pixels, centre as (x, y)) fix a compact shape's size and place (crowd
    members)."""
    side = min(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    if shape == "bar":
        length, w = rng.uniform(0.25, 0.7) * side, rng.uniform(2.0, 4.0)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        polys = [_thin_rectangle(cx - dx, cy - dy, cx + dx, cy + dy, w)]
    elif shape == "wire":
        w = rng.uniform(1.5, 2.5)
        pts = [rng.uniform(0.1, 0.9, 2) * (width, height)]
        for turn in (0.0, rng.choice([-1, 1]) * rng.uniform(0.5, 1.5)):
            angle += turn
            pts.append(pts[-1] + rng.uniform(0.15, 0.35) * side * np.array([np.cos(angle), np.sin(angle)]))
        polys = [_thin_rectangle(*a, *b, w) for a, b in zip(pts[:-1], pts[1:])]
    else:
        if radius is None:
            radius = {"dot": rng.uniform(1.5, 3.0), "spark": rng.uniform(2.5, 4.5)}.get(
                shape, rng.uniform(0.07, 0.18) * side)
        if centre is None:
            centre = rng.uniform(radius * 0.5, (width - radius * 0.5, height - radius * 0.5))
        cx, cy = centre
        if shape == "ring":  # a polygon with a hole: only an RLE describes it
            outer, inner = (rasterize([_place(_ngon(r, 32), cx, cy, 0.0)], height, width)
                            for r in (radius, radius * 0.55))
            return {"mask": outer & ~inner, "polygons": None}
        polys = [_place(_outline(shape, radius), cx, cy, angle)]
    return {"mask": rasterize(polys, height, width), "polygons": polys}


def _smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, period: float) -> np.ndarray:
    """A smooth random field at pixel coordinates ``yy`` / ``xx`` (any, equal shapes), unit standard
    deviation: four plane waves of random direction and phase, periods in [period, 2 period] px."""
    field = np.zeros(yy.shape, np.float32)
    for _ in range(4):
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        freq = 2 * np.pi / rng.uniform(period, 2 * period)
        field += np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * freq + phase)
    return field / np.sqrt(2.0)  # each wave has variance 1/2


def _texture(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Texture family ``kind`` at a random orientation, period and phase, in [-1, 1], evaluated at pixel
    coordinates ``yy`` / ``xx`` (the pixels to paint, any shape)."""
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    freq = 2 * np.pi / rng.uniform(4.0, 10.0)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = yy * np.cos(theta) - xx * np.sin(theta)
    if kind == "stripes":
        return np.sign(np.sin(u * freq + phase))
    if kind == "checker":
        return np.sign(np.sin(u * freq + phase) * np.sin(v * freq))
    if kind == "dots":
        return np.where(np.cos(u * freq + phase) * np.cos(v * freq) > 0.5, 1.0, -0.4)
    if kind == "waves":
        return np.sin(u * freq * 0.6 + 2.5 * np.sin(v * freq * 0.25) + phase)
    if kind == "speckle":
        return np.clip(rng.standard_normal(yy.shape) * 0.6, -1, 1)
    if kind == "blobs":
        return np.clip(_smooth_field(rng, yy, xx, period=8.0) * 0.6, -1, 1)
    return np.zeros(yy.shape)  # "flat": a plain colour (thin and small things carry no texture)


def _colour(rng: np.random.Generator, family: int | None) -> np.ndarray:
    """A random RGB colour [3] in 0..255: from the shared range, or (``family`` given) of that colour
    family's hue with random saturation and brightness."""
    if family is None:
        return rng.uniform(20, 235, 3)
    hue = (family / _FAMILIES + rng.uniform(-0.015, 0.015)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.95), rng.uniform(0.45, 0.95))) * 255


def _paint(rng: np.random.Generator, image: np.ndarray, region: np.ndarray, kind: str, contrast: bool,
           family: int | None = None) -> None:
    """Paint ``region`` (bool [H, W]) of ``image`` in a random colour (of colour ``family``, if given) with
    texture ``kind``; with ``contrast`` the colour is redrawn (a few times) until it stands out from what
    the region covers, so a plain-coloured thin or small thing does not vanish into a same-coloured
    background."""
    colour = _colour(rng, family)
    if contrast:
        beneath = image[region].mean(axis=0)
        for _ in range(8):
            if np.linalg.norm(colour - beneath) >= _MIN_CONTRAST:
                break
            colour = _colour(rng, family)
    yy, xx = np.nonzero(region)
    image[yy, xx] = colour + _TEXTURE_AMPLITUDE * _texture(rng, kind, yy.astype(np.float32),
                                                           xx.astype(np.float32))[:, None]


def _background(rng: np.random.Generator, image: np.ndarray, colour_cue: bool) -> list[tuple]:
    """Paint 2-4 stuff classes in warped Voronoi regions plus unlabelled soft blobs into ``image``
    (float [H, W, 3]); returns [(stuff class id, bool [H, W] region)] for the classes that got pixels."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    chosen = rng.choice(len(_STUFF), int(rng.integers(2, 5)), replace=False)
    cells = np.concatenate([chosen, rng.choice(chosen, int(rng.integers(0, 4)))])
    centres = rng.uniform(0, 1, (len(cells), 2)) * (height, width)
    wy, wx = (10 * _smooth_field(rng, yy, xx, period=24.0) for _ in range(2))  # irregular borders
    dist = (yy + wy - centres[:, 0, None, None]) ** 2 + (xx + wx - centres[:, 1, None, None]) ** 2
    label = cells[dist.argmin(axis=0)]
    regions = []
    for stuff in chosen:
        region = label == stuff
        if region.any():
            _paint(rng, image, region, _STUFF[stuff][1], contrast=False,
                   family=_family(len(_THINGS) + int(stuff)) if colour_cue else None)
            regions.append((len(_THINGS) + int(stuff), region))
    for _ in range(int(rng.integers(4, 10))):  # clutter: soft-edged, so never mistaken for a thing
        cy, cx, sigma = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2.0, 7.0)
        r = int(3 * sigma) + 1  # the blob is ~0 beyond 3 sigma: paint only that window
        window = (slice(max(int(cy) - r, 0), int(cy) + r + 1), slice(max(int(cx) - r, 0), int(cx) + r + 1))
        blob = np.exp(-((yy[window] - cy) ** 2 + (xx[window] - cx) ** 2) / (2 * sigma ** 2))
        image[window] += blob[..., None] * rng.uniform(-60, 60, 3)
    return regions


def _crowd(rng: np.random.Generator, cls: int, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A crowd of 8-14 small instances of ``cls`` packed round one point: (bool [H, W] union,
    the members' masks in drawing order)."""
    side = min(height, width)
    anchor = rng.uniform(0.2, 0.8, 2) * (width, height)
    spread = rng.uniform(0.06, 0.12) * side
    members = []
    for _ in range(int(rng.integers(8, 15))):
        centre = anchor + rng.uniform(-spread, spread, 2)
        members.append(_draw_shape(rng, _THINGS[cls][1], height, width, radius=rng.uniform(0.025, 0.045) * side,
                                   centre=centre)["mask"])
    return np.logical_or.reduce(members), members


def generate_hard_scene(rng: np.random.Generator, height: int, width: int, *, crowd: bool = False,
                        colour_cue: bool = False) -> dict:
    """One scene, in ``synthetic.generate_scene``'s format plus each segment's drawn area.

    Returns {"image": uint8 [H, W, 3], "segments": [{"class_id": int, "mask": bool [H, W] (visible
    part), "iscrowd": bool, "polygons": flat [x, y, ...] lists or None, "drawn_area": int (pixels
    of the whole shape or stuff region before later things covered it)}]}. Masks are disjoint;
    ``crowd`` adds one crowd region at a random depth among the things.
    """
    image = np.zeros((height, width, 3), np.float32)
    stuff = _background(rng, image, colour_cue)

    plan = [("single", int(c)) for c in rng.integers(0, len(_THINGS), int(rng.integers(4, 13)))]
    if crowd:
        plan.insert(int(rng.integers(0, len(plan) + 1)), ("crowd", int(rng.choice(_CROWD_CLASSES))))
    things: list[dict] = []  # {"class_id", "mask" (visible), "full", "polygons", "iscrowd"}
    for kind, cls in plan:
        for _ in range(15):
            if kind == "single":
                shape = _draw_shape(rng, _THINGS[cls][1], height, width)
                full, polygons, members = shape["mask"], shape["polygons"], [shape["mask"]]
            else:
                full, members = _crowd(rng, cls, height, width)
                polygons = None
            if full.sum() >= _MIN_AREA and all(
                    (t["mask"] & ~full).sum() >= max(_MIN_VISIBLE * t["full"].sum(), _MIN_AREA) for t in things):
                break
        else:
            continue  # no placement leaves the earlier things visible enough: drop this one
        for t in things:
            if (t["mask"] & full).any():
                t["mask"] = t["mask"] & ~full
                t["polygons"] = None  # occluded: only an RLE describes the visible part exactly
        for member in members:
            _paint(rng, image, member, _THINGS[cls][2], contrast=True, family=_family(cls) if colour_cue else None)
        things.append({"class_id": cls, "mask": full.copy(), "full": full, "polygons": polygons,
                       "iscrowd": kind == "crowd"})

    image += rng.normal(0.0, 8.0, image.shape)
    covered = np.logical_or.reduce([t["full"] for t in things])
    segments = [{"class_id": t["class_id"], "mask": t["mask"], "iscrowd": t["iscrowd"], "polygons": t["polygons"],
                 "drawn_area": int(t["full"].sum())} for t in things]
    for cls, region in stuff:
        visible = region & ~covered
        if visible.any():
            segments.append({"class_id": cls, "mask": visible, "iscrowd": False, "polygons": None,
                             "drawn_area": int(region.sum())})
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "segments": segments}


def generate_hard_scenes(num: int, height: int, width: int, seed: int, colour_cue: bool = False) -> Iterator[dict]:
    """``num`` deterministic hard scenes (medium ones with ``colour_cue``); every third (from the 2nd)
    holds a crowd region."""
    for i in range(num):
        yield generate_hard_scene(np.random.default_rng([seed, i]), height, width, crowd=i % 3 == 1,
                                  colour_cue=colour_cue)

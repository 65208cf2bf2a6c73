"""Procedural "shapes" dataset: one coloured object on a noisy gray background.

Every image shows one object described by four attributes (shape, color, size,
position quadrant); the caption describes those attributes in varied words. The
dataset is small and fully controlled, so contrastive training on it can be
checked end to end (zero-shot accuracy per attribute, retrieval) in minutes.

Everything is a pure function of a seed. The split is generated in fixed-size
chunks, each with its own generators derived from (seed, chunk), so a shorter
split is a prefix of a longer one with the same seed, and captions can be made
without rendering images.

Two options, both off by default (and then without any effect on the output):

* `nuisance=True`: each image also draws five nuisance factors that change its
  pixels but not its concept or caption (`NUISANCE_FACTORS`: background light,
  illumination gradient, background texture, sensor noise, vignette), each
  returned as an int32 label. They come from a third generator stream, so the
  attributes, captions, object geometry and the noise field are those of the
  same seed without nuisance.
* `concepts=K` (1..320): only the K concepts of `concept_subset(K)` are drawn,
  uniformly. `label` stays the full concept id; `concept_index` maps it to 0..K-1.

`generate_split(..., boxes=True)` also returns each object's bounding box, the tight box of its
pixels, for localisation tasks (LocCa's referring expressions and grounded captions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clipjax.captions import caption_text_id, normalize_caption

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")

ATTRIBUTE_NAMES = ("shape", "color", "size", "position")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
}
NUM_CONCEPTS = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)  # 320

# Hues spread around the wheel plus white, so no two classes are confusable
# once the per-object color jitter is added.
_RGB = np.array(
    [
        (220, 30, 30),  # red
        (30, 170, 40),  # green
        (35, 70, 235),  # blue
        (245, 225, 30),  # yellow
        (145, 40, 200),  # purple
        (255, 140, 0),  # orange
        (20, 215, 225),  # cyan
        (250, 250, 250),  # white
    ],
    dtype=np.float32,
)

# Geometry in a 32 px image; everything scales with image_size.
_SMALL_DIAMETER = (10.0, 12.0)
_LARGE_DIAMETER = (17.0, 19.0)
_CENTRES = (0.29, 0.71)
_CENTRE_JITTER = 1.6
_MAX_ROTATION = 0.25
_COLOR_JITTER = 12.0
_BACKGROUND = (90.0, 160.0)
_NOISE_STD = 8.0

_CHUNK = 1024

# Nuisance factors: {name: class names in label order}. Geometry is given for a
# 32 px image and scales with image_size; gray levels are in 0..255.
NUISANCE_FACTORS: dict[str, tuple[str, ...]] = {
    "light": ("dark", "dim", "medium", "bright"),
    "gradient": ("none", "horizontal", "vertical"),
    "texture": ("flat", "stripes", "checker"),
    "noise": ("low", "medium", "high"),
    "vignette": ("none", "vignette"),
}
NUISANCE_NAMES = tuple(NUISANCE_FACTORS)
# 40 gray levels apart, far more than the jitter, so a background mean names its
# class; the brightest stays well below white objects (>= 238).
_LIGHT_LEVELS = (55.0, 95.0, 135.0, 175.0)
_LIGHT_JITTER = 5.0
# A ramp from -A to +A across the image along one axis, in a random direction:
# the class is the axis, so a horizontal flip keeps the class.
_GRADIENT_AMPLITUDE = 25.0
# Square waves of +-A: vertical stripes 2 px wide (period 4 px), or a checker of
# 4 px squares, at a random phase. Low contrast against objects, but at fixed
# frequencies, so they stand out in the spectrum even under the strongest noise.
_TEXTURE_AMPLITUDE = 8.0
_STRIPE_WIDTH = 2.0
_CHECKER_SQUARE = 4.0
_NOISE_STDS = (2.0, 8.0, 16.0)
# The background is multiplied by 1 - strength * (r / r_corner)^2.
_VIGNETTE_STRENGTH = 0.45

# Caption vocabulary. Each word belongs to exactly one attribute (or to the
# template glue), so a caption can be parsed back into labels.
_SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
_SHAPE_WORDS = tuple((s,) for s in SHAPES)
_GENERIC_NOUNS = ("object", "shape", "thing")
_VERTICAL_WORDS = (("top", "upper"), ("bottom", "lower"))
_HORIZONTAL_WORDS = ("left", "right")
_POSITION_PREPOSITIONS = ("in the {}", "at the {}", "in the {} corner")

P_DROP_COLOR = 0.15
P_DROP_SIZE = 0.15
P_DROP_POSITION = 0.15
P_DROP_SHAPE = 0.10


def concept_id(shape, color, size, position):
    """Concept label in [0, 320); works on ints and on integer arrays."""
    return ((shape * len(COLORS) + color) * len(SIZES) + size) * len(POSITIONS) + position


def concept_attributes(label):
    """Inverse of `concept_id`: returns (shape, color, size, position)."""
    label, position = divmod(label, len(POSITIONS))
    label, size = divmod(label, len(SIZES))
    shape, color = divmod(label, len(COLORS))
    return shape, color, size, position


def concept_order() -> np.ndarray:
    """All 320 concept ids in the order `concept_subset` takes them.

    Entry i is shape i mod 5, color i mod 8 (5 and 8 are coprime, so each run of 40
    holds every shape-color pair once), and (size, position) from
    s = (color + shape + i // 40) mod 8 as size = s // 4, position = s mod 4. Each
    run of 40 then gives every shape all 8 size-position pairs and every color 5
    of them, and the shift by i // 40 makes the whole a permutation. In every
    prefix each attribute's classes are within 3 of one another in count (shape
    and color within 1).
    """
    i = np.arange(NUM_CONCEPTS)
    shape, color = i % len(SHAPES), i % len(COLORS)
    s = (color + shape + i // (len(SHAPES) * len(COLORS))) % (len(SIZES) * len(POSITIONS))
    return concept_id(shape, color, s // len(POSITIONS), s % len(POSITIONS))


def check_concepts(concepts: int) -> int:
    """`concepts` as an int in [0, 320] (0: all), or ValueError."""
    if isinstance(concepts, bool) or int(concepts) != concepts or not 0 <= concepts <= NUM_CONCEPTS:
        raise ValueError(f"concepts must be an integer in [0, {NUM_CONCEPTS}] (0: all), got {concepts!r}")
    return int(concepts)


def concept_subset(concepts: int) -> np.ndarray:
    """The sorted concept ids drawn with `concepts=K`: the first K of `concept_order()`
    (all 320 for K = 0). Subsets are nested, and from K = 40 on they hold every
    shape-color pair; see `concept_order` for how balanced they are."""
    k = check_concepts(concepts) or NUM_CONCEPTS
    return np.sort(concept_order()[:k])


def concept_index(label, concepts: int):
    """Maps concept ids of `concept_subset(concepts)` to 0..K-1 (their rank in it)."""
    subset = concept_subset(concepts)
    label = np.asarray(label)
    index = np.searchsorted(subset, label)
    if np.any(index >= len(subset)) or np.any(subset[np.minimum(index, len(subset) - 1)] != label):
        raise ValueError(f"labels outside the {len(subset)} concepts of concept_subset({concepts})")
    return index


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _caption(
    template: int, size: str | None, color: str | None, noun: str, pos: str | None, color_first: bool
) -> str:
    """Builds one caption; missing attributes (None) leave no trace."""
    adjectives = [a for a in ((color, size) if color_first else (size, color)) if a]
    desc = " ".join(adjectives + [noun])
    tail = f" {pos}" if pos else ""
    if template == 0:
        return _with_article(desc) + tail
    if template == 1:
        return f"there is {_with_article(desc)}{tail}"
    if template == 2:
        head = f"{pos} " if pos else ""
        return f"{head}there is {_with_article(desc)}"
    if template == 3:
        return f"a picture of {_with_article(desc)}{tail}"
    if template == 4:
        return f"the {desc} is {pos}" if pos else f"the {desc}"
    if template == 5:
        text = _with_article(noun)
        if adjectives:
            text += " that is " + " and ".join(adjectives)
        return text + tail
    if template == 6:
        return f"an image with {_with_article(desc)}{tail}"
    if template == 7:
        head = f"{pos} " if pos else ""
        return f"{head}you can see {_with_article(desc)}"
    raise ValueError(template)


NUM_TEMPLATES = 8


def _make_captions(
    shape, color, size, position, rng: np.random.Generator, draws: int | None = None
) -> list[str]:
    n = len(shape)
    m = n if draws is None else max(int(draws), n)
    # All randomness is drawn up front, vectorised; the loop only formats.
    # Drawing m >= n values keeps a prefix of a chunk identical to the chunk.
    drop_color = rng.random(m)[:n] < P_DROP_COLOR
    drop_size = rng.random(m)[:n] < P_DROP_SIZE
    drop_pos = rng.random(m)[:n] < P_DROP_POSITION
    drop_shape = rng.random(m)[:n] < P_DROP_SHAPE
    template = rng.integers(0, NUM_TEMPLATES, m)[:n]
    color_first = rng.random(m)[:n] < 0.3
    pick = rng.integers(0, 2**30, (m, 4))[:n]  # synonym choices, reduced mod options
    captions = []
    for i in range(n):
        sz = None if drop_size[i] else _pick(_SIZE_WORDS[size[i]], pick[i, 0])
        col = None if drop_color[i] else COLORS[color[i]]
        if drop_shape[i]:
            noun = _pick(_GENERIC_NOUNS, pick[i, 1])
        else:
            noun = _pick(_SHAPE_WORDS[shape[i]], pick[i, 1])
        pos = None
        if not drop_pos[i]:
            vertical, horizontal = divmod(int(position[i]), 2)
            words = f"{_pick(_VERTICAL_WORDS[vertical], pick[i, 2])} {_HORIZONTAL_WORDS[horizontal]}"
            pos = _pick(_POSITION_PREPOSITIONS, pick[i, 3]).format(words)
        captions.append(_caption(int(template[i]), sz, col, noun, pos, bool(color_first[i])))
    return captions


def _pick(options: Sequence[str], r: int) -> str:
    return options[int(r) % len(options)]


def parse_caption(caption: str) -> dict[str, int]:
    """Recovers attribute labels from a caption; -1 where it does not say."""
    words = normalize_caption(caption).split()
    out = {name: -1 for name in ATTRIBUTE_NAMES}
    for w in words:
        for i, syns in enumerate(_SHAPE_WORDS):
            if w in syns:
                out["shape"] = i
        if w in COLORS:
            out["color"] = COLORS.index(w)
        for i, syns in enumerate(_SIZE_WORDS):
            if w in syns:
                out["size"] = i
    vertical = [i for i, syns in enumerate(_VERTICAL_WORDS) for w in words if w in syns]
    horizontal = [_HORIZONTAL_WORDS.index(w) for w in words if w in _HORIZONTAL_WORDS]
    if vertical and horizontal:
        out["position"] = 2 * vertical[0] + horizontal[0]
    return out


def caption_vocabulary() -> set[str]:
    """Every word a caption can contain."""
    words = set(COLORS) | set(_GENERIC_NOUNS) | set(_HORIZONTAL_WORDS) | {"a", "an"}
    for group in (_SIZE_WORDS, _SHAPE_WORDS, _VERTICAL_WORDS):
        for syns in group:
            words.update(syns)
    for p in _POSITION_PREPOSITIONS:
        words.update(p.format("").split())
    # Template glue: fill every slot with a placeholder and keep the rest.
    slots = {"SIZE", "COLOR", "NOUN", "POS"}
    for t in range(NUM_TEMPLATES):
        words.update(set(_caption(t, "SIZE", "COLOR", "NOUN", "POS", False).split()) - slots)
    return words


# ----------------------------------------------------------------------------
# Zero-shot tasks.

# Prompts use only caption words, and never put a class name right after
# "a"/"an" unless every class name takes the same article (shape names and
# size names start with consonants; "orange" does not).
ZERO_SHOT_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (
        SHAPES,
        ("a {}", "there is a {}", "a picture of a {}", "an image with a {}", "the {}", "you can see a {}"),
    ),
    "color": (
        COLORS,
        (
            "the {} object",
            "the {} shape",
            "the {} thing",
            "a shape that is {}",
            "a thing that is {}",
            "there is a shape that is {}",
        ),
    ),
    "size": (
        SIZES,
        (
            "a {} object",
            "a {} shape",
            "a {} thing",
            "the {} object",
            "a shape that is {}",
            "there is a {} thing",
        ),
    ),
    "position": (
        POSITIONS,
        (
            "a shape in the {}",
            "a thing at the {}",
            "in the {} there is a thing",
            "a shape in the {} corner",
            "the object is in the {}",
            "there is a thing in the {}",
        ),
    ),
}


def zero_shot_tasks() -> dict[str, tuple[list[str], list[str]]]:
    """{attribute: (class names in label order, prompt templates with '{}')}."""
    return {k: (list(c), list(t)) for k, (c, t) in ZERO_SHOT_TASKS.items()}


def zero_shot_prompts() -> list[str]:
    """Every formatted prompt of every task (for tokenizer training)."""
    return [
        t.format(c) for classes, templates in ZERO_SHOT_TASKS.values() for c in classes for t in templates
    ]


# ----------------------------------------------------------------------------
# Rendering.


def _masks(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for one shape kind in the object's unit frame (radius 1)."""
    au, av = np.abs(u), np.abs(v)
    if kind == 0:  # circle
        return u * u + v * v <= 1.0
    if kind == 1:  # square; smaller half-side so its area matches the circle's
        return np.maximum(au, av) <= 0.85
    if kind == 2:  # triangle, apex up, bounding box centred on the object centre
        return (v <= 0.875) & (au <= (v + 0.875) / 1.75)
    if kind == 3:  # diamond, taller than wide so a rotated square never looks like it
        return au / 0.7 + av <= 1.0
    if kind == 4:  # cross
        arm = 0.32
        return ((au <= arm) & (av <= 1.0)) | ((av <= arm) & (au <= 1.0))
    raise ValueError(kind)


def draw_nuisance(rng: np.random.Generator, n: int, *, draws: int | None = None) -> dict[str, np.ndarray]:
    """Independent, uniform nuisance factors of n images: an int32 label per factor of
    `NUISANCE_FACTORS`, and the continuous parameters `nuisance_background` uses.

    `draws` (>= n) sizes every draw, as in `render`, so a prefix is stable.
    """
    m = n if draws is None else max(int(draws), n)
    out = {k: rng.integers(0, len(c), m)[:n].astype(np.int32) for k, c in NUISANCE_FACTORS.items()}
    out["light_jitter"] = rng.uniform(-_LIGHT_JITTER, _LIGHT_JITTER, m)[:n]
    out["gradient_sign"] = np.where(rng.random(m)[:n] < 0.5, -1.0, 1.0)
    # Fractions of a texture period; the pixel offset depends on the image size.
    out["texture_phase"] = rng.random((m, 2))[:n]
    return out


def nuisance_background(nuisance: dict[str, np.ndarray], image_size: int = 32) -> np.ndarray:
    """float32 [n, S, S] gray background of the images described by `draw_nuisance`'s output:
    light level, plus gradient, plus texture, times vignette."""
    s = image_size
    scale = s / 32.0
    c = (np.arange(s, dtype=np.float32) + 0.5) / s * 2.0 - 1.0  # pixel centres in [-1, 1]
    level = np.asarray(_LIGHT_LEVELS)[nuisance["light"]] + nuisance["light_jitter"]
    bg = np.repeat(level.astype(np.float32)[:, None, None], s, axis=1).repeat(s, axis=2)

    ramp = (_GRADIENT_AMPLITUDE * nuisance["gradient_sign"]).astype(np.float32)
    gradient = nuisance["gradient"]
    bg += np.where(gradient == 1, ramp, 0.0).astype(np.float32)[:, None, None] * c[None, None, :]
    bg += np.where(gradient == 2, ramp, 0.0).astype(np.float32)[:, None, None] * c[None, :, None]

    px = np.arange(s)
    band = max(1, round(_STRIPE_WIDTH * scale))
    square = max(1, round(_CHECKER_SQUARE * scale))
    phase = nuisance["texture_phase"]
    # Offsets within one period (2 bands, 2 squares), so every phase is equally likely.
    ox = (phase[:, 0] * 2 * band).astype(np.int64)[:, None, None]
    stripes = ((px[None, None, :] + ox) // band) % 2
    sx = (phase[:, 0] * 2 * square).astype(np.int64)[:, None, None]
    sy = (phase[:, 1] * 2 * square).astype(np.int64)[:, None, None]
    checker = ((px[None, None, :] + sx) // square + (px[None, :, None] + sy) // square) % 2
    texture = nuisance["texture"][:, None, None]
    pattern = np.where(texture == 1, 2 * stripes - 1, np.where(texture == 2, 2 * checker - 1, 0))
    bg += _TEXTURE_AMPLITUDE * pattern.astype(np.float32)

    r2 = (c[None, :] ** 2 + c[:, None] ** 2) / (2.0 * c[0] ** 2)  # 1 at the corner pixels
    vignette = nuisance["vignette"].astype(np.float32)[:, None, None]
    bg *= 1.0 - _VIGNETTE_STRENGTH * vignette * r2[None]
    return bg


def render(*args, **kwargs) -> np.ndarray:
    """`render_with_masks` without the masks."""
    return render_with_masks(*args, **kwargs)[0]


def render_with_masks(
    shape,
    color,
    size,
    position,
    rng: np.random.Generator,
    image_size: int = 32,
    *,
    draws: int | None = None,
    nuisance: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders uint8 [n, S, S, 3] images for the given attribute arrays, and bool [n, S, S] the
    pixels of each object (`object_boxes` gives their tight boxes).

    `draws` (>= n) sizes the random draws for the per-object parameters, so
    rendering a prefix of a chunk consumes the generator like the whole chunk.
    `nuisance` (`draw_nuisance`'s output for these n images) replaces the flat
    background with `nuisance_background` and sets each image's noise level; the
    object is drawn over the background unchanged, the noise over everything.
    `rng` is consumed the same either way.
    """
    shape = np.asarray(shape)
    n = len(shape)
    m = n if draws is None else max(int(draws), n)
    s = float(image_size)
    scale = s / 32.0
    small = rng.uniform(*_SMALL_DIAMETER, m)[:n]
    large = rng.uniform(*_LARGE_DIAMETER, m)[:n]
    radius = 0.5 * scale * np.where(np.asarray(size) == 0, small, large)
    vertical, horizontal = np.divmod(np.asarray(position), 2)
    centres = np.asarray(_CENTRES) * s
    cx = centres[horizontal] + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, m)[:n] * scale
    cy = centres[vertical] + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, m)[:n] * scale
    theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, m)[:n]
    rgb = _RGB[np.asarray(color)] + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, (m, 3))[:n]
    gray = rng.uniform(*_BACKGROUND, m)[:n].astype(np.float32)

    coords = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
    dx = coords[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = coords[None, :, None] - cy[:, None, None].astype(np.float32)
    cos = (np.cos(theta) / radius).astype(np.float32)[:, None, None]
    sin = (np.sin(theta) / radius).astype(np.float32)[:, None, None]
    u = cos * dx + sin * dy
    v = cos * dy - sin * dx

    inside = np.zeros((n, image_size, image_size), dtype=bool)
    for kind in range(len(SHAPES)):
        sel = np.flatnonzero(shape == kind)
        if sel.size:
            inside[sel] = _masks(kind, u[sel], v[sel])

    if nuisance is None:
        image = np.where(
            inside[..., None], rgb[:, None, None, :].astype(np.float32), gray[:, None, None, None]
        )
        # Noise last: its stream is filled in order, so a prefix gets the same noise.
        image += rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_STD
    else:
        # `gray` above is drawn but unused, so the object and the noise field stay
        # those of the same seed without nuisance.
        background = nuisance_background(nuisance, image_size)[..., None]
        image = np.where(inside[..., None], rgb[:, None, None, :].astype(np.float32), background)
        std = np.asarray(_NOISE_STDS, np.float32)[nuisance["noise"]][:, None, None, None]
        image += rng.standard_normal(image.shape, dtype=np.float32) * std
    return np.clip(image, 0.0, 255.0).astype(np.uint8), inside


def object_boxes(inside: np.ndarray) -> np.ndarray:
    """float32 [n, 4]: the tight box of the True pixels of each mask [n, S, S] as (x_min, y_min,
    x_max, y_max) fractions of the image side (a pixel column c spans c/S..(c+1)/S)."""
    s = inside.shape[-1]
    cols, rows = inside.any(axis=1), inside.any(axis=2)
    first = lambda m: np.argmax(m, axis=1)
    last = lambda m: s - np.argmax(m[:, ::-1], axis=1)
    return (np.stack([first(cols), first(rows), last(cols), last(rows)], axis=1) / s).astype(np.float32)


def _chunk_rngs(seed: int, chunk: int):
    # Separate streams for attributes/captions and for pixels, so captions can
    # be produced without rendering and come out identical.
    return (np.random.default_rng([seed, chunk, 0]), np.random.default_rng([seed, chunk, 1]))


def _nuisance_rng(seed: int, chunk: int):
    # A third stream: turning nuisance on leaves the other two untouched.
    return np.random.default_rng([seed, chunk, 2])


def _chunk_attributes(rng: np.random.Generator, draws: int, n: int, concepts: int = 0):
    if concepts:
        # concept_subset(320) is arange(320): the same labels as concepts=0.
        label = concept_subset(concepts)[rng.integers(0, concepts, draws)[:n]]
    else:
        label = rng.integers(0, NUM_CONCEPTS, draws)[:n]
    return label, concept_attributes(label)


def generate_split(
    num_examples: int,
    seed: int,
    image_size: int = 32,
    *,
    with_images: bool = True,
    nuisance: bool = False,
    concepts: int = 0,
    boxes: bool = False,
    masks: bool = False,
) -> dict[str, np.ndarray]:
    """Generates a split deterministically from `seed`.

    Returns numpy arrays: image uint8 [N,S,S,3] (unless with_images=False),
    caption str [N], text_id/index/label/shape/color/size/position int32 [N],
    and with `nuisance` the int32 [N] labels of NUISANCE_NAMES. `concepts=K`
    draws only the concepts of `concept_subset(K)` (0: all 320). `boxes`: also
    box float32 [N, 4], each object's (x_min, y_min, x_max, y_max) as fractions
    of the image side; `masks`: also mask bool [N, S, S], the object's pixels (both
    need the images rendered, which they do not change).
    """
    if (boxes or masks) and not with_images:
        raise ValueError("boxes and masks come from the rendered pixels: they need with_images=True")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    concepts = check_concepts(concepts)
    label_names = ("label", "shape", "color", "size", "position") + (NUISANCE_NAMES if nuisance else ())
    parts = {k: [] for k in label_names + ("caption",)}
    images, object_masks = [], []
    for chunk, start in enumerate(range(0, num_examples, _CHUNK)):
        n = min(_CHUNK, num_examples - start)
        attr_rng, pixel_rng = _chunk_rngs(seed, chunk)
        label, (shp, col, siz, pos) = _chunk_attributes(attr_rng, _CHUNK, n, concepts)
        parts["label"].append(label)
        parts["shape"].append(shp)
        parts["color"].append(col)
        parts["size"].append(siz)
        parts["position"].append(pos)
        parts["caption"].extend(_make_captions(shp, col, siz, pos, attr_rng, _CHUNK))
        factors = draw_nuisance(_nuisance_rng(seed, chunk), n, draws=_CHUNK) if nuisance else None
        if nuisance:
            for k in NUISANCE_NAMES:
                parts[k].append(factors[k])
        if with_images:
            image, inside = render_with_masks(
                shp, col, siz, pos, pixel_rng, image_size, draws=_CHUNK, nuisance=factors
            )
            images.append(image)
            object_masks.append(inside)
    out: dict[str, np.ndarray] = {}
    for k in label_names:
        out[k] = (np.concatenate(parts[k]) if parts[k] else np.zeros(0)).astype(np.int32)
    out["caption"] = np.array(parts["caption"], dtype=object)
    out["text_id"] = np.array([caption_text_id(c) for c in parts["caption"]], dtype=np.int32)
    out["index"] = np.arange(num_examples, dtype=np.int32)
    if with_images:
        out["image"] = (
            np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
        )
    inside = np.concatenate(object_masks) if object_masks else np.zeros((0, image_size, image_size), bool)
    if boxes:
        out["box"] = object_boxes(inside)
    if masks:
        out["mask"] = inside
    return out


def generate_captions(num_examples: int, seed: int, *, concepts: int = 0) -> list[str]:
    """The captions `generate_split` would produce (with or without nuisance), without rendering."""
    return list(generate_split(num_examples, seed, with_images=False, concepts=concepts)["caption"])

"""Synthetic person re-identification data in the Market-1501 folder layout.

`generate_synthetic_reid` draws stick-figure "people" whose identity lives only in
their appearance (clothing colours and patterns, body proportions, hair, skin,
carried bag) and photographs them through simulated cameras that each add their
own nuisance (illumination and colour cast, blur, background clutter, JPEG
noise) on top of per-image jitter (pose, scale, position, viewpoint flip,
occlusion). The palette deliberately contains near-identical colours and a
fraction of identities are look-alikes of another one, so a small model has to
learn fine appearance cues and does not reach a perfect rank-1.

Output tree (same names as Market-1501, parsed by the regex ``([-\\d]+)_c(\\d)``)::

    OUT/bounding_box_train/0003_c2s1_000041_00.jpg   training identities
    OUT/query/0004_c1s1_000017_00.jpg                one image per camera of each test identity
    OUT/bounding_box_test/0004_c5s1_000230_00.jpg    the other test images,
    OUT/bounding_box_test/0000_c3s1_000102_00.jpg      distractors (pid 0)
    OUT/bounding_box_test/-1_c6s1_000311_00.jpg        and junk (pid -1)
    OUT/identities.csv                               ground-truth appearance per identity
    OUT/synth.json                                   parameters, seed and counts; written last

Every image's random stream is seeded from (seed, kind, pid, image index), so the
bytes written do not depend on ``workers`` or on the order of rendering.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from fat_distill.atomic import atomic_write_bytes

__all__ = [
    "NuisanceConfig",
    "IdentityAppearance",
    "SynthSummary",
    "generate_synthetic_reid",
    "TRAIN_DIR",
    "QUERY_DIR",
    "GALLERY_DIR",
]

TRAIN_DIR = "bounding_box_train"
QUERY_DIR = "query"
GALLERY_DIR = "bounding_box_test"
IDENTITIES_FILE = "identities.csv"
SUMMARY_FILE = "synth.json"
SYNTH_FORMAT_VERSION = 1

# Stream tags that keep the random streams of different kinds of draws apart.
_KIND_IDENTITY_IMAGE = 0
_KIND_DISTRACTOR = 1
_KIND_JUNK = 2
_STREAM_CAMERA = 3
_STREAM_APPEARANCE = 4
_STREAM_CAMERA_SET = 5
_STREAM_LAYOUT = 6

# ---------------------------------------------------------------------------
# Palettes. Colours come in groups of look-alikes (black/charcoal/navy,
# red/crimson/maroon, ...): a look-alike identity swaps a colour for another of
# its group, and camera colour casts make the groups overlap further.
# ---------------------------------------------------------------------------

_CLOTHING_GROUPS: dict[str, dict[str, tuple[int, int, int]]] = {
    "dark": {"black": (22, 22, 25), "charcoal": (50, 50, 54), "navy": (28, 33, 72)},
    "blue": {"denim": (62, 86, 134), "royal_blue": (46, 76, 168), "steel_blue": (72, 110, 158)},
    "light_blue": {"sky_blue": (126, 170, 214), "pale_blue": (166, 194, 224)},
    "light": {"white": (236, 236, 232), "light_grey": (196, 196, 196), "cream": (230, 220, 188)},
    "grey": {"grey": (128, 128, 128), "slate": (100, 110, 122)},
    "red": {"red": (190, 32, 36), "crimson": (156, 22, 46), "maroon": (106, 26, 36)},
    "orange": {"orange": (226, 122, 36), "rust": (178, 82, 42)},
    "yellow": {"yellow": (226, 200, 56), "mustard": (194, 160, 52)},
    "green": {"green": (46, 126, 62), "olive": (102, 110, 46), "teal": (30, 114, 114)},
    "brown": {"brown": (110, 72, 42), "khaki": (176, 160, 110), "beige": (206, 188, 150)},
    "pink": {"pink": (226, 146, 176), "purple": (110, 56, 136), "magenta": (170, 50, 120)},
}
_LOWER_COLOURS = (
    "black", "charcoal", "navy", "denim", "steel_blue", "grey", "slate",
    "khaki", "beige", "brown", "olive", "white", "light_grey",
)
_HAIR_GROUPS: dict[str, dict[str, tuple[int, int, int]]] = {
    "dark_hair": {"black_hair": (20, 18, 18), "dark_brown_hair": (52, 34, 24)},
    "brown_hair": {"brown_hair": (96, 62, 36), "auburn_hair": (128, 56, 30)},
    "light_hair": {"blonde_hair": (200, 170, 112), "grey_hair": (156, 154, 150)},
}
_SKIN_GROUPS: dict[str, dict[str, tuple[int, int, int]]] = {
    "light_skin": {"skin_1": (242, 208, 184), "skin_2": (226, 186, 156)},
    "medium_skin": {"skin_3": (198, 150, 112), "skin_4": (170, 120, 84)},
    "dark_skin": {"skin_5": (126, 86, 58), "skin_6": (88, 60, 42)},
}
_SHOE_COLOURS = ("black", "white", "brown", "grey")
_SCENE_COLOURS = (
    (92, 92, 96), (120, 112, 100), (70, 78, 72), (140, 136, 128),
    (104, 88, 74), (84, 96, 110), (150, 146, 132), (60, 60, 64),
)

_COLOURS: dict[str, tuple[int, int, int]] = {}
_GROUP_OF: dict[str, str] = {}
for _groups in (_CLOTHING_GROUPS, _HAIR_GROUPS, _SKIN_GROUPS):
    for _group, _members in _groups.items():
        for _name, _rgb in _members.items():
            _COLOURS[_name] = _rgb
            _GROUP_OF[_name] = _group
_CLOTHING_COLOURS = tuple(n for g in _CLOTHING_GROUPS.values() for n in g)
_HAIR_COLOURS = tuple(n for g in _HAIR_GROUPS.values() for n in g)
_SKIN_TONES = tuple(n for g in _SKIN_GROUPS.values() for n in g)

_UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks")
_BAGS = ("none", "shoulder_bag", "backpack", "handbag")


@dataclass(frozen=True)
class NuisanceConfig:
    """Strengths of the camera and per-image nuisance; 0 switches one off.

    Changing one strength leaves every other random draw unchanged (all draws
    are made and then scaled), so a sweep over one knob compares like with like.

    Args:
        illumination: per-camera brightness gain is ``1 ± illumination`` with a
            vertical light gradient of the same order; images jitter by a third of it.
        colour_cast: per-camera multiplier on each RGB channel, ``1 ± colour_cast``.
            Larger values make the look-alike colour groups overlap across cameras.
        blur: largest Gaussian blur radius in pixels; each camera has a base
            sharpness and each image varies around it.
        scale_jitter: relative change of the person's height in the frame.
        position_jitter: shift of the person (and of the background crop) as a
            fraction of the image width / height.
        flip_probability: chance that the person is mirrored left-right (a bag
            carried on the left appears on the right).
        back_view_probability: chance that the person is seen from behind: hair
            instead of face, backpack instead of its straps, no chest emblem,
            and left/right swapped.
        occlusion_probability: chance of an occluder (pole, box or side panel)
            in front of the person.
        occlusion_size: largest fraction of the image width / height an
            occluder covers.
        background_clutter: 0 gives a plain two-tone background per camera; 1
            adds texture, fixed scene objects and up to six random shapes per image,
            some in clothing colours.
        pose_jitter: scale of per-image leg spread, arm swing and body lean.
        sensor_noise: standard deviation of additive Gaussian pixel noise (0-255 scale).
        jpeg_quality: (lowest, highest) JPEG quality; each camera and image draws within it.
    """

    illumination: float = 0.3
    colour_cast: float = 0.12
    blur: float = 1.2
    scale_jitter: float = 0.1
    position_jitter: float = 0.06
    flip_probability: float = 0.5
    back_view_probability: float = 0.3
    occlusion_probability: float = 0.25
    occlusion_size: float = 0.35
    background_clutter: float = 1.0
    pose_jitter: float = 1.0
    sensor_noise: float = 5.0
    jpeg_quality: tuple[int, int] = (55, 90)

    def __post_init__(self) -> None:
        for name in ("flip_probability", "back_view_probability", "occlusion_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NuisanceConfig.{name}={value!r} is not a probability; use a value in [0, 1].")
        bounded = {"illumination": 0.9, "colour_cast": 0.9, "scale_jitter": 0.5,
                   "position_jitter": 0.5, "occlusion_size": 1.0, "background_clutter": 1.0}
        for name, upper in bounded.items():
            value = getattr(self, name)
            if not 0.0 <= value <= upper:
                raise ValueError(f"NuisanceConfig.{name}={value!r} is out of range; use a value in [0, {upper}].")
        for name in ("blur", "pose_jitter", "sensor_noise"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"NuisanceConfig.{name}={value!r} must be a finite number >= 0.")
        low, high = self.jpeg_quality
        if not (1 <= low <= high <= 95):
            raise ValueError(
                f"NuisanceConfig.jpeg_quality={self.jpeg_quality!r} must be (low, high) with 1 <= low <= high <= 95."
            )
        # Normalise so that configs read back from JSON (lists) compare and hash equal.
        object.__setattr__(self, "jpeg_quality", (int(low), int(high)))

    @classmethod
    def off(cls) -> NuisanceConfig:
        """No nuisance: plain backgrounds, no jitter, near-lossless JPEG.

        Images of one identity under one camera are then identical, which
        isolates the appearance signal (useful for tests and for ablations).
        """
        return cls(illumination=0.0, colour_cast=0.0, blur=0.0, scale_jitter=0.0, position_jitter=0.0,
                   flip_probability=0.0, back_view_probability=0.0, occlusion_probability=0.0,
                   occlusion_size=0.0, background_clutter=0.0, pose_jitter=0.0, sensor_noise=0.0,
                   jpeg_quality=(95, 95))

    def to_dict(self) -> dict:
        """JSON-ready dict of the strengths."""
        out = dataclasses.asdict(self)
        out["jpeg_quality"] = list(self.jpeg_quality)
        return out


@dataclass(frozen=True)
class IdentityAppearance:
    """Ground-truth appearance of one synthetic identity (one row of ``identities.csv``).

    Lengths are in units of the person's height in the frame. Colour fields hold
    palette names (``identities.csv`` adds their RGB values); ``"none"`` means absent.
    ``bag_side`` / ``emblem_side`` are the person's own left or right.
    """

    pid: int
    upper_colour: str
    upper_secondary_colour: str
    upper_pattern: str
    pattern_period: float
    pattern_phase: float
    sleeves: str
    lower_colour: str
    lower_style: str
    shoes_colour: str
    body_height: float
    body_width: float
    head_size: float
    leg_length: float
    hair_colour: str
    hair_length: str
    skin_tone: str
    bag: str
    bag_colour: str
    bag_side: str
    emblem_colour: str
    emblem_side: str
    lookalike_of: int


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_synthetic_reid` wrote.

    ``gallery_images`` counts every file in ``bounding_box_test`` including
    the ``distractor_images`` (pid 0) and ``junk_images`` (pid -1).
    """

    out_dir: Path
    seed: int
    cameras: int
    train_identities: int
    test_identities: int
    train_images: int
    query_images: int
    gallery_images: int
    distractor_images: int
    junk_images: int
    seconds: float

    @property
    def total_images(self) -> int:
        """Number of JPEG files written."""
        return self.train_images + self.query_images + self.gallery_images

    def counts(self) -> dict[str, int]:
        """Counts as written to ``synth.json`` (no timing, so the file is reproducible)."""
        return {
            "train_identities": self.train_identities,
            "test_identities": self.test_identities,
            "train_images": self.train_images,
            "query_images": self.query_images,
            "gallery_images": self.gallery_images,
            "distractor_images": self.distractor_images,
            "junk_images": self.junk_images,
            "total_images": self.total_images,
        }


# ---------------------------------------------------------------------------
# Identities and layout
# ---------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _similar_colour(rng: np.random.Generator, name: str, allowed: tuple[str, ...]) -> str:
    """Another colour of the same look-alike group (itself if the group has no other allowed member)."""
    group = _GROUP_OF[name]
    others = [n for n in allowed if _GROUP_OF[n] == group and n != name]
    return _choice(rng, others) if others else name


def _random_appearance(rng: np.random.Generator, pid: int) -> IdentityAppearance:
    upper = _choice(rng, _CLOTHING_COLOURS)
    pattern = _choice(rng, ("solid", "solid") + _UPPER_PATTERNS[1:])
    secondary = _choice(rng, [c for c in _CLOTHING_COLOURS if _GROUP_OF[c] != _GROUP_OF[upper]])
    bag = _choice(rng, ("none", "none") + _BAGS[1:])
    has_emblem = rng.random() < 0.3
    return IdentityAppearance(
        pid=pid,
        upper_colour=upper,
        upper_secondary_colour=secondary if pattern != "solid" else "none",
        upper_pattern=pattern,
        pattern_period=round(float(rng.uniform(0.03, 0.075)), 4),
        pattern_phase=round(float(rng.uniform(0.0, 1.0)), 4),
        sleeves=_choice(rng, ("long", "short")),
        lower_colour=_choice(rng, _LOWER_COLOURS),
        lower_style=_choice(rng, ("trousers", "trousers", "shorts", "skirt")),
        shoes_colour=_choice(rng, _SHOE_COLOURS),
        body_height=round(float(rng.uniform(0.86, 1.0)), 4),
        body_width=round(float(rng.uniform(0.10, 0.15)), 4),
        head_size=round(float(rng.uniform(0.055, 0.075)), 4),
        leg_length=round(float(rng.uniform(0.42, 0.52)), 4),
        hair_colour=_choice(rng, _HAIR_COLOURS),
        hair_length=_choice(rng, ("short", "long")),
        skin_tone=_choice(rng, _SKIN_TONES),
        bag=bag,
        bag_colour=_choice(rng, _CLOTHING_COLOURS) if bag != "none" else "none",
        bag_side=_choice(rng, ("left", "right")) if bag != "none" else "none",
        emblem_colour=_choice(rng, _CLOTHING_COLOURS) if has_emblem else "none",
        emblem_side=_choice(rng, ("left", "right")) if has_emblem else "none",
        lookalike_of=0,
    )


def _lookalike_appearance(rng: np.random.Generator, base: IdentityAppearance, pid: int) -> IdentityAppearance:
    """A copy of ``base`` with one or two small differences (a similar colour, a bag, the stripe scale ...)."""
    changes: dict = {}
    edits = ("upper_colour", "lower_colour", "pattern", "bag", "hair", "build", "emblem")
    picks = rng.choice(len(edits), size=int(rng.integers(1, 3)), replace=False)
    for edit in (edits[int(i)] for i in picks):
        if edit == "upper_colour":
            changes["upper_colour"] = _similar_colour(rng, base.upper_colour, _CLOTHING_COLOURS)
        elif edit == "lower_colour":
            changes["lower_colour"] = _similar_colour(rng, base.lower_colour, _LOWER_COLOURS)
        elif edit == "pattern":
            changes["pattern_period"] = round(base.pattern_period * float(rng.choice([0.6, 1.6])), 4)
            changes["pattern_phase"] = round((base.pattern_phase + 0.5) % 1.0, 4)
            if base.upper_pattern == "solid":
                changes["upper_pattern"] = _choice(rng, _UPPER_PATTERNS[1:])
                changes["upper_secondary_colour"] = _similar_colour(rng, base.upper_colour, _CLOTHING_COLOURS)
        elif edit == "bag":
            if base.bag == "none":
                changes.update(bag=_choice(rng, _BAGS[1:]), bag_colour=_choice(rng, _CLOTHING_COLOURS),
                               bag_side=_choice(rng, ("left", "right")))
            else:
                changes.update(bag="none", bag_colour="none", bag_side="none")
        elif edit == "hair":
            changes["hair_colour"] = _similar_colour(rng, base.hair_colour, _HAIR_COLOURS)
        elif edit == "build":
            changes["body_height"] = round(min(1.0, max(0.86, base.body_height + float(rng.uniform(-0.06, 0.06)))), 4)
            changes["body_width"] = round(min(0.15, max(0.10, base.body_width + float(rng.uniform(-0.02, 0.02)))), 4)
        elif edit == "emblem":
            if base.emblem_colour != "none":
                changes.update(emblem_colour="none", emblem_side="none")
            else:
                changes.update(emblem_colour=_choice(rng, _CLOTHING_COLOURS), emblem_side=_choice(rng, ("left", "right")))
    return dataclasses.replace(base, pid=pid, lookalike_of=base.pid, **changes)


def _identity_appearances(identities: int, seed: int, lookalike_fraction: float) -> list[IdentityAppearance]:
    """Appearances of pids 1..identities; identity k depends only on (seed, k) and earlier identities."""
    appearances: list[IdentityAppearance] = []
    for pid in range(1, identities + 1):
        rng = np.random.default_rng([seed, _STREAM_APPEARANCE, pid])
        make_lookalike = rng.random() < lookalike_fraction
        base_index = int(rng.integers(max(1, len(appearances))))
        if make_lookalike and appearances:
            appearances.append(_lookalike_appearance(rng, appearances[base_index], pid))
        else:
            appearances.append(_random_appearance(rng, pid))
    return appearances


@dataclass(frozen=True)
class _ImageJob:
    relpath: str  # POSIX path relative to out_dir
    kind: int
    pid: int
    index: int
    camid: int
    appearance: IdentityAppearance | None


def _identity_cameras(seed: int, pid: int, cameras: int, n_images: int) -> list[int]:
    """Camera of each of the identity's images: 2..C cameras, round-robin so each sees >= 2 when possible."""
    rng = np.random.default_rng([seed, _STREAM_CAMERA_SET, pid])
    most = max(2, min(cameras, n_images // 2))
    n_cams = int(rng.integers(2, most + 1))
    chosen = sorted(int(c) + 1 for c in rng.choice(cameras, size=n_cams, replace=False))
    return [chosen[i % n_cams] for i in rng.permutation(n_images)]


def _split_queries(cams: list[int]) -> set[int]:
    """Indices to put in ``query/``: one per camera, each keeping a gallery match from another camera."""
    queries: set[int] = set()
    for cam in sorted(set(cams)):
        candidate = cams.index(cam)
        trial = queries | {candidate}
        gallery_cams = [c for i, c in enumerate(cams) if i not in trial]
        if all(any(g != cams[q] for g in gallery_cams) for q in trial):
            queries = trial
    return queries


def _plan_layout(
    appearances: list[IdentityAppearance],
    *,
    seed: int,
    cameras: int,
    images_per_identity: int,
    distractors: int,
    junk: int,
) -> tuple[list[_ImageJob], list[str]]:
    """All image jobs with their Market-1501 file names, and the split ("train"/"test") of each identity."""
    rng = np.random.default_rng([seed, _STREAM_LAYOUT])
    n_ids = len(appearances)
    train_pids = set(int(p) + 1 for p in rng.permutation(n_ids)[: n_ids // 2])
    frame_of_camera = {cam: 0 for cam in range(1, cameras + 1)}

    def next_frame(cam: int) -> int:
        # Frames increase along each camera's "video", like Market-1501's frame numbers.
        frame_of_camera[cam] += int(rng.integers(1, 26))
        return frame_of_camera[cam]

    jobs: list[_ImageJob] = []
    splits: list[str] = []
    for app in appearances:
        cams = _identity_cameras(seed, app.pid, cameras, images_per_identity)
        is_train = app.pid in train_pids
        splits.append("train" if is_train else "test")
        queries = set() if is_train else _split_queries(cams)
        for index, cam in enumerate(cams):
            folder = TRAIN_DIR if is_train else (QUERY_DIR if index in queries else GALLERY_DIR)
            name = f"{app.pid:04d}_c{cam}s1_{next_frame(cam):06d}_00.jpg"
            jobs.append(_ImageJob(f"{folder}/{name}", _KIND_IDENTITY_IMAGE, app.pid, index, cam, app))
    for kind, count, prefix in ((_KIND_DISTRACTOR, distractors, "0000"), (_KIND_JUNK, junk, "-1")):
        for index in range(count):
            cam = int(rng.integers(1, cameras + 1))
            name = f"{prefix}_c{cam}s1_{next_frame(cam):06d}_00.jpg"
            jobs.append(_ImageJob(f"{GALLERY_DIR}/{name}", kind, 0 if kind == _KIND_DISTRACTOR else -1, index, cam, None))
    if max(frame_of_camera.values()) > 999_999:
        raise ValueError(
            "Too many images per camera for Market-1501's 6-digit frame numbers; "
            "use more cameras or fewer identities/images."
        )
    return jobs, splits


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Camera:
    gain: float
    cast: tuple[float, float, float]
    gradient: float  # brightness change from top to bottom of the frame
    blur_base: float  # fraction of NuisanceConfig.blur
    jpeg_base: float  # position within NuisanceConfig.jpeg_quality


@lru_cache(maxsize=64)
def _camera(seed: int, camid: int, size: tuple[int, int], nuisance: NuisanceConfig) -> tuple[_Camera, np.ndarray]:
    """The camera's photometric settings and its background scene (float32, larger than the frame)."""
    rng = np.random.default_rng([seed, _STREAM_CAMERA, camid])
    height, width = size
    gain_u, gradient_u, blur_u, jpeg_u = rng.uniform(-1.0, 1.0, 4)
    cast_u = rng.uniform(-1.0, 1.0, 3)
    wall, floor = rng.choice(len(_SCENE_COLOURS), size=2, replace=False)
    horizon_u = rng.uniform(0.55, 0.8)
    texture_grid = rng.standard_normal((6, 4, 3)).astype(np.float32)
    objects = rng.random((4, 7))

    cast = 1.0 + nuisance.colour_cast * cast_u
    cast = cast / cast.mean()  # a cast changes hue, the gain changes brightness
    camera = _Camera(
        gain=float(1.0 + nuisance.illumination * gain_u),
        cast=tuple(float(c) for c in cast),
        gradient=float(0.6 * nuisance.illumination * gradient_u),
        blur_base=float(0.5 * (blur_u + 1.0)),
        jpeg_base=float(0.5 * (jpeg_u + 1.0)),
    )

    margin_y, margin_x = math.ceil(0.5 * height * 0.5), math.ceil(0.5 * width * 0.5)
    scene_h, scene_w = height + 2 * margin_y, width + 2 * margin_x
    scene = np.empty((scene_h, scene_w, 3), np.float32)
    horizon = int(horizon_u * scene_h)
    scene[:horizon] = _SCENE_COLOURS[int(wall)]
    scene[horizon:] = _SCENE_COLOURS[int(floor)]
    clutter = nuisance.background_clutter
    if clutter > 0:
        # Smooth low-frequency texture: bilinear upsampling of a coarse random grid.
        rows = _linear_upsampler(texture_grid.shape[0], scene_h)
        cols = _linear_upsampler(texture_grid.shape[1], scene_w)
        scene += 28.0 * clutter * np.einsum("yi,ijc,xj->yxc", rows, texture_grid, cols)
        image = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for obj in objects[: int(round(4 * clutter))]:
            colour = _SCENE_COLOURS[int(obj[0] * len(_SCENE_COLOURS))]
            shade = 0.6 + 0.8 * obj[6]
            fill = tuple(int(min(255, c * shade)) for c in colour)
            if obj[1] < 0.4:  # pole or door frame
                x0 = obj[2] * scene_w
                draw.rectangle([x0, 0, x0 + 1 + obj[3] * 0.12 * scene_w, scene_h], fill=fill)
            else:  # window, sign or doorway
                x0, y0 = obj[2] * scene_w, obj[4] * horizon
                draw.rectangle([x0, y0, x0 + (0.15 + 0.35 * obj[3]) * scene_w,
                                y0 + (0.1 + 0.3 * obj[5]) * scene_h], fill=fill)
        scene = np.asarray(image, dtype=np.float32)
    return camera, scene


def _linear_upsampler(coarse: int, fine: int) -> np.ndarray:
    """(fine, coarse) matrix of bilinear interpolation weights."""
    pos = np.linspace(0.0, coarse - 1.0, fine)
    lower = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lower
    weights = np.zeros((fine, coarse), np.float32)
    weights[np.arange(fine), lower] = 1.0 - frac
    weights[np.arange(fine), lower + 1] = frac
    return weights


@lru_cache(maxsize=8)
def _pixel_centres(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    return ys, xs


def _capsule(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], radius: float) -> np.ndarray:
    """Mask of points within ``radius`` of the segment p0-p1 (coordinates (u, v))."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv + 1e-12), 0.0, 1.0)
    return (u - p0[0] - t * du) ** 2 + (v - p0[1] - t * dv) ** 2 < radius * radius


def _rgb(name: str) -> np.ndarray:
    return np.asarray(_COLOURS[name], np.float32)


@dataclass(frozen=True)
class _Pose:
    back_view: bool
    mirrored: bool
    leg_spread: float
    arm_swing: tuple[float, float]
    lean: float


def _paint_person(
    canvas: np.ndarray,
    app: IdentityAppearance,
    pose: _Pose,
    *,
    centre_x: float,
    top_y: float,
    height_px: float,
) -> None:
    """Composite one person onto ``canvas`` (H, W, 3) float32, in place.

    Drawing happens in person coordinates: ``v`` runs from 0 (top of head) to 1
    (soles), ``u`` is horizontal in the same units, 0 on the body axis.
    """
    ys, xs = _pixel_centres(canvas.shape[:2])
    u = (xs - centre_x) / height_px
    v = (ys - top_y) / height_px
    u, v = np.broadcast_arrays(u, v)
    if pose.mirrored:
        u = -u
    # +1 where the person's own left appears at positive u: facing the camera
    # their left is on the image right; seen from behind it is on the left.
    left_sign = -1.0 if pose.back_view else 1.0

    def side_sign(side: str) -> float:
        return left_sign if side == "left" else -left_sign

    hs, bw = app.head_size, app.body_width
    head_v = hs + 0.005
    torso_top = 2 * hs + 0.02
    waist = 1.0 - app.leg_length
    ub = u - pose.lean * (waist - v)  # upper body leans, the feet stay put
    person = np.zeros(u.shape, bool)

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        canvas[mask] = colour if colour.ndim == 1 else colour[mask]
        person[mask] = True

    upper, lower, skin = _rgb(app.upper_colour), _rgb(app.lower_colour), _rgb(app.skin_tone)
    hair, shoes = _rgb(app.hair_colour), _rgb(app.shoes_colour)
    if app.upper_pattern == "solid":
        upper_fill = upper
    else:
        # Pattern coordinates follow the body, so stripes scale and mirror with it.
        phase = app.pattern_phase * app.pattern_period
        h_stripe = np.mod(v + phase, app.pattern_period) < 0.5 * app.pattern_period
        v_stripe = np.mod(ub + phase, app.pattern_period) < 0.5 * app.pattern_period
        second = {"hstripes": h_stripe, "vstripes": v_stripe, "checks": h_stripe ^ v_stripe}[app.upper_pattern]
        upper_fill = np.where(second[..., None], _rgb(app.upper_secondary_colour), upper)

    bag_colour = _rgb(app.bag_colour) if app.bag != "none" else None
    in_torso_rows = (v > torso_top) & (v < waist + 0.04)
    taper = bw * (1.0 - 0.12 * np.clip((v - torso_top) / (waist - torso_top), 0.0, 1.0))
    shoulders = np.sqrt(np.clip((v - torso_top) / 0.03, 0.0, 1.0))  # rounded shoulders
    torso = in_torso_rows & (np.abs(ub) < taper * (0.55 + 0.45 * shoulders))
    long_hair = (np.abs(ub) < 1.05 * hs) & (v > head_v) & (v < torso_top + 0.1) & (app.hair_length == "long")

    # Behind the body (front view): backpack body, long hair.
    if app.bag == "backpack" and not pose.back_view:
        paint((np.abs(ub) < bw + 0.02) & (v > torso_top + 0.03) & (v < waist - 0.03), bag_colour * 0.8)
    if not pose.back_view:
        paint(long_hair, hair)

    # Legs, hips, shoes.
    hip_u, foot_v = 0.45 * bw, 0.965
    leg_r = 0.26 * bw
    knee_v = waist + 0.45 * (foot_v - waist)
    for sign in (-1.0, 1.0):
        hip = (sign * hip_u, waist + 0.03)
        foot = (sign * (hip_u + pose.leg_spread), foot_v)
        leg = _capsule(u, v, hip, foot, leg_r)
        if app.lower_style == "trousers":
            paint(leg, lower)
        else:
            paint(leg & (v > knee_v), skin)
            paint(leg & (v <= knee_v), lower)
        paint(_capsule(u, v, foot, (foot[0] + sign * 0.035, foot_v + 0.005), 0.022), shoes)
    paint((np.abs(u) < 0.9 * bw) & (v > waist - 0.01) & (v < waist + 0.08), lower)
    if app.lower_style == "skirt":
        flare = 0.9 * bw + 0.35 * np.clip(v - waist, 0.0, None)
        paint((np.abs(u) < flare) & (v > waist) & (v < waist + 0.5 * app.leg_length), lower)

    # Torso, emblem, neck.
    paint(torso, upper_fill)
    if app.emblem_colour != "none" and not pose.back_view:
        eu, ev = side_sign(app.emblem_side) * 0.45 * bw, torso_top + 0.07
        paint((np.abs(ub - eu) < 0.022) & (np.abs(v - ev) < 0.022), _rgb(app.emblem_colour))
    paint((np.abs(ub) < 0.32 * hs) & (v > head_v + 0.6 * hs) & (v <= torso_top + 0.005), skin)

    # Arms; remember the hands for a handbag.
    hands = {}
    arm_r, arm_len = 0.22 * bw, 0.36
    for sign, swing in ((-1.0, pose.arm_swing[0]), (1.0, pose.arm_swing[1])):
        shoulder = (sign * (bw + 0.6 * arm_r), torso_top + 0.025)
        angle = 0.08 + swing
        hand = (shoulder[0] + sign * arm_len * math.sin(angle), shoulder[1] + arm_len * math.cos(angle))
        hands[sign] = hand
        arm = _capsule(ub, v, shoulder, hand, arm_r)
        along = np.clip((v - shoulder[1]) / (hand[1] - shoulder[1]), 0.0, 1.0)
        sleeve_end = 0.85 if app.sleeves == "long" else 0.4
        paint(arm & (along > sleeve_end), skin)
        paint(arm & (along <= sleeve_end), upper_fill)

    # Bags in front.
    if app.bag == "shoulder_bag":
        s = side_sign(app.bag_side)
        paint(_capsule(ub, v, (-s * 0.7 * bw, torso_top + 0.01), (s * (bw + 0.02), waist - 0.06), 0.009), bag_colour)
        paint((np.abs(ub - s * (bw + 0.035)) < 0.045) & (np.abs(v - (waist - 0.02)) < 0.05), bag_colour)
    elif app.bag == "backpack":
        if pose.back_view:
            pack = (np.abs(ub) < 0.8 * bw) & (v > torso_top + 0.04) & (v < waist - 0.01)
            paint(pack, bag_colour)
            paint(pack & (v < torso_top + 0.09), bag_colour * 0.75)  # flap
        else:
            for sign in (-1.0, 1.0):
                paint(_capsule(ub, v, (sign * 0.55 * bw, torso_top), (sign * 0.55 * bw, waist - 0.08), 0.012), bag_colour)
    elif app.bag == "handbag":
        hu, hv = hands[side_sign(app.bag_side)]
        paint((np.abs(ub - hu) < 0.035) & (v > hv) & (v < hv + 0.075), bag_colour)

    # Head and hair.
    head = ((ub / (0.8 * hs)) ** 2 + ((v - head_v) / hs) ** 2) < 1.0
    paint(head, hair if pose.back_view else skin)
    if not pose.back_view:
        paint(head & (v < head_v - 0.35 * hs), hair)
    else:
        paint(long_hair, hair)

    # Round bodies look brighter in the middle than at the silhouette.
    shading = np.clip(1.0 - 0.22 * (ub / (bw + 0.05)) ** 2, 0.6, 1.0)
    canvas[person] *= shading[person][:, None]


def _render_image(job: _ImageJob, *, seed: int, size: tuple[int, int], nuisance: NuisanceConfig) -> bytes:
    """JPEG bytes of one image. Every random draw is made whatever the strengths, then scaled."""
    height, width = size
    rng = np.random.default_rng([seed, job.kind, max(job.pid, 0), job.index])
    camera, scene = _camera(seed, job.camid, size, nuisance)
    if job.kind == _KIND_DISTRACTOR:
        appearance = _random_appearance(rng, 0)
    elif job.kind == _KIND_JUNK:
        appearance = _random_appearance(rng, -1) if rng.random() < 0.5 else None
    else:
        appearance = job.appearance

    back_u, mirror_u, scale_u = rng.random(), rng.random(), rng.uniform(-1.0, 1.0)
    shift_u = rng.uniform(-1.0, 1.0, 2)
    spread_u, lean_u = rng.random(), rng.uniform(-1.0, 1.0)
    swing_u = rng.uniform(-1.0, 1.0, 2)
    crop_u = rng.uniform(-1.0, 1.0, 2)
    shapes_u = rng.random((6, 7))
    occ_u, occ_kind_u = rng.random(), rng.random()
    occ_params = rng.random(4)
    gain_u, blur_u, jpeg_u = rng.uniform(-1.0, 1.0), rng.random(), rng.random()
    badbox_u = rng.random(3)
    noise = rng.standard_normal((height, width, 3)).astype(np.float32)

    # Background: a crop of the camera's scene that moves with the framing, plus clutter.
    margin_y, margin_x = (scene.shape[0] - height) // 2, (scene.shape[1] - width) // 2
    oy = margin_y + int(round(crop_u[0] * min(margin_y, nuisance.position_jitter * height * 2)))
    ox = margin_x + int(round(crop_u[1] * min(margin_x, nuisance.position_jitter * width * 2)))
    canvas = scene[oy: oy + height, ox: ox + width].copy()
    ys, xs = _pixel_centres(size)
    n_shapes = int(round(6 * nuisance.background_clutter * (1.0 if job.kind != _KIND_JUNK else 1.5)))
    for shape in shapes_u[: min(n_shapes, len(shapes_u))]:
        cx, cy = shape[0] * width, shape[1] * height
        rx, ry = (0.05 + 0.25 * shape[2]) * width, (0.03 + 0.15 * shape[3]) * height
        colour = _rgb(_CLOTHING_COLOURS[int(shape[4] * len(_CLOTHING_COLOURS))]) if shape[5] < 0.5 \
            else np.asarray(_SCENE_COLOURS[int(shape[4] * len(_SCENE_COLOURS))], np.float32)
        if shape[6] < 0.5:
            mask = (np.abs(xs - cx) < rx) & (np.abs(ys - cy) < ry)
        else:
            mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1.0
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour  # half-transparent: clutter, not a second person

    if appearance is not None:
        pose = _Pose(
            back_view=bool(back_u < nuisance.back_view_probability),
            mirrored=bool(mirror_u < nuisance.flip_probability),
            leg_spread=0.02 + 0.05 * nuisance.pose_jitter * spread_u,
            arm_swing=tuple(float(0.25 * nuisance.pose_jitter * s) for s in swing_u),
            lean=float(0.04 * nuisance.pose_jitter * lean_u),
        )
        height_px = 0.9 * height * appearance.body_height * (1.0 + nuisance.scale_jitter * scale_u)
        centre_x = 0.5 * width + nuisance.position_jitter * width * shift_u[0]
        top_y = 0.97 * height - height_px + nuisance.position_jitter * height * shift_u[1]
        if job.kind != _KIND_IDENTITY_IMAGE:
            # Distractors and junk are bad detections: wrong scale, off centre, often a fragment.
            zoom = 0.6 + 1.4 * badbox_u[0] if job.kind == _KIND_DISTRACTOR else 2.0 + 1.5 * badbox_u[0]
            height_px *= zoom
            centre_x += (badbox_u[1] - 0.5) * 0.8 * width
            top_y += (badbox_u[2] - 0.5) * 0.8 * height
        _paint_person(canvas, appearance, pose, centre_x=centre_x, top_y=top_y, height_px=height_px)

    if occ_u < nuisance.occlusion_probability and nuisance.occlusion_size > 0:
        extent = nuisance.occlusion_size * (0.4 + 0.6 * occ_params[0])
        colour = np.asarray(_SCENE_COLOURS[int(occ_params[1] * len(_SCENE_COLOURS))], np.float32)
        if occ_kind_u < 1 / 3:  # pole across the whole height
            half = 0.5 * extent * 0.5 * width
            cx = occ_params[2] * width
            mask = np.broadcast_to(np.abs(xs - cx) < max(half, 1.0), (height, width))
        elif occ_kind_u < 2 / 3:  # box, bench or car in front of the legs
            mask = np.broadcast_to(ys > height * (1.0 - extent), (height, width))
        else:  # panel or passer-by from one side
            edge = extent * width
            side = xs < edge if occ_params[2] < 0.5 else xs > width - edge
            mask = side & (ys > height * 0.4 * occ_params[3])
        canvas[mask] = colour * (0.85 + 0.3 * occ_params[3])

    # Camera photometry: gain, colour cast, vertical light gradient.
    gain = camera.gain * (1.0 + nuisance.illumination / 3.0 * gain_u)
    gradient = 1.0 + camera.gradient * ((ys / height) - 0.5)
    canvas *= gain * np.asarray(camera.cast, np.float32) * gradient[..., None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    radius = nuisance.blur * camera.blur_base * (0.5 + blur_u)
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius=radius))
    if nuisance.sensor_noise > 0:
        noisy = np.asarray(image, np.float32) + nuisance.sensor_noise * noise
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    low, high = nuisance.jpeg_quality
    quality = int(round(low + (high - low) * (0.5 * camera.jpeg_base + 0.5 * jpeg_u)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden temp file in the same folder, then rename: the final name never holds a partial file."""
    atomic_write_bytes(path, data, fsync=False)


def _render_chunk(out_dir: str, jobs: list[_ImageJob], seed: int, size: tuple[int, int], nuisance: NuisanceConfig) -> int:
    root = Path(out_dir)
    for job in jobs:
        _atomic_write_bytes(root / job.relpath, _render_image(job, seed=seed, size=size, nuisance=nuisance))
    return len(jobs)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"Output path {out_dir} exists and is not a folder; choose a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output folder {out_dir} already exists and is not empty; choose a new folder "
                "or pass overwrite=True to replace the synthetic dataset in it."
            )
        # Remove only what this generator writes, so stale images of a larger run cannot leak in.
        for folder in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        for name in (IDENTITIES_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    for folder in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)


def _check_int_range(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"generate_synthetic_reid: {name} must be an int, got {type(value).__name__}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"generate_synthetic_reid: {name}={value} is out of range; use a value {bound}.")


def generate_synthetic_reid(
    out_dir: str | os.PathLike[str],
    *,
    identities: int = 100,
    cameras: int = 6,
    images_per_identity: int = 8,
    size: tuple[int, int] = (128, 64),
    seed: int = 0,
    distractors: int = 20,
    junk: int = 10,
    lookalike_fraction: float = 0.3,
    nuisance: NuisanceConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> SynthSummary:
    """Write a synthetic ReID dataset in the Market-1501 layout.

    Identities 1..``identities`` are split at random into a training half and a
    test half (disjoint). Each identity is seen by 2 to ``cameras`` cameras; a
    test identity contributes one image per camera to ``query/`` (as long as
    another camera's image stays in the gallery to match it) and the rest to
    ``bounding_box_test/``, which also receives the distractors and junk.

    Args:
        out_dir: folder to create; must be absent or empty unless ``overwrite``.
        identities: number of identities (>= 2); the train half gets ``identities // 2``.
        cameras: number of cameras, 2..9 (Market names hold a one-digit camera id).
        images_per_identity: images drawn of every identity (>= 2).
        size: (height, width) of every image in pixels.
        seed: non-negative seed; the same seed and arguments give the same bytes.
        distractors: images of people outside the identity set (pid 0, ``0000_``
            prefix), framed like poor detections.
        junk: images that are mostly background or a body fragment (pid -1, ``-1_`` prefix).
        lookalike_fraction: chance that an identity copies an earlier one and
            changes only one or two attributes to similar values. Raise it to make
            the task harder.
        nuisance: camera and per-image nuisance strengths; `NuisanceConfig()` by default.
        workers: processes used for rendering; 1 renders in this process (about
            3.5 s per 1,000 images of 128x64 on one core). The output does not
            depend on it. Workers are spawned, so a script calling this with
            ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
        overwrite: replace the dataset already in ``out_dir`` (only the files and
            folders this function writes are removed first).

    Returns:
        A `SynthSummary` with counts and the wall time. ``synth.json`` is written
        last, so its presence marks a completed run.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    _check_int_range("identities", identities, 2)
    _check_int_range("cameras", cameras, 2, 9)
    _check_int_range("images_per_identity", images_per_identity, 2)
    _check_int_range("seed", seed, 0)
    _check_int_range("distractors", distractors, 0)
    _check_int_range("junk", junk, 0)
    _check_int_range("workers", workers, 1)
    if len(size) != 2:
        raise ValueError(f"generate_synthetic_reid: size={size!r} must be (height, width).")
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 16:
        raise ValueError(f"generate_synthetic_reid: size={size!r} is too small to draw a person; use at least (32, 16).")
    if not 0.0 <= lookalike_fraction <= 1.0:
        raise ValueError(
            f"generate_synthetic_reid: lookalike_fraction={lookalike_fraction!r} must be in [0, 1]."
        )
    nuisance = nuisance if nuisance is not None else NuisanceConfig()
    if not isinstance(nuisance, NuisanceConfig):
        raise TypeError(f"generate_synthetic_reid: nuisance must be a NuisanceConfig, got {type(nuisance).__name__}.")
    out_path = Path(out_dir)

    started = time.perf_counter()
    # Plan first: a layout error must not leave an empty tree behind.
    appearances = _identity_appearances(identities, seed, lookalike_fraction)
    jobs, splits = _plan_layout(appearances, seed=seed, cameras=cameras, images_per_identity=images_per_identity,
                                distractors=distractors, junk=junk)
    _prepare_out_dir(out_path, overwrite)

    size_hw = (height, width)
    if workers == 1:
        _render_chunk(str(out_path), jobs, seed, size_hw, nuisance)
    else:
        chunk = max(16, math.ceil(len(jobs) / (4 * workers)))
        chunks = [jobs[i: i + chunk] for i in range(0, len(jobs), chunk)]
        # spawn, not fork: the caller may hold torch threads or CUDA state that fork would copy half-way.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_render_chunk, str(out_path), c, seed, size_hw, nuisance) for c in chunks]
            for future in futures:
                future.result()

    train_images = sum(job.relpath.startswith(TRAIN_DIR + "/") for job in jobs)
    query_images = sum(job.relpath.startswith(QUERY_DIR + "/") for job in jobs)
    summary = SynthSummary(
        out_dir=out_path,
        seed=seed,
        cameras=cameras,
        train_identities=splits.count("train"),
        test_identities=splits.count("test"),
        train_images=train_images,
        query_images=query_images,
        gallery_images=len(jobs) - train_images - query_images,
        distractor_images=distractors,
        junk_images=junk,
        seconds=0.0,
    )

    cameras_of: dict[int, set[int]] = {}
    for job in jobs:
        cameras_of.setdefault(job.pid, set()).add(job.camid)
    rows = []
    for app, split in zip(appearances, splits):
        row = {"pid": app.pid, "split": split, "images": images_per_identity,
               "cameras": ";".join(str(c) for c in sorted(cameras_of[app.pid]))}
        row.update({k: v for k, v in dataclasses.asdict(app).items() if k != "pid"})
        for field in ("upper_colour", "lower_colour", "hair_colour", "skin_tone"):
            row[f"{field}_rgb"] = "#%02x%02x%02x" % _COLOURS[row[field]]
        rows.append(row)
    _atomic_write_bytes(out_path / IDENTITIES_FILE, pd.DataFrame(rows).to_csv(index=False).encode())

    record = {
        "generator": "fat_distill.data.synth.generate_synthetic_reid",
        "format_version": SYNTH_FORMAT_VERSION,
        "layout": "market1501",
        "parameters": {
            "identities": identities, "cameras": cameras, "images_per_identity": images_per_identity,
            "size": [height, width], "seed": seed, "distractors": distractors, "junk": junk,
            "lookalike_fraction": lookalike_fraction, "nuisance": nuisance.to_dict(),
        },
        "folders": {"train": TRAIN_DIR, "query": QUERY_DIR, "gallery": GALLERY_DIR},
        "counts": summary.counts(),
    }
    _atomic_write_bytes(out_path / SUMMARY_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return dataclasses.replace(summary, seconds=round(time.perf_counter() - started, 3))

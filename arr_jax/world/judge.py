"""Programmatic judge of the synthetic world: rubric criteria checked by image analysis.

Per image (uint8 (H, W, 3)): foreground = max channel > ``fg_threshold``; connected
components (4-connectivity) with area >= ``min_area`` are objects, smaller ones are specks.
Each object is analysed on a soft mask (its brightness / its peak, robust to blur):
colour = nearest palette chromaticity of its half-peak pixels' mean, shape = nearest
prototype in (vertical skewness, diagonal-vs-axis kurtosis gap) moment space,
count = number of objects, position = where the objects' mass lies relative to the canvas
halves. Criteria (each a binary check on one image):

  colour    every object has the prompt's colour
  shape     every object has the prompt's shape
  count     the number of objects equals the prompt's count
  position  all objects lie in the prompt's half (and the layout reads as that side)
  clean_background  few stray foreground pixels/specks and a dark background
                    (reported; not part of the reward decision by default)

A criterion whose attribute is absent from the prompt passes vacuously.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from arr_jax.judge.base import Criterion, PairwiseBatch, Rubric
from arr_jax.world import spec
from arr_jax.world.render import PALETTE

CRITERIA: tuple[str, ...] = ("colour", "shape", "count", "position", "clean_background")
_FOUR = ndimage.generate_binary_structure(2, 1)

# Chromaticity of the palette: colour / its max channel.
_CHROMA = PALETTE / PALETTE.max(axis=1, keepdims=True)

# Shape prototypes in feature space (skew, kurtosis gap); see _shape_features. Clean
# renders sit at square (0, 0.58) and triangle (-0.57, 0); blur shrinks both toward the
# circle's (0, 0), so the prototypes sit nearer the circle (boundaries at +-0.2).
_SHAPE_PROTOS = np.array([
    [0.0, 0.0],     # circle
    [0.0, 0.4],     # square
    [-0.4, 0.0],    # triangle (apex up)
], np.float32)
_SHARPEN = 2.0  # soft mask -> clip((w - 0.5) * _SHARPEN + 0.5, 0, 1): partial de-blur


@dataclasses.dataclass
class Detection:
    """What ``describe`` sees in one image.

    count: number of objects; colours / shapes: per-object names; position: detected side
    (None if no objects); in_half: side -> fraction of object mass inside that half;
    stray_pixels: foreground pixels outside objects; background_level: mean max-channel
    value of the background; boxes: per-object half-peak (y0, x0, y1, x1); features:
    per-object (skew, kurt_gap), see _shape_features.
    """

    count: int
    colours: list[str]
    shapes: list[str]
    position: str | None
    in_half: dict[str, float]
    stray_pixels: int
    background_level: float
    boxes: list[tuple[int, int, int, int]]
    features: list[tuple[float, float]]

    @property
    def colour(self) -> str | None:
        """The objects' colour if they all agree, else None."""
        return self.colours[0] if self.colours and len(set(self.colours)) == 1 else None

    @property
    def shape(self) -> str | None:
        return self.shapes[0] if self.shapes and len(set(self.shapes)) == 1 else None


def _shape_features(w: np.ndarray) -> tuple[float, float]:
    """Moment features of one object's soft mask w (h, w) >= 0 (coverage estimate).

    skew: vertical skewness (an apex-up triangle has ~-0.57, circle and square 0);
    kurt_gap: mean kurtosis of the diagonal projections minus that of the axis projections
    (square ~+0.6: uniform vs triangular profile; circle 0). Both are scale-invariant and
    change little under blur, unlike fill ratios of thresholded masks. The mask is
    sharpened around 0.5 first, which undoes part of a blur.
    """
    w = np.clip((w - 0.5) * _SHARPEN + 0.5, 0.0, 1.0)
    h, wd = w.shape
    yy, xx = np.mgrid[:h, :wd].astype(np.float32)
    r = np.float32(0.70710678)
    u = np.stack([yy, xx, (xx + yy) * r, (xx - yy) * r]).reshape(4, -1)  # projections
    p = w.reshape(-1) / max(float(w.sum()), 1e-6)
    u = u - (u @ p)[:, None]
    u2 = u * u
    s2 = np.maximum(u2 @ p, 1e-6)
    skew = float((u2[0] * u[0]) @ p) / float(s2[0]) ** 1.5
    kurt = (u2 * u2) @ p / s2 ** 2  # (4,): y, x, diagonal, anti-diagonal
    return skew, float(0.5 * (kurt[2] + kurt[3]) - 0.5 * (kurt[0] + kurt[1]))


def _classify_shape(feat: tuple[float, float]) -> str:
    d = ((np.asarray(feat, np.float32)[None] - _SHAPE_PROTOS) ** 2).sum(axis=1)
    return spec.SHAPES[int(np.argmin(d))]


def _classify_colour(mean_rgb: np.ndarray) -> str:
    c = mean_rgb / max(float(mean_rgb.max()), 1e-3)
    return spec.COLOURS[int(np.argmin(((c[None] - _CHROMA) ** 2).sum(axis=1)))]


class WorldJudge:
    """Programmatic pairwise judge for world prompts (implements ``judge.base.Judge``).

    Args:
      reward_criteria: criteria whose satisfied count decides ``compare``.
      fg_threshold: max-channel value (0..255) above which a pixel is foreground.
      min_area: components smaller than this (px) are specks, not objects.
      max_stray: clean_background allows at most this many stray foreground pixels.
      max_background: clean_background requires the mean background level below this.
      position_fraction: position needs at least this fraction of object mass in the half.
      soft_floor: soft-mask values (fraction of an object's peak) below this count as 0.
      temperature: 0 -> hard p_first in {0, 0.5, 1}; > 0 -> sigmoid(diff / temperature).
    """

    name = "world"

    def __init__(
        self,
        reward_criteria: Sequence[str] = ("colour", "shape", "count", "position"),
        fg_threshold: float = 64.0,
        min_area: int = 6,
        max_stray: int = 3,
        max_background: float = 40.0,
        position_fraction: float = 0.9,
        soft_floor: float = 0.15,
        temperature: float = 0.0,
    ):
        bad = [c for c in reward_criteria if c not in CRITERIA]
        if bad:
            raise ValueError(f"unknown criteria {bad}; expected a subset of {CRITERIA}")
        self.reward_criteria = tuple(reward_criteria)
        self.fg_threshold = fg_threshold
        self.min_area = min_area
        self.max_stray = max_stray
        self.max_background = max_background
        self.position_fraction = position_fraction
        self.soft_floor = soft_floor
        self.temperature = temperature

    # -- analysis ------------------------------------------------------------------------

    def describe(self, image: np.ndarray) -> Detection:
        """Detected attributes of one uint8 (H, W, 3) image."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        x = img.astype(np.float32)
        v = x.max(axis=-1)
        hgt, wid = v.shape
        fg = v > self.fg_threshold
        labels, n = ndimage.label(fg, structure=_FOUR)
        objs = ndimage.find_objects(labels)
        areas = ndimage.sum_labels(np.ones_like(v), labels, index=np.arange(1, n + 1)) if n else []
        colours, shapes, boxes, feats = [], [], [], []
        obj_mask = np.zeros_like(fg)
        mass = np.zeros_like(v)
        for k in range(n):
            if areas[k] < self.min_area:
                continue
            # Work on the component's box grown by 2 px (blur tails), excluding other
            # components' pixels.
            sl = tuple(slice(max(q.start - 2, 0), q.stop + 2) for q in objs[k])
            comp = labels[sl] == k + 1
            region = ndimage.binary_dilation(comp, structure=_FOUR) & ~(fg[sl] & ~comp)
            peak = float(np.percentile(v[sl][comp], 90))
            w = np.clip(v[sl] / max(peak, 1.0), 0.0, 1.0) * region
            w = np.where(w > self.soft_floor, w, 0.0).astype(np.float32)
            core = w >= 0.5
            if core.sum() < 3:
                continue
            obj_mask[sl] |= comp
            mass[sl] += w
            feats.append(_shape_features(w))
            shapes.append(_classify_shape(feats[-1]))
            colours.append(_classify_colour(x[sl][core].mean(axis=0)))
            ys, xs = np.nonzero(core)
            boxes.append((sl[0].start + int(ys.min()), sl[1].start + int(xs.min()),
                          sl[0].start + int(ys.max()) + 1, sl[1].start + int(xs.max()) + 1))
        # Position from the objects' mass.
        total = float(mass.sum())
        in_half = {}
        position = None
        if total > 0:
            in_half = {
                "left": float(mass[:, : wid // 2].sum()) / total,
                "right": float(mass[:, wid // 2:].sum()) / total,
                "top": float(mass[: hgt // 2].sum()) / total,
                "bottom": float(mass[hgt // 2:].sum()) / total,
            }
            yy, xx = np.mgrid[:hgt, :wid]
            dx = float((mass * (xx + 0.5)).sum()) / total - wid / 2
            dy = float((mass * (yy + 0.5)).sum()) / total - hgt / 2
            if abs(dx) >= abs(dy):
                position = "left" if dx < 0 else "right"
            else:
                position = "top" if dy < 0 else "bottom"
        # Background: stray foreground outside objects (grown by 1 px, diagonals included).
        near = ndimage.binary_dilation(obj_mask, structure=np.ones((3, 3), bool))
        stray = int((fg & ~near).sum())
        bg = ~near
        background_level = float(v[bg].mean()) if bg.any() else 0.0
        return Detection(count=len(shapes), colours=colours, shapes=shapes,
                         position=position, in_half=in_half, stray_pixels=stray,
                         background_level=background_level, boxes=boxes, features=feats)

    def verdicts(self, prompt: spec.Prompt, det: Detection) -> dict[str, bool]:
        """All criteria for one parsed prompt and one detection (absent attribute -> True)."""
        has = det.count > 0
        out = {
            "colour": prompt.colour is None or (has and all(c == prompt.colour for c in det.colours)),
            "shape": prompt.shape is None or (has and all(s == prompt.shape for s in det.shapes)),
            "count": prompt.count is None or det.count == prompt.count,
            "position": prompt.position is None or (
                has and det.position == prompt.position
                and det.in_half.get(prompt.position, 0.0) >= self.position_fraction),
            "clean_background": det.stray_pixels <= self.max_stray
            and det.background_level <= self.max_background,
        }
        return {k: bool(v) for k, v in out.items()}

    def check(self, prompts: Sequence[str], images: np.ndarray) -> dict[str, np.ndarray]:
        """Pointwise verdicts: name -> (B,) bool for every criterion in CRITERIA.

        prompts: B world captions (ValueError if one does not parse); images uint8 (B,H,W,3).
        """
        images = np.asarray(images)
        if images.ndim != 4 or len(images) != len(prompts):
            raise ValueError(f"expected (B={len(prompts)}, H, W, 3) images, got {images.shape}")
        parsed = [spec.parse_prompt(p) for p in prompts]
        out = {k: np.zeros(len(prompts), bool) for k in CRITERIA}
        for i, (p, im) in enumerate(zip(parsed, images)):
            for k, v in self.verdicts(p, self.describe(im)).items():
                out[k][i] = v
        return out

    def rubric(self, prompt: str | spec.Prompt) -> Rubric:
        """The criteria derived from a prompt, as a Rubric (reward criteria first)."""
        p = spec.parse_prompt(prompt) if isinstance(prompt, str) else prompt
        text = {
            "colour": f"every object is {p.colour}",
            "shape": f"every object is a {p.shape}",
            "count": f"there {'is exactly one object' if p.count == 1 else f'are exactly {p.count} objects'}",
            "position": f"all objects are in the {p.position} half of the image",
            "clean_background": "the background is clean and dark, without stray specks",
        }
        names = [c for c in CRITERIA if c == "clean_background" or getattr(p, c) is not None]
        names.sort(key=lambda c: (c not in self.reward_criteria, CRITERIA.index(c)))
        return Rubric(tuple(Criterion(c, text[c]) for c in names), title="World rubric")

    # -- pairwise ------------------------------------------------------------------------

    def compare(
        self,
        prompts: Sequence[str],
        images1: np.ndarray,
        images2: np.ndarray,
        rubric: str | None = None,
    ) -> PairwiseBatch:
        """Pairwise decision by the number of satisfied reward criteria (more wins; equal ->
        tie). ``rubric`` is ignored: criteria come from each prompt. An unparseable prompt
        counts as a "parse_error" failure and yields a tie."""
        images1, images2 = np.asarray(images1), np.asarray(images2)
        b = len(prompts)
        if images1.shape != images2.shape or images1.ndim != 4 or len(images1) != b:
            raise ValueError(f"expected two (B={b}, H, W, 3) image arrays, got "
                             f"{images1.shape} and {images2.shape}")
        crit = {k: np.zeros((b, 2), bool) for k in CRITERIA}
        winner = np.zeros(b, np.int8)
        p_first = np.full(b, 0.5, np.float32)
        failures = {"parse_error": 0}
        reasons = []
        valid = np.ones(b, bool)
        for i, text in enumerate(prompts):
            try:
                p = spec.parse_prompt(text)
            except ValueError as e:
                failures["parse_error"] += 1
                reasons.append(f"pair {i}: unparseable prompt: {e}")
                valid[i] = False
                continue
            v1 = self.verdicts(p, self.describe(images1[i]))
            v2 = self.verdicts(p, self.describe(images2[i]))
            for k in CRITERIA:
                crit[k][i] = (v1[k], v2[k])
            n1 = sum(v1[k] for k in self.reward_criteria)
            n2 = sum(v2[k] for k in self.reward_criteria)
            if self.temperature > 0:
                p_first[i] = 1.0 / (1.0 + np.exp(-(n1 - n2) / self.temperature))
            else:
                p_first[i] = 1.0 if n1 > n2 else (0.0 if n1 < n2 else 0.5)
            winner[i] = 1 if n1 > n2 else (2 if n1 < n2 else 0)
            fails = lambda v: [k for k in self.reward_criteria if not v[k]] or ["none"]
            reasons.append(f"image 1 {n1}/{len(self.reward_criteria)} (fails {', '.join(fails(v1))}); "
                           f"image 2 {n2}/{len(self.reward_criteria)} (fails {', '.join(fails(v2))})")
        return PairwiseBatch(winner=winner, p_first=p_first, criteria=crit,
                             failures=failures, reasons=reasons, valid=valid)

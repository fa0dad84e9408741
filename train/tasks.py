"""The synthetic anomaly tasks and the restoration task that applies them (reference-method §3, §5.0).

Task ids (the reference's order, which the fold table indexes):

    0  Poisson blend, source from the same data set        (poisson.blend_anomaly)
    1  Poisson blend, source from another data set         (poisson.blend_anomaly)
    2  sink deformation                                    (deform.deform_anomaly)
    3  source deformation                                  (deform.deform_anomaly)
    4  smooth Perlin-noise intensity change                (perlin.intensity_anomaly)

``RestorationTask`` turns a healthy image into the network's condition: with probability 0.2 nothing,
otherwise one of its tasks with 1–4 anomalies (stop with probability 0.5 after each), clipped after each
anomaly to the original image's per-channel range (§10 D1) or, with ``reference_clip=True``, to each
(channel, column)'s range as the reference's axis slip does (§5.0 item 6).

Images are (C, H, W) float32 in [0, 1], uncentred. All randomness comes from the ``np.random.Generator``
passed in (§10 D4): same generator state, same output.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from condiff.errors import TrainingDataError
from condiff.train import shapes
from condiff.train.deform import SINK, SOURCE, deform_anomaly
from condiff.train.perlin import intensity_anomaly
from condiff.train.poisson import blend_anomaly

logger = logging.getLogger(__name__)

SAME_DSET_BLEND = 0
OTHER_DSET_BLEND = 1
SINK_DEFORM = 2
SOURCE_DEFORM = 3
INTENSITY_CHANGE = 4
TASK_NAMES = {
    SAME_DSET_BLEND: "same-dataset Poisson blend",
    OTHER_DSET_BLEND: "other-dataset Poisson blend",
    SINK_DEFORM: "sink deformation",
    SOURCE_DEFORM: "source deformation",
    INTENSITY_CHANGE: "Perlin intensity change",
}
N_TASKS = len(TASK_NAMES)
BLEND_TASKS = (SAME_DSET_BLEND, OTHER_DSET_BLEND)

P_NO_TASK = 0.2
MAX_ANOMALIES = 4
P_STOP = 0.5  # after each anomaly
MAX_SHAPE_DRAWS = 100  # redraws of a shape below the visibility floor (the reference asserts instead)


class ImagePool(Protocol):
    """Random-access images: ``pool[i]`` is (C, H, W) float32 in [0, 1], uncentred."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


class ArrayPool:
    """An ``ImagePool`` over an in-memory array (N, C, H, W)."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"ArrayPool expects (N, C, H, W) images, got shape {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """F (H, W) bool: any channel above the image's global minimum (MRI background is that minimum)."""
    return np.any(image > image.min(), axis=0)


@dataclass(frozen=True)
class _Layout:
    """What the anomalies of one image share: its foreground, components and side bounds."""

    image_hw: tuple[int, int]
    fg_mask: np.ndarray | None
    regions: list[shapes.Region] | None
    lb: np.ndarray
    ub: np.ndarray


def _layout(image: np.ndarray, fg_mask: np.ndarray | None) -> _Layout:
    image_hw = tuple(image.shape[1:])
    regions = None
    if fg_mask is not None:
        if not fg_mask.any():
            raise TrainingDataError(None, "a training image has no foreground (it is constant)",
                                    "Drop empty slices from the training data")
        regions = shapes.foreground_regions(fg_mask)
    lb, ub = shapes.size_bounds(image_hw, regions)
    return _Layout(image_hw, fg_mask, regions, lb, ub)


def _draw_shape(layout: _Layout, rng: np.random.Generator, size_scale: float = 1.0) -> shapes.AnomalyShape:
    for _ in range(MAX_SHAPE_DRAWS):
        shape = shapes.make_shape(layout.lb, layout.ub, layout.image_hw, rng, scale=size_scale)
        if shapes.is_large_enough(shape.mask, layout.image_hw, layout.fg_mask):
            return shape
    raise TrainingDataError(None, f"no anomaly shape reached the visibility floor in {MAX_SHAPE_DRAWS} draws",
                            "Check the training images' foreground masks")


def _source_draw(pool: ImagePool, rng: np.random.Generator, with_mask: bool):
    """A ``draw_source`` callable for ``poisson.blend_anomaly``: a uniform pool sample and its F_src."""
    def draw():
        source = np.asarray(pool[int(rng.integers(len(pool)))])
        return source, (foreground_mask(source) if with_mask else None)
    return draw


def _apply_one(task_id: int, image: np.ndarray, rng: np.random.Generator, layout: _Layout,
               source_pool: ImagePool | None, size_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly: draw a shape, place it, apply the task. Returns (image, mask (H, W) bool)."""
    shape = _draw_shape(layout, rng, size_scale)
    corner = shapes.place_anomaly(shape.mask, layout.image_hw, rng, layout.fg_mask, layout.regions)
    patch_mask = shape.mask
    if task_id in BLEND_TASKS:
        if source_pool is None or len(source_pool) == 0:
            raise ValueError(f"task {task_id} ({TASK_NAMES[task_id]}) needs a non-empty source pool")
        # The source gets a foreground mask exactly when the target has one (MRI targets).
        draw = _source_draw(source_pool, rng, layout.fg_mask is not None)
        out, patch_mask = blend_anomaly(image, corner, shape.mask, draw, rng)
    elif task_id in (SINK_DEFORM, SOURCE_DEFORM):
        out = deform_anomaly(image, corner, shape, rng, SINK if task_id == SINK_DEFORM else SOURCE)
    elif task_id == INTENSITY_CHANGE:
        out = intensity_anomaly(image, corner, shape.mask, rng)
    else:
        raise ValueError(f"unknown task id {task_id}; expected one of {sorted(TASK_NAMES)}")
    mask = np.zeros(layout.image_hw, dtype=bool)
    mask[corner[0]:corner[0] + patch_mask.shape[0], corner[1]:corner[1] + patch_mask.shape[1]] = patch_mask
    return out, mask


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a (C, H, W) floating-point image, got {image.dtype} {image.shape}")
    return image


def apply_anomaly(task_id: int, image: np.ndarray, rng: np.random.Generator, fg_mask: np.ndarray | None = None,
                  *, source_pool: ImagePool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ONE anomaly of task ``task_id`` to ``image`` (C, H, W); no clip to the original range.

    ``fg_mask`` (H, W) bool (MRI) steers size bounds and placement and gives blend sources a mask too;
    ``source_pool`` is required for tasks 0 and 1. Returns (new image of the same dtype, mask (H, W)
    bool). Tasks 2–4 change only pixels inside the mask; tasks 0–1 change pixels inside the patch box,
    and the mask holds every pixel whose channel-mean change exceeds 0.001.
    """
    image = _check_image(image)
    return _apply_one(task_id, image, rng, _layout(image, fg_mask), source_pool)


def clip_bounds(image: np.ndarray, reference_clip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) for the clip after each anomaly: per channel (C, 1, 1), or per (channel, column) (C, 1, W).

    ``reference_clip=True`` reproduces the reference's reduction over axis 1 only (§5.0 item 6).
    """
    axes = (1,) if reference_clip else (1, 2)
    return image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True)


def apply_task(task_id: int, image: np.ndarray, rng: np.random.Generator, fg_mask: np.ndarray | None = None,
               *, source_pool: ImagePool | None = None,
               reference_clip: bool = False, size_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """Apply task ``task_id`` with 1–4 anomalies; P(n) = 1/2, 1/4, 1/8, 1/8.

    ``size_scale`` stretches every anomaly's side-length draw (1 = the reference's sizes).
    Anomalies are applied one after the other to the running image (later ones may overwrite earlier
    ones), each followed by the clip of ``clip_bounds``. Returns (corrupted (C, H, W) of the image's dtype,
    union anomaly mask (H, W) bool, number of anomalies).
    """
    image = _check_image(image)
    layout = _layout(image, fg_mask)
    low, high = clip_bounds(image, reference_clip)
    corrupted = image.copy()
    mask = np.zeros(layout.image_hw, dtype=bool)
    n = 0
    while n < MAX_ANOMALIES:
        corrupted, one = _apply_one(task_id, corrupted, rng, layout, source_pool, size_scale)
        corrupted = np.clip(corrupted, low, high)
        mask |= one
        n += 1
        if rng.random() < P_STOP:
            break
    return corrupted, mask, n


def _no_task(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """A sample without an anomaly: the image itself, an empty mask, no task id."""
    return image.astype(np.float32, copy=True), np.zeros(image.shape[1:], dtype=bool), None


class RestorationTask:
    """Make the network's condition from a healthy image (§1 training flow, step 2).

    ``task_ids``: the fold's tasks (chosen uniformly). ``same_pool``: blend sources for task 0 (the data
    set the images come from). ``other_pools``: sources for task 1; one pool is chosen per image, then a
    new sample per anomaly (as the reference's ``OTHER_DSET_BLEND`` does). ``has_background``: MRI, where
    the foreground mask F steers placement. Call with (image (C, H, W) float32, rng[, size_scale]); returns
    (corrupted (C, H, W) float32, anomaly mask (H, W) bool, task id or None when no task was applied).
    ``size_scale`` stretches the anomalies' side lengths (a size curriculum; 1 = the reference).
    """

    def __init__(self, task_ids: Sequence[int], *, p_no_task: float = P_NO_TASK,
                 same_pool: ImagePool | None = None, other_pools: Sequence[ImagePool] = (),
                 has_background: bool, reference_clip: bool = False):
        self.task_ids = tuple(int(t) for t in task_ids)
        if not self.task_ids or any(t not in TASK_NAMES for t in self.task_ids):
            raise ValueError(f"task_ids must be a non-empty subset of {sorted(TASK_NAMES)}, got {list(task_ids)}")
        if not 0.0 <= p_no_task <= 1.0:
            raise ValueError(f"p_no_task must be in [0, 1], got {p_no_task}")
        if SAME_DSET_BLEND in self.task_ids and (same_pool is None or len(same_pool) == 0):
            raise ValueError("task 0 (same-dataset Poisson blend) needs a non-empty same_pool: "
                             "pass the training (or validation) images as same_pool")
        self.other_pools = tuple(other_pools)
        if OTHER_DSET_BLEND in self.task_ids:
            if not self.other_pools:
                raise ValueError("task 1 (other-dataset Poisson blend) needs at least one pool in other_pools: "
                                 "pass external source images, or choose a fold without task 1")
            if any(len(p) == 0 for p in self.other_pools):
                raise ValueError("an entry of other_pools is empty")
        self.p_no_task = p_no_task
        self.same_pool = same_pool
        self.has_background = has_background
        self.reference_clip = reference_clip

    def __call__(self, image: np.ndarray, rng: np.random.Generator,
                 size_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, int | None]:
        image = _check_image(image)
        if rng.random() < self.p_no_task:
            return _no_task(image)
        task_id = self.task_ids[rng.integers(len(self.task_ids))]
        pool = None
        if task_id == SAME_DSET_BLEND:
            pool = self.same_pool
        elif task_id == OTHER_DSET_BLEND:
            pool = self.other_pools[rng.integers(len(self.other_pools))]
        fg_mask = foreground_mask(image) if self.has_background else None
        try:
            corrupted, mask, _ = apply_task(task_id, image, rng, fg_mask, source_pool=pool,
                                            reference_clip=self.reference_clip, size_scale=size_scale)
        except TrainingDataError as exc:
            if fg_mask is not None and not fg_mask.any():
                raise  # a blank image is bad data, not a hard slice
            # A slice with next to no foreground (the top of a head trained without brain masks) cannot
            # host an anomaly: it serves as a no-task sample instead of stopping the run.
            logger.debug("no anomaly placed (%s); the sample is used without a task", exc.problem)
            return _no_task(image)
        return corrupted.astype(np.float32, copy=False), mask, task_id

"""Persons: one type for a person found in a picture, by segmentation, by video detection or in a
query, and the one way to cut a person out of it.

A `Person` is plain numpy (Ultralytics results are converted where they enter, in yolo.py), so
crops, matching and plots are testable with arrays made by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Person:
    """One person in one picture.

    box_xyxy: float32 (4,) x1, y1, x2, y2 in source pixels.
    confidence: detection score in [0, 1].
    mask: bool (H, W) at the picture's resolution, True on the person; None for a detection
        without a mask (the box alone says where the person is).
    """

    box_xyxy: np.ndarray
    confidence: float
    mask: np.ndarray | None = None

    @cached_property
    def area(self) -> int | None:
        """Pixels on the person's mask (None without a mask)."""
        return None if self.mask is None else int(np.count_nonzero(self.mask))


@dataclass(frozen=True)
class CappedPersons:
    """A picture's persons under a cap: at most `cap` of them, the most confident first, and whether
    the picture held more (then the least confident were left out)."""

    persons: list[Person]
    cut: bool


def most_confident(persons: Sequence[Person], cap: int) -> CappedPersons:
    """The `cap` most confident persons (ties keep their order) and whether any were left out."""
    ranked = sorted(persons, key=lambda p: -p.confidence)
    return CappedPersons(ranked[:cap], len(ranked) > cap)


class Segmenter(Protocol):
    """Finds persons with masks. predict_seconds: time spent in the model itself, for the summary."""

    predict_seconds: float = 0.0

    def segment(self, images_rgb: Sequence[np.ndarray]) -> list[list[Person]]:
        """Args: uint8 (H, W, 3) RGB images. Returns: per image, its persons with masks, best first
        (at most the segmenter's own cap, SegmentSpec.max_persons for Ultralytics)."""
        ...

    def segment_capped(self, images_rgb: Sequence[np.ndarray], cap: int) -> list[CappedPersons]:
        """Per image its `cap` most confident persons and whether it held more. A segmenter that can
        stop at the cap inside its model (Ultralytics' max_det) overrides this, so that no mask
        beyond the cap is made; this default cuts what `segment` returns."""
        return [most_confident(found, cap) for found in self.segment(images_rgb)]


class Detector(Protocol):
    def detect(self, frames_rgb: Sequence[np.ndarray]) -> list[list[Person]]:
        """Args: uint8 (H, W, 3) RGB frames. Returns: per frame, its persons (boxes, no masks)."""
        ...


def box_pixels(box_xyxy: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop bounds that contain the box: floor of x1/y1, ceil of x2/y2, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    left = int(np.clip(np.floor(x1), 0, width))
    top = int(np.clip(np.floor(y1), 0, height))
    right = int(np.clip(np.ceil(x2), 0, width))
    bottom = int(np.clip(np.ceil(y2), 0, height))
    return left, top, right, bottom


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes a (N, 4) and b (M, 4), xyxy: float32 (N, M)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)

    def area(x: np.ndarray) -> np.ndarray:
        return np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)

    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def white_background_crop(image_rgb: np.ndarray, mask: np.ndarray, box_xyxy: np.ndarray) -> np.ndarray | None:
    """Cut the box out of the image and paint every pixel outside the person's mask white.

    Args:
        image_rgb: uint8 (H, W, 3).
        mask: bool (H, W), same size as the image.
        box_xyxy: (4,) box in source pixels; may extend past the borders (it is clipped).
    Returns:
        uint8 (h, w, 3) crop, or None when the clipped box is empty.
    Raises:
        ValueError: the mask does not have the image's size.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), but got {image_rgb.shape}")
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image_rgb.shape[:2]}")
    h, w = mask.shape
    left, top, right, bottom = box_pixels(box_xyxy, w, h)
    if right <= left or bottom <= top:
        return None
    inside = mask[top:bottom, left:right]
    crop = np.full((bottom - top, right - left, 3), 255, np.uint8)
    np.copyto(
        crop,
        image_rgb[top:bottom, left:right],
        where=(inside if inside.dtype == bool else inside.astype(bool))[..., None],
    )
    return crop


def person_crop(image_rgb: np.ndarray, person: Person) -> np.ndarray | None:
    """The person cut out of the picture: on white outside the mask when there is one, the plain
    box otherwise. None when there is nothing to embed: an empty box, or a mask with no pixel on
    it (which would be an all-white crop)."""
    if person.mask is not None:
        if person.area == 0:
            return None
        return white_background_crop(image_rgb, person.mask, person.box_xyxy)
    h, w = image_rgb.shape[:2]
    x1, y1, x2, y2 = box_pixels(person.box_xyxy, w, h)
    return image_rgb[y1:y2, x1:x2].copy() if x2 > x1 and y2 > y1 else None


def with_masks(detections: Sequence[Person], masked: Sequence[Person], min_iou: float = 0.5) -> list[Person]:
    """Give each detection the mask of the masked person whose box overlaps it best (IoU >=
    min_iou); a detection with no such person keeps its box alone. Order and boxes are the
    detections'."""
    if not detections or not masked:
        return list(detections)
    ious = box_iou(np.stack([d.box_xyxy for d in detections]), np.stack([m.box_xyxy for m in masked]))
    out = []
    for d, row in zip(detections, ious):
        best = int(row.argmax())
        out.append(Person(d.box_xyxy, d.confidence, masked[best].mask) if row[best] >= min_iou else d)
    return out


def person_crops(rgb: np.ndarray, persons: Sequence[Person]) -> dict[int, np.ndarray]:
    """Person k's white-background crop (uint8 (h, w, 3)) for each person that has one; person k keeps
    its number even when another has nothing to cut."""
    return {k: c for k, p in enumerate(persons) if (c := person_crop(rgb, p)) is not None}

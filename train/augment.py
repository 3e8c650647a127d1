"""The recipes' training augmentations in numpy / torch ops, each drawing from a given generator.

Segmentation (mmsegmentation's train pipeline): :func:`random_resize` (``RandomResize`` with
``ratio_range``, keep ratio), :func:`random_crop` (``RandomCrop`` with ``cat_max_ratio``),
:func:`random_flip` (``RandomFlip``), :func:`photometric_distortion` (``PhotoMetricDistortion``).
Detection (mmdetection's): the keep-ratio resize is the model's own transform; :func:`flip_instances`
is ``RandomFlip`` on image, boxes and masks.

Simplified against mmcv (which resizes with OpenCV on uint8 and converts to HSV with OpenCV):
images are resized bilinearly in float (half-pixel centres, no antialiasing) and rounded; label
maps with torch's nearest rule; saturation is scaled with the exact HSV identity
``c' = V - (V - c) * min(alpha, 1 / S)`` in float; hue is shifted with torchvision's ``adjust_hue``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import adjust_hue

from eval.segmentation import IGNORE, rescale_size


def resize_pair(image: np.ndarray, label: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) uint8 bilinearly and ``label`` (H, W) by nearest neighbour to ``size`` (h, w)."""
    if tuple(size) == image.shape[:2]:
        return image, label
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    image = x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    y = torch.from_numpy(np.array(label))[None, None].float()
    label = F.interpolate(y, size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()
    return image, label


def random_resize(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, scale: Sequence[int],
                  ratio_range: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """``RandomResize``: ``scale`` times a uniform ratio, then mmcv's keep-ratio rescale to it."""
    ratio = rng.uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize_pair(image, label, rescale_size(*image.shape[:2], target))


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, crop_size: Sequence[int],
                cat_max_ratio: float) -> Tuple[np.ndarray, np.ndarray]:
    """``RandomCrop``: up to 10 draws until no class covers ``cat_max_ratio`` or more of the crop's labelled pixels."""
    def draw():
        margin_h, margin_w = max(image.shape[0] - crop_size[0], 0), max(image.shape[1] - crop_size[1], 0)
        y, x = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
        return y, min(y + crop_size[0], image.shape[0]), x, min(x + crop_size[1], image.shape[1])

    y1, y2, x1, x2 = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y1, y2, x1, x2 = draw()
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, prob: float):
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def photometric_distortion(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``PhotoMetricDistortion``: brightness +-32, contrast x0.5-1.5 (before or after the colour
    steps), saturation x0.5-1.5, hue +-18 (of OpenCV's 180); each step with probability 0.5."""
    img = image.astype(np.float32)

    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if rng.integers(2):
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        alpha = rng.uniform(0.5, 1.5)
        value = img.max(axis=2, keepdims=True)
        sat = np.where(value > 0, (value - img.min(axis=2, keepdims=True)) / np.maximum(value, 1e-6), 0)
        img = value - (value - img) * np.minimum(alpha, 1 / np.maximum(sat, 1e-6))
    if rng.integers(2):
        shift = int(rng.integers(-18, 19)) / 180
        rounded = torch.from_numpy(np.clip(img, 0, 255).round().astype(np.uint8)).permute(2, 0, 1)
        img = adjust_hue(rounded, shift).permute(1, 2, 0).numpy().astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def flip_instances(image: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor):
    """Horizontal flip of a ``(3, H, W)`` image, its ``(N, 4)`` x1y1x2y2 boxes and ``(N, H, W)`` masks."""
    width = image.shape[-1]
    boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), boxes, masks.flip(-1)

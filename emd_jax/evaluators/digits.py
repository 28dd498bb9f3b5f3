"""The digits evaluator: generated 8x8 digits scored with the shipped digits classifier.

`evaluate_images` scores generated digits with the shipped digits classifier
(`digits_classifier`): Frechet distance (`frechet`) in its penultimate feature
space against the real digits, precision/recall there, and class coverage from
its predictions; pixel-space figures from `diversity`. `DigitsEvaluator` is the
registered `digits` evaluator (`registry`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from emd_jax.evaluators import digits_classifier, diversity, precision_recall, registry
from emd_jax.evaluators.frechet import frechet_distance_features


def class_coverage(logits: np.ndarray, num_classes: int | None = None, threshold: float = 0.2) -> dict[str, Any]:
  """Class balance of predictions `[N, K]`.

  A class is covered when its share of argmax predictions is at least
  `threshold / K` (a fifth of its uniform share by default). Returns
  coverage (fraction of classes covered), class_tv (total-variation distance
  of the predicted-class histogram from uniform, 0 = balanced, 1 - 1/K = one
  class), class_hist `[K]`, and mean_confidence (mean max softmax probability).
  """
  logits = np.asarray(logits, np.float64)
  k = num_classes or logits.shape[-1]
  hist = np.bincount(logits.argmax(-1), minlength=k)[:k] / len(logits)
  z = logits - logits.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return {
    "coverage": float((hist >= threshold / k).mean()),
    "class_tv": float(0.5 * np.abs(hist - 1.0 / k).sum()),
    "class_hist": hist,
    "mean_confidence": float(probs.max(-1).mean()),
  }


@functools.lru_cache(maxsize=8)
def reference_features(
  split: str = "train", layout: str = "pad", resolution: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Classifier (features `[N, F]`, logits `[N, 10]`, labels `[N]`) of the real digits, cached.

  The real images go through the same round trip as generated ones: the
  pipeline's preprocessing to `resolution` with `layout`, then
  `to_classifier_input`, so the reference matches what a perfect generator gives.
  """
  from emd_jax.data import digits_tfds, pipeline

  images, labels = digits_tfds.digits_arrays(split)
  x = pipeline.preprocess_images(images, resolution, layout).numpy()
  model, params, _ = digits_classifier.load_classifier()
  logits, feats = digits_classifier.predict(model, params, digits_classifier.to_classifier_input(x, layout))
  return feats, logits, labels


def evaluate_images(
  images: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  layout: str = "pad",
  reference_split: str = "train",
  k: int = 3,
  coverage_threshold: float = 0.2,
) -> dict[str, Any]:
  """Scores generated digits `[N, R, R, C]` in `[-1, 1]` against the real digits.

  `layout` says how the digits were brought to R ('pad' or 'resize', as the
  data config's `preprocess`). `labels` (`[N]` ints or `[N, 10]` one-hot), if
  given, are the conditioning labels, and `label_accuracy` is reported.
  Returns, in the classifier's feature space: fd, fd_real_split (a floor: FD
  between the test and train digits), kid, precision, recall, coverage,
  class_tv, class_hist, mean_confidence, [label_accuracy]; in pixel space
  (`diversity.pixel_metrics`, independent of the classifier): fd_pixel,
  kid_pixel, pixel_std, pixel_std_ratio_real, mean_image_dist; and num_samples.
  """
  images = np.asarray(images, np.float32)
  resolution = images.shape[1]
  model, params, _ = digits_classifier.load_classifier()
  x = digits_classifier.to_classifier_input(images, layout)
  logits, feats = digits_classifier.predict(model, params, x)
  ref_feats, _, _ = reference_features(reference_split, layout, resolution)
  out: dict[str, Any] = {
    "fd": frechet_distance_features(feats, ref_feats),
    "fd_real_split": _real_split_fd(layout, resolution),
    "kid": diversity.kid(feats, ref_feats),
    "num_samples": len(images),
  }
  out.update(precision_recall.precision_recall(ref_feats, feats, k=k))
  out.update(diversity.pixel_metrics(np.asarray(x), diversity.real_pixel_pca(reference_split, layout, resolution)))
  out.update(class_coverage(logits, digits_classifier.NUM_CLASSES, coverage_threshold))
  if labels is not None:
    labels = np.asarray(labels)
    labels = labels.argmax(-1) if labels.ndim == 2 else labels
    out["label_accuracy"] = float((logits.argmax(-1) == labels).mean())
  return out


@functools.lru_cache(maxsize=8)
def _real_split_fd(layout: str, resolution: int) -> float:
  test, _, _ = reference_features("test", layout, resolution)
  train, _, _ = reference_features("train", layout, resolution)
  return frechet_distance_features(test, train)


@registry.register("digits")
class DigitsEvaluator:
  """The `digits` evaluator: `evaluator(images [N, R, R, C] in [-1, 1], labels=None) -> evaluate_images(...)`.

  `layout`: how the digits were brought to R ('pad' or 'resize'); `reference_split`:
  the real digits compared with; `k`: neighbours of precision/recall.
  """

  name = "digits"
  kind = "samples"

  def __init__(self, layout: str = "pad", reference_split: str = "train", k: int = 3):
    if layout not in ("pad", "resize"):
      raise ValueError(f"layout must be 'pad' or 'resize', got {layout!r}")
    if reference_split not in ("train", "test", "all"):
      raise ValueError(f"reference_split must be 'train', 'test' or 'all', got {reference_split!r}")
    self.layout, self.reference_split, self.k = layout, reference_split, k

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    return evaluate_images(images, labels, layout=self.layout, reference_split=self.reference_split, k=self.k)

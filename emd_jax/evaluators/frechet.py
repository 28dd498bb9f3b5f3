"""Frechet distance, class coverage, and the digits image evaluator.

Frechet distance between Gaussians fitted to two feature sets:
  FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}),
with `tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(S_a^{1/2} S_b S_a^{1/2}))`, both
square roots taken by `eigh` of symmetric PSD matrices in float64 (no scipy,
no complex parts to discard).

`evaluate_images` scores generated digits with the shipped digits classifier
(`digits_classifier`): FD in its penultimate feature space against the real
digits, precision/recall there, and class coverage from its predictions. FD
is biased by the number of samples: compare runs at the same sample count.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from emd_jax.evaluators import digits_classifier, diversity, precision_recall


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[F]` and covariance `[F, F]` (unbiased) of features `[N, F]`, float64."""
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  mu = x.mean(axis=0)
  sigma = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
  return mu, np.atleast_2d(sigma)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
  """Frechet (2-Wasserstein) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  root_a = _sqrt_psd(sigma_a)
  inner = root_a @ sigma_b @ root_a
  w = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  tr_cross = np.sqrt(np.clip(w, 0.0, None)).sum()
  d = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_cross
  return float(max(d, 0.0))


def frechet_distance_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD between Gaussians fitted to features `[N, F]` and `[M, F]`."""
  return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


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


class DigitsEvaluator:
  """Config-selectable evaluator: `evaluator(images, labels=None) -> dict of metrics`."""

  name = "digits"

  def __init__(self, layout: str = "pad", reference_split: str = "train", k: int = 3):
    self.layout, self.reference_split, self.k = layout, reference_split, k

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    return evaluate_images(images, labels, layout=self.layout, reference_split=self.reference_split, k=self.k)


def make_image_evaluator(name: str, **kwargs: Any):
  """Image evaluator by config name: 'digits' -> `DigitsEvaluator(**kwargs)`,
  'inception_fid' -> `inception.InceptionEvaluator(weights_npz=..., reference_stats=...)`.

  Every evaluator is called as `evaluator(images [N,H,W,C] in [-1,1], labels=None)`
  and returns a dict of scalars (plus arrays such as `class_hist`).
  """
  if name == DigitsEvaluator.name:
    return DigitsEvaluator(**kwargs)
  if name == "inception_fid":
    from emd_jax.evaluators import inception

    return inception.InceptionEvaluator(**kwargs)
  raise ValueError(f"unknown image evaluator {name!r}; expected 'digits' or 'inception_fid'")

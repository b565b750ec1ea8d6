"""Evaluation: FID / Inception Score with the FID InceptionV3 (weights from a local .npz),
float64 feature statistics, ADM reference statistics, k-NN precision/recall, and the offline
"Fréchet Digit Distance" (FDD) of a small classifier trained on the embedded MNIST digits.

See ``docs/evaluation.md``.
"""

from asymflow_jax.evaluation.classifier import digit_fd, get_classifier, train_classifier
from asymflow_jax.evaluation.inception import (
    InceptionV3, inception_state_dict, inception_variables_from_state_dict, load_inception_npz,
    random_inception_variables, save_inception_npz)
from asymflow_jax.evaluation.metrics import (
    RunningStatistics, compute_statistics, feature_statistics, frechet_distance, inception_score,
    load_reference_statistics, make_feature_fn, precision_recall, save_reference_statistics)

__all__ = [
    "digit_fd", "get_classifier", "train_classifier",
    "InceptionV3", "inception_state_dict", "inception_variables_from_state_dict",
    "load_inception_npz", "random_inception_variables", "save_inception_npz",
    "RunningStatistics", "compute_statistics", "feature_statistics", "frechet_distance",
    "inception_score", "load_reference_statistics", "make_feature_fn", "precision_recall",
    "save_reference_statistics",
]

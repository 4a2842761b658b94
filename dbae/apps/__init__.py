"""Applications of a trained DBAE (SPEC 8): latent interpolation (:mod:`.interpolate`),
attribute classifiers on normalized z (:mod:`.attributes`) and attribute manipulation
(:mod:`.manipulate`). None of them inverts the sampler: z comes from one encoder pass
and x_T = Dec(z)."""

from .attributes import AttributeClassifier, AttributeLabels, fit_classifier, load_classifier, save_classifier
from .interpolate import InterpolationResult, interpolate, interpolate_latents
from .manipulate import ManipulationResult, manipulate, shift_latents

__all__ = [
    "AttributeClassifier",
    "AttributeLabels",
    "InterpolationResult",
    "ManipulationResult",
    "fit_classifier",
    "interpolate",
    "interpolate_latents",
    "load_classifier",
    "manipulate",
    "save_classifier",
    "shift_latents",
]

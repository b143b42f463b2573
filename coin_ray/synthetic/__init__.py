"""The built-in synthetic benchmark: 8 procedurally drawn tasks, one per CoIN task, written in CoIN's own
file layout so every downstream stage runs the same code on it as on real CoIN data."""
from coin_ray.synthetic._synthetic import (
    GENERATOR_VERSION,
    IMAGE_ROOT,
    INSTRUCTIONS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    TRAIN_SCALE,
    generate_examples,
    synthetic_records,
    write_synthetic_benchmark,
)
from coin_ray.synthetic._tasks import Example

__all__ = [
    "Example",
    "GENERATOR_VERSION",
    "IMAGE_ROOT",
    "INSTRUCTIONS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "TRAIN_SCALE",
    "generate_examples",
    "synthetic_records",
    "write_synthetic_benchmark",
]

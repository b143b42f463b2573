"""Ray preprocessing: CoIN JSON (or local HF datasets) + images -> tokenised Parquet + manifest.

    >>> from pipelines import preprocess, load_split
    >>> manifest = preprocess("data/Instructions", "data/images", ["ScienceQA"], "runs/data")
    >>> ds = load_split("runs/data", "ScienceQA", "train")   # a lazy ray.data.Dataset
"""
from pipelines._reader import load_split, read_manifest, train_collate_fn
from pipelines._records import PipelineInputError, resolve_image
from pipelines.preprocess import HFSource, Plan, plan, preprocess

__all__ = ["HFSource", "PipelineInputError", "Plan", "plan", "load_split", "preprocess", "read_manifest", "resolve_image",
           "train_collate_fn"]

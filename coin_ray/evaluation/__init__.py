"""Evaluation: CL metrics over the evaluation matrix (pure), batched generation + scoring, knowledge judges.

Only the pure metrics are imported eagerly; generation and judges load torch / models on first use."""
from coin_ray.evaluation.metrics import cl_metrics, matrix_from_rows, mean_seen, per_task_forgetting

__all__ = ["cl_metrics", "matrix_from_rows", "mean_seen", "per_task_forgetting"]

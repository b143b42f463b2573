"""coin-ray: continual instruction tuning of multimodal LLMs on Ray + MLflow.

Importing this package never starts Ray or reads a file."""
__version__ = "0.1.0"

"""coin-ray: continual instruction tuning of multimodal LLMs on Ray + MLflow.

Importing this package never starts Ray or reads a file; it puts the credential filter of coin_ray.redact on
this repository's loggers."""
__version__ = "0.1.0"

from coin_ray.redact import install_log_redaction as _install_log_redaction

_install_log_redaction()

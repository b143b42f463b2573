"""The one base class of every error a user causes with bad input (flags, YAML, config values, task names,
designs, data). `coin_ray.studies.cli.run_main` catches `UserError` and prints its message as the only output
(exit code 2); anything else is a bug and keeps its traceback. Imports nothing, so any module can use it."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user; the message names the problem and the way out."""

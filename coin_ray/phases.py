"""What the first minutes say: each first-time phase of a run (benchmark generation, preprocessing, model
assembly, base pretraining, waiting for another trial's stage) prints a line when it starts and one when it
ends, with its counts and seconds, and shows a progress bar once it has run longer than `BAR_AFTER_S`
(on a terminal only; a log file gets the two lines).

    with phase("base pretraining", detail="300 steps", total=300, unit="step") as p:
        for _ in range(300):
            ...
            p.update()
        p.done("final loss 0.41")

Lines go through `coin_ray.training.worker.progress` ("[coin-ray] ..." on stderr, once even from a Ray
worker); a phase that fails says so, with its seconds, and lets the error through.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["BAR_AFTER_S", "Phase", "phase", "say"]

BAR_AFTER_S = 3.0  # a phase shorter than this shows no bar


class Phase:
    """A running phase: `update(n)` advances its bar, `done(text)` sets what its end line reports."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self.result = ""
        self.count = 0

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def done(self, text: str) -> None:
        self.result = text


def say(message: str) -> None:
    """One "[coin-ray] ..." line on stderr (`coin_ray.training.worker.progress`)."""
    from coin_ray.training.worker import progress

    progress(message)


def _bar(name: str, total: int | None, unit: str, after_s: float) -> Any:
    if not total or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar, the two lines still say it all
        return None
    return tqdm(total=total, unit=unit, desc=f"[coin-ray] {name}", delay=after_s, leave=False, file=sys.stderr,
                dynamic_ncols=True)


@contextmanager
def phase(name: str, *, detail: str = "", total: int | None = None, unit: str = "it",
          emit: Callable[[str], None] | None = None, bar_after_s: float = BAR_AFTER_S) -> Iterator[Phase]:
    """Announce phase `name` (`detail`: what it does, e.g. its counts), yield a `Phase`, announce its end with
    the seconds it took and the text given to `Phase.done`; a bar over `total` `unit`s shows once the
    phase has run `bar_after_s` seconds."""
    emit = emit or say
    emit(f"{name}: started" + (f" ({detail})" if detail else ""))
    started = time.perf_counter()
    bar = _bar(name, total, unit, bar_after_s)
    p = Phase(bar)
    try:
        yield p
    except BaseException as e:
        if bar is not None:
            bar.close()
        emit(f"{name}: failed after {time.perf_counter() - started:.1f} s ({type(e).__name__})")
        raise
    if bar is not None:
        bar.close()
    emit(f"{name}: done in {time.perf_counter() - started:.1f} s" + (f" ({p.result})" if p.result else ""))

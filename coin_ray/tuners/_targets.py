"""Which modules a tuner touches: the language-model region of a (multimodal) model and target matching.

One resolver serves MoELoRA, the peft LoRA baseline and full fine-tuning, so all methods adapt exactly the
same layers and runs stay comparable.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# Module-name components that mark the parts of a VLM that are not its language model: every supported
# family's vision tower and projector (coin_ray.models.families), and lm_head.
from coin_ray.models.families import NOT_LANGUAGE_MODEL, PROJECTOR_COMPONENTS, VISION_COMPONENTS  # noqa: F401 (re-exported)


def _has_component(name: str, components: Sequence[str]) -> bool:
    return any(part in components for part in name.split("."))


def is_vision_module(name: str) -> bool:
    """True for the vision tower and everything inside it."""
    return _has_component(name, VISION_COMPONENTS)


def is_language_model_module(name: str) -> bool:
    """True inside the language model proper: not the vision tower, not the projector, not lm_head."""
    return not _has_component(name, NOT_LANGUAGE_MODEL)


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str]:
    """Names of the nn.Linear modules to adapt, in model order.

    None: every Linear of the language model. A sequence: Linear modules of the language model whose name ends
    with one of the given suffixes (each suffix must match something). A string: a regex that must match the
    whole module name (the explicit way to reach outside the language model).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    language_linears = [name for name in linears if is_language_model_module(name)]
    if target_modules is None:
        names = language_linears
        wanted = "every nn.Linear of the language model"
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"target_modules regex {target_modules!r} does not compile ({error}): pass a valid regex or a list "
                "of module-name suffixes such as ['q_proj', 'v_proj']"
            ) from None
        names = [name for name in linears if pattern.fullmatch(name)]
        wanted = f"regex {target_modules!r} (full match on the module name)"
    else:
        suffixes = list(target_modules)
        unmatched = [s for s in suffixes if not any(_matches_suffix(n, s) for n in language_linears)]
        if unmatched:
            raise ValueError(
                f"target_modules suffixes {unmatched} match no nn.Linear of the language model: use suffixes of "
                f"names like {_preview(language_linears)}, or a full-match regex string to reach other parts"
            )
        names = [n for n in language_linears if any(_matches_suffix(n, s) for s in suffixes)]
        wanted = f"suffixes {suffixes}"
    if not names:
        raise ValueError(
            f"target_modules ({wanted}) matched no nn.Linear in {type(model).__name__}: the Linear layers are "
            f"{_preview(linears) or 'none'}"
        )
    return names


def resolve_module_names(model: nn.Module, suffixes: Sequence[str], *, role: str) -> list[str]:
    """Names of the modules whose name ends with one of `suffixes`; every suffix must match at least one."""
    all_names = [name for name, _ in model.named_modules() if name]
    unmatched = [s for s in suffixes if not any(_matches_suffix(n, s) for n in all_names)]
    if unmatched:
        top_level = [name for name in all_names if name.count(".") <= 1]
        raise ValueError(
            f"{role} {unmatched} match no module of {type(model).__name__}: use names such as "
            f"{_preview(top_level)}, or leave {role} at its default"
        )
    return [n for n in all_names if any(_matches_suffix(n, s) for s in suffixes)]

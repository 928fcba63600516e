"""The recipe registry: `@register(name, config=..., views=...)` on a recipe class adds it. Every module of this
package is imported on first use, so a new recipe is one new file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..registry import Registry
from .protocol import Recipe, RecipeContext, StepOut  # noqa: F401  (re-exported for recipes)


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    cls: type
    config: type                              # the recipe's frozen config dataclass (paper defaults)
    views: Callable[[Any, Any, int], Any]     # (recipe_cfg, data_cfg, image_size) -> ViewSet
    engine: dict                              # engine/model settings the paper trains with (overridable)
    summary: str


def _load_all() -> None:
    import importlib
    import pkgutil

    from .. import recipes

    for m in pkgutil.iter_modules(recipes.__path__):
        importlib.import_module(f"{recipes.__name__}.{m.name}")


RECIPES: Registry[RecipeInfo] = Registry("recipe", load=_load_all)


def register(name: str, *, config: type, views: Callable, engine: dict | None = None):
    """Class decorator adding a recipe under `name`. The class must be `class X(nn.Module, Recipe)` (the hooks'
    defaults come from `Recipe`) and define `forward` and `encoder`."""
    def deco(cls):
        if nn.Module not in cls.__mro__ or Recipe not in cls.__mro__:
            raise TypeError(f"recipe {name!r}: declare it as `class {cls.__name__}(nn.Module, Recipe)`")
        own = cls.__mro__[:cls.__mro__.index(nn.Module)]          # the recipe's classes, before torch's
        missing = [m for m in ("forward", "encoder") if not any(m in vars(k) for k in own)]
        if missing:
            raise TypeError(f"recipe {name!r}: {cls.__name__} does not define {', '.join(missing)}")
        doc = (cls.__doc__ or "").strip().splitlines()
        RECIPES.add(name, RecipeInfo(name, cls, config, views, dict(engine or {}), doc[0] if doc else ""))
        return cls
    return deco


def get(name: str) -> RecipeInfo:
    return RECIPES.get(name)


def names() -> list[str]:
    """Sorted: the modules register in whatever order they happen to be imported."""
    return sorted(RECIPES.names())

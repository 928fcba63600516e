"""Method recipes: one small file per method, plus the parts they share. `registry.names()` imports them all."""
from .protocol import Recipe, RecipeContext, StepOut  # noqa: F401
from .registry import get, names, register  # noqa: F401

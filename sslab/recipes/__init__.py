"""Method recipes: one small file per method, plus the parts they share. Importing registers them all."""
from . import simclr  # noqa: F401
from .registry import RecipeContext, StepOut, get, names, register  # noqa: F401

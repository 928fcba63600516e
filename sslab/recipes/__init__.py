"""Method recipes: one small file per method, plus the parts they share. Importing registers them all."""
from . import simclr  # noqa: F401
from .registry import RecipeContext, StepOut, get, names, register  # noqa: F401
from . import cpc  # noqa: F401
from . import cmc, instdisc, invaspread  # noqa: F401
from . import moco, mocov3, simclrv2  # noqa: F401
from . import byol, dino, simsiam, swav  # noqa: F401

"""Where PBT's classes lived before the scheduler registry (schedulers.py). A sweep saved then holds them pickled
under this module's name; these names let `sslab tune --name SWEEP` resume it."""
from .schedulers import ClipToSpace, SegmentPBT  # noqa: F401

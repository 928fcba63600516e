"""Where PBT's classes lived before the scheduler registry (schedulers.py). A sweep saved then holds them pickled
under this module's name, and unpickling it looks them up here."""
from .schedulers import ClipToSpace, SegmentPBT  # noqa: F401

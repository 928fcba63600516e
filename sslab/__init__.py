"""sslab: self-supervised visual representation learning at scale on Ray.

The Python API (`sslab.train`, `sslab.load_encoder`, `sslab.embed`) lives in `sslab.api`; it is loaded on first
use, so `import sslab` stays light."""
__version__ = "0.1.0"

_API = ("train", "load_encoder", "embed", "Encoder", "TrainResult", "ConfigError")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sslab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))

"""Search spaces over dotted config keys: the named ones, and the small range syntax of `sslab tune --space`.

A space is a list of `Range`s, each over one key `sslab train` overrides take (`recipe.temperature`). Syntax of one
`--space` argument (comma separated; the flag may repeat):

    NAME                          a named space: temperature, momentum, queue, strength (see NAMED)
    KEY=uniform:LOW,HIGH          data.min_scale=uniform:0.1,0.5
    KEY=loguniform:LOW,HIGH       recipe.temperature=loguniform:0.05,0.5
    KEY=1-loguniform:LOW,HIGH     1 - value is log-uniform, for knobs near 1: recipe.momentum=1-loguniform:1e-4,0.1
    KEY=randint:LOW,HIGH          an integer in LOW..HIGH (both included)
    KEY=choice:V1,V2,...          one value drawn per trial: recipe.dim=choice:64,128
    KEY=grid:V1,V2,...            every value tried (each --samples times)
    NAME=DIST:...                 a named space with another range: temperature=loguniform:0.1,1.0

A YAML file maps the same keys or names to the same strings, to a list (a choice), or to nothing (a named space's
own range). Everything is checked against the recipe's config before Ray starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterable

import yaml

from ..config import ConfigError, flatten

CONTINUOUS = ("uniform", "loguniform", "1-loguniform")
KINDS = CONTINUOUS + ("randint", "choice", "grid")
QUEUE_MULTIPLES = (4, 16, 64, 256)  # queue lengths tried, in global batches (MoCo's 65536 = 256 x 256)

# name -> (key, kind, values); the queue's values are multiples of the global batch, resolved per sweep
NAMED: dict[str, tuple[str, str, tuple]] = {
    "temperature": ("recipe.temperature", "loguniform", (0.05, 0.5)),
    "momentum": ("recipe.momentum", "1-loguniform", (1e-4, 0.1)),   # 0.9 .. 0.9999
    "queue": ("recipe.queue_size", "choice", QUEUE_MULTIPLES),
    "strength": ("data.strength", "uniform", (0.25, 1.5)),
}
# keys a sweep sets itself (or that would break it): tuned through flags, never through a range
RESERVED = {"data.path": "--data", "engine.epochs": "--epochs", "engine.workers": "--workers-per-trial"}
COMMON = ("data.strength", "data.min_scale", "data.blur_p", "engine.base_lr", "engine.weight_decay",
          "engine.warmup_epochs", "engine.batch_size")


@dataclass(frozen=True)
class Range:
    key: str      # dotted config key
    kind: str     # one of KINDS
    values: tuple  # (low, high) for continuous kinds and randint, else the choices

    @property
    def name(self) -> str:
        """The variable Tune samples: the key, or `1-KEY` for a complement range."""
        return f"1-{self.key}" if self.kind == "1-loguniform" else self.key

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    def domain(self, grid: bool = False):
        from ray import tune

        lo, hi = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind in ("loguniform", "1-loguniform"):
            return tune.loguniform(lo, hi)
        if self.kind == "randint":
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive
        if self.kind == "grid" or grid:
            return tune.grid_search(list(self.values))
        return tune.choice(list(self.values))

    def value(self, sample: Any) -> Any:
        """Tune's sample -> the config value."""
        return 1.0 - sample if self.kind == "1-loguniform" else sample

    def clip(self, sample: Any) -> Any:
        """PBT perturbs by multiplying: keep a perturbed sample inside the range."""
        if self.kind in CONTINUOUS or self.kind == "randint":
            return type(sample)(min(max(sample, self.values[0]), self.values[1]))
        return sample

    def endpoints(self) -> tuple:
        """Config values that bound the range: what validation tries."""
        return tuple(self.value(v) for v in self.values)

    def describe(self) -> str:
        if self.kind == "1-loguniform":
            return f"{self.key} = 1 - loguniform({self.values[0]:g}, {self.values[1]:g})"
        if self.discrete:
            return f"{self.key} {self.kind} {list(self.values)}"
        return f"{self.key} ~ {self.kind}({self.values[0]:g}, {self.values[1]:g})"

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict) -> "Range":
        return cls(d["key"], d["kind"], tuple(d["values"]))


# ---------------------------------------------------------------- parsing: text -> items (name or key, dist)

def _scalar(text: str) -> Any:
    """'64' -> 64, '0.1' -> 0.1, 'true' -> True, 'resnet18' -> 'resnet18'."""
    v = yaml.safe_load(text) if text.strip() else ""
    return v if isinstance(v, (int, float, bool, str)) else text.strip()


def parse_space(specs: Iterable[str]) -> list[tuple[str, str | None, list]]:
    """`--space` arguments (strings or YAML files) -> [(name_or_key, kind or None for a named default, values)]."""
    items: list[tuple[str, str | None, list]] = []
    for spec in specs:
        spec = spec.strip()
        if spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
            items += _parse_file(spec)
        else:
            items += _parse_text(spec)
    return items


def _parse_text(text: str) -> list[tuple[str, str | None, list]]:
    items: list[list] = []
    for raw in text.split(","):
        tok = raw.strip()
        if not tok:
            continue
        if "=" in tok:
            key, _, rest = tok.partition("=")
            kind, sep, first = rest.partition(":")
            kind = kind.strip()
            if not sep or kind not in KINDS:
                raise ConfigError(f"--space {tok!r}: a range looks like KEY=DIST:VALUES with DIST one of "
                                  f"{', '.join(KINDS)} (e.g. recipe.temperature=loguniform:0.05,0.5)")
            items.append([key.strip(), kind, [_scalar(first)] if first.strip() else []])
            continue
        last = items[-1] if items else None
        takes_more = last is not None and last[1] is not None and (
            (last[1] in ("choice", "grid") and tok not in NAMED) or len(last[2]) < 2)
        if takes_more:
            last[2].append(_scalar(tok))
        elif tok in NAMED:
            items.append([tok, None, []])
        else:
            raise ConfigError(f"--space: {tok!r} is not a named space ({', '.join(NAMED)}) and not a range "
                              f"KEY=DIST:VALUES (DIST one of {', '.join(KINDS)})")
    return [tuple(i) for i in items]


def _parse_file(path: str) -> list[tuple[str, str | None, list]]:
    if not os.path.isfile(path):
        raise ConfigError(f"--space {path}: no such file")
    with open(path) as fh:
        tree = yaml.safe_load(fh) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a space file maps keys or named spaces to ranges, e.g. "
                          f"'recipe.temperature: loguniform:0.05,0.5'")
    items = []
    for key, spec in flatten(tree).items():  # nested sections -> dotted keys
        if spec is None:
            if key not in NAMED:
                raise ConfigError(f"{path}: {key!r} has no range and is not a named space ({', '.join(NAMED)})")
            items.append((key, None, []))
        elif isinstance(spec, list):
            items.append((key, "choice", spec))
        else:
            items += _parse_text(f"{key}={spec}")
    return items


# ---------------------------------------------------------------- resolving against a recipe's config

def config_keys(recipe_name: str) -> dict[str, set[str]]:
    from ..platform.spec import SECTIONS
    from ..recipes import registry

    classes = SECTIONS | {"recipe": registry.get(recipe_name).config}
    return {s: {f.name for f in fields(cls)} for s, cls in classes.items()}


def tunable_keys(recipe_name: str) -> list[str]:
    """The keys worth listing: every field of the recipe's config, then the common data/engine knobs."""
    keys = config_keys(recipe_name)
    return [f"recipe.{n}" for n in sorted(keys["recipe"])] + list(COMMON)


def named_for(recipe_name: str) -> list[str]:
    keys = config_keys(recipe_name)
    return [n for n, (key, _, _) in NAMED.items() if key.partition(".")[2] in keys[key.partition(".")[0]]]


def _lacks(recipe_name: str, key: str, what: str) -> ConfigError:
    return ConfigError(
        f"{what}: recipe {recipe_name} has no key {key}. Tunable keys of {recipe_name}: "
        f"{', '.join(tunable_keys(recipe_name))} (any other engine./model./data. key works too); "
        f"named spaces for {recipe_name}: {', '.join(named_for(recipe_name)) or 'none'}")


def resolve(recipe_name: str, items: list[tuple[str, str | None, list]], base: dict[str, Any]) -> list[Range]:
    """Parsed items -> checked Ranges: the key exists for this recipe, the range is well formed, and both ends
    (every choice) make a valid config on top of `base` overrides. No Ray involved."""
    from ..platform.spec import make_spec

    if not items:
        example = ",".join(named_for(recipe_name)) or "KEY=uniform:LOW,HIGH"
        raise ConfigError(f"--space is empty: name what to tune, e.g. --space {example}")
    spec = make_spec(recipe_name, base)
    keys = config_keys(recipe_name)
    out: list[Range] = []
    for name, kind, values in items:
        what = f"--space {name}"
        if name in NAMED:
            key, default_kind, default_values = NAMED[name]
            if kind is None:
                kind, values = default_kind, list(default_values)
                if name == "queue":
                    values = [m * spec.engine.batch_size for m in default_values]
            what = f"the named space {name!r} (tunes {key})"
        else:
            key = name
        section, _, field = key.partition(".")
        if section not in keys or not field:
            raise ConfigError(f"{what}: keys look like section.name with section one of {', '.join(keys)}")
        if field not in keys[section]:
            raise _lacks(recipe_name, key, what)
        if key in RESERVED:
            raise ConfigError(f"{what}: {key} is set by the sweep itself ({RESERVED[key]}), it cannot be tuned")
        if any(r.key == key for r in out):
            raise ConfigError(f"{what}: {key} appears twice in the space")
        out.append(_check_range(Range(key, kind, tuple(values)), what))
    for r in out:  # every end of every range must make a valid run config
        for v in r.endpoints():
            try:
                make_spec(recipe_name, {**base, r.key: v})
            except ConfigError as e:
                raise ConfigError(f"--space {r.describe()}: {e}") from None
    return out


def _check_range(r: Range, what: str) -> Range:
    if r.discrete:
        if not r.values:
            raise ConfigError(f"{what}: {r.kind} needs at least one value, e.g. {r.key}={r.kind}:1,2")
        return r
    if len(r.values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r.values):
        raise ConfigError(f"{what}: {r.kind} needs two numbers LOW,HIGH, got {list(r.values)}")
    lo, hi = r.values
    if not lo < hi:
        raise ConfigError(f"{what}: {r.kind} needs LOW < HIGH, got {lo}, {hi}")
    if r.kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(f"{what}: randint needs integers, got {lo}, {hi}")
        return Range(r.key, r.kind, (int(lo), int(hi)))
    if r.kind in ("loguniform", "1-loguniform") and lo <= 0:
        raise ConfigError(f"{what}: {r.kind} needs LOW > 0, got {lo}")
    if r.kind == "1-loguniform" and hi > 1:
        raise ConfigError(f"{what}: 1-loguniform draws 1 - value, so HIGH must be <= 1, got {hi}")
    return Range(r.key, r.kind, (float(lo), float(hi)))


# ---------------------------------------------------------------- trial config <-> overrides

def plain(v: Any) -> Any:
    """numpy scalars (Tune samples randint with numpy) -> Python scalars, for JSON, YAML and CSV."""
    return v.item() if hasattr(v, "item") else v


def overrides_for(space: list[Range], config: dict) -> dict[str, Any]:
    """A trial's Tune config (sampled variables) -> dotted overrides."""
    return {r.key: plain(r.value(config[r.name])) for r in space if r.name in config}


def param_space(space: list[Range], grid: bool = False) -> dict:
    return {r.name: r.domain(grid) for r in space}


def mutations(space: list[Range]) -> dict:
    """What PBT may perturb mid-run: the continuous ranges. Choices may change shapes (a queue, a head's width)
    that a cloned checkpoint must keep, so they stay as first drawn and travel with the cloned config."""
    return {r.name: r.domain() for r in space if r.kind in CONTINUOUS}

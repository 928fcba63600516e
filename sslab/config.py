"""Frozen-dataclass configuration addressed by dotted keys.

Every owner (engine, model, data, each recipe) has one frozen dataclass holding its defaults. A run's config is
the set of sections ``{"engine": ..., "model": ..., "data": ..., "recipe": ...}``; YAML presets, CLI ``key=value``
overrides and Tune search spaces all address the same dotted keys (``recipe.temperature=0.2``). Unknown keys and
out-of-range values fail here, before any Ray resource is touched, naming the valid choices.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and the valid choices."""


def knob(default, help: str = "", *, min=None, max=None, choices=None, min_exclusive=False):
    """A config field with its one-line doc and its valid range, checked by `validate`."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _coerce(value: Any, typ: Any, key: str):
    """Turn a CLI/YAML value into the field's declared type."""
    origin = getattr(typ, "__origin__", None)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            args = typ.__args__
            inner = args[0] if args else float
            return tuple(_coerce(v, inner, key) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def validate(obj, section: str) -> None:
    """Check every field of a config dataclass against its knob() range."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        key = f"{section}.{f.name}"
        m = f.metadata
        if m.get("choices") is not None and v not in m["choices"]:
            raise ConfigError(f"{key} must be one of {list(m['choices'])}, got {v!r}")
        lo, hi = m.get("min"), m.get("max")
        vals = v if isinstance(v, tuple) else (v,)
        for x in vals:
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            if lo is not None and (x < lo or (m.get("min_exclusive") and x == lo)):
                op = ">" if m.get("min_exclusive") else ">="
                rng = f"{op} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"{key} must be {rng}, got {v!r}")
            if hi is not None and x > hi:
                raise ConfigError(f"{key} must be <= {hi}" + (f" and >= {lo}" if lo is not None else "") + f", got {v!r}")
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{section}: {e}") from None


def build(cls, values: Mapping[str, Any], section: str):
    """Instantiate `cls` from a flat mapping of its field names; unknown names fail listing the valid ones."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]}; valid keys of {section}: {', '.join(sorted(names))}")
    obj = cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})
    validate(obj, section)
    return obj


def describe(cls) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each knob of a config class: used by `--help` style listings."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["recipe.temperature=0.2", ...]` -> {"recipe.temperature": "0.2"}; a malformed item fails."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. engine.epochs=5)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"engine": {"epochs": 3}} -> {"engine.epochs": 3}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_preset(name_or_path: str, recipe: str | None = None,
                knobs: Callable[[str], Mapping[str, set]] | None = None) -> dict[str, Any]:
    """A YAML preset by path or by name from sslab/presets/, returned as flat dotted keys.

    A preset may add per-recipe sections under `recipes:` ({simclr: {engine: ..., recipe: ...}, byol: ...}): the
    entry of `recipe` is merged over the shared sections, and such a preset must be loaded for a recipe it covers.
    With `knobs` (recipe name -> {section: its field names}; raises ConfigError for an unknown recipe), every key
    is checked, each entry's against its own recipe's, and an unknown one fails naming the file. The platform
    passes it (`spec.preset_overrides`): this module knows no recipes."""
    path = name_or_path
    if not os.path.exists(path):
        here = os.path.join(os.path.dirname(__file__), "presets", f"{name_or_path}.yaml")
        if not os.path.exists(here):
            avail = sorted(p[:-5] for p in os.listdir(os.path.dirname(here)) if p.endswith(".yaml"))
            raise ConfigError(f"preset {name_or_path!r} is neither a file nor a built-in preset ({', '.join(avail)})")
        path = here
    with open(path) as fh:
        try:
            tree = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: a preset must be a mapping of sections (engine:, data:, recipe:, model:)")

    def check(flat: Mapping[str, Any], name: str, where: str) -> None:
        if knobs is None:
            return
        try:
            known = knobs(name)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        for key in flat:
            section, _, field_name = key.partition(".")
            if section not in known or not field_name:
                raise ConfigError(f"{where}: unknown key {key!r}: keys look like section.name with section one of "
                                  f"{', '.join(known)}")
            if field_name not in known[section]:
                raise ConfigError(f"{where}: unknown key {key}; valid keys of {section}: "
                                  f"{', '.join(sorted(known[section]))}")

    tree = dict(tree)
    entries = tree.pop("recipes", None)
    shared = flatten(tree)
    if entries is None:
        if recipe is not None:
            check(shared, recipe, path)
        return shared
    if not isinstance(entries, Mapping):
        raise ConfigError(f"{path}: recipes: must map recipe names to sections, e.g. recipes: {{simclr: {{recipe: "
                          f"{{temperature: 0.2}}}}}}")
    covered = ", ".join(map(str, entries)) or "none"
    if recipe is None:
        raise ConfigError(f"preset {name_or_path!r} has settings per recipe ({covered}): load it for one of them")
    if recipe not in entries:
        raise ConfigError(f"preset {name_or_path!r} has no settings for recipe {recipe!r}; it covers: {covered}")
    for name, entry in entries.items():
        where = f"{path}: recipes.{name}"
        if entry is not None and not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping of sections (engine:, data:, recipe:, model:)")
        check(flatten(entry or {}), name, where)
    check(shared, recipe, path)
    return {**shared, **flatten(entries[recipe] or {})}


def asdict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


__all__ = ["ConfigError", "knob", "build", "validate", "describe", "parse_overrides", "flatten", "load_preset",
           "asdict", "dataclass"]

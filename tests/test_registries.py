"""The one Registry shape every registry uses (recipes, data sources, evaluation protocols, Tune schedulers)."""
import pytest

from sslab.config import ConfigError
from sslab.registry import Registry


def test_names_get_and_a_duplicate_is_an_error():
    reg = Registry("widget")
    reg.register("b")(len)
    reg.add("a", max)
    assert reg.names() == ["b", "a"] and reg.get("b") is len and "a" in reg and list(reg) == ["b", "a"]
    with pytest.raises(ValueError, match="widget 'a' is already registered by builtins; pick another name"):
        reg.add("a", min)
    assert reg.get("a") is max  # the first entry stays
    with pytest.raises(ConfigError, match="unknown widget 'c'; registered widgets: b, a"):
        reg.get("c")


def test_entries_are_loaded_on_first_use_once():
    calls = []
    reg = Registry("widget", load=lambda: calls.append(reg.add("late", abs)))
    assert calls == []                       # nothing imported at construction
    assert reg.names() == ["late"] and reg.get("late") is abs
    assert len(calls) == 1


def test_every_registry_drives_its_cli_choices():
    from sslab.cli import build_parser
    from sslab.datasets.sources import SOURCES
    from sslab.evaluation.protocols import PROTOCOLS
    from sslab.recipes import registry
    from sslab.tuning.schedulers import SCHEDULERS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices

    def choices(p, dest):
        return next(a for a in p._actions if a.dest == dest).choices

    data = next(a for a in sub["data"]._actions if a.dest == "data_cmd").choices
    assert list(choices(data["prepare"], "source")) == SOURCES.names() == ["fashion-mnist", "folder"]
    assert list(choices(sub["eval"], "protocol")) == PROTOCOLS.names() == ["knn", "linear", "finetune", "diagnostics"]
    assert list(choices(sub["tune"], "scheduler")) == SCHEDULERS.names() == ["asha", "pbt", "fifo"]
    assert registry.names() == sorted(registry.RECIPES.names()) and len(registry.names()) == 14  # every module

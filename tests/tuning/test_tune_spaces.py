"""Search spaces, sweep definitions and pre-flight checks: pure unit tests, no Ray."""
from dataclasses import dataclass

import pytest

from sslab.config import ConfigError, knob
from sslab.recipes import registry
from sslab.tuning import spaces
from sslab.tuning.schedulers import ClipToSpace
from sslab.tuning.runner import Sweep, default_concurrency, preflight, trial_resources

BASE = {"data.path": "/data/somewhere", "engine.batch_size": 32}


@dataclass(frozen=True)
class FakeMoCoConfig:  # a recipe config with every named knob, standing in for any recipe that has them
    queue_size: int = knob(4096, "K", min=1)
    momentum: float = knob(0.999, "m", min=0.0, max=1.0)
    temperature: float = knob(0.2, "tau", min=0.0, min_exclusive=True)
    dim: int = knob(128, "d", min=1)


@pytest.fixture
def fake_recipe(monkeypatch):
    registry.names()  # load the real ones first, so the fake is added, not the only one
    info = registry.RecipeInfo("fakemoco", object, FakeMoCoConfig, lambda *a: None, {}, "fake")
    monkeypatch.setitem(registry.RECIPES._entries, "fakemoco", info)
    return "fakemoco"


def test_parse_named_and_ranges_in_one_argument():
    items = spaces.parse_space(["temperature,recipe.dim=choice:64,128,data.min_scale=uniform:0.1,0.5,strength"])
    assert items == [("temperature", None, []), ("recipe.dim", "choice", [64, 128]),
                     ("data.min_scale", "uniform", [0.1, 0.5]), ("strength", None, [])]
    items = spaces.parse_space(["temperature=loguniform:0.1,1", "model.name=grid:small_cnn,resnet18"])
    assert items == [("temperature", "loguniform", [0.1, 1]), ("model.name", "grid", ["small_cnn", "resnet18"])]


def test_parse_yaml_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("temperature:\nrecipe:\n  dim: [64, 128]\ndata.strength: uniform:0.5,1.0\n")
    assert spaces.parse_space([str(path)]) == [("temperature", None, []), ("recipe.dim", "choice", [64, 128]),
                                               ("data.strength", "uniform", [0.5, 1.0])]


@pytest.mark.parametrize("text, message", [
    ("warmth", "not a named space"),
    ("recipe.dim=bogus:1,2", "KEY=DIST:VALUES"),
    ("data.strength=uniform:0.5", "two numbers"),
    ("data.strength=uniform:1.0,0.5", "LOW < HIGH"),
    ("recipe.temperature=loguniform:0,0.5", "LOW > 0"),
    ("recipe.temperature=uniform:0.1,0.2,0.3", "not a named space"),
])
def test_malformed_ranges_fail(text, message):
    with pytest.raises(ConfigError, match=message):
        spaces.resolve("simclr", spaces.parse_space([text]), BASE)


def test_simclr_named_spaces_resolve():
    space = spaces.resolve("simclr", spaces.parse_space(["temperature,strength"]), BASE)
    assert [(r.key, r.kind, r.values) for r in space] == [
        ("recipe.temperature", "loguniform", (0.05, 0.5)), ("data.strength", "uniform", (0.25, 1.5))]


def test_knob_the_recipe_lacks_lists_its_tunable_keys():
    with pytest.raises(ConfigError) as err:
        spaces.resolve("simclr", spaces.parse_space(["temperature,queue"]), BASE)
    msg = str(err.value)
    assert "'queue'" in msg and "recipe.queue_size" in msg and "simclr" in msg
    for key in ("recipe.temperature", "recipe.dim", "data.strength"):
        assert key in msg  # the tunable keys are listed
    assert "named spaces for simclr: temperature, strength" in msg
    with pytest.raises(ConfigError, match="recipe simclr has no key recipe.tau"):
        spaces.resolve("simclr", spaces.parse_space(["recipe.tau=uniform:0.1,0.2"]), BASE)
    with pytest.raises(ConfigError, match="section one of"):
        spaces.resolve("simclr", spaces.parse_space(["optim.lr=uniform:0.1,0.2"]), BASE)


def test_reserved_duplicate_and_out_of_range_keys_fail():
    with pytest.raises(ConfigError, match="engine.epochs is set by the sweep itself"):
        spaces.resolve("simclr", spaces.parse_space(["engine.epochs=grid:1,2"]), BASE)
    with pytest.raises(ConfigError, match="appears twice"):
        spaces.resolve("simclr", spaces.parse_space(["temperature,recipe.temperature=uniform:0.1,0.2"]), BASE)
    with pytest.raises(ConfigError, match="data.strength must be <= 4.0"):  # the config's own range is checked
        spaces.resolve("simclr", spaces.parse_space(["data.strength=uniform:0.5,9"]), BASE)
    with pytest.raises(ConfigError, match="model.width must be >= 4"):  # every choice is checked
        spaces.resolve("simclr", spaces.parse_space(["model.width=choice:8,1"]), BASE)
    with pytest.raises(ConfigError, match="--space is empty"):
        spaces.resolve("simclr", [], BASE)


def test_queue_and_momentum_on_a_recipe_that_has_them(fake_recipe):
    space = spaces.resolve(fake_recipe, spaces.parse_space(["temperature,momentum,queue"]), BASE)
    by_key = {r.key: r for r in space}
    assert by_key["recipe.queue_size"].values == (4 * 32, 16 * 32, 64 * 32, 256 * 32)  # multiples of the batch
    mom = by_key["recipe.momentum"]
    assert mom.name == "1-recipe.momentum" and mom.values == (1e-4, 0.1)
    assert mom.endpoints() == pytest.approx((0.9999, 0.9))
    # a trial's sampled variables -> dotted overrides
    config = {"recipe.temperature": 0.1, "1-recipe.momentum": 0.004, "recipe.queue_size": 512}
    assert spaces.overrides_for(space, config) == pytest.approx(
        {"recipe.temperature": 0.1, "recipe.momentum": 0.996, "recipe.queue_size": 512})
    # PBT perturbs the continuous ranges only; a queue length sizes a buffer a clone must keep
    assert set(spaces.mutations(space)) == {"recipe.temperature", "1-recipe.momentum"}
    clipped = ClipToSpace(space)({"recipe.temperature": 0.6, "1-recipe.momentum": 0.12, "recipe.queue_size": 512})
    assert clipped == {"recipe.temperature": 0.5, "1-recipe.momentum": 0.1, "recipe.queue_size": 512}


def test_every_registered_recipe_gets_exactly_the_named_spaces_its_config_has():
    for name in registry.names():
        fields = spaces.config_keys(name)["recipe"]
        for named, (key, _, _) in spaces.NAMED.items():
            section, _, field = key.partition(".")
            has = field in spaces.config_keys(name)[section]
            items = spaces.parse_space([named])
            if has:
                (r,) = spaces.resolve(name, items, {"data.path": "/d"})
                assert r.key == key
            else:
                with pytest.raises(ConfigError, match=f"recipe {name} has no key {key}"):
                    spaces.resolve(name, items, {"data.path": "/d"})
        assert ("temperature" in spaces.named_for(name)) == ("temperature" in fields)


def test_param_space_domains_and_grid():
    space = spaces.resolve("simclr", spaces.parse_space(["temperature,recipe.dim=choice:8,16,engine.seed=grid:1,2"]),
                           BASE)
    ps = spaces.param_space(space)
    assert ps["engine.seed"] == {"grid_search": [1, 2]}
    assert 0.05 <= ps["recipe.temperature"].sample() <= 0.5 and ps["recipe.dim"].sample() in (8, 16)
    assert spaces.param_space(space, grid=True)["recipe.dim"] == {"grid_search": [8, 16]}
    r = spaces.resolve("simclr", spaces.parse_space(["engine.seed=randint:3,4"]), BASE)[0]
    assert {r.domain().sample() for _ in range(50)} == {3, 4}  # both ends included


def test_default_concurrency_is_the_tightest_resource():
    assert default_concurrency({"CPU": 1.0}, {"CPU": 4.0}) == 4
    assert default_concurrency({"CPU": 1.5}, {"CPU": 4.0}) == 2
    assert default_concurrency({"CPU": 1.5, "GPU": 2.0}, {"CPU": 16.0, "GPU": 3.0}) == 1
    assert default_concurrency({"CPU": 8.0}, {"CPU": 2.0}) == 1  # never zero


def test_trial_resources_count_workers_driver_and_data():
    sweep = Sweep("simclr", {**BASE, "engine.workers": 2, "engine.cpus_per_worker": 0.5, "data.cpus_per_task": 0.25},
                  [], name="s", storage="/tmp")
    # 2 x 0.5 for the workers, a whole CPU for the data pipeline's read tasks, 0.1 for the trial's driver
    assert trial_resources(sweep.spec()) == pytest.approx({"CPU": 2.1})
    sweep.base["engine.use_gpu"] = True
    assert trial_resources(sweep.spec())["GPU"] == 2.0


def test_sweep_definition_round_trips_and_a_named_sweep_resumes_from_it(tmp_path):
    import argparse

    from sslab.tuning.cli import sweep_from_args

    space = spaces.resolve("simclr", spaces.parse_space(["temperature,recipe.dim=choice:8,16"]), BASE)
    sweep = Sweep("simclr", dict(BASE), space, name="old", storage=str(tmp_path), scheduler="pbt", samples=3)
    sweep.save()
    again = Sweep.load(sweep.path)
    assert again == sweep and again.resolved_search == "random" and again.num_samples == 3
    args = argparse.Namespace(storage=str(tmp_path), name=None, resume=True, recipe="simclr")
    resumed = sweep_from_args(args)  # --resume without a name: the latest sweep of the recipe
    assert resumed == sweep
    args.recipe = "mocov2"
    with pytest.raises(ConfigError, match="no sweep of mocov2"):
        sweep_from_args(args)


def test_choice_only_space_is_a_grid():
    space = spaces.resolve("simclr", spaces.parse_space(["recipe.dim=choice:8,16"]), BASE)
    sweep = Sweep("simclr", BASE, space, name="s", storage="/tmp")
    assert sweep.resolved_search == "grid" and (sweep.num_samples, sweep.num_trials) == (1, 2)
    mixed = spaces.resolve("simclr", spaces.parse_space(["engine.seed=grid:1,2,recipe.dim=choice:8,16,temperature"]),
                           BASE)
    sweep = Sweep("simclr", BASE, mixed, name="s", storage="/tmp")  # a grid times random draws of the rest
    assert sweep.resolved_search == "random" and (sweep.num_samples, sweep.num_trials) == (1, 2)
    sweep.samples = 3
    assert sweep.num_trials == 6
    sweep = Sweep("simclr", BASE, mixed[1:], name="s", storage="/tmp")
    assert (sweep.num_samples, sweep.num_trials) == (8, 8)


def test_preflight_rejects_bad_combinations(tiny_dataset, monkeypatch):
    base = {"data.path": tiny_dataset, "engine.batch_size": 16}
    choice = spaces.resolve("simclr", spaces.parse_space(["recipe.dim=choice:8,16"]), base)
    cont = spaces.resolve("simclr", spaces.parse_space(["temperature"]), base)
    with pytest.raises(ConfigError, match="perturbs continuous ranges"):
        preflight(Sweep("simclr", base, choice, name="s", storage="/tmp", scheduler="pbt"))
    with pytest.raises(ConfigError, match="--search grid needs choice/grid ranges only; recipe.temperature"):
        preflight(Sweep("simclr", base, cont, name="s", storage="/tmp", search="grid"))
    with pytest.raises(ConfigError, match="PBT picks its own configurations"):
        preflight(Sweep("simclr", base, cont, name="s", storage="/tmp", scheduler="pbt", search="optuna"))
    with pytest.raises(ConfigError, match="unknown scheduler 'hyperband'; registered schedulers: asha, pbt, fifo"):
        preflight(Sweep("simclr", base, cont, name="s", storage="/tmp", scheduler="hyperband"))
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # as if optuna were not installed
    with pytest.raises(ConfigError, match=r"pip install sslab\[tune\]"):
        preflight(Sweep("simclr", base, cont, name="s", storage="/tmp", search="optuna"))
    with pytest.raises(ConfigError, match="larger than the"):  # both ends are checked against the data
        big = spaces.resolve("simclr", spaces.parse_space(["engine.batch_size=choice:16,4096"]), base)
        preflight(Sweep("simclr", base, big, name="s", storage="/tmp"))


def test_cli_documents_the_syntax_and_rejects_a_missing_knob_before_ray(tiny_dataset, tmp_path, capsys):
    from sslab.cli import main

    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    helptext = capsys.readouterr().out
    assert "KEY=1-loguniform:LOW,HIGH" in helptext and "--workers-per-trial" in helptext
    rc = main(["tune", "simclr", "--data", tiny_dataset, "--space", "temperature,queue", "--storage", str(tmp_path),
               "--epochs", "1", "engine.batch_size=16"])
    assert rc == 2 and "recipe simclr has no key recipe.queue_size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_optuna_samples_every_named_space_within_its_range():
    # the searcher `--search optuna` builds, fed our param space: every suggestion lies in the named ranges
    # (momentum through its 1 - loguniform variable, the queue from its choices)
    from ray.tune.search.optuna import OptunaSearch

    space = spaces.resolve("mocov2", spaces.parse_space(["temperature,momentum,queue,strength"]), BASE)
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("knn_top1", "max", spaces.param_space(space))
    ranges = {r.name: r for r in space}
    for i in range(8):
        config = searcher.suggest(f"t{i}")
        assert set(config) == set(ranges)
        for name, value in config.items():
            r = ranges[name]
            if r.kind == "choice":
                assert value in r.values
            else:
                assert r.values[0] <= value <= r.values[1], (name, value)
        searcher.on_trial_complete(f"t{i}", {"knn_top1": 0.5 + 0.01 * i})

"""Presets: every built-in one resolves for every recipe it covers (and the recipe builds and steps), per-recipe
sections override the shared ones, overrides still win, and mistakes name the preset or its file."""
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

import sslab
from sslab.cli import main
from sslab.config import ConfigError, flatten, load_preset
from sslab.platform.spec import RunSpec, build_recipe, make_spec, preset_overrides
from sslab.recipes import registry

PRESETS = os.path.join(os.path.dirname(sslab.__file__), "presets")
# presets without a `recipes:` mapping apply to any recipe; these are the ones each is meant for (its comment)
SINGLE = {"demo": ("simclr",), "mocov3_vit": ("mocov3",)}


def covered():
    out = []
    for file in sorted(os.listdir(PRESETS)):
        name = file.removesuffix(".yaml")
        with open(os.path.join(PRESETS, file)) as fh:
            tree = yaml.safe_load(fh)
        recipes = tuple(tree["recipes"]) if "recipes" in tree else SINGLE.get(name)
        assert recipes, f"built-in preset {name} has no recipes: mapping; list the recipes it is for in SINGLE"
        out += [(name, r) for r in recipes]
    return out


def fake_manifest(size: int):
    return SimpleNamespace(channels=3, image_size=(size, size), mean=(0.5,) * 3, std=(0.25,) * 3,
                           count=lambda split: 50_000)


@pytest.mark.parametrize("preset,recipe", covered())
def test_builtin_preset_resolves_builds_and_steps(preset, recipe):
    spec = make_spec(recipe, {"data.path": "/x"}, preset)
    assert RunSpec.from_dict(spec.to_dict()) == spec              # what workers rebuild is what was validated
    size = spec.data.crop_size or 32
    info = registry.get(recipe)
    viewset = info.views(spec.recipe, spec.data, size)            # view specs check their own ranges
    manifest = fake_manifest(size)
    if hasattr(info.cls, "check_spec"):                           # queue / batch / BN-group divisibility
        info.cls.check_spec(spec, manifest)
    torch.manual_seed(0)
    model = build_recipe(spec, manifest, size)
    n = 8                                                         # divisible by mocov2's 8 BN groups
    sides = [min(s.size, 64) for _, s in viewset.views]           # a ResNet takes any size; keep the test cheap
    views = [torch.randn(n, 3, side, side) for side in sides]
    batch = {"index": torch.arange(n), "label": torch.zeros(n, dtype=torch.long)}
    out = model(views, batch, 0.0)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_per_recipe_entry_overrides_the_shared_sections(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("engine: {epochs: 7, batch_size: 64}\n"
                 "recipes:\n  simclr: {engine: {epochs: 3}, recipe: {temperature: 0.3}}\n  byol:\n")
    assert preset_overrides(str(p), "simclr") == {"engine.epochs": 3, "engine.batch_size": 64, "recipe.temperature": 0.3}
    assert preset_overrides(str(p), "byol") == {"engine.epochs": 7, "engine.batch_size": 64}
    simclr = make_spec("simclr", {"data.path": "/x"}, str(p))
    assert (simclr.engine.epochs, simclr.engine.batch_size, simclr.recipe.temperature) == (3, 64, 0.3)
    assert make_spec("byol", {"data.path": "/x"}, str(p)).engine.epochs == 7
    # a built-in one: instdisc's entry changes the shared batch and epochs, simclr keeps them
    inst, sim = (make_spec(r, {"data.path": "/x"}, "cifar10-resnet18") for r in ("instdisc", "simclr"))
    assert (inst.engine.batch_size, inst.engine.epochs, sim.engine.batch_size, sim.engine.epochs) == (128, 200, 256,
                                                                                                     1000)
    assert inst.model.name == sim.model.name == "resnet18" and inst.model.stem == "cifar"


def test_overrides_win_over_a_preset(capsys):
    spec = make_spec("byol", {"data.path": "/x", "engine.base_lr": "0.1", "recipe.momentum": "0.996",
                              "engine.epochs": 5}, "cifar10-resnet18")
    assert (spec.engine.base_lr, spec.recipe.momentum, spec.engine.epochs) == (0.1, 0.996, 5)
    assert spec.engine.weight_decay == 1e-5                       # the preset's entry where nothing overrides it
    assert main(["config", "byol", "--data", "/x", "--preset", "cifar10-resnet18", "--epochs", "4",
                 "engine.base_lr=0.1"]) == 0
    printed = capsys.readouterr().out
    assert "engine.epochs = 4 " in printed and "engine.base_lr = 0.1 " in printed
    assert "engine.optimizer = 'lars'" in printed and "model.stem = 'cifar'" in printed


def test_a_recipe_the_preset_does_not_cover_is_named_with_the_covered_ones(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        make_spec("cpc", {"data.path": "/x"}, "cifar10-resnet18")
    msg = str(e.value)
    assert "'cifar10-resnet18'" in msg and "'cpc'" in msg and "simclr, simclrv2, mocov2" in msg and "\n" not in msg
    assert main(["train", "cpc", "--data", "/x", "--preset", "imagenet100-resnet18"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'imagenet100-resnet18'" in err and "dino" in err
    with pytest.raises(ConfigError, match="settings per recipe .*load it for one of them"):
        load_preset("cifar10-resnet18")                           # a per-recipe preset needs its recipe


@pytest.mark.parametrize("entries,needle", [
    ("  simclr: {recipe: {temprature: 0.2}}\n",
     "recipes.simclr: unknown key recipe.temprature; valid keys of recipe: dim, hidden, layers, temperature"),
    ("  simclr: {}\n  byol: {recipe: {temperature: 0.2}}\n", "recipes.byol: unknown key recipe.temperature"),
    ("  simclr: {optim: {lr: 1}}\n", "recipes.simclr: unknown key 'optim.lr': keys look like section.name"),
    ("  simclr: {}\n  simclrr: {}\n", "recipes.simclrr: unknown recipe 'simclrr'; registered recipes: "),
    ("  simclr: 3\n", "recipes.simclr: must be a mapping of sections"),
])
def test_a_bad_recipe_entry_names_the_file(tmp_path, entries, needle):
    p = tmp_path / "bad.yaml"
    p.write_text("engine: {epochs: 2}\nrecipes:\n" + entries)
    with pytest.raises(ConfigError) as e:
        make_spec("simclr", {"data.path": "/x"}, str(p))
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_shared_keys_are_checked_for_the_recipe_and_name_the_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("recipe: {temperature: 0.2}\nrecipes: {simclr: {}, byol: {}}\n")
    assert make_spec("simclr", {"data.path": "/x"}, str(p)).recipe.temperature == 0.2
    with pytest.raises(ConfigError, match=f"^{p}: unknown key recipe.temperature; valid keys of recipe: dim"):
        make_spec("byol", {"data.path": "/x"}, str(p))
    p.write_text("recipes: [simclr]\n")
    with pytest.raises(ConfigError, match=f"^{p}: recipes: must map recipe names to sections"):
        make_spec("simclr", {"data.path": "/x"}, str(p))


def test_presets_without_recipes_work_as_before():
    for name in SINGLE:
        with open(os.path.join(PRESETS, f"{name}.yaml")) as fh:
            tree = yaml.safe_load(fh)
        assert load_preset(name) == flatten(tree)                 # no recipe: the flat keys, unchecked
        assert preset_overrides(name, SINGLE[name][0]) == flatten(tree)
    spec = make_spec("simclr", {"data.path": "/x", "engine.epochs": 3}, "demo")
    assert (spec.model.name, spec.recipe.temperature, spec.engine.epochs) == ("small_cnn", 0.2, 3)

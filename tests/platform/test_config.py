"""Config resolution and errors: unknown keys and bad values fail before Ray starts, naming the choices."""
import pytest

from sslab.config import ConfigError, parse_overrides
from sslab.platform.spec import RunSpec, make_spec


def test_defaults_then_recipe_settings_then_overrides():
    spec = make_spec("simclr", {"data.path": "/x", "recipe.temperature": "0.2", "engine.epochs": "3"})
    assert spec.recipe.temperature == 0.2 and spec.engine.epochs == 3
    assert spec.engine.optimizer == "lars"           # SimCLR's own setting over the engine default
    assert RunSpec.from_dict(spec.to_dict()) == spec  # what workers rebuild is what the driver validated


def test_preset_file_is_read_and_overridden(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("engine:\n  epochs: 7\n  batch_size: 64\nrecipe:\n  temperature: 0.3\n")
    spec = make_spec("simclr", {"data.path": "/x", "engine.epochs": 2}, str(preset))
    assert (spec.engine.epochs, spec.engine.batch_size, spec.recipe.temperature) == (2, 64, 0.3)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        make_spec("simclr", {"data.path": "/x", "recipe.temprature": "0.2"})
    assert "recipe.temprature" in str(e.value) and "temperature" in str(e.value)


def test_unknown_section_and_recipe():
    with pytest.raises(ConfigError, match="section one of"):
        make_spec("simclr", {"data.path": "/x", "optim.lr": 1})
    with pytest.raises(ConfigError, match="registered recipes: .*simclr"):
        make_spec("simclrr", {})


@pytest.mark.parametrize("key,value,needle", [
    ("recipe.temperature", "0", "recipe.temperature must be > 0"),
    ("engine.optimizer", "adam", "one of ['sgd', 'lars', 'adamw']"),
    ("engine.epochs", "0", "engine.epochs must be >= 1"),
    ("engine.epochs", "two", "cannot read 'two' as int"),
    ("data.strength", "9", "data.strength must be <= 4.0"),
    ("model.name", "resnet9", "model: name must be one of"),
])
def test_bad_values_name_the_field(key, value, needle):
    with pytest.raises(ConfigError) as e:
        make_spec("simclr", {"data.path": "/x", key: value})
    assert needle in str(e.value)


def test_missing_data_path_is_explained():
    with pytest.raises(ConfigError, match="--data"):
        make_spec("simclr", {})


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c.d = x=y"]) == {"a.b": "1", "c.d": "x=y"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["engine.epochs"])

"""params.yaml: the shipped file and every profile validate; bad input fails in one line naming the key."""
import copy
from pathlib import Path

import pytest
import yaml

from tailor.config import ConfigError, load_params, parse_params, pick_devices

ROOT = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("profile", sorted(RAW["profiles"]))
def test_shipped_params_validate_in_every_profile(profile):
    p = load_params(ROOT / "params.yaml", profile)
    assert p.profile == profile and {"phone", "laptop"} <= set(p.devices)


def test_profile_overrides_apply():
    p = parse_params(RAW, "test")
    assert p.model.n_layers == 4 and p.supernet.steps == RAW["profiles"]["test"]["supernet"]["steps"]


def _bad(mutate):
    raw = copy.deepcopy(RAW)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_misspelled_key_is_named():
    assert "supernet.stepz: unknown key" in _bad(lambda r: r["supernet"].update(stepz=3))


def test_misspelled_key_in_profile_is_named():
    assert "profiles.quick.supernet.stepz" in _bad(lambda r: r["profiles"]["quick"]["supernet"].update(stepz=3))


def test_wrong_type_is_named():
    assert "search.n_candidates" in _bad(lambda r: r["search"].update(n_candidates="many"))


def test_negative_budget_is_named():
    msg = _bad(lambda r: r["devices"]["phone"].update(budget_fraction=-0.5))
    assert "devices.phone" in msg and "budget_fraction" in msg


def test_unknown_format_is_named():
    assert "devices.laptop.format" in _bad(lambda r: r["devices"]["laptop"].update(format="tflite"))


def test_bits_the_format_lacks_are_named():
    assert "devices.phone" in _bad(lambda r: r["devices"]["phone"].update(allowed_bits=[3, 4]))


def test_unknown_device_is_named():
    p = parse_params(RAW)
    with pytest.raises(ConfigError, match="unknown device 'watch'"):
        pick_devices(p, "phone,watch")
    assert pick_devices(p, None) == list(p.devices)


def test_unknown_profile_is_named():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        parse_params(RAW, "huge")


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("supernet: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(f)

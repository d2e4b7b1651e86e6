"""params.yaml: the shipped file and every profile validate; bad input fails in one line naming the key."""
import copy
from pathlib import Path

import pytest
import yaml

from tailor.config import ConfigError, load_params, parse_params, pick_devices, read_yaml

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


def test_a_key_written_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    """PyYAML alone keeps the last value and DVC refuses the file: the two would read different params."""
    text = (ROOT / "params.yaml").read_text()
    anchor = "  phone:\n"
    assert anchor in text
    head, tail = text.split(anchor, 1)
    f = tmp_path / "params.yaml"
    f.write_text(head + anchor + "    budget_fraction: 0.9\n" + tail)
    line = (head + anchor).count("\n") + 1
    dup = next(i for i, s in enumerate(f.read_text().splitlines(), 1) if i > line and "budget_fraction" in s)
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert str(e.value) == (f"{f}: devices.phone.budget_fraction: key written twice (lines {line} and {dup})")


def test_repeated_keys_in_separate_mappings_are_fine(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: {k: 1}\nb: {k: 2}\nc: &m {k: 3}\nd:\n  <<: *m\n  e: 4\n")
    assert read_yaml(f) == {"a": {"k": 1}, "b": {"k": 2}, "c": {"k": 3}, "d": {"k": 3, "e": 4}}

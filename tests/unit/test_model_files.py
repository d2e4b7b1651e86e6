"""Bad model files stop with one line naming the file and the problem."""
import pytest
import torch

from tailor.models.base import ModelFileError, load_model_dir
from tailor.models.tiny import tiny_model


@pytest.fixture
def saved(tmp_path):
    tiny_model().save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def _err(path) -> str:
    with pytest.raises(ModelFileError) as e:
        load_model_dir(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_roundtrip(saved):
    assert load_model_dir(saved).config.num_hidden_layers == 3


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "model.safetensors: unreadable safetensors" in _err(saved)


def test_nan_weights(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    assert "NaN/Inf in model.norm.weight" in _err(saved)


def test_pickled_weights_are_refused(saved):
    (saved / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "pytorch_model.bin")
    assert "pickled weights (pytorch_model.bin) are refused" in _err(saved)


def test_missing_config(tmp_path):
    assert "no config.json" in _err(tmp_path)

"""Exported models from strangers: nothing in an export directory is unpickled or executed."""

from __future__ import annotations

import pickle
import shutil

import pytest
import yaml

from pretrain.config import ConfigError
from pretrain.engine.export import MODEL_FILE, load_exported


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    return out


def test_pickle_posing_as_safetensors_is_refused(export_copy, tmp_path):
    marker = tmp_path / "pwned"
    (export_copy / MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ"):
        load_exported(export_copy)
    assert not marker.exists()


def test_yaml_python_tags_in_the_config_are_refused(export_copy, tmp_path):
    marker = tmp_path / "pwned"
    cfg = yaml.safe_load((export_copy / "config.yaml").read_text())
    text = yaml.safe_dump(cfg) + f"evil: !!python/object/apply:os.system ['touch {marker}']\n"
    (export_copy / "config.yaml").write_text(text)
    with pytest.raises((yaml.YAMLError, ConfigError)):
        load_exported(export_copy)
    assert not marker.exists()


def test_tampered_weights_are_refused_by_name(export_copy):
    from safetensors.torch import load_file, save_file

    state = load_file(str(export_copy / MODEL_FILE))
    state.pop(next(iter(state)))
    state["injected.weight"] = next(iter(state.values())).clone()
    save_file(state, str(export_copy / MODEL_FILE))
    with pytest.raises(RuntimeError, match="missing keys .* unexpected keys .*injected.weight"):
        load_exported(export_copy)

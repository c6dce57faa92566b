from pathlib import Path

import pytest

from vgstudy.config import DataParams, RunParams, as_dict, describe_params, load, validate
from vgstudy.errors import ConfigError


def test_defaults_are_the_tiny_profile_on_cpu():
    p = validate({}, DataParams)
    assert (p.profile, p.device, p.dataset) == ("tiny", "cpu", "synthref")


def test_numeric_strings_from_yaml_are_coerced():
    p = validate({"seed": "3", "image_size": "64", "n_train": 1e3}, DataParams)
    assert p.seed == 3 and isinstance(p.seed, int)
    assert p.image_size == 64 and p.n_train == 1000


def test_load_takes_plain_values_and_skips_modules_functions_and_ipython_names():
    import math

    namespace = {"seed": "7", "math": math, "f": lambda: 0, "In": [], "Out": {}, "_private": 1, "profile": "study"}
    p = load(namespace, RunParams)
    assert p.seed == 7 and p.profile == "study"


def test_one_error_lists_every_bad_parameter():
    with pytest.raises(ConfigError) as e:
        validate({"seed": "abc", "image_size": 8, "profile": "huge", "n_trian": 5}, DataParams)
    msg = str(e.value)
    assert "4 bad parameter(s)" in msg
    assert "seed: expected an integer, got 'abc'" in msg
    assert "image_size: must be >= 32" in msg
    assert "profile: expected one of 'tiny', 'study', 'paper'" in msg
    assert "n_trian: unknown parameter (did you mean 'n_train'?)" in msg


def test_bools_floats_and_ints_are_not_confused():
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        validate({"seed": 1.5}, RunParams)
    with pytest.raises(ConfigError, match="seed: expected an integer \\(not a bool\\)"):
        validate({"seed": True}, RunParams)


def test_paths_must_exist_and_real_data_needs_them(tmp_path):
    with pytest.raises(ConfigError, match="data_root: path does not exist"):
        validate({"data_root": str(tmp_path / "missing")}, DataParams)
    with pytest.raises(ConfigError) as e:
        validate({"dataset": "unc"}, DataParams)
    assert "data_root: required" in str(e.value) and "image_root: required" in str(e.value)
    p = validate({"dataset": "unc", "data_root": str(tmp_path), "image_root": tmp_path}, DataParams)
    assert p.data_root == Path(tmp_path)


def test_unknown_data_set_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'unc'"):
        validate({"dataset": "unk"}, DataParams)


def test_devices():
    assert validate({"device": "auto"}, RunParams).device == "auto"
    with pytest.raises(ConfigError, match="device"):
        validate({"device": "tpu7"}, RunParams)


def test_none_from_the_command_line():
    assert validate({"data_root": "None"}, DataParams).data_root is None


def test_params_are_frozen_and_documented():
    p = validate({}, DataParams)
    with pytest.raises(AttributeError):
        p.seed = 1  # type: ignore[misc]
    rows = describe_params(DataParams)
    assert {r["name"] for r in rows} >= {"profile", "seed", "device", "dataset", "image_size"}
    assert all(r["doc"] for r in rows)
    assert as_dict(p)["out_dir"] == str(p.out_dir)

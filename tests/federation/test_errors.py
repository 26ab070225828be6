"""The federation errors live in a leaf module (no flux imports) so config, devices and the engine
can all raise them without importing each other; ConfigError stays importable from config."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import flux.federation.errors as errors


def test_config_error_is_reexported_from_config_and_devices_raise_it():
    from flux.federation.config import ConfigError
    from flux.federation.devices import profile_from_dict

    assert ConfigError is errors.ConfigError
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError) as info:
        profile_from_dict([1, 2], key="devices.profiles.0")
    assert info.value.key == "devices.profiles.0"


def test_config_error_pickles_with_its_key_and_message():
    err = errors.ConfigError("faults.dropout", "must be in [0, 1), got 1.5")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.ConfigError
    assert (back.key, back.message, str(back)) == (err.key, err.message, "faults.dropout: must be in [0, 1), got 1.5")
    assert str(pickle.loads(pickle.dumps(errors.ConfigError("", "bad TOML")))) == "bad TOML"
    with pytest.raises(errors.ConfigError, match="faults.dropout"):
        raise back


def test_errors_module_is_a_leaf():
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m == "flux" or m.startswith("flux.")], imported

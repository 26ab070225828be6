"""flux.federation.config: defaults, TOML + overrides, errors naming the key, TOML round trip."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from flux.federation.config import (ConfigError, DevicesConfig, RunConfig, config_to_dict, config_to_toml,
                                    load_config, parse_override, validate)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def _documented_defaults() -> dict:
    """{dotted key: default cell} from the config tables of docs/federation.md."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "federation.md").read_text()
    out, table = {}, ""
    for line in doc.splitlines():
        m = re.match(r"### `\[(\w+)\]`", line)
        if m:
            table = m.group(1) + "."
        elif line.startswith("### "):
            table = ""
        row = re.match(r"\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", line)
        if row:
            out[table + row.group(1)] = row.group(2).strip()
    return out


def test_defaults_match_the_documented_values():
    cfg = load_config()
    assert cfg == RunConfig()
    documented = _documented_defaults()
    flat = {}
    for table, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{table}.{k}": v for k, v in values.items()})
        else:
            flat[table] = values
    checked = 0
    for key, value in flat.items():
        if key not in documented or isinstance(value, (dict, list)):
            continue
        cell = documented[key].strip("`").split(" ")[0].strip('"')
        assert cell == str(value).lower() or cell == str(value) or float(cell) == float(value), (key, cell, value)
        checked += 1
    assert checked >= 20, f"only {checked} documented defaults found"


def test_file_then_overrides_later_wins(tmp_path):
    path = write(tmp_path, """
method = "fedavg"
rounds = 5
lr = 1
[dataset]
name = "chatterbot"
alpha = 0.1
[model.overrides]
hidden_size = 64
""")
    cfg = load_config(path, ["rounds=7", "dataset.alpha=2", "method=fmq", "model.overrides.num_hidden_layers=2",
                             'devices.classes=["l20-48gb"]', "flux.stale_profiling=false"])
    assert cfg.method == "fmq" and cfg.rounds == 7
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int accepted for float
    assert cfg.dataset.name == "chatterbot" and cfg.dataset.alpha == 2.0
    assert cfg.model.overrides == {"hidden_size": 64, "num_hidden_layers": 2}
    assert cfg.devices.classes == ["l20-48gb"] and cfg.flux.stale_profiling is False


def test_override_values_parse_as_toml_then_json_then_bare_string():
    assert parse_override("a=3") == ("a", 3)
    assert parse_override("a.b = 1e-3") == ("a.b", 1e-3)
    assert parse_override('a="x y"') == ("a", "x y")
    assert parse_override("a=fedavg") == ("a", "fedavg")
    assert parse_override("a={b = 1}") == ("a", {"b": 1})
    assert parse_override('a=[{"name": "x", "v": 1}]') == ("a", [{"name": "x", "v": 1}])  # JSON
    with pytest.raises(ConfigError):
        parse_override("rounds")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")


def test_inline_table_override_merges_into_the_table():
    cfg = load_config(None, ["dataset.alpha=0.2", 'dataset={name = "pydoc", seq_len = 32}'])
    assert (cfg.dataset.name, cfg.dataset.seq_len, cfg.dataset.alpha) == ("pydoc", 32, 0.2)


@pytest.mark.parametrize("override, key, words", [
    ("roundz=3", "roundz", "rounds"),                       # unknown, with a suggestion
    ("dataset.alpah=1", "dataset.alpah", "dataset.alpha"),
    ("flux.zo_sigmaa=1", "flux.zo_sigmaa", "flux.zo_sigma"),
    ('dataset.alpha="high"', "dataset.alpha", "number"),     # wrong type
    ("rounds=true", "rounds", "integer"),                    # bool is not int
    ("rounds=2.0", "rounds", "integer"),
    ("deterministic=1", "deterministic", "true or false"),
    ("devices.classes=rtx4090-24gb", "devices.classes", "list"),
    ("dataset=3", "dataset", "table"),
    ("rounds=0", "rounds", ">= 1"),                           # out of range
    ("sim_budget_s=-1", "sim_budget_s", ">= 0"),
    ("participants=0", "participants", ">= 1"),
    ("participants_per_round=9", "participants_per_round", "[1, participants=8]"),
    ("faults.dropout=1.0", "faults.dropout", "[0, 1)"),
    ("faults.dropout=-0.1", "faults.dropout", "[0, 1)"),
    ("lr=0", "lr", "> 0"),
    ("target_accuracy=0", "target_accuracy", "(0, 1]"),
    ("target_accuracy=1.5", "target_accuracy", "(0, 1]"),
    ("method=fedprox", "method", "one of"),
    ("non_expert=all", "non_expert", "one of"),
    ("dataset.partition=dirichelt", "dataset.partition", "dirichlet"),
    ("flux.profile_bits=3", "flux.profile_bits", "one of"),
    ("flux.epsilon_end=1.2", "flux.epsilon_end", "[0, 1]"),
    ("flux.min_group_share=1.5", "flux.min_group_share", "[0, 1]"),
    ("flux.budget_policy=measure", "flux.budget_policy", "did you mean 'measured'"),
    ("flux.view_error_tolerance=-0.1", "flux.view_error_tolerance", ">= 0"),
    ("flux.budget_probe_samples=0", "flux.budget_probe_samples", ">= 1"),
    ("flux.profile_samples=-1", "flux.profile_samples", ">= 0"),
    ("flux.hide_idle_profiling=0", "flux.hide_idle_profiling", "true or false"),
    ("flux.exploration_draw=utilty", "flux.exploration_draw", "did you mean 'utility'"),
    ("checkpoint.keep=0", "checkpoint.keep", ">= 1"),
    ("dataset.vocab_size=100", "dataset.vocab_size", ">= 259"),
    ("devices.classes=[\"rtx5090\"]", "devices.classes", "rtx"),
    ("devices.profiles=[{name=\"x\", memory_bytes=1.5, flops=1, host_link_bytes_per_s=1, "
     "network_bytes_per_s=1}]", "devices.profiles[0].memory_bytes", "integer"),
    ("devices.profiles=[{name=\"x\"}]", "devices.profiles[0].memory_bytes", "missing"),
])
def test_errors_name_the_dotted_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert str(info.value).startswith(key + ":")
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_key_in_a_file_is_reported_with_the_closest_name(tmp_path):
    path = write(tmp_path, "[faults]\ndropuot = 0.1\n")
    with pytest.raises(ConfigError, match=r"faults\.dropuot: unknown key; did you mean 'faults\.dropout'"):
        load_config(path)


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "rounds = = 3\n"))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "nope.toml"))


def test_validate_checks_a_config_built_in_code():
    validate(RunConfig())
    with pytest.raises(ConfigError, match="participants_per_round"):
        validate(dataclasses.replace(RunConfig(), participants=2, participants_per_round=3))
    with pytest.raises(ConfigError, match="devices.classes"):
        validate(dataclasses.replace(RunConfig(), devices=DevicesConfig(classes=[])))


def test_toml_round_trip_of_every_kind_of_value(tmp_path):
    cfg = load_config(None, [
        "method=fmes", "lr=1.5e-05", "seed=7", "deterministic=false", "target_accuracy=1",
        'dataset.name="we\\"ird \\\\ name"', "model.overrides.hidden_size=64",
        'model.overrides.rope_scaling={type = "linear", factor = 2.0}', "model.overrides.tie=true",
        'devices.profiles=[{name = "mine", memory_bytes = 123456789, flops = 2.5e12, '
        'host_link_bytes_per_s = 1e10, network_bytes_per_s = 12500000.0}]',
        "faults.deadline_s=30", "checkpoint.every=0",
    ])
    text = config_to_toml(cfg)
    path = write(tmp_path, text)
    assert load_config(path) == cfg
    assert config_to_dict(load_config(path)) == config_to_dict(cfg)
    assert "[dataset]" in text and "[flux]" in text


def test_default_config_round_trips_and_is_complete(tmp_path):
    text = config_to_toml(RunConfig())
    assert load_config(write(tmp_path, text)) == RunConfig()
    d = config_to_dict(RunConfig())
    for section in ("dataset", "model", "devices", "flux", "faults", "checkpoint"):
        assert isinstance(d[section], dict)
        for key in d[section]:
            assert f"{key} =" in text, key


def test_importing_config_adds_no_heavy_imports():
    """Parsing a config must not load torch/transformers/matplotlib beyond what ``flux`` loads."""
    code = ("import sys; import flux; before = set(sys.modules); import flux.federation.config as c; c.load_config(); "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'transformers', "
            "'matplotlib', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

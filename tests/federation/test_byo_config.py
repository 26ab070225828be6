"""The config keys of bring-your-own model and data (model.path, dataset.path and their options):
defaults, validation naming the key, TOML round trip."""
from __future__ import annotations

import pytest

from flux.federation.config import ConfigError, RunConfig, config_to_toml, load_config


def test_defaults_leave_the_built_in_job_alone():
    cfg = RunConfig()
    assert (cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.save) == ("", "float32", False, "auto")
    d = cfg.dataset
    assert (d.path, d.task, d.text_column, d.label_column, d.prompt_column, d.response_column, d.domain_column,
            d.chat_template, d.split, d.test_split, d.test_path) == (
        "", "auto", "text", "label", "prompt", "response", "", True, "train", "", "")


def test_a_byo_config_round_trips(tmp_path):
    cfg = load_config(None, ['model.path="ckpt dir"', "model.dtype=bfloat16", "model.trust_remote_code=true",
                             "model.save=always", 'dataset.path="data/qa.parquet"', "dataset.task=generative",
                             'dataset.prompt_column="question"', 'dataset.response_column="answer"',
                             'dataset.domain_column="topic"', "dataset.chat_template=false",
                             'dataset.test_path="data/test.jsonl"', 'dataset.split="validation"'])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(str(path)) == cfg
    assert cfg.dataset.partition == "dirichlet"  # with a domain column: skew over domains


@pytest.mark.parametrize("overrides, key, words", [
    (["model.dtype=int8"], "model.dtype", "one of"),
    (["model.dtype=bfloat16"], "model.dtype", "only applies to a checkpoint"),
    (["model.trust_remote_code=true"], "model.trust_remote_code", "only applies"),
    (["model.save=sometimes"], "model.save", "one of"),
    (["dataset.task=regression"], "dataset.task", "one of"),
    (["dataset.domain_column=topic"], "dataset.domain_column", "dataset.path"),
    (['dataset.test_path="t.jsonl"'], "dataset.test_path", "dataset.path"),
    (['dataset.path="d.jsonl"', "dataset.partition=domain"], "dataset.partition", "domain_column"),
    (['dataset.path="d.jsonl"', "dataset.task=generative"], "dataset.partition", "iid"),
    (['dataset.path="d.jsonl"', 'dataset.label_column=""'], "dataset.label_column", "empty"),
    (['dataset.path="d.jsonl"', "dataset.chat_template=1"], "dataset.chat_template", "true or false"),
    (['model.path="   "'], "model.path", "blank"),
])
def test_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key and words in str(info.value), str(info.value)


def test_generative_iid_or_with_a_domain_column_is_valid():
    load_config(None, ['dataset.path="d.jsonl"', "dataset.task=generative", "dataset.partition=iid"])
    load_config(None, ['dataset.path="d.jsonl"', "dataset.task=generative", 'dataset.domain_column="t"'])
    load_config(None, ['dataset.path="d.jsonl"', "dataset.partition=domain", 'dataset.domain_column="t"'])

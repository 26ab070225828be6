"""Bring your own model and data (issue 14): a save_pretrained MoE checkpoint (model.path) and a
user's data file (dataset.path) run a short federated job; RUN_DIR/model is the fine-tuned model
in the checkpoint's own format (only the tuned weights differ), and ``flux export`` writes the
same model from the newest checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux.federation.config import ConfigError, load_config
from tests.models.byo_helpers import (classification_rows, expert_tensor_names, generative_rows, save_checkpoint,
                                     write_jsonl)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

BASE = [
    "rounds=2", "participants=4", "participants_per_round=2", "local_steps=2", "batch_size=4", "eval_every=1",
    "target_accuracy=0.99", "dataset.seq_len=24", "dataset.min_size=4", "checkpoint.keep=1",
]


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """An in-process run sets one thread and deterministic algorithms: put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run_job(out: Path, overrides: list[str]) -> dict:
    from flux.federation.runner import run

    cfg = load_config(None, BASE + overrides)
    summary = run(cfg, out, progress=False)
    assert summary is not None and summary["rounds"] == 2
    return summary


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name != "head.safetensors":
            out.update(load_file(str(f)))
    return out


def assert_only_experts_changed(ckpt: Path, saved: Path, *, also: tuple[str, ...] = ()) -> None:
    before, after = tensors(ckpt), tensors(saved)
    assert before.keys() == after.keys(), "the saved model must keep the checkpoint's tensor names"
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    experts = expert_tensor_names(ckpt)  # routed experts only: shared experts are dense, not tuned
    assert experts and any(k in experts for k in changed), "no expert was fine-tuned"
    others = [k for k in changed if k not in experts and k not in also]
    assert not others, f"non-expert weights changed: {others}"
    assert json.loads((ckpt / "config.json").read_text()) == json.loads((saved / "config.json").read_text())


def reload(saved: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(saved))
    tok = AutoTokenizer.from_pretrained(str(saved))
    ids = tok(["the film was good"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm(ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], lm.config.vocab_size) and torch.isfinite(logits).all()
    return lm, tok


def export_and_compare(run_dir: Path, tmp_path: Path) -> Path:
    """``flux export RUN_DIR OUT`` writes the same tensors as the end-of-run save."""
    from flux.cli import main

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out), "--quiet"]) == 0
    a, b = tensors(run_dir / "model"), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if (run_dir / "model" / "head.safetensors").exists():
        ha, hb = load_file(str(run_dir / "model" / "head.safetensors")), load_file(str(out / "head.safetensors"))
        assert all(torch.equal(ha[k], hb[k]) for k in ("weight", "bias"))
    reload(out)
    return out


# ---------------------------------------------------------------------------- (a) JSONL classification
@pytest.mark.parametrize("method", ["fedavg", "flux"])
def test_jsonl_classification_on_a_mixtral_checkpoint(tmp_path, method):
    ckpt = save_checkpoint(tmp_path / "ckpt", "mixtral")
    data = write_jsonl(tmp_path / "reviews.jsonl", classification_rows(96))
    out = tmp_path / "run"
    s = run_job(out, [f"method={method}", f'dataset.path="{data}"', f'model.path="{ckpt}"', "non_expert=head"])
    assert s["task"] == "classification"
    saved = out / "model"
    assert_only_experts_changed(ckpt, saved)  # the new head is saved apart from the HF model
    head = load_file(str(saved / "head.safetensors"))
    assert head["weight"].shape == (2, 32) and head["bias"].shape == (2,)
    info = json.loads((saved / "head.json").read_text())
    assert info["label_names"] == ["neg", "pos"] and info["num_labels"] == 2
    reload(saved)
    from flux.models.export import load_head

    linear, names = load_head(saved)
    assert names == ["neg", "pos"] and torch.equal(linear.weight.detach(), head["weight"])
    export_and_compare(out, tmp_path)


# ---------------------------------------------------------------------------- (b) JSONL generative
@pytest.mark.parametrize("method", ["fedavg", "flux"])
def test_jsonl_generative_on_a_qwen3_moe_checkpoint(tmp_path, method):
    ckpt = save_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    data = write_jsonl(tmp_path / "qa.jsonl", generative_rows(96))
    out = tmp_path / "run"
    s = run_job(out, [f"method={method}", f'dataset.path="{data}"', f'model.path="{ckpt}"', "non_expert=frozen",
                      "dataset.partition=domain", 'dataset.domain_column="topic"'])
    assert s["task"] == "generative"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == r["token_accuracy"]
        assert r["loss"] > 0 and 0.0 <= r["exact_match"] <= 1.0 and r["response_tokens"] > 0
    assert_only_experts_changed(ckpt, out / "model")
    assert not (out / "model" / "head.safetensors").exists()
    _, tok = reload(out / "model")
    assert tok.chat_template  # the checkpoint's tokenizer (with its chat template) is saved with it
    export_and_compare(out, tmp_path)


def test_generative_head_mode_tunes_the_lm_head_too(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", "mixtral")
    data = write_jsonl(tmp_path / "qa.jsonl", generative_rows(64))
    out = tmp_path / "run"
    run_job(out, ["method=fedavg", f'dataset.path="{data}"', f'model.path="{ckpt}"', "dataset.partition=iid",
                  "non_expert=head"])
    assert_only_experts_changed(ckpt, out / "model", also=("lm_head.weight",))
    before, after = tensors(ckpt), tensors(out / "model")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


# ---------------------------------------------------------------------------- (c) datasets dir, Parquet
def test_save_to_disk_dataset_dict_on_an_olmoe_checkpoint(tmp_path):
    datasets = pytest.importorskip("datasets")
    ckpt = save_checkpoint(tmp_path / "ckpt", "olmoe")
    rows = generative_rows(96)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:72]),
                               "test": datasets.Dataset.from_list(rows[72:])})
    dd.save_to_disk(str(tmp_path / "qa_dataset"))
    out = tmp_path / "run"
    s = run_job(out, ["method=flux", f'dataset.path="{tmp_path / "qa_dataset"}"', 'dataset.test_split="test"',
                      f'model.path="{ckpt}"', "non_expert=frozen", "dataset.partition=iid"])
    assert s["task"] == "generative" and s["test_examples"] == 24
    assert_only_experts_changed(ckpt, out / "model")
    reload(out / "model")


def test_parquet_classification_on_a_deepseek_v3_checkpoint(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    ckpt = save_checkpoint(tmp_path / "ckpt", "deepseek_v3")
    rows = classification_rows(96)
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "reviews.parquet"))
    out = tmp_path / "run"
    s = run_job(out, ["method=flux", f'dataset.path="{tmp_path / "reviews.parquet"}"', f'model.path="{ckpt}"',
                      "dataset.partition=domain", 'dataset.domain_column="genre"'])
    assert s["task"] == "classification"
    assert_only_experts_changed(ckpt, out / "model")
    reload(out / "model")
    export_and_compare(out, tmp_path)


# ---------------------------------------------------------------------------- more families and inputs
def test_csv_classification_on_a_qwen2_moe_checkpoint_in_bfloat16(tmp_path):
    import csv

    ckpt = save_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["review", "stars", "genre"])
        writer.writeheader()
        for r in classification_rows(80):
            writer.writerow({"review": r["text"], "stars": 5 if r["label"] == "pos" else 1, "genre": r["genre"]})
    out = tmp_path / "run"
    run_job(out, ["method=fedavg", f'dataset.path="{path}"', 'dataset.text_column="review"',
                  'dataset.label_column="stars"', f'model.path="{ckpt}"', "model.dtype=bfloat16"])
    saved = out / "model"
    assert json.loads((saved / "head.json").read_text())["label_names"] == ["1", "5"]
    after = tensors(saved)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    before = {k: v.to(torch.bfloat16) for k, v in tensors(ckpt).items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and set(changed) <= expert_tensor_names(ckpt), changed


def test_checkpoint_without_tokenizer_uses_the_byte_level_bpe(tmp_path):
    """A checkpoint with no tokenizer (e.g. one flux pretrain cached) gets FLUX's byte-level BPE of
    model.corpus / dataset.vocab_size; the export then carries that tokenizer."""
    ckpt = save_checkpoint(tmp_path / "ckpt", "mixtral", tokenizer=False, vocab_size=1024)
    data = write_jsonl(tmp_path / "reviews.jsonl", classification_rows(64))
    out = tmp_path / "run"
    run_job(out, ["method=fedavg", f'dataset.path="{data}"', f'model.path="{ckpt}"', 'model.corpus=["pydoc"]',
                  "dataset.vocab_size=1024"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert len(tok) == 1024 and tok.decode(tok("the film")["input_ids"]) == "the film"
    with pytest.raises(ConfigError, match="dataset.vocab_size"):
        run_job(tmp_path / "bad", ["method=fedavg", f'dataset.path="{data}"', f'model.path="{ckpt}"',
                                   'model.corpus=["pydoc"]', "dataset.vocab_size=2048"])


def test_model_save_never_and_bad_inputs_are_config_errors(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", "mixtral")
    data = write_jsonl(tmp_path / "qa.jsonl", generative_rows(48))
    out = tmp_path / "run"
    run_job(out, ["method=fedavg", "rounds=2", f'dataset.path="{data}"', f'model.path="{ckpt}"',
                  "dataset.partition=iid", "model.save=never"])
    assert not (out / "model").exists()
    cases = [
        ([f'dataset.path="{tmp_path / "missing.jsonl"}"', f'model.path="{ckpt}"'], "dataset.path", "no such file"),
        ([f'dataset.path="{data}"', f'model.path="{tmp_path}"'], "model.path", "config.json"),
        ([f'dataset.path="{data}"', f'model.path="{ckpt}"'], "dataset.partition", "domain_column"),  # dirichlet
        ([f'dataset.path="{data}"', f'model.path="{ckpt}"', "dataset.task=classification"], "dataset.path", "'text'"),
        ([f'dataset.path="{data}"', f'model.path="{ckpt}"', 'dataset.test_split="test"', "dataset.partition=iid"],
         "dataset.test_split", "DatasetDict"),
    ]
    for overrides, key, words in cases:
        with pytest.raises(ConfigError) as info:
            run_job(tmp_path / f"bad-{key}", ["method=fedavg"] + overrides)
        assert info.value.key == key and words in str(info.value), (key, str(info.value))


def test_the_flux_run_command_takes_the_docs_example(tmp_path):
    """docs/models.md "Fine-tune your own checkpoint": the helper writes the inputs, `flux run`
    trains, `flux export` saves (subprocesses, as a user runs them)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "FLUX_MAX_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "tests.models.byo_helpers", str(tmp_path / "byo")], cwd=repo,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = (repo / "docs" / "models.md").read_text()
    toml = doc.split("<!-- byo-config -->")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "byo" / "byo.toml").write_text(toml)
    cmd = [sys.executable, "-m", "flux.cli", "run", "--config", "byo/byo.toml", "--out", "byo/run", "--quiet"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "byo" / "run" / "model" / "head.safetensors").is_file()
    res = subprocess.run([sys.executable, "-m", "flux.cli", "export", "byo/run", "byo/exported", "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    reload(tmp_path / "byo" / "exported")
    command = doc.split("byo/run-qa")[0].rsplit("flux run --config", 1)[1].replace("\\\n", " ").split()
    res = subprocess.run([sys.executable, "-m", "flux.cli", "run", "--config", *command, "byo/run-qa", "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "byo" / "run-qa" / "summary.json").read_text())["task"] == "generative"
    reload(tmp_path / "byo" / "run-qa" / "model")


def test_a_preset_run_saves_on_request_and_exports(tmp_path):
    """model.save = "always" on a preset run (tests/federation/tiny.toml): the pretrained preset
    fine-tuned, with FLUX's byte-level tokenizer; `flux export` writes the same."""
    from flux.federation.runner import run

    tiny = str(Path(__file__).with_name("tiny.toml"))
    cfg = load_config(tiny, ["rounds=2", "model.save=always", "eval_every=2"])
    out = tmp_path / "run"
    run(cfg, out, progress=False)
    saved = out / "model"
    assert (saved / "config.json").is_file() and (saved / "head.safetensors").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(saved))
    assert tok.decode(tok("Hello, world")["input_ids"]) == "Hello, world"
    export_and_compare(out, tmp_path)
    default = load_config(tiny, ["rounds=1"])
    run(default, tmp_path / "auto", progress=False)
    assert not (tmp_path / "auto" / "model").exists()  # auto: only model.path runs save


def test_a_remote_code_checkpoint_with_modulelist_experts_needs_trust_remote_code(tmp_path):
    """DeepSeek-MoE v1 style remote code (config.json auto_map, nn.ModuleList experts): refused
    without model.trust_remote_code, fine-tuned with it; the export carries the model code.  (The
    toy model mixes tokens without attention, so FLUX's attention-aware profiling cannot run on
    it: fedavg.)"""
    from tests.models.byo_helpers import save_remote_code_checkpoint

    ckpt = save_remote_code_checkpoint(tmp_path / "ckpt")
    data = write_jsonl(tmp_path / "reviews.jsonl", classification_rows(64))
    args = ["method=fedavg", f'dataset.path="{data}"', f'model.path="{ckpt}"']
    with pytest.raises(ConfigError, match="trust_remote_code = true") as info:
        run_job(tmp_path / "refused", args)
    assert info.value.key == "model.path"
    out = tmp_path / "run"
    run_job(out, args + ["model.trust_remote_code=true"])
    saved = out / "model"
    assert (saved / "modeling_deepseek_v1_test.py").is_file() and (saved / "head.safetensors").is_file()
    before, after = tensors(ckpt), tensors(saved)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.experts." in k for k in changed), changed
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(saved), trust_remote_code=True)
    assert type(lm).__name__ == "DeepseekV1RemoteForCausalLM"

"""flux.models.hf (load a user's checkpoint), flux.models.export (save the fine-tuned model back in
its format) and the generative held-out metrics of MoECausalLM."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import flux
from flux.data.hf_tokenizer import HFTokenizer
from flux.data.instructions import encode_pairs
from flux.data.tables import Pair
from flux.federation.workload import Workload
from flux.models import MoEClassifier
from flux.models.causal import MoECausalLM, response_metrics
from flux.models.export import export_model, load_head
from flux.models.hf import load_lm
from tests.models.byo_helpers import expert_tensor_names, save_checkpoint, tiny_tokenizer
from tests.moe.helpers import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _work(model, kind="classification", names=("neg", "pos"), tokenizer=None, source=None, save="auto"):
    handle = flux.patch(model.lm)
    return Workload(model=model, handle=handle, train=[], test=None, label_names=list(names), pretrain_info={},
                    kind=kind, tokenizer=tokenizer, source=source, save=save)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_patch_family_loads_trains_and_saves_back(family, tmp_path):
    ref = FAMILIES[family]()
    ref.save_pretrained(tmp_path / "ckpt")
    lm, source = load_lm(tmp_path / "ckpt")
    assert source.model_type == ref.config.model_type and source.dtype == torch.float32
    assert lm.config._attn_implementation == "eager" and lm.training
    clf = MoEClassifier(lm, num_labels=3, seed=0)
    work = _work(clf, names=("a", "b", "c"), source=source)
    assert work.handle.moe_layers and all(layer.native for layer in work.handle.moe_layers)
    experts = {id(p) for layer in work.handle.moe_layers for p in layer.source.expert_parameters()}
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}
    clf.loss(batch).backward()
    with torch.no_grad():
        for p in clf.lm.parameters():
            if id(p) in experts:
                p.add_(0.01 * p.grad.sign())
    assert work.save_model(tmp_path / "out") == str(tmp_path / "out")
    before = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= expert_tensor_names(tmp_path / "ckpt"), changed
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / "head.safetensors").is_file()
    work.handle.restore()


def test_dtype_and_remote_code_and_bad_directories(tmp_path):
    save_checkpoint(tmp_path / "ckpt", "mixtral")
    lm, source = load_lm(tmp_path / "ckpt", dtype="bfloat16")
    assert next(lm.parameters()).dtype == torch.bfloat16 and source.dtype == torch.bfloat16
    assert lm.config.use_cache is False and source.use_cache is True
    lm, _ = load_lm(tmp_path / "ckpt", dtype="auto")
    assert next(lm.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="model.dtype"):
        load_lm(tmp_path / "ckpt", dtype="int8")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code = true"):
        load_lm(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not a directory"):
        load_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        load_lm(tmp_path / "empty")


def test_export_keeps_the_checkpoint_config_and_tokenizer(tmp_path):
    save_checkpoint(tmp_path / "ckpt", "mixtral")
    lm, source = load_lm(tmp_path / "ckpt")
    tok = HFTokenizer.from_pretrained(tmp_path / "ckpt")
    work = _work(MoECausalLM(lm), kind="generative", names=["all"], tokenizer=tok, source=source)
    export_model(work, tmp_path / "out")
    assert lm.config.use_cache is False  # the run's setting is back after the save
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == json.loads((tmp_path / "ckpt" / "config.json").read_text()) and saved["use_cache"] is True
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert again.chat_template == tok.hf.chat_template and len(again) == len(tok)
    assert not (tmp_path / "out" / "head.safetensors").exists()
    export_model(work, tmp_path / "out")  # replaces an existing directory
    work.handle.restore()


def test_save_model_follows_model_save(tmp_path):
    save_checkpoint(tmp_path / "ckpt", "mixtral", tokenizer=False)
    lm, source = load_lm(tmp_path / "ckpt")
    clf = MoEClassifier(lm, num_labels=2)
    work = _work(clf, source=None)  # a preset run: auto saves nothing
    assert work.save_model(tmp_path / "a") is None and not (tmp_path / "a").exists()
    work.save = "always"
    assert work.save_model(tmp_path / "a") and (tmp_path / "a" / "config.json").is_file()
    work.source, work.save = source, "never"
    assert work.save_model(tmp_path / "b") is None and not (tmp_path / "b").exists()
    work.handle.restore()


def test_the_docs_recipe_reloads_the_classifier(tmp_path):
    """docs/models.md: a classification export loads back into an MoEClassifier with the same logits."""
    save_checkpoint(tmp_path / "ckpt", "mixtral")
    lm, source = load_lm(tmp_path / "ckpt")
    tok = HFTokenizer.from_pretrained(tmp_path / "ckpt")
    clf = MoEClassifier(lm, num_labels=2, seed=3)
    work = _work(clf, tokenizer=tok, source=source)
    batch = tok.encode(["the film was really superb"], max_length=24)
    clf.eval()
    with torch.no_grad():
        expected = clf(batch["input_ids"], batch["attention_mask"])
    export_model(work, tmp_path / "model")
    work.handle.restore()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    head, labels = load_head(tmp_path / "model")
    clf2 = MoEClassifier(lm2, num_labels=len(labels))
    clf2.head.load_state_dict(head.state_dict())
    tok2 = HFTokenizer(AutoTokenizer.from_pretrained(str(tmp_path / "model")))
    b2 = tok2.encode(["the film was really superb"], max_length=24)
    assert torch.equal(b2["input_ids"], batch["input_ids"]) and labels == ["neg", "pos"]
    clf2.eval()
    with torch.no_grad():
        got = clf2(b2["input_ids"], b2["attention_mask"])
    torch.testing.assert_close(got, expected)


def test_response_metrics_match_a_per_token_loop(tmp_path):
    save_checkpoint(tmp_path / "ckpt", "mixtral")
    lm, _ = load_lm(tmp_path / "ckpt")
    model = MoECausalLM(lm)
    tok = HFTokenizer(tiny_tokenizer())
    pairs = [Pair("what colour is the sky", "blue"), Pair("what says the dog", "the dog says woof"),
             Pair("what colour is the snow", "white")]
    data = encode_pairs(tok, pairs, seq_len=20, chat_template=True)
    got = model.evaluate(data, batch_size=2)
    assert lm.training  # the mode is restored
    lm.eval()
    nll, hits, total, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(len(data)):
            logits = lm(data.input_ids[i:i + 1], attention_mask=data.attention_mask[i:i + 1], use_cache=False).logits[0]
            pos = data.loss_mask[i].nonzero().flatten().tolist()
            logp = torch.log_softmax(logits.float(), dim=-1)
            row = [float(logp[t - 1, data.input_ids[i, t]]) for t in pos]
            right = [int(logits[t - 1].argmax()) == int(data.input_ids[i, t]) for t in pos]
            nll += -sum(row) / len(row)
            hits, total, exact = hits + sum(right), total + len(right), exact + all(right)
    assert got["response_tokens"] == total
    assert got["accuracy"] == got["token_accuracy"] == pytest.approx(hits / total)
    assert got["exact_match"] == pytest.approx(exact / len(data))
    assert got["loss"] == pytest.approx(nll / len(data), rel=1e-4)
    assert model.loss({k: getattr(data, k) for k in ("input_ids", "attention_mask", "loss_mask")}).item() == \
        pytest.approx(got["loss"], rel=1e-4)
    assert response_metrics(model, data) == pytest.approx(got)

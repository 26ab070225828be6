"""The bitsandbytes config options (docs/bitsandbytes.md, "Options"): ``flux.frozen_format = "nf4"``
(merged frozen groups), ``fmq.weight_format = "nf4"`` (FMQ's stored weights) and
``flux.optimizer = "adamw8bit"`` (the tuned experts' optimizer).  Each changes what it should,
the memory model counts it byte for byte, a tiny federated run goes through with it, and a
missing bitsandbytes is a clear error naming the option.

bitsandbytes is pinned in requirements/dev.txt, so under CI a missing one fails this module; elsewhere
the tests that need it skip with the install line (the config checks run either way).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flux
from flux import quant_bnb
from flux.federation import config as config_module
from flux.federation import local as local_module
from flux.federation.config import ConfigError, RunConfig, config_to_toml, load_config
from flux.methods import fmq as fmq_module
from flux.moe import LayerLayout, LayoutError, estimate_memory, measure_memory
from flux.moe import merged_view as merged_view_module
from flux.moe.memory_budget import budgets_from_memory
from tests.moe.helpers import input_ids, step, tiny_mixtral

HAVE_BNB = quant_bnb.available()
if not HAVE_BNB and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI installs requirements/dev.txt, which pins bitsandbytes: {quant_bnb.INSTALL_HINT}")
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason=f"bitsandbytes is not importable: {quant_bnb.INSTALL_HINT}")

TINY = str(Path(__file__).resolve().parent / "federation" / "tiny.toml")
OPTIONS = {"flux.frozen_format": "nf4", "flux.optimizer": "adamw8bit", "fmq.weight_format": "nf4"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_bnb(monkeypatch):
    """bitsandbytes made unimportable for the duration of a test."""
    monkeypatch.setattr(quant_bnb, "_functional", None)
    for name in ("bitsandbytes", "bitsandbytes.functional", "bitsandbytes.optim"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not quant_bnb.available()


# ----------------------------------------------------------------------------- config


def test_defaults_are_flux_own_paths():
    cfg = RunConfig()
    assert (cfg.flux.frozen_format, cfg.flux.optimizer, cfg.fmq.weight_format) == ("int4", "adamw", "int4")
    # one list of names per option, whatever module reads it
    assert config_module.FROZEN_FORMATS == tuple(merged_view_module.FROZEN_FORMATS)
    assert merged_view_module.FROZEN_FORMATS["full"] is None
    assert config_module.OPTIMIZERS == local_module.OPTIMIZERS
    assert config_module.FMQ_WEIGHT_FORMATS == fmq_module.WEIGHT_FORMATS


@pytest.mark.parametrize("key,allowed", [("flux.frozen_format", "'full', 'int4', 'int8', 'nf4'"),
                                         ("flux.optimizer", "'adamw', 'adamw8bit'"),
                                         ("fmq.weight_format", "'int4', 'nf4'")])
def test_bad_values_name_the_key_and_the_choices(key, allowed):
    with pytest.raises(ConfigError, match=allowed) as err:
        load_config(overrides=[f"{key}=fp4"])
    assert err.value.key == key


def test_quantized_frozen_groups_refuse_zeroth_order_exploration():
    for fmt in ("int4", "int8") + (("nf4",) if HAVE_BNB else ()):
        with pytest.raises(ConfigError, match="exploration") as err:
            load_config(overrides=[f"flux.frozen_format={fmt}", "flux.exploration=zo"])
        assert err.value.key == "flux.frozen_format"
    # the int4 default too, with the way out in the message
    with pytest.raises(ConfigError, match='set flux.frozen_format = "full"'):
        load_config(overrides=["flux.exploration=zo"])
    assert load_config(overrides=["flux.exploration=zo", "flux.frozen_format=full"]).flux.exploration == "zo"


@pytest.mark.parametrize("key,value", sorted(OPTIONS.items()))
def test_missing_bitsandbytes_fails_at_config_time(no_bnb, key, value):
    with pytest.raises(ConfigError, match="pip install") as err:
        load_config(overrides=[f"{key}={value}"])
    assert err.value.key == key and "bitsandbytes" in str(err.value) and repr(value) in str(err.value)
    load_config(overrides=["flux.frozen_format=int4"])  # flux's own paths need nothing


def test_missing_bitsandbytes_fails_at_use_naming_the_option(no_bnb):
    """Code that bypasses the config (the library API) gets an ImportError, never a fallback."""
    model = tiny_mixtral()
    layer = flux.patch(model).moe_layers[0]
    with pytest.raises(ImportError, match="frozen_format = 'nf4'.*pip install"):
        layer.install_merged_view(tuning=[0], clusters=[[1, 2, 3]], quantize_bits="nf4", quantize_group_size=32)
    assert layer.view is None
    p = torch.nn.Parameter(torch.zeros(8, 64))
    with pytest.raises(ImportError, match="flux.optimizer = 'adamw8bit'.*pip install"):
        local_module.make_optimizer("adamw8bit", [{"params": [p]}], lr=1e-3)
    with pytest.raises(ImportError, match="fmq.weight_format = 'nf4'.*pip install"):
        fmq_module.QuantizedAdamW([p], lr=1e-3, moment_bits=8, generator=torch.Generator(), weight_format="nf4")


@needs_bnb
def test_options_round_trip_through_toml(tmp_path):
    cfg = load_config(overrides=[f"{k}={v}" for k, v in OPTIONS.items()])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(str(path)) == cfg
    assert "[fmq]" in config_to_toml(RunConfig())


# ----------------------------------------------------------------------------- merged view


def _merged(bits, group: int = 32, seed: int = 0):
    """tiny Mixtral (H=32, I=16, 4 experts, 2 layers), layer 0: expert 0 tuned, 1-3 one frozen group."""
    model = tiny_mixtral(seed)
    handle = flux.patch(model)
    for p in model.parameters():
        p.requires_grad_(False)
    layer = handle.moe_layers[0]
    layout = layer.merged_groups([0], [[1, 2, 3]])
    view = layer.install_view(**layout, quantize_bits=bits, quantize_group_size=group)
    return model, handle, view, layout


@needs_bnb
def test_nf4_frozen_groups_are_stored_as_nf4_and_dequantize_close():
    model, handle, view, layout = _merged("nf4")
    buffers = dict(view.named_buffers())
    assert "frozen_gate_up" not in buffers and "frozen_gate_up_qdata" not in buffers
    gu, dn = layout["gate_up"][1:], layout["down"][1:]  # the frozen group [1, 2I, H], [1, H, I]
    assert buffers["frozen_gate_up_nf4"].dtype == torch.uint8
    assert buffers["frozen_gate_up_nf4"].numel() == gu.numel() // 2  # two codes a byte
    assert buffers["frozen_gate_up_absmax"].numel() == gu.numel() // 32
    assert buffers["frozen_down_code"].shape == (16,)
    assert torch.equal(buffers["frozen_down_code"], quant_bnb.quantize_frozen(dn, "nf4", 32).state.code)
    w = view.group_weights(1)
    # exactly bitsandbytes' NF4 of the merged weights, and close to them
    assert torch.equal(w.gate_up, quant_bnb.quantize_frozen(gu, "nf4", 32).dequantize()[0])
    assert torch.equal(w.down, quant_bnb.quantize_frozen(dn, "nf4", 32).dequantize()[0])
    nf4_err = float((w.gate_up - gu[0]).norm() / gu[0].norm())
    assert 0 < nf4_err < 0.15
    _, _, int4_view, _ = _merged(4)
    int4_err = float((int4_view.group_weights(1).gate_up - gu[0]).norm() / gu[0].norm())
    assert nf4_err < int4_err  # the measured reason for the option (normal weights: 0.092 vs 0.108)
    assert "frozen nf4" in repr(view)


@needs_bnb
def test_nf4_view_runs_forward_backward_close_to_the_dense_view():
    ids = input_ids()
    model, _, view, _ = _merged("nf4")
    dense_model, _, dense_view, _ = _merged(None)
    out = step(model, ids).logits.detach()
    ref = step(dense_model, ids).logits.detach()
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1
    assert view.tuned_gate_up.grad is not None and view.tuned_gate_up.grad.abs().sum() > 0
    model.to(torch.bfloat16)  # the codes follow, the stacks dequantize to the new dtype
    assert view._frozen_stacks(torch.bfloat16)[0].dtype == torch.bfloat16
    model(ids, use_cache=False)


def test_nf4_needs_a_bitsandbytes_block_size():
    layer = flux.patch(tiny_mixtral()).moe_layers[0]
    with pytest.raises(LayoutError, match="quantize_group_size"):
        layer.install_merged_view(tuning=[0], clusters=[[1, 2, 3]], quantize_bits="nf4", quantize_group_size=16)
    with pytest.raises(LayoutError, match="or 'nf4'"):
        layer.install_merged_view(tuning=[0], clusters=[[1, 2, 3]], quantize_bits="fp4")


# ----------------------------------------------------------------------------- memory accounting


def _train_step(model, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    step(model, input_ids())
    optimizer.step()


@needs_bnb
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_nf4_layout_and_adamw8bit_state_match_the_real_tensors(optimizer):
    # H = I = 64: the tuned stacks (8192 / 4096 elements an expert) get 8-bit moments, the
    # norms (64 elements) fp32 ones; layer 0 has a stack not a multiple of 2 blocks per row
    model = tiny_mixtral(hidden_size=64, intermediate_size=64, num_local_experts=6)
    handle = flux.patch(model)
    layouts = {0: LayerLayout(tuned=2, merged_groups=2, quantize_bits="nf4", quantize_group_size=64,
                              keep_originals=False),
               1: LayerLayout(tuned=1, merged_groups=3, quantize_bits="nf4", quantize_group_size=128,
                              keep_originals=True)}
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    predicted = estimate_memory(handle, layouts, optimizer=optimizer, trainable=norms)
    for p in model.parameters():
        p.requires_grad_(False)
    handle.moe_layers[0].install_merged_view(tuning=[1, 4], clusters=[[0, 2], [3, 5]], quantize_bits="nf4",
                                             quantize_group_size=64, keep_originals=False)
    handle.moe_layers[1].install_merged_view(tuning=[0], clusters=[[1], [2, 3], [4, 5]], quantize_bits="nf4",
                                             quantize_group_size=128)
    for p in norms:
        p.requires_grad_(True)
    params = [*handle.trainable_parameters(), *norms]
    opt = local_module.make_optimizer(optimizer, [{"params": params}], lr=1e-3)
    _train_step(model, opt)
    real = measure_memory(model, opt)
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (real.weights, real.grads, real.optimizer), (
        predicted.details, real)
    frozen = [quant_bnb.frozen_bytes(n, b) for n, b in ((2 * 128 * 64, 64), (2 * 64 * 64, 64),
                                                         (3 * 128 * 64, 128), (3 * 64 * 64, 128))]
    assert predicted.details["view_frozen"] == sum(frozen)
    if optimizer == "adamw8bit":
        import bitsandbytes.optim

        assert isinstance(opt, bitsandbytes.optim.AdamW8bit)
        stack = handle.moe_layers[0].view.tuned_gate_up
        assert opt.state[stack]["state1"].dtype == torch.uint8 and opt.state[stack]["state2"].dtype == torch.uint8
        assert opt.state[norms[0]]["state1"].dtype == torch.float32  # below min_8bit_size
        assert predicted.details["optimizer_shared"] == quant_bnb.ADAMW8BIT_SHARED_BYTES
        fp32 = estimate_memory(handle, layouts, optimizer="adamw", trainable=norms)
        assert predicted.optimizer < 0.3 * fp32.optimizer  # 2.03 vs 8 B/param on the stacks
    else:
        assert predicted.details["optimizer_shared"] == 0


@needs_bnb
def test_budgets_count_nf4_groups_and_adamw8bit_state():
    handle = flux.patch(tiny_mixtral(num_local_experts=8, hidden_size=64, intermediate_size=64))
    fixed = budgets_from_memory(handle, 10**9).fixed_bytes
    expert = 3 * 64 * 64 * 4
    memory = fixed + 3 * (4 * expert + 8) + 4 * expert
    dense = budgets_from_memory(handle, memory, max_tune_fraction=0.2)
    nf4 = budgets_from_memory(handle, memory, max_tune_fraction=0.2, frozen_bits="nf4")
    assert nf4.tune == dense.tune and nf4.merged > dense.merged
    assert nf4.per_merged_group_bytes < 0.2 * dense.per_merged_group_bytes
    # bound by optimizer state: 8-bit moments let more experts be tuned in the same memory
    eight = budgets_from_memory(handle, memory, optimizer="adamw8bit")
    fp32 = budgets_from_memory(handle, memory)
    assert eight.tune > fp32.tune
    assert eight.per_tuning_expert_bytes < 0.7 * fp32.per_tuning_expert_bytes
    # the chosen layout holds exactly its bytes after a step with the real optimizer
    b = budgets_from_memory(handle, memory, optimizer="adamw8bit", frozen_bits="nf4")
    model = handle.model
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, lay in zip(handle.moe_layers, b.layouts):
        t, g = lay.num_tuned, lay.merged_groups
        rest = list(range(t, layer.num_experts))
        layer.install_merged_view(tuning=list(range(t)), clusters=[rest[c::g] for c in range(g)],
                                  quantize_bits="nf4", keep_originals=False)
    opt = local_module.make_optimizer("adamw8bit", [{"params": handle.trainable_parameters()}], lr=1e-3)
    _train_step(model, opt)
    assert measure_memory(model, opt).total == b.used_bytes


# ----------------------------------------------------------------------------- FMQ


@needs_bnb
def test_fmq_nf4_stores_nf4_weights_and_follows_adamw():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(3, 8, 64, generator=g))
    opt = fmq_module.QuantizedAdamW([p], lr=1e-2, moment_bits=8, generator=g, weight_format="nf4")
    start = p.detach().clone()
    assert torch.equal(start, opt.weights[0].dequantize(torch.float32))
    p.grad = torch.randn_like(p)
    grad = p.grad.clone()
    opt.step()
    q = opt.weights[0]
    assert isinstance(q, quant_bnb.BnbQuantized) and q.kind == "nf4" and q.blocksize == fmq_module.GROUP_SIZE
    assert opt.exp_avg[0].bits == 8  # the moments stay flux int8
    assert torch.equal(p.detach(), q.dequantize(torch.float32))
    moved = (start - p.detach()) * grad.sign()
    assert 0.7e-2 < moved.mean() < 1.3e-2  # unbiased stochastic rounding keeps the mean AdamW step
    with pytest.raises(ValueError, match="weight_format"):
        fmq_module.QuantizedAdamW([p], lr=1e-2, moment_bits=8, generator=g, weight_format="fp4")


@needs_bnb
def test_fmq_layout_counts_the_nf4_bytes_it_stores():
    from tests.methods import LAYERS, tiny_context

    ctx, work = tiny_context(steps=1)
    dense = list(work.model.head.parameters())
    int4 = fmq_module.quantized_layout(work.handle, 1 << 40, dense)
    nf4 = fmq_module.quantized_layout(work.handle, 1 << 40, dense, weight_format="nf4")
    assert nf4.weight_format == "nf4" and int4.weight_format == "int4"
    assert nf4.expert_weight_bytes == int4.expert_weight_bytes + LAYERS * 2 * 16 * 4  # a code book per stack
    assert nf4.moment_bytes == int4.moment_bytes
    ctx.cfg.fmq = SimpleNamespace(weight_format="nf4")
    ctx.devices[0].memory_bytes = nf4.total  # exactly what FMQ-NF4 needs
    method = fmq_module.FMQ()
    method.setup(ctx)
    upd = method.local_update(ctx, 0, 0, None, None)
    opt = method.last_optimizer
    assert all(isinstance(q, quant_bnb.BnbQuantized) for q in opt.weights)
    assert sum(q.nbytes for q in opt.weights) == nf4.expert_weight_bytes
    assert sum(q.nbytes for q in (*opt.exp_avg, *opt.exp_avg_sqrt)) == nf4.moment_bytes
    assert upd.costs.peak_memory_bytes == nf4.total


# ----------------------------------------------------------------------------- end to end


def _run(tmp_path, name: str, overrides: list[str]) -> tuple[dict, list[dict]]:
    from flux.federation.runner import run

    out = tmp_path / name
    summary = run(load_config(TINY, ["rounds=2", *overrides]), out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bnb-default")
    runs = {m: _run(tmp, m, [f"method={m}"]) for m in ("flux", "fmq")}
    runs["flux-full"] = _run(tmp, "flux-full", ["method=flux", "flux.frozen_format=full"])  # the paper's groups
    return runs


@needs_bnb
@pytest.mark.parametrize("method,key,value", [("flux", "flux.frozen_format", "nf4"),
                                              ("flux", "flux.optimizer", "adamw8bit"),
                                              ("fmq", "fmq.weight_format", "nf4")])
def test_tiny_run_goes_through_with_each_option(tmp_path, monkeypatch, default_runs, method, key, value):
    seen = {"views": [], "optimizers": [], "fmq": []}
    init_view = merged_view_module.MergedView.__init__
    make_optimizer = local_module.make_optimizer
    init_fmq = fmq_module.QuantizedAdamW.__init__

    def spy_view(self, *args, **kwargs):
        init_view(self, *args, **kwargs)
        seen["views"].append(self.quantize_bits)

    def spy_optimizer(*args, **kwargs):
        opt = make_optimizer(*args, **kwargs)
        seen["optimizers"].append(type(opt).__name__)
        return opt

    def spy_fmq(self, *args, **kwargs):
        init_fmq(self, *args, **kwargs)
        seen["fmq"].append(self.weight_format)

    monkeypatch.setattr(merged_view_module.MergedView, "__init__", spy_view)
    monkeypatch.setattr(local_module, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(fmq_module.QuantizedAdamW, "__init__", spy_fmq)
    summary, rows = _run(tmp_path, value, [f"method={method}", f"{key}={value}"])
    # nf4 groups against full-precision ones; the other options against the defaults (int4 groups)
    base_summary, base_rows = default_runs["flux-full" if key == "flux.frozen_format" else method]
    assert [r["round"] for r in rows] == [1, 2] and summary["final_accuracy"] is not None
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    assert summary["model_sha256"] != base_summary["model_sha256"]  # the option changed the training
    if key == "flux.frozen_format":
        assert seen["views"] and set(seen["views"]) == {"nf4"}
        assert set(seen["optimizers"]) == {"AdamW"}
        assert summary["peak_memory_bytes"] < base_summary["peak_memory_bytes"]  # the frozen groups shrank
    elif key == "flux.optimizer":
        assert seen["optimizers"] and set(seen["optimizers"]) == {"AdamW8bit"}
        assert set(seen["views"]) == {4}  # the default int4 groups
        assert summary["peak_memory_bytes"] < base_summary["peak_memory_bytes"]  # 8-bit moments
    else:
        assert seen["fmq"] and set(seen["fmq"]) == {"nf4"}
        # the same int4 bytes plus a 64-B code book per weight stack (2 stacks x 2 layers)
        assert summary["peak_memory_bytes"] == base_summary["peak_memory_bytes"] + 2 * 2 * 64

"""Run configuration for ``flux run [--config FILE.toml] [--set key=value ...]``.

A :class:`RunConfig` is built from defaults, then a TOML file, then ``--set`` overrides (later
wins).  Every problem raises :class:`ConfigError` naming the dotted key, so the CLI can print one
clear line and exit with status 2.  The writer (:func:`config_to_toml`) is hand-written because
``tomli_w`` is not installed; its output loads back to an equal config.

Only the standard library is imported here (no torch): parsing a config must stay fast.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from flux.federation.errors import ConfigError

NON_EXPERT_MODES = ("frozen", "head", "tuned")
PARTITIONS = ("iid", "dirichlet", "domain")  # flux.data.partition.SCHEMES
MERGE_MODES = ("freq_attn", "freq", "avg")  # flux.merging.merge.MERGE_MODES
CLUSTERINGS = ("kmeans", "weighted")  # flux.merging.merge.CLUSTERINGS (a test keeps them equal)
EXPLORATION = ("zo", "backprop")
EXPLORATION_DRAWS = ("uniform", "utility")  # flux.roles.assignment.EXPLORATION_DRAWS (a test keeps them equal)
ASSIGNMENTS = ("round_robin",)
LR_SCHEDULES = ("constant", "cosine")  # flux.federation.local.round_lr
CORPUS_SOURCES = ("pydoc", "chatterbot", "openai-evals", "bigbench")  # flux.data.corpus.SOURCES
PROFILE_BITS = (4, 8)
DOWNLOAD_BITS = (0, 4, 8)  # 0 = full precision
WIRE_BITS = (0, 4, 8)  # upload_bits / broadcast_bits (flux/federation/compression.py); 0 = full precision
MIN_VOCAB = 259  # flux.data.tokenizer: 256 byte tokens + 3 specials
TASKS = ("auto", "classification", "generative")  # dataset.task of a user's dataset.path
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")  # flux.models.hf.DTYPES
MODEL_SAVE = ("auto", "always", "never")  # RUN_DIR/model at the end of a run (flux.models.export)
# optional bitsandbytes paths (docs/bitsandbytes.md, "Options"); the first value is flux's own, the default
FROZEN_FORMATS = ("full", "int4", "int8", "nf4")  # flux.moe.merged_view.FROZEN_FORMATS
BUDGET_POLICIES = ("share", "measured")  # flux.methods.budget_policy
OPTIMIZERS = ("adamw", "adamw8bit")  # flux.federation.local.OPTIMIZERS
FMQ_WEIGHT_FORMATS = ("int4", "nf4")  # flux.methods.fmq.WEIGHT_FORMATS


# ---------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class DatasetConfig:
    name: str = "sarcasm"
    partition: str = "dirichlet"
    alpha: float = 5.0
    min_size: int = 8
    max_examples: int = 6000
    seq_len: int = 64
    test_fraction: float = 0.2
    vocab_size: int = 4096
    # instruction tuning (name = "openai-evals", or "bigbench" from a cached sdist): multiple-choice
    # tasks, one domain each
    tasks: list[str] = field(default_factory=list)  # empty = that source's MC_TASKS
    max_per_task: int = 1000
    test_per_task: int = 150
    mc_metric: str = "acc_norm"  # flux.models.causal.MC_METRICS: which ranking is "accuracy"
    # a user's own data (flux.data.tables): a datasets save_to_disk directory, .arrow, .parquet,
    # .jsonl/.json or .csv/.tsv; when set, ``name`` is not used
    path: str = ""
    task: str = "auto"  # auto: generative if the prompt and response columns exist, else classification
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    domain_column: str = ""  # "" = none; partition = "domain" (and generative "dirichlet") need one
    chat_template: bool = True  # generative: wrap prompt/response in the tokenizer's chat template, if it has one
    split: str = "train"  # the split of a DatasetDict directory
    test_split: str = ""  # a split of the same DatasetDict held out instead of test_fraction ("" = none)
    test_path: str = ""  # a separate held-out file/directory instead of test_fraction ("" = none)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "mixtral-base"
    pretrain_steps: int = 800
    overrides: dict = field(default_factory=dict)
    # the pretraining corpus (flux.data.corpus.SOURCES) and recipe
    corpus: list[str] = field(default_factory=lambda: ["pydoc", "chatterbot", "openai-evals"])
    pretrain_seq_len: int = 64
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0  # one pretrained checkpoint for every run seed, as with a real model
    # a user's own transformers MoE checkpoint (save_pretrained directory); when set, preset,
    # overrides and pretraining are not used (flux.models.hf)
    path: str = ""
    dtype: str = "float32"  # what the checkpoint is loaded (and trained) in
    trust_remote_code: bool = False  # needed by remote-code families (e.g. ModuleList experts)
    save: str = "auto"  # RUN_DIR/model at the end: auto = when model.path is set, always, never


@dataclass(frozen=True)
class DevicesConfig:
    classes: list[str] = field(default_factory=lambda: ["rtx4090-24gb", "rtx3060-12gb"])
    profiles: list[dict] = field(default_factory=list)
    assignment: str = "round_robin"


@dataclass(frozen=True)
class FluxConfig:
    profile_bits: int = 4
    stale_profiling: bool = True
    profile_samples: int = 64  # 0 = profile all local data (the paper); N > 0 = a seeded sample of at most N
    hide_idle_profiling: bool = True  # a participant idle last round profiled then: none of it is visible
    merge_mode: str = "freq_attn"
    merge_clustering: str = "kmeans"  # "kmeans" (paper) | "weighted" (may drop experts; docs/techniques.md "Clustering")
    epsilon_start: float = 0.6  # docs/techniques.md: measured against 0.3 -> 0.9 over 10 rounds
    epsilon_end: float = 0.9
    epsilon_rounds: int = 5
    exploration: str = "backprop"
    exploration_draw: str = "uniform"  # or "utility" (flux.roles.assignment.EXPLORATION_DRAWS)
    zo_sigma: float = 1e-3
    zo_perturbations: int = 8
    max_tune_fraction: float = 1.0  # 1 = memory alone decides B_tune (docs/techniques.md)
    min_group_share: float = 0.5  # merged groups for >= this share of the non-tuning experts before B_tune (0 = tuning first; docs/techniques.md)
    budget_policy: str = "share"  # "share" (min_group_share) | "measured": each participant picks its split by merge error (flux.methods.budget_policy)
    view_error_tolerance: float = 0.1  # "measured": largest relative hidden-state error of a participant's merged view
    budget_probe_samples: int = 32  # "measured": local samples the participant measures the error on
    utility_micro_batches: int = 4
    utility_steps: int = 2  # local steps that measure Eq. 3 (0 = every step, the exact estimate)
    frozen_format: str = "int4"  # merged (frozen) groups: int4/int8 flux, full = the weight dtype (the paper), nf4 bitsandbytes
    optimizer: str = "adamw"  # the tuning experts' (and dense trainables') local optimizer; adamw8bit = bitsandbytes


@dataclass(frozen=True)
class FmqConfig:
    weight_format: str = "int4"  # the FMQ baseline's stored expert weights: int4 (flux) or nf4 (bitsandbytes)


@dataclass(frozen=True)
class FaultsConfig:
    dropout: float = 0.0
    deadline_s: float = 0.0
    rank_timeout_s: float = 120.0
    max_delta_rms_ratio: float = 10.0  # flux/federation/robust.py; 0 = off
    poison_action: str = "clip"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1
    keep: int = 2


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = False  # also write the round metrics as TensorBoard scalars (RUN_DIR/tensorboard)


@dataclass(frozen=True)
class RunConfig:
    method: str = "flux"
    rounds: int = 20
    # 0 = none; > 0: the run also ends after the round whose simulated clock reaches this many
    # seconds, so methods of different round costs get the same simulated time (flux bench)
    sim_budget_s: float = 0.0
    participants: int = 8
    participants_per_round: int = 4
    local_steps: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "constant"
    dense_lr_scale: float = 10.0  # lr of the non-expert trainables (e.g. a new head) = lr * this
    seed: int = 0
    deterministic: bool = True
    # the default job's target: 10 points over the majority class of its test set (sarcasm, seed 0:
    # 0.553), the bar for "the model learns" (README, "A federated run")
    target_accuracy: float = 0.65
    eval_every: int = 2
    non_expert: str = "head"
    threads: int = 0
    # Experts a participant only reads in a round (FLUX: merges and profiles them; FMES: profiles
    # them) are fetched as int-N copies, the precision profiling reads anyway (docs/federation.md
    # "Downloads"); 0 = every tensor in full precision.  Methods that train every expert ignore it.
    download_bits: int = 4
    # Compressed transfers, for every method alike (docs/federation.md "Compressed transfers"):
    # participants send their deltas as int-N (upload_bits); the server applies and broadcasts
    # each round's aggregate as an int-N delta (broadcast_bits).  0 = full precision.
    upload_bits: int = 0
    broadcast_bits: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    flux: FluxConfig = field(default_factory=FluxConfig)
    fmq: FmqConfig = field(default_factory=FmqConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------- loading
def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- TOML file ``path`` <- ``overrides`` ("a.b=value"), validated.

    Override values are parsed as TOML values (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``,
    ``{a = 1}``), then as JSON (so ``json.dumps`` output works too); anything else is taken as a
    bare string (``--set method=fedavg``).  Tables given as values merge into what is there.

    Raises:
        ConfigError: unknown key, wrong type, out-of-range value, or a TOML syntax error.
        FileNotFoundError: ``path`` does not exist.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            try:
                raw = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError("", f"{path}: invalid TOML: {exc}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)`` (see :func:`load_config`)."""
    if "=" not in item:
        raise ConfigError(item.strip(), f"override {item!r} must look like key=value")
    key, text = item.split("=", 1)
    key, text = key.strip(), text.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key, f"override {item!r} has an empty key")
    return key, _parse_value(text)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a table; cannot set {key}")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)
    else:
        node[last] = value


def _deep_merge(into: dict, new: Mapping) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from the table ``raw``, checking names and types."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"must be a table, got {_type_name(raw)} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = _dotted(prefix, key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {_dotted(prefix, close[0])!r}?" if close else ""
            known = ", ".join(names)
            raise ConfigError(dotted, f"unknown key{hint} (known in {prefix or 'the top level'}: {known})")
        values[key] = _coerce(hints[key], value, dotted)
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_type_name(value)} {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_type_name(value)} {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_type_name(value)} {value!r}")
        return dict(value)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_type_name(value)} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"config schema: unsupported field type {kind!r} for {key}")  # a bug here, not a user error


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- validation
def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_method(name: Any) -> None:
    """A built-in method name or a user's ``"module:Class"`` (checked without importing it)."""
    from flux.methods.registry import BUILTIN, method_problem

    problem = method_problem(name)
    if problem:
        close = difflib.get_close_matches(str(name), list(BUILTIN), n=1)
        raise ConfigError("method", problem + (f"; did you mean {close[0]!r}?" if close else ""))


def _one_of(value: Any, choices: Sequence, key: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")


def _needs_bnb(value: Any, key: str) -> None:
    """A value served by bitsandbytes: fail at config time, naming the key and the install line,
    when it is not importable (never a silent fallback to flux's own path)."""
    from flux import quant_bnb  # imports torch: only reached when such a value is chosen

    _check(quant_bnb.available(), key, f"{value!r} needs bitsandbytes, which is not importable here; "
           f"{quant_bnb.INSTALL_HINT}")


def validate(cfg: RunConfig) -> None:
    """Range and consistency checks; raises :class:`ConfigError` naming the first bad key."""
    _check_method(cfg.method)
    _check(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    _check(math.isfinite(cfg.sim_budget_s) and cfg.sim_budget_s >= 0, "sim_budget_s",
           f"must be a number of simulated seconds >= 0 (0 = no budget), got {cfg.sim_budget_s}")
    _check(cfg.participants >= 1, "participants", f"must be >= 1, got {cfg.participants}")
    _check(1 <= cfg.participants_per_round <= cfg.participants, "participants_per_round",
           f"must be in [1, participants={cfg.participants}], got {cfg.participants_per_round}")
    _check(cfg.local_steps >= 1, "local_steps", f"must be >= 1, got {cfg.local_steps}")
    _check(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", f"must be a finite number > 0, got {cfg.lr}")
    _one_of(cfg.lr_schedule, LR_SCHEDULES, "lr_schedule")
    _check(math.isfinite(cfg.dense_lr_scale) and cfg.dense_lr_scale > 0, "dense_lr_scale",
           f"must be a finite number > 0, got {cfg.dense_lr_scale}")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(0 < cfg.target_accuracy <= 1, "target_accuracy", f"must be in (0, 1], got {cfg.target_accuracy}")
    _check(cfg.eval_every >= 1, "eval_every", f"must be >= 1, got {cfg.eval_every}")
    _one_of(cfg.non_expert, NON_EXPERT_MODES, "non_expert")
    _check(cfg.threads >= 0, "threads", f"must be >= 0 (0 = torch default), got {cfg.threads}")

    d = cfg.dataset
    _check(bool(d.name.strip()), "dataset.name", "must not be empty")
    _one_of(d.partition, PARTITIONS, "dataset.partition")
    _check(math.isfinite(d.alpha) and d.alpha > 0, "dataset.alpha", f"must be > 0, got {d.alpha}")
    _check(d.min_size >= 0, "dataset.min_size", f"must be >= 0, got {d.min_size}")
    _check(d.max_examples >= 0, "dataset.max_examples", f"must be >= 0 (0 = all), got {d.max_examples}")
    _check(d.seq_len >= 2, "dataset.seq_len", f"must be >= 2, got {d.seq_len}")
    _check(0 < d.test_fraction < 1, "dataset.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    _check(d.vocab_size >= MIN_VOCAB, "dataset.vocab_size",
           f"must be >= {MIN_VOCAB} (256 byte tokens + 3 specials), got {d.vocab_size}")

    _one_of(d.mc_metric, ("acc_norm", "acc"), "dataset.mc_metric")
    _one_of(d.task, TASKS, "dataset.task")
    if d.path:
        _check(bool(d.path.strip()), "dataset.path", "must not be blank")
        for name in ("text_column", "label_column", "prompt_column", "response_column"):
            _check(bool(getattr(d, name).strip()), f"dataset.{name}", "must not be empty")
        if d.partition == "domain":
            _check(bool(d.domain_column), "dataset.partition",
                   "'domain' needs dataset.domain_column (the column naming each example's domain)")
        if d.task == "generative" and d.partition == "dirichlet":
            _check(bool(d.domain_column), "dataset.partition",
                   "'dirichlet' on a generative dataset needs dataset.domain_column (there are no labels); "
                   "use dataset.partition = \"iid\" or name a domain column")
    else:
        for name in ("task", "split", "test_split", "test_path", "domain_column"):
            default = getattr(DatasetConfig, name)
            _check(getattr(d, name) == default, f"dataset.{name}", "only applies to a user's dataset.path")
    _check(d.max_per_task >= 1, "dataset.max_per_task", f"must be >= 1, got {d.max_per_task}")
    _check(1 <= d.test_per_task < d.max_per_task, "dataset.test_per_task",
           f"must be in [1, dataset.max_per_task={d.max_per_task}), got {d.test_per_task}")

    m = cfg.model
    _check(bool(m.preset.strip()), "model.preset", "must not be empty")
    _check(m.pretrain_steps >= 0, "model.pretrain_steps", f"must be >= 0, got {m.pretrain_steps}")
    _check(m.pretrain_seed >= 0, "model.pretrain_seed", f"must be >= 0, got {m.pretrain_seed}")
    _check(len(m.corpus) >= 1, "model.corpus", "must name at least one source")
    for i, src in enumerate(m.corpus):
        _one_of(src, CORPUS_SOURCES, f"model.corpus[{i}]")
    _check(m.pretrain_seq_len >= 2, "model.pretrain_seq_len", f"must be >= 2, got {m.pretrain_seq_len}")
    _check(m.pretrain_batch_size >= 1, "model.pretrain_batch_size", f"must be >= 1, got {m.pretrain_batch_size}")
    _check(math.isfinite(m.pretrain_lr) and m.pretrain_lr > 0, "model.pretrain_lr", f"must be > 0, got {m.pretrain_lr}")
    _one_of(m.dtype, MODEL_DTYPES, "model.dtype")
    _one_of(m.save, MODEL_SAVE, "model.save")
    if m.path:
        _check(bool(m.path.strip()), "model.path", "must not be blank")
    else:
        _check(m.dtype == "float32", "model.dtype", "only applies to a checkpoint loaded from model.path "
               "(presets are built in float32)")
        _check(not m.trust_remote_code, "model.trust_remote_code", "only applies to model.path")

    _validate_devices(cfg.devices)

    f = cfg.flux
    _one_of(f.profile_bits, PROFILE_BITS, "flux.profile_bits")
    _one_of(cfg.download_bits, DOWNLOAD_BITS, "download_bits")
    _one_of(cfg.upload_bits, WIRE_BITS, "upload_bits")
    _one_of(cfg.broadcast_bits, WIRE_BITS, "broadcast_bits")
    _check(f.profile_samples >= 0, "flux.profile_samples",
           f"must be >= 0 (0 = all local samples), got {f.profile_samples}")
    _one_of(f.merge_mode, MERGE_MODES, "flux.merge_mode")
    _one_of(f.merge_clustering, CLUSTERINGS, "flux.merge_clustering")
    for name in ("epsilon_start", "epsilon_end"):
        v = getattr(f, name)
        _check(0 <= v <= 1, f"flux.{name}", f"must be in [0, 1], got {v}")
    _check(f.epsilon_rounds >= 1, "flux.epsilon_rounds", f"must be >= 1, got {f.epsilon_rounds}")
    _one_of(f.exploration, EXPLORATION, "flux.exploration")
    _one_of(f.exploration_draw, EXPLORATION_DRAWS, "flux.exploration_draw")
    _check(math.isfinite(f.zo_sigma) and f.zo_sigma > 0, "flux.zo_sigma", f"must be > 0, got {f.zo_sigma}")
    _check(f.zo_perturbations >= 1, "flux.zo_perturbations", f"must be >= 1, got {f.zo_perturbations}")
    _check(0 < f.max_tune_fraction <= 1, "flux.max_tune_fraction", f"must be in (0, 1], got {f.max_tune_fraction}")
    _check(0 <= f.min_group_share <= 1, "flux.min_group_share", f"must be in [0, 1], got {f.min_group_share}")
    _one_of(f.budget_policy, BUDGET_POLICIES, "flux.budget_policy")
    _check(math.isfinite(f.view_error_tolerance) and f.view_error_tolerance >= 0, "flux.view_error_tolerance",
           f"must be >= 0, got {f.view_error_tolerance}")
    _check(f.budget_probe_samples >= 1, "flux.budget_probe_samples", f"must be >= 1, got {f.budget_probe_samples}")
    _check(f.utility_steps >= 0, "flux.utility_steps", f"must be >= 0 (0 = every step), got {f.utility_steps}")
    _check(f.utility_micro_batches >= 1, "flux.utility_micro_batches", f"must be >= 1, got {f.utility_micro_batches}")
    _one_of(f.frozen_format, FROZEN_FORMATS, "flux.frozen_format")
    # zeroth-order exploration updates its (frozen) experts in place: quantized copies would drop it
    _check(f.frozen_format == "full" or f.exploration != "zo", "flux.frozen_format",
           f"{f.frozen_format!r} needs flux.exploration = \"backprop\": zeroth-order exploration updates frozen "
           "groups in place, which quantized groups cannot hold; with exploration = \"zo\" set "
           "flux.frozen_format = \"full\"")
    if f.frozen_format == "nf4":
        _needs_bnb(f.frozen_format, "flux.frozen_format")
    _one_of(f.optimizer, OPTIMIZERS, "flux.optimizer")
    if f.optimizer == "adamw8bit":
        _needs_bnb(f.optimizer, "flux.optimizer")
    _one_of(cfg.fmq.weight_format, FMQ_WEIGHT_FORMATS, "fmq.weight_format")
    if cfg.fmq.weight_format == "nf4":
        _needs_bnb(cfg.fmq.weight_format, "fmq.weight_format")

    x = cfg.faults
    _check(0 <= x.dropout < 1, "faults.dropout", f"must be in [0, 1), got {x.dropout}")
    _check(x.deadline_s >= 0, "faults.deadline_s", f"must be >= 0 (0 = no deadline), got {x.deadline_s}")
    _check(x.rank_timeout_s > 0, "faults.rank_timeout_s", f"must be > 0, got {x.rank_timeout_s}")
    _check(x.max_delta_rms_ratio == 0 or x.max_delta_rms_ratio >= 1, "faults.max_delta_rms_ratio",
           f"must be 0 (off) or >= 1, got {x.max_delta_rms_ratio}")
    _one_of(x.poison_action, ("clip", "reject"), "faults.poison_action")

    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", f"must be >= 0 (0 = never), got {c.every}")
    _check(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")


def _validate_devices(dev: DevicesConfig) -> None:
    from flux.federation.devices import DEVICE_CLASSES, profile_from_dict

    _one_of(dev.assignment, ASSIGNMENTS, "devices.assignment")
    if dev.profiles:
        for i, p in enumerate(dev.profiles):
            profile_from_dict(p, f"devices.profiles[{i}]")
        return
    _check(len(dev.classes) >= 1, "devices.classes", "must name at least one device class (or give devices.profiles)")
    for name in dev.classes:
        _one_of(name, tuple(DEVICE_CLASSES), "devices.classes")


# ---------------------------------------------------------------------------- writing
def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (JSON/TOML-ready) of ``cfg``; lists and dicts are copies."""
    return dataclasses.asdict(cfg)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def config_to_toml(cfg: RunConfig) -> str:
    """TOML text of ``cfg`` (every key, defaults included); ``load_config`` reads it back equal."""
    data = config_to_dict(cfg)
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, key)):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form; always has '.', 'e' or is inf/nan
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError("", f"cannot write {type(value).__name__} {value!r} as TOML")

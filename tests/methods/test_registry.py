"""The method registry: one list of names, torch-free checks, a user's own method from the TOML."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flux.methods import registry

TINY = str(Path(__file__).resolve().parents[1] / "federation" / "tiny.toml")


def test_every_builtin_name_resolves_to_a_method_class_with_that_name():
    from flux.methods.api import Method

    for name in registry.method_names():
        cls = registry.method_class(name)
        assert issubclass(cls, Method) and cls.name == name
    assert set(registry.BASELINES) < set(registry.method_names())


def test_the_bench_and_the_config_use_the_registry_list():
    import flux.bench as bench
    from flux.federation.config import ConfigError, load_config

    assert tuple(bench.BASELINE_METHODS) == registry.BASELINES
    for name in registry.method_names():
        assert load_config(None, [f"method={name!r}".replace("'", '"')]).method == name
    with pytest.raises(ConfigError, match="did you mean 'fmes'"):
        load_config(None, ['method="fmse"'])


@pytest.mark.parametrize("name, fragment", [
    ("nope", "must be one of"), ("a.b:", "not of the form"), ("1a:B", "not of the form"), (":B", "not of the form"),
    (3, "must be a string"),
])
def test_malformed_names_are_refused_without_importing(name, fragment):
    assert fragment in registry.method_problem(name)


def test_names_are_checked_without_importing_torch():
    code = ("import sys; from flux.methods.registry import method_problem; from flux.federation.config import "
            "load_config; assert method_problem('pkg.mod:Cls') is None; load_config(None, []); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("target, fragment", [
    ("no_such_module_xyz:Thing", "cannot import module"),
    ("json:NoSuchClass", "has no attribute"),
    ("json:JSONDecoder", "not a subclass"),
])
def test_a_bad_user_method_fails_with_a_clear_error(target, fragment):
    with pytest.raises(ValueError, match=fragment):
        registry.make_method(target)


USER_METHOD = '''
"""A user's method outside the package: FedAvg training, aggregation that keeps only the
largest-token update per expert (a method-owned aggregate)."""
from flux.federation.update import RoundDelta
from flux.methods.fedavg import FedAvg


class TopTokenAvg(FedAvg):
    name = "top-token"
    calls = []

    def aggregate(self, ctx, round_idx, accepted, failures):
        best = {}
        for u in accepted:
            for key, d in u.expert_deltas.items():
                if key not in best or u.expert_tokens.get(key, 0) > best[key][0]:
                    best[key] = (u.expert_tokens.get(key, 0), d)
        delta = super().aggregate(ctx, round_idx, accepted, failures)
        delta.experts = {k: d for k, (_, d) in sorted(best.items())}
        import json, os
        log = os.environ["USER_METHOD_LOG"]
        with open(log, "a") as fh:
            fh.write(json.dumps({"round": round_idx, "accepted": [u.participant for u in accepted],
                                 "failures": [f.participant for f in failures],
                                 "experts": len(delta.experts)}) + "\\n")
        return delta
'''


def test_a_user_defined_method_runs_from_the_toml(tmp_path):
    """``method = "mymethods.top:TopTokenAvg"`` in a job's TOML: the engine imports the user's
    class from sys.path (PYTHONPATH), runs it with its own aggregation, and reports it."""
    pkg = tmp_path / "user" / "mymethods"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text(textwrap.dedent(USER_METHOD))
    job = tmp_path / "job.toml"
    text = Path(TINY).read_text().replace('method = "flux"', 'method = "mymethods.top:TopTokenAvg"')
    job.write_text(text.replace("rounds = 3", "rounds = 2"))
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "run"
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "user"), "USER_METHOD_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "flux.cli", "run", "--config", str(job), "--out", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["round"] for c in calls] == [0, 1]
    assert all(c["accepted"] and c["experts"] > 0 for c in calls)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mymethods.top:TopTokenAvg" and summary["rounds"] == 2
    # a name that does not import is a config error (exit 2), not a traceback
    bad = subprocess.run([sys.executable, "-m", "flux.cli", "run", "--config", str(job), "--out", str(tmp_path / "b"),
                          "--quiet", "--set", 'method="mymethods.nothere:X"'],
                         capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "cannot import module" in bad.stderr, bad.stderr[-2000:]

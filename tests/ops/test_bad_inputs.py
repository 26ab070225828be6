"""Every op rejects bad input by name; corner cases and NaN / Inf inputs give the defined answer.

The table is tests/ops/bad_input_cases.py.  The cases of one backend run in one child process
(a few seconds), so that a crash in a native kernel fails the test of the case that crashed,
named, instead of killing the session; the cases after it run in a fresh child.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ops.bad_input_cases import CASES, CPU_BACKENDS, HARNESS_CASES, Case

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 300


def _no_core_dumps() -> None:  # a crashing case must not leave a core file behind
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _text(out: Any) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_in_child(backend: str, case_ids: list[str]) -> dict[str, dict[str, Any]]:
    """{case id: result} for ``case_ids`` run under ``backend`` in child processes; a case
    during which the child died (signal, exit, timeout) gets kind "crash" / "timeout"."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               FLUX_MAX_THREADS=os.environ.get("FLUX_MAX_THREADS", "1"))
    results: dict[str, dict[str, Any]] = {}
    pending = list(case_ids)
    while pending:
        timed_out = False
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tests.ops.bad_input_cases", backend], input="\n".join(pending) + "\n",
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                preexec_fn=_no_core_dumps,
            )
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, stderr, code, timed_out = _text(exc.stdout), _text(exc.stderr), None, True
        running = None
        for line in stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                running = record["start"]
            else:
                results[record.pop("case")] = record
                running = None
        if code == 0 and running is None:
            break
        if running is None:  # died outside any case (import error ...): every pending case fails
            for case_id in pending:
                results.setdefault(case_id, {"status": "fail", "kind": "child failed",
                                             "detail": f"exit {code}; stderr: {stderr[-1500:]}"})
            break
        if timed_out:
            why = f"the child ran past {CHILD_TIMEOUT_S} s"
        elif code < 0:
            why = f"the child was killed by {signal.Signals(-code).name}"
        else:
            why = f"the child exited with status {code}"
        results[running] = {"status": "fail", "kind": "timeout" if timed_out else "crash",
                            "detail": f"{why} while running this case; stderr: {stderr[-1500:]}"}
        pending = [case_id for case_id in pending if case_id not in results]
    return results


@functools.lru_cache(maxsize=None)
def backend_results(backend: str) -> dict[str, dict[str, Any]]:
    return run_in_child(backend, [c.id for c in CASES if backend in c.backends])


def _params() -> list:
    params = []
    for backend in CPU_BACKENDS:
        for case in CASES:
            if backend not in case.backends:
                continue
            marks = [pytest.mark.triton] if backend == "triton" else []
            for where, why in case.known_deviation:
                if where == backend:
                    marks.append(pytest.mark.xfail(reason=f"known deviation: {why}", strict=True))
            params.append(pytest.param(backend, case, id=f"{backend}-{case.id}", marks=marks))
    return params


def _explain(case: Case, result: dict[str, Any]) -> str:
    if case.exc is None:
        want = "to return the defined answer"
    else:
        want = f"{case.exc.__name__} naming {case.names}" + (f" and containing {case.also}" if case.also else "")
    kind = result.get("kind")
    got = {
        "silent": "it was accepted silently",
        "wrong-type": f"{result.get('exc_type')}: {result.get('message')}",
        "unnamed": f"the message lacks {result.get('missing')}: {result.get('exc_type')}: {result.get('message')}",
        "error": f"{result.get('exc_type')}: {result.get('message')}",
    }.get(kind, f"{kind}: {result.get('detail')}")
    return f"[{case.id}] expected {want}; {got}"


@pytest.mark.parametrize("backend,case", _params())
def test_case(backend: str, case: Case) -> None:
    result = backend_results(backend)[case.id]
    assert result["status"] == "pass", _explain(case, result)


def test_table_covers_every_entry() -> None:
    per_op = collections.Counter((c.op, "corner" if c.exc is None else "bad") for c in CASES)
    for op in ("merged_moe", "route_profile", "quantize"):
        assert per_op[(op, "bad")] >= 10 and per_op[(op, "corner")] >= 5, (op, per_op)
    for op in ("QuantizedTensor()", "QuantizedTensor use", "QuantizedTensor[index]", "library ops",
               "backend selection", "flux_C (native)"):
        assert per_op[(op, "bad")] >= 2, (op, per_op)
    library_ops = " ".join(c.name for c in CASES if c.op == "library ops")
    for op in ("quantize_rows", "dequantize_rows", "route_profile_op", "merged_moe_fwd", "merged_moe_bwd"):
        assert op in library_ops, op
    bad, corners = sum(c.exc is not None for c in CASES), sum(c.exc is None for c in CASES)
    assert bad >= 170 and corners >= 35, (bad, corners)


def test_harness_names_a_crashing_case_and_keeps_going() -> None:
    results = run_in_child("reference", [c.id for c in HARNESS_CASES])
    crash = results["harness: segfault"]
    assert crash["kind"] == "crash" and "SIGSEGV" in crash["detail"], crash
    assert results["harness: passes"]["status"] == "pass"  # ran after the crash
    assert results["harness: silent accept"]["kind"] == "silent"
    assert results["harness: unnamed"]["kind"] == "unnamed"

"""The baselines FLUX is compared with, as methods of the federation engine.

* ``fmd``: every expert trains; what does not fit is offloaded to host memory every step.
* ``fmq``: every expert trains through int4 weights (straight-through estimator).
* ``fmes``: each participant trains only its most-activated experts that fit; drops the rest.

``fedavg`` (no memory limit, the accuracy reference) lives in flux.federation.methods.
docs/baselines.md has the memory models and formulas.
"""
from __future__ import annotations

from flux.baselines.fmd import FMDMethod, OffloadPlan, PinnedOffloader, plan_offload
from flux.baselines.fmes import FMESMethod, kept_bytes, select_experts
from flux.baselines.fmq import FMQMethod, QuantizedAdamW, QuantizedLayout, quantized_layout, stochastic_quantize

BASELINES: dict[str, type] = {"fmd": FMDMethod, "fmq": FMQMethod, "fmes": FMESMethod}

__all__ = [
    "BASELINES", "FMDMethod", "FMQMethod", "FMESMethod", "OffloadPlan", "PinnedOffloader", "plan_offload",
    "QuantizedAdamW", "QuantizedLayout", "quantized_layout", "stochastic_quantize", "kept_bytes",
    "select_experts",
]

"""Federated rounds on top of ``flux.moe``: config, device profiles, the simulated clock,
expert-wise aggregation over ``torch.distributed``, checkpoints and metrics.

Nothing heavy is imported here: ``flux run`` parses its config (and reports a bad one) before
torch, transformers or matplotlib are loaded.  Import the submodules directly, e.g.
``from flux.federation.config import load_config``.  docs/federation.md describes the round, the
clock model and every config key.
"""

"""FLUX technique 1: quantization-based local profiling (docs/techniques.md, first section).

``profile_model`` runs a participant's data forward through a quantized snapshot of the model
(``quantize_model``) and returns, per MoE layer and original expert, activation counts and
frequencies, the samples routed there and the mean attention score of their tokens.
``StaleProfiler`` runs it in the background on the previous round's model.
"""
from flux.profiling.profile import LayerProfile, ModelProfile, profile_model, received_attention
from flux.profiling.quantized_model import QuantizedModel, quantize_model
from flux.profiling.stale import StaleProfiler

__all__ = ["LayerProfile", "ModelProfile", "QuantizedModel", "StaleProfiler", "profile_model", "quantize_model",
           "received_attention"]

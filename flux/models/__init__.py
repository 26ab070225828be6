"""Small MoE models: presets built from transformers configs, a classifier wrapper, and a cached
warm-start pretraining on local text.  transformers is imported only when a model is built."""
from flux.models.classifier import MoEClassifier, evaluate
from flux.models.presets import PRESETS, build_config, build_lm
from flux.models.pretrain import DEFAULT_STEPS, pretrain_lm, pretrained_lm, routing_frequencies, routing_summary

__all__ = [
    "DEFAULT_STEPS", "MoEClassifier", "PRESETS", "build_config", "build_lm", "evaluate", "pretrain_lm",
    "pretrained_lm", "routing_frequencies", "routing_summary",
]

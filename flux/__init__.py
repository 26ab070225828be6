"""FLUX: federated fine-tuning of Mixture-of-Experts language models on small accelerators."""
from flux import ops
from flux.env import env_report

__version__ = "0.1.0"
__all__ = ["env_report", "ops", "__version__"]
from flux.moe import patch, unpatch  # noqa: E402
__all__ += ["patch", "unpatch"]

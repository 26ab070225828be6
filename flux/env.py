"""Environment report: versions, devices, and which kernel backends run here (and why not).

    python -m flux.env
"""
from __future__ import annotations

import os
import platform
import sys

import torch


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # not installed, or broken: say which
        return f"not available ({type(exc).__name__})"


def env_report() -> str:
    """A multi-line, human-readable report of the environment FLUX runs in."""
    from flux import __version__
    from flux.ops.backends import availability

    lines = [
        f"flux            {__version__}",
        f"python          {sys.version.split()[0]} ({platform.platform()})",
        f"torch           {torch.__version__} (cuda {torch.version.cuda}, threads {torch.get_num_threads()})",
        f"triton          {_version('triton')}",
        f"transformers    {_version('transformers')}",
        f"cuda device     {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"FLUX_BACKEND    {os.environ.get('FLUX_BACKEND', '(automatic)')}",
        f"TRITON_INTERPRET {os.environ.get('TRITON_INTERPRET', '0')}",
        "backends:",
    ]
    for name, state in availability().items():
        lines.append(f"  {name:<10} {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_report())

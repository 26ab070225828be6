"""Small calls of every CUDA op of ``torch.ops.flux_C``, out-of-range ids included.

GPU only (``pytest -m gpu``).  Run alone, it is what ``scripts/gpu_session.sh sanitize`` puts under
``compute-sanitizer --tool memcheck``: an out-of-bounds access fails that step even where the
outputs look right.  Nothing CUDA-only is touched at import time.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_every_op_on_small_inputs():
    import flux._C  # noqa: F401

    C = torch.ops.flux_C
    d = "cuda"
    for bits in (4, 8):
        q, s = C.quantize(torch.randn(5, 37, device=d), bits, 8)
        C.dequantize(q, s, bits, 8, 37, torch.bfloat16)
        for E in (3, 40, 256):
            C.route_profile(torch.randn(45, 37, device=d, dtype=torch.bfloat16),
                            *C.quantize(torch.randn(E, 37, device=d), bits, 8), bits, 8, min(E, 4),
                            "softmax", True, torch.zeros(E, dtype=torch.int64, device=d))
    ids = torch.randint(-2, 70, (33, 5), device=d)  # out-of-range ids must not be read through
    e2g = torch.randint(-3, 12, (64,), device=d, dtype=torch.int32)
    C.moe_routing(ids, e2g, 9)
    C.moe_routing(ids[:0], e2g, 9)
    torch.cuda.synchronize()

import pytest
import torch

import flux.ops as ops
from flux.ops.backends import reference
from tests.conftest import backend_params

SHAPES = [(1, 1), (3, 64), (5, 97), (4, 130), (2, 7)]


def test_int4_packing_layout_by_hand():
    # One group of 4 values, absmax 7 -> scale 1: q = w exactly; nibbles store q + 8.
    w = torch.tensor([[-7.0, 7.0, 1.0, -2.0, 3.0]])
    qdata, scales = reference.quantize(w, 4, 8)
    assert scales.tolist() == [[1.0]]
    # byte0 = (q0+8) | (q1+8) << 4 = 1 | 15 << 4; byte1 = 9 | 6 << 4; byte2 = 11 | pad 8 << 4
    assert qdata.tolist() == [[1 | 15 << 4, 9 | 6 << 4, 11 | 8 << 4]]


# quantize has no Triton kernel: the triton backend reuses the reference one.
@pytest.mark.parametrize("backend,device", backend_params(("cpu", "cuda"), exclude=("triton",)))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [1, 16, 64])
def test_quantize_matches_reference_and_bounds_error(backend, device, bits, shape, group_size, use):
    torch.manual_seed(0)
    w = torch.randn(shape, device=device) * 3
    w[0, : min(group_size, shape[1])] = 0.0  # an all-zero group: scale 0 must give q = 0
    with use("reference"):
        ref = ops.quantize(w, bits, group_size)
    with use(backend):
        q = ops.quantize(w, bits, group_size)
        deq = q.dequantize()
    assert torch.equal(q.qdata, ref.qdata) and torch.equal(q.scales, ref.scales)
    col_scale = q.scales.repeat_interleave(group_size, dim=1)[:, : shape[1]]
    assert deq.shape == w.shape and deq.dtype == w.dtype
    assert ((deq - w).abs() <= col_scale / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_low_precision_input(dtype, use):
    w = torch.randn(4, 96).to(dtype)
    with use("cpp"):
        q = ops.quantize(w, 4, 32)
    with use("reference"):
        ref = ops.quantize(w, 4, 32)
    assert torch.equal(q.qdata, ref.qdata)
    assert q.dequantize().dtype == dtype


def test_quantized_tensor_3d_indexing_and_size():
    w = torch.randn(3, 10, 64)
    q = ops.quantize(w, 4, 64)
    assert q.shape == w.shape
    assert torch.equal(q[1].dequantize(), q.dequantize()[1])
    assert q.nbytes == 3 * 10 * 32 + 3 * 10 * 4  # packed int4 + one fp32 scale per row-group


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=3), ValueError, "bits"),
        (dict(group_size=0), ValueError, "group_size"),
    ],
)
def test_quantize_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.quantize(torch.randn(2, 8), **kwargs)


def test_quantize_rejects_integer_input():
    with pytest.raises(TypeError, match="floating"):
        ops.quantize(torch.ones(2, 8, dtype=torch.int32))

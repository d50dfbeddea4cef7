"""int8 x packed-ternary matmul: packing helpers and the fused-unpack Triton kernel
(interpreter on CPU, see conftest) against torch int64 matmul, exact integer equality; the
forced torch-reference dispatch against the same."""

import pytest
import torch

from ligerzoo.kernels.int2_matmul import int2_matmul, int2_matmul_reference, pack_int2, unpack_int2
from tests.kernels.helpers import (
    kernel_module,
    path,  # noqa: F401 (fixture)
)

# The op module itself (the package re-exports functions under the same names).
i2_mod = kernel_module("int2_matmul")


def _ternary(N, K, device="cpu"):
    return torch.randint(-1, 2, (N, K), dtype=torch.int8, device=device)


def _x(M, K, device="cpu"):
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=device)
    x[0, :] = -128          # extremes: the largest |products| and sums
    return x


def _expected(x, w):
    return x.to(torch.int64) @ w.to(torch.int64).T


def test_pack_unpack_roundtrip_and_layout():
    w = _ternary(5, 36)
    p = pack_int2(w)
    assert p.dtype == torch.uint8 and p.shape == (5, 9)
    assert torch.equal(unpack_int2(p), w)
    # documented layout: byte j holds w[:, j + i * K/4] + 1 in bits 2i..2i+1
    K4 = 9
    for n, j in [(0, 0), (3, 8), (4, 5)]:
        byte = int(p[n, j])
        for i in range(4):
            assert (byte >> (2 * i)) & 3 == int(w[n, j + i * K4]) + 1
    # int8 storage of the same bytes decodes identically; every byte value decodes to codes - 1
    assert torch.equal(unpack_int2(p.view(torch.int8)), w)
    allbytes = torch.arange(256, dtype=torch.int32).to(torch.uint8)[None]
    u = unpack_int2(allbytes)
    for i in range(4):
        assert torch.equal(u[0, i * 256:(i + 1) * 256].long(), ((torch.arange(256) >> (2 * i)) & 3) - 1)
    # float and int64 inputs pack the same
    assert torch.equal(pack_int2(w.float()), p) and torch.equal(pack_int2(w.long()), p)


@pytest.mark.parametrize("M,N,K", [(5, 7, 148), (1, 3, 4), (16, 16, 64), (3, 20, 12)])
def test_int2_matmul_exact(path, M, N, K):
    x, w = _x(M, K), _ternary(N, K)
    p = pack_int2(w)
    x0, p0 = x.clone(), p.clone()
    out = int2_matmul(x, p)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out.long(), _expected(x, w))
    assert torch.equal(x, x0) and torch.equal(p, p0)


def test_int2_matmul_many_blocks_and_k_steps(monkeypatch):
    """Several M and N blocks (grouped order with a partial group), and K steps with a
    tail, at the smallest dot tile."""
    monkeypatch.setattr(i2_mod, "_BLOCK_M", 16)
    monkeypatch.setattr(i2_mod, "_BLOCK_N", 16)
    monkeypatch.setattr(i2_mod, "_BLOCK_KP", 32)     # int8 tl.dot's smallest K on the GPU
    monkeypatch.setattr(i2_mod, "_GROUP_M", 2)
    M, N, K = 37, 21, 4 * 70            # 3 x 2 blocks, K/4 = 70 = 32 + 32 + 6
    x, w = _x(M, K), _ternary(N, K)
    out = int2_matmul(x, pack_int2(w))
    assert torch.equal(out.long(), _expected(x, w))


def test_int2_matmul_strided_and_signed_storage(path):
    M, N, K = 6, 9, 40
    x_full = _x(M, 2 * K)
    x = x_full[:, ::2]                         # column stride 2
    w = _ternary(N, K)
    p = pack_int2(w)
    p_wide = torch.zeros(N, K // 4 + 5, dtype=torch.uint8)
    p_wide[:, 3:3 + K // 4] = p
    p_view = p_wide[:, 3:3 + K // 4]           # row stride > K/4
    exp = _expected(x, w)
    assert torch.equal(int2_matmul(x, p_view).long(), exp)
    assert torch.equal(int2_matmul(x.t().contiguous().t(), p.view(torch.int8)).long(), exp)
    assert torch.equal(int2_matmul(x, p.t().contiguous().t()).long(), exp)   # column-major bytes


def test_int2_matmul_decodes_unused_code_as_two(path):
    """Bytes with code 3 (never written by pack_int2) decode to +2 in the kernel too."""
    M, N, K = 4, 5, 24
    x = _x(M, K)
    p = torch.randint(0, 256, (N, K // 4), dtype=torch.int32).to(torch.uint8)
    assert torch.equal(int2_matmul(x, p).long(), _expected(x, unpack_int2(p)))


def test_int2_matmul_reference_and_extremes():
    M, N, K = 3, 4, 4096
    x = torch.full((M, K), -128, dtype=torch.int8)
    w = torch.ones(N, K, dtype=torch.int8)
    w[1] = -1
    out = int2_matmul(x, pack_int2(w))
    assert out[0, 0].item() == -128 * K and out[0, 1].item() == 128 * K
    assert torch.equal(int2_matmul_reference(x, pack_int2(w)), out)


def test_int2_matmul_empty():
    assert int2_matmul(torch.zeros(0, 8, dtype=torch.int8), pack_int2(_ternary(3, 8))).shape == (0, 3)
    assert int2_matmul(_x(2, 8), torch.zeros(0, 2, dtype=torch.uint8)).shape == (2, 0)
    out = int2_matmul(torch.zeros(2, 0, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.uint8))
    assert out.shape == (2, 3) and torch.count_nonzero(out) == 0


def test_int2_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_int2(_ternary(2, 6))
    with pytest.raises(ValueError, match="ternary"):
        pack_int2(torch.tensor([[0, 2, 0, 0]]))
    with pytest.raises(ValueError, match="integers"):
        pack_int2(torch.tensor([[0.5, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        pack_int2(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int2(torch.zeros(2, 2, dtype=torch.int32))
    p = pack_int2(_ternary(3, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        int2_matmul(torch.zeros(2, 6, dtype=torch.int8), p)
    with pytest.raises(ValueError, match="K // 4"):
        int2_matmul(torch.zeros(2, 12, dtype=torch.int8), p)
    big_k = 2**23                                       # |out| <= 256 K would reach 2^31
    with pytest.raises(ValueError, match="below 2\\^23"):
        int2_matmul(torch.zeros(1, 1, dtype=torch.int8).expand(1, big_k),
                    torch.zeros(1, 1, dtype=torch.uint8).expand(1, big_k // 4))
    with pytest.raises(ValueError, match="int8"):
        int2_matmul(torch.zeros(2, 8, dtype=torch.float32), p)
    with pytest.raises(ValueError, match="uint8"):
        int2_matmul(torch.zeros(2, 8, dtype=torch.int8), p.float())


def test_int2_matmul_opcheck_and_compile():
    from torch.library import opcheck

    x, w = _x(5, 32), _ternary(6, 32)
    p = pack_int2(w)
    opcheck(torch.ops.ligerzoo.int2_matmul, (x, p))
    out = torch.compile(lambda a, b: int2_matmul(a, b) * 2, fullgraph=True, backend="aot_eager")(x, p)
    assert torch.equal(out.long(), 2 * _expected(x, w))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M,N,K", [(4096, 4096, 4096), (8192, 4096, 11008), (1, 4096, 4096), (77, 1000, 4100)])
def test_gpu_int2_matmul_exact(M, N, K):
    torch.manual_seed(0)
    x, w = _x(M, K, "cuda"), _ternary(N, K, "cuda")
    out = int2_matmul(x, pack_int2(w))
    # float64 is exact here: every partial sum is an integer below 2^53
    exp = (x.double() @ w.double().T).to(torch.int64)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), exp)
    assert torch.equal(unpack_int2(pack_int2(w)), w)


def test_pack_refuses_values_a_cast_would_wrap_into_range():
    """65536 (int16 wraps it to 0), +-inf and 1e10 (an int16 cast makes them 0) are not ternary:
    refused, not packed as 0 or +-1."""
    for bad in ([[65536, 65537, 65535, 0]], [[float("inf"), 0.0, 0.0, 0.0]], [[float("-inf"), 0.0, 0.0, 0.0]],
                [[1e10, 0.0, 0.0, 0.0]]):
        with pytest.raises(ValueError, match="ternary"):
            pack_int2(torch.tensor(bad))
    codes = torch.tensor([[0, 1, 1, 0]])  # unsigned storage of {0, 1} is ternary too
    assert torch.equal(pack_int2(codes.to(torch.uint8)), pack_int2(codes))

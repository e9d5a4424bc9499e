"""medlava's fused CPU ops against the torch code they replace: rotary embeddings and SwiGLU bit for
bit, RMSNorm (with the residual add) within float32 rounding, the one-to-three-row matmul within one
rounding of the exact product (and the same for a row alone or beside others); and the decoder with
them on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medlava.model import decoder
from medlava.model.decoder import RMSNorm, apply_rope, rope_cos_sin

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 40])  # 40: halves that are not whole vectors
def test_rotary_is_bit_identical(cpu_kernels, dtype, head_dim):
    g = torch.Generator().manual_seed(0)
    t, heads, kv_heads = 37, 6, 2
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(100, 100 + t), head_dim, 10000.0, dtype)
    want_q = apply_rope(q.transpose(0, 1), cos, sin).transpose(0, 1)
    want_k = apply_rope(k.transpose(0, 1), cos, sin).transpose(0, 1)
    cpu_kernels.rotary_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_is_bit_identical(cpu_kernels, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2 * 2051, generator=g).mul(4).to(dtype)  # [gate | up]; 2051: a scalar tail
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(cpu_kernels.silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm_with_the_residual_add(cpu_kernels, dtype, with_delta):
    g = torch.Generator().manual_seed(2)
    x, delta = (torch.randn(9, 770, generator=g).to(dtype) for _ in range(2))
    weight = torch.rand(770, generator=g).add(0.5).to(dtype)
    out, summed = cpu_kernels.rms_norm(x, weight, 1e-5, delta if with_delta else None)
    s = x + delta if with_delta else x
    want = weight * F.rms_norm(s.float(), (770,), eps=1e-5).to(dtype)
    assert torch.equal(summed, s)  # the residual stream is added exactly as torch adds
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    else:  # the mean square differs in its last float32 bits: at most one bfloat16 step, rarely
        assert ((out.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()
        assert (out != want).float().mean() < 0.01


def test_rms_norm_module_uses_the_kernel_only_without_autograd(cpu_kernels, monkeypatch):
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(3, 64)
    calls = []
    monkeypatch.setattr(decoder.kernels, "ops", lambda: calls.append(1) or cpu_kernels)
    norm(x)  # autograd on (training, relevance maps): plain torch
    assert not calls
    with torch.inference_mode():
        norm(x)
    assert calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_decoder_gives_the_same_logits_with_and_without_the_fused_ops(cpu_kernels, model_dir, monkeypatch, dtype):
    from medlava.model.loader import load_model

    lm = load_model(model_dir("mistral-mlp2x-l1"), dtype=dtype)
    ids = torch.randint(5, lm.config.text.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fused = lm.model(ids)
        monkeypatch.setattr(decoder.kernels, "ops", lambda: None)
        plain = lm.model(ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # RMSNorm's mean square, summed in another order
    torch.testing.assert_close(fused.float(), plain.float(), rtol=tol, atol=tol)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_gemv_is_within_one_rounding_of_the_exact_product(cpu_kernels, dtype):
    g = torch.Generator().manual_seed(4)
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]  # one rounding (twice its bound)
    for k in (96, 100, 2048):  # 100: a partial last vector
        for rows in (1, 2, 3):
            for bias in (None, torch.randn(131, generator=g).to(dtype)):
                w = (torch.randn(131, k, generator=g) / k**0.5).to(dtype)
                x = torch.randn(1, rows, k, generator=g).to(dtype)
                exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                y = cpu_kernels.gemv(x, w, bias)
                assert y.shape == (1, rows, 131) and y.dtype == dtype
                assert ((y.double() - exact).abs() <= exact.abs() * step + 1e-5).all(), (k, rows)
                assert torch.equal(cpu_kernels.gemv(x[:, :1], w, bias), y[:, :1])  # alone or with others: the same
    with pytest.raises(RuntimeError, match="1 to 3 rows"):
        cpu_kernels.gemv(torch.randn(4, 96).to(dtype), torch.randn(8, 96).to(dtype), None)


def test_linear_layers_take_the_gemv_at_up_to_three_rows_without_autograd(cpu_kernels, monkeypatch):
    layer = decoder.Linear(64, 32)
    rows_run = []

    class Watched:  # the kernels, noting the rows each gemv call gets
        def __getattr__(self, name):
            return getattr(cpu_kernels, name)

        def gemv(self, x, *args):
            rows_run.append(x.numel() // x.shape[-1])
            return cpu_kernels.gemv(x, *args)

    monkeypatch.setattr(decoder.kernels, "ops", lambda: Watched())
    with torch.inference_mode():
        for rows in (1, 3, 4):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert rows_run == [1, 3]  # 4 rows: oneDNN's or torch's GEMM
    layer(torch.randn(1, 64)).sum().backward()  # autograd on: plain torch, and the weight gets its gradient
    assert rows_run == [1, 3] and layer.weight.grad is not None

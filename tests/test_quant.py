"""Weight-only int8 / int4 quantization: layers close to their full-precision originals on both
int8 paths, a loader that quantizes as it reads, the engine on a quantized model, clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medlava.errors import MedlavaError, ModelLoadError
from medlava.model.quant import INT8_FEW_ROWS, QuantizedLinear


def layer(method: str, weight: torch.Tensor, dtype=torch.bfloat16) -> QuantizedLinear:
    q = QuantizedLinear(weight.shape[1], weight.shape[0], method, bias=False, dtype=dtype)
    q.load_weight(weight)
    return q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_both_paths_are_close_to_the_float_layer_and_to_each_other(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    q = layer("int8", w, dtype)
    assert q.qweight.dtype == torch.int8 and q.nbytes == q.qweight.nbytes + q.scales.nbytes + q.kernel_scales.nbytes < w.to(dtype).nbytes
    x = torch.randn(INT8_FEW_ROWS + 1, 256, generator=g).to(dtype)
    with torch.inference_mode():
        few = torch.cat([q(x[i : i + 1]) for i in range(len(x))])  # _weight_int8pack_mm
        many = q(x)  # dequantize + GEMM
    exact = F.linear(x.float(), w)
    rel = lambda y: ((y.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(few) < 0.02 and rel(many) < 0.02
    torch.testing.assert_close(few.float(), many.float(), rtol=0.02, atol=0.02)


def test_int8_keeps_gradients_for_relevance_maps_int4_says_it_has_none():
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(3, 128, requires_grad=True)
    layer("int8", w, torch.float32)(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), rtol=0.02, atol=0.02)
    with pytest.raises(MedlavaError, match="int4 layers have no gradients"):
        layer("int4", w, torch.float32)(torch.randn(3, 128, requires_grad=True))


def test_int4_is_close_and_small():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 352, generator=g) * 0.05  # 352: groups of 32, not 128 or 64
    q = layer("int4", w)
    assert q.group_size == 32 and q.nbytes < w.to(torch.bfloat16).nbytes / 2.5
    assert q.nbytes == q.qweight.qdata.nbytes + q.qweight.scale_and_zero.nbytes  # the count matches the storage
    x = torch.randn(5, 352, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        y = q(x).float()
    exact = F.linear(x.float(), w)
    assert ((y - exact).norm() / exact.norm()).item() < 0.15


def test_bad_quantizations_are_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        QuantizedLinear(64, 64, "int3", bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="divisible by 32"):
        QuantizedLinear(40, 64, "int4", bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="by 16"):
        QuantizedLinear(64, 40, "int4", bias=False, dtype=torch.float32)
    q = QuantizedLinear(64, 32, "int8", bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        q.load_weight(torch.zeros(64, 64))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_loader_quantizes_the_decoder_layers_as_it_reads_them(method, monkeypatch):
    from medlava.model import weights
    from medlava.model.decoder import Linear
    from medlava.model.demo import resolve_model
    from medlava.model.loader import load_model

    folder = resolve_model(None)  # the demo model: trained weights, whose logits mean something
    reads = []  # every tensor the loader reads, and whether a quantized layer took it
    original = weights.iter_tensors

    def spy(path):
        for key, read in original(path):
            yield key, (lambda read=read, key=key: reads.append(key) or read())

    monkeypatch.setattr(weights, "iter_tensors", spy)
    full = load_model(folder, dtype="bfloat16")
    lm = load_model(folder, dtype="bfloat16", quantization=method)
    assert lm.quantization == method
    projections = [n for n, m in lm.model.named_modules() if isinstance(m, QuantizedLinear)]
    layers = len(lm.model.decoder.layers)
    assert len(projections) == 7 * layers  # q, k, v, o, gate, up, down of every layer
    assert isinstance(lm.model.lm_head, Linear) and not any(k.startswith("decoder.layers.") and k.endswith("proj.weight") for k in lm.model.state_dict())
    assert len(reads) == 2 * len(set(reads))  # each tensor read once per load, nothing read twice
    ids = torch.randint(5, lm.config.text.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = full.model(ids).float(), lm.model(ids).float()
    centred = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731  (logits are shift-invariant)
    error = ((centred(b) - centred(a)).norm() / centred(a).norm()).item()
    assert error < (0.05 if method == "int8" else 0.2), error  # 0.015 and 0.10 seen; a wrong scale or layout gives ~1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_engine_on_a_quantized_model_matches_the_reference_loop(model_dir, method):
    from medlava.engine.llm_engine import LLMEngine
    from medlava.engine.reference import generate_reference
    from medlava.engine.sampling import SamplingParams
    from medlava.model.loader import load_model

    # float32 activations, as the engine's other parity tests (a random model's bfloat16 logits tie too often)
    lm = load_model(model_dir("llama-mlp2x-l2"), dtype="float32", quantization=method)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [lm.tokenizer(f"USER: question {i} about nothing ASSISTANT:").input_ids for i in range(3)]
    expected = [generate_reference(lm.model, lm.tokenizer, ids, params).token_ids for ids in prompts]
    engine = LLMEngine(lm, block_size=4)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, None, params)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    assert [done[f"r{i}"] for i in range(3)] == expected


def test_loader_refusals_are_one_clear_line(model_dir):
    from medlava.model.loader import load_model

    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model(model_dir("mistral-mlp2x-l1"), quantization="fp8")


def test_weight_bytes_counts_a_7b_llava_med_without_allocating_it():
    from medlava.model.config import LlavaConfig, TextConfig, VisionConfig
    from medlava.model.quant import weight_bytes

    cfg = LlavaConfig(vision=VisionConfig(), text=TextConfig())  # the defaults: LLaVA-Med v1.5's shapes
    bf16, int8, int4 = (weight_bytes(cfg, torch.bfloat16, q) for q in (None, "int8", "int4"))
    assert 15.0e9 < bf16 < 15.3e9  # 7.57 B parameters: Mistral-7B, CLIP ViT-L/14-336, the projector
    assert 8.0e9 < int8 < 8.3e9 and 4.7e9 < int4 < 5.0e9

"""The engine's public faces: `LLM.generate` (prompts, chat messages, images in any form) and the
async streaming wrapper."""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medlava.chat.image_processing import preprocess
from medlava.chat.messages import render_messages
from medlava.chat.templates import build_prompt, get_template
from medlava.chat.tokenize import tokenize_prompt
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm import LLM
from medlava.engine.llm_engine import LLMEngine
from medlava.engine.reference import generate_reference
from medlava.engine.sampling import SamplingParams
from medlava.errors import ModelLoadError
from medlava.model.demo import DEMO_MODEL
from medlava.model.loader import load_model

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir("mistral-mlp2x-l1"))


def expected(lm, prompt: str, image, params=PARAMS) -> list[int]:
    ids = tokenize_prompt(lm.tokenizer, prompt, lm.config.image_token_id, lm.config.image_tokens)
    pixels = preprocess(image, lm.image_processing)[None]
    return generate_reference(lm.model, lm.tokenizer, ids, params, pixels=pixels).token_ids


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_llm_without_a_model_uses_the_demo_model_or_says_it_is_missing():
    if (DEMO_MODEL / "config.json").is_file():
        assert LLM().engine.lm.path == DEMO_MODEL
    else:
        with pytest.raises(ModelLoadError, match="no model given"):
            LLM()


def test_generate_prompts_and_messages(lm, xray_image, tmp_path):
    llm = LLM(lm, block_size=4)
    prompt = build_prompt(lm.conv_mode, "What modality is this?")
    path = tmp_path / "xray.png"
    xray_image.save(path)
    flipped = xray_image.transpose(0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What modality is this?"},
                {"type": "image_url", "image_url": {"url": png_data_url(flipped)}},
            ],
        }
    ]
    outs = llm.generate(
        [
            {"prompt": prompt, "images": [xray_image]},
            {"prompt": prompt, "images": [str(path)]},
            {"messages": messages},
        ],
        PARAMS,
        use_tqdm=False,
    )
    want = expected(lm, prompt, xray_image)
    assert outs[0].token_ids == want and outs[1].token_ids == want  # PIL image and PNG path alike
    assert outs[1].metrics.cached_prompt_tokens > 0  # same pixels, same hash: the prefix is shared
    assert outs[2].token_ids == expected(lm, prompt, flipped.convert("RGB"))  # image first, as build_prompt
    for out in outs:
        assert out.finish_reason == "length" and len(out.token_ids) == 10
        assert out.text == lm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        m = out.metrics
        assert m.prompt_tokens > lm.config.image_tokens and m.output_tokens == 10
        assert 0 <= m.queue_time <= m.time_to_first_token <= m.e2e_time
    engine_m = llm.metrics()
    assert engine_m.kv_blocks_used == 0 and engine_m.running == engine_m.waiting == 0


def test_generate_takes_one_params_per_request(lm, xray_image):
    llm = LLM(lm)
    prompt = build_prompt(lm.conv_mode, "Findings?")
    short, long = SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)
    outs = llm.generate([{"prompt": prompt, "images": xray_image}] * 2, [short, long], use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [2, 5]
    assert outs[1].token_ids[:2] == outs[0].token_ids
    with pytest.raises(ValueError, match="2 requests"):
        llm.generate([prompt, prompt], [short], use_tqdm=False)


def test_bad_requests_are_refused_and_leave_nothing_behind(lm, xray_image):
    llm = LLM(lm)
    good = {"prompt": build_prompt(lm.conv_mode, "Q?"), "images": [xray_image]}
    with pytest.raises(ValueError, match="image-token positions"):
        llm.generate([good, {"prompt": "USER: no image here ASSISTANT:", "images": [xray_image]}], use_tqdm=False)
    with pytest.raises(ValueError, match="never uses the network"):
        llm.generate({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]}, use_tqdm=False)
    with pytest.raises(ValueError, match="base64"):
        llm.generate({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.all_free()


def test_render_messages_uses_the_template():
    from medlava.chat.templates import get_template

    t = get_template("mistral_instruct")
    prompt, images = render_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A chest film."},
            {"role": "user", "content": "Any effusion?"},
        ],
        t,
    )
    assert images == ["a.png"]
    assert prompt == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat? [/INST] A chest film. </s>[INST] Any effusion? [/INST]"
    plain, _ = render_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Q"}]}], t)
    assert plain == build_prompt(t, "Q")
    with pytest.raises(ValueError, match="last message"):
        render_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], t)
    with pytest.raises(ValueError, match="alternate"):
        render_messages([{"role": "assistant", "content": "hi"}], t)


def test_async_engine_streams_and_aborts(lm, xray_image):
    engine = AsyncLLMEngine(LLMEngine(lm, block_size=4))
    prompt = build_prompt(lm.conv_mode, "What modality is this?")
    want = expected(lm, prompt, xray_image, SamplingParams(max_tokens=12, ignore_eos=True))

    async def collect(rid: str, params: SamplingParams, stop_after: int | None = None):
        outs = []
        async for out in engine.generate(rid, prompt, [xray_image], params):
            outs.append(out)
            if stop_after is not None and len(outs) == stop_after:
                break  # the client went away: the request must be aborted
        return outs

    async def main():
        return await asyncio.gather(
            collect("a", SamplingParams(max_tokens=12, ignore_eos=True)),
            collect("b", SamplingParams(max_tokens=40, ignore_eos=True), stop_after=3),
            collect("c", SamplingParams(max_tokens=12, ignore_eos=True)),
        )

    try:
        a, b, c = asyncio.run(main())
    finally:
        engine.shutdown()
    for outs in (a, c):
        assert [o.new_token_ids[0] for o in outs] == want
        assert outs[-1].finished and outs[-1].token_ids == want
        assert "".join(o.delta_text for o in outs) == outs[-1].text
        assert not any(o.finished for o in outs[:-1])
    assert len(b) == 3 and not b[-1].finished
    assert not engine.engine.has_unfinished() and engine.engine.block_manager.all_free()


def test_async_abort_ends_the_stream(lm, xray_image):
    engine = AsyncLLMEngine(lm, block_size=4)
    prompt = build_prompt(lm.conv_mode, "Q?")

    async def main():
        outs = []
        async for out in engine.generate("x", prompt, [xray_image], SamplingParams(max_tokens=200, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 2:
                assert await engine.abort("x")
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    # Outputs already queued still arrive first; then the stream ends long before max_tokens.
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 100
    assert not any(o.finished for o in outs[:-1])
    assert engine.metrics().kv_blocks_used == 0


def test_embedding_a_generated_image_token_is_an_ordinary_token(lm):
    model = lm.model
    image_id = lm.config.image_token_id
    ids = torch.tensor([[5, image_id]])
    emb = model.embed(ids)  # no features: a decode step feeding back a generated <image>
    assert torch.equal(emb[0, 1], model.decoder.embed_tokens.weight[image_id])
    with pytest.raises(ValueError, match="image-token positions"):
        model.embed(ids, torch.zeros(1, 2, lm.config.text.hidden_size))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear_is_used_and_dropped_when_stale(dtype, bias):
    from medlava.model.decoder import Linear, PackedWeights, pack_model

    torch.manual_seed(0)
    layer = Linear(96, 160, bias=bias).to(dtype)
    if not PackedWeights.packable([layer]):
        pytest.skip("this torch has no oneDNN")
    assert pack_model(layer) and layer.packed is not None

    def same(y, want):  # bfloat16: bit-identical; float32: oneDNN's GEMM rounds differently from MKL's
        return torch.equal(y, want) if dtype == torch.bfloat16 else torch.allclose(y, want, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        for rows in (1, 3, 64, 300):
            x = torch.randn(1, rows, 96, dtype=dtype)
            y = layer(x)
            assert y.shape == (1, rows, 160) and same(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
        packed = layer.packed.weight  # the packed path is the one that runs: another weight's copy shows
        layer.packed.weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), None)
        assert torch.equal(layer(x), layer.bias.expand(1, 300, 160)) if bias else not layer(x).any()
        layer.packed.weight = packed
    with torch.no_grad():
        layer.weight.mul_(2)  # a weight changed after packing (a LoRA merge, training): the copy is stale
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)) and layer.packed is None
    x = torch.randn(4, 96, dtype=dtype, requires_grad=True)
    pack_model(layer)
    layer(x).sum().backward()  # with autograd on, the dense weight is used and gets its gradient
    assert layer.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_k_v_and_gate_up_run_as_one_gemm_each_with_the_same_outputs(model_dir, dtype):
    from medlava.model import decoder
    from medlava.model.loader import load_model

    lm = load_model(model_dir("mistral-mlp2x-l1"), dtype=dtype)
    ids = torch.randint(5, lm.config.text.vocab_size, (1, 19), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        plain = lm.model(ids)
        assert decoder.pack_model(lm.model)
        layer = lm.model.decoder.layers[0]
        assert layer.self_attn.fused.sizes == [m.out_features for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)]
        assert layer.mlp.fused is not None and layer.self_attn.q_proj.packed is None  # grouped, not packed twice
        assert lm.model.decoder.layers[0].self_attn.o_proj.packed is not None and lm.model.lm_head.packed is not None
        packed = lm.model(ids)
    tol = 1e-4 if dtype == torch.float32 else 0
    torch.testing.assert_close(packed.float(), plain.float(), rtol=tol, atol=tol)
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(2)  # one member changed: the group's copy is stale and dropped
    with torch.inference_mode():
        lm.model(ids)
    assert layer.self_attn.fused is None and layer.mlp.fused is not None


def test_the_engine_packs_weights_only_where_the_copies_fit(model_dir, monkeypatch):
    from medlava.engine import model_runner
    from medlava.model.decoder import packing_groups
    from medlava.model.loader import load_model

    for room, packs in ((1 << 40, True), (1 << 10, False)):
        lm = load_model(model_dir("mistral-mlp2x-l1"), dtype="bfloat16")
        monkeypatch.setattr(model_runner, "available_bytes", lambda room=room: room)
        engine = LLMEngine(lm, block_size=4)
        assert engine.runner.packed_weights is packs
        assert all((getattr(owner, attr) is not None) is packs for owner, attr, _ in packing_groups(lm.model))
        if packs:  # a second engine on the same model packs nothing again
            before = [getattr(owner, attr) for owner, attr, _ in packing_groups(lm.model)]
            assert LLMEngine(lm, block_size=4).runner.packed_weights
            assert [getattr(owner, attr) for owner, attr, _ in packing_groups(lm.model)] == before


def test_placed_weights_lie_side_by_side_and_one_row_reads_them_there(model_dir, cpu_kernels):
    from medlava.host_memory import HUGE_PAGE
    from medlava.model import decoder

    lm = load_model(model_dir("mistral-mlp2x-l1"), dtype="bfloat16")
    engine = LLMEngine(lm, block_size=4)  # places the weights, then packs
    attn = lm.model.decoder.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert engine.runner.packed_weights and attn.fused.plain is not None
    assert torch.equal(attn.fused.plain, torch.cat([q, k, v])) and attn.fused.plain.data_ptr() == q.data_ptr()
    assert q.data_ptr() % HUGE_PAGE == 0  # the first group opens the 2 MB-aligned block
    d = lm.config.text.hidden_size
    one, many = torch.randn(1, 1, d, dtype=torch.bfloat16), torch.randn(1, 8, d, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = torch.nn.functional.linear(one, attn.fused.plain)
        attn.fused.weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(attn.fused.plain), None)
        torch.testing.assert_close(attn.fused(one), want, rtol=2**-7, atol=1e-3)  # the plain weights, by the gemv
        assert not attn.fused(many).any()  # eight rows: oneDNN's (zeroed) copy
    placed = [w.data_ptr() for w in (q, k, v)]
    decoder.place_weights(lm.model)  # once per model
    assert [w.data_ptr() for w in (q, k, v)] == placed


def test_analyzer_answers_a_worklist_on_the_engine_as_the_reference_loop_does(model_dir):
    from medlava.analysis.inputs import prepare
    from medlava.analysis.vqa import Analyzer

    samples = Path(__file__).resolve().parent.parent / "samples"
    analyzer = Analyzer(model_dir("mistral-mlp2x-l1"), block_size=4)
    items = [(samples / "head_ct.dcm", "Any bleed?"), (samples / "chest_xray.dcm", "Effusion?"),
             (samples / "head_ct.dcm", "What modality is this?")]
    params = SamplingParams(max_tokens=6)
    answers = analyzer.ask_many(items, params)
    lm = analyzer.lm
    for (image, question), answer in zip(items, answers, strict=True):
        inp = prepare(lm, image, question)
        ref = generate_reference(lm.model, lm.tokenizer, inp.input_ids, replace(params, stop=list(get_template(lm.conv_mode).stop)), inp.pixels)
        assert answer.token_ids == ref.token_ids and answer.answer == ref.text.strip()
        assert answer.prompt == inp.prompt and answer.modality == inp.study.modality
    assert answers[2].token_ids == analyzer.ask(*items[2], params).token_ids
    assert analyzer.llm.metrics().cached_prompt_tokens > 0  # the second CT question reused the first's prefix
    with pytest.raises(ValueError, match="question is empty"):
        analyzer.ask_many([items[0], (items[1][0], " ")])
    assert analyzer.llm.engine.block_manager.all_free()

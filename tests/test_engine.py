"""The paged engine against the reference loop: same greedy tokens under batching, prefix caching,
preemption and sliding windows; blocks freed; aborts; image-aware prefix and vision caches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from medlava.engine.llm_engine import LLMEngine
from medlava.engine.reference import generate_reference
from medlava.engine.sampling import SamplingParams
from medlava.model.loader import load_model
from medlava.model.random_init import save_random_llava

QUESTIONS = [
    "What is this?",
    "Is there a nodule in the right lung? Describe the findings.",
    "Findings:",
    "Is there a pleural effusion or cardiomegaly on this chest radiograph?",
    "CT of the head.",
]


@pytest.fixture(scope="module")
def llama(model_dir):
    return load_model(model_dir("llama-mlp2x-l2"))


@pytest.fixture(scope="module")
def mistral_sw(tmp_path_factory):
    """Mistral with a sliding window shorter than the prompts, and 16 tokens per image."""
    path = save_random_llava(
        tmp_path_factory.mktemp("mistral-sw"), text_model="mistral", image_size=56, patch_size=14, seed=11
    )
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["text_config"]["sliding_window"] = 12
    cfg_file.write_text(json.dumps(cfg))
    lm = load_model(path)
    assert lm.config.text.sliding_window == 12 and lm.config.image_tokens == 16
    return lm


@dataclass
class Req:
    question: str
    images: list[int]  # indices into the image list
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16, ignore_eos=True))
    add_at: int = 0  # engine step before which the request is added


def images_for(lm, n: int = 4) -> list[torch.Tensor]:
    size = lm.config.vision.image_size
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(3, size, size, generator=gen) for _ in range(n)]


def prompt_ids(lm, question: str, n_images: int) -> list[int]:
    n = lm.config.image_tokens
    return lm.tokenizer(f"USER: {('<image>' * n + chr(10)) * n_images}{question} ASSISTANT:").input_ids


def reference(lm, req: Req, images) -> list[int]:
    pixels = torch.stack([images[i] for i in req.images]) if req.images else None
    ids = prompt_ids(lm, req.question, len(req.images))
    return generate_reference(lm.model, lm.tokenizer, ids, req.params, pixels=pixels).token_ids


def run(engine: LLMEngine, lm, reqs: list[Req], images, abort: dict[str, int] | None = None) -> dict:
    """Drive the engine step by step, adding requests at their step; returns finished outputs by id."""
    pending = sorted(enumerate(reqs), key=lambda x: x[1].add_at)
    done, step = {}, 0
    abort = dict(abort or {})
    while pending or engine.has_unfinished():
        while pending and pending[0][1].add_at <= step:
            i, r = pending.pop(0)
            engine.add_request(f"r{i}", prompt_ids(lm, r.question, len(r.images)), [images[k] for k in r.images], r.params)
        for rid, at in list(abort.items()):
            if at <= step:
                assert engine.abort(rid)
                del abort[rid]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


MIXED = [
    Req(QUESTIONS[0], [0]),
    Req(QUESTIONS[1], [1]),
    Req(QUESTIONS[2], [0], add_at=2),  # same image as r0, added while r0 decodes
    Req(QUESTIONS[3], [], add_at=3),  # text only
    Req(QUESTIONS[4], [2, 3], add_at=5),  # two images
    Req(QUESTIONS[1], [0], SamplingParams(max_tokens=7, ignore_eos=True), add_at=5),
]


@pytest.mark.parametrize("attention", ["cpu-kernel", "torch"])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
@pytest.mark.parametrize("pool", ["roomy", "tight"])
@pytest.mark.parametrize("which", ["llama", "mistral_sw"])
def test_greedy_matches_reference(request, monkeypatch, which, pool, caching, attention):
    import medlava.engine.model_runner as runner_module
    from medlava import kernels

    lm = request.getfixturevalue(which)
    if attention == "torch":  # the portable path (CUDA, or a CPU without a C++ compiler)
        monkeypatch.setattr(kernels, "ops", lambda: None)
    elif kernels.ops() is None:
        pytest.skip("medlava's CPU kernels could not be built here")
    # Decode attends over shared prefixes (r0, r2 and r5 share an image) from one block on.
    monkeypatch.setattr("medlava.engine.paged_attention.MIN_SHARED_TOKENS", 4)
    shared, plan = [], runner_module.shared_prefixes

    def spy(*args):
        groups = plan(*args)
        shared.extend(groups)
        return groups

    monkeypatch.setattr(runner_module, "shared_prefixes", spy)
    images = images_for(lm)
    expected = {f"r{i}": reference(lm, r, images) for i, r in enumerate(MIXED)}
    prompt_len = [len(prompt_ids(lm, r.question, len(r.images))) for r in MIXED]
    need = [-(-(n + r.params.max_tokens - 1) // 4) for n, r in zip(prompt_len, MIXED, strict=True)]
    # "tight": the first two prompts fit together, but not as they grow: forces preemption.
    tight = max(max(need), -(-prompt_len[0] // 4) - (-prompt_len[1] // 4) + 1)
    num_blocks = None if pool == "roomy" else tight
    engine = LLMEngine(lm, block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching)
    assert (engine.runner.kernels is not None) is (attention == "cpu-kernel")
    if pool == "roomy":  # the pool starts as garbage: unused slots that attention masks out must still be harmless
        engine.runner.pool.k.fill_(float("nan"))
        engine.runner.pool.v.fill_(float("nan"))
    done = run(engine, lm, MIXED, images)
    assert {rid: out.token_ids for rid, out in done.items()} == expected
    assert all(out.finish_reason == "length" for out in done.values())
    m = engine.metrics()
    if pool == "tight":
        assert m.preemptions > 0
    if caching:
        assert m.cached_prompt_tokens > 0  # r2 and r5 share r0's image
        # Groups are formed for the kernel only; mistral_sw's window (12) is shorter than every prompt.
        assert bool(shared) is (attention == "cpu-kernel" and which == "llama")
    else:
        assert m.cached_prompt_tokens == 0
    assert engine.block_manager.all_free() and m.kv_blocks_used == 0 and m.running == m.waiting == 0


def test_abort_frees_blocks_at_once_and_others_finish_unchanged(llama):
    images = images_for(llama)
    reqs = [Req(QUESTIONS[i], [i]) for i in range(3)]
    engine = LLMEngine(llama, block_size=4, enable_prefix_caching=False)
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", prompt_ids(llama, r.question, 1), [images[i]], r.params)
    for _ in range(4):
        engine.step()
    victim = engine.requests["r1"]
    held = len(victim.block_table)
    used = engine.block_manager.num_used_blocks
    assert engine.abort("r1") and not engine.abort("r1")
    assert engine.block_manager.num_used_blocks == used - held
    assert victim.finish_reason == "abort" and not victim.block_table
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert set(done) == {"r0", "r2"}
    assert done["r0"].token_ids == reference(llama, reqs[0], images)
    assert done["r2"].token_ids == reference(llama, reqs[2], images)
    assert engine.block_manager.all_free()


def test_abort_of_a_waiting_request(llama):
    images = images_for(llama)
    engine = LLMEngine(llama, block_size=4, max_num_seqs=1)
    engine.add_request("a", prompt_ids(llama, "x", 1), [images[0]], SamplingParams(max_tokens=4))
    engine.add_request("b", prompt_ids(llama, "y", 1), [images[1]], SamplingParams(max_tokens=4))
    engine.step()
    assert engine.metrics().waiting == 1
    assert engine.abort("b")
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.all_free()


def common_start(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_follow_up_on_same_image_reuses_blocks_and_vision_features(mistral_sw):
    lm = mistral_sw
    images = images_for(lm)
    n_img = lm.config.image_tokens
    engine = LLMEngine(lm, block_size=16)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    stats = engine.runner.stats

    def ask(ids: list[int], image: int) -> int:
        """Run one request alone; checks its tokens against the reference loop, returns its cached tokens."""
        engine.add_request(f"q{stats.prefill_steps}", ids, [images[image]], params)
        done = {}
        while engine.has_unfinished():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        (out,) = done.values()
        expected = generate_reference(lm.model, lm.tokenizer, ids, params, pixels=images[image][None])
        assert out.token_ids == expected.token_ids
        return out.metrics.cached_prompt_tokens

    first = prompt_ids(lm, QUESTIONS[1], 1)
    assert ask(first, 0) == 0 and stats.images_encoded == 1
    image_start = first.index(lm.config.image_token_id)

    # A follow-up on the same image reuses every position the two prompts share: the full blocks,
    # then the shared start of the block where they part (the rest of the image, the text after it).
    follow_up = prompt_ids(lm, QUESTIONS[0], 1)
    shared = common_start(first, follow_up)
    assert shared > image_start + n_img and shared % 16 != 0
    lookups = stats.vision_lookups
    assert ask(follow_up, 0) == shared
    assert stats.vision_lookups == lookups  # the whole image came from the KV cache

    # The same image after other text: the prefix cache has only the words before the first
    # difference, the image's features come from the vision cache, not the vision tower.
    preamble = lm.tokenizer(f"USER: Compare. {'<image>' * n_img}\n{QUESTIONS[0]} ASSISTANT:").input_ids
    assert ask(preamble, 0) == common_start(first, preamble) <= image_start
    assert stats.images_encoded == 1 and engine.metrics().vision_cache_hit_rate > 0

    # A different image with the same text shares only the text before the image: placeholder ids
    # are the same for every image, so a partial match never runs into an image's positions.
    assert ask(first, 1) <= image_start
    assert stats.images_encoded == 2
    m = engine.metrics()
    assert 0 < m.prefix_cache_hit_rate < 1 and engine.block_manager.all_free()


@pytest.mark.parametrize("attention", ["cpu-kernel", "torch"])
def test_questions_on_one_image_prefilled_together_copy_from_the_first(llama, monkeypatch, attention):
    """Follow-ups scheduled in the same step as the first question on their image copy the block
    where their prompt parts from it, though that block's K/V is computed in this very step."""
    from medlava import kernels

    if attention == "torch":
        monkeypatch.setattr(kernels, "ops", lambda: None)
    elif kernels.ops() is None:
        pytest.skip("medlava's CPU kernels could not be built here")
    images = images_for(llama)
    reqs = [Req(QUESTIONS[i], [0]) for i in (1, 0, 3)]
    engine = LLMEngine(llama, block_size=5)
    assert (engine.runner.kernels is not None) is (attention == "cpu-kernel")
    done = run(engine, llama, reqs, images)
    first = prompt_ids(llama, reqs[0].question, 1)
    shared = [common_start(first, prompt_ids(llama, r.question, 1)) for r in reqs[1:]]
    assert all(n % 5 != 0 for n in shared)  # each parts from the first inside a block
    assert [done[f"r{i}"].metrics.cached_prompt_tokens for i in (1, 2)] == shared
    for i, r in enumerate(reqs):
        assert done[f"r{i}"].token_ids == reference(llama, r, images)
    assert engine.runner.stats.prefill_steps == 1 and engine.block_manager.all_free()


def test_seeded_sampling_is_reproducible_regardless_of_batch(llama):
    images = images_for(llama)
    seeded = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    alone = run(LLMEngine(llama, block_size=4), llama, [Req(QUESTIONS[0], [0], seeded)], images)["r0"]
    crowd = [
        Req(QUESTIONS[1], [1]),
        Req(QUESTIONS[2], [2], SamplingParams(temperature=1.3, seed=99, max_tokens=12, ignore_eos=True)),
        Req(QUESTIONS[0], [0], seeded, add_at=2),
        Req(QUESTIONS[3], [3], SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True), add_at=3),
    ]
    together = run(LLMEngine(llama, block_size=4), llama, crowd, images)["r2"]
    assert together.token_ids == alone.token_ids
    reseeded = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=8, max_tokens=12, ignore_eos=True)
    other = run(LLMEngine(llama, block_size=4), llama, [Req(QUESTIONS[0], [0], reseeded)], images)["r0"]
    assert other.token_ids != alone.token_ids


def test_stopping_rules_match_reference(llama):
    images = images_for(llama)
    free = reference(llama, Req(QUESTIONS[0], [0], SamplingParams(max_tokens=16, ignore_eos=True)), images)
    text = llama.tokenizer.decode(free, skip_special_tokens=True)
    stop_text = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop_text.strip()
    cases = [
        SamplingParams(max_tokens=16, stop_token_ids=[free[5]]),
        SamplingParams(max_tokens=16, stop=[stop_text], ignore_eos=True),
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=16, stop=["never appears"], ignore_eos=True),
    ]
    reqs = [Req(QUESTIONS[0], [0], p) for p in cases]
    engine = LLMEngine(llama, block_size=4)
    done = run(engine, llama, reqs, images)
    for i, r in enumerate(reqs):
        ids = prompt_ids(llama, r.question, 1)
        ref = generate_reference(llama.model, llama.tokenizer, ids, r.params, pixels=images[0][None])
        out = done[f"r{i}"]
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    assert done["r0"].finish_reason == "stop" and done["r0"].token_ids[-1] == free[5]
    assert done["r1"].finish_reason == "stop" and stop_text not in done["r1"].text
    assert done["r2"].finish_reason == "length" and len(done["r2"].token_ids) == 3


def test_eos_stops_unless_ignored(model_dir):
    lm = load_model(model_dir("llama-mlp2x-l2"))  # its own copy: the EOS id is changed below
    images = images_for(lm)
    free = reference(lm, Req(QUESTIONS[2], [1], SamplingParams(max_tokens=12, ignore_eos=True)), images)
    lm.model.config.text.eos_token_id = free[4]  # make a token the model emits the EOS
    lm.tokenizer.eos_token_id  # noqa: B018 (the tokenizer's own EOS stays an EOS too)
    reqs = [Req(QUESTIONS[2], [1], SamplingParams(max_tokens=12)), Req(QUESTIONS[2], [1])]
    reqs[1].params = SamplingParams(max_tokens=12, ignore_eos=True)
    done = run(LLMEngine(lm, block_size=4), lm, reqs, images)
    ref = generate_reference(lm.model, lm.tokenizer, prompt_ids(lm, QUESTIONS[2], 1), reqs[0].params, images[1][None])
    assert done["r0"].finish_reason == "stop" and done["r0"].token_ids == ref.token_ids
    assert done["r0"].token_ids[-1] == free[4] and done["r0"].text == ref.text
    assert done["r1"].token_ids == free and done["r1"].finish_reason == "length"


def test_streamed_deltas_add_up_to_the_text_without_the_stop_string(llama):
    images = images_for(llama)
    free = reference(llama, Req(QUESTIONS[1], [2], SamplingParams(max_tokens=20, ignore_eos=True)), images)
    text = llama.tokenizer.decode(free, skip_special_tokens=True)
    stop = text[-6:-3]
    engine = LLMEngine(llama, block_size=4)
    engine.add_request(
        "s", prompt_ids(llama, QUESTIONS[1], 1), [images[2]], SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True)
    )
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            last = out
    assert last.finished and last.finish_reason == "stop"
    assert "".join(deltas) == last.text == text[: text.find(stop)]


def test_requests_that_cannot_fit_are_refused_clearly(llama):
    engine = LLMEngine(llama, block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", prompt_ids(llama, QUESTIONS[1], 0), [], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="image-token positions"):
        engine.add_request("x", prompt_ids(llama, "hi", 1), [], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="no room"):
        LLMEngine(llama).add_request("y", [5] * llama.config.text.max_position_embeddings)
    engine.add_request("ok", [1, 5, 6], None, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1, 5, 6])


def test_a_failed_step_is_retried_from_scratch(llama, monkeypatch):
    images = images_for(llama)
    reqs = [Req(QUESTIONS[0], [0]), Req(QUESTIONS[2], [0], add_at=1)]
    engine = LLMEngine(llama, block_size=4)
    real_run, calls = engine.runner.run, {"n": 0}

    def flaky(seqs, is_prefill):
        calls["n"] += 1
        if calls["n"] in (2, 5):
            raise RuntimeError("out of memory")
        return real_run(seqs, is_prefill)

    monkeypatch.setattr(engine.runner, "run", flaky)
    pending = list(enumerate(reqs))
    done, step = {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1].add_at <= step:
            i, r = pending.pop(0)
            engine.add_request(f"r{i}", prompt_ids(llama, r.question, 1), [images[0]], r.params)
        try:
            done |= {o.request_id: o for o in engine.step() if o.finished}
        except RuntimeError:  # the step's sequences went back to the queue without blocks
            assert engine.scheduler.waiting and all(not s.block_table for s in engine.scheduler.waiting)
        step += 1
    assert {k: v.token_ids for k, v in done.items()} == {f"r{i}": reference(llama, r, images) for i, r in enumerate(reqs)}
    assert engine.block_manager.all_free()

"""`medlava ask` and `medlava convert` end to end, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlava.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("image", ["chest_xray.dcm", "head_ct.dcm", "chest_xray.png"])
def test_ask_answers_with_json(model_dir, image):
    model = model_dir("mistral-mlp2x-l1")
    result = invoke("ask", SAMPLES / image, "What modality is this?", "--model", model, "--max-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt"] == "USER: <image>\nWhat modality is this? ASSISTANT:"
    assert 1 <= len(out["token_ids"]) <= 8
    assert isinstance(out["answer"], str) and out["model"] == model.name
    assert out["modality"] == ("OT" if image.endswith(".png") else "CT" if "ct" in image else "DX")


def test_ask_plain_text_and_window(model_dir):
    model = model_dir("mistral-mlp2x-l1")
    args = ["ask", SAMPLES / "head_ct.dcm", "Any bleed?", "--model", model, "--max-tokens", "5"]
    plain = invoke(*args, "--window", "brain")
    as_json = json.loads(invoke(*args, "--window", "brain", "--json").stdout)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == as_json["answer"] + "\n"
    # The window changes the pixels the model sees, so it changes what it generates.
    bone = json.loads(invoke(*args, "--window", "bone", "--json").stdout)
    assert bone["token_ids"] != as_json["token_ids"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["ask", "missing.dcm", "q", "--model", "{model}"], "no such file"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "/nonexistent/model"], "model folder not found"),
        (["ask", str(SAMPLES / "head_ct.dcm"), "q", "--model", "{model}", "--window", "lungs"], "unknown window"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "  ", "--model", "{model}"], "question is empty"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "{model}", "--conv-mode", "x"], "unknown conversation"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "{model}", "--device", "tpu"], "unknown device"),
        (["bench", "--dtype", "float16"], "--dtype must be float32 or bfloat16"),
        (["bench", "--peer", "sglang"], "--peer must be vllm"),
        (["bench", "--quantization", "fp8"], "unknown quantization 'fp8'"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "{model}", "--quantization", "int3"],
         "unknown quantization 'int3'"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "{model}", "--kv-cache-memory", "1K"],
         "holds no KV block"),
        (["ask", str(SAMPLES / "chest_xray.dcm"), "q", "--model", "{model}", "--kv-cache-memory", "64K"],
         "raise kv_cache_memory"),
        (["serve", "--backend", "tgi"], "unknown backend 'tgi'"),
        (["serve", "--tensor-parallel-size", "2"], "go with --backend vllm"),
        (["serve", "--backend", "vllm"], "--backend vllm needs --model FOLDER"),
        (["serve", "--backend", "vllm", "--model", "{model}", "--replicas", "2"], "--replicas runs medlava's engine"),
        (["serve", "--backend", "vllm", "--model", "{model}", "--quantization", "int8"], "are medlava's engine's"),
        (["serve", "--max-replicas", "3"], "--max-replicas goes with --replicas N"),
        (["serve", "--ray-address", "127.0.0.1:6379"], "--ray-address with --replicas N or --backend vllm"),
        (["serve", "--replicas", "2", "--max-replicas", "1"], "--max-replicas at least --replicas"),
        (["serve", "--replicas", "2", "--routing", "hash"], "unknown routing 'hash'"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(model_dir, args, words):
    model = model_dir("mistral-mlp2x-l1")
    result = invoke(*[a.replace("{model}", str(model)) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert "Traceback" not in result.output


def test_serve_backend_vllm_without_vllm_says_how_to_get_it(model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here (tests/test_vllm_backend.py covers the backend)")
    result = invoke("serve", "--backend", "vllm", "--model", model_dir("mistral-mlp2x-l1"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --backend vllm needs vLLM: pip install 'medlava[vllm]' on a CUDA machine, or "
        "bash bench/peers/setup_vllm.sh --with-medlava for vLLM's CPU build"]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_ask_runs_on_quantized_weights(model_dir, method):
    model = model_dir("mistral-mlp2x-l1")
    result = invoke("ask", SAMPLES / "chest_xray.png", "Where?", "--model", model, "--max-tokens", "4",
                    "--quantization", method, "--json")
    assert result.exit_code == 0, result.output
    assert 1 <= len(json.loads(result.stdout)["token_ids"]) <= 4


def test_kv_cache_memory_takes_sizes(model_dir):
    model = model_dir("mistral-mlp2x-l1")
    ok = invoke("ask", SAMPLES / "chest_xray.png", "Where?", "--model", model, "--max-tokens", "3",
                "--kv-cache-memory", "8MiB", "--json")
    assert ok.exit_code == 0, ok.output
    bad = invoke("ask", SAMPLES / "chest_xray.png", "Where?", "--model", model, "--kv-cache-memory", "lots")
    assert bad.exit_code == 2 and "not a positive size" in bad.output


def test_text_file_renamed_dcm(model_dir, tmp_path):
    fake = tmp_path / "notes.dcm"
    fake.write_text("patient notes, not an image")
    result = invoke("ask", fake, "q", "--model", model_dir("mistral-mlp2x-l1"))
    assert result.exit_code == 2 and "not a DICOM file" in result.stderr


def test_convert_refuses_non_empty_destination(model_dir, tmp_path):
    (tmp_path / "x").write_text("keep me")
    result = invoke("convert", model_dir("mistral-mlp2x-l1"), tmp_path)
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (tmp_path / "x").read_text() == "keep me"


def test_convert_then_ask(model_dir, tmp_path):
    out = tmp_path / "hf"
    result = invoke("convert", model_dir("mistral-mlp2x-l1"), out)
    assert result.exit_code == 0, result.output
    a = invoke("ask", SAMPLES / "chest_xray.png", "Where?", "--model", model_dir("mistral-mlp2x-l1"), "--json", "--max-tokens", "6")
    b = invoke("ask", SAMPLES / "chest_xray.png", "Where?", "--model", out, "--json", "--max-tokens", "6")
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_every_documented_command_is_there():
    """The commands the README documents (a lost command once slipped through unnoticed)."""
    for command in (["ask"], ["convert"], ["synth"], ["train", "align"], ["train", "instruct"], ["train", "init"],
                    ["train", "vision"], ["eval", "vqa"], ["eval", "score"], ["bench"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0, command


@pytest.mark.slow
def test_bench_quick_prints_the_table_and_json_rows(tmp_path):
    result = invoke("bench", "--quick", "--dtype", "float32", "--model-dir", tmp_path / "model")
    assert result.exit_code == 0, result.output
    assert "(c) medlava engine, all at once" in result.stdout and "follow-up TTFT / first" in result.stdout

    result = invoke("bench", "--quick", "--dtype", "float32", "--model-dir", tmp_path / "model", "--json",
                    "--quantization", "int8")
    assert result.exit_code == 0, result.output
    assert "(c) medlava engine, all at once" in result.stderr  # the log, apart from the rows
    assert "(c) medlava engine, int8 weights" in result.stderr
    rows = json.loads(result.stdout)
    assert [(r["mode"], r["dtype"], r["quantization"]) for r in rows] == [
        ("hf_one", "float32", None), ("hf_static", "float32", None), ("medlava", "float32", None),
        ("medlava", "float32", "int8"),
    ]
    medlava = rows[2]
    assert medlava["tok_per_s"] > 0 and medlava["peak_rss_mb"] > 0 and 0 < medlava["follow_up_ttft_ratio"] < 1
    assert all(r["ttft_p50_s"] > 0 for r in rows)

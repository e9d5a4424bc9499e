"""`medlava serve --backend vllm`: the demo model on vLLM's engine, asked through the real `openai`
SDK with a real DICOM file as a data URL. Runs only where `vllm` imports (vLLM's CPU build:
`bash bench/peers/setup_vllm.sh --with-medlava`, then
`bench/peers/.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py`); not part of `make test`.

Greedy answers must equal medlava's own engine's on the same folder and dtype: the same template,
token ids, image padding and pixels reach both models."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pydicom
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash bench/peers/setup_vllm.sh --with-medlava)")

import openai  # noqa: E402

from medlava import Analyzer, SamplingParams  # noqa: E402
from medlava.chat.tokenize import tokenize_prompt  # noqa: E402
from medlava.model.demo import DEMO_MODEL  # noqa: E402
from tests.test_serve import DICOM, data_url, free_port, image_message  # noqa: E402
from tests.test_webui import ask_in_browser, browser, words  # noqa: E402, F401 (the fixture)

DICOM_URL = data_url(DICOM, "application/dicom")
QUESTIONS = ["Is there a pleural effusion on this film?", "Which side is it on?", "What modality is this?",
             "Describe the findings."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`medlava serve --backend vllm` as a user runs it, in its own process; yields (url, log path)."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medlava", "serve", "--backend", "vllm", "--model", str(DEMO_MODEL),
             "--dtype", "float32", "--port", str(port), "--ui"], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the vLLM backend did not come up"
        time.sleep(2)
    yield url, log
    proc.terminate()
    proc.wait(timeout=120)


def test_openai_sdk_with_a_dicom_answers_as_medlavas_engine(server, browser):  # noqa: F811
    url, log = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    local = Analyzer(DEMO_MODEL, dtype="float32")
    cfg = local.lm.config
    for question in QUESTIONS:
        reply = client.chat.completions.create(model=model, messages=image_message(DICOM_URL, question), max_tokens=64)
        mine = local.ask(DICOM, question, SamplingParams(max_tokens=64))
        assert reply.choices[0].message.content == mine.answer, question
        # medlava's prompt, its image expanded to the tokens medlava's model gets, is what vLLM's ran
        assert reply.usage.prompt_tokens == len(tokenize_prompt(local.lm.tokenizer, mine.prompt, cfg.image_token_id,
                                                                cfg.image_tokens))
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=image_message(DICOM_URL, question), max_tokens=64, stream=True))
        assert streamed == mine.answer
        print(f"{question!r}: vLLM {reply.choices[0].message.content!r} = medlava {mine.answer!r}, "
              f"{reply.usage.prompt_tokens} prompt tokens")

    # Past the end of the answer too (EOS ignored): 48 tokens of the same greedy path.
    long = client.chat.completions.create(model=model, messages=image_message(DICOM_URL, QUESTIONS[3]), max_tokens=48,
                                          extra_body={"ignore_eos": True})
    mine = local.ask(DICOM, QUESTIONS[3], SamplingParams(max_tokens=48, ignore_eos=True))
    assert long.usage.completion_tokens == len(mine.token_ids) == 48 and long.choices[0].message.content == mine.answer
    print(f"EOS ignored, 48 tokens: {long.choices[0].message.content!r}")

    # The web UI on top of vLLM: the same answer in the page.
    bots = ask_in_browser(browser, url, DICOM, QUESTIONS[0])
    assert words(bots[-1]) == words(local.ask(DICOM, QUESTIONS[0], SamplingParams(max_tokens=64)).answer), bots

    # Reports and localisation on top (medlava's engine over the same folder, loaded on first use).
    body = {"model": model, "image": DICOM_URL, "grounding": "none"}
    report = httpx.post(f"{url}/v1/reports", json=body | {"format": "fhir"}, timeout=300)
    assert report.status_code == 200 and report.json()["resourceType"] == "Bundle"

    # Bad input: a 4xx JSON error, and the server keeps serving.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=image_message(DICOM_URL, "why " * 3000), max_tokens=8)
    assert client.chat.completions.create(model=model, messages=image_message(DICOM_URL, QUESTIONS[0]), max_tokens=4).choices

    # No patient identifier reached the server's log (vLLM's included).
    ds = pydicom.dcmread(DICOM)
    text = log.read_text()
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value and value not in text

"""`medlava chat`: scripted from stdin, on the local demo model and on a running server."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlava import Analyzer, SamplingParams
from medlava.cli import app
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm_engine import LLMEngine
from medlava.model.demo import DEMO_MODEL
from medlava.serve.api import create_app
from medlava.serve.chat_cli import LocalChat
from tests.test_serve import start_server

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is missing")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DICOM, NIFTI = str(SAMPLES / "phantom_chest_effusion.dcm"), str(SAMPLES / "phantom_brain_mass.nii.gz")
Q1, Q2 = "Which side is the pleural effusion on?", "What modality is this?"
runner = CliRunner()


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer()


def lines(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_piped_questions_get_one_answer_each_the_first_equal_to_ask():
    asked = lines(runner.invoke(app, ["ask", DICOM, Q1]))
    answers = lines(runner.invoke(app, ["chat", DICOM], input=f"{Q1}\n\n{Q2}\n"))
    assert len(answers) == 2  # the blank line is skipped
    assert answers[0] == asked[0]
    assert answers[1] == "x-ray"


def test_history_is_kept_and_streamed_pieces_join_to_the_answer(analyzer):
    session = LocalChat(analyzer, _study(DICOM), SamplingParams())
    first = list(session.send(Q1))
    second = "".join(session.send(Q2))
    assert session.history == [(Q1, "".join(first)), (Q2, second)]
    # The second turn is asked with the first in its prompt, exactly as the chat messages say.
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _study(DICOM)}, {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": "".join(first)},
        {"role": "user", "content": Q2},
    ]
    out = analyzer.llm.chat(messages, SamplingParams(stop=["</s>"]), use_tqdm=False)[0]
    assert second == out.text.strip()


def test_a_volume_is_read_on_asks_slice_then_kept(analyzer):
    q = "What abnormality is seen?"
    answer = analyzer.ask(_study(NIFTI), q)
    session = LocalChat(analyzer, _study(NIFTI), SamplingParams())
    assert "".join(session.send(q)) == answer.answer
    assert len(session.study.images) == 1  # the rest of the conversation looks at that slice
    assert "".join(session.send("What modality is this?")) == "mri"


def test_remote_chat_through_the_server_matches_the_local_one(analyzer):
    app_ = create_app(AsyncLLMEngine(LLMEngine(analyzer.lm)), api_keys=["k1"])
    local = lines(runner.invoke(app, ["chat", DICOM], input=f"{Q1}\n{Q2}\n"))
    with start_server(app_) as port:
        remote = lines(runner.invoke(app, ["chat", DICOM, "--url", f"http://127.0.0.1:{port}", "--api-key", "k1"],
                                     input=f"{Q1}\n{Q2}\n"))
        refused = runner.invoke(app, ["chat", DICOM, "--url", f"http://127.0.0.1:{port}", "--api-key", "bad"],
                                input=f"{Q1}\n")
    assert remote == local
    assert refused.exit_code == 2 and "401" in refused.stderr and len(refused.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "EMPTY"], "no"),  # an empty folder
        (["chat", __file__], "not"),  # not an image
        (["chat", DICOM, "--url", "http://127.0.0.1:9", "--model", "x"], "--url"),
        (["chat", DICOM, "--url", "http://127.0.0.1:9"], "cannot reach the server"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    result = runner.invoke(app, args, input=f"{Q1}\n")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def _study(path: str):
    from medlava.imaging import load_study

    return load_study(path, key_slices=None)

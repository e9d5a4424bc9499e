"""The GPT-review judge against a local OpenAI-compatible stub (loopback only), and its summary."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from medlava.cli import app
from medlava.errors import MedlavaError
from medlava.eval.judge import SYSTEM_MESSAGE, parse_scores, review_messages, run_judge, summarize

runner = CliRunner()


class Stub:
    """A chat-completions endpoint on 127.0.0.1 that records each request body and plays a script of
    (status, reply) pairs; once the script is spent it answers "8 7"."""

    def __init__(self, script=()):
        self.script = list(script)
        self.received: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.received.append(body)
                status, reply = stub.script.pop(0) if stub.script else (200, "8 7\nBoth fine.")
                if status == 200:
                    data = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    data = {"error": {"message": reply, "type": "x", "code": status}}
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("retry-after-ms", "5")  # the SDK's backoff honours it: keeps the test fast
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def questions() -> list[dict]:
    """Rows shaped like LLaVA-Med's llava_med_eval_qa50_qa.jsonl (and one VQA-style row with `answer`)."""
    return [
        {"question_id": 1, "image": "a.jpg", "text": "What does the image show?\n<image>", "fig_label": "Figure 2",
         "fig_caption": "Chest radiograph with a right pleural effusion.", "in_text_mention": "An effusion [Figure 2].",
         "gpt4_answer": "A right pleural effusion.", "type": "conversation",
         "domain": {"chest_xray": True, "mri": False, "histology": False, "gross": False, "ct_scan": False}},
        {"question_id": 2, "image": "b.jpg", "text": "Describe the image.\n<image>", "fig_label": "Figure 1",
         "fig_caption": "Axial MRI.", "in_text_mention": "See [Figure 1].", "gpt4_answer": "An axial MRI.",
         "type": "detailed_description",
         "domain": {"chest_xray": False, "mri": True, "histology": False, "gross": False, "ct_scan": False}},
        {"question_id": 3, "image": "c.png", "text": "Is there a nodule?", "answer": "yes", "answer_type": "CLOSED"},
    ]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_prompt_is_llava_meds_byte_for_byte():
    messages = review_messages(questions()[0], "There is fluid on the right.")
    # sha256 of the system and user messages LLaVA-Med's own compare_messages_gen (eval_multimodal_chat_gpt_score.py
    # at microsoft/LLaVA-Med HEAD) builds for exactly these inputs, computed from its source.
    assert [m["role"] for m in messages] == ["system", "user"]
    assert SYSTEM_MESSAGE.startswith("'You are a helpful")  # its stray leading quote is part of the protocol
    assert hashlib.sha256(messages[0]["content"].encode()).hexdigest() == (
        "0a255bcc5ff97a82c59c03c6e7980547d00043bf24cd6dbb2dfe28cf1acbe62b")
    assert hashlib.sha256(messages[1]["content"].encode()).hexdigest() == (
        "40f50c42e06c8303f88519803a487437836da91d04ab0c6426d0b8a87b4e9628")
    assert messages[1]["content"].startswith(
        "[Context]\nFigure Caption:\nFigure 2: Chest radiograph with a right pleural effusion.\n\n"
        "Figure Context:\n\t- An effusion [Figure 2].\n\n[Question]\nWhat does the image show?\n<image>\n\n"
        "[Assistant 1]\nA right pleural effusion.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nThere is fluid on the right.\n\n[End of Assistant 2]\n\n[System]\nWe would like to request")


def test_parse_scores():
    assert parse_scores("8 6\nBecause.") == (8.0, 6.0)
    assert parse_scores("  7.5 9\n") == (7.5, 9.0)
    for bad in ("Assistant 1: 8\nAssistant 2: 6", "8\n6", "8 6 5", "", "nan 3"):
        assert parse_scores(bad) is None, bad


def test_judge_sends_the_prompt_pairs_by_id_and_resumes(tmp_path):
    q = write(tmp_path / "q.jsonl", questions())
    # Answers in another order than the questions, and question 3 not answered yet: pairing is by question_id.
    a = write(tmp_path / "a.jsonl", [{"question_id": 2, "text": "An MRI.", "answer_id": "x2"},
                                     {"question_id": 1, "text": "Fluid on the right.", "answer_id": "x1"}])
    reviews = tmp_path / "r.jsonl"
    with Stub() as stub:
        result = runner.invoke(app, ["eval", "judge", "--questions", str(q), "--answers", str(a), "--base-url", stub.url,
                                     "--api-key", "k", "--judge-model", "judge-1", "--out", str(reviews)])
        assert result.exit_code == 0, result.output
        assert "reviewed 2 answers (0 already" in result.output and "1 questions without an answer" in result.output
        assert len(stub.received) == 2
        for body, (question, text) in zip(stub.received, [(questions()[0], "Fluid on the right."),
                                                          (questions()[1], "An MRI.")], strict=True):
            assert body["messages"] == review_messages(question, text)  # exactly system + user, nothing else
            assert body["model"] == "judge-1" and body["temperature"] == 0
        rows = [json.loads(line) for line in reviews.read_text().splitlines()]
        assert [(r["question_id"], r["ans2"], r["gpt_eval"]) for r in rows] == [
            (1, "Fluid on the right.", "8 7\nBoth fine."), (2, "An MRI.", "8 7\nBoth fine.")]
        # Question 3 gets its answer; a rerun reviews only it.
        write(a, [{"question_id": 2, "text": "An MRI."}, {"question_id": 1, "text": "Fluid on the right."},
                  {"question_id": 3, "text": "Yes."}])
        again = run_judge(q, a, reviews, judge_model="judge-1", base_url=stub.url, api_key="k")
        assert again == {"reviewed": 1, "already_reviewed": 2, "unanswered": 0, "malformed": []}
        assert len(stub.received) == 3
        assert "[Assistant 1]\nyes\n\n" in stub.received[2]["messages"][1]["content"]  # VQA rows: `answer` is the reference
    assert [json.loads(line)["question_id"] for line in reviews.read_text().splitlines()] == [1, 2, 3]


def test_judge_retries_429_and_counts_malformed_replies(tmp_path):
    q = write(tmp_path / "q.jsonl", questions()[:2])
    a = write(tmp_path / "a.jsonl", [{"question_id": 1, "text": "x"}, {"question_id": 2, "text": "y"}])
    reviews = tmp_path / "r.jsonl"
    script = [(429, "slow down"), (200, "9 6\nok"), (503, "busy"), (200, "Assistant 1: 8\nAssistant 2: 6")]
    with Stub(script) as stub:
        result = runner.invoke(app, ["eval", "judge", "--questions", str(q), "--answers", str(a), "--base-url", stub.url,
                                     "--judge-model", "j", "--out", str(reviews)])
        assert result.exit_code == 0, result.output
        assert len(stub.received) == 4  # each failed request sent again
        assert stub.received[0] == stub.received[1]
    assert "malformed replies (first line not two scores): 1: 2" in result.output
    assert [json.loads(line)["gpt_eval"] for line in reviews.read_text().splitlines()] == [
        "9 6\nok", "Assistant 1: 8\nAssistant 2: 6"]


def test_judge_errors_are_one_line(tmp_path):
    q = write(tmp_path / "q.jsonl", questions()[:1])
    a = write(tmp_path / "a.jsonl", [{"question_id": 1, "text": "x"}])
    with Stub([(401, "bad key")]) as stub:
        result = runner.invoke(app, ["eval", "judge", "--questions", str(q), "--answers", str(a), "--base-url", stub.url,
                                     "--judge-model", "j", "--out", str(tmp_path / "r.jsonl")])
        assert len(stub.received) == 1  # a 401 is not retried
    assert result.exit_code == 2 and "error: judge endpoint answered HTTP 401" in result.output
    write(a, [{"question_id": 9, "text": "x"}])
    with pytest.raises(MedlavaError, match="not in"):
        run_judge(q, a, tmp_path / "r.jsonl", judge_model="j", base_url="http://127.0.0.1:9/v1")


def test_summarize_relative_scores_by_hand(tmp_path):
    def review(qid, qtype, domain, reply):
        return {"question_id": qid, "type": qtype, "domain": {d: d == domain for d in
                ("chest_xray", "mri", "histology", "gross", "ct_scan")}, "gpt_eval": reply}

    reviews = write(tmp_path / "r.jsonl", [
        review(1, "conversation", "chest_xray", "8 6\n."),  # model/judge 0.75
        review(2, "conversation", "mri", "10 5\n."),  # 0.5
        review(3, "detailed_description", "chest_xray", "0 4\n."),  # judge 0: no ratio, skipped
        review(4, "detailed_description", "ct_scan", "4 4\n."),  # 1.0
        review(5, "conversation", "mri", "I cannot score these."),  # malformed: left out everywhere
    ])
    # overall: judge (8+10+0+4)/4 = 5.5, model (6+5+4+4)/4 = 4.75, relative 100*(0.75+0.5+1)/3 = 75, count 4
    # conversation: judge 9, model 5.5, relative 100*(0.75+0.5)/2 = 62.5; detailed_description: 2, 4, 100 (1 skipped)
    # chest_xray: judge 4, model 5, relative 75 (1 skipped); mri: 10, 5, 50; ct_scan: 4, 4, 100
    result = summarize(reviews)
    g = result["groups"]
    assert list(g) == ["type:conversation", "type:detailed_description", "domain:chest_xray", "domain:mri",
                       "domain:ct_scan", "overall"]
    assert g["overall"] == {"judge_score": 5.5, "model_score": 4.75, "relative_score": pytest.approx(75.0),
                            "count": 4, "skipped_judge_zero": 1}
    assert g["type:conversation"]["relative_score"] == pytest.approx(62.5) and g["type:conversation"]["judge_score"] == 9
    assert g["type:detailed_description"]["relative_score"] == pytest.approx(100.0)
    assert g["domain:chest_xray"]["relative_score"] == pytest.approx(75.0) and g["domain:mri"]["count"] == 1
    assert result["malformed"] == [5]
    table = runner.invoke(app, ["eval", "summarize", str(reviews)])
    assert table.exit_code == 0 and "75.0" in table.output and "62.5" in table.output and "malformed" in table.output
    as_json = runner.invoke(app, ["eval", "summarize", str(reviews), "--json"])
    assert json.loads(as_json.output)["groups"]["domain:mri"]["relative_score"] == pytest.approx(50.0)
    missing = runner.invoke(app, ["eval", "summarize", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "error:" in missing.output

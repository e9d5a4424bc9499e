"""32 clients stream at once: /health stays fast, nothing fails with a 5xx, and what the clients
that hang up after their first chunk held is all freed (read back from /metrics)."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medlava import Analyzer
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm_engine import LLMEngine
from medlava.model.demo import DEMO_MODEL
from medlava.serve.api import create_app
from tests.test_serve import start_server

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is missing")

DICOM = Path(__file__).resolve().parent.parent / "samples" / "phantom_chest_effusion.dcm"
CLIENTS, MAX_QUEUE = 32, 24  # more clients than the queue holds: some must get 429


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_32_streaming_clients_half_of_them_hanging_up():
    analyzer = Analyzer()
    app = create_app(AsyncLLMEngine(LLMEngine(analyzer.lm)), max_queue=MAX_QUEUE)
    url = "data:application/dicom;base64," + base64.b64encode(DICOM.read_bytes()).decode()
    body = {"model": analyzer.lm.name, "stream": True, "max_tokens": 160, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Is there a pleural effusion?"}]}]}
    outcomes: list[str] = []
    start = threading.Barrier(CLIENTS + 1)

    def client(i: int, base: str) -> None:
        start.wait()
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    outcomes.append(str(r.status_code))
                    return
                events = r.iter_lines()
                first = next(e for e in events if e.startswith("data: "))
                if i % 2:  # hang up after the first chunk
                    outcomes.append("hung up" if '"role":"assistant"' in first else "bad first chunk")
                    return
                last = [e for e in events if e.startswith("data: ")][-1]
                outcomes.append("done" if last == "data: [DONE]" else f"ended with {last[:80]}")
        except Exception as e:  # recorded: the assertion below names it
            outcomes.append(f"{type(e).__name__}: {e}")

    with start_server(app) as port:
        base = f"http://127.0.0.1:{port}"
        threads = [threading.Thread(target=client, args=(i, base)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        start.wait()
        latencies, probe = [], httpx.Client(base_url=base, timeout=10)
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert probe.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
        for t in threads:
            t.join()
        deadline = time.monotonic() + 20
        while (m := metrics(base))["medlava_num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.1)

    p90 = sorted(latencies)[int(0.9 * len(latencies))]
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"/health p90 {p90 * 1000:.1f} ms over {len(latencies)} calls; outcomes {counts}")
    assert len(outcomes) == CLIENTS and set(outcomes) <= {"done", "hung up", "429"}, counts
    assert counts.get("429", 0) >= 1 and counts.get("done", 0) >= 1 and counts.get("hung up", 0) >= 1
    assert len(latencies) >= 10 and p90 <= 0.1
    assert m["medlava_num_requests_running"] == 0 and m["medlava_num_requests_waiting"] == 0
    assert m["medlava_kv_cache_usage_perc"] == 0

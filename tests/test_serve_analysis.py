"""`/v1/reports` and `/v1/explain`: a real uvicorn on loopback, compared with the `Analyzer`."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

from medlava import Analyzer
from medlava.engine.async_engine import AsyncLLMEngine
from medlava.engine.llm_engine import LLMEngine
from medlava.imaging import load_study
from medlava.model.demo import DEMO_MODEL
from medlava.serve.api import create_app
from tests.test_serve import DICOM, KEY, data_url, raw, start_server

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is missing")
QUESTION = "Is there a pleural effusion on this film?"


@pytest.fixture(scope="module")
def server():
    analyzer = Analyzer()
    engine = AsyncLLMEngine(LLMEngine(analyzer.lm))
    app = create_app(engine, api_keys=[KEY])  # its own SharedAnalyzer on the same weights
    with start_server(app) as port:
        yield {"analyzer": analyzer, "port": port, "model": analyzer.lm.name}


def post(server, path: str, payload, key: str | None = KEY):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return raw(server, "POST", path, body, {"Authorization": f"Bearer {key}"} if key else {})


def test_report_json_and_fhir_equal_the_analyzer(server):
    want = server["analyzer"].report(DICOM)
    assert want.findings and all(f.box for f in want.findings)
    status, headers, body = post(server, "/v1/reports", {"model": server["model"],
                                                         "image": data_url(DICOM, "application/dicom")})
    assert status == 200, body[:300]
    got = json.loads(body)
    assert [(f["name"], f["side"], f["box"]) for f in got["findings"]] == [
        (f.name, f.side, f.box) for f in want.findings]
    assert got == json.loads(want.model_dump_json())
    status, _, body = post(server, "/v1/reports", {"model": server["model"], "format": "fhir", "grounding": "none",
                                                   "image": data_url(DICOM, "application/dicom")})
    assert status == 200, body[:300]
    from fhir.resources.R4B.bundle import Bundle

    bundle = Bundle.model_validate(json.loads(body))
    kinds = [e.resource.__resource_type__ for e in bundle.entry]
    assert kinds.count("Observation") == len(want.findings) and "DiagnosticReport" in kinds


def test_explain_returns_the_localisation_and_an_overlay_while_health_stays_fast(server):
    want = server["analyzer"].explain(DICOM, QUESTION, "occlusion")
    result: dict = {}

    def call():
        result["r"] = post(server, "/v1/explain", {"model": server["model"], "question": QUESTION,
                                                   "method": "occlusion",
                                                   "image": data_url(DICOM, "application/dicom")})

    t = threading.Thread(target=call)
    t.start()
    latencies = []
    while t.is_alive():
        t0 = time.perf_counter()
        assert raw(server, "GET", "/health")[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.01)
    t.join()
    status, _, body = result["r"]
    assert status == 200, body[:300]
    got = json.loads(body)
    assert {k: got[k] for k in want.to_dict()} == json.loads(json.dumps(want.to_dict()))
    assert got["overlay"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(got["overlay"].partition(",")[2])))
    assert png.format == "PNG" and list(png.size) == got["image_size"] == list(load_study(DICOM).to_pil(0).size)
    assert len(latencies) >= 5
    p90 = sorted(latencies)[int(0.9 * len(latencies))]
    print(f"/health p90 {p90 * 1000:.1f} ms over {len(latencies)} calls during /v1/explain occlusion")
    assert p90 <= 0.1


def _bad(model: str):
    dcm = data_url(DICOM, "application/dicom")
    text = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    return [
        ("/v1/reports", {"model": model}, KEY, 400, "image"),
        ("/v1/reports", {"model": model, "image": "data:image/png;base64,@@@"}, KEY, 400, "base64"),
        ("/v1/reports", {"model": model, "image": text}, KEY, 400, "could not read the image"),
        ("/v1/reports", {"model": model, "image": dcm, "format": "sr"}, KEY, 400, "'json' or 'fhir'"),
        ("/v1/reports", {"model": model, "image": dcm, "grounding": "magic"}, KEY, 400, "grounding"),
        ("/v1/reports", {"model": model, "image": dcm}, None, 401, "API key"),
        ("/v1/reports", {"model": "other", "image": dcm}, KEY, 404, "does not exist"),
        ("/v1/explain", {"model": model, "question": QUESTION}, KEY, 400, "image"),
        ("/v1/explain", {"model": model, "image": dcm, "question": QUESTION, "method": "saliency"}, KEY, 400,
         "method"),
        ("/v1/explain", {"model": model, "image": dcm, "question": "Is there a pneumothorax?"},
         KEY, 422, "no finding to localise"),
        ("/v1/explain", {"model": model, "image": dcm, "question": QUESTION}, "wrong", 401, "API key"),
        ("/v1/explain", b"{not json", KEY, 400, "not valid JSON"),
    ]


@pytest.mark.parametrize("case", range(len(_bad("m"))), ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in _bad("m")])
def test_bad_inputs_get_4xx_json(server, case):
    path, payload, key, status, needle = _bad(server["model"])[case]
    got, _, body = post(server, path, payload, key)
    assert got == status, body[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code"} and needle in err["message"], err
    if case == len(_bad("m")) - 1:  # and afterwards a good request still succeeds
        ok, _, good = post(server, "/v1/explain", {"model": server["model"], "question": QUESTION,
                                                   "image": data_url(DICOM, "application/dicom")})
        assert ok == 200 and json.loads(good)["box"]

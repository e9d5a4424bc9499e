"""The medlava-side helpers of bench peer (d), vLLM CPU (the vLLM run itself is not part of the tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))

import vllm_peer  # noqa: E402
import vllm_runner  # noqa: E402  (vLLM itself is imported only inside its main())

from medlava.errors import MedlavaError  # noqa: E402


def test_collapse_cuts_each_image_run_to_one_placeholder():
    ids = [1, 5, 9, 9, 9, 7, 9, 9, 2]
    assert vllm_peer.collapse(ids, 9) == [1, 5, 9, 7, 9, 2]
    assert vllm_peer.collapse([9, 9, 4], 9) == [9, 4]


def test_vllm_model_copy_renames_only_the_vision_tower(model_dir, tmp_path):
    src = model_dir("mistral-mlp2x-l2")
    dst = vllm_runner.vllm_model_copy(src, tmp_path / "vllm")
    with safe_open(src / "model.safetensors", "pt") as f:
        before = set(f.keys())
    with safe_open(dst / "model.safetensors", "pt") as f:
        after = set(f.keys())
        tower = [k for k in after if k.startswith("vision_tower.")]
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
        renamed = {k.replace("vision_tower.vision_model.", "vision_tower.", 1) for k in after}
        assert renamed == before
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llava"
    stamp = (dst / ".source").read_text()
    assert vllm_runner.vllm_model_copy(src, dst) == dst and (dst / ".source").read_text() == stamp  # reused


def test_missing_peer_environment_names_the_setup_script(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_peer, "PYTHON", tmp_path / "absent" / "python")
    with pytest.raises(MedlavaError, match="setup_vllm.sh"):
        vllm_peer.check()

"""The medlava-side helpers of bench peer (d), vLLM CPU (the vLLM run itself is not part of the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))

import vllm_peer  # noqa: E402
import vllm_runner  # noqa: E402  (vLLM itself is imported only inside its main())

from medlava.errors import MedlavaError  # noqa: E402


def test_collapse_cuts_each_image_run_to_one_placeholder():
    ids = [1, 5, 9, 9, 9, 7, 9, 9, 2]
    assert vllm_peer.collapse(ids, 9) == [1, 5, 9, 7, 9, 2]
    assert vllm_peer.collapse([9, 9, 4], 9) == [9, 4]


def test_the_bench_model_is_in_the_layout_vllm_loads(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = model_dir("mistral-mlp2x-l2")
    assert vllm_runner.layout_problem(src) is None
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(src / "model.safetensors")  # as transformers 5.24 itself writes the tower
    save_file({k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in tensors.items()},
              old / "model.safetensors")
    assert "delete it" in vllm_runner.layout_problem(old)


def test_missing_peer_environment_names_the_setup_script(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_peer, "PYTHON", tmp_path / "absent" / "python")
    with pytest.raises(MedlavaError, match="setup_vllm.sh"):
        vllm_peer.check()

"""The `medlava` command preloads tcmalloc by re-executing itself once (medlava/launch.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medlava import launch


def test_tcmalloc_joins_ld_preload_once_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(launch.ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    env = launch.with_tcmalloc({"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert launch.with_tcmalloc(env) is None  # already preloaded: no second exec
    assert launch.with_tcmalloc({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None  # the user's own allocator stays
    assert launch.with_tcmalloc({"MEDLAVA_TCMALLOC": "0"}) is None
    assert launch.with_tcmalloc({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"})["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    monkeypatch.setattr(launch.ctypes.util, "find_library", lambda name: None)
    assert launch.with_tcmalloc({}) is None  # not installed: run as we are


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_the_process_runs_again_with_tcmalloc_loaded():
    if launch.with_tcmalloc({}) is None:
        pytest.skip("tcmalloc is not installed here (scripts/install_tcmalloc.sh)")
    code = (
        "import sys\n"
        "if 'tcmalloc' in open('/proc/self/maps').read():\n"
        "    print('tcmalloc loaded', sys.argv[1:]); sys.exit(0)\n"
        "from medlava.launch import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, "--flag"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tcmalloc loaded ['--flag']"

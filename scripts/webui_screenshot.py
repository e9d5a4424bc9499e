"""Write docs/webui.png, the web UI's screenshot in README.md and docs/SERVING.md.

    python scripts/webui_screenshot.py [OUT_PNG]

It runs the browser test (tests/test_webui.py) with MEDLAVA_WEBUI_SCREENSHOT set, so the picture is
exactly the state that test checks: the phantom chest DICOM, two answered questions, the evidence
overlay and the draft report with its downloads. Needs Playwright and Debian's chromium
(scripts/install_browser.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "webui.png").resolve()
    env = {**os.environ, "MEDLAVA_WEBUI_SCREENSHOT": str(out), "CI": "true"}  # CI: fail, not skip, without a browser
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_webui.py::test_webui_in_a_real_browser"]
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc == 0:
        print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""`medlava bench` records its results in docs/BENCHMARKS.md without touching the sections after them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_engine  # noqa: E402


def test_new_results_replace_the_last_ones_and_keep_later_sections(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\nintro\n\n<!-- bench_engine results -->\n\n### Results, old\n\nold table\n\n## Scale-out\n\nkept\n")
    bench_engine.write_doc(doc, "new table")
    text = doc.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# B\n\nintro\n\n<!-- bench_engine results -->\n\n### Results, ")
    assert text.endswith("new table\n\n## Scale-out\n\nkept\n")
    bench_engine.write_doc(doc, "newer table")  # and again, with no later section
    assert "new table" not in doc.read_text() and doc.read_text().count("## Scale-out") == 1

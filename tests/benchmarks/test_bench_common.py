"""write_section owns exactly its own marked section of BENCHMARKS.md."""

from __future__ import annotations

import pytest

from benchmarks.common import write_section
from benchmarks.run_all import bench_modules


def _write(path, name, text):
    return write_section(name, text, path=path, command="python -m x", machine="test box")


def test_creates_file_with_header_and_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    _write(md, "alpha", "| a |\n|---|\n| 1 |")
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "<!-- bench:alpha -->\nCommand: `python -m x`\n\nMachine: test box\n\n| a |" in text
    assert text.endswith("| 1 |\n<!-- /bench:alpha -->\n")


def test_replaces_existing_section_and_leaves_others_intact(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        "# Benchmarks\n\nhand-written intro\n\n"
        "<!-- bench:alpha -->\nold alpha\n<!-- /bench:alpha -->\n\n"
        "between\n\n"
        "<!-- bench:beta -->\nbeta numbers\n<!-- /bench:beta -->\n"
    )
    _write(md, "alpha", "new alpha")
    text = md.read_text()
    assert "old alpha" not in text and text.count("new alpha") == 1
    assert text.count("<!-- bench:alpha -->") == 1 and text.count("<!-- /bench:alpha -->") == 1
    assert "hand-written intro\n\n<!-- bench:alpha -->" in text
    assert "<!-- /bench:alpha -->\n\nbetween\n\n" in text
    assert "<!-- bench:beta -->\nbeta numbers\n<!-- /bench:beta -->\n" in text
    before = text
    _write(md, "alpha", "new alpha")  # idempotent
    assert md.read_text() == before


def test_appends_new_section_after_existing_ones(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- bench:alpha -->\nA\n<!-- /bench:alpha -->\n")
    _write(md, "gamma", "G")
    text = md.read_text()
    assert text.index("<!-- /bench:alpha -->") < text.index("<!-- bench:gamma -->")
    assert "<!-- bench:alpha -->\nA\n<!-- /bench:alpha -->\n\n<!-- bench:gamma -->" in text
    assert text.endswith("G\n<!-- /bench:gamma -->\n")
    # a section whose name is a prefix of another's is a different section
    _write(md, "gam", "short")
    assert md.read_text().count("G\n<!-- /bench:gamma -->") == 1


def test_rejects_half_marked_section_and_bad_name(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("<!-- bench:alpha -->\nno end marker\n")
    with pytest.raises(ValueError, match="only one of its two markers"):
        _write(md, "alpha", "x")
    assert md.read_text() == "<!-- bench:alpha -->\nno end marker\n"
    with pytest.raises(ValueError, match="section name"):
        _write(md, "a b -->", "x")


def test_run_all_discovers_bench_modules():
    assert "benchmarks.bench_aggregation" in bench_modules()
    assert bench_modules()[-1] == "benchmarks.robustness"  # make bench runs it last

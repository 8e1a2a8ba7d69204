"""Result files: markdown tables, atomic text and PNG writes."""

import json
import pathlib

import pytest

from p4q_jax import results


def test_markdown_table_by_hand():
    assert results.markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |\n")


def test_write_json_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "results.json"
    results.write_json(path, {"b": 1, "a": [1, 2]})
    results.write_json(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    results.write_text(path, "old\n")

    def half_write(self, text):
        with open(self, "w") as f:
            f.write(text[:2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", half_write)
    with pytest.raises(OSError, match="disk full"):
        results.write_text(path, "new contents\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_plot_bars_writes_a_png_with_missing_values(tmp_path):
    path = tmp_path / "bars.png"
    results.plot_bars(path, ["w8a8", "w4a4attn8"], {"PTQ": [89.5, 81.0], "P4Q": [None, 85.6]},
                      errors={"PTQ": [0.3, 0.4], "P4Q": [None, 0.2]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]

"""Atomic files and directories: whole or absent, old content kept on failure, leftovers of
killed writes cleaned by the next write."""

import os

import pytest

from p4q_jax import atomic


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_file_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "out.txt"
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert path.read_text() == "two"
    assert _names(path.parent) == ["out.txt"]


def test_failed_file_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "out.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_leftover_of_a_killed_file_write_is_removed_by_the_next(tmp_path):
    path = tmp_path / "results.json"
    (tmp_path / ".results.json.tmp-abc123").write_text("{half")
    (tmp_path / ".other.json.tmp-abc123").write_text("not ours")
    atomic.write_text(path, "{}")
    assert _names(tmp_path) == [".other.json.tmp-abc123", "results.json"]


def test_directory_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic.directory(path) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("killed")
    assert _names(tmp_path) == []
    with atomic.directory(path) as tmp:
        (tmp / "part").write_text("x")
    assert _names(path) == ["part"]


def test_directory_refuses_to_overwrite_unless_replace(tmp_path):
    path = tmp_path / "export"
    path.mkdir()
    (path / "keep").write_text("user data")
    with pytest.raises(FileExistsError, match="export"):
        with atomic.directory(path):
            pass
    assert (path / "keep").read_text() == "user data"


def test_replaced_directory_is_kept_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "export"
    with atomic.directory(path) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.directory(path, replace=True) as tmp:
            (tmp / "v").write_text("2")
            assert (path / "v").read_text() == "1"
            raise RuntimeError("killed")
    assert (path / "v").read_text() == "1"
    with atomic.directory(path, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (path / "v").read_text() == "2"
    assert _names(tmp_path) == ["export"]


def test_kill_between_the_two_renames_brings_the_old_directory_back(tmp_path):
    # State after a kill between `export -> .export.old-X` and `.export.tmp-Y -> export`.
    old, new = tmp_path / ".export.old-1", tmp_path / ".export.tmp-2"
    old.mkdir()
    (old / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new, unfinished as far as anyone knows")
    removed = atomic.clean_leftovers(tmp_path / "export")
    assert removed == [new]
    assert (tmp_path / "export" / "v").read_text() == "old"
    assert _names(tmp_path) == ["export"]


def test_temp_files_are_hidden_beside_the_target(tmp_path):
    seen = []
    with atomic.file(tmp_path / "x.png", suffix=".png") as tmp:
        seen.append(tmp)
        tmp.write_bytes(b"png")
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.png.tmp-")
    assert seen[0].suffix == ".png" and not os.path.exists(seen[0])

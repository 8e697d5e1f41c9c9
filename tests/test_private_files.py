"""Private files: new folders 0700, new files 0600, whatever the umask; nothing loosened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tokenwire.private_files import (
    create_private_file,
    make_private_dirs,
    restrict_to_owner,
    write_private_file,
)


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


@pytest.mark.usefixtures("umask_022")
def test_every_missing_folder_level_is_private(tmp_path: Path) -> None:
    """make_private_dirs creates each missing level 0700 and leaves the existing one alone."""
    before = _mode(tmp_path)
    make_private_dirs(tmp_path / "a" / "b")
    assert [before, "0o700", "0o700"] == [
        _mode(p) for p in (tmp_path, tmp_path / "a", tmp_path / "a" / "b")
    ]


def test_a_strict_umask_still_leaves_the_owner_full_access(tmp_path: Path) -> None:
    """Under umask 0277 a new folder is still 0700 and a new file 0600."""
    previous = os.umask(0o277)
    try:
        make_private_dirs(tmp_path / "data")
        created = create_private_file(tmp_path / "data" / "db")
    finally:
        os.umask(previous)
    assert (True, "0o700", "0o600") == (
        created,
        _mode(tmp_path / "data"),
        _mode(tmp_path / "data" / "db"),
    )


def test_a_file_in_the_way_of_a_folder_is_an_error(tmp_path: Path) -> None:
    """make_private_dirs on a path that is a file raises FileExistsError, as mkdir -p does."""
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        make_private_dirs(tmp_path / "file")


@pytest.mark.usefixtures("umask_022")
def test_an_existing_file_is_not_created_again(tmp_path: Path) -> None:
    """create_private_file reports False and keeps the contents of a file that exists."""
    path = tmp_path / "db"
    path.write_bytes(b"kept")
    assert (False, b"kept") == (create_private_file(path), path.read_bytes())


@pytest.mark.usefixtures("umask_022")
def test_written_files_are_private_and_complete(tmp_path: Path) -> None:
    """write_private_file leaves the data at mode 0600 and no temp file behind."""
    path = tmp_path / "secret"
    write_private_file(path, b"one")
    write_private_file(path, b"two")
    assert (b"two", "0o600", ["secret"]) == (
        path.read_bytes(),
        _mode(path),
        [p.name for p in tmp_path.iterdir()],
    )


def test_without_replace_the_first_writer_wins(tmp_path: Path) -> None:
    """replace=False keeps an existing file, raises FileExistsError, and cleans up."""
    path = tmp_path / "secret"
    write_private_file(path, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_private_file(path, b"second", replace=False)
    assert (b"first", ["secret"]) == (path.read_bytes(), [p.name for p in tmp_path.iterdir()])


@pytest.mark.parametrize(
    ("before", "after"), [(0o644, "0o600"), (0o666, "0o600"), (0o400, "0o400"), (0o600, "0o600")]
)
def test_restricting_only_takes_access_away(tmp_path: Path, before: int, after: str) -> None:
    """restrict_to_owner drops group and other bits and never adds any."""
    path = tmp_path / "db"
    path.touch()
    os.chmod(path, before)
    restrict_to_owner(path)
    restrict_to_owner(tmp_path / "missing")  # quietly nothing
    assert after == _mode(path)

"""gczoo.fileio.atomic_path: whole files or nothing, with ordinary permissions."""
import os
import stat

import pytest

from gczoo.fileio import atomic_path


def test_atomic_path_writes_whole_files_with_umask_permissions_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "report.json"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("done")
            assert not target.exists()  # the final name appears only at the end
    finally:
        os.umask(old)
    assert target.read_text() == "done"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # as open() would give, not mkstemp's 0o600
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "done" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]

"""Fixtures the lab's tests share (the repository's conftest.py has tiny_env and the others)."""

import pytest


@pytest.fixture(scope="session")
def gn_run(tiny_env, tmp_path_factory):
    """A finished 2-iteration GN run on shapes_tiny (``gn-det train`` in its own process),
    evaluated on shapes_tiny_val: its folder and its record."""
    from gn_det_lab.runs import train_run
    from models import TINY

    run_dir = tmp_path_factory.mktemp("gn_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "PYTHONPATH", tiny_env["PYTHONPATH"]
        )  # the child process registers shapes_tiny
        record = train_run("shapes/gn.yaml", TINY, run_dir, threads=1)
    assert record["returncode"] == 0, (run_dir / "stdout.txt").read_text()[-2000:]
    return run_dir, record

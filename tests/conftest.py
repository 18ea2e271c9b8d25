import pytest

from tiny_runs import cold_start, write_data_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Two small training domains in the record format (60 and 12 rows)."""
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def cold_start_dir(tmp_path_factory, data_dir):
    """One short cold start shared by every training run of the session, so rollouts earn varied rewards (a
    random model earns none)."""
    path = tmp_path_factory.mktemp("cold") / "base"
    cold_start(data_dir, path)
    return path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_run_env(tmp_path, monkeypatch):
    """Training tests: token caches and default run directories in tmp_path, and one torch thread
    (tiny models run fastest on one, and a busy second core cannot slow them down)."""
    monkeypatch.setenv("PYRAMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

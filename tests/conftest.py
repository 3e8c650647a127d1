"""Test-session set-up: every cache lives in a temporary folder, so tests never read or write
the user's huggingface/torch caches and never depend on what a previous run downloaded."""
import os
import tempfile

import pytest

_CACHE_ROOT = tempfile.mkdtemp(prefix="gczoo-tests-")
os.environ["HF_HOME"] = os.path.join(_CACHE_ROOT, "hf")
os.environ["TORCH_HOME"] = os.path.join(_CACHE_ROOT, "torch")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("GCZOO_MIRROR", None)

from loopback import file_server, hub_server, weights_env  # noqa: E402,F401  (fixtures for every test file)


@pytest.fixture
def hub(hub_server, monkeypatch):
    """``hub_server`` also for timm's own downloads (huggingface_hub read HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    return hub_server


@pytest.fixture(scope="session")
def torchvision_resnet50():
    """torchvision's ResNet-50 in eval mode, random but fixed weights and non-trivial BatchNorm
    statistics (so a wrong load shows): the upstream checkpoint of ``resnet50_gc_r16.tv_in1k``.
    Shared by the whole session, so tests only read it (state_dict, forward); the parameters'
    version counters are checked at the end of the session."""
    import torch
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    versions = {k: v._version for k, v in model.state_dict().items()}
    yield model
    changed = [k for k, v in model.state_dict().items() if v._version != versions[k]]
    assert not changed, f"a test modified the shared torchvision_resnet50 in place: {changed[:5]}"

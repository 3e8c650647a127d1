"""Test-session set-up: every cache lives in a temporary folder, so tests never read or write
the user's huggingface/torch caches and never depend on what a previous run downloaded."""
import os
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="gczoo-tests-")
os.environ["HF_HOME"] = os.path.join(_CACHE_ROOT, "hf")
os.environ["TORCH_HOME"] = os.path.join(_CACHE_ROOT, "torch")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("GCZOO_MIRROR", None)

from loopback import file_server, hub_server, weights_env  # noqa: E402,F401  (fixtures for every test file)

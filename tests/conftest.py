"""Test-wide settings: 8 simulated CPU devices (for mesh tests), quiet TensorFlow, no GPU."""
import os

# Must be set before JAX initialises its backends.  LLVM optimisation level 0
# halves the CPU compile time of the many tiny test programs; results are the
# same computation (the parity tests hold to 1e-5 either way).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
  return FIXTURES

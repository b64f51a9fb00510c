"""Test-wide settings: 8 simulated CPU devices (for mesh tests), quiet TensorFlow, no GPU."""
import os
import re

# Must be set before JAX initialises its backends.  The suite needs 8 CPU devices whatever the user's
# XLA_FLAGS say (their other flags are kept).  LLVM optimisation level 0 halves the CPU compile time of
# the many tiny test programs (unless the user chose a level); results are the same computation (the
# parity tests hold to 1e-5 either way).
def _test_xla_flags(flags: str) -> str:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags).split()
  flags.append("--xla_force_host_platform_device_count=8")
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  return " ".join(flags)


os.environ["XLA_FLAGS"] = _test_xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
  return FIXTURES


# ----------------------------------------------------------------------------- training configs and variables
# Factory fixtures (session-scoped, so module-scoped fixtures can use them too).

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_config():
  """`load_config(name="testing", arg=None)`: the config of configs/NAME.py[:ARG] (unlocked)."""
  import importlib.util

  def load(name="testing", arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
  return load


@pytest.fixture(scope="session")
def initial_variables():
  """`initial_variables(config)`: one random initialisation of the config's model (compiled once, on one
  device, unboxed on the host), shared by all meshes of a test."""
  def init(config):
    import flax.linen as nn
    import jax
    from vit_jax.models import registry
    from vit_jax.train import config_base
    model = config_base.build_model(config)
    variables = jax.jit(lambda: registry.init_variables(model, jax.random.key(config.seed)))()
    return jax.device_get(nn.meta.unbox(variables))
  return init


@pytest.fixture(scope="session")
def with_random_head():
  """`with_random_head(variables, seed)`: a zero-initialised head ties every class (loss ln(k) whatever
  the input); a random one lets outputs differ."""
  def randomise(variables, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    head = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in variables["params"]["head"].items()}
    return {**variables, "params": {**variables["params"], "head": head}}
  return randomise

"""A stand-in for torchvision, for the tests only: `import timm` works with the CPU build of torch alone.

timm 1.0.31 imports torchvision when it loads (`torchvision.ops.misc.FrozenBatchNorm2d`,
`torchvision.transforms`, `torchvision.transforms.functional.InterpolationMode`, `torchvision.datasets`),
but building its ViT/CrossViT/MaxViT models and running them never calls torchvision. The tests put
tests/stubs on `sys.path` (in-process) or `PYTHONPATH` (subprocesses); nothing in `vit_jax` knows of it.
A real torchvision is what `python -m vit_jax.bench --vs timm` needs outside the tests.

Every public name of these modules is a placeholder class that raises when instantiated (subclassing works,
as timm's `MaybeToTensor(transforms.ToTensor)` needs), except `InterpolationMode`, whose members timm
tabulates at import. Submodules other than those in SUBMODULES do not exist, so timm's optional imports
(e.g. `torchvision.models.feature_extraction`) fail as they would with a torchvision that lacks them.
"""
import enum
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stand-in"

SUBMODULES = ("ops", "ops.misc", "transforms", "transforms.functional", "datasets", "utils")


class InterpolationMode(enum.Enum):
  NEAREST = "nearest"
  NEAREST_EXACT = "nearest-exact"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"


def _placeholder(module: str, name: str) -> type:
  def __init__(self, *args, **kwargs):
    raise RuntimeError(f"{module}.{name} belongs to the torchvision stand-in of the tests (tests/stubs); "
                       "install torchvision to use it.")
  return type(name, (), {"__init__": __init__, "__module__": module})


def _module_getattr(module: str):
  def __getattr__(name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    full = f"{module}.{name}"
    if full.partition(".")[2] in SUBMODULES:
      value = importlib.import_module(full)
    else:
      value = InterpolationMode if name == "InterpolationMode" else _placeholder(module, name)
    setattr(sys.modules[module], name, value)
    return value
  return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves the SUBMODULES of this package as lazily filled, otherwise empty modules."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname.startswith(__name__ + ".") and fullname.partition(".")[2] in SUBMODULES:
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []
    module.__getattr__ = _module_getattr(spec.name)
    return module

  def exec_module(self, module):
    pass


__getattr__ = _module_getattr(__name__)
if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
  sys.meta_path.insert(0, _Finder())

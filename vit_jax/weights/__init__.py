"""Converters from and to outside checkpoint formats (one module per format)."""
from vit_jax.weights.core import (CheckpointMismatchError, abstract_variables, check_against,
                                  export_timm, flatten, load_pretrained, read_source,
                                  register_converter, unflatten)

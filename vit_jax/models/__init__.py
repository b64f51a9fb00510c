"""Model families: one file each (`vit`, `crossvit`, `maxvit`) plus the layers they share."""
from vit_jax.models.registry import get_model, list_models, model_family

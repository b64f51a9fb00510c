"""vit_jax: Vision Transformers (ViT, hybrid ResNet+ViT, CrossViT, MaxViT) in JAX/Flax.

    import vit_jax
    vit_jax.list_models()
    model = vit_jax.get_model("ViT-B_16", num_classes=1000, image_size=224)
    variables = vit_jax.load_pretrained("ViT-B_16.npz", model="ViT-B_16", num_classes=10, image_size=384)
    logits = model.apply(variables, images, train=False)
    vit_jax.list_pretrained("timm/vit_base*")         # the catalogue of released checkpoints
    model, variables = vit_jax.load_model("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")  # by name
    model, variables, config = vit_jax.restore(workdir)
"""
from vit_jax.models.registry import get_model, list_models
from vit_jax.weights.catalog import get as pretrained_info
from vit_jax.weights.catalog import list_pretrained
from vit_jax.weights.core import export_timm, export_transformers, load_model, load_pretrained

__version__ = "0.1.0"


def __getattr__(name):
  # Heavier pieces (TensorFlow for data, Orbax for restore) load only when used.
  if name == "restore":
    from vit_jax.predict import restore
    return restore
  if name == "data":
    import importlib
    return importlib.import_module("vit_jax.data")
  raise AttributeError(f"module 'vit_jax' has no attribute {name!r}")

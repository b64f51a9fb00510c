from setuptools import find_packages, setup

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformers (ViT, hybrid, CrossViT, MaxViT) in JAX/Flax, from one CPU to TPU pods.",
    packages=find_packages(include=["vit_jax", "vit_jax.*"]),
    package_data={"vit_jax": ["labels/*.txt"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorflow-cpu; platform_machine=='x86_64'",
        "tensorflow-datasets>=4.9",
        "ml-collections",
        "chex",
        "absl-py",
        "clu",            # metric writers (TensorBoard + logging), periodic actions
        "tensorboard",    # clu's TensorBoard writer imports it
        "einops",
        "numpy",
        "scipy",
        "pillow",
        "safetensors",    # timm-format weights without pickles
        "scikit-learn",   # the bundled `digits` data set of the embedded default run
    ],
    extras_require={
        # torch reads/writes .pth state_dicts in the weight tests; timm (installed with --no-deps, see README)
        # needs huggingface_hub and pyyaml to import, for the `bench --vs timm` test.
        "test": ["pytest", "pytest-xdist", "torch", "huggingface_hub", "pyyaml"],
        "torch": ["torch"],  # only to read .pth/.bin state_dicts and for `bench --vs timm`
    },
)

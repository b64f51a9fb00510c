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
        # TFDS's DatasetBuilder.code_path imports it while preparing any data set that is not on disk yet
        # (tensorflow-datasets declares it only for Python < 3.9, yet 4.9.x imports it on every version).
        "importlib_resources",
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
        # jax[tpu] (libtpu): tests/test_aot.py compiles the train step for a v5e:2x2 topology on the CPU.
        "test": ["pytest", "pytest-xdist", "torch", "huggingface_hub", "pyyaml", "matplotlib", "jax[tpu]>=0.10"],
        "torch": ["torch"],  # only to read .pth/.bin state_dicts and for `bench --vs timm`
        "analysis": ["matplotlib"],  # the figures of `python -m vit_jax.analyze` (also in "test")
        # The CUDA 12 build of jax: jax's own `cuda12` extra pins jaxlib and jax-cuda12-plugin to exactly the
        # jax version installed (jaxlib<=V,>=V), so it always matches.  `pip install -e ".[gpu]"`.
        "gpu": ["jax[cuda12]>=0.10"],
        # libtpu at the jax version installed (jax's `tpu` extra pins it): TPU pods, and `python -m vit_jax.aot`
        # compiling for a TPU topology on any machine.  `pip install -e ".[tpu]"`.
        "tpu": ["jax[tpu]>=0.10"],
    },
)

"""repeat_scaling: scaling experiments on repeated training data (JAX/Flax)."""

from setuptools import find_packages, setup

setup(
    name="repeat_scaling",
    version="0.1.0",
    description=(
        "A JAX/Flax scaling suite for the science of repeated training data: "
        "exact repetition plans, T5/decoder-only training, degradation curves."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["repeat_scaling", "repeat_scaling.*"]),
    # the fused CPU attention's source, compiled on first use (models/cpu_attention.py)
    package_data={"repeat_scaling.models": ["*.cc"]},
    install_requires=[
        # Training and evaluation (accelerator images carry these).
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        # gs:// workdirs (repeat_scaling/workdir_io.py; brings google-cloud-storage, which
        # tensorboardX uses for gs:// event files).
        "gcsfs>=2024.2",
        # Data preparation only (imported lazily, never by train/eval).
        "sentencepiece>=0.2",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            # Checkpoint-import parity tests (CPU wheel: see Makefile).
            "torch>=2.4",
            "transformers>=4.45",
            "safetensors>=0.4",
            # Local GCS emulator for the gs:// workdir tests (tests/test_workdir_gcs.py).
            "gcp-storage-emulator>=2024.8",
            # TensorBoard's own event reader, for the evaluator's scalars (its tests).
            "tensorboard>=2.15",
            # The TPU compiler (libtpu, matched to jax by jax's own `tpu` extra) for the
            # compile check (`python -m repeat_scaling.compile`, `submit.py --backend=tpu`),
            # which compiles for abstract TPU devices on a CPU host. Training never needs
            # it. libtpu is published for Linux x86_64 only.
            "jax[tpu]; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        # GPU targets of the compile check (`--topology=h100x8`): the CUDA PJRT plugin
        # compiles for a described H100 without a GPU or the CUDA libraries.
        "compile-gpu": ["jax[cuda12-local]; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "repeat-scaling-prepare=repeat_scaling.prepare:run",
            "repeat-scaling-train-vocab=repeat_scaling.train_vocab:run",
            "repeat-scaling-train=repeat_scaling.train.__main__:run",
            "repeat-scaling-evaluate=repeat_scaling.evaluate:run",
            "repeat-scaling-report=repeat_scaling.report.__main__:run",
        ],
    },
)

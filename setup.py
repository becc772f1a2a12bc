"""cm3corpus: retrieval-augmented, tokenized CM3 corpora built with Apache Beam.

The same file installs the project locally (`pip install -e .`) and ships it to remote Beam
workers (`--setup_file ./setup.py` on Dataflow).
"""

from setuptools import find_packages, setup

setup(
    name="cm3corpus",
    version="0.1.0",
    description="Build retrieval-augmented CM3 training corpora (RA-CM3 / CM3Leon recipe) with Apache Beam.",
    python_requires=">=3.10",
    packages=find_packages(
        include=["pipelines", "pipelines.*", "transforms", "transforms.*", "model", "model.*", "schemas", "schemas.*"]
    ),
    # The demo CLIP's config and checkpoint travel with the code so remote workers have them.
    package_data={"model": ["demo_clip/*.json", "demo_clip/*.pt"]},
    install_requires=[
        "apache-beam>=2.60",
        "pyarrow>=14",
        "numpy>=1.24",
        "pillow>=10",
        "webdataset>=0.2.86",
        "fsspec>=2023.1",
        "open_clip_torch>=2.24",
        # torch 2.14.1 / torchvision 0.29.1 are the newest releases this project is tested with.
        "torch>=2.1,<=2.14.1",
        "torchvision<=0.29.1",
        "faiss-cpu>=1.8",
        # HF tokenizers: a fast, well-tested BPE trainer and the `tokenizer.json` format users already have.
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "ruff>=0.5", "duckdb>=0.10", "pandas>=2", "transformers>=4.44", "safetensors>=0.4"],
        # `--image_tokenizer vqgan:DIR` with .safetensors weights, and training the shards with HF's Chameleon
        # (the tests compare our VQ-GAN's codes with transformers' ChameleonVQVAE).
        "chameleon": ["transformers>=4.44", "safetensors>=0.4", "pyyaml>=5"],
    },
    entry_points={"console_scripts": ["cm3corpus=pipelines.cli:main"]},
)

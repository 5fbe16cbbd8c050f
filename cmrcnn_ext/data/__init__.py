"""Datasets for cmrcnn_ext: the synthetic shapes set and users' COCO-format files."""

from cmrcnn_ext.data.register import register_project_datasets

__all__ = ["register_project_datasets"]

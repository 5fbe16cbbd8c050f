"""Hyperparameter studies on Optuna: ``cmrcnn-tune run`` (a training run per trial), ``sweep``
(a checkpoint evaluated per setting of the inference-only keys) and ``report``.

Modules: :mod:`~cmrcnn_ext.tune.space` (search-space files), :mod:`~cmrcnn_ext.tune.study`
(the study loop), :mod:`~cmrcnn_ext.tune.trial` (a training trial), :mod:`~cmrcnn_ext.tune.sweep`
(a test-time trial), :mod:`~cmrcnn_ext.tune.workers` (resume, many workers),
:mod:`~cmrcnn_ext.tune.storage`, :mod:`~cmrcnn_ext.tune.identity`,
:mod:`~cmrcnn_ext.tune.one_at_a_time`, :mod:`~cmrcnn_ext.tune.report` (+ ``effects``, ``plots``).
Optuna is an optional dependency: ``pip install cmrcnn_ext[tune]``.
"""

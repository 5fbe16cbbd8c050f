"""Command-line applications (``cmrcnn-demo``, ``cmrcnn-predict``, ``cmrcnn-export``).

Not imported by ``import cmrcnn_ext``: each is run as a console script or with
``python -m cmrcnn_ext.apps.<name>``.
"""

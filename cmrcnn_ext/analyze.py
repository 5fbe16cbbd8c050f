"""``python -m cmrcnn_ext.analyze``: the stage report (see :mod:`cmrcnn_ext.apps.analyze`)."""

from cmrcnn_ext.apps.analyze import cli

if __name__ == "__main__":
    cli()

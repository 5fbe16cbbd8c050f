"""``python -m cmrcnn_ext.tune``: the same as ``cmrcnn-tune`` (cmrcnn_ext.apps.tune)."""

from cmrcnn_ext.apps.tune import cli

if __name__ == "__main__":
    cli()

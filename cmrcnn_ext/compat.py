"""Run-time compatibility of cmrcnn_ext with the installed Detectron2.

cmrcnn_ext supports official Detectron2 (built from its git repository, with the compiled
``detectron2._C``) and Detectron2 v0.6 installed Python-only from the ``pb1-detectron2`` sdist by
``tools/install_detectron2.py``. The fixes that must hold when ``detectron2`` is imported on its
own (import errors on Pillow >= 10 / numpy >= 1.24 / Python 3.11, the missing ``_C``) are applied
by that installer to the installed source. This module holds what is decided at run time; each
function does nothing where the installed Detectron2 is already right.
"""
import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """Whether ``detectron2._C`` is a real compiled extension (not the installer's placeholder).

    Without it, Detectron2's C++ COCO evaluator (``COCOEvaluator(use_fast_impl=True)``),
    rotated boxes and deformable convolutions are unavailable.
    """
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "CMRCNN_PLACEHOLDER", False)


def allow_cpu_ddp():
    """Let Detectron2's ``DefaultTrainer`` wrap a model on the CPU in DistributedDataParallel.

    ``create_ddp_model`` (v0.6 and the main branch) passes ``device_ids=[local_rank]`` unless
    told otherwise, which DistributedDataParallel rejects for a CPU model ("device_ids ... only
    work with single-device/multiple-device GPU modules"). ``DefaultTrainer.__init__`` calls it
    through the module global ``detectron2.engine.defaults.create_ddp_model``: this replaces that
    global with a wrapper that passes ``device_ids=None`` for a CPU model and changes nothing
    otherwise. Called by ``cmrcnn_ext.launch`` in every distributed worker; idempotent.
    """
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_cmrcnn_allows_cpu", False):
        return

    @functools.wraps(original)
    def create_ddp_model(model, *args, **kwargs):
        if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
            kwargs["device_ids"] = None
        return original(model, *args, **kwargs)

    create_ddp_model._cmrcnn_allows_cpu = True
    defaults.create_ddp_model = create_ddp_model

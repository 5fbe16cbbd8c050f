"""Run-time compatibility of cmrcnn_ext with the installed Detectron2.

cmrcnn_ext supports official Detectron2 (built from its git repository, with the compiled
``detectron2._C``) and Detectron2 v0.6 installed Python-only from the ``pb1-detectron2`` sdist by
``tools/install_detectron2.py``. The fixes that must hold when ``detectron2`` is imported on its
own (import errors on Pillow >= 10 / numpy >= 1.24 / Python 3.11, the missing ``_C``) are applied
by that installer to the installed source. This module holds what is decided at run time; each
function does nothing where the installed Detectron2 is already right.
"""
import contextlib
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
    otherwise. Called by ``cmrcnn_ext.engine.launch`` in every distributed worker; idempotent.
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


def reset_checkpointer_after_load(checkpointer) -> None:
    """Make a ``DetectionCheckpointer`` usable again after a load that raised.

    Why: Detectron2 main's ``DetectionCheckpointer.load`` asserts that its private
    ``_parsed_url_during_load`` is None, sets it, and resets it only when loading succeeds, so
    after one failed load (a missing or corrupt file) every later load fails with a bare
    ``AssertionError``. Delete when Detectron2 resets it in a ``finally`` (v0.6 has no such
    attribute: nothing to do).
    """
    if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
        checkpointer._parsed_url_during_load = None


@contextlib.contextmanager
def coco_ap_function(replacement):
    """Inside the block, Detectron2's ``COCOEvaluator`` computes each task's COCOeval with
    ``replacement(original, coco_gt, coco_results, iou_type, **kwargs)``.

    Why: ``COCOEvaluator._eval_predictions`` calls the module function
    ``_evaluate_predictions_on_coco`` (whose keywords differ between Detectron2 versions:
    ``use_fast_impl`` in v0.6, ``cocoeval_fn`` on main) and offers no other way to change the
    AP computation; ``replacement`` receives the original and the arguments as given, so it can
    pass through what it does not handle. Delete when ``COCOEvaluator`` takes the COCOeval
    implementation as an argument.
    """
    from detectron2.evaluation import coco_evaluation

    original = coco_evaluation._evaluate_predictions_on_coco
    coco_evaluation._evaluate_predictions_on_coco = functools.partial(replacement, original)
    try:
        yield
    finally:
        coco_evaluation._evaluate_predictions_on_coco = original

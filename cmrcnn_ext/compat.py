"""Run-time compatibility of cmrcnn_ext with the installed Detectron2: the one place that touches
Detectron2's private names or replaces its module globals.

cmrcnn_ext supports official Detectron2 (built from its git repository, with the compiled
``detectron2._C``) and Detectron2 v0.6 installed Python-only from the ``pb1-detectron2`` sdist by
``tools/install_detectron2.py``. The fixes that must hold when ``detectron2`` is imported on its
own (import errors on Pillow >= 10 / numpy >= 1.24 / Python 3.11, the missing ``_C``) are applied
by that installer to the installed source. This module holds what is decided at run time: each
function says why it is needed and when it can be deleted, and does nothing where the installed
Detectron2 is already right.
"""

import contextlib
import functools
import logging

logger = logging.getLogger(__name__)


def import_detectron2_quietly() -> None:
    """Import Detectron2's layers without torch's ``torch.jit.script`` deprecation warnings.

    Why: fvcore and Detectron2 call ``torch.jit.script`` at import time (``fvcore.nn``,
    ``detectron2.layers``); torch >= 2.10 warns twice for it, on every command. Only that
    message, only during this import, is silenced. Delete when they stop scripting at import.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        import detectron2.layers  # noqa: F401
        import detectron2.modeling  # noqa: F401


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


@contextlib.contextmanager
def cascade_final_nms(replacement):
    """Inside the block, Detectron2's ``CascadeROIHeads._forward_box`` runs its final per-class
    NMS with ``replacement`` (same signature as ``fast_rcnn_inference``).

    Why: the cascade's test-time box inference calls the module global ``fast_rcnn_inference``
    of ``detectron2.modeling.roi_heads.cascade_rcnn``, with no argument to choose another;
    swapping it keeps Detectron2's stage loop instead of a copy. ``replacement`` (cmrcnn_ext's
    prefix NMS) returns the same detections, so another model running in another thread at the
    same time gets the same results. Delete when the cascade heads take the inference function
    as an argument.
    """
    from detectron2.modeling.roi_heads import cascade_rcnn

    original = cascade_rcnn.fast_rcnn_inference
    cascade_rcnn.fast_rcnn_inference = replacement
    try:
        yield
    finally:
        cascade_rcnn.fast_rcnn_inference = original


def set_local_process_group_v06(group) -> None:
    """Detectron2 v0.6: make ``comm.get_local_rank()`` / ``get_local_size()`` work in workers
    that cmrcnn_ext's launcher started (torchrun, CPU processes).

    Why: v0.6 reads the private module attribute ``comm._LOCAL_PROCESS_GROUP``, which only its own
    ``launch()`` sets (main has ``comm.create_local_process_group``, used instead where it
    exists). Delete with Detectron2 v0.6 support.
    """
    from detectron2.utils import comm

    if getattr(comm, "_LOCAL_PROCESS_GROUP", None) is not None:
        raise RuntimeError("Detectron2's local process group already exists in this process.")
    comm._LOCAL_PROCESS_GROUP = group


def inner_trainer(trainer):
    """The ``SimpleTrainer`` / ``AMPTrainer`` that a ``DefaultTrainer`` runs its steps with.

    Why: ``DefaultTrainer`` keeps it in the private ``_trainer`` and has no builder method for it;
    cmrcnn_ext replaces it by its CPU bfloat16 trainer. Delete when ``DefaultTrainer`` lets a
    subclass build its inner trainer.
    """
    return trainer._trainer


def set_inner_trainer(trainer, inner) -> None:
    """Replace a ``DefaultTrainer``'s inner trainer (see :func:`inner_trainer`)."""
    trainer._trainer = inner


def add_inner_trainer_state(trainer, state: dict) -> dict:
    """``state`` (a ``DefaultTrainer.state_dict()``) with the inner trainer's state (the
    optimizer's) under ``"_trainer"``.

    Why: Detectron2 v0.6's ``DefaultTrainer`` checkpoints only the iteration and the hooks'
    states, so the optimizer (momentum, the LR of the next iteration) was lost on resume; main
    saves ``"_trainer"`` itself (then nothing is added). Delete with v0.6 support.
    """
    if "_trainer" not in state:
        state["_trainer"] = inner_trainer(trainer).state_dict()
    return state


def load_inner_trainer_state(trainer, state: dict) -> None:
    """Load what :func:`add_inner_trainer_state` saved, where Detectron2 does not (v0.6)."""
    from detectron2.engine import DefaultTrainer

    if "_trainer" in state and "load_state_dict" not in DefaultTrainer.__dict__:
        inner_trainer(trainer).load_state_dict(state["_trainer"])

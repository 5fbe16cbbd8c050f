"""Checkpoints with one mask head loaded into one head per cascade stage, and back.

Detectron2's built-in cascade (and ``MASK_STAGES`` first / last) has one mask head,
``roi_heads.mask_head.*``; ``MASK_STAGES`` all has one per stage,
``roi_heads.mask_head.<stage>.*``. ``CascadeMaskROIHeads._load_from_state_dict`` calls
:func:`adapt_mask_head_keys`, so every loader (Detectron2's ``DetectionCheckpointer`` and
``DefaultPredictor`` included) maps one layout onto the other (tests/test_weight_loading.py).
"""

import logging

__all__ = ["adapt_mask_head_keys"]

logger = logging.getLogger(__name__)


def adapt_mask_head_keys(state_dict, head_prefix: str, head_states, staged: bool) -> None:
    """Rename mask-head tensors of ``state_dict`` (in place) to the model's layout.

    - One head in the checkpoint (``<head_prefix>mask_fcn1.weight``..., Detectron2's built-in
      cascade or ``MASK_STAGES`` first / last), per-stage heads in the model (``MASK_STAGES``
      all, ``<head_prefix><stage>.mask_fcn1.weight``): the head is copied to every stage.
    - Per-stage heads in the checkpoint, one in the model: the last stage's head is loaded (at
      test time masks come from the final boxes, which the last stage's head was trained on).

    A copied tensor whose shape differs from the model's (another number of classes in the
    predictor) is left out with a warning, so the model keeps its initialisation there, as
    Detectron2's checkpointer does for same-named tensors. Nothing is done when the layouts
    already agree.

    Args:
        state_dict (dict): the state being loaded (modified in place).
        head_prefix (str): e.g. ``"roi_heads.mask_head."``.
        head_states (list[dict]): the model's mask heads' own ``state_dict()``, in stage order.
        staged (bool): whether the model holds one head per stage (an ``nn.ModuleList``).
    """
    single, per_stage = [], {}
    for key in list(state_dict):
        if not key.startswith(head_prefix):
            continue
        first, _, rest = key[len(head_prefix) :].partition(".")
        if first.isdigit() and rest:
            per_stage.setdefault(int(first), []).append(key)
        else:
            single.append(key)
    if staged and single and not per_stage:
        wrong = []
        for key in single:
            value, name = state_dict.pop(key), key[len(head_prefix) :]
            for stage, target in enumerate(head_states):
                if name in target and target[name].shape != value.shape:
                    wrong.append(f"{head_prefix}{stage}.{name}")
                    continue
                state_dict[f"{head_prefix}{stage}.{name}"] = value
        logger.info(
            "The checkpoint has one mask head (%s*, e.g. Detectron2's built-in cascade) and the "
            "model one per stage (MODEL.CMRCNN.MASK_STAGES all): copied it to the mask heads of "
            "stages %s.",
            head_prefix,
            ", ".join(str(s + 1) for s in range(len(head_states))),
        )
        if wrong:
            logger.warning(
                "Not loading %d mask-head tensor(s) whose shape differs from the model's (another "
                "number of classes?); they keep their initialization: %s",
                len(wrong),
                ", ".join(wrong),
            )
    elif not staged and per_stage and not single:
        last = max(per_stage)
        for stage, keys in per_stage.items():
            for key in keys:
                value = state_dict.pop(key)
                if stage == last:
                    state_dict[head_prefix + key[len(head_prefix) :].partition(".")[2]] = value
        logger.info(
            "The checkpoint has one mask head per stage (%s{0..%d}.*) and the model one mask "
            "head: loaded the last stage's (stage %d) head, dropped the others.",
            head_prefix,
            last,
            last + 1,
        )

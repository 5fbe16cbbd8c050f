"""Trainer and set-up shared by train_net.py and the demo."""

import logging
import os
import time
import weakref

import torch
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine import hooks as d2_hooks

from cmrcnn_ext import compat
from cmrcnn_ext.config.validate import check_values
from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer
from cmrcnn_ext.engine.cpu_bf16 import native_bf16
from cmrcnn_ext.engine.nonfinite import NonFiniteLossGuard
from cmrcnn_ext.engine.preemption import PreemptionHook
from cmrcnn_ext.engine.report import DataSummaryHook, RunReportHook
from cmrcnn_ext.engine.resume import build_resumable_train_loader
from cmrcnn_ext.engine.rng import RNGStateHook

logger = logging.getLogger(__name__)


class CPUAutocast(torch.nn.Module):
    """Runs the wrapped model's forward pass under ``torch.autocast("cpu", torch.bfloat16)``.

    Convolutions and matrix products then run in bfloat16 (fast on CPUs with AVX512-BF16 or
    AMX), while autocast keeps normalisation, losses and reductions in float32; the weights,
    gradients and optimizer state stay float32. bfloat16 has float32's exponent range, so no
    loss scaling is needed (unlike float16 on CUDA).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


class CPUAutocastTrainer(SimpleTrainer):
    """Detectron2's SimpleTrainer step with the forward pass (and losses) under
    :class:`CPUAutocast`; backward and the optimizer step run outside autocast, as PyTorch
    recommends. Between steps ``self.model`` is the model itself (hooks, evaluation and
    checkpoints see float32 and no wrapper)."""

    def run_step(self):
        model = self.model
        self.model = CPUAutocast(model)
        try:
            super().run_step()
        finally:
            self.model = model


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO box + mask evaluation.

    Checkpoints go through :class:`~cmrcnn_ext.engine.checkpoint.CMRCNNCheckpointer` (more
    ``MODEL.WEIGHTS`` layouts, atomic saves), and ``--resume`` continues exactly where the
    interrupted run stopped: optimizer state, data order and RNG states are restored
    (cmrcnn_ext/engine/resume.py, rng.py).
    """

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda")
        if not cpu_amp:
            super().__init__(cfg)
            return
        # Detectron2's AMPTrainer is CUDA-only (float16 + GradScaler; it asserts CUDA in
        # run_step, and building it on the CPU warns about the GradScaler). On the CPU,
        # SOLVER.AMP.ENABLED trains with bfloat16 autocast instead: DefaultTrainer builds a
        # plain SimpleTrainer (AMP off in the config it is given), whose model, loader and
        # optimizer CPUAutocastTrainer then takes over.
        plain = cfg.clone()
        plain.defrost()
        plain.SOLVER.AMP.ENABLED = False
        plain.freeze()
        super().__init__(plain)
        self.cfg = self.cfg.clone()  # DefaultTrainer's (maybe auto-scaled) copy, AMP back on
        self.cfg.defrost()
        self.cfg.SOLVER.AMP.ENABLED = True
        self.cfg.freeze()
        inner = compat.inner_trainer(self)
        compat.set_inner_trainer(
            self, CPUAutocastTrainer(inner.model, inner.data_loader, inner.optimizer)
        )
        logger.info("SOLVER.AMP.ENABLED on the CPU: training with bfloat16 autocast.")
        if not native_bf16():
            logger.warning(
                "SOLVER.AMP.ENABLED on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated "
                "there and much slower than float32 (the demo's step: > 15 s instead of ~1 s). "
                "Set SOLVER.AMP.ENABLED False to train in float32 on this machine."
            )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from cmrcnn_ext.evaluation.coco import build_coco_evaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # TEST.CMRCNN.EVALUATOR: "faster" (faster-coco-eval, default) or "pycocotools"
        # (Detectron2's COCOEvaluator with the official pycocotools COCOeval).
        return build_coco_evaluator(cfg, dataset_name, output_folder, distributed=True)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation of every test data set, plus the model's inference time:
        ``results["timing"]["inference_ms_per_image"]``, the mean time of the model's forward
        passes per image (data loading and the AP computation excluded)."""
        timed = _TimedModel(model)
        results = super().test(cfg, timed, evaluators)
        if timed.images:
            results["timing"] = {"inference_ms_per_image": 1000.0 * timed.seconds / timed.images}
        return results

    @classmethod
    def evaluate_checkpoint(cls, cfg, resume=False, for_inference=True):
        """What ``train_net.py --eval-only`` evaluates (``cmrcnn-tune sweep`` too, per setting):
        the model of ``cfg`` with its weights loaded by
        :class:`~cmrcnn_ext.engine.checkpoint.CMRCNNCheckpointer` (``MODEL.WEIGHTS``, or with
        ``resume`` the last checkpoint in ``OUTPUT_DIR``), then :meth:`test`.

        Args:
            for_inference: refuse weights that are not a trained detector (False: layers missing
                from the checkpoint keep their random init, ``--eval-untrained``).

        Returns:
            ``(model, results, weights)``; ``weights`` is the file loaded ("" for none).
        """
        model = cls.build_model(cfg)
        checkpointer = CMRCNNCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, for_inference=for_inference
        )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        weights = cfg.MODEL.WEIGHTS
        if resume and checkpointer.has_checkpoint():
            weights = checkpointer.get_checkpoint_file()
        return model, cls.test(cfg, model), weights

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (``TEST.AUG.*``) on ``DATASETS.TEST``.

        The model is wrapped in Detectron2's :class:`~detectron2.modeling.GeneralizedRCNNWithTTA`:
        boxes from every scale (``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``) and flip (``TEST.AUG.FLIP``)
        are merged by class-wise NMS, then the masks of the merged boxes are predicted on every
        augmented image and their probabilities averaged. Each data set is evaluated with
        :meth:`build_evaluator`, writing to ``OUTPUT_DIR/inference_TTA/<data set>`` (not over
        the plain evaluation's ``inference/`` files).

        Args:
            cfg (CfgNode): the training config.
            model (nn.Module): a ``GeneralizedRCNN``, possibly wrapped in DistributedDataParallel.

        Returns:
            OrderedDict: :meth:`test`'s results with ``"_TTA"`` appended to each top-level key
            (``{"bbox_TTA": ..., "segm_TTA": ...}`` for one data set).
        """
        from collections import OrderedDict

        from detectron2.modeling import GeneralizedRCNNWithTTA

        logger.info("Running inference with test-time augmentation ...")
        tta_model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, tta_model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    def build_hooks(self):
        """Detectron2's hooks, with cmrcnn_ext's around them:

        - first :class:`~cmrcnn_ext.engine.nonfinite.NonFiniteLossGuard` (stops training at the
          first NaN/inf loss term, before the backward pass and before any checkpoint of that
          iteration, on every process), :class:`~cmrcnn_ext.engine.rng.RNGStateHook` (exact
          resume) and :class:`~cmrcnn_ext.engine.report.DataSummaryHook` (the data check's
          summary when training starts);
        - :class:`~cmrcnn_ext.engine.preemption.PreemptionHook` (``SOLVER.CMRCNN.STOP_SIGNALS``:
          checkpoint and exit code 75 on SIGTERM / SIGUSR1) after Detectron2's checkpointer;
        - with ``TEST.AUG.ENABLED``, an evaluation with test-time augmentation after the last
          iteration (:meth:`test_with_TTA`), before the writers, so ``metrics.json`` has it;
        - last :class:`~cmrcnn_ext.engine.report.RunReportHook` (``results.json`` and
          ``training_curves.png`` in ``OUTPUT_DIR``).
        """
        # DefaultTrainer.__init__ has just created self.checkpointer and builds the hooks next:
        # swap in CMRCNNCheckpointer (more weight layouts, atomic saves) with DefaultTrainer's
        # arguments and checkpointables, before PeriodicCheckpointer takes it.
        solver = self.cfg.SOLVER.CMRCNN
        self.checkpointer = CMRCNNCheckpointer(
            self.model,
            self.cfg.OUTPUT_DIR,
            keep_checkpoints=solver.KEEP_CHECKPOINTS,
            trainer=weakref.proxy(self),
        )
        hooks = super().build_hooks()
        # Pre-emption: after the LR scheduler and the periodic checkpointer have handled the
        # step (its checkpoint is then what an uninterrupted run has), before any evaluation.
        later = [
            i
            for i, h in enumerate(hooks)
            if isinstance(h, (d2_hooks.EvalHook, d2_hooks.PeriodicWriter))
        ]
        hooks.insert(later[0] if later else len(hooks), PreemptionHook(solver.STOP_SIGNALS))
        if self.cfg.TEST.AUG.ENABLED:
            tta = d2_hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            writers = [i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.PeriodicWriter)]
            hooks.insert(writers[0] if writers else len(hooks), tta)
        # RNGStateHook before the checkpointer: exact resume (cmrcnn_ext/engine/resume.py, rng.py).
        first = [NonFiniteLossGuard(), RNGStateHook(), DataSummaryHook(self.cfg)]
        return first + hooks + [RunReportHook(self.cfg)]

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD, or AdamW when ``SOLVER.CMRCNN.OPTIMIZER`` is "AdamW".

        Both use Detectron2's parameter groups and gradient clipping, so the LR schedule,
        SOLVER.WEIGHT_DECAY_NORM / BIAS_LR_FACTOR and SOLVER.CLIP_GRADIENTS act the same way.
        """
        name = cfg.SOLVER.get("CMRCNN", {}).get("OPTIMIZER", "SGD")
        check_values({"SOLVER.CMRCNN.OPTIMIZER": name})
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        from detectron2.solver.build import (
            get_default_optimizer_params,
            maybe_add_gradient_clipping,
        )

        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(float(b) for b in cfg.SOLVER.CMRCNN.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            **_adamw_kernel(model),
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training loader whose data stream continues where a resumed run
        stopped (see :func:`~cmrcnn_ext.engine.resume.build_resumable_train_loader`)."""
        return build_resumable_train_loader(cfg)

    def state_dict(self):
        """DefaultTrainer's state, with the optimizer's on Detectron2 v0.6 too (compat)."""
        return compat.add_inner_trainer_state(self, super().state_dict())

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        compat.load_inner_trainer_state(self, state_dict)


class _TimedModel(torch.nn.Module):
    """Calls ``model`` and adds up the wall time of its calls and the images they got."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds, self.images = 0.0, 0

    def forward(self, inputs):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = self.model(inputs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(inputs)
        return outputs


def _adamw_kernel(model):
    """``{"fused": True}`` when torch's fused AdamW kernel supports every parameter's device
    (CPU and CUDA in torch >= 2.4), else ``{}`` (torch's default kernel).

    The fused kernel does AdamW's update in one pass over each tensor instead of a loop over
    tensors (faster: docs/performance.md); it is the same update up to float rounding.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    if not params or not devices <= {"cpu", "cuda"}:
        return {}
    try:
        torch.optim.AdamW([torch.zeros(1, device=params[0].device)], fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused kernel for this device
        return {}
    return {"fused": True}

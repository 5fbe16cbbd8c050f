"""Test-time sweeps (``cmrcnn-tune sweep``): one trained checkpoint, evaluated once per setting
of the keys that only matter at inference (``MODEL.RPN.PRE/POST_NMS_TOPK_TEST``,
``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` / ``NMS_THRESH_TEST``, ``TEST.DETECTIONS_PER_IMAGE``, the
poolers' sampling ratio, ``MODEL.CMRCNN.TEST_MASK_MERGE`` ...). Nothing is retrained: a
setting costs one evaluation.

Each trial runs what ``train_net.py --eval-only MODEL.WEIGHTS <checkpoint> KEY VALUE ...``
runs, in the study's process: the config (validated), the data sets, the model built from it,
the checkpoint loaded for inference, ``Trainer.test`` (AP and inference ms/image), and
``results.json`` + ``config.yaml`` in the trial's folder. Its AP equals that command's (tested in
tests/test_tune_sweep.py).
"""

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

from cmrcnn_ext.errors import UserError
from cmrcnn_ext.tune.trial import TrialFailed, checked_config, config_opts

__all__ = ["SweepRunner"]


@dataclass
class SweepRunner:
    """Evaluates one checkpoint per trial (module docstring).

    Attributes:
        config_file: the config the checkpoint was trained with (path or packaged name).
        weights: the checkpoint (``model_final.pth``, a Detectron2 ``.pkl`` ...).
        opts: the study's ``KEY VALUE`` overrides (data flags included as config keys).
    """

    config_file: str
    weights: str
    opts: List[str] = field(default_factory=list)

    def run(self, trial, overrides: Dict[str, Any], trial_dir: str, prune: bool) -> Dict:
        """Evaluate with ``overrides``; returns the ``results.json`` content (+ wall seconds).

        Raises:
            TrialFailed: an invalid setting, or an evaluation that failed.
        """
        from cmrcnn_ext.data import register_project_datasets
        from cmrcnn_ext.engine import Trainer
        from cmrcnn_ext.engine.report import write_results

        start = time.perf_counter()
        opts = list(self.opts) + config_opts(overrides)
        opts += ["MODEL.WEIGHTS", self.weights, "OUTPUT_DIR", trial_dir]
        cfg = checked_config(self.config_file, opts)
        os.makedirs(trial_dir, exist_ok=True)
        try:
            register_project_datasets(cfg)
            cfg.freeze()
            with open(os.path.join(trial_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(cfg.dump())
            _, results, _ = Trainer.evaluate_checkpoint(cfg)
        except UserError as e:
            raise TrialFailed(str(e)) from None
        except (RuntimeError, ValueError, MemoryError) as e:  # e.g. out of memory
            raise TrialFailed(f"{type(e).__name__}: {e}") from None
        seconds = time.perf_counter() - start
        write_results(
            trial_dir,
            dict(results),
            {"eval": seconds},
            cfg,
            {"weights": os.path.abspath(self.weights)},
        )
        return {"results": dict(results), "wall_seconds": seconds}

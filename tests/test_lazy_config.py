"""The LazyConfig twins of the R50-FPN YAML configs (cmrcnn_ext/configs/lazy/).

Each lazy config must build the YAML config's model (same modules, parameters and settings),
data mappers, optimizer, LR schedule and training options, and train one step the way
Detectron2's tools/lazyconfig_train_net.py does, on a tiny synthetic data set.
"""

import math
import os

import numpy as np
import pytest
import torch

import cmrcnn_ext

# Detectron2's model-zoo Python configs that the lazy configs load with model_zoo.get_config.
COMMON = [
    "common/models/cascade_rcnn.py",
    "common/data/coco.py",
    "common/optim.py",
    "common/coco_schedule.py",
    "common/train.py",
]
PAIRS = [  # (lazy config, its YAML config)
    ("lazy/cascade_mask_rcnn_R_50_FPN_1x.py", "cascade_mask_rcnn_R_50_FPN_1x.yaml"),
    ("lazy/cascade_mask_rcnn_R_50_FPN_3x.py", "cascade_mask_rcnn_R_50_FPN_3x.yaml"),
]


def _missing_lazy_support():
    """What the installed Detectron2 lacks for the lazy configs, or None."""
    try:
        from detectron2.config import LazyConfig, instantiate  # noqa: F401
        from detectron2.model_zoo import get_config, get_config_file  # noqa: F401
    except ImportError as e:
        return f"installed Detectron2 has no LazyConfig / model_zoo.get_config: {e}"
    for path in COMMON:
        try:
            get_config_file(path)
        except RuntimeError:
            return f"installed Detectron2 lacks its model-zoo config configs/{path}"
    return None


_MISSING = _missing_lazy_support()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


def _load(name):
    from detectron2.config import LazyConfig

    return LazyConfig.load(cmrcnn_ext.model_zoo.get_config_file(name))


def _yaml(name, *opts):
    cfg = cmrcnn_ext.model_zoo.get_config(name)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _describe(obj, depth=0):
    """Plain-data description of a setting: lists for ListConfig / tuples, the attributes of
    helper objects (Matcher, Box2BoxTransform, ...), class names for modules, no tensors."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, (list, tuple, ListConfig)):
        return [_describe(o, depth) for o in obj]
    if isinstance(obj, (dict, DictConfig)):
        return {k: _describe(v, depth) for k, v in obj.items()}
    leaf = isinstance(obj, (torch.nn.Module, torch.Tensor)) or not hasattr(obj, "__dict__")
    if leaf or depth >= 2:
        return type(obj).__name__
    return type(obj).__name__, {k: _describe(v, depth + 1) for k, v in vars(obj).items()}


def _settings(model):
    """{module name: (class name, public non-tensor attributes)} of every submodule."""
    out = {}
    for name, m in model.named_modules():
        attrs = {k: _describe(v) for k, v in vars(m).items() if not k.startswith("_")}
        if isinstance(attrs.get("loss_weight"), dict):  # FastRCNNOutputLayers: missing = 1.0
            attrs["loss_weight"] = {
                k: attrs["loss_weight"].get(k, 1.0) for k in ("loss_cls", "loss_box_reg")
            }
        out[name] = (type(m).__name__, attrs)
    return out


def _assert_same_model(lazy_model, yaml_model):
    a, b = _settings(lazy_model), _settings(yaml_model)
    assert list(a) == list(b), "different module trees"
    diffs = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not diffs, f"settings differ (lazy, yaml): {diffs}"
    assert _shapes(lazy_model) == _shapes(yaml_model)
    assert _trained(lazy_model) == _trained(yaml_model)  # FREEZE_AT 2: same frozen parameters


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _trained(model):
    return [k for k, p in model.named_parameters() if p.requires_grad]


def _mapper_state(mapper):
    """A DatasetMapper's settings: its augmentations' classes and attributes, image format, mask
    and box options."""
    state = {k: _describe(v) for k, v in vars(mapper).items() if k != "augmentations"}
    state["augmentations"] = [
        (type(a).__name__, _describe(vars(a))) for a in mapper.augmentations.augs
    ]
    return state


def _param_groups(optimizer):
    """The optimizer's groups: hyperparameters and number of parameters.

    ``foreach`` (torch's multi-tensor kernel, the same update) is left out: Detectron2 main's
    YAML ``build_optimizer`` sets it, its lazy ``common/optim.py`` leaves torch's default.
    """
    return [
        {**{k: v for k, v in g.items() if k not in ("params", "foreach")}, "n": len(g["params"])}
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("lazy_name,yaml_name", PAIRS)
def test_lazy_config_equals_yaml_config(lazy_name, yaml_name):
    from detectron2.config import instantiate
    from detectron2.data import DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler

    from cmrcnn_ext.engine.trainer import Trainer
    from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator

    lazy, ycfg = _load(lazy_name), _yaml(yaml_name)
    lazy_model, yaml_model = instantiate(lazy.model), build_model(ycfg)
    _assert_same_model(lazy_model, yaml_model)
    rh = lazy_model.roi_heads
    assert type(rh).__name__ == ycfg.MODEL.ROI_HEADS.NAME == "CascadeMaskROIHeads"
    assert type(rh.mask_head).__name__ == ycfg.MODEL.ROI_MASK_HEAD.NAME
    assert (rh.mask_stages, list(rh.stage_loss_weights), rh.test_mask_merge) == (
        ycfg.MODEL.CMRCNN.MASK_STAGES,
        list(ycfg.MODEL.CMRCNN.STAGE_LOSS_WEIGHTS),
        ycfg.MODEL.CMRCNN.TEST_MASK_MERGE,
    )
    assert [m.thresholds[1] for m in rh.proposal_matchers] == list(
        ycfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS
    )

    # data: the lazy training mapper is DatasetMapper(cfg, True) of the YAML config; the test
    # mapper resizes the same way (Detectron2 writes ResizeShortestEdge(800) with "range"
    # sampling where the YAML builds "choice" of (800,): both always give 800) and reads the
    # same image format (at test time annotations are dropped, mask options do not matter).
    assert _mapper_state(instantiate(lazy.dataloader.train.mapper)) == _mapper_state(
        DatasetMapper(ycfg, True)
    )
    lazy_test, yaml_test = instantiate(lazy.dataloader.test.mapper), DatasetMapper(ycfg, False)
    assert not lazy_test.is_train and lazy_test.image_format == yaml_test.image_format
    for mapper in (lazy_test, yaml_test):
        (resize,) = mapper.augmentations.augs
        assert set(resize.short_edge_length) == {ycfg.INPUT.MIN_SIZE_TEST}
        assert resize.max_size == ycfg.INPUT.MAX_SIZE_TEST
    for split, yaml_names in (("train", ycfg.DATASETS.TRAIN), ("test", ycfg.DATASETS.TEST)):
        names = lazy.dataloader[split].dataset.names
        assert ([names] if isinstance(names, str) else list(names)) == list(yaml_names)
    assert lazy.dataloader.train.total_batch_size == ycfg.SOLVER.IMS_PER_BATCH
    assert lazy.dataloader.train.num_workers == ycfg.DATALOADER.NUM_WORKERS
    assert lazy.dataloader.evaluator._target_ is FastCOCOEvaluator
    assert ycfg.TEST.CMRCNN.EVALUATOR == "faster"

    # optimizer: the same parameter groups and hyperparameters as the YAML trainer's SGD
    yaml_opt = Trainer.build_optimizer(ycfg, yaml_model)
    lazy.optimizer.params.model = lazy_model
    lazy_opt = instantiate(lazy.optimizer)
    assert type(lazy_opt) is type(yaml_opt)
    assert _param_groups(lazy_opt) == _param_groups(yaml_opt)

    # LR schedule (warmup, steps) and training length, checkpoints, evaluation, weights
    yaml_mult = build_lr_scheduler(ycfg, yaml_opt)._multiplier
    lazy_mult = instantiate(lazy.lr_multiplier)
    max_iter = ycfg.SOLVER.MAX_ITER
    steps = list(ycfg.SOLVER.STEPS)
    for it in [0, 1, 500, 999, 1000, steps[0] - 1, steps[0], steps[1] - 1, steps[1], max_iter - 1]:
        assert math.isclose(lazy_mult(it / lazy.train.max_iter), yaml_mult(it / max_iter)), it
    train = lazy.train
    assert (train.max_iter, train.checkpointer.period, train.eval_period) == (
        max_iter,
        ycfg.SOLVER.CHECKPOINT_PERIOD,
        ycfg.TEST.EVAL_PERIOD,
    )
    assert train.init_checkpoint == ycfg.MODEL.WEIGHTS
    assert train.amp.enabled == ycfg.SOLVER.AMP.ENABLED


def test_all_mask_stages_recipe_matches_yaml():
    """The module docstring's recipe for mask_stages="all" (one head per stage in a
    ModuleList) builds the ROI heads of the YAML config with MASK_STAGES all."""
    import torch.nn as nn
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import build_roi_heads

    lazy = _load(PAIRS[0][0])
    rh = lazy.model.roi_heads
    head = rh.mask_head
    head.num_classes = "${....num_classes}"
    rh.update(mask_stages="all", stage_loss_weights=[1.0, 0.5, 0.25], test_mask_merge="mean")
    rh.mask_head = L(nn.ModuleList)(modules=[head, head, head])
    ycfg = _yaml(
        PAIRS[0][1],
        "MODEL.CMRCNN.MASK_STAGES",
        "all",
        "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS",
        [1.0, 0.5, 0.25],
        "MODEL.CMRCNN.TEST_MASK_MERGE",
        "mean",
    )
    shapes = {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(2, 7)}
    lazy_heads, yaml_heads = instantiate(rh), build_roi_heads(ycfg, shapes)
    _assert_same_model(lazy_heads, yaml_heads)
    assert len(lazy_heads.mask_head) == 3 and lazy_heads.test_mask_merge == "mean"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A registered 2-image data set: filled rectangles with polygon masks, 3 classes."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode
    from PIL import Image

    root = tmp_path_factory.mktemp("lazy_tiny")
    rng = np.random.default_rng(0)
    dicts = []
    for i in range(2):
        img = rng.integers(90, 140, (96, 128, 3), dtype=np.uint8)
        annos = []
        for k in range(3):
            x0, y0 = int(rng.integers(0, 80)), int(rng.integers(0, 50))
            x1, y1 = x0 + int(rng.integers(16, 48)), y0 + int(rng.integers(16, 46))
            img[y0:y1, x0:x1] = (60 * k + 40, 200 - 50 * k, 30)
            annos.append(
                {
                    "bbox": [x0, y0, x1, y1],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": k,
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
        path = str(root / f"{i}.png")
        Image.fromarray(img).save(path)
        dicts.append(
            {"file_name": path, "image_id": i, "height": 96, "width": 128, "annotations": annos}
        )
    name = f"cmrcnn_lazy_tiny_{os.getpid()}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.mark.parametrize("lazy_name", [p[0] for p in PAIRS])
def test_one_lazyconfig_train_net_step(lazy_name, tiny_dataset):
    """One iteration of lazyconfig_train_net.py's do_train(): the R50-FPN model and optimizer as
    configured, with a small input size, fewer proposals and the tiny data set instead of COCO."""
    import detectron2.data.transforms as T
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.engine.defaults import create_ddp_model

    cfg = _load(lazy_name)
    cfg.train.device = "cpu"
    cfg.model.proposal_generator.pre_nms_topk = (200, 100)
    cfg.model.proposal_generator.post_nms_topk = (100, 50)
    cfg.model.roi_heads.batch_size_per_image = 64
    cfg.dataloader.train.dataset.names = tiny_dataset
    cfg.dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(96,), max_size=128, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ]
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0

    # as do_train() (no checkpointer: MODEL.WEIGHTS would be downloaded; no writers)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = SimpleTrainer(model, train_loader, optim)
    trainer.register_hooks(
        [hooks.IterationTimer(), hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))]
    )
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    trainer.train(0, 1)

    losses = {k: v[0] for k, v in trainer.storage.latest().items() if k.startswith("loss")}
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"} | {
        f"loss_{t}_stage{s}" for t in ("cls", "box_reg") for s in range(3)
    }
    assert set(losses) == expected
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert losses["loss_mask"] > 0
    # warmup: the first iteration's LR is 0.001 x 0.02
    assert math.isclose(trainer.storage.latest()["lr"][0], 0.02 * 0.001, rel_tol=1e-6)
    changed = [
        k
        for k, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p.detach(), before[k])
    ]
    assert any(k.startswith("roi_heads.mask_head") for k in changed)
    assert any(k.startswith("backbone.bottom_up.res3") for k in changed)

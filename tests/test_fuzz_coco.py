"""600 mutated COCO files (tests/fixtures/coco_fuzz.py): each loads with its problems counted, or
stops with the project's own error naming the file; nothing escapes from inside Detectron2, numpy,
pycocotools or faster-coco-eval, in loading, in the training mapper's conversion, or in the COCO
evaluator's reading of the (cleaned) file."""

import collections
import contextlib
import io
import json
import os

from coco_fuzz import mutations
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from cmrcnn_ext.data.coco import load_coco_instances, prepare_coco
from cmrcnn_ext.errors import UserError

from reliability_helpers import make_data

NUM_FILES = 600


def _valid_file(root):
    """The synthetic 64 px set, with every segmentation kind: compressed RLE (the generator's),
    one polygon, one uncompressed RLE and one crowd region."""
    make_data(root, num_train=4, num_val=0)
    with open(root / "train.json") as f:
        data = json.load(f)
    anns = data["annotations"]
    x, y, w, h = anns[0]["bbox"]
    anns[0]["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    anns[1]["segmentation"] = {"counts": [64 * 10, 64 * 4, 64 * 50], "size": [64, 64]}
    anns[1]["bbox"] = [0, 10, 64, 4]
    anns[2]["iscrowd"] = 1
    return data


def _consume(dicts):
    """What training does with the records (Detectron2's mapper without reading the images)
    and what the COCO evaluator does with the file."""
    for d in dicts:
        shape = (d["height"], d["width"])
        annos = [
            utils.transform_instance_annotations(a, T.TransformList([]), shape)
            for a in d["annotations"]
            if a.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, shape, mask_format="bitmask")
        utils.filter_empty_instances(instances)


def _evaluator_reads(json_file):
    import faster_coco_eval
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        COCO(json_file)
        faster_coco_eval.COCO(json_file)


def test_mutated_coco_files_load_or_fail_with_our_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    valid = _valid_file(tmp_path)
    image_root = str(tmp_path / "train")
    outcomes = collections.Counter()
    unhandled, unnamed = [], []
    for i, (name, text) in enumerate(mutations(valid, NUM_FILES, seed=0)):
        path = tmp_path / f"fuzz_{i:04d}.json"
        path.write_text(text, encoding="utf-8")
        try:
            report, use_json = prepare_coco(str(path), image_root)
            dicts = load_coco_instances(str(path), image_root)
            _consume(dicts)
            _evaluator_reads(use_json)
        except UserError as e:
            outcomes[f"refused: {type(e).__name__}"] += 1
            if os.path.basename(path) not in str(e):
                unnamed.append((name, str(e)[:200]))
        except Exception as e:  # noqa: BLE001 - what the test looks for
            unhandled.append((name, f"{type(e).__name__}: {str(e)[:200]}"))
        else:
            cleaned = report.needs_cleaning
            outcomes["loaded, items skipped or repaired" if cleaned else "loaded as is"] += 1
    print("\nfuzzed COCO files:", NUM_FILES, dict(outcomes), "unhandled:", len(unhandled))
    assert not unhandled, "\n".join(f"{n} -> {e}" for n, e in unhandled[:30])
    assert not unnamed, "\n".join(f"{n} -> {e}" for n, e in unnamed[:30])
    assert sum(outcomes.values()) == NUM_FILES
    assert outcomes["loaded as is"] < NUM_FILES // 4  # the mutations do break things

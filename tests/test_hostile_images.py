"""Hostile images in training / evaluation data and in the prediction CLI: empty, truncated and
corrupt files, a decompression bomb, 16-bit / palette / CMYK images, an extreme aspect ratio and
a size that differs from the JSON (cmrcnn_ext/data/coco_items.py probe_image,
cmrcnn_ext/apps/predict.py)."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from PIL import Image

from cmrcnn_ext.data.coco import load_coco_instances, prepare_coco

from conftest import DEMO_CONFIG, tiny_cfg

GOOD = ["good.png", "sixteen_bit.png", "palette.png", "cmyk.jpg"]
BAD = {
    "empty.png": "empty file",
    "truncated.png": "cannot decode",
    "truncated.jpg": "cannot decode",
    "not_an_image.jpg": "cannot decode",
    "bomb.png": "decompression bomb",
    "wide.png": "extreme aspect ratio",
}


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path, side=30000):
    """A 30000 x 30000 grey PNG header with a few rows of data: ~900 M pixels declared, 10x
    Pillow's limit, in a file of a few hundred bytes (never decoded by the code under test)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def make_images(folder):
    """The good and bad files of GOOD / BAD in ``folder``, plus ``small.png`` (48 x 48)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).save(folder / "sixteen_bit.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[:48, :48]).save(folder / "small.png")
    (folder / "empty.png").write_bytes(b"")
    png = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(rgb).save(folder / "full.jpg", quality=90)
    jpg = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (folder / "full.jpg").unlink()
    (folder / "not_an_image.jpg").write_text("<html>404</html>")
    _bomb(folder / "bomb.png")
    Image.fromarray(np.zeros((1, 300, 3), np.uint8)).save(folder / "wide.png")


def _coco(folder):
    names = GOOD + list(BAD) + ["small.png"]
    images, anns = [], []
    for i, name in enumerate(names, start=1):
        size = (
            (300, 1) if name == "wide.png" else (30000, 30000) if name == "bomb.png" else (64, 64)
        )
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        anns.append(
            {"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
             "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]}
        )  # fmt: skip
        if name != "wide.png":
            anns[-1]["bbox"] = [10, 10, 20, 20]
            anns[-1]["segmentation"] = [[10, 10, 30, 10, 30, 30, 10, 30]]
            anns[-1]["area"] = 400
    path = folder / "data.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))  # fmt: skip
    return str(path)


def test_training_and_evaluation_data_skip_hostile_images_and_read_the_odd_ones(tmp_path):
    folder = tmp_path / "images"
    make_images(folder)
    json_file = _coco(folder)
    report, _ = prepare_coco(json_file, str(folder))
    dicts = load_coco_instances(json_file, str(folder))
    assert sorted(d["file_name"].rsplit("/", 1)[-1] for d in dicts) == sorted(GOOD)
    assert report.skipped["unreadable_image"] == 4  # empty, 2 truncated, not an image
    assert report.skipped["image_too_large"] == 1 and report.skipped["extreme_aspect_ratio"] == 1
    assert report.skipped["image_size_mismatch"] == 1  # small.png: the JSON says 64 x 64
    examples = " ".join(e for v in report.examples.values() for e in v)
    for name, reason in BAD.items():
        assert f"'{name}'): {reason}" in examples, (name, examples)
    # Detectron2's training mapper reads the kept ones (16-bit, palette, CMYK) as 3-channel
    cfg = tiny_cfg("INPUT.MASK_FORMAT", "bitmask")
    mapper = DatasetMapper(cfg, is_train=True)
    for d in dicts:
        out = mapper(dict(d))
        assert out["image"].shape[0] == 3 and out["image"].dtype == torch.uint8
        assert len(out["instances"]) == 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _predict(folder, out, weights, *extra):
    from cmrcnn_ext.apps import predict

    argv = ["--config-file", DEMO_CONFIG, "--weights", weights, "--input", str(folder)]
    argv += ["--output", str(out), "--device", "cpu", *extra]
    return predict.main(argv + ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])


def test_predict_cli_predicts_the_good_files_and_lists_the_bad_ones(tmp_path, weights, capsys):
    folder = tmp_path / "images"
    make_images(folder)
    out = tmp_path / "pred"
    _predict(folder, out, weights)
    printed = capsys.readouterr().out
    skipped = json.loads((out / "skipped_inputs.json").read_text())
    assert {k.rsplit("/", 1)[-1]: v for k, v in skipped.items()}.keys() == set(BAD)
    for path, reason in skipped.items():
        assert BAD[path.rsplit("/", 1)[-1]] in reason, (path, reason)
        assert path in printed
    pictures = {p.name for p in out.glob("*.png")}
    for name in GOOD + ["small.png"]:
        assert any(name.rsplit(".", 1)[0] in p for p in pictures), (name, pictures)
    with pytest.raises(SystemExit) as info:
        _predict(folder, tmp_path / "strict", weights, "--strict")
    assert info.value.code == 1

"""Checks of single items of a COCO file: an image on disk, one annotation, one segmentation.

Used by :func:`cmrcnn_ext.data.coco_check.check_coco`; each returns the cleaned item or the
reason it is skipped, and counts repairs in the report (``report.fixed``).
"""

import math
import os
import warnings

import pycocotools.mask as mask_util
from PIL import Image

__all__ = ["check_annotation", "locate_image", "probe_image"]

_EXIF_ORIENTATION = 0x0112


def _numbers(values, n=None):
    """Whether ``values`` is a list of finite numbers (of length ``n``)."""
    return (
        isinstance(values, (list, tuple))
        and (n is None or len(values) == n)
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
    )


#: Images more elongated than this are refused: Detectron2's resize would make their short side
#: 0 px at common sizes (ratio > 2 x INPUT.MAX_SIZE_*), and no detector learns from them.
MAX_ASPECT_RATIO = 200


def probe_image(path, decode=True):
    """(width, height) as Detectron2's ``read_image`` sees it (EXIF applied), or an error str.

    Refused, with the reason: a missing or 0-byte file, one Pillow cannot decode (truncated,
    corrupt, not an image), a decompression bomb (more pixels than Pillow's
    ``Image.MAX_IMAGE_PIXELS``, checked before anything is decoded), an aspect ratio above
    :data:`MAX_ASPECT_RATIO`. With ``decode=False`` only the header is read (a caller that
    decodes the image next reports its decode errors with :func:`decode_error`).
    """
    if not os.path.isfile(path):
        return "file not found"
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its pixel limit and raises above: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
                if decode and img.format == "JPEG":  # 1/8 scale: still reads the whole stream
                    img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
                if decode:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb refused ({e})"
    except Exception as e:  # PIL raises many types for bad files
        return decode_error(e)
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return f"extreme aspect ratio {w}x{h} (more than {MAX_ASPECT_RATIO}:1)"
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_error(exc):
    """The reason text of an image that cannot be decoded."""
    return f"cannot decode ({type(exc).__name__}: {exc})"


def locate_image(image_root, file_name):
    """``(file_name to use, repair or None)``: the name as given if that file exists, else an
    exporter's variant that exists (Windows separators; the image folder's own name repeated)."""
    if os.path.isfile(os.path.join(image_root, file_name)):
        return file_name, None
    candidates = []
    if "\\" in file_name:
        candidates.append((file_name.replace("\\", "/"), "file_name_separator"))
    name = candidates[0][0] if candidates else file_name
    folder = os.path.basename(os.path.normpath(image_root))
    if folder and name.startswith(folder + "/"):
        candidates.append((name[len(folder) + 1 :], "file_name_without_folder"))
    for candidate, repair in candidates:
        if os.path.isfile(os.path.join(image_root, candidate)):
            return candidate, repair
    return file_name, None


#: Polygon coordinates may lie this many image sizes outside the image (objects cut by the
#: border); farther ones are annotation errors, and overflow pycocotools' rasteriser.
_FAR = 10


def _near_image(poly, h, w):
    size = max(h, w)
    return all(-_FAR * size <= v <= (_FAR + 1) * size for v in poly)


def _span(poly):
    return f"{min(poly):.6g}..{max(poly):.6g}"


def _compressed_rle_total(text):
    """The sum of the run lengths of a COCO compressed RLE string, or -1 if it is malformed.

    The format (pycocotools ``rleToString``): each count is a little-endian sequence of
    characters ``48 + 6 bits``, 5 value bits per character, bit 0x20 = "more follows", bit 0x10
    of the last one = negative; counts after the second are stored as differences to the count
    two places before. A garbled string would make pycocotools fail later, in the data loader
    or the evaluator ("Invalid RLE mask representation"), or read past its end.
    """
    counts, i, n = [], 0, len(text)
    while i < n:
        x, k, more = 0, 0, True
        while more:
            if i >= n:
                return -1  # the last count is cut off
            c = ord(text[i]) - 48
            if not 0 <= c < 64:
                return -1
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return -1
        counts.append(x)
    return sum(counts)


def _check_segmentation(segm, h, w, report, what):
    """Returns (cleaned segmentation, RLE, skip reason); drops bad polygons (counted)."""
    if isinstance(segm, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in segm):
            segm = [segm]  # one flat polygon: unambiguous, read as [[x1, y1, ...]]
            report.fixed["flat_polygon_read_as_one"] += 1
        elif not all(isinstance(p, list) for p in segm):
            return None, None, "segmentation_mixed"
        polys = []
        for poly in segm:
            if not _numbers(poly):
                report.skip("polygon_not_numeric", what)
            elif len(poly) % 2:
                report.skip("polygon_odd_coordinates", f"{what}: {len(poly)} coordinates")
            elif len(poly) < 6:
                report.skip("polygon_too_few_points", f"{what}: {len(poly) // 2} points")
            elif not _near_image(poly, h, w):
                # pycocotools rasterises in C int arithmetic: such coordinates overflow it
                report.skip("polygon_far_outside_image", f"{what}: coordinates {_span(poly)}")
            else:
                polys.append(poly)
        if not polys:
            return None, None, "no_valid_polygon"
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        if mask_util.area(rle) > 0:
            return polys, rle, None
        xs, ys = [x for p in polys for x in p[0::2]], [y for p in polys for y in p[1::2]]
        outside = max(xs) <= 0 or min(xs) >= w or max(ys) <= 0 or min(ys) >= h
        return None, None, "outside_image" if outside else "empty_segmentation"
    if not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
        return None, None, "invalid_segmentation"
    counts = segm["counts"]
    try:
        if list(segm["size"]) != [h, w]:
            return None, None, "invalid_rle"
        if isinstance(counts, list):
            if not _numbers(counts) or sum(counts) != h * w:
                return None, None, "invalid_rle"
            rle = mask_util.frPyObjects(segm, h, w)
        else:
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            if not isinstance(text, str) or _compressed_rle_total(text) != h * w:
                return None, None, "invalid_rle"
            rle = {"size": [h, w], "counts": text.encode("ascii")}
        area = mask_util.area(rle)
    except Exception:  # malformed size or compressed counts
        return None, None, "invalid_rle"
    return (segm, rle, None) if area > 0 else (None, None, "empty_segmentation")


def _iscrowd(value):
    """0/1 of an ``iscrowd`` given as number, bool or text; None if unreadable."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    return None


def check_annotation(ann, h, w, has_masks, report):
    """Returns the cleaned annotation, or None if skipped (counted in ``report``)."""
    what, out = f"annotation id={ann['id']} (image id={ann['image_id']})", dict(ann)
    if ann.get("ignore", 0):  # detectron2 asserts on it
        return report.skip("ignore_flag", what)
    if "iscrowd" not in ann:  # COCOeval needs it
        out["iscrowd"] = 0
        report.fixed["iscrowd_added"] += 1
    elif type(ann["iscrowd"]) is not int or ann["iscrowd"] not in (0, 1):
        crowd = _iscrowd(ann["iscrowd"])
        if crowd is None:
            return report.skip("invalid_iscrowd", f"{what}: iscrowd={ann['iscrowd']!r:.30}")
        out["iscrowd"] = crowd
        report.fixed["iscrowd_to_int"] += 1
    segm, rle, kind = ann.get("segmentation"), None, "none"
    if segm:
        segm, rle, reason = _check_segmentation(segm, h, w, report, what)
        if reason:
            return report.skip(reason, what)
        out["segmentation"] = segm
        kind = "polygon" if isinstance(segm, list) else "rle"
        kind = "uncompressed_rle" if kind == "rle" and isinstance(segm["counts"], list) else kind
    elif has_masks and not out["iscrowd"]:  # the mapper needs masks on all or none
        return report.skip("missing_segmentation", f"{what}: other annotations have masks")
    else:
        out.pop("segmentation", None)  # an empty list of a box-only annotation
    box = ann.get("bbox")
    if box is None and rle is not None:
        out["bbox"] = box = [float(v) for v in mask_util.toBbox(rle)]
        report.fixed["bbox_from_segmentation"] += 1
    if not _numbers(box, 4) or box[2] <= 0 or box[3] <= 0:
        return report.skip("invalid_bbox", f"{what}: bbox={box!r:.60}")
    if box[0] >= w or box[1] >= h or box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
        return report.skip("outside_image", f"{what}: bbox={box} vs {w}x{h} image")
    area = ann.get("area")
    valid_area = (
        isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area)
    )
    if not valid_area or area <= 0:  # COCOeval's area ranges need it
        out["area"] = float(mask_util.area(rle)) if rle is not None else box[2] * box[3]
        report.fixed["area_added" if "area" not in ann else "area_recomputed"] += 1
    report.segmentation_types[kind] += 1
    return out

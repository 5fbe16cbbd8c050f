"""Checking a user's COCO instances JSON: what is wrong, what is skipped, what is fixed.

:func:`check_coco` reads a file and returns a :class:`ValidationReport` and the cleaned data.
Structural problems raise one :class:`CocoDataError` that lists every problem with the file and
the ids; unusable single items (degenerate boxes or polygons, masks outside the image, missing
or undecodable images) are skipped and counted per reason; the habits of common exporters are
repaired and counted (:data:`~cmrcnn_ext.data.coco_report.FIX_HINTS`). Nothing is dropped or
changed silently: the report's :meth:`~cmrcnn_ext.data.coco_report.ValidationReport.summary`
names every count and how to fix the file.
"""

import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from cmrcnn_ext.data.coco_items import check_annotation, locate_image, probe_image
from cmrcnn_ext.data.coco_report import ValidationReport
from cmrcnn_ext.errors import UserError

__all__ = ["CocoDataError", "ValidationReport", "check_coco", "read_coco_json"]

_MAX_LISTED = 20  # problems listed in a CocoDataError before "... and N more"
_ID = (int, str)  # the types of image and annotation ids


class CocoDataError(UserError, ValueError):
    """A COCO JSON file that cannot be used; ``problems`` lists every problem found."""

    def __init__(self, json_file, problems):
        self.json_file, self.problems = os.fspath(json_file), list(problems)
        lines = [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - _MAX_LISTED} more")
        head = f"{len(self.problems)} problem(s) in COCO file '{self.json_file}':\n"
        super().__init__(head + "\n".join(lines))


def read_coco_json(json_file):
    """The parsed JSON of a COCO instances file, with its three lists; raises CocoDataError."""
    path = os.fspath(json_file)
    if not os.path.isfile(path):
        raise CocoDataError(path, [f"file not found (cwd: {os.getcwd()}); check the JSON path"])
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        msg = f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise CocoDataError(
            path, [msg + "; the file is truncated or not JSON, re-export it"]
        ) from e
    except (UnicodeDecodeError, OSError) as e:
        raise CocoDataError(
            path, [f"cannot read the file ({e}); re-export it as UTF-8 JSON"]
        ) from e
    if not isinstance(data, dict):
        raise CocoDataError(path, ["the top level is not a JSON object; expected a COCO dict"])
    fix = "a COCO instances file needs 'images', 'annotations' and 'categories' lists ([] if none)"
    missing = [
        k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if missing:
        found = f"found keys: {sorted(data)}"
        raise CocoDataError(
            path, [f"missing top-level key '{k}' ({found}); {fix}" for k in missing]
        )
    return data


def _int_text(value):
    """An int given as text ("3", " 3") as int; anything else unchanged."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value


def _normalize_categories(data, fixed):
    """Copy of ``data`` with exporters' category habits repaired (counted in ``fixed``): text
    ids, numeric names, an unused background category."""
    cats, anns = [], data["annotations"]
    for c in data["categories"]:
        if isinstance(c, dict):
            c = dict(c)
            if isinstance(c.get("id"), str) and isinstance(_int_text(c["id"]), int):
                c["id"] = _int_text(c["id"])
                fixed["category_id_from_text"] += 1
            if isinstance(c.get("name"), (int, float)) and not isinstance(c.get("name"), bool):
                c["name"] = str(c["name"])
                fixed["category_name_to_text"] += 1
        cats.append(c)
    if fixed["category_id_from_text"]:
        anns = [
            dict(a, category_id=_int_text(a["category_id"]))
            if isinstance(a, dict) and isinstance(a.get("category_id"), str)
            else a
            for a in anns
        ]
    used = {a.get("category_id") for a in anns if isinstance(a, dict) and _hashable(a)}
    kept = []
    for c in cats:
        name = c.get("name") if isinstance(c, dict) else None
        if (
            isinstance(name, str)
            and name.strip("_ ").lower() == "background"
            and isinstance(c.get("id"), int)
            and c.get("id") not in used
        ):
            fixed["unused_background_category_dropped"] += 1
            continue
        kept.append(c)
    return dict(data, categories=kept, annotations=anns)


def _check_categories(data, problems):
    """Appends problems; returns the valid categories sorted by id."""
    names_by_id, ids_by_name = defaultdict(list), defaultdict(list)
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            problems.append(f"categories[{i}] = {c!r:.80} needs an integer 'id' and a 'name'")
        elif not isinstance(c["name"], str) or not c["name"].strip():
            problems.append(f"category id={c['id']} has the name {c['name']!r}; give it a name")
        else:
            names_by_id[c["id"]].append(c["name"])
            ids_by_name[c["name"]].append(c["id"])
    problems.extend(
        f"category id={i} is defined {len(n)} times ({n}); give every category a unique id"
        for i, n in names_by_id.items()
        if len(n) > 1
    )
    problems.extend(
        f"categories {ids} are all named {name!r}; class names must be unique (merge them or "
        "rename one)"
        for name, ids in ids_by_name.items()
        if len(set(ids)) > 1
    )
    valid = [
        c
        for c in data["categories"]
        if isinstance(c, dict) and isinstance(c.get("id"), int) and c["id"] in names_by_id
    ]
    return sorted(valid, key=lambda c: c["id"])


def _probe_reason(problem):
    """The skip reason of an image :func:`probe_image` refused."""
    if problem.startswith("decompression bomb"):
        return "image_too_large"
    if problem.startswith("extreme aspect ratio"):
        return "extreme_aspect_ratio"
    return "unreadable_image"


def _hashable(ann):
    """Whether an annotation's ``category_id`` can be looked up (not a list or dict)."""
    return not isinstance(ann.get("category_id"), (list, dict))


def categories_of(json_file):
    """The normalised, validated categories of a COCO JSON sorted by id; raises CocoDataError."""
    data, problems = _normalize_categories(read_coco_json(json_file), Counter()), []
    categories = _check_categories(data, problems)
    if problems:
        raise CocoDataError(json_file, problems)
    return categories


def _check_structure(data, check_images):
    """Returns (problems, categories sorted by id, annotations per image id)."""
    problems = []
    add = problems.append
    categories = _check_categories(data, problems)
    cat_ids = [c["id"] for c in categories]
    if not data["images"]:
        add("'images' is empty: no images to train on; check that you exported the right split")
    img_ids, ids_by_name, ann_ids, anns_by_img = Counter(), defaultdict(set), Counter(), {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), _ID):
            add(f"images[{i}] = {img!r:.80} needs an integer 'id' and a 'file_name'")
            continue
        img_ids[img["id"]] += 1
        what, anns_by_img[img["id"]] = f"image id={img['id']}", []
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            add(f"{what} has no 'file_name'; add the image's path relative to image_root")
        else:
            ids_by_name[os.path.normpath(img["file_name"])].add(img["id"])
        for key in ("height", "width"):
            if key in img and not (type(img[key]) is int and img[key] > 0):
                add(f"{what} has {key}={img[key]!r:.30}; it must be an integer > 0")
            elif key not in img and not check_images:
                add(f"{what} has no '{key}'; add it, or validate with check_images=True")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), _ID):
            add(f"annotations[{i}] = {ann!r:.80} needs an integer 'id'; give each a unique id")
            continue
        ann_ids[ann["id"]] += 1
        what, image_id = f"annotation id={ann['id']}", ann.get("image_id")
        if isinstance(image_id, _ID) and image_id in anns_by_img:
            anns_by_img[image_id].append(ann)
        else:
            add(
                f"{what} refers to image_id={image_id!r:.30}, not in 'images'; add it or drop "
                f"{what}"
            )
        if type(ann.get("category_id")) is not int or ann["category_id"] not in cat_ids:
            add(
                f"{what} (image id={image_id!r:.30}) has "
                f"category_id={ann.get('category_id')!r:.30}, "
                f"which is not in 'categories' (ids {cat_ids}); add that category or fix it"
            )
    for kind, counts in (("image", img_ids), ("annotation", ann_ids)):
        problems += [
            f"{kind} id={i!r} is used {n} times; give every {kind} a unique id"
            for i, n in counts.items()
            if n > 1
        ]
    problems += [
        f"file_name '{name}' is listed under image ids {sorted(ids, key=str)}; keep one entry "
        "and move the others' annotations to its id"
        for name, ids in ids_by_name.items()
        if len(ids) > 1
    ]
    return problems, categories, anns_by_img


def _renumber_annotations(anns, report):
    """Give annotations whose id pycocotools cannot use (0, which its COCOeval takes for
    "unmatched", or text) new ids above the largest one, in place (counted)."""
    bad = [a for a in anns if type(a["id"]) is not int or a["id"] <= 0]
    if not bad:
        return
    next_id = max([a["id"] for a in anns if type(a["id"]) is int] + [0]) + 1
    for ann in bad:
        ann["id"], next_id = next_id, next_id + 1
        report.fixed["annotation_id_renumbered"] += 1


def check_coco(json_file, image_root, check_images=True):
    """Validate a COCO instances JSON (and its images).

    Args:
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder that image ``file_name``s (sub-folders allowed)
            are relative to.
        check_images (bool): open and decode every image; missing, corrupt or wrongly sized
            ones are skipped. If False, every image needs ``width`` and ``height`` in the JSON.

    Returns:
        tuple: ``(ValidationReport, cleaned COCO dict)``.

    Raises:
        CocoDataError: missing file, invalid JSON, missing top-level keys, duplicate image /
            annotation / category ids, category names or file names, unknown image / category
            ids, no (usable) images, or every annotation unusable. The message lists every
            problem found.
    """
    path, image_root = os.fspath(json_file), os.fspath(image_root)
    fixed = Counter()
    data = _normalize_categories(read_coco_json(path), fixed)
    problems, categories, anns_by_img = _check_structure(data, check_images)
    if problems:
        raise CocoDataError(path, problems)
    images, anns = data["images"], data["annotations"]
    report = ValidationReport(path, image_root, categories, len(images), len(anns), fixed=fixed)
    names = [img["file_name"] for img in images]
    probes = [None] * len(images)
    if check_images:
        located = [locate_image(image_root, n) for n in names]
        for _, repair in located:
            if repair:
                report.fixed[repair] += 1
        names = [n for n, _ in located]
        paths = [os.path.join(image_root, n) for n in names]
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
            probes = list(pool.map(probe_image, paths))
    has_masks = any(a.get("segmentation") for a in anns)
    class_of = {c["id"]: c["name"] for c in categories}
    kept_images, kept_anns = [], []
    for img, name, probe in zip(images, names, probes):
        img, reason = dict(img, file_name=name), None
        if probe == "file not found":
            reason, msg = "missing_image", f"not found under image_root '{image_root}'"
        elif isinstance(probe, str):
            reason, msg = _probe_reason(probe), probe
        elif probe is not None and ("width" not in img or "height" not in img):
            img["width"], img["height"] = probe
            report.fixed["size_from_image"] += 1
        elif probe is not None and probe != (img["width"], img["height"]):
            reason = "image_size_mismatch"
            msg = f"the JSON says {img['width']}x{img['height']}, the image (after EXIF rotation)"
            msg += f" is {probe[0]}x{probe[1]}"
        if reason:
            report.skip(reason, f"image id={img['id']} ('{img['file_name']}'): {msg}")
            for ann in anns_by_img[img["id"]]:
                report.skip("annotation_of_skipped_image", f"annotation id={ann['id']}")
            continue
        kept_images.append(img)
        for ann in anns_by_img[img["id"]]:
            ann = check_annotation(ann, img["height"], img["width"], has_masks, report)
            if ann is not None:
                kept_anns.append(ann)
                report.instances[class_of[ann["category_id"]]] += 0 if ann["iscrowd"] else 1
    report.num_images, report.num_annotations = len(kept_images), len(kept_anns)
    if not kept_images:
        raise CocoDataError(
            path,
            [f"none of the {len(images)} images is usable; check image_root '{image_root}'"]
            + [f"{r}: {e}" for r, examples in report.examples.items() for e in examples],
        )
    if anns and not kept_anns:
        raise CocoDataError(
            path,
            [
                f"all {len(anns)} annotations were dropped ({len(kept_images)} of {len(images)} "
                "images usable); fix the file so that at least some annotations are usable:"
            ]
            + report.problem_lines(),
        )
    _renumber_annotations(kept_anns, report)
    return report, dict(data, images=kept_images, annotations=kept_anns)

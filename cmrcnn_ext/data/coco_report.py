"""What the check of a COCO file found: kept, skipped (and why), repaired, classes; and the
one-line hints that tell a user how to fix each reason."""

from collections import Counter, defaultdict
from dataclasses import dataclass, field

__all__ = ["FIX_HINTS", "SKIP_HINTS", "ValidationReport"]

_MAX_EXAMPLES = 5  # example ids kept per skip reason
#: How to fix each skip reason (printed in the summary).
SKIP_HINTS = {
    "invalid_bbox": "bbox must be 4 finite numbers [x, y, w, h] with w, h > 0",
    "polygon_too_few_points": "a polygon needs >= 3 points",
    "polygon_odd_coordinates": "a polygon is [x1, y1, x2, y2, ...]",
    "polygon_not_numeric": "each polygon must be a list of finite numbers",
    "polygon_far_outside_image": "polygon coordinates more than 10 image sizes outside the "
    "image; check the coordinates (pixels, not normalised) and the image size",
    "segmentation_mixed": "a segmentation is a list of polygons [[x1, y1, ...], ...], one "
    "flat polygon [x1, y1, ...], or an RLE dict, not a mix of numbers and lists",
    "invalid_segmentation": "a segmentation is a list of polygons or an RLE dict",
    "no_valid_polygon": "no usable polygon left; fix or delete the annotation",
    "outside_image": "the object lies outside the image; check coordinates / image size",
    "empty_segmentation": "the mask has no pixels",
    "invalid_rle": "RLE size must be [height, width] of the image and counts must sum to h*w",
    "missing_segmentation": "give every non-crowd annotation a mask (or none of them)",
    "ignore_flag": "use iscrowd=1 instead of 'ignore'",
    "missing_image": "copy the image or fix file_name / the image folder",
    "unreadable_image": "re-save or delete the image",
    "image_too_large": "more pixels than Pillow's limit (Image.MAX_IMAGE_PIXELS, a guard against "
    "decompression bombs); downscale it, or raise the limit if you trust the file",
    "extreme_aspect_ratio": "more than 200:1; crop or pad it",
    "image_size_mismatch": "fix width/height in the JSON",
    "annotation_of_skipped_image": "its image was skipped",
}
#: What each repair means (printed in the summary): exporters' habits read as intended.
FIX_HINTS = {
    "flat_polygon_read_as_one": 'a flat "segmentation": [x1, y1, ...] read as one polygon',
    "area_added": "area computed from the mask (or box)",
    "area_recomputed": "area <= 0 recomputed from the mask (or box)",
    "iscrowd_added": "iscrowd 0 added",
    "iscrowd_to_int": "iscrowd given as true/false or text, read as 0/1",
    "bbox_from_segmentation": "bbox computed from the mask",
    "size_from_image": "width/height read from the image",
    "annotation_id_renumbered": "annotation ids that pycocotools cannot use (0: its 'unmatched', "
    "text) given new numbers above the largest",
    "category_id_from_text": 'category ids given as text ("3") read as numbers',
    "category_name_to_text": "category names given as numbers written as text",
    "unused_background_category_dropped": "a 'background' category without annotations "
    "(labelme's _background_) dropped: Detectron2 adds its own background class",
    "file_name_separator": "Windows path separators in file_name read as '/'",
    "file_name_without_folder": "file_name repeating the image folder's name read relative to it",
}


@dataclass
class ValidationReport:
    """What :func:`check_coco` found.

    Attributes:
        categories: the ``categories`` entries (normalised) sorted by id: the class order.
        num_images / num_annotations: kept; ``total_images`` / ``total_annotations``: in file.
        skipped: count per reason of skipped images, annotations and (``polygon_*``) polygons.
        examples: per reason, up to 5 descriptions naming the image / annotation id.
        fixed: count per repair (:data:`FIX_HINTS`).
        segmentation_types: kept annotations per ``polygon``/``rle``/``uncompressed_rle``/``none``.
        instances: kept non-crowd annotations per category name.
    """

    json_file: str
    image_root: str
    categories: list = field(default_factory=list)
    total_images: int = 0
    total_annotations: int = 0
    num_images: int = 0
    num_annotations: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    fixed: Counter = field(default_factory=Counter)
    segmentation_types: Counter = field(default_factory=Counter)
    instances: Counter = field(default_factory=Counter)

    @property
    def thing_classes(self):
        """Class names in category-id order (index = Detectron2's contiguous id)."""
        return [c["name"] for c in self.categories]

    @property
    def id_map(self):
        """Dataset category id -> contiguous id, as ``load_coco_json`` builds it."""
        return {c["id"]: i for i, c in enumerate(self.categories)}

    @property
    def needs_cleaning(self):
        """Whether the usable data differs from the file (something skipped or repaired)."""
        return bool(sum(self.skipped.values()) or sum(self.fixed.values()))

    @property
    def has_rle(self):
        """RLE masks need ``INPUT.MASK_FORMAT = "bitmask"`` in Detectron2's mapper."""
        return bool(self.segmentation_types["rle"] + self.segmentation_types["uncompressed_rle"])

    @property
    def has_masks(self):
        """Whether any kept annotation has a segmentation."""
        return sum(self.segmentation_types.values()) > self.segmentation_types["none"]

    def skip(self, reason, what):
        """Counts one skipped item (returns None, for ``return report.skip(...)``)."""
        self.skipped[reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(what)

    def problem_lines(self):
        """The summary's lines about skipped and repaired items (for error messages)."""
        lines = [line.strip() for line in self.summary().splitlines()[1:]]
        return [line for line in lines if not line.startswith("instances per class")]

    def summary(self):
        """Multi-line, human-readable summary: kept / dropped with reasons, repairs, classes."""
        lines = [
            f"COCO file '{self.json_file}': kept {self.num_images}/{self.total_images} images, "
            f"{self.num_annotations}/{self.total_annotations} annotations, "
            f"{len(self.categories)} categories."
        ]
        for reason, n in sorted(self.skipped.items()):
            hint = f" ({SKIP_HINTS[reason]})" if reason in SKIP_HINTS else ""
            lines.append(
                f"  skipped {n} x {reason}{hint}, e.g. " + "; ".join(self.examples[reason])
            )
        for key, n in sorted(self.fixed.items()):
            hint = f" ({FIX_HINTS[key]})" if key in FIX_HINTS else ""
            lines.append(f"  repaired {n} x {key}{hint}")
        counts = ", ".join(f"{name}: {self.instances[name]}" for name in self.thing_classes)
        lines.append(f"  instances per class: {counts}")
        return "\n".join(lines)

"""A faster ROIAlign for the CPU, with the same numbers as torchvision's.

ROIAlign (He et al., "Mask R-CNN") averages bilinear samples of a feature map on a regular grid
in each output bin. Every output value is therefore a fixed weighted sum of at most
``4 * grid_h * grid_w`` input values, so the whole operator is a sparse linear map. This module
computes the sample indices and bilinear weights with the exact rules of torchvision's kernel
(sample positions, the ``aligned`` half-pixel offset, the adaptive grid of
``sampling_ratio=0``, clamping at the borders, zero outside ``[-1, size]``) and applies them with
``torch.nn.functional.embedding_bag``: a multi-threaded gather-and-sum forward and, for the
adaptive grid, a transposed gather as backward (:class:`_WeightedGather`), where torchvision's
CPU backward is single-threaded. Results equal
torchvision's up to float rounding (about 1e-6 relative; tested).

Used by :class:`~cmrcnn_ext.modeling.roi_heads.CascadeMaskROIHeads` when
``MODEL.CMRCNN.FAST_ROI_ALIGN`` is true and the model runs on the CPU, in training and inference,
with a fixed or the adaptive grid (``sampling_ratio=0``). On CUDA torchvision's kernel is used
(there it is the faster one).
"""

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


def _axis(start, length, pooled, grid, grid_max, size):
    """Feature-map indices and summed bilinear weights along one axis.

    The samples of one bin and their two corners each cover a short run of consecutive
    indices ``first .. first + span - 1`` (sample positions increase inside a bin): the weights
    of corners that fall on the same index are added, so a bin with ``g`` samples reads about
    ``g + 1`` rows instead of ``2 g`` (and ``(g + 1)^2`` feature vectors per bin in 2-D instead
    of ``4 g^2``). Sums of the same terms as torchvision's kernel, in another order.

    Args:
        start, length (Tensor): (R,) ROI start and length in feature-map pixels.
        pooled (int): output bins along this axis.
        grid (Tensor): (R,) samples per bin for each ROI (its adaptive or fixed grid).
        grid_max (int): the largest value of ``grid``.
        size (int): feature-map length along this axis.

    Returns:
        (idx, weight, span): (R, pooled, L) indices and weights, L the longest run; (R,) the
        longest run of each ROI (entries beyond it have weight 0).
    """
    bin_size = length / pooled
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    i = torch.arange(grid_max, device=start.device, dtype=start.dtype)
    # same expression as torchvision: start + p * bin + (i + .5) * bin / grid
    pos = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None]
    )
    used = (i[None, :] < grid[:, None]).unsqueeze(1)  # (R, 1, grid_max)
    inside = (pos >= -1.0) & (pos <= size) & used
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low
    weight = torch.stack([1 - frac, frac], -1) * inside.unsqueeze(-1)  # (R, pooled, grid_max, 2)
    r = start.shape[0]
    # run of indices of each bin: from its first sample's low corner to its last sample's high one
    first = low[:, :, 0]
    last_sample = (grid.long().clamp(min=1) - 1)[:, None, None].expand(r, pooled, 1)
    last = high.gather(2, last_sample).squeeze(2)
    span = (last - first + 1).amax(dim=1)  # (R,)
    runs = int(span.max())
    # unused samples (weight 0) may lie beyond the run: any offset in range will do
    offset = (torch.stack([low, high], -1) - first[:, :, None, None]).clamp(0, runs - 1)
    merged = weight.new_zeros(r, pooled, runs).scatter_add_(
        2, offset.reshape(r, pooled, -1), weight.reshape(r, pooled, -1)
    )
    steps = torch.arange(runs, device=start.device)
    idx = (first[:, :, None] + steps).clamp(max=size - 1)
    return idx, merged, span


# id(features) -> (weak reference to features, features._version, table): the (pixel, channel)
# table of a feature map, shared by the poolers of one inference forward (three box stages and
# the mask pooler read the same FPN levels). An entry goes when its feature map is freed.
_TABLES = {}


def _feature_table(features):
    """Row-major (pixel, channel) copy of (N, C, H, W) ``features``: one row per feature vector,
    as ``embedding_bag`` gathers them. A view for channels-last features; for NCHW ones a copy
    (for N == 1 reshape would return a column-major view, on which the gather is much slower).

    Without autograd the copy is made once per feature map and reused (R50-FPN, 800 x 1067: 75 MB
    per image that three box stages and the mask pooler would otherwise copy again)."""
    n, c, h, w = features.shape
    if features.requires_grad and torch.is_grad_enabled():
        return features.permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous()
    key = id(features)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is features and hit[1] == features._version:
        return hit[2]
    table = features.permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous()
    ref = weakref.ref(features, lambda _ref, key=key: _forget_table(key, _ref))
    _TABLES[key] = (ref, features._version, table)
    return table


def _forget_table(key, ref):
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is ref:
        del _TABLES[key]


def _bin_entries(batch, iy, wy, ix, wx, count, h, w):
    """For each of the R * ph * pw bins, the (Ly * Lx) table rows it sums and their weights
    wy * wx / count: two (R * ph * pw, Ly * Lx) tensors."""
    r, ph, ly = iy.shape
    pw, lx = ix.shape[1], ix.shape[2]
    idx = (batch[:, None, None, None, None] * h + iy[:, :, None, :, None]) * w + ix[
        :, None, :, None, :
    ]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :] / count[:, None, None, None, None]
    return idx.reshape(r * ph * pw, ly * lx), weight.reshape(r * ph * pw, ly * lx)


def _gather_bins(table, batch, iy, wy, ix, wx, count, h, w):
    """(R, ph, pw, C): for each bin, the sum over its (Ly x Lx) feature vectors of table rows,
    weighted by wy * wx / count; one ``embedding_bag`` call."""
    r, ph, pw = iy.shape[0], iy.shape[1], ix.shape[1]
    idx, weight = _bin_entries(batch, iy, wy, ix, wx, count, h, w)
    out = F.embedding_bag(idx, table, per_sample_weights=weight, mode="sum")
    return out.reshape(r, ph, pw, -1)


def _run_length_groups(sizes, kinds, lx):
    """For each run-length group (``sizes == kind``, ``kind = Ly * (lx + 1) + Lx``): its ROIs'
    indices and its run lengths Ly and Lx."""
    for kind in kinds.tolist():
        sy, sx = divmod(kind, lx + 1)
        yield (sizes == kind).nonzero().squeeze(1), sy, sx


def _gather_bins_trainable(table, batch, iy, wy, ix, wx, count, h, w, sizes, kinds):
    """:func:`_gather_bins` for the adaptive grid under autograd: the bins of every run-length
    group in one :class:`_WeightedGather` call (one backward pass over the table instead of one
    full-size table gradient per group)."""
    r, ph, pw = iy.shape[0], iy.shape[1], ix.shape[1]
    lx = ix.shape[2]
    bins = ph * pw
    flat_idx, flat_w, lengths, order = [], [], [], []
    for sel, sy, sx in _run_length_groups(sizes, kinds, lx):
        idx, weight = _bin_entries(
            batch[sel], iy[sel, :, :sy], wy[sel, :, :sy], ix[sel, :, :sx], wx[sel, :, :sx],
            count[sel], h, w,
        )  # fmt: skip
        flat_idx.append(idx.reshape(-1))
        flat_w.append(weight.reshape(-1))
        lengths.append(
            torch.full((idx.shape[0],), idx.shape[1], dtype=torch.long, device=idx.device)
        )
        order.append((sel[:, None] * bins + torch.arange(bins, device=sel.device)).reshape(-1))
    lengths = torch.cat(lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    got = _WeightedGather.apply(
        table, torch.cat(flat_idx), offsets, lengths, torch.cat(flat_w).detach()
    )
    out = got.new_empty((r * bins, got.shape[1]))
    out = out.index_copy(0, torch.cat(order), got)
    return out.reshape(r, ph, pw, -1)


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum of weight[e] * table[idx[e]]`` over the entries ``e`` of bag ``b`` (bags
    are consecutive runs of ``lengths`` entries), with the transposed gather as backward.

    The gradient of a table row is the weighted sum of the output gradients of the bags that read
    it. Sorting the (bag, row) entries by row turns that into another ``embedding_bag`` (one bag
    per row read), which runs in parallel over rows without write conflicts; ``embedding_bag``'s
    own backward scatter-adds serially. Equal to torchvision's ROIAlign gradient up to float
    rounding (the sums run in another order; ``tests/test_layers.py``). The weights depend on
    the ROIs only, which Detectron2 detaches: they get no gradient.
    """

    @staticmethod
    def forward(ctx, table, idx, offsets, lengths, weight):
        ctx.save_for_backward(idx, lengths, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(idx, table, offsets, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, lengths, weight = ctx.saved_tensors
        order = torch.argsort(idx)
        rows, counts = torch.unique_consecutive(idx[order], return_counts=True)
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=idx.device), lengths)
        per_row = F.embedding_bag(
            bag[order],
            grad.contiguous(),
            torch.cumsum(counts, 0) - counts,
            per_sample_weights=weight[order].to(grad.dtype),
            mode="sum",
        )
        out = grad.new_zeros((ctx.rows, grad.shape[1]))
        out[rows] = per_row
        return out, None, None, None, None


def roi_align_gather(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """ROIAlign with torchvision's arguments and results, computed as a weighted gather.

    Args:
        features (Tensor): (N, C, H, W).
        rois (Tensor): (R, 5) rows of (batch index, x0, y0, x1, y1) in image coordinates.
        output_size (tuple[int, int]): (pooled_h, pooled_w).
        spatial_scale (float): feature-map size / image size.
        sampling_ratio (int): samples per bin along each axis; 0 = adaptive
            (``ceil(roi_size / pooled)``, per ROI).
        aligned (bool): shift boxes by -0.5 pixel (ROIAlignV2).

    Returns:
        Tensor: (R, C, pooled_h, pooled_w) (a channels-last view).
    """
    n, c, h, w = features.shape
    ph, pw = output_size
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros((0, c, ph, pw))
    # Sample positions and weights in float32 at least: in bfloat16 (CPU autocast) a position
    # near 64 would be rounded to 0.25 feature pixel. torchvision's autocast ROIAlign computes
    # in float32 as well and returns the input's dtype, as this function does.
    out_dtype = features.dtype
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    rois = rois.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    rw = rois[:, 3] * spatial_scale - offset - x0
    rh = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # torchvision forces malformed ROIs to 1x1 in the legacy mode
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gy = torch.full_like(rh, sampling_ratio)
        gx = torch.full_like(rw, sampling_ratio)
    else:
        # per ROI, as torchvision; a zero-size ROI gets a 0-sample grid and outputs 0
        gy, gx = torch.ceil(rh / ph), torch.ceil(rw / pw)
    gy_max, gx_max = max(1, int(gy.max())), max(1, int(gx.max()))
    iy, wy, span_y = _axis(y0, rh, ph, gy, gy_max, h)  # (R, ph, Ly)
    ix, wx, span_x = _axis(x0, rw, pw, gx, gx_max, w)  # (R, pw, Lx)
    count = (gy * gx).clamp(min=1)
    batch = rois[:, 0].long()
    table = _feature_table(features)
    ly, lx = iy.shape[2], ix.shape[2]
    sizes = span_y * (lx + 1) + span_x
    kinds = torch.unique(sizes)
    # ROIs of different sizes (adaptive grids) need runs of different lengths: padded to the
    # longest, small ROIs would read mostly zero-weight entries; grouped by run lengths, each
    # group reads only its own.
    needed = int((span_y * span_x).sum())
    if sampling_ratio <= 0 and table.requires_grad and torch.is_grad_enabled():
        out = _gather_bins_trainable(table, batch, iy, wy, ix, wx, count, h, w, sizes, kinds)
    elif len(kinds) == 1 or needed > 0.6 * r * ly * lx:
        out = _gather_bins(table, batch, iy, wy, ix, wx, count, h, w)
    else:
        out = features.new_empty((r, ph, pw, c))
        for sel, sy, sx in _run_length_groups(sizes, kinds, lx):
            out[sel] = _gather_bins(
                table,
                batch[sel],
                iy[sel, :, :sy],
                wy[sel, :, :sy],
                ix[sel, :, :sx],
                wx[sel, :, :sx],
                count[sel],
                h,
                w,
            )
    return out.permute(0, 3, 1, 2).to(out_dtype)


class FastROIAlign(nn.Module):
    """Drop-in for ``detectron2.layers.ROIAlign``: gather-based on the CPU, torchvision on CUDA.

    Args:
        output_size (int or tuple): pooled size.
        spatial_scale (float): feature-map size / image size.
        sampling_ratio (int): samples per bin per axis, 0 = adaptive.
        aligned (bool): ROIAlignV2's half-pixel shift.
    """

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=True):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    @classmethod
    def from_roi_align(cls, module):
        """Build from a Detectron2 ``ROIAlign`` module with the same settings."""
        return cls(module.output_size, module.spatial_scale, module.sampling_ratio, module.aligned)

    def forward(self, input, rois):
        # On the CPU the gather is faster than torchvision's serial kernel in both directions
        # (docs/performance.md); on CUDA torchvision's kernel is the faster one.
        if input.is_cuda or torch.jit.is_scripting() or torch.jit.is_tracing():
            return roi_align(
                input,
                rois.to(input.dtype),
                self.output_size,
                self.spatial_scale,
                self.sampling_ratio,
                self.aligned,
            )
        return roi_align_gather(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self):
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


def use_fast_roi_align(pooler):
    """Replace the ``ROIAlign`` / ``ROIAlignV2`` level poolers of a Detectron2 ``ROIPooler``.

    Returns the number of level poolers replaced (0 for other pooler types).
    """
    from detectron2.layers import ROIAlign

    replaced = 0
    for i, level in enumerate(pooler.level_poolers):
        if isinstance(level, ROIAlign):
            pooler.level_poolers[i] = FastROIAlign.from_roi_align(level)
            replaced += 1
    return replaced


__all__ = ["FastROIAlign", "roi_align_gather", "use_fast_roi_align"]

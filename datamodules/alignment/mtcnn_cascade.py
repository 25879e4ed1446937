"""MTCNN's three-stage cascade over a batch, with every crop taken in one ``roi_align`` call.

facenet-pytorch ships the trained P-, R- and O-nets and the box arithmetic of the original
MTCNN (Zhang et al., 2016); its ``detect_face`` crops each candidate box with its own resize
call, thousands of small calls per batch of scenes. Here the candidates of a whole batch are
cropped and resampled at once with ``torchvision.ops.roi_align`` (adaptive sampling averages
each output cell like an area resize; outside the image it reads zeros, MTCNN's original
padding). The networks, thresholds, pyramid scales and NMS settings are facenet-pytorch's; the
pyramid's levels are antialiased bilinear resizes of the uint8 image (facenet-pytorch area-resizes
float images: same recall and landmark error on SynthAU, the pyramid in less than half the time).
"""

from __future__ import annotations

import torch
from facenet_pytorch.models.utils.detect_face import bbreg, generateBoundingBox, rerec
from torch.nn.functional import interpolate
from torchvision.ops import batched_nms, roi_align


def _pyramid(h: int, w: int, min_face_size: int, factor: float) -> list[float]:
    m = 12.0 / min_face_size
    minl = min(h, w) * m
    scales, scale = [], m
    while minl >= 12:
        scales.append(scale)
        scale *= factor
        minl *= factor
    return scales


def _crops(imgs: torch.Tensor, boxes: torch.Tensor, image_inds: torch.Tensor, size: int) -> torch.Tensor:
    """Square boxes (x0, y0, x1, y1 in pixel-index convention) -> (n, 3, size, size), normalised."""
    b = boxes[:, :4].trunc()
    # Pixel columns x0-1 .. x1-1 as in MTCNN's 1-based crops; aligned=True puts pixel i on [i, i+1).
    rois = torch.stack([image_inds.to(b), b[:, 0] - 1, b[:, 1] - 1, b[:, 2], b[:, 3]], 1)
    out = roi_align(imgs, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return (out - 127.5) * 0.0078125


def _no_faces(b: int, grouped: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """What the cascade answers for ``b`` images without a face: empty boxes, scores, landmarks
    (and with ``grouped``, empty groups)."""
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))
    return [empty + (torch.zeros(0, dtype=torch.long),) if grouped else empty] * b


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, threshold: float) -> torch.Tensor:
    """NMS whose overlap is intersection over the smaller box (MTCNN's last stage), per image."""
    order = scores.argsort(descending=True)
    keep = []
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(boxes[i, 0], boxes[:, 0])
        yy1 = torch.maximum(boxes[i, 1], boxes[:, 1])
        xx2 = torch.minimum(boxes[i, 2], boxes[:, 2])
        yy2 = torch.minimum(boxes[i, 3], boxes[:, 3])
        inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
        overlap = inter / torch.minimum(area[i], area)
        suppressed |= (overlap > threshold) & (idxs == idxs[i])
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)


@torch.inference_mode()
def detect_batch(imgs: torch.Tensor, pnet, rnet, onet, min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709):
    """Faces in a batch of same-size images (B, H, W, 3) uint8/float on the nets' device.

    Returns per image: boxes (n, 4), scores (n,), landmarks (n, 5, 2), as CPU float tensors.
    """
    nchw = imgs.permute(0, 3, 1, 2)  # a view: channels-last memory, which the nets run fastest on
    boxes, inds = _propose(nchw, pnet, min_face_size, thresholds[0], factor)
    if len(boxes) == 0:
        return _no_faces(nchw.shape[0])
    return _refine(nchw.contiguous().float(), boxes, inds, nchw.shape[0], rnet, onet, thresholds)


def _propose(nchw: torch.Tensor, pnet, min_face_size: int, threshold: float, factor: float):
    """Stage 1: P-net's candidate boxes (n, 5) over the pyramid, squared, and their image indices."""
    b, _, h, w = nchw.shape
    # Stage 1: P-net over the pyramid. Each level is an antialiased bilinear resize of the uint8
    # copy: torch has a vectorised CPU path for uint8 channels-last images, and antialiasing keeps
    # the small levels as smooth as an area resize would.
    source = nchw if nchw.dtype == torch.uint8 and nchw.device.type == "cpu" else nchw.float()
    all_boxes, all_inds = [], []
    for scale in _pyramid(h, w, min_face_size, factor):
        level = interpolate(source, size=(int(h * scale + 1), int(w * scale + 1)), mode="bilinear",
                            antialias=True, align_corners=False)
        reg, probs = pnet((level.float() - 127.5) * 0.0078125)
        boxes, inds = generateBoundingBox(reg, probs[:, 1], scale, threshold)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.5)
        all_boxes.append(boxes[keep])
        all_inds.append(inds[keep])
    boxes, inds = torch.cat(all_boxes), torch.cat(all_inds)
    if len(boxes) == 0:
        return boxes[:, :5], inds
    keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    boxes, inds = boxes[keep], inds[keep]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], 1)
    boxes = rerec(boxes)
    return boxes, inds


def _best_per_group(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Indices of the highest score of each group."""
    order = scores.argsort(descending=True, stable=True)
    seen, keep = set(), []
    for i, g in zip(order.tolist(), groups[order].tolist()):
        if g not in seen:
            seen.add(g)
            keep.append(i)
    return torch.as_tensor(keep, dtype=torch.long, device=scores.device)


def _refine(imgs: torch.Tensor, boxes: torch.Tensor, inds: torch.Tensor, b: int, rnet, onet,
            thresholds: tuple[float, float, float], groups: torch.Tensor | None = None):
    """Stages 2 and 3 on square candidate boxes (n, 4+) of images ``inds`` in float NCHW ``imgs``.
    ``groups``: candidates around one known face share a group, of which only R-net's best goes on
    to O-net (instead of what survives non-maximum suppression); each face found then also
    carries its group (-1: found among the candidates of no group)."""
    grouped = groups is not None
    # Stage 2: R-net on 24x24 crops of every candidate at once (roi_align reads contiguous NCHW).
    reg, score = rnet(_crops(imgs, boxes, inds, 24))
    score = score[:, 1]
    ok = score > thresholds[1]
    boxes = torch.cat([boxes[ok, :4], score[ok, None]], 1)
    inds, reg = inds[ok], reg[ok]
    if len(boxes) == 0:
        return _no_faces(b, grouped)
    if not grouped:
        keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    else:  # the best of each group; candidates of no group (-1) through non-maximum suppression
        groups = groups[ok]
        around, free = (groups >= 0).nonzero()[:, 0], (groups < 0).nonzero()[:, 0]
        keep = torch.cat([around[_best_per_group(boxes[around, 4], groups[around])],
                          free[batched_nms(boxes[free, :4], boxes[free, 4], inds[free], 0.7)]])
        groups = groups[keep]
    boxes, inds, reg = boxes[keep], inds[keep], reg[keep]
    boxes = rerec(bbreg(boxes, reg))
    # Stage 3: O-net on 48x48 crops: final boxes, scores and the five landmarks.
    reg, points, score = onet(_crops(imgs, boxes, inds, 48))
    score = score[:, 1]
    ok = score > thresholds[2]
    boxes = torch.cat([boxes[ok, :4], score[ok, None]], 1)
    inds, reg, points = inds[ok], reg[ok], points[ok]
    if grouped:
        groups = groups[ok]
    if len(boxes) == 0:
        return _no_faces(b, grouped)
    bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    landmarks = torch.stack([bw * points[:, :5] + boxes[:, :1] - 1, bh * points[:, 5:] + boxes[:, 1:2] - 1], 2)
    boxes = bbreg(boxes, reg)
    keep = _nms_min(boxes[:, :4], boxes[:, 4], inds, 0.7)
    boxes, inds, landmarks = boxes[keep].cpu(), inds[keep].cpu(), landmarks[keep].cpu()
    if grouped:
        groups = groups[keep].cpu()
        return [(boxes[inds == i, :4], boxes[inds == i, 4], landmarks[inds == i], groups[inds == i]) for i in range(b)]
    return [(boxes[inds == i, :4], boxes[inds == i, 4], landmarks[inds == i]) for i in range(b)]


# Candidates around a face known in the previous frame: itself, moved a fifth of its side each
# way, and a size smaller and larger. R-net's box regression pulls each back onto the face; at
# video rates a face moves less than that between frames (faster ones are lost, and detected).
_SHIFTS = ((0.0, 0.0, 1.0), (-0.2, 0.0, 1.0), (0.2, 0.0, 1.0), (0.0, -0.2, 1.0), (0.0, 0.2, 1.0),
           (0.0, 0.0, 0.8), (0.0, 0.0, 1.25))
# A P-net candidate sharing this much of the smaller box with a known face is on that face.
KNOWN_OVERLAP = 0.3


def _overlap_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) intersection over the smaller box's area of boxes (n, 4) and (m, 4)."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(1), (b[:, 2:] - b[:, :2]).prod(1)
    return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-6)


@torch.inference_mode()
def propose_batch(imgs: torch.Tensor, pnet, min_face_size: int = 20, threshold: float = 0.6,
                  factor: float = 0.709) -> list[torch.Tensor]:
    """P-net's squared candidate boxes (n, 5) for each of same-size images (B, H, W, 3)."""
    nchw = imgs.permute(0, 3, 1, 2)
    boxes, inds = _propose(nchw, pnet, min_face_size, threshold, factor)
    return [boxes[inds == i] for i in range(nchw.shape[0])]


@torch.inference_mode()
def follow_batch(imgs: torch.Tensor, priors: list[torch.Tensor], proposals: list[torch.Tensor], rnet, onet,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)):
    """Faces of same-size images (B, H, W, 3) where boxes are known (``priors``: per image (n, 4)
    x0, y0, x1, y1, e.g. the faces of the frame before; ``proposals``: per image P-net's candidates,
    :func:`propose_batch`). Around each prior, candidates go to R-net and only its best to O-net;
    P-net's candidates away from every prior (a face entering) go the usual way. Most of a whole
    detection's cost is R- and O-net on the many candidates P-net puts around each face; here a
    known face costs seven R-net crops and one O-net crop. Returns what :func:`detect_batch` returns
    and, per face, the index of the prior it continues (-1: a face found among P-net's candidates).
    """
    nchw = imgs.permute(0, 3, 1, 2)
    device = imgs.device
    shifts = torch.tensor(_SHIFTS, device=device)
    boxes, inds, groups, known, first = [], [], [], 0, []
    for i, (prior, proposed) in enumerate(zip(priors, proposals)):
        first.append(known)
        proposed = proposed.to(device)
        if len(prior):
            prior = prior.float().to(device)
            side = torch.maximum(prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1])[:, None]
            cx = (prior[:, 0] + prior[:, 2])[:, None] / 2 + shifts[:, 0] * side
            cy = (prior[:, 1] + prior[:, 3])[:, None] / 2 + shifts[:, 1] * side
            half = side * shifts[:, 2] / 2
            boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half, torch.ones_like(cx)], 2).reshape(-1, 5))
            groups.append(torch.arange(known, known + len(prior), device=device).repeat_interleave(len(_SHIFTS)))
            inds.append(torch.full((len(boxes[-1]),), i, dtype=torch.long, device=device))
            known += len(prior)
            if len(proposed):  # P-net's candidates on a known face would only repeat it
                proposed = proposed[_overlap_min(proposed[:, :4], prior).amax(1) < KNOWN_OVERLAP]
        boxes.append(proposed)
        groups.append(torch.full((len(proposed),), -1, dtype=torch.long, device=device))
        inds.append(torch.full((len(proposed),), i, dtype=torch.long, device=device))
    boxes, inds, groups = torch.cat(boxes), torch.cat(inds), torch.cat(groups)
    if len(boxes) == 0:
        return _no_faces(nchw.shape[0], grouped=True)
    found = _refine(nchw.contiguous().float(), boxes, inds, nchw.shape[0], rnet, onet, thresholds, groups)
    # groups count the priors of all images: each image's from 0
    return [(b, s, p, torch.where(g >= 0, g - start, g)) for (b, s, p, g), start in zip(found, first)]

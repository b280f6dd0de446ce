"""Class labels and classifier-free guidance (ALGORITHMS.md section 9), as small pure functions.

A conditional target trained with label dropout predicts with a label c and with the null label. The
guided prediction is `uncond + s (cond - uncond)`: weights (1 - s, s) that sum to 1, so it is the same
affine combination whether formed on eps, x0 or v predictions, and the guided step is the usual
Gaussian step with the schedule's std. Speculative sampling is then exact with respect to the *guided*
ancestral sampler. Both rows go into one batched call of the network (two rows per state), except at
s = 1 (the conditional row alone) and s = 0 (the null row alone).
"""
from __future__ import annotations

import math
import numbers

import torch

NULL_LABEL = -1  # the label of an unconditional row (the null class of label dropout)


def num_classes_of(model) -> int:
    """Classes of a conditional target (0: unconditional), from its `num_classes` attribute."""
    return int(getattr(model, "num_classes", 0) or 0)


def label_values(labels, num_seeds: int, model) -> list[int] | None:
    """The samplers' `labels` argument checked, as a list of num_seeds ints (`NULL_LABEL` for unconditional
    rows); None for an unconditional target. Raises a one-line ValueError naming `labels` otherwise."""
    num_classes = num_classes_of(model)
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels: the target is unconditional (num_classes=0); sample it without labels, "
                             "or train a conditional target (net num_classes > 0, data label_column)")
        return None
    if labels is None:
        values = [NULL_LABEL] * num_seeds
    elif isinstance(labels, torch.Tensor):
        values = labels.reshape(-1).tolist()
    else:
        values = [NULL_LABEL if label is None else label for label in labels]
    if len(values) != num_seeds:
        raise ValueError(f"labels: got {len(values)} labels for {num_seeds} seeds; give one label per seed "
                         "(None or -1 for an unconditional sample)")
    bad = [v for v in values if not _is_int(v) or (v != NULL_LABEL and not 0 <= v < num_classes)]
    if bad:
        raise ValueError(f"labels: {bad[0]!r} is not a class of this target; labels must be ints in "
                         f"[0, {num_classes}) or None / -1 (unconditional)")
    return [int(v) for v in values]


def _is_int(value) -> bool:
    """An int (numpy's too: `numbers.Integral`), or a float with an integer value; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) or (
        isinstance(value, float) and value.is_integer())


def check_guidance(model, labels, guidance_scale) -> float:
    """The guidance scale as a float; one-line errors for a negative scale, a scale other than 1 without
    labels, and any use of the null branch on a target trained without label dropout (`p_uncond` 0).
    `labels`: a tensor or, read without a device sync, the list of `label_values`."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
            not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale: expected a number >= 0 (1: plain conditional, 0: unconditional), "
                         f"got {guidance_scale!r}")
    scale = float(guidance_scale)
    if labels is None:
        if scale != 1.0:
            raise ValueError(f"guidance_scale: {scale} needs a conditional target sampled with labels; this target "
                             "is unconditional: leave guidance_scale at 1")
        return scale
    uses_null = scale != 1.0 or NULL_LABEL in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    if uses_null and getattr(model, "p_uncond", None) == 0:
        raise ValueError(
            "guidance_scale: the target was trained without label dropout (p_uncond=0), so its unconditional "
            "prediction is untrained; sample with guidance_scale=1 and a label for every seed, or retrain with "
            "model.p_uncond > 0 (e.g. 0.1) (a diffusers UNet trained with a null class: declare it, null_class)")
    return scale


def call_network(model, x, t, labels, return_features: bool = False):
    """`model(x, t[, return_features=True][, labels=...])`: labels passed only when there are some, so
    unconditional networks keep the two-argument contract."""
    kwargs = {} if labels is None else {"labels": labels}
    if return_features:
        kwargs["return_features"] = True
    return model(x, t, **kwargs)


def guided_output(model, x, t, labels, scale: float, return_features: bool = False, dtype=None):
    """The network's (guided) prediction for rows x (B, ...) at timesteps t (B,) with labels (B,) (None:
    an unconditional target): `uncond + scale (cond - uncond)` from ONE call on 2B rows, formed in
    `dtype` (default: the network's). With `return_features`, (prediction, the conditional rows' features)."""
    if labels is None or scale == 1.0:
        return _as_dtype(call_network(model, x, t, labels, return_features), dtype)
    null = torch.full_like(labels, NULL_LABEL)
    if scale == 0.0:
        return _as_dtype(call_network(model, x, t, null, return_features), dtype)
    out = call_network(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), return_features)
    out, features = out if return_features else (out, None)
    cond, uncond = _as_dtype(out, dtype).chunk(2)
    guided = torch.lerp(uncond, cond, scale)  # uncond + scale (cond - uncond)
    return guided if features is None else (guided, _as_dtype(features[: len(x)], dtype))


def _as_dtype(out, dtype):
    if dtype is None:
        return out
    if isinstance(out, tuple):
        return tuple(o.to(dtype) for o in out)
    return out.to(dtype)


def rows_per_state(labels: torch.Tensor | None, scale: float) -> int:
    """Network rows per evaluated state: 2 when guidance needs the conditional and the null row."""
    return 1 if labels is None or scale in (0.0, 1.0) else 2


def class_grid_labels(num_samples: int, num_classes: int) -> list[int]:
    """`num_samples` labels in class order, floor(num_samples / num_classes) (at least 1) of each class and the
    remainder to the last class: every class appears when num_samples >= num_classes, and a grid with that
    many images per row shows one class per row."""
    per_class = max(1, num_samples // num_classes)
    return [min(i // per_class, num_classes - 1) for i in range(num_samples)]


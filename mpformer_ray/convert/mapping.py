"""Renaming a source checkpoint's tensors to our parameter names, accounting for every one of them.

A source format is a list of rules ``(regex, target)``: the first rule whose regex matches a source name
(``re.fullmatch``) decides its fate. ``target`` is a template with ``{1}``-style group references, which may
carry arithmetic on a group (``{1+1}``, ``{1*2+1}``: stage numbers differ between layouts), a ``Part`` (one
slice of a tensor we store concatenated along dim 0: separate q / k / v projections), or a ``Skip`` naming why
the tensor is not used. A source name no rule matches is an error, as is a target the model does not have, a
shape that differs, or a model tensor nothing fills (apart from those the caller initialises).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mpformer_ray.errors import UserError


class ConvertError(UserError, ValueError):
    """A source checkpoint does not fit: the message names the file, the tensor or config field, and the fix."""


@dataclass(frozen=True)
class Part:
    """Slice ``index`` of ``count`` of ``target``, concatenated along dim 0 in index order."""

    target: str
    index: int
    count: int


@dataclass(frozen=True)
class Skip:
    """A source tensor deliberately not used, and why."""

    reason: str


Rule = tuple[str, "str | Part | Skip"]
_GROUP = re.compile(r"\{(\d+)(?:\*(\d+))?(?:([+-])(\d+))?\}")


def _fill(template: str, match: re.Match) -> str:
    """``template`` with ``{g}``, ``{g+n}``, ``{g-n}``, ``{g*m}`` and ``{g*m+n}`` replaced from ``match``'s
    group g."""
    def one(ref: re.Match) -> str:
        group = match.group(int(ref.group(1)))
        if ref.group(2) is None and ref.group(3) is None:
            return group
        offset = int(ref.group(4) or 0) * (-1 if ref.group(3) == "-" else 1)
        return str(int(group) * int(ref.group(2) or 1) + offset)
    return _GROUP.sub(one, template)


@dataclass
class Mapped:
    """The outcome of ``apply_rules``: our tensors by name, the sources each came from, and the skipped ones."""

    state: dict[str, Tensor]
    sources: dict[str, list[str]]
    skipped: dict[str, str] = field(default_factory=dict)


def apply_rules(source: dict[str, Tensor], rules: Iterable[Rule], label: str) -> Mapped:
    """Rename every tensor of ``source`` by ``rules`` (module docstring). ConvertError naming ``label`` and
    every source tensor no rule matches, or a concatenated target with a slice missing."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    state: dict[str, Tensor] = {}
    sources: dict[str, list[str]] = {}
    parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}
    unknown = []
    for name, tensor in source.items():
        match, target = next(((m, t) for p, t in compiled if (m := p.fullmatch(name))), (None, None))
        if match is None:
            unknown.append(name)
        elif isinstance(target, Skip):
            skipped[name] = target.reason
        elif isinstance(target, Part):
            ours = _fill(target.target, match)
            parts.setdefault(ours, {})[target.index] = (name, tensor)
            counts[ours] = target.count
        else:
            ours = _fill(target, match)
            if ours in sources:
                raise ConvertError(f"{label}: tensors {sources[ours][0]} and {name} both map to {ours}")
            state[ours], sources[ours] = tensor, [name]
    if unknown:
        raise ConvertError(
            f"{label}: {len(unknown)} tensor(s) of no known Mask2Former / MP-Former layout: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}. Fix: check --from (hf or detectron2) "
            "and that the checkpoint is a Mask2Former / MP-Former with a ResNet or Swin backbone")
    for ours, got in parts.items():
        if sorted(got) != list(range(counts[ours])):
            have = [got[i][0] for i in sorted(got)]
            raise ConvertError(f"{label}: {ours} is built from {counts[ours]} tensors but only {have} exist; "
                               "the checkpoint is incomplete")
        state[ours] = torch.cat([got[i][1] for i in range(counts[ours])], 0)
        sources[ours] = [got[i][0] for i in range(counts[ours])]
    return Mapped(state, sources, skipped)


def check_against(mapped: Mapped, expected: dict[str, Tensor], label: str, initialised: dict[str, str]) -> None:
    """ConvertError naming ``label`` and the tensors unless ``mapped`` fills exactly the model's ``expected``
    state (name -> tensor of the right shape) apart from the ``initialised`` names (name -> how)."""
    extra = [f"{'+'.join(mapped.sources[k])} -> {k}" for k in mapped.state if k not in expected]
    if extra:
        raise ConvertError(
            f"{label}: the model built from the config has no parameter for {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}. Fix: check --config (model.backbone, model.dec_layers, "
            "model.enc_layers) against the checkpoint")
    wrong = [f"{'+'.join(mapped.sources[k])} {tuple(v.shape)} -> {k} {tuple(expected[k].shape)}"
             for k, v in mapped.state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ConvertError(f"{label}: shapes differ (source -> ours): {'; '.join(wrong[:5])}"
                           f"{' ...' if len(wrong) > 5 else ''}. Fix: set the model.* field that sizes them in "
                           "--config (e.g. model.nheads, model.enc_n_points, model.swin_window)")
    missing = [k for k in expected if k not in mapped.state and k not in initialised]
    if missing:
        raise ConvertError(f"{label}: the checkpoint has no tensor for {', '.join(missing[:10])}"
                           f"{' ...' if len(missing) > 10 else ''} ({len(missing)}). Fix: check --from and "
                           "--config (model.backbone) against the checkpoint")

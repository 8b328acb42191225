"""Convert released Mask2Former / MP-Former weights into this project's checkpoint format.

``convert(kind, src, cfg)`` reads a Hugging Face ``save_pretrained`` directory (``kind="hf"``, see ``hf.py``)
or a detectron2-format ``.pkl`` / ``.pth`` (``kind="detectron2"``, see ``detectron2.py``) from a local path or
s3:// URI, takes the architecture from the source where it says it (classes, queries, layers, widths, the
backbone) and the rest from ``cfg``, renames every tensor to ours and returns a ``Checkpoint`` as training
writes it (``model``, ``iteration`` 0, ``config``, ``classes``), loadable with ``torch.load(weights_only=True)``
by ``jobs/evaluate.py`` / ``jobs/predict.py``, and as ``model.weights`` (initial weights) by training.

Every source tensor is used or listed in ``converted_from["skipped"]`` with the reason; our tensors no source
tensor fills are listed in ``converted_from["initialised"]``: the pilot's label embedding when the source has
none (initialised as a new training run initialises it), MP-Former's missing query positional embedding
(zeros: the same computation as none), index buffers and the loss weight the config sets.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mpformer_ray import storage
from mpformer_ray.config import Config, ConfigError, apply_overrides
from mpformer_ray.convert import detectron2, hf
from mpformer_ray.convert.mapping import ConvertError, apply_rules, check_against
from mpformer_ray.train.checkpoint import Checkpoint

__all__ = ["Conversion", "ConvertError", "convert", "save"]

log = logging.getLogger(__name__)

Kind = Literal["hf", "detectron2"]


@dataclass
class Conversion:
    """A converted checkpoint and what the conversion did."""

    checkpoint: Checkpoint
    derived: list[str]  # "model.X: value (config had Y)" for each field taken from the source
    sources: dict[str, list[str]]  # our tensor -> the source tensors it was made from
    skipped: dict[str, str]  # source tensor -> why it is not used
    initialised: dict[str, str]  # our tensor -> how it was filled without a source tensor
    seconds: float


def _derive(cfg: Config, fields: dict[str, Any], label: str) -> tuple[Config, list[str]]:
    """``cfg`` with the ``model.*`` ``fields`` the source states; the changed ones described."""
    model = cfg.model
    changed = [f"model.{k}: {v!r} (config had {getattr(model, k)!r})" for k, v in fields.items()
               if getattr(model, k) != v]
    overrides = {f"model.{k}": v for k, v in fields.items()}
    if "thing_classes" not in fields and fields["num_classes"] != model.num_classes and model.thing_classes:
        # the config's thing ids are another dataset's; which of the source's classes are things it cannot say
        overrides["model.thing_classes"] = None
        changed.append(f"model.thing_classes: None (config had {model.thing_classes} for "
                       f"{model.num_classes} classes; set the source's with --set model.thing_classes=[...])")
    try:
        return apply_overrides(cfg, overrides), changed
    except ConfigError as e:
        raise ConvertError(f"{label}: the architecture it states does not fit the config: {e}") from None


def convert(kind: Kind, src: str, cfg: Config, seed: int = 0,
            classes: list[dict] | None = None) -> Conversion:
    """Convert the checkpoint at ``src`` (module docstring); ``cfg`` gives what the source does not state.
    ``classes`` (a prepared split's manifest ``classes``, in the source's class order) names the classes and
    says which are things; without it they are HF's ``id2label`` or ``class_<i>``, things per
    ``model.thing_classes``. ConvertError naming the file, the tensor or field, and the fix."""
    start = time.perf_counter()
    if kind == "hf":
        config_json, source = hf.read(src)
        label = f"{src} (Hugging Face)"
        fields, rules, names = hf.architecture(config_json, label), hf.RULES, hf.class_names(config_json)
    elif kind == "detectron2":
        source = detectron2.read(src)
        label = f"{src} (detectron2)"
        fields, rules, names = detectron2.architecture(source, label), detectron2.RULES, None
    else:
        raise ConvertError(f"--from {kind!r}: choose hf or detectron2")
    if classes is not None:
        if len(classes) != fields["num_classes"]:
            raise ConvertError(f"{label} predicts {fields['num_classes']} classes, the given dataset has "
                               f"{len(classes)}: pass the split the checkpoint was trained on (or none)")
        fields["thing_classes"] = [i for i, c in enumerate(classes) if c.get("isthing", True)]
    cfg, derived = _derive(cfg, fields, label)
    for line in derived:
        log.info("%s: %s", label, line)

    from mpformer_ray.model import build_model  # the model code is needed only here

    torch.manual_seed(seed)  # what the source does not hold is initialised reproducibly
    model = build_model(cfg)
    expected = model.state_dict()
    mapped = apply_rules(source, rules, label)
    initialised = {k: "rebuilt by the model (a function of the window size)"
                   for k in expected if k.endswith("relative_position_index")}
    initialised["criterion.empty_weight"] = f"from model.no_object_weight={cfg.model.no_object_weight}"
    pilot_key = "pilot.label_embed.weight"
    if pilot_key in mapped.state and pilot_key not in expected:
        for name in mapped.sources.pop(pilot_key):
            mapped.skipped[name] = "the pilot's label embedding, and the config has model.pilot.enabled=false"
        del mapped.state[pilot_key]
    elif pilot_key in expected and pilot_key not in mapped.state:
        initialised[pilot_key] = "no pilot label embedding in the source: initialised as a new training run does"
    query_pos = "predictor.query_embed.weight"
    if query_pos not in mapped.state:
        initialised[query_pos] = "zeros: the source's decoder has no query positional embedding (MP-Former)"
    check_against(mapped, expected, label, initialised)
    state = {k: mapped.state[k].to(v.dtype).contiguous().clone() if k in mapped.state else v
             for k, v in expected.items()}
    if query_pos not in mapped.state:
        # MP-Former's released decoder adds no positional embedding to its queries; zeros compute exactly that
        state[query_pos] = torch.zeros_like(expected[query_pos])
    model.load_state_dict(state)  # strict: proves the checkpoint loads as training and inference load it

    if classes is None:
        things = set(range(cfg.model.num_classes) if cfg.model.thing_classes is None else cfg.model.thing_classes)
        names = names or [f"class_{i}" for i in range(cfg.model.num_classes)]
        classes = [{"id": i, "name": n, "isthing": i in things} for i, n in enumerate(names)]
    skipped = dict(sorted(mapped.skipped.items()))
    checkpoint = Checkpoint(iteration=0, model=state, config=cfg.to_dict(), classes=classes,
                            converted_from={"format": kind, "source": src, "skipped": skipped,
                                            "initialised": dict(sorted(initialised.items()))})
    return Conversion(checkpoint, derived, mapped.sources, skipped, initialised, time.perf_counter() - start)


def save(conversion: Conversion, out: str) -> int:
    """Write the converted checkpoint to ``out`` (a ``.pth`` path or s3:// URI); returns its size in bytes."""
    if not out.endswith(".pth"):
        raise ConvertError(f"--out {out}: name a .pth file (evaluate / predict / model.weights take one)")
    buffer = io.BytesIO()
    torch.save(conversion.checkpoint.to_dict(), buffer)
    storage.write_bytes(out, buffer.getvalue())
    return buffer.getbuffer().nbytes

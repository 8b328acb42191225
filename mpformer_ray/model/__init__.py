"""MP-Former: Mask2Former with mask-piloted training. ``build_model(cfg)`` is the entry point."""

from mpformer_ray.model.mpformer import MPFormer, build_model

__all__ = ["MPFormer", "build_model"]

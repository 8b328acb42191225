"""MP-Former: Mask2Former with mask-piloted training. ``build_model(cfg)`` is the entry point."""

__all__ = ["MPFormer", "build_model"]


def __getattr__(name: str):
    # the whole model (torchvision, scipy) loads on first use: checking a config imports the registries of
    # mpformer_ray.model.pilot / .backbone alone, in every job's driver and every sweep trial
    if name in __all__:
        from mpformer_ray.model import mpformer

        return getattr(mpformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The Director's five models, built from their real architectures on the meta device.

Real shapes and deployment dtypes, no weights and no downloads: inside
``SimulatedBackend.capture()`` building one places its parameters on the simulated card as
loading it would, and running one makes its forward pass's real allocations there. Needs the
optional ``models`` extra (diffusers, transformers, kokoro): ``pip install -e '.[models]'``.

====================  =========================================================  ===========
card name             what is built (modules: app/models/...)                     card budget
====================  =========================================================  ===========
``flux``              FLUX.1-schnell transformer, 4-bit NF4 packed, and its VAE  6.0 GB
``liveportrait``      LivePortrait's five networks, fp16                         3.5 GB
``kokoro``            Kokoro-82M, fp32                                           0.4 GB
``clip_b``            CLIP ViT-B/32, fp16                                        0.3 GB
``clip_l``            CLIP ViT-L/14, fp16                                        0.6 GB
====================  =========================================================  ===========
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.backends.capture import as_loaded

_EXTRA = ("diffusers", "transformers", "kokoro")


class ModelsUnavailable(ImportError):
    """The ``models`` extra is not installed."""


def require() -> None:
    """Raise :class:`ModelsUnavailable`, naming what is missing and how to install it."""
    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelsUnavailable(
            f"the real-model workload needs {', '.join(missing)}: "
            "pip install -e '.[models]' (the optional extra 'models')")


@dataclass(frozen=True)
class RealModel:
    """One of the five: the card's name and budget, and what builds its parts on meta."""

    name: str
    budget_gb: float
    build: Callable[[], dict[str, torch.nn.Module]]

    def load(self) -> dict[str, torch.nn.Module]:
        """The parts as a checkpoint loader makes them (diffusers' and transformers'
        ``init_empty_weights`` then ``load_state_dict(assign=True)``): the skeleton is built
        with no capture watching, since Flux's bf16 skeleton alone is 23.8 GB before its
        Linears are packed to 4 bits, and then every parameter and buffer gets fresh storage
        in its final dtype, one tensor at a time, under the captures in force. So inside
        ``SimulatedBackend.capture()`` the card holds the loaded model and nothing else
        (``app.backends.capture.as_loaded``, part by part)."""
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            parts = self.build()
        return {name: as_loaded(lambda m=module: m) for name, module in parts.items()}


def _flux() -> dict[str, torch.nn.Module]:
    from app.models import flux

    return {"transformer": flux.build_transformer(), "vae": flux.build_vae()}


def _liveportrait() -> dict[str, torch.nn.Module]:
    from app.models import liveportrait

    return {"networks": liveportrait.build()}


def _kokoro() -> dict[str, torch.nn.Module]:
    from app.models import kokoro

    return {"model": kokoro.build()}


def _clip_b() -> dict[str, torch.nn.Module]:
    from app.models import clip

    return {"model": clip.build_clip_b()}


def _clip_l() -> dict[str, torch.nn.Module]:
    from app.models import clip

    return {"model": clip.build_clip_l()}


# The task card's five, with its budgets, in the order the Director loads them.
MODELS = (
    RealModel("flux", 6.0, _flux),
    RealModel("liveportrait", 3.5, _liveportrait),
    RealModel("kokoro", 0.4, _kokoro),
    RealModel("clip_b", 0.3, _clip_b),
    RealModel("clip_l", 0.6, _clip_l),
)

__all__ = ["MODELS", "ModelsUnavailable", "RealModel", "require"]

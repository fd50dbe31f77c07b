"""Projector registry: `linear`, `mlp{N}x_gelu`, `identity`, looked up by `config.mm_projector_type`."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

# name -> builder(in_dim, out_dim). `mlp{N}x_gelu` is matched by pattern below, for any depth N >= 1.
PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": lambda d_in, d_out: nn.Linear(d_in, d_out),
    "identity": lambda d_in, d_out: IdentityMap(),
}
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


class IdentityMap(nn.Module):
    """Passes features through unchanged (vision width must equal the decoder width)."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def _mlp_gelu(depth: int, d_in: int, d_out: int) -> nn.Sequential:
    # Layout Linear, GELU, Linear, GELU, ... so weights sit at indices 0, 2, 4: the original checkpoint keys.
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


def projector_names() -> list[str]:
    return sorted(PROJECTORS) + ["mlp{N}x_gelu (e.g. mlp2x_gelu)"]


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """Build the projector named by `config.mm_projector_type` (default `linear`, as in the original)."""
    name = getattr(config, "mm_projector_type", "linear") or "linear"
    d_in, d_out = config.mm_hidden_size, config.hidden_size
    match = _MLP_GELU.match(name)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"Projector `{name}`: the MLP depth must be at least 1.")
        return _mlp_gelu(depth, d_in, d_out)
    if name in PROJECTORS:
        if name == "identity" and d_in != d_out:
            raise ValueError(
                f"Projector `identity` needs the vision width ({d_in}) to equal the decoder width ({d_out}); "
                "use `linear` or `mlp2x_gelu` instead."
            )
        return PROJECTORS[name](d_in, d_out)
    raise ValueError(
        f"Unknown projector type `{name}` (config field `mm_projector_type`). Valid types: {', '.join(projector_names())}."
    )

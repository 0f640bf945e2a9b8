"""The local replacement model's dictionary hooks, on top of the frozen linearisation.

At each site the module's output is cut from its input and rebuilt as a *leaf*: its value is the
real output (so the forward pass is unchanged), its gradient is what every node writing there
receives (active latents through their decoder vectors, the error, ``b_dec``). A skip
transcoder's ``W_skip x`` is the one path kept from the site's input to its output. The site's
live input (what its latents' pre-activations read) is kept too, before the cut where input and
output share a hook (``hook_z`` SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
from jaxtyping import Float
from torch import Tensor

from depass_lens.features.sites import Site
from depass_lens.recorders import HookFn


def flat(value: Tensor) -> Tensor:
    """A site activation in the dictionary's flat space (``hook_z`` heads flattened)."""
    if value.ndim == 4:
        return einops.rearrange(value, "b p h e -> b p (h e)")
    return value


@dataclass
class SiteTensors:
    """What the replacement keeps of one site during a forward pass."""

    live_input: Float[Tensor, "rows pos d_in"] | None = None
    leaf: Tensor | None = None  # the output leaf (the hook's own shape)
    real_input: Float[Tensor, "pos d_in"] | None = None  # first row, detached
    real_output: Float[Tensor, "pos d_out"] | None = None


@dataclass
class Replacement:
    """Forward hooks replacing every site's module by its dictionary (values unchanged)."""

    sites: list[Site]
    tensors: dict[str, SiteTensors] = field(default_factory=dict)

    def hooks(self) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for site in self.sites:
            state = self.tensors.setdefault(site.name, SiteTensors())
            if site.hook_in != site.hook_out:
                hooks.append((site.hook_in, self._read_input(state)))
            hooks.append((site.hook_out, self._replace_output(site, state)))
        return hooks

    @staticmethod
    def _read_input(state: SiteTensors) -> HookFn:
        def fn(value: Tensor, hook) -> None:
            state.live_input = flat(value)
            state.real_input = state.live_input[0].detach()

        return fn

    @staticmethod
    def _replace_output(site: Site, state: SiteTensors) -> HookFn:
        def fn(value: Tensor, hook) -> Tensor:
            if site.hook_in == site.hook_out:
                _read = flat(value)
                state.live_input, state.real_input = _read, _read[0].detach()
            leaf = value.detach().requires_grad_(True)
            state.leaf = leaf
            state.real_output = flat(leaf)[0].detach()
            W_skip = site.view.W_skip
            if W_skip is None:
                return leaf
            assert state.live_input is not None
            skip = state.live_input @ W_skip.to(state.live_input.dtype).T
            skip = (skip - skip.detach()).reshape(value.shape)
            return leaf + skip.to(value.dtype)

        return fn


__all__ = ["Replacement", "SiteTensors", "flat"]

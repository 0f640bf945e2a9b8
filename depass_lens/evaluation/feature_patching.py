"""The model with its dictionaries spliced in: interventions on latents, and their gradients.

At every dictionary's site (a transcoder's MLP, an SAE's hook) the module's output is replaced by

    sum_i c_i W_dec[i] + b_dec + error (+ W_skip x for a skip transcoder),

where ``c`` are the latents' activations, computed *live* by the dictionary's own encoder from the
site's live input, and ``error = real output - reconstruction`` is frozen at its value on the
clean prompts. With nothing patched the spliced model reproduces the model (up to rounding: the
error is exactly what the reconstruction misses), and a change upstream reaches every later
latent through its encoder, as in Sparse Feature Circuits' interventions.

An intervention (:class:`Patch`) holds chosen latents at fixed values (zero, a mean, a corrupted
prompt's activations, a point on an integration path) while the others stay live. Gradients of
a metric with respect to every site's coefficients ``c`` (:func:`latent_gradients`) flow through
the real model and through later sites' encoders: the total derivative a latent's attribution
patching needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.adapters import make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.errors import DePassInputError
from depass_lens.features.replacement import flat
from depass_lens.features.sites import DictionariesLike, Site, place_sites

#: Per site name, a ``[batch, pos, d_sae]`` tensor (activations, scores, masks...).
LatentTensors = dict[str, Tensor]
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


@dataclass
class SiteRecord:
    """A site on a batch: every latent's activation and the reconstruction error."""

    acts: Float[Tensor, "batch pos d_sae"]
    error: Float[Tensor, "batch pos d_out"]


@dataclass
class Patch:
    """Latents held at fixed values: where ``mask`` is true the coefficient is ``values``."""

    mask: Bool[Tensor, "batch pos d_sae"]
    values: Float[Tensor, "batch pos d_sae"]


class SplicedModel:
    """``model`` with ``dictionaries`` spliced in, on a fixed batch of (clean) prompts.

    Args:
        model: a HookedTransformer (TransformerLens 3) or TransformerBridge (4).
        dictionaries: transcoders / SAEs, as :meth:`~depass_lens.DePass.feature_graph` takes
            them (checked and named the same way: ``L1.mlp``, ``L0.z``, ...).
        tokens: the clean prompts ``[batch, pos]``; errors are frozen at their values here.
    """

    def __init__(self, model: TLModel, dictionaries: DictionariesLike, tokens: Tensor):
        self.model = model
        self.dictionaries = dictionaries
        self.adapter: ModelAdapter = make_adapter(model)
        self.sites: list[Site] = place_sites(self.adapter, dictionaries)
        self.tokens = tokens
        self.dtype = self.adapter.dtype
        self.clean: dict[str, SiteRecord] = self.record(tokens)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    # ------------------------------------------------------------------ encoders and decoders
    def _encode(self, site: Site, raw: Tensor) -> Tensor:
        """The site's latents from its input as the hook holds it (``hook_z`` unflattened)."""
        view = site.view
        x = raw if view.heads_axis else flat(raw)
        out = view.encode(x.to(device=view.W_enc.device, dtype=view.W_enc.dtype))
        if isinstance(out, Tensor) and out.is_sparse:
            out = out.to_dense()
        return out.to(device=raw.device, dtype=self.dtype)

    def _decode(self, site: Site, coeff: Tensor, raw_in: Tensor) -> Tensor:
        """``c W_dec + b_dec (+ W_skip x)`` in the flat output space."""
        view = site.view
        out = coeff @ view.W_dec.to(coeff.device, coeff.dtype) + view.b_dec.to(
            coeff.device, coeff.dtype
        )
        if view.W_skip is not None:
            out = out + flat(raw_in).to(coeff.dtype) @ view.W_skip.to(coeff.device, coeff.dtype).T
        return out

    # ------------------------------------------------------------------ runs
    def _run_with(
        self,
        tokens: Tensor,
        at_output: Callable[[Site, Tensor, Tensor], Tensor | None],
        hold: Mapping[str, Tensor] | None = None,
        read: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """The logits with every site's input kept and ``at_output(site, input, output)`` called
        at its output hook (its return value, if any, replaces the output); hook points named in
        ``hold`` output the given tensors, and those named in ``read`` are filled with what they
        output."""
        live: dict[str, Tensor] = {}
        hooks: list[tuple[str, Any]] = []
        for name in hold or {}:

            def held(value: Tensor, hook: Any, name: str = name) -> Tensor:
                assert hold is not None
                if hold[name].shape != value.shape:
                    raise DePassInputError(
                        f"hold[{name!r}] has shape {tuple(hold[name].shape)}; the hook point "
                        f"outputs {tuple(value.shape)} in this run"
                    )
                return hold[name].to(value.dtype)

            hooks.append((name, held))
        for name in read or {}:

            def seen(value: Tensor, hook: Any, name: str = name) -> None:
                assert read is not None
                read[name] = value.detach().clone()

            hooks.append((name, seen))
        for site in self.sites:
            if site.hook_in != site.hook_out:

                def keep(value: Tensor, hook: Any, name: str = site.name) -> None:
                    live[name] = value

                hooks.append((site.hook_in, keep))

            def out(value: Tensor, hook: Any, site: Site = site) -> Tensor | None:
                return at_output(site, live.get(site.name, value), value)

            hooks.append((site.hook_out, out))
        with self.adapter.hooks(hooks):
            logits = self.model(tokens)
        assert isinstance(logits, Tensor)
        return logits

    @torch.no_grad()
    def record(self, tokens: Tensor) -> dict[str, SiteRecord]:
        """Every site's latent activations and reconstruction error on ``tokens`` (the model's
        own forward pass, nothing replaced)."""
        out: dict[str, SiteRecord] = {}

        def read(site: Site, raw_in: Tensor, value: Tensor) -> None:
            acts = self._encode(site, raw_in)
            error = flat(value).to(self.dtype) - self._decode(site, acts, raw_in)
            out[site.name] = SiteRecord(acts, error)

        self._run_with(tokens, read)
        return out

    def run(
        self,
        patches: Mapping[str, Patch] | None = None,
        *,
        tokens: Tensor | None = None,
        errors: Mapping[str, Tensor] | None = None,
        leaves: dict[str, Tensor] | None = None,
        hold: Mapping[str, Tensor] | None = None,
        read: dict[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos vocab"]:
        """The spliced model's logits on the clean prompts (or ``tokens``).

        Args:
            patches: per site, latents held at fixed values (the rest live).
            errors: per site, the error to add instead of the clean prompts' (``[batch pos
                d_out]``).
            leaves: if given, filled per site with a zero tensor added to the coefficients, with
                ``requires_grad``: its gradient is the metric's derivative with respect to each
                latent's coefficient at each position.
            hold: per hook point (e.g. every ``hook_pattern`` and ``hook_scale``), the tensor it
                outputs whatever its input: the model's nonlinear maps frozen at values read
                from another run, so that held latents act on the metric along linear paths.
            read: hook points whose outputs in this run are filled in (keys: the names).
        """
        patches = patches or {}
        errors = errors or {}
        unknown = set(patches) - set(self.names)
        if unknown:
            raise DePassInputError(f"no site {sorted(unknown)}; sites are {self.names}")
        points = set(hold or {}) | set(read or {})
        if points:
            missing = sorted(points - set(self.adapter.hook_names()))
            if missing:
                raise DePassInputError(f"the model has no hook point {missing}")

        def splice(site: Site, raw_in: Tensor, value: Tensor) -> Tensor:
            coeff = self._encode(site, raw_in)
            patch = patches.get(site.name)
            if patch is not None:
                coeff = torch.where(patch.mask, patch.values.to(coeff.dtype), coeff)
            if leaves is not None:
                leaf = torch.zeros_like(coeff, requires_grad=True)
                leaves[site.name] = leaf
                coeff = coeff + leaf
            error = errors.get(site.name, self.clean[site.name].error)
            out = self._decode(site, coeff, raw_in) + error.to(coeff.dtype)
            if value.ndim == 4:
                out = einops.rearrange(out, "b p (h e) -> b p h e", h=value.shape[2])
            return out.to(value.dtype)

        return self._run_with(self.tokens if tokens is None else tokens, splice, hold, read)


def latent_gradients(
    spliced: SplicedModel, metric: Metric, patches: Mapping[str, Patch] | None = None
) -> LatentTensors:
    """``d sum(metric) / d c`` at every site, position and latent (one forward, one backward):
    through the real model and every later site's live encoder, errors frozen."""
    leaves: dict[str, Tensor] = {}
    with torch.enable_grad():
        value = metric(spliced.run(patches, leaves=leaves)).sum()
        grads = torch.autograd.grad(value, [leaves[n] for n in spliced.names], allow_unused=True)
    return {
        n: torch.zeros_like(leaves[n]) if g is None else g.detach()
        for n, g in zip(spliced.names, grads)
    }


def attribution_patching(
    spliced: SplicedModel, metric: Metric, reference: Mapping[str, Tensor]
) -> LatentTensors:
    """``(a - b) * dm/da`` at the clean run: each latent's first-order estimate of the change of
    the metric when it moves from ``reference`` (``b``: zero, a mean, a corrupted run's
    activations; per site ``[batch pos d_sae]``, broadcastable) to its clean value ``a``."""
    grads = latent_gradients(spliced, metric)
    return {n: (spliced.clean[n].acts - reference[n]) * grads[n] for n in spliced.names}


def integrated_gradients(
    spliced: SplicedModel, metric: Metric, reference: Mapping[str, Tensor], steps: int = 10
) -> LatentTensors:
    """Sparse Feature Circuits' integrated gradients on latents: for each site in turn, its
    latents are held on the straight path ``b + alpha (a - b)`` (every other site live), and
    ``(a - b)`` times the gradient averaged over ``steps`` midpoints ``alpha`` estimates each
    latent's share of moving the site from ``reference`` to clean (``steps * sites`` passes)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DePassInputError(f"steps must be an int >= 1, got {steps!r}")
    out: LatentTensors = {}
    for name in spliced.names:
        clean = spliced.clean[name].acts
        start = reference[name].to(clean.dtype).expand_as(clean)
        mask = torch.ones_like(clean, dtype=torch.bool)
        total = torch.zeros_like(clean)
        for k in range(steps):
            alpha = (k + 0.5) / steps
            point = Patch(mask, start + alpha * (clean - start))
            total += latent_gradients(spliced, metric, {name: point})[name]
        out[name] = (clean - start) * total / steps
    return out


def flatten(per_site: Mapping[str, Tensor], names: Sequence[str]) -> Float[Tensor, "batch n"]:
    """Sites' ``[batch pos d_sae]`` tensors side by side as ``[batch, n]`` (site-major)."""
    return torch.cat([per_site[n].flatten(1) for n in names], dim=1)


def unflatten(flat: Tensor, like: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`, shaped like ``like``'s tensors."""
    out, start = {}, 0
    for n in names:
        shape = like[n].shape
        size = shape[1:].numel()
        out[n] = flat[:, start : start + size].reshape(shape)
        start += size
    return out


def top_n_mask(
    key: Float[Tensor, "batch n"], candidates: Bool[Tensor, "batch n"], n: int
) -> Bool[Tensor, "batch n"]:
    """Per prompt, the ``n`` candidates with the largest ``|key|`` (all candidates if fewer)."""
    score = key.abs().double().masked_fill(~candidates, -1.0)
    n = min(n, key.shape[1])
    chosen = score.topk(n, dim=1).indices
    mask = torch.zeros_like(candidates).scatter(1, chosen, True)
    return mask & candidates


__all__ = [
    "LatentTensors",
    "Patch",
    "SiteRecord",
    "SplicedModel",
    "attribution_patching",
    "flatten",
    "integrated_gradients",
    "latent_gradients",
    "top_n_mask",
    "unflatten",
]

"""Computing a feature graph: one replacement forward on copies of the prompt, one backward per
batch of receivers, one contraction per site.

The local replacement model (norm scales frozen, attention frozen or split by the chosen
:class:`~depass_lens.qk.AttentionSplit`, every dictionary's module cut and rebuilt from its
latents, error and ``b_dec``) is affine in its nodes. So the edge ``A -> B`` is ``<out_A, g_B>``,
with ``g_B`` the gradient of B's pre-activation (or of the target) at the tensor A writes. The
forward runs once on ``rows`` identical copies of the prompt; each backward seeds a different
receiver in each row, so ``rows`` receivers' gradients come from one pass (circuit-tracer's
batching). Constants are scored where they enter (:class:`~depass_lens.constants.ConstantLedger`),
so ``incoming edges + own constant = pre-activation`` is a check, not an identity.

With a query/key-aware split each edge is also split by the paths it takes: ``value`` (patterns
held: value, residual and MLP hops only), ``query`` (at least one query-side pattern move, no
key-side one) and ``key`` (at least one key-side move), from the same computation with the key
path, and then both, cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from depass_lens.adapter import ModelAdapter
from depass_lens.adjoint import AdjointPass, linearised_forward
from depass_lens.constants import per_prompt
from depass_lens.decomposition import compute_dtype
from depass_lens.difference import check_difference_supported, reference_hooks
from depass_lens.errors import DePassInputError
from depass_lens.features.graph import FeatureGraph
from depass_lens.features.influence import next_receivers
from depass_lens.features.nodes import ActiveLatents, FeatureNode, latent_name
from depass_lens.features.replacement import Replacement, flat
from depass_lens.features.sites import Site
from depass_lens.frozen import frozen_activations
from depass_lens.qk import AttentionSplit
from depass_lens.rules import TaylorRule
from depass_lens.sae.placement import encode
from depass_lens.targets import Target, TargetContext

#: Path classes and the pattern sides cut to isolate them (cumulative: value, +query, +key).
KIND_RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("value", ("q", "k")),
    ("query", ("k",)),
    ("key", ()),
)


@dataclass
class SiteState:
    """A site on the prompt: its active latents and its per-position reconstruction error."""

    site: Site
    active: ActiveLatents
    error: Float[Tensor, "pos d_out"]


@dataclass
class SiteRun:
    """A site on one prompt: every latent's activation and pre-activation, and the error."""

    acts: Float[Tensor, "pos d_sae"]
    pre: Float[Tensor, "pos d_sae"]
    error: Float[Tensor, "pos d_out"]
    size: Float[
        Tensor, "pos d_sae"
    ]  # sum |x_i W_enc[i, j]| + |b_j|: what pre's rounding scales with


@torch.no_grad()
def site_runs(
    sites: Sequence[Site], acts: Mapping[str, Tensor], dtype: torch.dtype, zero_first: bool
) -> list[SiteRun]:
    """Each site's latents by its own encoder on the real input, their pre-activations, and its
    error ``real output - reconstruction`` (``W_skip x`` included, and what earlier sites of a
    cross-layer transcoder decode into it)."""
    latents, inputs = [], []
    for site in sites:
        view, placement = site.view, site.placement
        a = encode(view, placement, acts, dtype)[0]
        if zero_first:
            a = a.clone()
            a[0] = 0
        latents.append(a)
        inputs.append(placement.read(acts, site.hook_in)[0].to(dtype))
    reconstructions = {
        site.name: a @ site.view.W_dec.to(a.device, dtype) + site.view.b_dec.to(a.device, dtype)
        for site, a in zip(sites, latents)
    }
    for site, a in zip(sites, latents):
        for target, W in site.decoders:
            reconstructions[target] = reconstructions[target] + a @ W.to(a.device, dtype)
    out = []
    for site, a, x in zip(sites, latents, inputs):
        view = site.view
        W_enc, constant = (
            view.W_enc.to(x.device, dtype),
            site.pre_activation_constant(dtype, x.device),
        )
        reconstruction = reconstructions[site.name]
        if view.W_skip is not None:
            reconstruction = reconstruction + x @ view.W_skip.to(x.device, dtype).T
        real = site.placement.read(acts, site.hook_out)[0].to(dtype)
        size = x.abs() @ W_enc.abs() + constant.abs()
        out.append(SiteRun(a, x @ W_enc + constant, real - reconstruction, size))
    return out


def site_states(
    sites: Sequence[Site], runs: Sequence[SiteRun], refs: Sequence[SiteRun] | None
) -> list[SiteState]:
    """Nodes per site: active latents and errors, or (``refs``: a corrupted run) their changes."""
    if refs is None:
        return [
            SiteState(s, ActiveLatents.of(r.acts, r.pre, r.size), r.error)
            for s, r in zip(sites, runs)
        ]
    return [
        SiteState(
            s,
            ActiveLatents.changed(r.acts, r.pre, y.acts, y.pre, r.size + y.size),
            r.error - y.error,
        )
        for s, r, y in zip(sites, runs, refs)
    ]


def plain_run(
    adapter: ModelAdapter, tokens: Tensor, sites: Sequence[Site], extra: Sequence[str] = ()
) -> dict[str, Tensor]:
    """A plain forward caching what the sites read and write (and ``extra``)."""
    names = {name for s in sites for name in s.placement.needed_hooks(adapter)} | set(extra)
    names.add("hook_embed")
    if adapter.positional == "standard":
        names.add("hook_pos_embed")
    return frozen_activations(adapter, tokens, None, names)


@dataclass(frozen=True)
class RunSpec:
    """What every replacement forward of one graph shares: the prompt (as ``rows`` copies), the
    sites, where the targets read, the MLP rule and attention split, and a corrupted run's
    activations (one prompt) for the difference linearisation."""

    adapter: ModelAdapter
    tokens: Int[Tensor, "1 pos"]
    sites: Sequence[Site]
    target_hook: str
    rows: int
    rule: TaylorRule
    split: AttentionSplit
    reference: Mapping[str, Tensor] | None = None


class ReplacementRun:
    """One replacement forward on ``spec.rows`` copies of the prompt; backward passes on demand.
    ``frozen_sides`` cut the pattern split's query and/or key path (one class of paths)."""

    def __init__(self, spec: RunSpec, frozen_sides: tuple[str, ...] = ()):
        adapter, rows, reference = spec.adapter, spec.rows, spec.reference
        self.sites = list(spec.sites)
        self.target_hook = spec.target_hook
        self.replacement = Replacement(self.sites)
        store = {spec.target_hook, "hook_embed"}
        if adapter.positional == "standard":  # shortformer positions are attention constants
            store.add("hook_pos_embed")
        self.passed: AdjointPass = linearised_forward(
            adapter,
            spec.tokens.expand(rows, -1),
            None,
            spec.rule,
            store,
            split=spec.split,
            replaced_mlps={s.layer for s in self.sites if s.replaces_mlp},
            frozen_sides=frozen_sides,
            extra_hooks=self.replacement.hooks(),
            shared_rows=True,
            reference=None
            if reference is None
            else {k: v.expand(rows, *v.shape[1:]) for k, v in reference.items()},
        )
        self.embeddings = [n for n in ("hook_embed", "hook_pos_embed") if n in store]
        for site in self.sites:  # what every node at a site writes into
            leaf = self.replacement.tensors[site.name].leaf
            assert leaf is not None
            self.passed.live[f"site:{site.name}"] = leaf

    def backward(
        self,
        seeds: Sequence[FeatureNode],
        target_weights: Sequence[Float[Tensor, "pos d_model"]],
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Row ``r`` seeded with receiver ``seeds[r]``: gradients at the embeddings and at every
        site's output (``None`` where unreached), and every constant site's share per row."""
        live = self.passed.live
        total: Tensor = torch.zeros(())
        by_site: dict[str, list[tuple[int, FeatureNode]]] = {}
        for row, node in enumerate(seeds):
            if node.kind == "target":
                state = live[self.target_hook][row]
                weights = target_weights[node.index or 0].to(state.device, state.dtype)
                total = total + (state * weights).sum()
            else:
                assert node.site is not None
                by_site.setdefault(node.site, []).append((row, node))
        for site in self.sites:
            members = by_site.get(site.name)
            if not members:
                continue
            x = self.replacement.tensors[site.name].live_input
            assert x is not None
            rows = torch.tensor([r for r, _ in members], device=x.device)
            pos = torch.tensor([n.pos for _, n in members], device=x.device)
            latents = torch.tensor([n.index for _, n in members], device=x.device)
            W = site.view.W_enc.to(x.device, x.dtype)[:, latents].T
            total = total + (x[rows, pos] * W).sum()
        names = self.embeddings + [f"site:{s.name}" for s in self.sites]
        return self.passed.backward(total, names, retain_graph=True, zeros_for_unused=False)


def contract_latents(
    grad: Float[Tensor, "rows pos d"], active: ActiveLatents, W_dec: Float[Tensor, "d_sae d"]
) -> Float[Tensor, "rows n"]:
    """``c_j <W_dec[i_j], grad[:, p_j]>`` for every latent node ``j`` (``c``: its activation, or
    its change): one ``rows x d`` by ``d x n_p`` product per position (the nodes are
    position-major), so no per-node copy of the gradient is formed."""
    out = grad.new_zeros(grad.shape[0], len(active))
    if len(active) == 0:
        return out
    positions, counts = torch.unique_consecutive(active.pos, return_counts=True)
    start = 0
    for p, count in zip(positions.tolist(), counts.tolist()):
        stop = start + count
        out[:, start:stop] = grad[:, p] @ W_dec[active.index[start:stop]].T
        start = stop
    return out * active.coefficient.to(out.dtype)


@dataclass
class Layout:
    """Where each kind of sender sits among the nodes (column ranges)."""

    nodes: list[FeatureNode]
    latents: dict[str, int]  # site -> first latent node
    errors: dict[str, int]  # site -> first error node
    embeddings: dict[str, int]  # hook -> first node
    b_dec: dict[str, int]  # site -> node
    constants: dict[str, int]  # ledger site name -> node
    targets: int  # first target node


def layout(
    adapter: ModelAdapter,
    states: Sequence[SiteState],
    n_pos: int,
    embeddings: Sequence[str],
    ledger_names: Sequence[str],
    target_names: Sequence[str],
) -> Layout:
    """Nodes in circuit-tracer's order: latents, errors, embeddings, constants, targets."""
    nodes: list[FeatureNode] = []
    latents, errors, embeds, b_dec, constants = {}, {}, {}, {}, {}
    for state in states:
        site = state.site
        latents[site.name] = len(nodes)
        for p, i in zip(state.active.pos.tolist(), state.active.index.tolist()):
            nodes.append(
                FeatureNode(latent_name(site.name, i, p), "latent", site.layer, p, site.name, i)
            )
    for state in states:
        site = state.site
        errors[site.name] = len(nodes)
        nodes += [
            FeatureNode(f"{site.name}.error@{p}", "error", site.layer, p, site.name)
            for p in range(n_pos)
        ]
    for hook in embeddings:
        kind = "token" if hook == "hook_embed" else "position"
        embeds[hook] = len(nodes)
        nodes += [FeatureNode(f"{kind}@{p}", kind, -1, p) for p in range(n_pos)]  # type: ignore[arg-type]
    for state in states:
        site = state.site
        b_dec[site.name] = len(nodes)
        nodes.append(FeatureNode(f"{site.name}.b_dec", "constant", site.layer, None, site.name))
    for name in ledger_names:
        constants[name] = len(nodes)
        layer = _ledger_layer(name, adapter.n_layers)
        nodes.append(FeatureNode(_short(name), "constant", layer))
    first_target = len(nodes)
    nodes += [
        FeatureNode(name, "target", adapter.n_layers, None, None, k)
        for k, name in enumerate(target_names)
    ]
    return Layout(nodes, latents, errors, embeds, b_dec, constants, first_target)


def _short(name: str) -> str:
    """``blocks.1.attn.b_O`` -> ``L1.attn.b_O``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks":
        return f"L{parts[1]}." + ".".join(parts[2:])
    return name


def _ledger_layer(name: str, n_layers: int) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" else n_layers


def edge_rows(
    run: ReplacementRun,
    lay: Layout,
    states: Sequence[SiteState],
    receivers: Sequence[int],
    target_weights: Sequence[Tensor],
    embedded: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    contrast: bool = False,
) -> Float[Tensor, "receivers nodes"]:
    """The incoming edges of ``receivers`` (node indices, at most ``rows``): one backward."""
    nodes = lay.nodes
    grads, constants = run.backward([nodes[i] for i in receivers], target_weights)
    n = len(receivers)
    out = torch.zeros(n, len(nodes), dtype=dtype, device=device)
    for hook, first in lay.embeddings.items():
        grad = grads.get(hook)
        if grad is not None:
            value = embedded[hook].to(dtype)
            out[:, first : first + value.shape[0]] = (grad[:n].to(dtype) * value).sum(-1)
    for state in states:  # cross-layer decoders: a latent also writes later sites' outputs
        site = state.site
        first = lay.latents[site.name]
        for target, W in site.decoders:
            grad = grads.get(f"site:{target}")
            if grad is not None:
                g = flat(grad[:n]).to(dtype)
                span = slice(first, first + len(state.active))
                out[:, span] += contract_latents(g, state.active, W.to(g.device, dtype))
    for state in states:
        site = state.site
        grad = grads.get(f"site:{site.name}")
        if grad is None:
            continue
        g = flat(grad[:n]).to(dtype)
        W_dec = site.view.W_dec.to(g.device, dtype)
        first = lay.latents[site.name]
        out[:, first : first + len(state.active)] += contract_latents(g, state.active, W_dec)
        first = lay.errors[site.name]
        out[:, first : first + g.shape[1]] = (g * state.error).sum(-1)
        if not contrast:  # b_dec is the same in both runs: its change is 0
            out[:, lay.b_dec[site.name]] = g.sum(1) @ site.view.b_dec.to(g.device, dtype)
    for ledger_site, share in zip(run.passed.ledger.sites, constants):
        out[:, lay.constants[ledger_site.name]] += per_prompt(share[:n]).to(dtype)
    return out


def build_feature_graph(
    adapter: ModelAdapter,
    tokens: Int[Tensor, "1 pos"],
    str_tokens: list[str] | None,
    targets: Sequence[Target],
    target_names: Sequence[str],
    sites: Sequence[Site],
    *,
    rule: TaylorRule,
    split: AttentionSplit,
    zero_first_position: bool = False,
    edge_kinds: bool = True,
    batch_size: int = 64,
    max_feature_nodes: int | None = None,
    contrast: Int[Tensor, "1 pos"] | None = None,
    target_probabilities: Sequence[float] | None = None,
    progress: bool = False,
) -> FeatureGraph:
    """The feature graph of one prompt (see :meth:`depass_lens.DePass.feature_graph`);
    ``contrast``: a corrupted prompt of the same length, for the difference linearisation."""
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise DePassInputError(
            f"a feature graph explains one prompt; got tokens of shape {tuple(tokens.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DePassInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    hooks = {t.read_hook(adapter) for t in targets}
    if len(hooks) != 1:
        raise DePassInputError(f"a graph's targets must read one hook; these read {sorted(hooks)}")
    target_hook = hooks.pop()
    dtype = compute_dtype(adapter.dtype)
    clean = plain_run(adapter, tokens, sites)
    runs = site_runs(sites, clean, dtype, zero_first_position)
    reference = refs = None
    if contrast is not None:
        if contrast.shape != tokens.shape:
            raise DePassInputError(
                f"the contrast prompt has {contrast.shape[-1]} tokens and the prompt "
                f"{tokens.shape[-1]}: a contrast must match position by position"
            )
        check_difference_supported(adapter)
        reference = plain_run(adapter, contrast, sites, reference_hooks(adapter))
        refs = site_runs(sites, reference, dtype, zero_first_position)
    states = site_states(sites, runs, refs)
    n_latents = sum(len(s.active) for s in states)
    tctx = TargetContext(adapter, tokens, None)
    weights: list[Tensor] = []
    own_constants: list[Tensor] = []
    for t in targets:
        with torch.no_grad():
            w, c = t.functional(tctx)
        weights += [w[0, k].detach() for k in range(w.shape[1])]
        own_constants += [c[0, k].detach() for k in range(c.shape[1])]
    if len(weights) != len(target_names):
        raise DePassInputError(f"{len(target_names)} target names for {len(weights)} scalars")
    n_targets = len(weights)
    rows = min(batch_size, n_latents + n_targets)
    spec = RunSpec(adapter, tokens, sites, target_hook, rows, rule, split, reference)
    main = ReplacementRun(spec)
    ledger_names = list(dict.fromkeys(s.name for s in main.passed.ledger.sites))
    lay = layout(adapter, states, tokens.shape[1], main.embeddings, ledger_names, target_names)
    embedded: dict[str, Tensor] = {h: main.passed.activations[h][0] for h in main.embeddings}
    if reference is not None:
        embedded = {h: v - reference[h][0].to(v.dtype) for h, v in embedded.items()}
    device = main.passed.activations[target_hook].device
    n_nodes = len(lay.nodes)
    changes = contrast is not None

    def rows_of(run: ReplacementRun, receivers: Sequence[int]) -> Tensor:
        return edge_rows(run, lay, states, receivers, weights, embedded, dtype, device, changes)

    # targets first, then latents: all in node order, or by influence up to max_feature_nodes
    target_nodes = list(range(lay.targets, n_nodes))
    latent_nodes = [i for i, n in enumerate(lay.nodes) if n.kind == "latent"]
    budget = len(latent_nodes) if max_feature_nodes is None else max(0, int(max_feature_nodes))
    batches = [target_nodes[i : i + rows] for i in range(0, n_targets, rows)]
    order: list[int] = []
    blocks: list[Tensor] = []
    bar = tqdm(
        total=math.ceil(n_targets / rows) + math.ceil(min(budget, n_latents) / rows),
        desc="feature graph",
        disable=not progress,
        leave=False,
        delay=2.0,
    )
    for batch in batches:
        blocks.append(rows_of(main, batch))
        order += batch
        bar.update()
    seed = torch.ones(n_targets, dtype=dtype, device=device)
    if target_probabilities is not None:  # influence weighted as circuit-tracer weighs it
        seed = torch.tensor(list(target_probabilities), dtype=dtype, device=device)
    if max_feature_nodes is None:
        chosen = latent_nodes
        for start in range(0, len(chosen), rows):
            batch = chosen[start : start + rows]
            blocks.append(rows_of(main, batch))
            order += batch
            bar.update()
    else:
        candidates = torch.zeros(n_nodes, dtype=torch.bool, device=device)
        candidates[latent_nodes] = True
        while len(order) - n_targets < budget and bool(candidates.any()):
            so_far = torch.cat(blocks)
            seeds = torch.cat([seed, so_far.new_zeros(len(order) - n_targets)])
            k = min(rows, budget - (len(order) - n_targets))
            picked = next_receivers(
                so_far, torch.tensor(order, device=device), seeds, candidates, k
            )
            batch = picked.tolist()
            candidates[picked] = False
            blocks.append(rows_of(main, batch))
            order += batch
            bar.update()
    bar.close()
    edges = torch.cat(blocks)
    kind_edges = {"value": edges}
    if edge_kinds and (split.uses_pattern or changes):
        kind_edges = _split_by_kind(spec, order, edges, rows_of)
    final = main.passed.activations[target_hook][0]
    del main
    activation = torch.full((n_nodes,), math.nan, dtype=dtype, device=device)
    value = torch.full_like(activation, math.nan)
    own = torch.full_like(activation, math.nan)
    magnitude = torch.full_like(activation, math.nan)
    for state in states:
        first = lay.latents[state.site.name]
        span = slice(first, first + len(state.active))
        activation[span] = state.active.activation.to(device)
        value[span] = state.active.pre_activation.to(device)
        magnitude[span] = state.active.magnitude.to(device)
        constant = state.site.pre_activation_constant(dtype, device)[state.active.index]
        own[span] = 0.0 if changes else constant  # constants cancel in a change
    final_ref = None if contrast is None else _target_state(adapter, contrast, target_hook)
    for k, (w, c) in enumerate(zip(weights, own_constants)):
        w = w.to(device, dtype)
        value[lay.targets + k] = (final.to(dtype) * w).sum() + c.to(dtype)
        own[lay.targets + k] = c.to(dtype)
        magnitude[lay.targets + k] = (final.to(dtype) * w).abs().sum() + c.abs()
        if final_ref is not None:
            reference_value = (final_ref.to(dtype) * w).sum() + c.to(dtype)
            magnitude[lay.targets + k] += (final_ref.to(dtype) * w).abs().sum() + c.abs()
            value[lay.targets + k] -= reference_value
            own[lay.targets + k] = 0.0
    return FeatureGraph(
        nodes=lay.nodes,
        receivers=torch.tensor(order, device=device),
        edges=edges,
        kind_edges=kind_edges,
        activation=activation,
        value=value,
        own=own,
        tokens=list(str_tokens) if str_tokens is not None else [str(t) for t in tokens[0].tolist()],
        attention="difference" if changes else split.side,
        magnitude=magnitude,
        settings={
            "zero_first_position": zero_first_position,
            "contrast": None if contrast is None else contrast[0].tolist(),
            "batch_size": rows,
            "max_feature_nodes": max_feature_nodes,
            "dtype": str(dtype).removeprefix("torch."),
            "sites": {s.name: (s.hook_in, s.hook_out) for s in sites},
            "d_sae": {s.name: s.view.d_sae for s in sites},
            "n_layers": adapter.n_layers,
            "token_ids": tokens[0].tolist(),
            "target_tokens": _target_tokens(targets),
            "target_probabilities": None
            if target_probabilities is None
            else list(target_probabilities),
        },
    )


def _target_tokens(targets: Sequence[Target]) -> list[int] | None:
    """The token id of each target, where every target is one token's (centred) logit."""
    ids = [getattr(t, "token", None) for t in targets]
    return [i for i in ids if isinstance(i, int)] if all(isinstance(i, int) for i in ids) else None


def _target_state(adapter: ModelAdapter, tokens: Tensor, hook: str) -> Tensor:
    """The real state a target reads on one prompt (a plain forward)."""
    passed = linearised_forward(adapter, tokens, None, TaylorRule(), {hook}, linearise=False)
    return passed.activations[hook][0]


def _split_by_kind(
    spec: RunSpec,
    order: list[int],
    total: Tensor,
    rows_of: Callable[[ReplacementRun, Sequence[int]], Tensor],
) -> dict[str, Tensor]:
    """Each edge's value / query / key parts: the same receivers with the key side, and then
    both sides, of every head's pattern move cut (cumulative classes, differenced)."""
    cumulative = {}
    for kind, frozen in KIND_RUNS[:-1]:
        run = ReplacementRun(spec, frozen)
        step = spec.rows
        blocks = [rows_of(run, order[i : i + step]) for i in range(0, len(order), step)]
        cumulative[kind] = torch.cat(blocks)
        del run
    return {
        "value": cumulative["value"],
        "query": cumulative["query"] - cumulative["value"],
        "key": total - cumulative["query"],
    }

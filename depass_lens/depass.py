"""``DePass``: the user-facing wrapper around a TransformerLens model (``HookedTransformer`` or
``TransformerBridge``; the adapter hides which).

It wraps the model without copying weights, reads the frozen quantities from one ``run_with_cache``
(or a cache the caller already has), and offers two calls:

- :meth:`DePass.run` -- forward mode from one start point; returns a :class:`DecomposedCache` whose
  entries carry TransformerLens hook names with a ``comp`` axis.
- :meth:`DePass.attribute` -- scores of every component for one or more targets, by adjoint mode
  (one backward per target) where the rule is linear, forward mode otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm
from transformer_lens import ActivationCache
from transformer_lens.utilities import get_attention_mask

from depass_lens.adapters import ModelAdapter, make_adapter
from depass_lens.adapters.base import TLModel
from depass_lens.adjoint import linearised_forward, target_scalar
from depass_lens.cache_check import refuse_stale_cache
from depass_lens.circuits.graph import Graph
from depass_lens.circuits.spec import GraphNodes
from depass_lens.decomposition import ComponentLabel, check_lossless, compute_dtype
from depass_lens.errors import CacheMismatchError, DePassInputError, LosslessnessError
from depass_lens.features.graph import FeatureGraph
from depass_lens.frozen import FrozenActivations, run_frozen_cache
from depass_lens.generation import Generation, generate_and_cite
from depass_lens.memory import free_memory
from depass_lens.propagate import DecomposedTransformer, PropagationContext
from depass_lens.qk import AttentionSplit, get_attention_split
from depass_lens.readout import Prepared, Readout, read_target
from depass_lens.results import Attribution, DecomposedCache
from depass_lens.rules import MLPRule, ReferenceParity, TaylorRule, get_rule
from depass_lens.sources import Source, SourceContext, Tokens, as_source
from depass_lens.targets import FINAL, Target, TargetContext, as_targets

Mode = Literal["auto", "forward", "adjoint"]
InputLike = str | Sequence[str] | Tensor

#: Hooks a forward-mode run keeps by default: the residual stream and what each sublayer adds.
DEFAULT_CACHED = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "unembed.hook_in",
)


class DePass:
    """Decomposed forward pass for a TransformerLens model (3.x ``HookedTransformer`` or 4.x
    ``TransformerBridge``).

    Args:
        model: the model; wrapped, never copied. Unsupported settings raise
            :class:`~depass_lens.errors.UnsupportedModelError` naming them.
        rule: default MLP split rule (``"taylor"``, ``"softmax"``, ``"max"``, ``"relu"``,
            ``"linear"`` or an :class:`~depass_lens.rules.MLPRule`).
        attention: default attention split: ``"symmetric"`` or ``"pattern"`` (credit for what a
            component writes through the values *and* for moving the pattern, through the QK
            circuit), ``"value"`` (DePass as published: patterns frozen, credit through the
            values only), or an :class:`~depass_lens.qk.AttentionSplit`. ``None`` (default):
            ``"symmetric"`` where the model's QK path can be followed exactly, else ``"value"``
            (chosen from the faithfulness and speed measurements in ``docs/qk.md``); with a
            :class:`~depass_lens.rules.ReferenceParity` rule, ``"value"`` (the reference's
            convention; it refuses the QK-aware splits).
        chunk_size: components propagated at once in forward mode; ``None`` picks one from
            ``memory_budget``.
        memory_budget: bytes forward mode may use for intermediates, and a circuit graph for its
            senders' outputs (formed whole layers at a time to fit; see ``docs/limitations.md``
            for what cannot be chunked). Default: half the free memory of the model's device
            left beside the streams in forward mode, a quarter of what is free once a graph's
            forward passes are done.
        check: verify losslessness against the real activations at every cached residual hook.
            A cache passed in is compared with the model whatever this says (a stale one is
            refused), and hooks left on the model are refused by every call.
        progress: show a tqdm bar when a call has several start points or many targets.
    """

    def __init__(
        self,
        model: TLModel,
        rule: str | MLPRule = "taylor",
        *,
        attention: str | AttentionSplit | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        check: bool = True,
        progress: bool = True,
    ):
        self.adapter = make_adapter(model)
        self.model = model
        self.rule = get_rule(rule)
        self._attention_given = attention is not None
        if attention is None:  # the QK-aware split where the model allows it
            reference = isinstance(self.rule, ReferenceParity)
            problems = self.adapter.qk_problems()
            attention = "value" if reference or problems else "symmetric"
            if problems and not reference:  # say why the QK-aware default is not used
                warnings.warn(
                    "DePass: attention defaults to 'value' (patterns frozen, no query/key credit) "
                    "because the QK path of this model cannot be followed exactly: "
                    + "; ".join(problems)
                    + ". Pass attention='value' to silence this",
                    UserWarning,
                    stacklevel=2,
                )
        self.attention = get_attention_split(attention)
        _refuse_mixed_conventions(self.rule, self.attention)
        if self.attention.uses_pattern:
            self.adapter.check_qk_supported()  # refuse up front, not mid-run
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.check = check
        self.progress = progress
        self.engine = DecomposedTransformer(self.adapter)

    def __repr__(self) -> str:
        return (
            f"DePass({self.adapter.model_name!r}, rule={self.rule!r}, "
            f"attention={self.attention.side!r})"
        )

    # ------------------------------------------------------------------ input
    def prepare(
        self,
        input: InputLike,
        attention_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> Prepared:
        """Tokenise and validate an input (string, list of strings, or token ids)."""
        model = self.model
        str_tokens = None
        if isinstance(input, str) or (
            isinstance(input, Sequence)
            and not isinstance(input, Tensor)
            and input
            and all(isinstance(s, str) for s in input)
        ):
            if model.tokenizer is None:
                raise DePassInputError(
                    "the input is text but the model has no tokenizer; pass token ids"
                )
            text = input if isinstance(input, str) else list(input)
            # never truncated: a prompt past n_ctx is refused with its length below
            tokens = self.adapter.to_tokens(text, prepend_bos, padding_side)
            _reject_unknown(model, tokens, input)
            if (
                attention_mask is None
                and tokens.shape[0] > 1
                and model.tokenizer.pad_token_id is not None
            ):
                bos = self.adapter.default_prepend_bos if prepend_bos is None else prepend_bos
                attention_mask = get_attention_mask(model.tokenizer, tokens, bos, padding_side)
                if bool(attention_mask.all()):
                    attention_mask = None
        elif isinstance(input, Tensor):
            tokens = input
        else:
            raise DePassInputError(
                "input must be a string, a list of strings or a token tensor, got "
                f"{type(input).__name__}"
            )
        tokens = _validate_tokens(tokens, self.adapter)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(tokens.device)
            if attention_mask.ndim == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if attention_mask.shape != tokens.shape:
                raise DePassInputError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have "
                    f"shape {tuple(tokens.shape)}"
                )
            if (attention_mask.sum(-1) == 0).any():
                raise DePassInputError("attention_mask has a prompt with no real tokens")
        if model.tokenizer is not None:
            str_tokens = [[str(t) for t in model.to_str_tokens(row)] for row in tokens]
        return Prepared(tokens, attention_mask, str_tokens)

    def _frozen(
        self, prepared: Prepared, cache: ActivationCache | None, names: Sequence[str]
    ) -> tuple[FrozenActivations, bool]:
        user_cache = cache is not None
        if cache is None:
            extra = set(names) | set(self._resid_hooks())
            cache = run_frozen_cache(self.adapter, prepared.tokens, prepared.attention_mask, extra)
        else:
            missing = [n for n in names if n not in cache.cache_dict]
            if missing:
                raise CacheMismatchError(
                    f"the ActivationCache lacks entries this run reads: {missing[:4]}; cache them "
                    "(names_filter=None caches everything) or let DePass run the model"
                )
        frozen = FrozenActivations(self.adapter, cache, prepared.tokens, prepared.attention_mask)
        if user_cache:  # of this model as it is now, on this input and mask
            refuse_stale_cache(self.adapter, cache, prepared.tokens, prepared.attention_mask)
        return frozen, user_cache

    def _settings(
        self, rule: str | MLPRule | None, attention: str | AttentionSplit | None
    ) -> tuple[MLPRule, AttentionSplit]:
        """A call's MLP rule and attention split: its own, else the wrapper's.

        :class:`~depass_lens.rules.ReferenceParity` takes the reference's value split where no
        split was asked for, and refuses a QK-aware one that was."""
        the_rule = get_rule(rule) if rule is not None else self.rule
        if attention is not None:
            split, given = get_attention_split(attention), True
        else:
            split, given = self.attention, self._attention_given
        if isinstance(the_rule, ReferenceParity) and split.uses_pattern and not given:
            split = get_attention_split("value")
        _refuse_mixed_conventions(the_rule, split)
        return the_rule, split

    def _refuse_engine_hooks(self, call: str) -> None:
        """Hooks a user keeps on :attr:`engine` act on :meth:`run`; attribution would follow them
        in forward mode only (adjoint mode and graphs never run the engine), so it refuses."""
        hooked = [repr(n) for n, point in self.engine.hook_dict.items() if point.has_hooks()]
        if hooked:
            raise DePassInputError(
                f"the decomposed pass (dp_model.engine) carries hooks on {', '.join(hooked)}; "
                f"they act on run(), but {call} would follow them in forward mode and not in "
                "adjoint mode or graphs. Remove them (dp_model.engine.reset_hooks()) or "
                "intervene through run(..., fwd_hooks=...)"
            )

    def _qk_hooks(self) -> list[str]:
        """Cache entries the QK path reads at every layer (pattern-side split, score hooks)."""
        return [
            n for layer in range(self.adapter.n_layers) for n in self.adapter.qk_hook_names(layer)
        ]

    def _resid_hooks(self) -> list[str]:
        names = []
        for layer in range(self.adapter.n_layers):
            names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"]
            if self.adapter.has_resid_mid:
                names.append(f"blocks.{layer}.hook_resid_mid")
        return names

    def _checker(
        self, frozen: FrozenActivations, user_cache: bool
    ) -> Callable[[str, Tensor], None] | None:
        if not self.check:
            return None
        error = CacheMismatchError if user_cache else LosslessnessError

        def check(name: str, value: Tensor) -> None:
            if name in frozen:
                try:
                    check_lossless(
                        value,
                        frozen[name],
                        name,
                        slack=100.0,
                        error=error,
                        precision=self.adapter.precision(value.dtype),
                    )
                except CacheMismatchError as exc:
                    raise CacheMismatchError(
                        f"{exc}. The cache does not match the model: was the model changed after "
                        "the cache was computed, or is the cache from another model or prompt?"
                    ) from None

        return check

    def _chunk(
        self, prepared: Prepared, n_comp: int, split: AttentionSplit | None = None
    ) -> int | None:
        """Components per chunk: what fits in the budget beside the stream itself.

        Forward mode holds about four copies of the stream (the start decomposition, its
        positional part, the running stream and one sublayer output); each chunk of ``c``
        components needs about ``8 c`` rows of the widest layer for its intermediates, and, on the
        pattern side, about four ``head x pos x pos`` score tensors per component.
        """
        if self.chunk_size is not None:
            return self.chunk_size
        batch, n_pos = prepared.tokens.shape
        itemsize = compute_dtype(self.adapter.dtype).itemsize  # float32 for half models
        stream = batch * n_comp * n_pos * self.adapter.d_model * itemsize
        budget = self.memory_budget
        if budget is None:
            budget = max((free_memory(self.adapter.device) - 4 * stream) // 2, 2**28)
        width = max(self.adapter.d_model, self.adapter.d_mlp, 1)
        per_comp = batch * n_pos * width * itemsize * 8
        if split is not None and split.uses_pattern:
            per_comp += batch * self.adapter.n_heads * n_pos * n_pos * itemsize * 4
        return max(1, min(n_comp, budget // max(per_comp, 1)))

    # ------------------------------------------------------------------ forward mode
    def run(
        self,
        input: InputLike,
        source: Source | None = None,
        *,
        cache: ActivationCache | None = None,
        rule: str | MLPRule | None = None,
        attention: str | AttentionSplit | None = None,
        names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
        fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (),
        attention_mask: Tensor | None = None,
    ) -> DecomposedCache:
        """Forward mode from one start point: the decomposed stream at every hook.

        Args:
            input: text, list of texts, or token ids ``[batch, pos]``.
            source: the initial decomposition (default ``Tokens()``); must have one start point.
            cache: an ``ActivationCache`` of this model on this input, reused for frozen values.
            rule: MLP split rule for this run (default: the wrapper's).
            attention: attention split for this run (default: the wrapper's).
            names_filter: which decomposed hooks to keep (default: residual stream, sublayer
                outputs and ``unembed.hook_in``). Same forms as TransformerLens's ``names_filter``.
                Keeping ``attn.hook_attn_scores`` also splits every score among the components.
            fwd_hooks: ``(name, fn)`` hooks on the decomposed run, e.g. to zero a component.
        """
        self.adapter.refuse_foreign_hooks()
        source = source or Tokens()
        the_rule, split = self._settings(rule, attention)
        prepared = self.prepare(input, attention_mask)
        starts = source.start_hooks(self.adapter)
        if len(starts) != 1:
            raise DePassInputError(
                f"{source!r} has {len(starts)} start points; run() decomposes from one. Pick one "
                "layer, or use attribute(), which handles every start point."
            )
        names_filter = _names_filter(names_filter)
        names = list(source.needed_hooks(self.adapter))
        hooked = {str(name) for name, _ in fwd_hooks} | {
            n for n, hp in self.engine.hook_dict.items() if hp.has_hooks()
        }
        scores_read = any(
            names_filter(n) or n in hooked
            for n in self.engine.hook_dict
            if n.endswith("attn.hook_attn_scores")
        ) or any(callable(name) for name, _ in fwd_hooks)
        if split.uses_pattern or scores_read:
            names += self._qk_hooks()
        frozen, user_cache = self._frozen(prepared, cache, names)
        sctx = SourceContext(self.adapter, frozen.cache, prepared.tokens, prepared.str_tokens)
        (decomposition,) = source.decompositions(sctx)
        ctx = self._context(
            prepared, frozen, user_cache, the_rule, decomposition.n_components, split
        )
        if fwd_hooks or any(hp.has_hooks() for hp in self.engine.hook_points()):
            ctx.checker = None  # an intervention changes the sums on purpose
        cache_dict, caching_hooks, _ = self.engine.get_caching_hooks(names_filter)
        with torch.no_grad(), self.engine.hooks(fwd_hooks=list(fwd_hooks) + list(caching_hooks)):
            self.engine(decomposition, ctx)
        return DecomposedCache(
            cache_dict, self.engine, decomposition.labels, Readout(self.adapter, prepared)
        )

    def _context(
        self,
        prepared: Prepared,
        frozen: FrozenActivations,
        user_cache: bool,
        rule: str | MLPRule | None,
        n_comp: int,
        split: AttentionSplit,
        memo: dict | None = None,
    ) -> PropagationContext:
        """``memo``: per-layer QK quantities to share between runs on the same input."""
        return PropagationContext(
            adapter=self.adapter,
            frozen=frozen,
            rule=get_rule(rule) if rule is not None else self.rule,
            chunk_size=self._chunk(prepared, n_comp, split),
            checker=self._checker(frozen, user_cache),
            progress=self.progress,
            attention=split,
            attention_mask=prepared.attention_mask,
            memo={} if memo is None else memo,
        )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str | Tensor,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Generate (greedy by default) and cite: each new token's logit over earlier tokens.

        Uses adjoint mode: one forward over the final sequence and one backward per new token.
        """
        self.adapter.refuse_foreign_hooks()  # before generating with them
        return generate_and_cite(
            self,
            prompt,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )

    # ------------------------------------------------------------------ attribution
    def choose_mode(
        self, source: Source, targets: Sequence[Target], rule: MLPRule, n_pos: int
    ) -> Literal["forward", "adjoint"]:
        """``mode="auto"``: adjoint for a linear rule unless sources are fewer than targets.

        Adjoint mode costs one forward plus one backward per scalar target; forward mode costs
        about one pass per component. So with a linear rule, forward mode is chosen exactly when
        the source has fewer components than there are scalar targets (e.g. a whole hidden state as
        target); a non-linear rule always uses forward mode.
        """
        if not rule.linear:
            return "forward"
        n_targets = sum(t.size(self.adapter) for t in targets)
        return "forward" if source.count(self.adapter, n_pos) < n_targets else "adjoint"

    def attribute(
        self,
        input: InputLike,
        target: Target | Sequence[Target],
        source: Source | Sequence[Source] | None = None,
        *,
        mode: Mode = "auto",
        rule: str | MLPRule | None = None,
        attention: str | AttentionSplit | None = None,
        cache: ActivationCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Attribution:
        """Score every component of ``source`` for every scalar of ``target``.

        Returns an :class:`Attribution` with ``scores`` of shape ``batch target comp``; for each
        start point, the scores (with ``rest`` and ``bias``) sum to the real target value.
        ``rule`` and ``attention`` override the wrapper's MLP rule and attention split.
        """
        self.adapter.refuse_foreign_hooks()
        self._refuse_engine_hooks("attribute()")
        source = as_source(source)
        targets = as_targets(target)
        the_rule, split = self._settings(rule, attention)
        prepared = self.prepare(input, attention_mask)
        self._validate_read_hooks(targets)
        self._validate_order(source, targets)
        chosen = (
            self.choose_mode(source, targets, the_rule, prepared.tokens.shape[1])
            if mode == "auto"
            else mode
        )
        if chosen == "adjoint":
            if not isinstance(the_rule, TaylorRule):
                raise DePassInputError(
                    f"adjoint mode needs a linear MLP rule (taylor); {the_rule.name!r} is not "
                    "linear. Use mode='forward' or rule='taylor'."
                )
            if cache is not None:
                raise DePassInputError(
                    "adjoint mode runs its own linearised forward pass and takes no cache; "
                    "use mode='forward' to reuse a cache"
                )
            return self._attribute_adjoint(prepared, targets, source, the_rule, split)
        if chosen != "forward":
            raise DePassInputError(f"mode must be 'auto', 'forward' or 'adjoint', not {mode!r}")
        return self._attribute_forward(prepared, targets, source, the_rule, split, cache)

    def graph(
        self,
        input: InputLike,
        target: Target | Sequence[Target],
        *,
        nodes: GraphNodes | str | None = None,
        attention: str | AttentionSplit | None = None,
        contrast: InputLike | None = None,
        linearisation: Literal["difference", "clean"] = "difference",
        by_position: bool = False,
        rule: str | MLPRule | None = None,
        attention_mask: Tensor | None = None,
    ) -> Graph:
        """The circuit graph: every edge ``A -> B`` (a sender's output read by a head's query, key
        or value, an MLP's input, or the target) with its exact share of each target.

        One linearised forward on per-node inputs, one backward per scalar target, then a batched
        contraction (no pass per edge). Conservation holds at every node
        (:meth:`~depass_lens.circuits.Graph.conservation`). Query and key edges carry a score only
        with ``attention="pattern"`` or ``"symmetric"``: with ``"value"`` (patterns frozen) what a
        head's query and key read cannot change the target, so those edges are 0.

        Args:
            input: prompts (text, list of texts, or token ids).
            target: a :class:`Target` read from the residual stream (``Logit``, ``LogitDiff``,
                ``Direction``, ``HiddenState``), or several reading the same hook.
            nodes: :class:`~depass_lens.circuits.GraphNodes` (``"pooled"`` or ``"tokens"``
                embeddings, optional neuron groups); default pooled embeddings, whole MLPs.
            attention: attention split (default: the wrapper's).
            contrast: corrupted prompts of the same shape: edges score ``out_A(clean) -
                out_A(corrupt)``, the share of the target's *change* each edge carries. Positions
                are paired one to one, so each corrupted prompt needs its prompt's token length:
                text is tokenised and padded on its own and refused where a row's real length
                differs; token ids are read with ``attention_mask``.
            linearisation: with ``contrast``: ``"difference"`` (default) makes every node the
                exact secant map of its input's change (:mod:`depass_lens.difference`), so
                conservation holds at every node relative to the corrupted run and the direct
                edges sum to the target's change; ``"clean"`` uses the clean run's frozen
                linearisation and the attention split (a receiver's inflow then differs from
                its outflow by its nonlinearity between the two runs).
            by_position: also keep each edge's score per position (``edge_scores_by_pos``).
            rule: MLP rule; must be linear (``taylor``).

        With ``check`` on (the wrapper's default) a graph that breaks its conservation laws
        raises :class:`~depass_lens.errors.LosslessnessError` instead of being returned.
        """
        from depass_lens.circuits.build import (  # noqa: PLC0415 - optional layer
            check_graph_supported,
            depass_graph,
        )
        from depass_lens.circuits.spec import as_graph_nodes  # noqa: PLC0415

        self.adapter.refuse_foreign_hooks()
        self._refuse_engine_hooks("graph()")
        check_graph_supported(self.adapter, contrast is not None, linearisation)
        the_rule = get_rule(rule) if rule is not None else self.rule
        if not isinstance(the_rule, TaylorRule):
            raise DePassInputError(
                f"a circuit graph needs a linear MLP rule (taylor): with {the_rule.name!r} the "
                "decomposed pass is not a linear map, so edges do not add up. Use rule='taylor' "
                "for graphs; forward mode (attribute(..., mode='forward')) gives node scores with "
                "any rule."
            )
        split = get_attention_split(attention) if attention is not None else self.attention
        if split.uses_pattern:
            self.adapter.check_qk_supported()
        targets = as_targets(target)
        prepared = self.prepare(input, attention_mask)
        self._validate_read_hooks(targets)
        if linearisation not in ("difference", "clean"):
            raise DePassInputError(
                f"linearisation must be 'difference' or 'clean', not {linearisation!r}"
            )
        corrupted = contrast_mask = None
        if contrast is not None:
            other = self.prepare(contrast)
            corrupted = other.tokens
            # text is padded on its own; token ids are read with the prompts' mask
            contrast_mask = (
                prepared.attention_mask if isinstance(contrast, Tensor) else other.attention_mask
            )
            if corrupted.shape != prepared.tokens.shape:
                raise DePassInputError(
                    f"contrast prompts have shape {tuple(corrupted.shape)} but the prompts have "
                    f"shape {tuple(prepared.tokens.shape)}: a contrast must match position by "
                    "position (same batch, same length)"
                )
        tctx = TargetContext(self.adapter, prepared.tokens, prepared.attention_mask)
        return depass_graph(
            self.adapter,
            prepared.tokens,
            prepared.attention_mask,
            targets,
            _target_names(targets, tctx),
            as_graph_nodes(nodes),
            rule=the_rule,
            split=split,
            contrast=corrupted,
            linearisation=linearisation,
            by_position=by_position,
            progress=self.progress,
            str_tokens=prepared.str_tokens,
            contrast_attention_mask=contrast_mask,
            check=self.check,
            memory_budget=self.memory_budget,
        )

    def feature_graph(
        self,
        input: InputLike,
        target: Target | Sequence[Target] | Literal["top_logits"],
        *,
        dictionaries: Any,
        attention: str | AttentionSplit | None = None,
        contrast: InputLike | None = None,
        edge_kinds: bool = True,
        zero_first_position: bool = False,
        batch_size: int = 64,
        max_feature_nodes: int | None = None,
        rule: str | MLPRule | None = None,
    ) -> FeatureGraph:
        """The attribution graph of one prompt over dictionary latents (design.md section 13).

        Nodes: token (and learned position) embeddings per position, every active latent
        ``(site, pos, index)``, one reconstruction error per ``(site, pos)``, each constant
        (``b_dec``, biases, frozen remainders) and the targets. An edge ``A -> B`` is A's output
        pushed through the local replacement model (norm scales frozen, each dictionary's module
        replaced by its latents with activations frozen, attention as ``attention`` says) to B's
        pre-activation, never through another dictionary. Every latent's incoming edges plus its
        own ``b_enc`` equal its real pre-activation, and the sources sum to each target
        (:meth:`~depass_lens.features.FeatureGraph.check`; with ``check`` on, a gap raises).

        Args:
            input: one prompt (text or ``[1, pos]`` token ids).
            target: a :class:`Target` read at the final stream (``Logit``, ``LogitDiff``,
                ``Direction``, ``CenteredLogit``...) or several reading the same hook; or
                ``"top_logits"``: circuit-tracer's salient logits (the most probable next tokens
                up to 10 and 95% probability, each a ``CenteredLogit``; their probabilities are
                in ``graph.settings["target_probabilities"]`` and weight influence).
            dictionaries: transcoders and SAEs (any object the SAE protocol reads, see
                :func:`~depass_lens.sae.as_sae_view`), a list or ``{name: sae}``; at most one per
                output hook.
            attention: ``"value"`` (patterns frozen: circuit-tracer's semantics), ``"pattern"``
                or ``"symmetric"`` (a latent also gets query and key edges for moving a head's
                pattern). Default: the wrapper's.
            contrast: a corrupted prompt of the same token length: the graph explains the change
                clean - corrupted with the difference linearisation (every nonlinearity its
                exact secant between the runs, :mod:`depass_lens.difference`). Latents active
                in either run are nodes, scored by their change; each receiver's edges sum to
                its pre-activation's change, the sources to the target's change.
            edge_kinds: with a pattern split (or a contrast), split every edge into ``value``,
                ``query`` and ``key`` parts (two more passes).
            zero_first_position: circuit-tracer's convention: latents at position 0 are left
                inactive (their output is part of that position's error).
            batch_size: receivers per backward pass (copies of the prompt in the forward).
            max_feature_nodes: compute incoming edges for at most this many latents, chosen by
                influence on the targets as the graph grows (circuit-tracer's
                ``max_feature_nodes``); the others keep outgoing edges only.
            rule: MLP rule for MLPs no dictionary replaces; must be linear (``taylor``).
        """
        from depass_lens.features.build import build_feature_graph  # noqa: PLC0415
        from depass_lens.features.logits import top_logit_targets  # noqa: PLC0415
        from depass_lens.features.sites import place_sites  # noqa: PLC0415

        self.adapter.refuse_foreign_hooks()
        self._refuse_engine_hooks("feature_graph()")
        the_rule = get_rule(rule) if rule is not None else self.rule
        if not isinstance(the_rule, TaylorRule):
            raise DePassInputError(
                f"a feature graph needs a linear MLP rule (taylor) for the MLPs no dictionary "
                f"replaces: with {the_rule.name!r} the replacement model is not linear, so edges "
                "do not add up to the pre-activations"
            )
        split = get_attention_split(attention) if attention is not None else self.attention
        if split.uses_pattern:
            self.adapter.check_qk_supported()
        sites = place_sites(self.adapter, dictionaries)
        prepared = self.prepare(input)
        if prepared.tokens.shape[0] != 1:
            raise DePassInputError(
                f"a feature graph explains one prompt; got {prepared.tokens.shape[0]}. Build one "
                "graph per prompt"
            )
        probabilities = None
        if isinstance(target, str):
            if target != "top_logits":
                raise DePassInputError(f"target must be a Target or 'top_logits', not {target!r}")
            target, probabilities = top_logit_targets(self.adapter, prepared.tokens)
        targets = as_targets(target)  # type: ignore[arg-type]
        self._validate_read_hooks(targets)
        corrupted = None
        if contrast is not None:
            corrupted = self.prepare(contrast).tokens
            if corrupted.shape != prepared.tokens.shape:
                raise DePassInputError(
                    f"the contrast has shape {tuple(corrupted.shape)} and the prompt "
                    f"{tuple(prepared.tokens.shape)}: a contrast must match position by position"
                )
        tctx = TargetContext(self.adapter, prepared.tokens, None)
        graph = build_feature_graph(
            self.adapter,
            prepared.tokens,
            prepared.str_tokens[0] if prepared.str_tokens else None,
            targets,
            _target_names(targets, tctx),
            sites,
            rule=the_rule,
            split=split,
            zero_first_position=zero_first_position,
            edge_kinds=edge_kinds,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            contrast=corrupted,
            target_probabilities=probabilities,
            progress=self.progress,
        )
        if self.check:
            graph.raise_if_inexact()
        return graph

    def _validate_read_hooks(self, targets: Sequence[Target]) -> None:
        for t in targets:
            hook = t.read_hook(self.adapter)
            if hook != FINAL and hook not in self.adapter.hook_names():
                raise DePassInputError(f"{t!r} reads hook {hook!r}, which this model does not have")

    def _validate_order(self, source: Source, targets: Sequence[Target]) -> None:
        """A target read before a start point cannot be explained by that start's components."""
        position = self.adapter.hook_position
        for t in targets:
            read = t.read_hook(self.adapter)
            for start in source.start_hooks(self.adapter):
                if position(read) < position(start):
                    raise DePassInputError(
                        f"{t!r} reads {read!r}, which comes before the source's start point "
                        f"{start!r}: those components cannot have shaped it"
                    )

    def _target_hooks(self, targets: Sequence[Target]) -> list[str]:
        return [name for t in targets for name in t.needed_hooks(self.adapter)]

    @torch.no_grad()
    def _attribute_forward(
        self,
        prepared: Prepared,
        targets: list[Target],
        source: Source,
        rule: MLPRule,
        split: AttentionSplit,
        cache: ActivationCache | None,
    ) -> Attribution:
        names = list(source.needed_hooks(self.adapter)) + self._target_hooks(targets)
        if split.uses_pattern:
            names += self._qk_hooks()
        frozen, user_cache = self._frozen(prepared, cache, names)
        sctx = SourceContext(self.adapter, frozen.cache, prepared.tokens, prepared.str_tokens)
        tctx = TargetContext(
            self.adapter, prepared.tokens, prepared.attention_mask, activations=frozen.cache
        )
        decompositions = source.decompositions(sctx)
        read_hooks = {t.read_hook(self.adapter) for t in targets} - {FINAL}
        per_start: list[Tensor] = []
        labels: list[ComponentLabel] = []
        starts: list[slice] = []
        qk_memo: dict = {}  # the real QK quantities depend on the input, not the start point
        for decomposition in _progress(decompositions, self.progress, "DePass forward"):
            ctx = self._context(
                prepared, frozen, user_cache, rule, decomposition.n_components, split, qk_memo
            )
            cache_dict, hooks, _ = self.engine.get_caching_hooks(lambda n: n in read_hooks)
            with torch.no_grad(), self.engine.hooks(fwd_hooks=hooks):
                final = self.engine(decomposition, ctx)
            cache_dict[FINAL] = final
            scores = []
            for t in targets:
                hook = t.read_hook(self.adapter)
                if hook not in cache_dict:
                    raise DePassInputError(
                        f"{t!r} reads {hook!r}, which comes before the source's start point "
                        f"{decomposition.hook!r}"
                    )
                scores.append(read_target(cache_dict[hook], t, tctx))
            starts.append(slice(len(labels), len(labels) + decomposition.n_components))
            labels += decomposition.labels
            per_start.append(torch.cat(scores, dim=1))
        all_scores = torch.cat(per_start, dim=-1)
        values = all_scores[..., starts[0]].sum(-1)
        return Attribution(
            all_scores,
            labels,
            _target_names(targets, tctx),
            values,
            "forward",
            rule.name,
            starts,
            attention=split.side,
        )

    def _attribute_adjoint(
        self,
        prepared: Prepared,
        targets: list[Target],
        source: Source,
        rule: TaylorRule,
        split: AttentionSplit,
    ) -> Attribution:
        adapter = self.adapter
        grad_hooks = source.gradient_hooks(adapter)
        store = set(source.needed_hooks(adapter)) | set(grad_hooks)
        store |= {t.read_hook(adapter) for t in targets} | set(self._target_hooks(targets))
        if any(h == "hook_embed" for h in source.start_hooks(adapter)):
            store |= {"hook_embed"}
        passed = linearised_forward(
            adapter, prepared.tokens, prepared.attention_mask, rule, store, split=split
        )
        sctx = SourceContext(adapter, passed.activations, prepared.tokens, prepared.str_tokens)
        tctx = TargetContext(
            adapter, prepared.tokens, prepared.attention_mask, activations=passed.activations
        )
        labels, starts = _labels_of(source, sctx)
        start_hooks = source.start_hooks(adapter)
        jobs = [(t, k) for t in targets for k in range(t.size(adapter))]
        all_scores, all_values = [], []
        functionals = {id(t): t.functional(tctx) for t in targets}
        for i, (t, k) in enumerate(
            _progress(jobs, self.progress and len(jobs) > 8, "DePass adjoint")
        ):
            weights, constants = functionals[id(t)]
            state = passed.live[t.read_hook(adapter)]
            constant = constants[:, k].to(state.dtype)
            with torch.enable_grad():  # also under a caller's torch.no_grad()
                value = target_scalar(state, weights[:, k].to(state.dtype), constant)
                grads, sites = passed.backward(
                    value.sum(), grad_hooks, retain_graph=i < len(jobs) - 1
                )
            with torch.no_grad():
                parts = source.scores(sctx, grads)
                fixed = []
                for part, start in zip(parts, start_hooks):
                    # the bias: its own <bias, grad> plus every constant entering after the start,
                    # each scored by its own gradient (not value - rest: completeness can fail)
                    part = part.clone()
                    part[:, -1] += passed.ledger.total_after(adapter, sites, start) + constant
                    fixed.append(part)
            all_scores.append(torch.cat(fixed, dim=-1))
            all_values.append(value.detach())
        scores = torch.stack(all_scores, dim=1)
        return Attribution(
            scores,
            labels,
            _target_names(targets, tctx),
            torch.stack(all_values, 1),
            "adjoint",
            rule.name,
            starts,
            attention=split.side,
        )


def _labels_of(source: Source, sctx: SourceContext) -> tuple[list[ComponentLabel], list[slice]]:
    """All component labels, and the slice of each start point's components."""
    labels: list[ComponentLabel] = []
    starts = []
    for group in source.label_groups(sctx):
        starts.append(slice(len(labels), len(labels) + len(group)))
        labels += group
    return labels, starts


def _target_names(targets: Sequence[Target], ctx: TargetContext) -> list[str]:
    return [name for t in targets for name in t.names(ctx)]


def _names_filter(names_filter: Any) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: name.endswith(DEFAULT_CACHED)
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


def _progress(items: Sequence, enabled: bool, desc: str):
    if not enabled or len(items) <= 1:
        return items
    return tqdm(items, desc=desc, leave=False, mininterval=2.0, delay=2.0)


def _validate_tokens(tokens: Tensor, adapter: ModelAdapter) -> Int[Tensor, "batch pos"]:
    if not isinstance(tokens, Tensor):
        raise DePassInputError(f"tokens must be a tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise DePassInputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2:
        raise DePassInputError(
            f"tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}"
        )
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise DePassInputError("tokens are empty")
    vocab = adapter.d_vocab
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        raise DePassInputError(
            f"token id {int(tokens[bad][0])} is outside the vocabulary (0..{vocab - 1})"
        )
    if tokens.shape[1] > adapter.n_ctx:
        raise DePassInputError(
            f"{tokens.shape[1]} tokens exceed the model's context of {adapter.n_ctx}; "
            "nothing is truncated silently"
        )
    return tokens.to(adapter.device)


def _reject_unknown(model: TLModel, tokens: Tensor, text: Any) -> None:
    """Word-level tokenizers map unknown words to ``<unk>``: refuse rather than explain noise."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if tok is None or unk is None or unk == getattr(tok, "pad_token_id", None):
        return
    if (tokens == unk).any():
        raise DePassInputError(
            f"the input contains words the tokenizer does not know (mapped to {tok.unk_token!r}): "
            f"{text!r}"
        )


def _refuse_mixed_conventions(rule: MLPRule, split: AttentionSplit) -> None:
    """:class:`ReferenceParity` with a QK-aware split gives neither the reference's numbers nor
    ours: refuse it, naming the split the reference uses."""
    if isinstance(rule, ReferenceParity) and split.uses_pattern:
        raise DePassInputError(
            f"{rule!r} reproduces the DePass reference, which freezes attention patterns, but "
            f"the attention split is {split.side!r}; the combination matches neither the "
            'reference nor DePass\'s own numbers. Use attention="value" (the default with '
            "ReferenceParity) or a plain rule such as rule='softmax'"
        )

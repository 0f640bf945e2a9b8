"""Edge patching: run the real model with only a circuit's edges carrying clean values.

Every receiver's input is rebuilt from its senders: in-circuit senders give their output in the
patched run itself, the others give their output on the corrupted prompt (or its mean over a
reference batch). With TransformerLens's split inputs this is a correction at each head's query,
key and value input and each MLP's input: ``input - sum over removed edges of (out_A(now) -
out_A(reference))``. One patched forward evaluates one circuit, whatever its size; the
faithfulness of a circuit is then ``(m(circuit) - m(corrupt)) / (m(clean) - m(corrupt))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from depass_lens.adapter import ModelAdapter
from depass_lens.circuits.spec import (
    GraphSpec,
    check_contrast_alignment,
    sender_hooks,
    sender_outputs,
)
from depass_lens.constants import output_constant
from depass_lens.errors import DePassInputError
from depass_lens.frozen import run_frozen_cache
from depass_lens.norms import frozen_scale, norm_map, post_sublayer_norms

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


@dataclass
class Faithfulness:
    """Metric values of a circuit against the clean and fully corrupted runs (batch means)."""

    circuit: float
    clean: float
    corrupt: float

    @property
    def normalized(self) -> float:
        """``(m(circuit) - m(corrupt)) / (m(clean) - m(corrupt))``: 1 recovers the clean run."""
        gap = self.clean - self.corrupt
        return (self.circuit - self.corrupt) / gap if gap != 0 else float("nan")


class EdgePatcher:
    """Evaluates circuits of ``spec`` on a batch by edge patching (one forward per circuit).

    Args:
        adapter: the wrapped model.
        spec: the graph whose edges circuits select (neuron-group nodes are not patchable).
        tokens: the clean prompts.
        metric: logits ``[batch, pos, vocab]`` -> a value per prompt (e.g. a logit difference).
        corrupted: corrupted prompts of the same shape (``ablation="corrupt"``).
        ablation: ``"corrupt"`` (each prompt's counterfactual) or ``"mean"`` (every sender's mean
            output over ``reference``, per position).
        reference: prompts for mean ablation (default: the corrupted prompts, else the clean ones).
        attention_mask: the prompts' mask (padding).
        corrupted_attention_mask: the corrupted prompts' own mask (default: ``attention_mask``);
            patching pairs positions, so it must mark the same real positions (refused, naming
            the rows and their lengths, where it does not).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        spec: GraphSpec,
        tokens: Int[Tensor, "batch pos"],
        metric: Metric,
        corrupted: Int[Tensor, "batch pos"] | None = None,
        ablation: Literal["corrupt", "mean"] = "corrupt",
        reference: Int[Tensor, "ref pos"] | None = None,
        attention_mask: Tensor | None = None,
        corrupted_attention_mask: Tensor | None = None,
    ):
        if any(node.kind == "neurons" for node in spec.nodes):
            raise DePassInputError(
                "edge patching works on whole MLPs: a neuron group has no input of its own to "
                "patch (score such graphs, patch graphs without neuron groups)"
            )
        if spec.target_hook != "unembed.hook_in":
            raise DePassInputError("edge patching evaluates circuits of logit-type targets")
        if ablation not in ("corrupt", "mean"):
            raise DePassInputError(f"ablation must be 'corrupt' or 'mean', not {ablation!r}")
        if ablation == "corrupt" and (corrupted is None or corrupted.shape != tokens.shape):
            raise DePassInputError(
                "corrupt ablation needs corrupted prompts of the same shape as the prompts"
            )
        if ablation == "corrupt" and corrupted_attention_mask is not None:
            check_contrast_alignment(tokens, attention_mask, corrupted_attention_mask)
        self.adapter = adapter
        self.spec = spec
        self.tokens = tokens
        self.metric = metric
        self.attention_mask = attention_mask
        self.corrupted = corrupted
        source = (
            corrupted
            if ablation == "corrupt"
            else (
                reference
                if reference is not None
                else (corrupted if corrupted is not None else tokens)
            )
        )
        assert source is not None
        acts = run_frozen_cache(
            adapter,
            source,
            None if ablation == "mean" else attention_mask,
            sender_hooks(adapter, spec),
        )
        with torch.no_grad():
            outputs = sender_outputs(adapter, spec, acts)
        if ablation == "mean":
            if outputs.shape[2] != tokens.shape[1]:
                raise DePassInputError(
                    "mean-ablation reference prompts must have the prompts' length"
                )
            outputs = outputs.mean(1, keepdim=True).expand(-1, tokens.shape[0], -1, -1)
        self.reference = outputs  # [sender, batch, pos, d_model]
        self._row = {node: row for row, node in enumerate(spec.senders)}
        self._clean: float | None = None
        self._corrupt: float | None = None

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def logits(self, keep: Bool[Tensor, " edge"]) -> Float[Tensor, "batch pos vocab"]:
        """The model's logits with every edge outside ``keep`` patched."""
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if keep.shape != (len(self.spec.edges),):
            raise DePassInputError(
                f"keep must be a boolean mask over the graph's {len(self.spec.edges)} edges"
            )
        hooks = self._hooks(keep)
        model = self.adapter.model
        with self.adapter.split_inputs(), self.adapter.hooks(hooks):
            return model(self.tokens, attention_mask=self.attention_mask)

    def evaluate(self, keep: Bool[Tensor, " edge"]) -> Faithfulness:
        """The circuit's metric (batch mean) beside the clean and corrupted runs'."""
        value = float(self.metric(self.logits(keep)).mean())
        return Faithfulness(value, self.clean, self.corrupt)

    def faithfulness(self, keep: Bool[Tensor, " edge"]) -> float:
        return self.evaluate(keep).normalized

    @property
    def clean(self) -> float:
        if self._clean is None:
            self._clean = float(
                self.metric(self.logits(torch.ones(len(self.spec.edges), dtype=torch.bool))).mean()
            )
        return self._clean

    @property
    def corrupt(self) -> float:
        if self._corrupt is None:
            self._corrupt = float(
                self.metric(self.logits(torch.zeros(len(self.spec.edges), dtype=torch.bool))).mean()
            )
        return self._corrupt

    # ------------------------------------------------------------------ hooks
    def _hooks(self, keep: Bool[Tensor, " edge"]) -> list[tuple[str | Callable, Callable]]:
        adapter, spec = self.adapter, self.spec
        n_senders = len(spec.senders)
        batch, n_pos = self.tokens.shape
        dtype = self.reference.dtype
        delta = self.reference.new_zeros(n_senders, batch, n_pos, adapter.d_model)
        produced = [0]  # senders whose delta is filled, in order
        frozen: dict[str, Tensor] = {}

        # drop[receiver slot] = senders whose edge into it is removed: [n_senders, n_targets]
        removed: dict[tuple[int, str], list[int]] = {}
        for i, edge in enumerate(spec.edges):
            if not keep[i]:
                removed.setdefault((edge.receiver, edge.kind), []).append(self._row[edge.sender])

        def fill(nodes: Sequence[int], outputs: Sequence[Tensor]) -> None:
            for node, out in zip(nodes, outputs):
                row = self._row[node]
                delta[row] = out.to(dtype) - self.reference[row]
                produced[0] = max(produced[0], row + 1)

        def matrix(receivers: Sequence[int], kind: str) -> Tensor:
            m = torch.zeros(n_senders, len(receivers), dtype=dtype, device=delta.device)
            for j, r in enumerate(receivers):
                for row in removed.get((r, kind), []):
                    m[row, j] = 1.0
            return m

        nodes_of: dict[tuple[str, int], list[int]] = {}
        for i, node in enumerate(spec.nodes):
            nodes_of.setdefault((node.kind, node.layer), []).append(i)

        def remember(value: Tensor, hook) -> None:
            frozen[hook.name] = value

        def embed_out(value: Tensor, hook) -> None:
            embed_nodes = nodes_of.get(("embed", -1), []) + nodes_of.get(("token", -1), [])
            outs = []
            for i in embed_nodes:
                node = spec.nodes[i]
                if node.kind == "embed":
                    outs.append(value)
                else:
                    only = torch.zeros_like(value)
                    only[:, node.index] = value[:, node.index]
                    outs.append(only)
            fill(embed_nodes, outs)

        def attention_out(layer: int):
            def fn(value: Tensor, hook) -> None:
                z = frozen[f"blocks.{layer}.attn.hook_z"]
                per_head = einops.einsum(
                    z, adapter.attention(layer).W_O, "b p h e, h e d -> b h p d"
                )
                norms = post_sublayer_norms(adapter, layer, "attn")
                for norm in norms:
                    per_head = norm_map(per_head, norm, frozen_scale(frozen, norm))
                heads = nodes_of.get(("head", layer), [])
                fill(heads, [per_head[:, spec.nodes[i].index] for i in heads])
                bias = adapter.attention(layer).b_O.expand_as(value)
                fill(
                    nodes_of.get(("bias", layer), []),
                    [output_constant(adapter, layer, "attn", frozen, bias)],
                )

            return fn

        def mlp_out(layer: int):
            def fn(value: Tensor, hook) -> None:
                fill(nodes_of.get(("mlp", layer), []), [value])

            return fn

        def patch(receivers: Sequence[int], kind: str, per_head: bool):
            m = matrix(receivers, kind)
            if not bool(m.any()):
                return None

            def fn(value: Tensor, hook) -> Tensor:
                count = produced[0]
                if per_head:
                    correction = einops.einsum(m[:count], delta[:count], "s h, s b p d -> b p h d")
                else:
                    correction = einops.einsum(m[:count, 0], delta[:count], "s, s b p d -> b p d")
                return value - correction.to(value.dtype)

            return fn

        hooks: list[tuple[str | Callable, Callable]] = [("blocks.0.hook_resid_pre", embed_out)]
        for layer in range(adapter.n_layers):
            prefix = f"blocks.{layer}"
            heads = nodes_of.get(("head", layer), [])
            for side in ("q", "k", "v"):
                fn = patch(heads, side, per_head=True) if heads else None
                if fn is not None:
                    hooks.append((f"{prefix}.hook_{side}_input", fn))
            for norm in post_sublayer_norms(adapter, layer, "attn"):
                if norm.scale_hook is not None:
                    hooks.append((norm.scale_hook, remember))
            hooks += [
                (f"{prefix}.attn.hook_z", remember),
                (f"{prefix}.hook_attn_out", attention_out(layer)),
            ]
            mlps = nodes_of.get(("mlp", layer), [])
            if mlps:
                fn = patch(mlps, "mlp", per_head=False)
                if fn is not None:
                    hooks.append((f"{prefix}.hook_mlp_in", fn))
                hooks.append((f"{prefix}.hook_mlp_out", mlp_out(layer)))
        final = patch([spec.target], "direct", per_head=False)
        if final is not None:
            hooks.append((f"blocks.{adapter.n_layers - 1}.hook_resid_post", final))
        return hooks


def logit_diff_metric(
    answers: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    attention_mask: Tensor | None = None,
) -> Metric:
    """``logit(answer) - logit(wrong)`` at each prompt's last real position."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        if attention_mask is None:
            last = torch.full_like(rows, logits.shape[1] - 1)
        else:
            mask = attention_mask.to(logits.device)
            last = mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)
        final = logits[rows, last]
        return final[rows, answers.to(logits.device)] - final[rows, wrong.to(logits.device)]

    return metric

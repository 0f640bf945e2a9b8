"""Generate and cite: every generated token's logit attributed to every earlier token.

After generating, one linearised forward over the whole sequence and one backward per generated
token (adjoint mode) give, for each new token, how much each earlier token (prompt or generated)
contributed to the logit that chose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens.errors import DePassInputError
from depass_lens.results import Attribution
from depass_lens.sources import Tokens
from depass_lens.targets import Logit


class Citer(Protocol):
    """What generation needs of the wrapper: the model, input checks and adjoint attribution."""

    model: Any
    adapter: Any  # the model's ModelAdapter (context length, ...)

    def prepare(self, input: Any) -> Any: ...

    def attribute(self, input: Any, target: Any, source: Any, *, mode: Any) -> Attribution: ...


@dataclass
class Generation:
    """A generated continuation and its token-level citations.

    Attributes:
        tokens: prompt + generated ids, ``[pos]``.
        str_tokens: their strings (ids as strings without a tokenizer).
        prompt_length: how many of ``tokens`` are the prompt.
        scores: ``[new, pos]``: row ``i`` is generated token ``i``'s logit split over the tokens
            before it (zero at and after its own position).
        bias: ``[new]``: the constant terms' share of each logit.
    """

    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    prompt_length: int
    scores: Float[Tensor, "new pos"]
    bias: Float[Tensor, " new"]

    @property
    def generated(self) -> list[str]:
        return self.str_tokens[self.prompt_length :]

    @property
    def text(self) -> str:
        return "".join(self.generated)

    def prompt_share(self) -> Float[Tensor, " new"]:
        """Fraction of each generated token's absolute attribution that falls on the prompt."""
        magnitude = self.scores.abs()
        return magnitude[:, : self.prompt_length].sum(-1) / magnitude.sum(-1).clamp_min(1e-12)


def generate_and_cite(
    depass: Citer,
    prompt: str | Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Generation:
    """Generate greedily (or by sampling) and attribute each new token to the tokens before it."""
    if max_new_tokens < 1:
        raise DePassInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model = depass.model
    prepared = depass.prepare(prompt)
    if prepared.tokens.shape[0] != 1:
        raise DePassInputError("generate takes one prompt at a time")
    if prepared.tokens.shape[1] + max_new_tokens > depass.adapter.n_ctx:
        raise DePassInputError(
            f"prompt ({prepared.tokens.shape[1]} tokens) + {max_new_tokens} new tokens exceed the "
            f"context of {depass.adapter.n_ctx}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        sequence = model.generate(
            prepared.tokens,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            stop_at_eos=False,
            verbose=False,
            return_type="tokens",
        )
    sequence = torch.as_tensor(sequence)[0].clone()  # generate() returns inference tensors
    prompt_length = prepared.tokens.shape[1]
    new = sequence[prompt_length:]
    # generated token i was chosen by the logits at position prompt_length - 1 + i
    context = sequence[:-1].unsqueeze(0)
    targets = [Logit(int(tok), pos=prompt_length - 1 + i) for i, tok in enumerate(new)]
    attribution = depass.attribute(context, targets, Tokens(), mode="adjoint")
    scores = torch.nn.functional.pad(attribution.tokens()[0, :, :], (0, 1))  # last token: 0
    if model.tokenizer is not None:
        str_tokens = [str(t) for t in model.to_str_tokens(sequence)]
    else:
        str_tokens = [str(int(t)) for t in sequence]
    return Generation(sequence, str_tokens, prompt_length, scores, attribution.bias[0])

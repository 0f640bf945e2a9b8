"""Feature graphs on the zoo models with their shipped dictionaries: exact everywhere, and the
attention edges frozen-attention graphs cannot see.

On ``induction`` (attention-output SAEs on both layers; held on 8 prompts, 4 tested here) the
answer is copied by layer-1 heads that find, with their keys, the position whose *previous*
token is the current one: information a layer-0 previous-token head (L0H1) wrote there. So the
layer-0 latents written mostly by that head, at that position, must reach the induction heads'
output latents through their keys: key edges among the ten largest edges into them. With
``attention="value"`` no edge has a key part.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.errors import UnsupportedModelError
from depass_lens.zoo.saes import load_dictionaries

MODELS = ["ioi", "recall", "induction", "binding"]


def _example(name: str, index: int = 0):
    model = zoo.load(name)
    batch = zoo.task(name).batch(model, 4, split="test", seed=0)
    tokens = batch.tokens[index : index + 1]
    corrupted = batch.corrupted[index : index + 1]
    target = dp.LogitDiff(batch.answers[index], batch.wrong[index])
    return model, tokens, corrupted, target


@pytest.mark.parametrize("name", MODELS)
def test_exact_on_every_zoo_model_with_its_dictionaries(name):
    model, tokens, corrupted, target = _example(name)
    depass = dp.DePass(model, progress=False)  # checks exactness itself (check=True)
    dictionaries = load_dictionaries(name)
    for attention in ("value", "symmetric"):
        graph = depass.feature_graph(
            tokens, target, dictionaries=dictionaries, attention=attention, edge_kinds=False
        )
        assert max(graph.check().values()) < 1e-5
    if depass.adapter.backend == "TransformerBridge" and depass.adapter.positional == "rotary":
        with pytest.raises(UnsupportedModelError, match="difference linearisation"):
            depass.feature_graph(tokens, target, dictionaries=dictionaries, contrast=corrupted)
        return  # TransformerLens 4's rotary attention fires no post-rotary hook
    contrastive = depass.feature_graph(
        tokens, target, dictionaries=dictionaries, contrast=corrupted, edge_kinds=False
    )
    assert max(contrastive.check().values()) < 1e-5
    with torch.no_grad():
        change = model(tokens)[0, -1] - model(corrupted)[0, -1]
    answer, wrong = (int(t) for t in (target.correct, target.wrong))
    expected = float(change[answer] - change[wrong])
    value = float(contrastive.value[contrastive.targets[0]])
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)


def _previous_token_share(sae) -> torch.Tensor:
    """Each latent's share of its decoder norm on head 1 of layer 0 (the previous-token head)."""
    per_head = sae.W_dec.detach().view(sae.W_dec.shape[0], 4, -1).norm(dim=-1) ** 2
    return per_head[:, 1] / per_head.sum(-1)


def test_previous_token_latents_reach_induction_latents_through_keys():
    model = zoo.load("induction")
    previous = zoo.info("induction")["head_roles"]["previous_token_head"][0]  # layer 0's heads
    assert max(range(4), key=lambda h: previous[h]) == 1  # L0H1, measured when it was trained
    dictionaries = load_dictionaries("induction")
    share = _previous_token_share(dictionaries[0])
    batch = zoo.task("induction").batch(model, 4, split="test", seed=0)
    depass = dp.DePass(model, progress=False)
    for i in range(4):
        tokens = batch.tokens[i : i + 1]
        last = tokens.shape[1] - 1
        earlier = [p for p in range(last) if int(tokens[0, p]) == int(tokens[0, last])]
        assert len(earlier) == 1  # unambiguous evaluation prompts
        key_position = earlier[0] + 1
        target = dp.Logit(int(batch.answers[i]))
        graph = depass.feature_graph(
            tokens, target, dictionaries=dictionaries, attention="symmetric"
        )
        scores = graph.target_scores()
        outputs = [j for j, n in enumerate(graph.nodes) if n.site == "L1.z" and n.pos == last]
        strongest = max(outputs, key=lambda j: abs(float(scores[j])))
        row = graph.row(strongest)
        total = graph.edges[row]
        parts = {kind: graph.kind_edges[kind][row] for kind in ("value", "query", "key")}
        top10 = total.abs().argsort(descending=True)[:10].tolist()
        through_keys = [
            j
            for j in top10
            if graph.nodes[j].site == "L0.z"
            and graph.nodes[j].kind == "latent"
            and graph.nodes[j].pos == key_position
            and float(share[graph.nodes[j].index]) > 0.5
            and abs(float(parts["key"][j]))
            > abs(float(parts["value"][j])) + abs(float(parts["query"][j]))
        ]
        assert through_keys, f"prompt {i}: no previous-token latent among the top edges by key"
        frozen = depass.feature_graph(tokens, target, dictionaries=dictionaries, attention="value")
        assert set(frozen.kind_edges) == {"value"}  # frozen patterns: no key edge exists

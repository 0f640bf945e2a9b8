"""Generate-and-cite, chunked forward mode, and the plotly figures."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

import depass_lens as dp
from depass_lens import plot
from tests.conftest import make_model, make_text_model, random_tokens


def test_generate_and_cite_sums_to_each_chosen_logit():
    model = make_text_model("gpt2", torch.float64)
    gen = dp.DePass(model).generate("When Mary and John went to the store", 4)
    assert len(gen.generated) == 4 and gen.scores.shape == (4, len(gen.tokens))
    logits = model(gen.tokens[None])[0].detach()
    for i in range(4):
        pos = gen.prompt_length - 1 + i
        chosen = gen.tokens[pos + 1]
        assert chosen == logits[pos].argmax()  # greedy
        torch.testing.assert_close(gen.scores[i].sum() + gen.bias[i], logits[pos, chosen])
        assert gen.scores[i, pos + 1 :].abs().max() == 0  # no citing the future
    assert isinstance(dp.plot.generation(gen), go.Figure)
    assert ((gen.prompt_share() >= 0) & (gen.prompt_share() <= 1)).all()


def test_sampled_generation_is_seeded():
    model = make_text_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    a = depass.generate("Mary went", 3, do_sample=True, seed=5)
    b = depass.generate("Mary went", 3, do_sample=True, seed=5)
    assert torch.equal(a.tokens, b.tokens)


def test_memory_budget_chunks_forward_mode_without_changing_results():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=2, n_pos=12)
    full = dp.DePass(model, chunk_size=10_000).attribute(tokens, dp.Logit(3), mode="forward")
    tiny = dp.DePass(model, memory_budget=1).attribute(tokens, dp.Logit(3), mode="forward")
    assert dp.DePass(model, memory_budget=1)._chunk(dp.DePass(model).prepare(tokens), 13) == 1
    torch.testing.assert_close(tiny.scores, full.scores, rtol=1e-10, atol=1e-10)  # fp64


def test_figures_carry_the_scores():
    model = make_text_model("gpt2", torch.float64)
    depass = dp.DePass(model)
    prompt = "When Mary and John went to the store"
    tok = depass.attribute(prompt, dp.Logit("Mary"))
    fig = plot.tokens(tok)
    shown = torch.tensor(fig.data[0].z[0], dtype=torch.float64)
    torch.testing.assert_close(shown, tok.tokens()[0, 0], rtol=1e-6, atol=1e-7)
    assert list(fig.data[0].text[0]) == depass.prepare(prompt).str_tokens[0]
    heads = depass.attribute(prompt, dp.Logit("Mary"), dp.Heads())
    grid = plot.heads(heads).data[0].z
    assert len(grid) == model.cfg.n_layers and len(grid[0]) == model.cfg.n_heads
    bars = plot.neurons(depass.attribute(prompt, dp.Logit("Mary"), dp.Neurons(1)), k=5).data[0]
    assert len(bars.x) == 5 and abs(bars.x[-1]) >= abs(bars.x[0])
    lines = plot.layer_contributions(torch.randn(3, 2), ["a", "b"])
    assert len(lines.data) == 2
    scatter = plot.subspace_scatter(torch.randn(6, 2), ["x", "y"] * 3)
    assert len(scatter.data) == 2


def test_attention_shares_heatmap_shows_the_scores():
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=3)
    targets = [dp.AttentionScore(2, h, -1, 3, side="key") for h in (0, 2)]
    shares = dp.DePass(model).attribute(tokens, targets, dp.Heads(1))
    labels = [str(lab) for lab in shares.labels]
    assert labels == ["L1H0", "L1H1", "L1H2", "L1H3", "L1.rest", "bias"]
    fig = plot.attention_shares(shares)
    heat = fig.data[0]
    torch.testing.assert_close(
        torch.tensor(heat.z, dtype=torch.float64), shares.scores.mean(0), rtol=1e-6, atol=1e-7
    )
    assert list(fig.layout.xaxis.ticktext) == labels
    assert list(fig.layout.yaxis.ticktext) == shares.target_names
    assert list(heat.x) == list(range(len(labels))) and list(heat.y) == [0, 1]
    assert heat.zmin == -heat.zmax  # centred at 0
    assert heat.zmax == pytest.approx(float(shares.scores.mean(0).abs().max()), rel=1e-6)
    for b in (1, -1):
        one = plot.attention_shares(shares, batch=b, title="one prompt")
        torch.testing.assert_close(
            torch.tensor(one.data[0].z, dtype=torch.float64), shares.scores[b], rtol=1e-6, atol=1e-7
        )
        assert one.layout.title.text == "one prompt"

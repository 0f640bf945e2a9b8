"""The zoo's shipped SAE: loads offline (with and without SAELens), its card's numbers hold, and
DePass is lossless with it on the model it was trained on."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.sae import SAELatents, SimpleSAE
from depass_lens.zoo.saes import load_sae, sae_card, sae_path, sae_stats
from tests.conftest import AGREEMENT


@pytest.fixture(scope="module")
def ioi():
    return zoo.load("ioi"), load_sae("ioi")


def test_shipped_files_small_and_in_saelens_layout():
    path = sae_path("ioi")
    assert {p.name for p in path.iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
    assert sum(p.stat().st_size for p in path.iterdir()) < 1_000_000
    with pytest.raises(KeyError, match="no shipped SAE"):
        sae_path("bilingual")


def test_card_numbers_reproduce(ioi):
    """L0 and explained variance on held-out prompts match stats.json and the card."""
    model, sae = ioi
    assert isinstance(sae, SimpleSAE) and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    stats = sae_stats("ioi")
    batch = zoo.task("ioi").batch(model, stats["held_out_prompts"], "test", 2024)
    hook = sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache(batch.tokens, names_filter=hook)
    x = cache[hook][:, 1:].reshape(-1, model.cfg.d_model)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    l0 = float((acts > 0).float().sum(-1).mean())
    explained = float(1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(l0 - stats["L0"]) < 1e-3 and abs(explained - stats["explained_variance"]) < 1e-4
    assert 2 <= l0 <= 20 and explained > 0.9
    card = sae_card("ioi")
    assert f"{stats['L0']:.2f}" in card and f"{stats['explained_variance']:.4f}" in card


def test_lossless_on_its_model(ioi):
    model, sae = ioi
    batch = zoo.task("ioi").batch(model, 8, "test", 7)
    depass = dp.DePass(model, progress=False)
    _, cache = model.run_with_cache(batch.tokens)
    res = depass.run(batch.tokens, SAELatents(sae))
    assert max(res.check_lossless(cache).values()) <= 1e-5
    target = dp.LogitDiff(batch.answers, batch.wrong)
    f = depass.attribute(batch.tokens, target, SAELatents(sae), mode="forward")
    a = depass.attribute(batch.tokens, target, SAELatents(sae), mode="adjoint")
    assert (
        float((f.scores - a.scores).abs().max() / f.scores.abs().max()) <= AGREEMENT[torch.float32]
    )


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="SAELens not installed")
def test_loads_as_saelens_sae(ioi):
    """The shipped directory is SAELens's own format: SAE.load_from_disk reads it, and its
    encoder and DePass scores match the dependency-free loader's."""
    model, sae = ioi
    theirs = load_sae("ioi", as_saelens=True)
    assert type(theirs).__name__ == "StandardSAE"
    x = torch.randn(5, model.cfg.d_model)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x))
    batch = zoo.task("ioi").batch(model, 4, "test", 3)
    depass = dp.DePass(model, progress=False)
    target = dp.LogitDiff(batch.answers, batch.wrong)
    a = depass.attribute(batch.tokens, target, SAELatents(theirs))
    b = depass.attribute(batch.tokens, target, SAELatents(sae))
    torch.testing.assert_close(a.scores, b.scores)


def test_top_latents_plot_with_decoder_lens(ioi):
    """The IOI prompt's top latent is the answer's name latent: its decoder promotes "Mary"."""
    model, sae = ioi
    prompt = "When Mary and John went to the store , John gave a drink to"
    depass = dp.DePass(model, progress=False)
    att = depass.attribute(prompt, dp.LogitDiff("Mary", "John"), SAELatents(sae))
    fig = dp.plot.latents(att, depass, sae, k=6)
    bars = fig.data[0]
    assert len(bars.y) == 6
    top_label, top_value = bars.y[-1], bars.x[-1]  # the largest bar is drawn last
    assert top_label.startswith("L1.resid_post/F") and top_label.split("→ ")[1].startswith("Mary")
    name = top_label.split(" →")[0]
    assert top_value == pytest.approx(dict(att.top(20))[name], rel=1e-5)
    assert top_value > 0.5 * float(att.target_values[0, 0])


def test_demo_report_with_sae(ioi, tmp_path):
    from depass_lens.demo import run_demo

    model, sae = ioi
    prompt = "When Mary and John went to the store , John gave a drink to"
    result = run_demo(model, prompt, dp.LogitDiff("Mary", "John"), tmp_path / "r.html", sae=sae)
    assert result.top_latents and result.top_latents[0][0].startswith("L1.resid_post/F")
    assert "top latents:" in result.summary()
    assert "SAE latents" in (tmp_path / "r.html").read_text()

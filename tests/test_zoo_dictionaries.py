"""The zoo's sparse dictionaries (transcoders for ``ioi``/``recall``, ``hook_z`` SAEs for
``induction``/``binding``): they load, fit their models, reproduce their held-out numbers (EV >=
0.95, L0 <= 20), round-trip through SAELens, and DePass is lossless with each of them."""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch

import depass_lens as dp
from depass_lens import zoo
from depass_lens.adapters import make_adapter
from depass_lens.errors import DePassInputError
from depass_lens.sae import SAELatents, SimpleSAE
from depass_lens.sae.placement import place
from depass_lens.sae.simple import load_sae_dir, save_sae_dir
from depass_lens.sae.view import as_sae_view
from depass_lens.zoo import dictionary_train
from depass_lens.zoo.saes import (
    SAE_DIR,
    dictionary_card,
    dictionary_keys,
    dictionary_stats,
    load_dictionaries,
    sae_path,
    top_examples,
)

HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None
#: model -> (kind, layers) the zoo ships
EXPECTED = {
    "ioi": ("transcoder", [0, 1, 2]),
    "recall": ("transcoder", [0, 1]),
    "induction": ("z", [0, 1]),
    "binding": ("z", [0, 1, 2]),
}
SHIPPED_MODELS = [m for m in EXPECTED if dictionary_keys(m)]
MAX_BYTES = 3_000_000


@functools.cache
def _model(name: str):
    return zoo.load(name)


@functools.cache
def _held_out(name: str) -> dict[str, torch.Tensor]:
    """Every dictionary hook of ``name`` (``hook_z`` flattened) on the held-out prompts its
    stats.json was measured on, from one forward pass."""
    model = _model(name)
    n = next(iter(dictionary_stats(name).values()))["held_out_prompts"]
    split, seed = dictionary_train.HELD_OUT_SPLIT, dictionary_train.HELD_OUT_SEED
    tokens = zoo.task(zoo.spec(name).task).batch(model, n, split, seed).tokens
    kind, layers = EXPECTED[name]
    names = {h for layer in layers for h in dictionary_train.hooks(kind, layer) if h is not None}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda hook: hook in names)
    return {hook: cache[hook].flatten(2) for hook in names}


def _x_y(name: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    hook_in, hook_out = dictionary_train.hooks(EXPECTED[name][0], layer)
    acts = _held_out(name)
    return acts[hook_in], acts[hook_out or hook_in]


def _cases():
    return [(m, i) for m in SHIPPED_MODELS for i in range(len(dictionary_keys(m)))]


def test_every_dictionary_is_shipped():
    """All four models ship their dictionaries, one per layer, in the named directories."""
    for name, (kind, layers) in EXPECTED.items():
        assert dictionary_keys(name) == [f"L{layer}.{kind}" for layer in layers], name
        dirs = [sae_path(name, key).name for key in dictionary_keys(name)]
        assert dirs == [f"{name}-L{layer}-{kind}" for layer in layers]
    with pytest.raises(KeyError, match="no shipped dictionaries"):
        load_dictionaries("bilingual")


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_dictionaries_load_and_fit_their_model(name):
    """Each loads in layer order, its hooks exist on its model, its widths match them, and
    DePass places it (a transcoder reads its own layer's MLP input)."""
    kind, layers = EXPECTED[name]
    model = _model(name)
    adapter = make_adapter(model)
    saes = load_dictionaries(name)
    stats = dictionary_stats(name)
    assert len(saes) == len(layers) == len(stats)
    for layer, sae, s in zip(layers, saes, stats.values()):
        assert isinstance(sae, SimpleSAE) and sae.cfg.architecture == "topk"
        hook_in, hook_out = dictionary_train.hooks(kind, layer)
        assert sae.cfg.metadata.hook_name == hook_in == s["hook_in"]
        assert sae.cfg.metadata.hook_name_out == hook_out and sae.is_transcoder == (kind != "z")
        assert not (sae.is_transcoder and sae.cfg.apply_b_dec_to_input)
        x, y = _x_y(name, layer)
        assert (sae.cfg.d_in, sae.cfg.d_out) == (x.shape[-1], y.shape[-1])
        assert sae.cfg.d_sae == s["d_sae"] and sae.cfg.k == s["k"] <= 20
        placement = place(as_sae_view(sae), adapter)
        assert placement.layer == layer and placement.kind == ("z" if kind == "z" else "output")


@pytest.mark.parametrize(("name", "index"), _cases())
def test_held_out_explained_variance_and_l0(name, index):
    """Recomputed on the held-out prompts stats.json names, EV (BOS excluded) >= 0.95 and L0 <=
    20, and both reproduce stats.json.

    L0 needs no tolerance: TopK keeps at most k <= 20 latents per token by construction. EV gets
    1e-4: the same float32 sums over ~10^5 numbers in another order (thread count, vector width)
    move the fourth decimal at most, and stats.json was measured with one thread."""
    kind, layers = EXPECTED[name]
    layer = layers[index]
    sae = load_dictionaries(name)[index]
    stats = dictionary_stats(name)[f"L{layer}.{kind}"]
    x, y = _x_y(name, layer)
    with torch.no_grad():
        acts = sae.encode(x[:, 1:])
        recon = sae.decode(acts)
    target, recon = y[:, 1:].flatten(0, 1), recon.flatten(0, 1)
    ev = float(1 - (target - recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum())
    l0 = (acts > 0).sum(-1).float()
    assert ev >= 0.95 - 1e-4 and abs(ev - stats["explained_variance"]) <= 1e-4
    assert float(l0.max()) <= min(sae.cfg.k, 20) and abs(float(l0.mean()) - stats["L0"]) <= 1e-3
    assert stats["explained_variance"] >= 0.95 and stats["L0"] <= 20
    dead = int((acts > 0).flatten(0, 1).any(0).logical_not().sum())
    assert dead == stats["dead_latents"]


@pytest.mark.parametrize("name", [m for m in ("recall", "induction") if m in SHIPPED_MODELS])
def test_lossless_with_a_dictionary(name):
    """DePass with the first layer's dictionary as the source (its components pass through every
    later layer) sums back to the real activations at every hook. One model per kind, to stay
    fast: a transcoder on RMSNorm's ``hook_normalized`` (``recall``) and a ``hook_z`` SAE
    (``induction``); tests/test_sae.py covers both kinds on every architecture family."""
    model = _model(name)
    tokens = zoo.task(name).batch(model, 2, "test", 7).tokens
    _, cache = model.run_with_cache(tokens)
    res = dp.DePass(model, progress=False).run(tokens, SAELatents(load_dictionaries(name)[0]))
    assert max(res.check_lossless(cache).values()) <= 1e-4


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_top_examples_and_card(name):
    """Top examples are (prompt, position, token, activation) of latents that fire, strongest
    first, the token the one at that position; the card states the stats' numbers."""
    model = _model(name)
    card = dictionary_card(name)
    for key, stats in dictionary_stats(name).items():
        examples = top_examples(name, key)
        assert 0 < len(examples) <= stats["d_sae"] - stats["dead_latents"]
        for rows in list(examples.values())[:20]:
            assert 1 <= len(rows) <= dictionary_train.TOP_EXAMPLES
            assert [r[3] for r in rows] == sorted((r[3] for r in rows), reverse=True)
            prompt, pos, token, act = rows[0]
            assert act > 0 and pos >= 1
            assert model.to_str_tokens(prompt)[pos] == token
        assert f"{stats['explained_variance']:.4f}" in card and stats["training"]["command"] in card


def test_total_size_under_budget():
    """Everything under zoo/saes/ (weights, configs, stats) stays under 3 MB."""
    total = sum(p.stat().st_size for p in SAE_DIR.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"{total / 1e6:.2f} MB"


def test_transcoder_format(tmp_path):
    """A transcoder writes SAELens's transcoder fields and reads them back; d_out != d_in."""
    tc = SimpleSAE(
        8, 12, "blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out", d_out=6
    )
    torch.manual_seed(0)
    for p in tc.parameters():
        p.data.normal_()
    save_sae_dir(tc, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 6
    assert cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    assert cfg["apply_b_dec_to_input"] is False
    back = load_sae_dir(tmp_path / "tc")
    assert back.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out" and back.cfg.d_out == 6
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), tc(x))
    assert as_sae_view(back).is_transcoder
    with pytest.raises(DePassInputError, match="cannot subtract b_dec"):
        SimpleSAE(8, 12, "h", hook_name_out="o", apply_b_dec_to_input=True)


@pytest.mark.skipif(not HAS_SAELENS, reason="SAELens not installed (the TL 4 environment)")
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_transcoder_round_trip_through_saelens(tmp_path, architecture):
    """Ours -> SAELens -> ours: SAELens loads the folder as its own class, computes the same
    output, and a folder SAELens saves loads back here with the same output."""
    from sae_lens import SAE  # noqa: PLC0415 - optional dependency

    d_out = 8 if architecture == "topk" else 6  # SAELens's TopK class needs d_out == d_in
    tc = SimpleSAE(
        8,
        12,
        "blocks.0.ln2.hook_normalized",
        architecture,
        k=3 if architecture == "topk" else None,
        hook_name_out="blocks.0.hook_mlp_out",
        d_out=d_out,
    )
    torch.manual_seed(0)
    for p in tc.parameters():
        p.data.normal_()
    if architecture == "jumprelu":
        tc.threshold.data.abs_()
    save_sae_dir(tc, tmp_path / "ours")
    theirs = SAE.load_from_disk(str(tmp_path / "ours"))
    expected = {"standard": "Transcoder", "jumprelu": "JumpReLUTranscoder", "topk": "TopKSAE"}
    assert type(theirs).__name__ == expected[architecture]
    assert theirs.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    x = torch.randn(5, 8)
    torch.testing.assert_close(theirs(x), tc(x))
    theirs.save_model(str(tmp_path / "theirs"))
    back = load_sae_dir(tmp_path / "theirs")
    assert back.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out" and back.cfg.d_out == d_out
    torch.testing.assert_close(back(x), tc(x))


@pytest.mark.skipif(not HAS_SAELENS, reason="SAELens not installed (the TL 4 environment)")
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_dictionaries_load_in_saelens(name):
    """SAELens reads every shipped folder (TopKSAE) and encodes and decodes as we do; a
    ``hook_z`` SAE takes ``hook_z`` as TransformerLens fires it (SAELens flattens the heads)."""
    from sae_lens import SAE  # noqa: PLC0415

    kind, layers = EXPECTED[name]
    heads = _model(name).cfg.n_heads
    for layer, key, ours in zip(layers, dictionary_keys(name), load_dictionaries(name)):
        theirs = SAE.load_from_disk(str(sae_path(name, key)))
        assert type(theirs).__name__ == "TopKSAE"
        assert theirs.cfg.metadata.hook_name_out == ours.cfg.metadata.hook_name_out
        x = _x_y(name, layer)[0][:4]
        raw = x.unflatten(-1, (heads, -1)) if kind == "z" else x
        assert as_sae_view(theirs).heads_axis == (kind == "z")
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(raw), ours.encode(x))
            torch.testing.assert_close(theirs(raw).reshape(x.shape), ours(x))

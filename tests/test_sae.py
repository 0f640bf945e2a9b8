"""SAE and transcoder latents as sources and targets: lossless, adjoint == forward, independent
gradient, latent targets, clear errors. Random models and random SAEs; SAELens not needed."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.errors import DePassInputError
from depass_lens.sae import SAELatent, SAELatents, SimpleSAE, load_sae_dir, save_sae_dir
from depass_lens.sae import source as sae_source
from tests.conftest import AGREEMENT, make_model, random_tokens
from tests.sae_helpers import KINDS, PlainSAE, make_sae

#: family -> SAE kinds it has (parallel blocks have no resid_mid)
FAMILY_KINDS = {
    "gpt2": list(KINDS),
    "llama": list(KINDS),
    "gemma": list(KINDS),  # post-attention / post-MLP norms
    "neox": [k for k in KINDS if k != "resid_mid"],  # parallel attention + MLP
}
CASES = [(f, k) for f, kinds in FAMILY_KINDS.items() for k in kinds]
#: fp64 on every family, fp32 on one (keeps the matrix short)
LOSSLESS = [(f, k, torch.float64) for f, k in CASES] + [
    ("gpt2", k, torch.float32) for k in FAMILY_KINDS["gpt2"]
]


def _real(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("family", "kind", "dtype"), LOSSLESS)
def test_lossless_with_error_component(family, kind, dtype):
    """Components sum to the real activation at every later hook (fp32 1e-5, fp64 1e-10), and the
    SAE's own components (latents, error, bias) sum to the real activation at its hook."""
    model = make_model(family, dtype)
    tokens = random_tokens(model)
    sae = make_sae(model, kind)
    source = SAELatents(sae)
    res = dp.DePass(model).run(tokens, source)
    limit = 1e-10 if dtype == torch.float64 else 1e-5
    errors = res.check_lossless(_real(model, tokens))
    assert len(errors) >= 3 and max(errors.values()) <= limit, errors

    # the SAE's own split, checked against TransformerLens's activation at its output hook
    adapter = dp.DePass(model).adapter
    placement = source.placement(adapter)
    cache = _real(model, tokens)
    (decomposition,) = source.decompositions(dp.sources.SourceContext(adapter, cache, tokens))
    own = [i for i, lab in enumerate(decomposition.labels) if lab.kind != "rest"]
    hook_real = {"z": f"blocks.{placement.layer}.hook_attn_out"}.get(
        placement.kind, placement.hook_out
    )
    total = decomposition.components[:, own].sum(1)
    assert _rel(total, cache[hook_real]) <= limit
    kinds = [lab.kind for lab in decomposition.labels]
    assert "sae_error" in kinds and kinds[-1] == "bias"
    n_latents = kinds.count("latent")
    acts = source.activations(dp.sources.SourceContext(adapter, cache, tokens))
    assert n_latents == int((acts != 0).any(dim=(0, 1)).sum()) > 0


def test_latent_components_are_decoder_contributions():
    """Component i of a residual SAE is exactly a_i W_dec[i] at every position."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    sae = make_sae(model, "resid_post")
    cache = _real(model, tokens)
    adapter = dp.DePass(model).adapter
    source = SAELatents(sae)
    (dec,) = source.decompositions(dp.sources.SourceContext(adapter, cache, tokens))
    acts = sae.encode(cache["blocks.1.hook_resid_post"])
    for c, label in enumerate(dec.labels):
        if label.kind == "latent":
            expected = acts[..., label.index, None] * sae.W_dec[label.index]
            torch.testing.assert_close(dec.components[:, c], expected, rtol=0, atol=1e-12)
    error = cache["blocks.1.hook_resid_post"] - sae(cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(dec.components[:, -2], error.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.components[:, -1], sae.b_dec.detach().expand_as(error))


@pytest.mark.parametrize(("family", "kind"), CASES)
@pytest.mark.parametrize("by_position", [False, True])
def test_adjoint_equals_forward(family, kind, by_position):
    """Standing test: adjoint == forward to AGREEMENT (fp32) for latent sources."""
    model = make_model(family, torch.float32)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model)
    source = SAELatents(make_sae(model, kind), by_position=by_position)
    targets = [dp.Logit(5), dp.LogitDiff(7, 11, pos=-2)]
    forward = depass.attribute(tokens, targets, source, mode="forward")
    adjoint = depass.attribute(tokens, targets, source, mode="adjoint")
    assert [str(x) for x in forward.labels] == [str(x) for x in adjoint.labels]
    assert _rel(adjoint.scores, forward.scores) <= AGREEMENT[torch.float32]
    assert forward.completeness_error() <= 1e-5 and adjoint.completeness_error() <= 1e-5


@pytest.mark.parametrize("by_position", [False, True])
def test_latent_scores_in_blocks_equal_one_block(by_position, monkeypatch):
    """Adjoint latent scores formed one latent (or pair) at a time equal the one-block scores
    and forward mode's: the blocking only changes which products are formed together."""
    model = make_model(CASES[0][0], torch.float64)
    tokens = random_tokens(model, batch=2)
    depass = dp.DePass(model)
    source = SAELatents(make_sae(model, CASES[0][1]), by_position=by_position)
    targets = [dp.Logit(5), dp.LogitDiff(7, 11, pos=-2)]
    whole = depass.attribute(tokens, targets, source, mode="adjoint")
    monkeypatch.setattr(sae_source, "SCORE_CHUNK_ELEMENTS", 1)
    blocked = depass.attribute(tokens, targets, source, mode="adjoint")
    forward = depass.attribute(tokens, targets, source, mode="forward")
    assert whole.scores.shape[-1] > 10  # many latents, so many blocks
    assert _rel(blocked.scores, whole.scores) <= AGREEMENT[torch.float64]
    assert _rel(blocked.scores, forward.scores) <= AGREEMENT[torch.float64]


def _frozen_linear_gradient(model, tokens, hook, token):
    """d logit(token, last pos) / d state at ``hook`` on the frozen-linearised model, by plain
    autograd: norm scales and patterns detached, each MLP activation act(g) as (act(g)/g) g."""
    seen: dict[str, torch.Tensor] = {}

    def detach(value, hook):
        return value.detach()

    def remember_pre(value, hook):
        seen[hook.name] = value

    def linear_post(value, hook):
        pre = seen[hook.name.replace("hook_post", "hook_pre")]
        return (value / pre).detach() * pre

    def leaf(value, hook):
        seen["leaf"] = value.detach().requires_grad_(True)
        return seen["leaf"]

    hooks = [(lambda n: n.endswith("hook_scale") or n.endswith("hook_pattern"), detach)]
    hooks += [(lambda n: n.endswith("mlp.hook_pre"), remember_pre)]
    hooks += [(lambda n: n.endswith("mlp.hook_post"), linear_post), (hook, leaf)]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    (grad,) = torch.autograd.grad(logits[:, -1, token].sum(), seen["leaf"])
    return grad


def test_scores_equal_independent_autograd_gradient():
    """All latents at one position: score == a_i <W_dec[i], g>, g from independent autograd."""
    model = make_model("gpt2", torch.float32)
    tokens = random_tokens(model, batch=2)
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(model, "resid_post", d_sae=64)
    depass = dp.DePass(model, attention="value")  # frozen patterns, as the independent code
    att = depass.attribute(tokens, dp.Logit(5), SAELatents(sae, by_position=True), mode="adjoint")
    grad = _frozen_linear_gradient(model, tokens, hook, 5)
    acts = sae.encode(model.run_with_cache(tokens, names_filter=hook)[1][hook]).detach()
    pos = 4
    index = [i for i, lab in enumerate(att.labels) if lab.kind == "latent" and lab.pos == pos]
    latents = [att.labels[i].index for i in index]
    assert len(latents) >= 10
    expected = acts[:, pos, latents] * (grad[:, pos] @ sae.W_dec[latents].T.detach())
    assert _rel(att.scores[:, 0, index], expected) <= AGREEMENT[torch.float32]


def test_selected_latents_pool_the_others():
    """latents=[...]: those latents keep their scores, the other active ones are pooled."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    sae = make_sae(model, "resid_mid")
    depass = dp.DePass(model)
    full = depass.attribute(tokens, dp.Logit(2), SAELatents(sae))
    chosen = [lab.index for lab in full.labels if lab.kind == "latent"][:3] + [39]
    part = depass.attribute(tokens, dp.Logit(2), SAELatents(sae, latents=chosen))
    forward = depass.attribute(tokens, dp.Logit(2), SAELatents(sae, latents=chosen), mode="forward")
    assert _rel(part.scores, forward.scores) <= 1e-10
    by_latent = {lab.index: full.scores[..., i] for i, lab in enumerate(full.labels)}
    for i, lab in enumerate(part.labels):
        if lab.kind == "latent":
            torch.testing.assert_close(
                part.scores[..., i], by_latent.get(lab.index, 0 * part.scores[..., i])
            )
    kinds = [lab.kind for lab in part.labels]
    assert kinds.count("latent") == 4 and "other_latents" in kinds
    assert part.completeness_error() <= 1e-10


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_other_architectures_lossless(architecture):
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    sae = make_sae(model, "resid_post", architecture=architecture, k=5)
    depass = dp.DePass(model)
    res = depass.run(tokens, SAELatents(sae))
    assert max(res.check_lossless(_real(model, tokens)).values()) <= 1e-10
    f = depass.attribute(tokens, dp.Logit(1), SAELatents(sae), mode="forward")
    a = depass.attribute(tokens, dp.Logit(1), SAELatents(sae), mode="adjoint")
    assert _rel(a.scores, f.scores) <= 1e-10


def test_plain_protocol_object():
    """Any object with the weights, encode and a hook name: no nn.Module, no SAELens."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    ref = make_sae(model, "resid_pre", layer=2)
    plain = PlainSAE(
        *(p.detach() for p in (ref.W_enc, ref.b_enc, ref.W_dec, ref.b_dec)),
        ref.cfg.metadata.hook_name,
    )
    depass = dp.DePass(model)
    a = depass.attribute(tokens, dp.Logit(3), SAELatents(plain))
    b = depass.attribute(tokens, dp.Logit(3), SAELatents(ref))
    torch.testing.assert_close(a.scores, b.scores)


# ------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out", "transcoder"])
def test_latent_target_value_and_modes(kind):
    """The target's value is the real pre-activation; forward == adjoint; scores sum to it."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, batch=2)
    sae = make_sae(model, kind, layer=2)
    target = SAELatent(sae, latent=7, pos=-2)
    depass = dp.DePass(model)
    cache = _real(model, tokens)
    x = cache[sae.hook_name if kind == "transcoder" else sae.cfg.metadata.hook_name]
    if kind == "transcoder":
        pre = x @ sae.W_enc + sae.b_enc
    else:
        pre = sae.hidden_pre(x)
    for source in (
        dp.Tokens(),
        dp.Heads(layers=[0, 1]),
        SAELatents(make_sae(model, "resid_post", layer=0)),
    ):
        f = depass.attribute(tokens, target, source, mode="forward")
        a = depass.attribute(tokens, target, source, mode="adjoint")
        torch.testing.assert_close(a.target_values[:, 0], pre[:, -2, 7].detach())
        assert _rel(a.scores, f.scores) <= 1e-9
        assert f.completeness_error() <= 1e-10 and a.completeness_error() <= 1e-10


def test_latent_to_latent_edges_exact():
    """Latents at layer 0 scored for a latent at layer 2: their shares plus error, bias sum to it;
    forward mode's shares equal the latent's pre-activation read from each propagated component."""
    model = make_model("llama", torch.float64)
    tokens = random_tokens(model)
    upstream = make_sae(model, "resid_post", layer=0, seed=1)
    downstream = make_sae(model, "resid_pre", layer=2, seed=2)
    depass = dp.DePass(model)
    source = SAELatents(upstream)
    target = SAELatent(downstream, latent=3, pos=-1)
    f = depass.attribute(tokens, target, source, mode="forward")
    res = depass.run(tokens, source, names_filter="blocks.2.hook_resid_pre")
    state = res["blocks.2.hook_resid_pre"][:, :, -1]  # batch comp d
    w, c = target.view.pre_activation(3, torch.float64, state.device)
    by_hand = state @ w
    by_hand[:, -1] += c
    torch.testing.assert_close(f.scores[:, 0], by_hand)
    assert f.completeness_error() <= 1e-10


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hook_z_latent_target(family):
    """A hook_z SAE's latent as a target, read per head: value, modes and completeness."""
    model = make_model(family, torch.float64)
    tokens = random_tokens(model, batch=2)
    sae = make_sae(model, "z", layer=2)
    target = SAELatent(sae, latent=4, pos=-1)
    z = _real(model, tokens)["blocks.2.attn.hook_z"].flatten(-2)
    depass = dp.DePass(model)
    for source in (dp.Tokens(), dp.Heads(layers=[0, 1]), SAELatents(make_sae(model, "z", 0))):
        f = depass.attribute(tokens, target, source, mode="forward")
        a = depass.attribute(tokens, target, source, mode="adjoint")
        torch.testing.assert_close(a.target_values[:, 0], sae.hidden_pre(z)[:, -1, 4].detach())
        assert _rel(a.scores, f.scores) <= 1e-9
        assert f.completeness_error() <= 1e-10 and a.completeness_error() <= 1e-10


# ------------------------------------------------------------------------------- errors
def test_clear_errors():
    model = make_model("gpt2", torch.float32)
    tokens = random_tokens(model)
    depass = dp.DePass(model)
    wrong_width = SimpleSAE(16, 8, "blocks.1.hook_resid_post")
    with pytest.raises(DePassInputError, match="d_in=16.*width 32"):
        depass.attribute(tokens, dp.Logit(0), SAELatents(wrong_width))
    missing = SimpleSAE(32, 8, "blocks.7.hook_resid_post")
    with pytest.raises(DePassInputError, match="does not have"):
        depass.attribute(tokens, dp.Logit(0), SAELatents(missing))
    with pytest.raises(DePassInputError, match="does not have"):
        depass.attribute(tokens, dp.Logit(0), SAELatents(SimpleSAE(32, 8, "blocks.1.hook_nope")))
    unsupported = SimpleSAE(48, 8, "blocks.1.mlp.hook_post")
    with pytest.raises(DePassInputError, match="supported output hooks"):
        depass.attribute(tokens, dp.Logit(0), SAELatents(unsupported))
    sae = make_sae(model, "resid_post", d_sae=8)
    with pytest.raises(DePassInputError, match="latent 8 is out of range.*d_sae=8"):
        SAELatents(sae, latents=[1, 8])
    with pytest.raises(DePassInputError, match="latent -1 is out of range"):
        SAELatent(sae, -1)
    broken = make_sae(model, "resid_post", d_sae=8)
    with torch.no_grad():
        broken.W_dec[2, 3] = float("nan")
    with pytest.raises(DePassInputError, match="W_dec contains NaN"):
        SAELatents(broken)
    nameless = PlainSAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, None)
    with pytest.raises(DePassInputError, match="no hook name"):
        SAELatents(nameless)
    SAELatents(nameless, hook="blocks.1.hook_resid_post")  # an explicit hook is enough
    with pytest.raises(DePassInputError, match="before the source's start point"):
        depass.attribute(tokens, SAELatent(sae, 0), SAELatents(make_sae(model, "resid_post", 2)))


def test_saelens_format_round_trip(tmp_path):
    model = make_model("gpt2", torch.float32)
    sae = make_sae(model, "resid_post", architecture="jumprelu")
    save_sae_dir(sae, tmp_path / "sae")
    loaded = load_sae_dir(tmp_path / "sae")
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_selected_latents_by_position():
    """latents=[...] with by_position: one component per (chosen latent, position), exact."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model, n_pos=6)
    sae = make_sae(model, "resid_post")
    depass = dp.DePass(model)
    source = SAELatents(sae, latents=[3, 11], by_position=True)
    f = depass.attribute(tokens, dp.Logit(2), source, mode="forward")
    a = depass.attribute(tokens, dp.Logit(2), source, mode="adjoint")
    assert sum(lab.kind == "latent" for lab in f.labels) == 2 * 6
    assert _rel(a.scores, f.scores) <= 1e-10 and f.completeness_error() <= 1e-10
    whole = depass.attribute(tokens, dp.Logit(2), SAELatents(sae, latents=[3, 11]))
    per_latent = {3: 0.0, 11: 0.0}
    for i, lab in enumerate(a.labels):
        if lab.kind == "latent":
            per_latent[lab.index] = per_latent[lab.index] + a.scores[..., i]
    for i, lab in enumerate(whole.labels[:2]):
        torch.testing.assert_close(whole.scores[..., i], per_latent[lab.index])

"""SAELens's own SAE objects through the duck-typed protocol (skipped without SAELens).

SAELens (the ``sae`` extra) supports TransformerLens 3.x only; under TransformerLens 4 these
tests skip and the protocol is still covered by tests/test_sae.py with dependency-free SAEs.
"""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.sae import SAELatent, SAELatents, as_sae_view
from tests.conftest import make_model, random_tokens

saes = pytest.importorskip(
    "sae_lens.saes", reason="SAELens is not installed (pip install 'depass-lens[sae]')"
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

ARCHS = {
    "standard": (saes.StandardSAE, saes.StandardSAEConfig, {}),
    "jumprelu": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, {}),
    "topk": (saes.TopKSAE, saes.TopKSAEConfig, {"k": 6}),
    "topk_rescaled": (
        saes.TopKSAE,
        saes.TopKSAEConfig,
        {"k": 6, "rescale_acts_by_decoder_norm": True},
    ),
    "gated": (saes.GatedSAE, saes.GatedSAEConfig, {}),
}


def _randomise(sae, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            scale = 0.3 / param.shape[0] ** 0.5 if name == "W_dec" else 0.3
            param.copy_((scale * noise).to(param.dtype))
            if name == "threshold":
                param.abs_()
    return sae


def _make(arch: str, hook: str, d_in: int, dtype: str = "float64"):
    cls, cfg_cls, extra = ARCHS[arch]
    meta = SAEMetadata(hook_name=hook, model_name="test")
    cfg = cfg_cls(d_in=d_in, d_sae=48, dtype=dtype, metadata=meta, **extra)
    return _randomise(cls(cfg))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_saelens_sae_lossless_and_modes(arch):
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    sae = _make(arch, "blocks.1.hook_resid_post", model.cfg.d_model)
    assert as_sae_view(sae).hook_in == "blocks.1.hook_resid_post"  # from cfg.metadata
    depass = dp.DePass(model)
    source = SAELatents(sae)
    _, cache = model.run_with_cache(tokens)
    errors = depass.run(tokens, source).check_lossless(cache)
    assert max(errors.values()) <= 1e-10
    f = depass.attribute(tokens, dp.Logit(4), source, mode="forward")
    a = depass.attribute(tokens, dp.Logit(4), source, mode="adjoint")
    assert _rel(a.scores, f.scores) <= 1e-10
    # the latents' activations are SAELens's own
    acts = sae.encode(cache["blocks.1.hook_resid_post"])
    n_active = int((acts != 0).any(dim=(0, 1)).sum())
    assert sum(lab.kind == "latent" for lab in f.labels) == n_active
    # the latent target is SAELens's own pre-activation (gated: the magnitude path)
    target = SAELatent(sae, latent=5, pos=-1)
    other = dp.DePass(model).attribute(tokens, target, dp.Tokens())
    x = cache["blocks.1.hook_resid_post"][:, -1]
    w, c = target.view.pre_activation(5, torch.float64, x.device)
    torch.testing.assert_close(other.target_values[:, 0], x @ w + c)
    if arch == "standard":
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(other.target_values[:, 0], pre[:, 5].detach())


def test_saelens_hook_z_sae_reshaping():
    """An attention-output SAE on hook_z with SAELens's own head reshaping switched on."""
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    d_in = model.cfg.n_heads * model.cfg.d_head
    cls, cfg_cls, _ = ARCHS["standard"]
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=48,
        dtype="float64",
        reshape_activations="hook_z",
        metadata=SAEMetadata(hook_name="blocks.1.attn.hook_z"),
    )
    sae = _randomise(cls(cfg))
    depass = dp.DePass(model)
    _, cache = model.run_with_cache(tokens)
    assert max(depass.run(tokens, SAELatents(sae)).check_lossless(cache).values()) <= 1e-10
    f = depass.attribute(tokens, dp.Logit(4), SAELatents(sae), mode="forward")
    a = depass.attribute(tokens, dp.Logit(4), SAELatents(sae), mode="adjoint")
    assert _rel(a.scores, f.scores) <= 1e-10


@pytest.mark.parametrize("skip", [False, True])
def test_saelens_transcoder(skip):
    model = make_model("gpt2", torch.float64)
    tokens = random_tokens(model)
    cls, cfg_cls = (
        (saes.SkipTranscoder, saes.SkipTranscoderConfig)
        if skip
        else (saes.Transcoder, saes.TranscoderConfig)
    )
    meta = SAEMetadata(
        hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"
    )
    cfg = cfg_cls(
        d_in=model.cfg.d_model,
        d_sae=48,
        d_out=model.cfg.d_model,
        dtype="float64",
        apply_b_dec_to_input=False,
        metadata=meta,
    )
    transcoder = _randomise(cls(cfg))
    view = as_sae_view(transcoder)
    assert view.is_transcoder and (view.W_skip is not None) == skip
    depass = dp.DePass(model)
    source = SAELatents(transcoder)
    _, cache = model.run_with_cache(tokens)
    assert max(depass.run(tokens, source).check_lossless(cache).values()) <= 1e-10
    f = depass.attribute(tokens, dp.Logit(4), source, mode="forward")
    a = depass.attribute(tokens, dp.Logit(4), source, mode="adjoint")
    assert _rel(a.scores, f.scores) <= 1e-10
    kinds = [lab.kind for lab in f.labels]
    assert ("sae_skip" in kinds) == skip and "sae_error" in kinds and "rest" in kinds
    # the error is the MLP's output minus the transcoder's own reconstruction
    x_in = cache["blocks.1.ln2.hook_normalized"]
    ctx = dp.sources.SourceContext(depass.adapter, cache, tokens)
    (dec,) = source.decompositions(ctx)
    error = cache["blocks.1.hook_mlp_out"] - transcoder(x_in)
    torch.testing.assert_close(dec.components[:, kinds.index("sae_error")], error.detach())

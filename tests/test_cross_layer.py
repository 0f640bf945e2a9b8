"""Cross-layer transcoders in feature graphs: exact, reducing to per-layer transcoders when their
cross-layer decoders are zero, each cross-layer decoder a path of its own; circuit-tracer's CLT
folders load offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import depass_lens as dp
from depass_lens.errors import DePassInputError
from depass_lens.sae.cross_layer import CrossLayerTranscoder, load_circuit_tracer_clt
from tests.conftest import make_model, random_tokens


def random_clt(model, d_sae: int = 20, seed: int = 0, jump: bool = False) -> CrossLayerTranscoder:
    gen = torch.Generator().manual_seed(seed)
    n, d = model.cfg.n_layers, model.cfg.d_model
    dtype = model.cfg.dtype

    def noise(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    decoders = [noise(d_sae, n - layer, d, scale=0.3 / d_sae**0.5) for layer in range(n)]
    threshold = noise(n, d_sae).abs() * 0.1 if jump else None
    return CrossLayerTranscoder(
        noise(n, d, d_sae), noise(n, d_sae), decoders, noise(n, d), threshold
    )


@pytest.mark.numerics
@pytest.mark.parametrize("jump", [False, True])
def test_cross_layer_graph_is_exact(jump):
    model = make_model("gpt2", torch.float64)
    depass = dp.DePass(model, attention="symmetric", progress=False)
    tokens = random_tokens(model, batch=1, n_pos=6)
    graph = depass.feature_graph(tokens, dp.Logit(3), dictionaries=[random_clt(model, jump=jump)])
    assert max(graph.check().values()) < 1e-10
    assert {n.site for n in graph.nodes if n.kind == "latent"} == {"L0.clt", "L1.clt", "L2.clt"}


def test_without_cross_layer_decoders_it_is_per_layer_transcoders():
    """Zero every decoder into a later layer: the same graph as per-layer transcoders built from
    each layer's own encoder and decoder (independent code path: the SAE protocol)."""
    model = make_model("gpt2", torch.float64)
    clt = random_clt(model)
    with torch.no_grad():
        for dec in clt.W_dec:
            dec[:, 1:] = 0
    per_layer = []
    for layer in range(model.cfg.n_layers):
        tc = _PerLayer(clt, layer)
        per_layer.append(tc)
    depass = dp.DePass(model, attention="value", progress=False)
    tokens = random_tokens(model, batch=1, n_pos=6)
    a = depass.feature_graph(tokens, dp.Logit(3), dictionaries=[clt])
    b = depass.feature_graph(tokens, dp.Logit(3), dictionaries=per_layer)
    assert [n.name.replace(".clt", ".mlp") for n in a.nodes] == [n.name for n in b.nodes]
    torch.testing.assert_close(a.edges, b.edges, rtol=0, atol=1e-12)


def test_cross_layer_decoders_carry_edges():
    """With its later-layer decoders, a layer-0 latent reaches a layer-2 latent directly (no
    attention between them needed): the edge changes by exactly that decoder's share."""
    model = make_model("gpt2", torch.float64)
    clt = random_clt(model)
    depass = dp.DePass(model, attention="value", progress=False)
    tokens = random_tokens(model, batch=1, n_pos=6)
    full = depass.feature_graph(tokens, dp.Logit(3), dictionaries=[clt])
    with torch.no_grad():
        clt.W_dec[0][:, 2] = 0
    cut = depass.feature_graph(tokens, dp.Logit(3), dictionaries=[clt])
    latent0 = [i for i, n in enumerate(full.nodes) if n.site == "L0.clt" and n.kind == "latent"]
    target = full.targets[0]
    assert float((full.incoming(target)[latent0] - cut.incoming(target)[latent0]).abs().max()) > 0
    assert max(cut.check().values()) < 1e-10  # still exact: the decoder's output moved to errors


class _PerLayer:
    """Layer ``layer`` of a CLT as a plain per-layer transcoder (the SAE protocol)."""

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        self.clt, self.layer = clt, layer
        self.W_enc = clt.W_enc[layer].detach()
        self.b_enc = clt.b_enc[layer].detach()
        self.W_dec = clt.W_dec[layer][:, 0].detach()
        self.b_dec = clt.b_dec[layer].detach()
        self.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        self.hook_name_out = f"blocks.{layer}.hook_mlp_out"

    def encode(self, x):
        return self.clt.encode_layer(self.layer, x)


def test_circuit_tracer_clt_folder_round_trip(tmp_path):
    model = make_model("gpt2", torch.float32)
    clt = random_clt(model, jump=True)
    for layer in range(clt.n_layers):
        save_file(
            {
                f"W_enc_{layer}": clt.W_enc[layer].detach().T.contiguous(),
                f"b_enc_{layer}": clt.b_enc[layer].detach(),
                f"b_dec_{layer}": clt.b_dec[layer].detach(),
                f"threshold_{layer}": clt.threshold[layer].detach(),
            },
            str(tmp_path / f"W_enc_{layer}.safetensors"),
        )
        save_file(
            {f"W_dec_{layer}": clt.W_dec[layer].detach().contiguous()},
            str(tmp_path / f"W_dec_{layer}.safetensors"),
        )
    loaded = load_circuit_tracer_clt(tmp_path)
    x = torch.randn(5, model.cfg.d_model)
    for layer in range(clt.n_layers):
        torch.testing.assert_close(loaded.encode_layer(layer, x), clt.encode_layer(layer, x))
        torch.testing.assert_close(loaded.W_dec[layer], clt.W_dec[layer])
    (tmp_path / "W_dec_1.safetensors").unlink()
    with pytest.raises(DePassInputError, match="W_dec_1"):
        load_circuit_tracer_clt(tmp_path)


def test_bad_cross_layer_transcoders_are_refused():
    model = make_model("gpt2", torch.float32)
    clt = random_clt(model)
    with pytest.raises(DePassInputError, match="W_dec\\[1\\] must be"):
        CrossLayerTranscoder(
            clt.W_enc.data, clt.b_enc.data, [clt.W_dec[0].data] * 3, clt.b_dec.data
        )
    with torch.no_grad():
        clt.W_dec[1][0, 0, 0] = float("nan")
    depass = dp.DePass(model, attention="value", progress=False)
    with pytest.raises(DePassInputError, match="NaN"):
        depass.feature_graph(random_tokens(model, 1, 5), dp.Logit(3), dictionaries=[clt])

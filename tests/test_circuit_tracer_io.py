"""circuit-tracer's per-layer transcoder files: read and written offline, without circuit-tracer.

The on-disk format is circuit-tracer 0.5.0's (``SingleLayerTranscoder.to_safetensors``,
``load_relu_transcoder``, ``load_transcoders_from_cache``): ``config.yaml`` +
``layer_{i}.safetensors`` with ``W_enc``/``W_dec`` both ``[d_transcoder, d_model]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from depass_lens.errors import DePassInputError
from depass_lens.sae import SimpleSAE, as_sae_view
from depass_lens.sae.circuit_tracer_io import (
    CircuitTracerTranscoder,
    load_circuit_tracer_transcoders,
    save_circuit_tracer_transcoders,
)

D_MODEL, D_SAE, N_LAYERS = 8, 24, 3


class Transcoder(nn.Module):
    """A duck-typed transcoder (ReLU, JumpReLU or TopK), ``ln2.hook_normalized -> hook_mlp_out``."""

    def __init__(self, layer: int, architecture: str = "standard", k: int | None = None, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 17 * layer)
        self.W_enc = nn.Parameter(torch.randn(D_MODEL, D_SAE, generator=gen))
        self.b_enc = nn.Parameter(0.3 * torch.randn(D_SAE, generator=gen))
        self.W_dec = nn.Parameter(torch.randn(D_SAE, D_MODEL, generator=gen) / D_SAE**0.5)
        self.b_dec = nn.Parameter(0.1 * torch.randn(D_MODEL, generator=gen))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.rand(D_SAE, generator=gen))
        self.hook_name = f"blocks.{layer}.ln2.hook_normalized"
        self.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        self.cfg = type("Cfg", (), {"architecture": architecture, "k": k})()

    def encode(self, x):
        pre = x @ self.W_enc + self.b_enc
        arch = self.cfg.architecture
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def forward(self, x):
        return self.encode(x) @ self.W_dec + self.b_dec


def _set(architecture="standard", k=None):
    return [Transcoder(layer, architecture, k) for layer in range(N_LAYERS)]


@pytest.fixture
def x():
    return torch.randn(5, 7, D_MODEL, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("architecture", "k"), [("standard", None), ("jumprelu", None), ("topk", 4)]
)
def test_round_trip_keeps_weights_and_encodings(tmp_path, x, architecture, k):
    saes = _set(architecture, k)
    folder = save_circuit_tracer_transcoders(saes, tmp_path / "tc", scan="zoo-test")
    loaded = load_circuit_tracer_transcoders(folder)
    assert [t.layer for t in loaded] == list(range(N_LAYERS))
    for sae, tc in zip(saes, loaded):
        assert tc.activation == {"standard": "relu", "jumprelu": "jump_relu"}.get(
            architecture, "topk_relu"
        )
        assert tc.k == k and tc.scan == "zoo-test"
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(tc, name), getattr(sae, name)), name
        if architecture == "jumprelu":
            assert torch.equal(tc.threshold, sae.threshold)
        assert torch.equal(tc.encode(x), sae.encode(x))
        assert torch.allclose(tc(x), sae(x), atol=1e-6)
        assert (tc.hook_name, tc.hook_name_out) == (sae.hook_name, sae.hook_name_out)
    # the loaded set writes the same files again, bit for bit
    again = save_circuit_tracer_transcoders(loaded, tmp_path / "again", scan="zoo-test")
    for layer in range(N_LAYERS):
        a = load_file(str(folder / f"layer_{layer}.safetensors"))
        b = load_file(str(again / f"layer_{layer}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_files_are_circuit_tracers_layout(tmp_path):
    saes = _set("jumprelu")
    folder = save_circuit_tracer_transcoders(saes, tmp_path / "tc", extra={"model_name": "m"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml",
        *(f"layer_{i}.safetensors" for i in range(N_LAYERS)),
    ]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "scan": "tc",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "model_name": "m",
    }
    params = load_file(str(folder / "layer_1.safetensors"))
    assert set(params) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"}
    # transposed against SAELens: both matrices are [d_transcoder, d_model]
    assert params["W_enc"].shape == (D_SAE, D_MODEL) == params["W_dec"].shape
    assert torch.equal(params["W_enc"], saes[1].W_enc.detach().T)
    assert torch.equal(params["W_dec"], saes[1].W_dec.detach())


def test_loaded_transcoder_reads_through_the_sae_protocol(tmp_path, x):
    folder = save_circuit_tracer_transcoders(_set("topk", 4), tmp_path / "tc")
    tc = load_circuit_tracer_transcoders(folder)[2]
    view = as_sae_view(tc)
    assert (view.hook_in, view.hook_out) == (
        "blocks.2.ln2.hook_normalized",
        "blocks.2.hook_mlp_out",
    )
    assert view.is_transcoder and not view.subtract_b_dec and view.W_skip is None
    assert view.W_enc.shape == (D_MODEL, D_SAE) and view.W_dec.shape == (D_SAE, D_MODEL)
    w, c = view.pre_activation(5, torch.float32, torch.device("cpu"))
    assert torch.allclose(x @ w + c, tc.hidden_pre(x)[..., 5])
    assert ((tc.encode(x) != 0).sum(-1) <= 4).all()


def test_b_dec_subtracted_by_an_sae_is_folded_into_b_enc(tmp_path, x):
    """SAELens-style encoders subtract b_dec, circuit-tracer's do not: b_enc -= b_dec @ W_enc."""
    saes = []
    for layer in range(2):
        sae = SimpleSAE(D_MODEL, D_SAE, f"blocks.{layer}.hook_resid_mid", apply_b_dec_to_input=True)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(layer)))
        sae.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        saes.append(sae)
    loaded = load_circuit_tracer_transcoders(save_circuit_tracer_transcoders(saes, tmp_path))
    for sae, tc in zip(saes, loaded):
        assert tc.feature_input_hook == "hook_resid_mid"
        assert torch.allclose(tc.b_enc, sae.b_enc - sae.b_dec @ sae.W_enc, atol=1e-6)
        assert torch.allclose(tc.hidden_pre(x), sae.hidden_pre(x), atol=1e-5)
        assert torch.allclose(tc.encode(x), sae.encode(x), atol=1e-5)


def _write_layers(folder, layers, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        params = {
            "W_enc": torch.randn(D_SAE, D_MODEL, generator=gen),
            "W_dec": torch.randn(D_SAE, D_MODEL, generator=gen),
            "b_enc": torch.randn(D_SAE, generator=gen),
            "b_dec": torch.randn(D_MODEL, generator=gen),
        }
        params.update(overrides)
        params = {k: v for k, v in params.items() if v is not None}
        save_file(params, str(folder / f"layer_{layer}.safetensors"))
    return folder


def test_circuit_tracer_files_transposed_on_load(tmp_path, x):
    """A file as circuit-tracer writes it: its encoder is x @ W_enc.T + b_enc, ReLU."""
    folder = _write_layers(tmp_path / "tc", range(2))
    loaded = load_circuit_tracer_transcoders(
        folder, feature_input_hook="ln2.hook_normalized", feature_output_hook="mlp.hook_out"
    )
    raw = load_file(str(folder / "layer_1.safetensors"))
    tc = loaded[1]
    assert tc.W_enc.shape == (D_MODEL, D_SAE) and torch.equal(tc.W_enc, raw["W_enc"].T)
    assert torch.equal(tc.encode(x), torch.relu(x @ raw["W_enc"].T + raw["b_enc"]))
    # circuit-tracer's MLP output point, as TransformerLens's own hook
    assert (tc.hook_name, tc.hook_name_out) == (
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
    )
    # the same files as a list or {layer: file}
    files = [folder / f"layer_{i}.safetensors" for i in range(2)]
    hooks = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    for given in (files, dict(enumerate(files))):
        again = load_circuit_tracer_transcoders(given, **hooks)
        assert torch.equal(again[1].W_enc, tc.W_enc)


class _Norm(nn.Module):
    def __init__(self, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(1 + 0.5 * torch.randn(D_MODEL, generator=gen))
        self.b = nn.Parameter(0.3 * torch.randn(D_MODEL, generator=gen))


class _Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.ln2 = _Norm(seed)


class _Model(nn.Module):
    """What the loader reads of a HookedTransformer: ``blocks[L].ln2.w`` and ``.b``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(seed) for seed in range(2)])


def test_mlp_hook_in_folds_the_norm(tmp_path, x):
    """circuit-tracer's mlp.hook_in is ln2's output, n * w + b; TransformerLens's
    ln2.hook_normalized is n, before the weight and bias: the loader folds them in."""
    folder = _write_layers(tmp_path / "tc", range(2), W_skip=torch.randn(D_MODEL, D_MODEL))
    hooks = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}
    with pytest.raises(DePassInputError, match="model="):
        load_circuit_tracer_transcoders(folder, **hooks)
    model = _Model()
    loaded = load_circuit_tracer_transcoders(folder, model=model, **hooks)
    for layer, tc in enumerate(loaded):
        raw = load_file(str(folder / f"layer_{layer}.safetensors"))
        norm = model.blocks[layer].ln2
        mlp_in = (x * norm.w + norm.b).detach()
        pre = mlp_in @ raw["W_enc"].T + raw["b_enc"]
        assert tc.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        assert tc.feature_input_hook == "ln2.hook_normalized"
        assert torch.allclose(tc.hidden_pre(x), pre, atol=1e-5)
        expect = torch.relu(pre) @ raw["W_dec"] + raw["b_dec"] + mlp_in @ raw["W_skip"].T
        assert torch.allclose(tc(x), expect, atol=1e-4)


def test_config_transcoders_list_and_skip(tmp_path, x):
    folder = _write_layers(tmp_path / "tc", ["a", "b"], W_skip=torch.randn(D_MODEL, D_MODEL))
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\n"
        "feature_output_hook: hook_mlp_out\nscan: s\ntranscoders:\n"
        "  - layer_a.safetensors\n  - layer_b.safetensors\n"
    )
    loaded = load_circuit_tracer_transcoders(folder / "config.yaml")
    raw = load_file(str(folder / "layer_b.safetensors"))
    tc = loaded[1]
    assert tc.W_skip is not None and torch.equal(tc.W_skip, raw["W_skip"])
    expect = torch.relu(x @ raw["W_enc"].T + raw["b_enc"]) @ raw["W_dec"] + raw["b_dec"]
    assert torch.allclose(tc(x), expect + x @ raw["W_skip"].T, atol=1e-5)
    assert as_sae_view(tc).W_skip is not None
    # written back, the skip connection stays
    again = load_circuit_tracer_transcoders(save_circuit_tracer_transcoders(loaded, tmp_path / "o"))
    assert torch.equal(again[1].W_skip, tc.W_skip)


def test_topk_kinds(tmp_path, x):
    """circuit-tracer's TopK keeps the k largest even when negative; topk_relu ReLUs them."""
    folder = _write_layers(tmp_path / "tc", range(1), b_enc=torch.full((D_SAE,), -50.0))
    hooks = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    (plain,) = load_circuit_tracer_transcoders(folder, activation="topk", k=3, **hooks)
    (relu,) = load_circuit_tracer_transcoders(folder, activation="topk_relu", k=3, **hooks)
    assert ((plain.encode(x) != 0).sum(-1) == 3).all() and (plain.encode(x) < 0).any()
    assert (relu.encode(x) == 0).all()
    # k and the activation travel in config.yaml (keys circuit-tracer ignores)
    config = yaml.safe_load(
        (save_circuit_tracer_transcoders([plain], tmp_path / "o") / "config.yaml").read_text()
    )
    assert (config["activation_function"], config["k"]) == ("topk", 3)


def test_gemma_scope_files(tmp_path, x):
    gen = torch.Generator().manual_seed(1)
    W_enc = torch.randn(D_MODEL, D_SAE, generator=gen)  # [d_model, d_tc]: not transposed
    common = {
        "b_enc": torch.randn(D_SAE, generator=gen),
        "b_dec": torch.randn(D_MODEL, generator=gen),
        "threshold": torch.rand(D_SAE, generator=gen),
    }
    W_dec = torch.randn(D_SAE, D_MODEL, generator=gen)
    np.savez(
        tmp_path / "params.npz",
        W_enc=W_enc.numpy(),
        W_dec=W_dec.numpy(),
        **{k: v.numpy() for k, v in common.items()},
    )
    save_file({"w_enc": W_enc, "w_dec": W_dec, **common}, str(tmp_path / "gs2.safetensors"))
    hooks = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    expect = (x @ W_enc + common["b_enc"]) * (x @ W_enc + common["b_enc"] > common["threshold"])
    for file in ("params.npz", "gs2.safetensors"):
        (tc,) = load_circuit_tracer_transcoders(tmp_path / file, **hooks)
        assert tc.activation == "jump_relu" and torch.equal(tc.W_enc, W_enc)
        assert torch.allclose(tc.encode(x), expect)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"W_enc": torch.zeros(D_MODEL, D_SAE)}, "transposed"),
        ({"W_dec": torch.zeros(D_SAE, D_MODEL + 1)}, "d_transcoder"),
        ({"b_dec": None}, "missing"),
        ({"extra": torch.zeros(3)}, "unexpected keys"),
        ({"log_thresholds": torch.zeros(D_SAE)}, "log_thresholds"),
        ({"activation_function.threshold": torch.zeros(D_SAE + 1)}, "threshold must be"),
        ({"b_enc": torch.full((D_SAE,), float("nan"))}, "NaN"),
    ],
)
def test_bad_layer_files(tmp_path, overrides, message):
    folder = _write_layers(tmp_path / "tc", range(2), **overrides)
    with pytest.raises(DePassInputError, match=message):
        load_circuit_tracer_transcoders(
            folder, feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out"
        )


def test_bad_folders_and_configs(tmp_path):
    hooks = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    with pytest.raises(FileNotFoundError):
        load_circuit_tracer_transcoders(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DePassInputError, match="no layer_"):
        load_circuit_tracer_transcoders(tmp_path / "empty", **hooks)
    gap = _write_layers(tmp_path / "gap", [0, 2])
    with pytest.raises(DePassInputError, match="every layer"):
        load_circuit_tracer_transcoders(gap, **hooks)
    plain = _write_layers(tmp_path / "plain", range(2))
    with pytest.raises(DePassInputError, match="feature_input_hook"):
        load_circuit_tracer_transcoders(plain)
    with pytest.raises(DePassInputError, match="not one circuit-tracer"):
        load_circuit_tracer_transcoders(plain, activation="gated", **hooks)
    with pytest.raises(DePassInputError, match="positive int k"):
        load_circuit_tracer_transcoders(plain, activation="topk", **hooks)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DePassInputError, match="not a readable"):
        load_circuit_tracer_transcoders(tmp_path / "junk.safetensors", **hooks)
    for text, message in [
        ("model_kind: cross_layer_transcoder\n", "cross-layer"),
        ("model_kind: something\n", "unknown model_kind"),
        ("model_kind: transcoder_set\ntranscoders:\n  - hf://org/repo/l0.safetensors\n", "hub"),
        ("- a list\n", "mapping"),
        ("model_kind: [unclosed\n", "not valid YAML"),
    ]:
        (plain / "config.yaml").write_text(text)
        with pytest.raises(DePassInputError, match=message):
            load_circuit_tracer_transcoders(plain, **hooks)


def test_what_circuit_tracer_cannot_hold_is_refused(tmp_path):
    saes = _set()
    sae_only = SimpleSAE(D_MODEL, D_SAE, "blocks.0.hook_resid_post")
    with pytest.raises(DePassInputError, match="not a transcoder"):
        save_circuit_tracer_transcoders([sae_only], tmp_path / "a")
    with pytest.raises(DePassInputError, match="every layer"):
        save_circuit_tracer_transcoders({0: saes[0], 2: saes[2]}, tmp_path / "b")
    with pytest.raises(DePassInputError, match="block 1"):
        save_circuit_tracer_transcoders([saes[1]], tmp_path / "c")
    mixed = _set()
    mixed[1].hook_name = "blocks.1.hook_resid_mid"
    with pytest.raises(DePassInputError, match="one input hook"):
        save_circuit_tracer_transcoders(mixed, tmp_path / "d")
    with pytest.raises(DePassInputError, match="different activation"):
        save_circuit_tracer_transcoders([saes[0], Transcoder(1, "topk", 2)], tmp_path / "e")
    negative = _set("jumprelu")
    with torch.no_grad():
        negative[0].threshold[0] = -0.5
    with pytest.raises(DePassInputError, match="negative JumpReLU"):
        save_circuit_tracer_transcoders(negative, tmp_path / "f")
    gated = _set()
    gated[0].cfg.architecture = "gated"
    with pytest.raises(DePassInputError, match="no circuit-tracer counterpart"):
        save_circuit_tracer_transcoders(gated, tmp_path / "g")
    wide = CircuitTracerTranscoder(
        D_MODEL, D_SAE, 0, "ln2.hook_normalized", "hook_mlp_out", d_out=3
    )
    with pytest.raises(DePassInputError, match="one d_model"):
        save_circuit_tracer_transcoders([wide], tmp_path / "h")
    with pytest.raises(DePassInputError, match="no transcoders"):
        save_circuit_tracer_transcoders([], tmp_path / "i")

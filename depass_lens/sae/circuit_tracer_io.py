"""Per-layer transcoders in circuit-tracer's on-disk format, read and written offline.

circuit-tracer (0.5.0) keeps a set of per-layer transcoders as a folder::

    config.yaml            model_kind: transcoder_set, feature_input_hook, feature_output_hook,
                           scan, and optionally ``transcoders:`` (one file per layer, in order)
    layer_0.safetensors    W_enc [d_transcoder, d_model], W_dec [d_transcoder, d_model],
    layer_1.safetensors    b_enc [d_transcoder], b_dec [d_model], and optionally
    ...                    activation_function.threshold [d_transcoder] (JumpReLU) and
                           W_skip [d_model, d_model] (skip transcoders)

(``circuit_tracer/transcoder/single_layer_transcoder.py``: ``SingleLayerTranscoder.to_safetensors``,
``load_relu_transcoder``, ``load_transcoder_set``; ``circuit_tracer/utils/hf_utils.py``:
``load_transcoders``; ``circuit_tracer/utils/caching.py``: ``load_transcoders_from_cache``).
Its encoder is ``act(x @ W_enc.T + b_enc)`` with no ``b_dec`` subtracted, so ``W_enc`` is stored
transposed against SAELens's ``[d_in, d_sae]``; the decoder is ``acts @ W_dec + b_dec
(+ x @ W_skip.T)``, as in SAELens. The hook names are relative to a block
(``ln2.hook_normalized``, ``hook_mlp_out``, or the ``mlp.hook_in`` / ``mlp.hook_out`` points
circuit-tracer adds around each MLP). TransformerLens fires ``ln2.hook_normalized`` before the
norm's weight and bias (``(x - mean) / scale``), so it is not the MLP's input; ``mlp.hook_in`` is.
A transcoder reading ``mlp.hook_in`` is loaded with the model's ``ln2`` weight and bias folded into
its encoder (and skip connection), exactly, so that it reads ``ln2.hook_normalized``: pass
``model=``.

:func:`load_circuit_tracer_transcoders` reads such a folder (also GemmaScope's ``params.npz`` and
GemmaScope 2's ``w_enc``/``w_dec`` files, which circuit-tracer loads with its special loaders)
into :class:`CircuitTracerTranscoder` objects that DePass reads through its duck-typed SAE
protocol (:func:`~depass_lens.sae.as_sae_view`). :func:`save_circuit_tracer_transcoders` writes
any transcoders DePass can read (SAELens, :class:`~depass_lens.sae.SimpleSAE`, these) in that
format, so ``circuit_tracer.utils.caching.load_transcoders_from_cache(folder.name,
cache_dir=folder.parent)`` or ``load_transcoder_set({i: folder / f"layer_{i}.safetensors"}, ...)``
reads them.

TopK: circuit-tracer has a ``TopK`` activation module but no way to say so in its files (its
loader makes every file without a threshold a ReLU transcoder). A TopK transcoder is therefore
written with ``activation_function`` and ``k`` in ``config.yaml``, keys circuit-tracer ignores and
this loader honours; after loading it with circuit-tracer, set each transcoder's
``activation_function`` yourself (``topk_relu`` = ReLU of the k largest pre-activations, as
SAELens; ``topk`` = circuit-tracer's ``TopK``, which keeps the k largest even when negative).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from depass_lens.errors import DePassInputError
from depass_lens.sae.view import as_sae_view

CONFIG_FILE = "config.yaml"
LAYER_FILE = "layer_{layer}.safetensors"
#: activation functions: circuit-tracer's own (``relu``, ``jump_relu``: ``x * (x > threshold)``,
#: ``topk``: its ``TopK``) and ``topk_relu`` (ReLU of the top k, SAELens's TopK)
ACTIVATIONS = ("relu", "jump_relu", "topk", "topk_relu")
#: circuit-tracer's per-layer file keys (``SingleLayerTranscoder.to_safetensors``)
_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
#: the MLP output point circuit-tracer's TransformerLens backend adds, as a plain TL hook (a model
#: with a norm after its MLP, e.g. Gemma 2's ``ln2_post``, has no plain equivalent: pass
#: ``feature_output_hook=`` then). ``mlp.hook_in`` has none: see ``load_circuit_tracer_transcoders``
_TL_ALIASES = {"mlp.hook_out": "hook_mlp_out"}
MLP_IN, LN2_NORMALIZED = "mlp.hook_in", "ln2.hook_normalized"
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CircuitTracerTranscoder(nn.Module):
    """One per-layer transcoder, in DePass's SAE protocol (weights in SAELens's orientation).

    ``acts = act(x @ W_enc + b_enc)`` (no ``b_dec`` subtracted), ``out = acts @ W_dec + b_dec
    (+ x @ W_skip.T)``, read at ``hook_name`` and written at ``hook_name_out``.

    Attributes:
        W_enc: ``[d_in, d_sae]`` (circuit-tracer's ``W_enc`` transposed).
        b_enc: ``[d_sae]``.
        W_dec: ``[d_sae, d_out]`` (as circuit-tracer stores it).
        b_dec: ``[d_out]``.
        threshold: ``[d_sae]`` for ``jump_relu``, else absent.
        W_skip: ``[d_out, d_in]`` of a skip transcoder, else ``None``.
        layer: the block it replaces the MLP of.
        activation: one of :data:`ACTIVATIONS`; ``k`` for the TopK ones.
        hook_name, hook_name_out: full TransformerLens hook names.
        feature_input_hook, feature_output_hook: circuit-tracer's block-relative names.
    """

    W_skip: Tensor | None

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        layer: int,
        feature_input_hook: str,
        feature_output_hook: str,
        activation: str = "relu",
        *,
        k: int | None = None,
        d_out: int | None = None,
        skip: bool = False,
        scan: str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_activation(activation, k, f"transcoder of layer {layer}")
        d_out = d_in if d_out is None else d_out
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if activation == "jump_relu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        else:
            self.W_skip = None
        self.layer, self.activation, self.k, self.scan = layer, activation, k, scan
        self.feature_input_hook = feature_input_hook
        self.feature_output_hook = feature_output_hook
        self.hook_name = tl_hook_name(layer, feature_input_hook)
        self.hook_name_out = tl_hook_name(layer, feature_output_hook)
        meta = SimpleNamespace(hook_name=self.hook_name, hook_name_out=self.hook_name_out)
        self.cfg = SimpleNamespace(
            d_in=d_in,
            d_sae=d_sae,
            d_out=d_out,
            architecture=activation,
            k=k,
            apply_b_dec_to_input=False,
            normalize_activations="none",
            metadata=meta,
        )

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return (
            f"CircuitTracerTranscoder(layer {self.layer}, {self.activation}{k}, "
            f"d_sae={self.cfg.d_sae}, {self.hook_name} -> {self.hook_name_out})"
        )

    def hidden_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """circuit-tracer's ``SingleLayerTranscoder.encode`` (with this activation function)."""
        return apply_activation(self.hidden_pre(x), self.activation, self.k, self._threshold())

    def decode(
        self, acts: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise DePassInputError(
                    f"{self!r} has a skip connection: decode(acts, x) needs its input x"
                )
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x), x)

    def _threshold(self) -> Tensor | None:
        return self.threshold if self.activation == "jump_relu" else None


def apply_activation(
    pre: Tensor, activation: str, k: int | None = None, threshold: Tensor | None = None
) -> Tensor:
    """circuit-tracer's activation functions on pre-activations ``pre`` (``topk_relu``: SAELens's
    TopK, the k largest ReLU'd)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jump_relu":
        assert threshold is not None
        return pre * (pre > threshold).to(pre.dtype)
    assert k is not None
    top = pre.topk(k, dim=-1)
    values = torch.relu(top.values) if activation == "topk_relu" else top.values
    return torch.zeros_like(pre).scatter(-1, top.indices, values)


def tl_hook_name(layer: int, hook: str) -> str:
    """``blocks.{layer}.{hook}`` for circuit-tracer's block-relative ``hook``, with its
    ``mlp.hook_out`` read as TransformerLens's ``hook_mlp_out``."""
    return f"blocks.{layer}.{_TL_ALIASES.get(hook, hook)}"


def _check_activation(activation: str, k: int | None, what: str) -> None:
    if activation not in ACTIVATIONS:
        raise DePassInputError(
            f"{what}: activation function {activation!r} is not one circuit-tracer's per-layer "
            f"transcoders use; supported: {', '.join(ACTIVATIONS)}"
        )
    if activation.startswith("topk") and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise DePassInputError(f"{what}: a {activation} transcoder needs a positive int k")


# ----------------------------------------------------------------------------------- loading


def load_circuit_tracer_transcoders(
    path_or_files: str | Path | Sequence[str | Path] | Mapping[int, str | Path],
    *,
    feature_input_hook: str | None = None,
    feature_output_hook: str | None = None,
    activation: str | None = None,
    k: int | None = None,
    model: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[CircuitTracerTranscoder]:
    """Read circuit-tracer's per-layer transcoders, offline, one per layer in layer order.

    Args:
        path_or_files: a folder with ``config.yaml`` (and ``layer_{i}.safetensors`` or the files
            its ``transcoders:`` list names, relative to the folder or absolute), a
            ``config.yaml``, a folder of ``layer_{i}.safetensors`` without a config, or the
            layer files themselves (a list in layer order, or ``{layer: file}``). GemmaScope's
            ``.npz`` and GemmaScope 2's files are read too.
        feature_input_hook: circuit-tracer's block-relative input hook name (e.g.
            ``"ln2.hook_normalized"``); default: the config's. Needed when there is no config.
        feature_output_hook: the output hook likewise (e.g. ``"hook_mlp_out"``).
        activation: override the activation function (one of :data:`ACTIVATIONS`); default:
            the config's ``activation_function`` (written by
            :func:`save_circuit_tracer_transcoders`), else what the file says (``jump_relu`` with
            a threshold, ``relu`` without), as circuit-tracer's loader decides.
        k: TopK's ``k`` (default: the config's).
        model: the TransformerLens model, needed only for transcoders reading ``mlp.hook_in``
            (the output of ``blocks[L].ln2``): its ``ln2.w`` / ``ln2.b`` are folded into the
            encoder, ``W_enc' = w * W_enc``, ``b_enc' = b_enc + b @ W_enc`` (and into a skip
            connection), so the transcoder reads ``ln2.hook_normalized``, which TransformerLens
            fires before the weight and bias, with the same pre-activations.
        device: where to load the weights.
        dtype: in what precision (default: the files' dtype).

    Raises:
        DePassInputError: a cross-layer transcoder (read it with
            :func:`depass_lens.sae.load_circuit_tracer_clt`), a hub reference, a missing or
            malformed file (wrong keys or shapes), missing layers, an unsupported activation,
            or ``mlp.hook_in`` without a ``model`` whose ``ln2`` can be folded.
        FileNotFoundError: a path that does not exist.
    """
    files, config, origin = _resolve(path_or_files)
    in_hook = feature_input_hook or config.get("feature_input_hook")
    out_hook = feature_output_hook or config.get("feature_output_hook")
    if not in_hook or not out_hook:
        raise DePassInputError(
            f"{origin}: no feature_input_hook / feature_output_hook (there is no config.yaml "
            "naming them); pass feature_input_hook='ln2.hook_normalized', "
            "feature_output_hook='hook_mlp_out' (circuit-tracer's block-relative names)"
        )
    act = activation or config.get("activation_function")
    k = k if k is not None else config.get("k")
    scan = config.get("scan")
    out = []
    for layer, file in enumerate(files):
        params = _read_layer_file(file)
        hook = str(in_hook)
        if hook == MLP_IN:
            params, hook = (
                _fold_ln2(params, model, layer, f"{file} (layer {layer})"),
                LN2_NORMALIZED,
            )
        out.append(_build(params, layer, hook, str(out_hook), act, k, scan, file, device, dtype))
    d_sae = {t.cfg.d_sae for t in out}
    if len(d_sae) > 1:
        raise DePassInputError(
            f"{origin}: circuit-tracer needs the same d_transcoder in every layer, got "
            f"{[t.cfg.d_sae for t in out]}"
        )
    return out


def _fold_ln2(params: dict[str, Tensor], model: Any, layer: int, what: str) -> dict[str, Tensor]:
    """Read ``ln2.hook_normalized`` (``n``) instead of ``mlp.hook_in`` (``n * w + b``)."""
    blocks = getattr(model, "blocks", None)
    norm = getattr(blocks[layer], "ln2", None) if blocks is not None else None
    w = getattr(norm, "w", None)
    if model is None or not isinstance(w, Tensor):
        raise DePassInputError(
            f"{what} reads circuit-tracer's mlp.hook_in, the output of blocks.{layer}.ln2, for "
            "which TransformerLens has no hook (ln2.hook_normalized fires before the norm's "
            "weight and bias); pass model= (a HookedTransformer with blocks[L].ln2.w) to fold "
            "ln2's weight and bias into the encoder, or feature_input_hook='ln2.hook_normalized' "
            "if the norm's weight is 1 and its bias 0 (e.g. fold_ln=True)"
        )
    b = getattr(norm, "b", None)
    w = w.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64) if isinstance(b, Tensor) else torch.zeros_like(w)
    W_enc = params["W_enc"]  # [d_transcoder, d_model]
    if W_enc.shape[-1] != w.shape[0]:
        raise DePassInputError(
            f"{what}: W_enc is {tuple(W_enc.shape)}, the model's ln2.w has {w.shape[0]} entries"
        )
    dtype = W_enc.dtype
    out = dict(params)
    out["W_enc"] = (W_enc.double() * w).to(dtype)
    out["b_enc"] = (params["b_enc"].double() + W_enc.double() @ b).to(dtype)
    if "W_skip" in params:  # skip = x_in @ W_skip.T
        W_skip = params["W_skip"].double()
        out["W_skip"] = (W_skip * w).to(dtype)
        out["b_dec"] = (params["b_dec"].double() + W_skip @ b).to(dtype)
    return out


def _resolve(
    path_or_files: str | Path | Sequence[str | Path] | Mapping[int, str | Path],
) -> tuple[list[Path], dict[str, Any], str]:
    """The layer files in layer order, the config (or ``{}``) and a label for errors."""
    if isinstance(path_or_files, Mapping):
        layers = sorted(path_or_files)
        if layers != list(range(len(layers))):
            raise DePassInputError(
                f"circuit-tracer needs a transcoder for every layer 0..{max(layers, default=0)}, "
                f"got layers {layers}"
            )
        files = [Path(path_or_files[i]) for i in layers]
        return _existing(files), {}, "transcoder files"
    if not isinstance(path_or_files, str | Path):
        files = [Path(p) for p in path_or_files]
        if not files:
            raise DePassInputError("no transcoder files given")
        return _existing(files), {}, "transcoder files"
    path = Path(path_or_files)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        config_path, folder = path, path.parent
    elif path.is_file():
        return [path], {}, str(path)
    else:
        config_path, folder = path / CONFIG_FILE, path
    config: dict[str, Any] = {}
    if config_path.exists():
        config = _read_config(config_path)
        kind = config.get("model_kind", "transcoder_set")
        if kind == "cross_layer_transcoder":
            raise DePassInputError(
                f"{config_path}: a cross-layer transcoder (model_kind: cross_layer_transcoder); "
                "this reads per-layer transcoders (transcoder_set): load it with "
                "depass_lens.sae.load_circuit_tracer_clt(folder)"
            )
        if kind != "transcoder_set":
            raise DePassInputError(f"{config_path}: unknown model_kind {kind!r}")
    listed = config.get("transcoders")
    if listed:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise DePassInputError(f"{config_path}: 'transcoders' must be a list of file paths")
        hub = [p for p in listed if p.startswith("hf://")]
        if hub:
            raise DePassInputError(
                f"{config_path} names hub files ({hub[0]}, ...): download them first (e.g. "
                "circuit_tracer.utils.caching.save_transcoders_to_cache) and load the cache "
                "folder; nothing is downloaded here"
            )
        files = [folder / p if (folder / p).exists() else Path(p) for p in listed]
        return _existing(files), config, str(config_path)
    found = {
        int(m.group(1)): f
        for f in folder.glob("layer_*.safetensors")
        if (m := re.fullmatch(r"layer_(\d+)\.safetensors", f.name))
    }
    if not found:
        raise DePassInputError(
            f"{folder} has no layer_{{i}}.safetensors files (circuit-tracer's per-layer "
            "transcoder format) and no config.yaml listing its transcoders"
        )
    if sorted(found) != list(range(len(found))):
        raise DePassInputError(
            f"{folder}: circuit-tracer needs a transcoder for every layer 0..{max(found)}, found "
            f"layers {sorted(found)}"
        )
    return [found[i] for i in range(len(found))], config, str(folder)


def _existing(files: list[Path]) -> list[Path]:
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"transcoder file {f} does not exist")
    return files


def _read_config(path: Path) -> dict[str, Any]:
    try:
        import yaml  # noqa: PLC0415 - PyYAML comes with transformers
    except ImportError as exc:  # pragma: no cover - transformers requires PyYAML
        raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml") from exc
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DePassInputError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise DePassInputError(f"{path}: expected a mapping of settings, got {type(config)}")
    return config


def _read_layer_file(path: Path) -> dict[str, Tensor]:
    """The tensors of one layer file in circuit-tracer's keys and orientation."""
    what = str(path)
    if path.suffix == ".npz":  # GemmaScope: W_enc [d_model, d_tc], threshold
        import numpy as np  # noqa: PLC0415

        try:
            with np.load(path) as arrays:
                raw = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
        except (OSError, ValueError) as exc:
            raise DePassInputError(f"{what} is not a readable .npz file: {exc}") from exc
        _need(raw, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), what)
        params = {k: raw[k] for k in ("W_dec", "b_enc", "b_dec")}
        params["W_enc"] = raw["W_enc"].T
        params["activation_function.threshold"] = raw["threshold"]
        return params
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise DePassInputError(f"{what} is not a readable safetensors file: {exc}") from exc
    if "w_enc" in raw:  # GemmaScope 2: w_enc [d_model, d_tc], threshold, affine_skip_connection
        _need(raw, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), what)
        params = {
            "W_enc": raw["w_enc"].T,
            "W_dec": raw["w_dec"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "activation_function.threshold": raw["threshold"],
        }
        if "affine_skip_connection" in raw:
            params["W_skip"] = raw["affine_skip_connection"].T
        return params
    if "log_thresholds" in raw:
        raise DePassInputError(
            f"{what}: log_thresholds is not part of circuit-tracer's format (its loader refuses "
            "it too); store activation_function.threshold = exp(log_thresholds)"
        )
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise DePassInputError(
            f"{what}: unexpected keys {unknown}; circuit-tracer's per-layer transcoder files "
            f"hold {sorted(_KEYS)}"
        )
    _need(raw, ("W_enc", "W_dec", "b_enc", "b_dec"), what)
    return raw


def _need(raw: Mapping[str, Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DePassInputError(f"{what}: missing {missing} (has {sorted(raw)})")


def _build(
    params: dict[str, Tensor],
    layer: int,
    in_hook: str,
    out_hook: str,
    activation: str | None,
    k: int | None,
    scan: Any,
    file: Path,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> CircuitTracerTranscoder:
    W_enc_ct, W_dec, b_enc, b_dec = (params[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    threshold, W_skip = params.get("activation_function.threshold"), params.get("W_skip")
    what = f"{file} (layer {layer})"
    if W_enc_ct.ndim != 2 or W_dec.ndim != 2 or b_enc.ndim != 1 or b_dec.ndim != 1:
        raise DePassInputError(
            f"{what}: W_enc and W_dec must be matrices and b_enc, b_dec vectors; got "
            f"{_shapes(params)}"
        )
    d_sae, d_model = b_enc.shape[0], b_dec.shape[0]
    if W_enc_ct.shape != (d_sae, d_model) or W_dec.shape != (d_sae, d_model):
        hint = ""
        if W_enc_ct.shape == (d_model, d_sae) and d_sae != d_model:
            hint = (
                " (this W_enc is [d_model, d_transcoder], SAELens's orientation: circuit-tracer "
                "stores it transposed; a SAELens folder loads with depass_lens.sae.load_sae_dir)"
            )
        raise DePassInputError(
            f"{what}: circuit-tracer's W_enc and W_dec are [d_transcoder={d_sae}, "
            f"d_model={d_model}] (from b_enc and b_dec), got {_shapes(params)}{hint}"
        )
    if threshold is not None and threshold.shape != (d_sae,):
        raise DePassInputError(
            f"{what}: activation_function.threshold must be [{d_sae}], got {tuple(threshold.shape)}"
        )
    if W_skip is not None and W_skip.shape != (d_model, d_model):
        raise DePassInputError(
            f"{what}: W_skip must be [{d_model}, {d_model}], got {tuple(W_skip.shape)}"
        )
    act = activation or ("jump_relu" if threshold is not None else "relu")
    _check_activation(act, k, what)
    if act == "jump_relu" and threshold is None:
        raise DePassInputError(
            f"{what}: a jump_relu transcoder needs activation_function.threshold"
        )
    if act != "jump_relu" and threshold is not None:
        raise DePassInputError(
            f"{what} has a JumpReLU threshold, but the activation function is {act!r}"
        )
    dtype = dtype or W_enc_ct.dtype
    tc = CircuitTracerTranscoder(
        d_model,
        d_sae,
        layer,
        in_hook,
        out_hook,
        act,
        k=k if act.startswith("topk") else None,
        skip=W_skip is not None,
        scan=None if scan is None else str(scan),
        dtype=dtype,
    )
    state = {"W_enc": W_enc_ct.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        state["threshold"] = threshold
    if W_skip is not None:
        state["W_skip"] = W_skip
    for name, value in state.items():
        if not torch.isfinite(value).all():
            raise DePassInputError(f"{what}: {name} contains NaN or inf")
    tc.load_state_dict({n: v.to(dtype).contiguous() for n, v in state.items()})
    return tc.to(device).eval()


def _shapes(params: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{n} {tuple(v.shape)}" for n, v in params.items())


# ------------------------------------------------------------------------------------ saving


def save_circuit_tracer_transcoders(
    saes: Sequence[Any] | Mapping[int, Any],
    folder: str | Path,
    *,
    scan: str | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write per-layer transcoders in circuit-tracer's format: ``config.yaml`` +
    ``layer_{i}.safetensors``.

    Args:
        saes: one transcoder per layer 0..n-1 (a list in layer order or ``{layer: sae}``), any
            object DePass reads (SAELens ``SAE``/transcoders, :class:`~depass_lens.sae.SimpleSAE`
            with ``hook_name_out``, :class:`CircuitTracerTranscoder`). Each must read
            ``blocks.{layer}.X`` and write ``blocks.{layer}.Y`` with the same X, Y for all layers,
            with ``d_in == d_out``, and use a ReLU, JumpReLU (threshold >= 0) or TopK activation.
        folder: created if needed; existing ``layer_*.safetensors`` there are replaced.
        scan: circuit-tracer's ``scan`` label (default: the folder's name).
        dtype: of the written weights (default: the transcoders' own).
        extra: more ``config.yaml`` entries (e.g. ``model_name``).

    SAELens's ``b_dec`` subtracted from the input is folded into ``b_enc`` (circuit-tracer has no
    such step): ``b_enc' = b_enc - b_dec @ W_enc``. A TopK transcoder gets ``activation_function``
    and ``k`` in ``config.yaml`` (see the module docstring).

    Returns:
        The folder.

    Raises:
        DePassInputError: what circuit-tracer's format cannot hold (named).
    """
    items = _layers(saes)
    folder = Path(folder)
    hooks_in: set[str] = set()
    hooks_out: set[str] = set()
    acts: set[tuple[str, int | None]] = set()
    rows: list[tuple[int, dict[str, Tensor]]] = []
    for layer, sae in items:
        view = as_sae_view(sae)
        what = f"transcoder {layer} ({type(sae).__name__})"
        hook_in = _block_relative(view.hook_in, layer, what)
        hook_out = _block_relative(view.hook_out, layer, what)
        if view.hook_in == view.hook_out:
            raise DePassInputError(
                f"{what} reads and writes {view.hook_in}: an SAE, not a transcoder; circuit-tracer "
                "needs transcoders that replace the MLPs (give it hook_name_out)"
            )
        hooks_in.add(hook_in)
        hooks_out.add(hook_out)
        if view.d_in != view.d_out:
            raise DePassInputError(
                f"{what}: circuit-tracer's transcoders have one d_model, got d_in={view.d_in}, "
                f"d_out={view.d_out}"
            )
        act, k, threshold = _activation_of(sae, what)
        acts.add((act, k))
        W_enc, b_enc = view.W_enc, view.b_enc
        if view.subtract_b_dec:  # (x - b_dec) @ W_enc + b_enc
            b_enc = b_enc - view.b_dec @ W_enc
        params = {
            "W_enc": W_enc.T,
            "W_dec": view.W_dec,
            "b_enc": b_enc,
            "b_dec": view.b_dec,
        }
        if threshold is not None:
            params["activation_function.threshold"] = threshold
        if view.W_skip is not None:
            params["W_skip"] = view.W_skip
        rows.append((layer, params))
    for label, found in (("input", hooks_in), ("output", hooks_out)):
        if len(found) > 1:
            raise DePassInputError(
                f"circuit-tracer's transcoder set has one {label} hook for every layer; these "
                f"transcoders use {sorted(found)}"
            )
    if len(acts) > 1:
        raise DePassInputError(
            f"the transcoders use different activation functions {sorted(acts, key=str)}; "
            "circuit-tracer's config names one for the set"
        )
    d_sae = {p["b_enc"].shape[0] for _, p in rows}
    if len(d_sae) > 1:
        raise DePassInputError(
            f"circuit-tracer needs the same d_transcoder in every layer, got {sorted(d_sae)}"
        )
    ((act, k),) = acts
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("layer_*.safetensors"):
        old.unlink()
    for layer, params in rows:
        tensors = {
            n: v.detach().to("cpu", dtype or v.dtype).contiguous() for n, v in params.items()
        }
        save_file(tensors, str(folder / LAYER_FILE.format(layer=layer)))
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "scan": scan or folder.name,
        "feature_input_hook": hooks_in.pop(),
        "feature_output_hook": hooks_out.pop(),
    }
    if act.startswith("topk"):  # not in circuit-tracer's files: read by this module only
        config.update(activation_function=act, k=k)
    config.update(extra or {})
    (folder / CONFIG_FILE).write_text(_to_yaml(config))
    return folder


def _layers(saes: Sequence[Any] | Mapping[int, Any]) -> list[tuple[int, Any]]:
    if isinstance(saes, Mapping):
        layers = sorted(saes)
        items = [(int(i), saes[i]) for i in layers]
    else:
        items = list(enumerate(saes))
    if not items:
        raise DePassInputError("no transcoders to save")
    layers = [i for i, _ in items]
    if layers != list(range(len(items))):
        raise DePassInputError(
            f"circuit-tracer needs a transcoder for every layer 0..{max(layers)}, got {layers}"
        )
    return items


def _block_relative(hook: str, layer: int, what: str) -> str:
    m = _BLOCK_HOOK.match(hook)
    if m is None:
        raise DePassInputError(
            f"{what}: hook {hook!r} is not inside a block (blocks.L....); circuit-tracer's hooks "
            "are block-relative"
        )
    if int(m.group(1)) != layer:
        raise DePassInputError(
            f"{what}: hook {hook!r} is in block {m.group(1)}, but it is the transcoder of layer "
            f"{layer} (circuit-tracer puts transcoder i at layer i)"
        )
    return m.group(2)


def _activation_of(sae: Any, what: str) -> tuple[str, int | None, Tensor | None]:
    """``(activation, k, threshold)`` in circuit-tracer's terms, or an error naming why not."""
    if isinstance(sae, CircuitTracerTranscoder):
        return sae.activation, sae.k, sae._threshold()
    cfg = getattr(sae, "cfg", None)
    arch = getattr(cfg, "architecture", None)
    if callable(arch):  # SAELens 6: cfg.architecture() is a method
        arch = arch()
    arch = str(arch or "standard")
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        raise DePassInputError(
            f"{what}: rescale_acts_by_decoder_norm ranks the top k by the rescaled "
            "pre-activations, which circuit-tracer's format cannot express"
        )
    if arch in ("standard", "relu", "transcoder", "skip_transcoder"):
        return "relu", None, None
    if arch in ("jumprelu", "jump_relu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        threshold = getattr(sae, "threshold", None)
        if threshold is None and getattr(sae, "log_threshold", None) is not None:
            threshold = sae.log_threshold.exp()
        if not isinstance(threshold, Tensor):
            raise DePassInputError(f"{what}: a JumpReLU transcoder without a threshold tensor")
        threshold = threshold.detach()
        if (threshold < 0).any():
            raise DePassInputError(
                f"{what}: a negative JumpReLU threshold (circuit-tracer's JumpReLU is "
                "x * (x > threshold), without SAELens's ReLU, so they differ below 0)"
            )
        return "jump_relu", None, threshold
    if arch in ("topk", "topk_transcoder", "topk_relu"):
        k = getattr(cfg, "k", None)
        _check_activation("topk_relu", k, what)
        return "topk_relu", k, None
    raise DePassInputError(
        f"{what}: architecture {arch!r} has no circuit-tracer counterpart (supported: ReLU, "
        "JumpReLU, TopK)"
    )


def _to_yaml(config: Mapping[str, Any]) -> str:
    """Flat YAML (JSON scalars are valid YAML), with a note on the keys circuit-tracer ignores."""
    lines = ["# per-layer transcoders in circuit-tracer's format (written by depass_lens)"]
    for key, value in config.items():
        if key in ("activation_function", "k"):
            lines.append(f"# {key}: read by depass_lens only; circuit-tracer's loader ignores it")
        if isinstance(value, list | tuple):
            lines.append(f"{key}:")
            lines.extend(f"  - {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


__all__ = [
    "ACTIVATIONS",
    "CircuitTracerTranscoder",
    "apply_activation",
    "load_circuit_tracer_transcoders",
    "save_circuit_tracer_transcoders",
    "tl_hook_name",
]

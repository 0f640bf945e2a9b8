"""Write the circuit-tracer parity fixture for the zoo ``ioi`` model (issue 18).

Runs in its own environment, circuit-tracer 0.5.0 on TransformerLens 3.2.1 (circuit-tracer needs
transformers <= 4.57.3), from the repository root::

    .venv/bin/python -m venv .venv-ct
    .venv-ct/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 "transformers<=4.57.3" \
        transformer-lens==3.2.1
    .venv-ct/bin/python scripts/circuit_tracer_fixture.py

Offline. It builds circuit-tracer's ``ReplacementModel`` (``ReplacementModel.from_config``, the
TransformerLens backend) for the zoo ``ioi`` model from ``depass_lens/zoo/weights/ioi.json`` +
``ioi.safetensors`` and the shipped per-layer transcoders ``depass_lens/zoo/saes/ioi-L{L}-
transcoder/`` (SAELens format, read directly and handed to circuit-tracer's
``SingleLayerTranscoder``), runs circuit-tracer's ``attribute()`` on the first 8 held-out IOI
prompts (``IOITask().examples(8, "test", seed=0)``) and writes

* ``tests/fixtures/circuit_tracer_ioi.safetensors``: ``tokens`` ``[n, n_pos]`` (BOS first),
  ``answers`` and ``logits_last`` (the model's last-position logits), and per prompt ``p{i}.*``:
  the active features ``(layer, pos, feature)`` in circuit-tracer's node order, their
  activations, the logit targets (ids, probabilities, demeaned unembedding vectors), the logit
  rows of the adjacency, and for the first ``--adjacency-prompts`` prompts the full adjacency
  matrix (float32) as its non-zero mask (bits) and non-zero values (:func:`unpacked` reads it
  back);
* ``tests/fixtures/circuit_tracer_ioi.json``: the conventions, node order, versions, per-prompt
  measurements and the transcoders' file hashes;
* the measured table between the ``measured`` markers of
  ``benchmarks/results/circuit_tracer_ioi.md``.

Of depass_lens it imports only the zoo's word-level tokenizer and the IOI task's prompt sampler
(``depass_lens.zoo.tokenizer``, ``depass_lens.zoo.tasks.ioi``: no TransformerLens 3.9 features).
``--random-transcoders`` uses random TopK transcoders of the same shape (written in SAELens's
format to a temporary folder) where the shipped ones are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.replacement_weights import load_hooked_weights  # noqa: E402
from depass_lens.zoo.tasks.ioi import IOITask  # noqa: E402
from depass_lens.zoo.tokenizer import build_tokenizer  # noqa: E402

ZOO = ROOT / "depass_lens" / "zoo"
FIXTURE = ROOT / "tests" / "fixtures" / "circuit_tracer_ioi.safetensors"
RESULTS = ROOT / "benchmarks" / "results" / "circuit_tracer_ioi.md"
MODEL = "ioi"
FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"
MARK_START, MARK_END = "<!-- measured:start -->", "<!-- measured:end -->"
MAX_FIXTURE_BYTES = 1_000_000


class ReluTopK(nn.Module):
    """SAELens's TopK (and depass_lens's ``SimpleSAE``): the k largest pre-activations, ReLU'd.

    circuit-tracer's own ``TopK`` keeps the k largest even when negative; this one zeroes those,
    as the transcoders were trained. Zeros are not active features (``to_sparse`` drops them).
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, top.indices, torch.relu(top.values))


def zoo_config(tokenizer: Any) -> Any:
    from transformer_lens import HookedTransformerConfig

    meta = json.loads((ZOO / "weights" / f"{MODEL}.json").read_text())
    config = {**meta["config"], "d_vocab": len(tokenizer), "model_name": f"zoo-{MODEL}"}
    return HookedTransformerConfig(**config, device="cpu", dtype=torch.float32)


def plain_model(tokenizer: Any) -> Any:
    """The zoo ``ioi`` model as a plain ``HookedTransformer`` (as ``depass_lens.zoo.load``)."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(zoo_config(tokenizer), tokenizer=tokenizer)
    state = load_file(str(ZOO / "weights" / f"{MODEL}.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or {n for n, _ in model.named_parameters()} & set(missing):
        raise SystemExit(f"zoo weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def zoo_model(tokenizer: Any, transcoders: Any) -> Any:
    """circuit-tracer's replacement model of the zoo ``ioi`` model (float32, CPU)."""
    from circuit_tracer import ReplacementModel

    cfg = zoo_config(tokenizer)
    model = ReplacementModel.from_config(
        cfg, transcoders, backend="transformerlens", tokenizer=tokenizer
    )
    state = load_file(str(ZOO / "weights" / f"{MODEL}.safetensors"))
    missing, unexpected = load_hooked_weights(model, state)
    if missing or unexpected:
        raise SystemExit(f"zoo weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def transcoder_dirs(n_layers: int) -> list[Path]:
    return [ZOO / "saes" / f"{MODEL}-L{layer}-transcoder" for layer in range(n_layers)]


def write_random_transcoders(folder: Path, n_layers: int, d_model: int, d_sae: int, k: int):
    """Random TopK transcoders in SAELens's format (development stand-ins)."""
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for layer in range(n_layers):
        out = folder / f"{MODEL}-L{layer}-transcoder"
        out.mkdir(parents=True)
        weights = {
            "W_enc": torch.randn(d_model, d_sae, generator=gen) / d_model**0.5,
            "b_enc": 0.1 * torch.randn(d_sae, generator=gen),
            "W_dec": torch.randn(d_sae, d_model, generator=gen) / d_sae**0.5,
            "b_dec": 0.1 * torch.randn(d_model, generator=gen),
        }
        save_file(weights, str(out / "sae_weights.safetensors"))
        cfg = {
            "d_in": d_model,
            "d_sae": d_sae,
            "d_out": d_model,
            "architecture": "topk",
            "k": k,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {
                "hook_name": f"blocks.{layer}.{FEATURE_INPUT_HOOK}",
                "hook_name_out": f"blocks.{layer}.{FEATURE_OUTPUT_HOOK}",
                "model_name": f"zoo-{MODEL}",
                "random": True,
            },
        }
        (out / "cfg.json").write_text(json.dumps(cfg, indent=1))
        dirs.append(out)
    return dirs


def load_transcoders(dirs: list[Path]) -> tuple[Any, list[dict[str, Any]]]:
    """SAELens-format TopK transcoders as circuit-tracer's ``TranscoderSet`` (float32)."""
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet

    transcoders, info = {}, []
    for layer, folder in enumerate(dirs):
        cfg = json.loads((folder / "cfg.json").read_text())
        weights = load_file(str(folder / "sae_weights.safetensors"))
        meta = cfg.get("metadata", {})
        hooks = (meta.get("hook_name"), meta.get("hook_name_out"))
        want = (f"blocks.{layer}.{FEATURE_INPUT_HOOK}", f"blocks.{layer}.{FEATURE_OUTPUT_HOOK}")
        if hooks != want:
            raise SystemExit(f"{folder}: hooks {hooks}, expected {want}")
        if cfg.get("architecture") != "topk" or not cfg.get("k"):
            raise SystemExit(f"{folder}: expected a TopK transcoder, got {cfg.get('architecture')}")
        if cfg.get("normalize_activations", "none") != "none":
            raise SystemExit(f"{folder}: normalize_activations is not supported")
        W_enc, b_enc = weights["W_enc"].float(), weights["b_enc"].float()  # [d_in, d_sae]
        W_dec, b_dec = weights["W_dec"].float(), weights["b_dec"].float()  # [d_sae, d_out]
        if cfg.get("apply_b_dec_to_input", False):  # circuit-tracer encodes x, not x - b_dec
            b_enc = b_enc - b_dec @ W_enc
        d_model, d_sae = W_enc.shape
        tc = SingleLayerTranscoder(
            d_model, d_sae, ReluTopK(int(cfg["k"])), layer, device=torch.device("cpu"),
            dtype=torch.float32,
        )  # fmt: skip
        tc.load_state_dict(
            {"W_enc": W_enc.T.contiguous(), "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        )
        transcoders[layer] = tc
        files = [folder / "cfg.json", folder / "sae_weights.safetensors"]
        info.append(
            {
                "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else None,
                "d_sae": d_sae,
                "k": int(cfg["k"]),
                "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", False)),
                "random": bool(meta.get("random", False)),
                "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
            }
        )
    tset = TranscoderSet(
        transcoders,
        feature_input_hook=FEATURE_INPUT_HOOK,
        feature_output_hook=FEATURE_OUTPUT_HOOK,
        scan=f"zoo-{MODEL}-transcoders",
    )
    return tset, info


def prompts(tokenizer: Any, n: int) -> tuple[list[str], torch.Tensor, list[str]]:
    """The zoo's held-out IOI prompts (as ``IOITask.batch``), BOS first, and their answers."""
    examples = IOITask().examples(n, "test", seed=0)
    vocab = tokenizer.get_vocab()
    rows = []
    for ex in examples:
        ids = [tokenizer.bos_token_id] + [vocab[w] for w in ex.words]
        check = tokenizer(" ".join(ex.words), add_special_tokens=False).input_ids
        if check != ids[1:]:
            raise SystemExit(f"tokenizer disagrees on {ex.words}: {check} vs {ids[1:]}")
        rows.append(ids)
    return [" ".join(e.words) for e in examples], torch.tensor(rows), [e.answer for e in examples]


def packed(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float32 matrix as its non-zero mask (bits, row-major, most significant bit first) and
    its non-zero values in row-major order: ``adj[unpack(mask)] = values``."""
    mask = (matrix != 0).flatten()
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask, mask.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return {
        "mask_bits": (bits * weights).sum(-1).to(torch.uint8).contiguous(),
        "values": matrix[matrix != 0].to(torch.float32).contiguous(),
        "shape": torch.tensor(matrix.shape, dtype=torch.int64),
    }


def unpacked(mask_bits: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`packed` (what a test reading the fixture does)."""
    rows, cols = (int(n) for n in shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    mask = ((mask_bits[:, None] >> shifts) & 1).flatten()[: rows * cols].bool().view(rows, cols)
    out = torch.zeros(rows, cols, dtype=values.dtype)
    out[mask] = values
    return out


def measured_table(records: list[dict[str, Any]], command: str, header: dict[str, Any]) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {header['machine']}; torch threads: {header['threads']}; "
        f"circuit-tracer {header['versions']['circuit-tracer']}, TransformerLens "
        f"{header['versions']['transformer-lens']}, transformers "
        f"{header['versions']['transformers']}, torch {header['versions']['torch']}  ",
        f"Transcoders: {header['transcoders']}; attribute(max_n_logits="
        f"{header['max_n_logits']}, desired_logit_prob={header['desired_logit_prob']}, "
        f"batch_size={header['batch_size']})",
        "",
        "| prompt | tokens | active features | nodes | non-zero edges | logit nodes (top p) "
        "| replacement | completeness | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(records):
        lines.append(
            f"| {i} `{r['prompt']}` | {r['n_tokens']} | {r['n_features']} | {r['n_nodes']} "
            f"| {r['nonzero_edges']} | {r['n_logits']} ({r['top_probability']:.3f}) "
            f"| {r['replacement_score']:.4f} | {r['completeness_score']:.4f} "
            f"| {r['seconds']:.2f} |"
        )
    secs = [r["seconds"] for r in records]
    lines.append("")
    for i, r in enumerate(records):
        if "independent_max_abs_diff_over_max_abs" in r:
            lines.append(
                f"Independent check, prompt {i}: max |difference| / max |edge| "
                f"{r['independent_max_abs_diff_over_max_abs']:.1e}, same non-zero pattern: "
                f"{r['independent_nonzero_pattern_equal']}; pre-activation not in edges, mean "
                f"|.| {r['feature_preactivation_not_in_edges_mean_abs']:.3f} of mean "
                f"|pre-activation| {r['feature_preactivation_mean_abs']:.3f}.  "
            )
    lines += [
        "",
        f"Seconds per prompt: mean {statistics.mean(secs):.2f}, median "
        f"{statistics.median(secs):.2f}, min {min(secs):.2f}, max {max(secs):.2f} "
        f"(prompt 0 includes the first call's warm-up). Mean replacement score "
        f"{statistics.mean(r['replacement_score'] for r in records):.4f}, mean completeness "
        f"{statistics.mean(r['completeness_score'] for r in records):.4f}.",
    ]
    return "\n".join(lines)


def independent_adjacency(
    model: Any, transcoders: Any, tokens: torch.Tensor, graph: Any, logit_vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjacency recomputed without circuit-tracer's hooks, from the conventions alone.

    ``model`` is a plain ``HookedTransformer`` with the zoo weights (no circuit-tracer hooks).
    The local replacement model, by hand on the same weights: attention patterns and every
    LayerNorm scale replaced by their cached values (constants), each ``hook_mlp_out`` replaced
    by its cached value plus a free variable ``delta[L]``, ``hook_embed`` plus ``delta_emb``. The
    model is then affine in the deltas, so a target's readout (``W_enc[t] . ln2.hook_normalized``
    at its layer and position, or the demeaned unembedding ``. ln_final`` output at the last
    position) has the exact gradient ``g`` in them, and edge = source vector . ``g`` at the source's
    location: ``a_s W_dec[s]`` (features), the error vector (zero at position 0), ``W_E[token]``.
    (TransformerLens fires ``hook_normalized`` before the norm's weight and bias.)

    Returns the adjacency (circuit-tracer's node order) and, per feature node, the part of its
    pre-activation that no edge carries (``b_enc``, biases, positional embeddings, the MLP
    output at position 0).
    """
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    n_pos = tokens.shape[-1]
    tokens = tokens.view(1, n_pos)
    feats = graph.active_features.long()  # (layer, pos, feature)
    acts = graph.activation_values.float()
    n_feat, n_logits = len(feats), len(logit_vectors)
    _, cache = model.run_with_cache(tokens)
    # circuit-tracer's error nodes: real MLP output - reconstruction (activations zeroed at 0)
    errors = torch.zeros(n_layers, n_pos, d_model)
    for layer in range(n_layers):
        tc = transcoders[layer]
        a = tc.encode(cache[f"blocks.{layer}.{FEATURE_INPUT_HOOK}"][0]).detach()
        a[0] = 0
        recon = a @ tc.W_dec + tc.b_dec
        errors[layer] = (cache[f"blocks.{layer}.{FEATURE_OUTPUT_HOOK}"][0] - recon).detach()
    errors[:, 0] = 0

    delta = torch.zeros(n_layers, n_pos, d_model, requires_grad=True)
    delta_emb = torch.zeros(n_pos, d_model, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def frozen(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return cache[hook.name].detach()

    def mlp_out(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return cache[hook.name].detach() + delta[hook.layer()]

    def embed(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return value.detach() + delta_emb

    def record(value: torch.Tensor, hook: Any) -> torch.Tensor:
        seen[hook.name] = value
        return value

    hooks: list[tuple[Any, Any]] = [
        (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), frozen),
        (lambda n: n.endswith(FEATURE_OUTPUT_HOOK), mlp_out),
        ("hook_embed", embed),
        (lambda n: n.endswith(FEATURE_INPUT_HOOK) or n == "ln_final.hook_normalized", record),
    ]
    with model.hooks(fwd_hooks=hooks):
        model(tokens)

    def row(readout: torch.Tensor) -> torch.Tensor:
        g, g_emb = torch.autograd.grad(
            readout, [delta, delta_emb], retain_graph=True, materialize_grads=True
        )
        out = torch.zeros(n_nodes)
        layer, pos, f = feats.T
        dec = torch.stack([transcoders[int(L)].W_dec[int(i)] for L, i in zip(layer, f)])
        out[:n_feat] = acts * (dec * g[layer, pos]).sum(-1)
        out[n_feat : n_feat + n_layers * n_pos] = (errors * g).sum(-1).flatten()
        emb = model.W_E[tokens[0]].detach()
        out[n_feat + n_layers * n_pos : n_feat + (n_layers + 1) * n_pos] = (emb * g_emb).sum(-1)
        return out

    n_nodes = n_feat + (n_layers + 1) * n_pos + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes)
    constants = torch.zeros(n_feat)
    for j, (layer, pos, f) in enumerate(feats.tolist()):
        W_enc = transcoders[layer].W_enc[f]  # circuit-tracer's [d_transcoder, d_model] row
        readout = seen[f"blocks.{layer}.{FEATURE_INPUT_HOOK}"][0, pos] @ W_enc
        adjacency[j] = row(readout)
        pre = float(readout.detach() + transcoders[layer].b_enc[f])
        constants[j] = pre - float(adjacency[j].sum())
    # the unembedding's input, ln_final's output: TransformerLens fires hook_normalized before
    # the norm's weight and bias (x - mean) / scale, circuit-tracer reads ln_final(resid) after
    final = seen["ln_final.hook_normalized"][0, -1] * model.ln_final.w + model.ln_final.b
    for k in range(n_logits):
        adjacency[-n_logits + k] = row(final @ logit_vectors[k])
    return adjacency, constants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--adjacency-prompts", type=int, default=2)
    parser.add_argument(
        "--check-prompts", type=int, default=2, help="recompute without circuit-tracer's hooks"
    )
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--random-transcoders",
        action="store_true",
        help="random TopK transcoders (d_sae 512, k 16) where the shipped ones are missing",
    )
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--no-results", action="store_true", help="do not update the .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    meta = json.loads((ZOO / "weights" / f"{MODEL}.json").read_text())
    tokenizer = build_tokenizer(meta["words"], MODEL)
    n_layers, d_model = meta["config"]["n_layers"], meta["config"]["d_model"]
    dirs = transcoder_dirs(n_layers)
    tmp = tempfile.TemporaryDirectory()
    if not all((d / "cfg.json").exists() for d in dirs):
        if not args.random_transcoders:
            raise SystemExit(
                f"the shipped transcoders {dirs[0].name}, ... are missing; train them "
                "(python -m depass_lens.zoo.dictionary_train ioi) or pass --random-transcoders"
            )
        dirs = write_random_transcoders(Path(tmp.name), n_layers, d_model, 512, 16)
    transcoders, tc_info = load_transcoders(dirs)
    model = zoo_model(tokenizer, transcoders)
    plain = plain_model(tokenizer)

    texts, tokens, answers = prompts(tokenizer, args.prompts)
    with torch.no_grad():
        logits_last = model(tokens)[:, -1].float()
    answer_ids = torch.tensor([tokenizer.get_vocab()[a] for a in answers])
    accuracy = float((logits_last.argmax(-1) == answer_ids).float().mean())

    tensors: dict[str, torch.Tensor] = {
        "tokens": tokens.to(torch.int64),
        "answers": answer_ids,
        "logits_last": logits_last.contiguous(),
    }
    records = []
    for i in range(len(texts)):
        start = time.perf_counter()
        graph = attribute(
            tokens[i],
            model,
            max_n_logits=args.max_n_logits,
            desired_logit_prob=args.desired_logit_prob,
            batch_size=args.batch_size,
        )
        seconds = time.perf_counter() - start
        replacement, completeness = compute_graph_scores(graph)
        adj = graph.adjacency_matrix.float().cpu()
        n_feat = len(graph.selected_features)
        n_pos, n_logits = len(graph.input_tokens), len(graph.logit_targets)
        assert adj.shape[0] == n_feat + (n_layers + 1) * n_pos + n_logits
        # no max_feature_nodes: every active feature is a node, in active_features order
        assert torch.equal(graph.selected_features.cpu(), torch.arange(n_feat))
        assert int(graph.active_features.max()) < 2**15  # stored as int16
        logit_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.int64)
        W_U = model.unembed.W_U.detach()
        demeaned = (W_U[:, logit_ids] - W_U.mean(dim=-1, keepdim=True)).T.contiguous()
        p = f"p{i}."
        tensors.update(
            {
                p + "active_features": graph.active_features.to(torch.int16).contiguous(),
                p + "activation_values": graph.activation_values.float().contiguous(),
                p + "logit_token_ids": logit_ids,
                p + "logit_probabilities": graph.logit_probabilities.float().contiguous(),
                p + "logit_vectors": demeaned.float(),
                p + "logit_rows": adj[-n_logits:].contiguous(),
            }
        )
        check: dict[str, float] = {}
        if i < args.check_prompts:
            again, constants = independent_adjacency(plain, transcoders, tokens[i], graph, demeaned)
            scale = float(adj.abs().max())
            check = {
                "independent_max_abs_diff_over_max_abs": float((again - adj).abs().max()) / scale,
                "independent_nonzero_pattern_equal": bool(torch.equal(again != 0, adj != 0)),
                "feature_preactivation_not_in_edges_mean_abs": float(constants.abs().mean()),
                "feature_preactivation_mean_abs": float(
                    (adj[:n_feat].sum(-1) + constants).abs().mean()
                ),
            }
        if i < args.adjacency_prompts:
            enc = packed(adj)
            assert torch.equal(unpacked(enc["mask_bits"], enc["values"], enc["shape"]), adj)
            tensors.update({p + "adjacency." + k: v for k, v in enc.items()})
        records.append(
            {
                "prompt": texts[i],
                "answer": answers[i],
                "n_tokens": n_pos,
                "n_features": n_feat,
                "n_error_nodes": n_layers * n_pos,
                "n_token_nodes": n_pos,
                "n_logits": n_logits,
                "n_nodes": int(adj.shape[0]),
                "nonzero_edges": int((adj != 0).sum()),
                "logit_targets": [t.token_str for t in graph.logit_targets],
                "top_probability": float(graph.logit_probabilities[0]),
                "replacement_score": replacement,
                "completeness_score": completeness,
                "seconds": seconds,
                "full_adjacency_in_fixture": i < args.adjacency_prompts,
                **check,
            }
        )
        if check:
            print(f"prompt {i}: independent recomputation {check}", flush=True)
        print(
            f"prompt {i}: {adj.shape[0]} nodes, {records[-1]['nonzero_edges']} edges, "
            f"{seconds:.2f}s, replacement {replacement:.4f}, completeness {completeness:.4f}",
            flush=True,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))
    size = args.out.stat().st_size
    if size > MAX_FIXTURE_BYTES:
        raise SystemExit(
            f"{args.out} is {size} bytes (> {MAX_FIXTURE_BYTES}); lower --adjacency-prompts"
        )
    script = Path(sys.argv[0]).resolve()
    script_name = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    command = "python " + shlex.join([script_name, *sys.argv[1:]])
    random = any(t["random"] for t in tc_info)
    header = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.system()}",
        "threads": torch.get_num_threads(),
        "versions": {
            name: version(name)
            for name in ("circuit-tracer", "transformer-lens", "transformers", "torch")
        },
        "transcoders": (
            "RANDOM TopK stand-ins (not the shipped ones)"
            if random
            else "shipped " + ", ".join(f"{Path(t['folder']).name}" for t in tc_info)
        )
        + f" (d_sae {tc_info[0]['d_sae']}, k {tc_info[0]['k']}, ReLU of the top k)",
        "max_n_logits": args.max_n_logits,
        "desired_logit_prob": args.desired_logit_prob,
        "batch_size": args.batch_size,
    }
    doc = {
        "what": "circuit-tracer attribution graphs on the zoo ioi model (issue 18 parity)",
        "command": ".venv-ct/bin/" + command,
        "fixture": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else None,
        "fixture_bytes": size,
        **header,
        "model": {
            "zoo": MODEL,
            "weights_sha256": hashlib.sha256(
                (ZOO / "weights" / f"{MODEL}.safetensors").read_bytes()
            ).hexdigest(),
            "dtype": "float32",
            "accuracy_top1": accuracy,
        },
        "transcoder_files": tc_info,
        "conventions": {
            "backend": "transformerlens (TransformerLensReplacementModel.from_config)",
            "feature_input_hook": f"blocks.L.{FEATURE_INPUT_HOOK}",
            "feature_output_hook": f"blocks.L.{FEATURE_OUTPUT_HOOK}",
            "activation_function": "ReLU of the top k pre-activations (SAELens TopK); "
            "pre-activation = hook_normalized @ W_enc + b_enc (b_dec folded in when the "
            "SAELens config subtracts it)",
            "frozen": "attention patterns (blocks.L.attn.hook_pattern), LayerNorm scales "
            "(ln1, ln2, ln_final .hook_scale), MLP outputs (no gradient through the MLP; "
            "skip = 0)",
            "zero_positions": "slice(0, 1): activations and error vectors at position 0 are "
            "zeroed (position 0 has no feature nodes; its error nodes have no edges)",
            "token_nodes": "hook_embed output W_E[token] per position (positional embeddings "
            "are not nodes)",
            "error_nodes": "hook_mlp_out - (sum_active a_i W_dec[i] + b_dec), per layer and "
            "position, zero at position 0",
            "left_out": "b_enc, every b_dec, attention b_V/b_O (b_Q/b_K act only through the "
            "frozen patterns), ln1.b and ln_final.b, positional embeddings W_pos, b_U, and the "
            "whole MLP output at position 0",
            "hook_normalized": "TransformerLens fires LayerNorm's hook_normalized on (x - mean) "
            "/ scale, before the weight and bias: a feature's readout has no ln2.w; the logit "
            "readout is ln_final's full output, with ln_final.w",
            "logit_nodes": "AttributionTargets._from_salient: top max_n_logits tokens by "
            "softmax probability of the last-position logits, cut after the cumulative "
            "probability first reaches desired_logit_prob; each logit node's injected vector "
            "is W_U[:, t] - W_U.mean(dim=1) (demeaned unembedding) at ln_final(resid) of the "
            "last position (the unembedding's input), ln_final's scale frozen",
            "edge": "A[target, source] = (source output vector) . d(target readout)/d(source "
            "output location) in the frozen model; source output = a_s W_dec[s] at "
            "hook_mlp_out of (layer_s, pos_s) | error vector at (layer, pos) | W_E[token] at "
            "hook_embed (pos); target readout = W_enc[:, t] . hook_normalized(layer_t, pos_t) "
            "(not scaled by a_t) | demeaned unembedding . ln_final(resid_final[last])",
            "max_n_logits": args.max_n_logits,
            "desired_logit_prob": args.desired_logit_prob,
            "batch_size": args.batch_size,
            "max_feature_nodes": None,
        },
        "node_order": [
            "features: graph.active_features rows (layer, pos, feature), sorted by layer, "
            "then pos, then feature (coalesced sparse activation matrix), pos 0 absent",
            "errors: n_features + layer * n_pos + pos",
            "tokens: n_features + n_layers * n_pos + pos",
            "logits: the last n_logits nodes, in logit_token_ids order (descending probability)",
        ],
        "adjacency": "rows are targets, columns sources; only feature and logit rows are "
        "non-zero; the full matrix for prompts "
        f"0..{args.adjacency_prompts - 1} as p{{i}}.adjacency.mask_bits (uint8: the non-zero "
        "mask, row-major, most significant bit first), p{i}.adjacency.values (float32: the "
        "non-zero entries in row-major order) and p{i}.adjacency.shape; the logit rows "
        "(p{i}.logit_rows, dense) for all",
        "prompts": records,
    }
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({size} bytes) and {args.out.with_suffix('.json').name}")
    if not args.no_results:
        table = measured_table(records, doc["command"], header)
        text = RESULTS.read_text() if RESULTS.exists() else f"{MARK_START}\n{MARK_END}\n"
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        RESULTS.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")
        print(f"updated {RESULTS.relative_to(ROOT)}")
    tmp.cleanup()


if __name__ == "__main__":
    main()

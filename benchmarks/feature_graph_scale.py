"""Feature graphs at GPT-2-small scale: DePass against circuit-tracer on the same weights.

A random model of GPT-2 small's shape (12 layers, d_model 768, 12 heads, d_mlp 3072, 50257
tokens, LayerNorm, gelu_new; TransformerLens's random initialisation, seed 0) with 12 random
per-layer TopK transcoders (24,576 latents, k = 32, ``blocks.L.ln2.hook_normalized ->
blocks.L.hook_mlp_out``) on one prompt of 128 random tokens (BOS first)::

    python -m benchmarks.feature_graph_scale                       # about 25 minutes, 2 CPU cores
    python -m benchmarks.feature_graph_scale --max-feature-nodes 1024
    python -m benchmarks.feature_graph_scale --smoke               # tiny shapes, seconds

The model's weights (safetensors + its ``HookedTransformerConfig`` fields), the transcoders (in
circuit-tracer's own format: ``depass_lens.sae.circuit_tracer_io.save_circuit_tracer_transcoders``)
and the tokens are written once to a temporary folder; each side then runs in a fresh subprocess
that reads them, so that its peak resident memory (``VmHWM``) is its own:

* DePass (this environment): ``DePass.feature_graph(tokens, "top_logits", attention="value",
  zero_first_position=True, max_feature_nodes=M)`` (circuit-tracer's conventions), and the same
  with ``attention="symmetric", edge_kinds=False`` (query and key edges as well);
* circuit-tracer 0.5.0 (``.venv-ct``, see ``scripts/circuit_tracer_fixture.py``):
  ``attribute(tokens, ReplacementModel.from_config(...), max_feature_nodes=M)`` with the same
  transcoders built directly as its ``SingleLayerTranscoder`` with its own ``TopK(k)`` activation.
  Without ``.venv-ct`` its column says "not installed".

Both sides use circuit-tracer's TopK (the k largest pre-activations, not ReLU'd: the transcoders
are written with ``activation_function: topk``); ``W_enc`` is scaled so that the pre-activations
are about standard normal, whose 32 largest of 24,576 are all positive, so the active latents are
the same under either TopK. ``W_dec`` rows are random unit vectors over ``sqrt(k)``. The report
checks that both sides find the same active latents and the same top logit, and compares the
graphs' logit rows on the nodes both have (circuit-tracer's selected features, errors except
position 0's, tokens): ``max |diff| / max |edge|``; likewise the rows of latents both chose as
receivers. Batch sizes (receivers per backward pass, i.e. copies of the prompt in the forward)
are tuned per side: each of ``--depass-batch`` and ``--ct-batch`` (default 16 and 32, the best of
16/32/64 at 128 feature nodes on this machine for both) is run, and each side reports its fastest.
Every run is one fresh process timing one graph call after a warm-up call on 16 tokens; the runs
go in ``--repeat`` interleaved rounds (default 2; the symmetric graph once), so that both sides
meet the same load on a shared machine. Seconds are the graph call alone (loading excluded), with
its CPU seconds (user + system); peak memory is the whole process's (model and transcoders
included), also shown above what was resident after loading. ``--threads`` (default 1) sets torch's
threads per side: on 2 cores shared with other work, 2 threads ran 5x slower than 1.
``--profile`` writes a cProfile of DePass's runs to ``<out>_profile.txt`` (top functions by
cumulative and by own time).

Results: ``benchmarks/results/feature_graph_scale.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.replacement_weights import load_hooked_weights

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CT_PYTHON = ROOT / ".venv-ct" / "bin" / "python"
D_SAE, K = 24576, 32
HOOK_IN, HOOK_OUT = "ln2.hook_normalized", "hook_mlp_out"
BOS = 1  # the word-level tokenizer's <bos> (circuit-tracer keeps a special first token as is)
SIDES = ("depass-value", "depass-symmetric", "circuit-tracer")
WARMUP_POS = 16


def peak_rss() -> int:
    """``VmHWM`` of this process in bytes (as ``depass_lens.memory.proc_bytes`` reads it; kept
    local so that the circuit-tracer side imports nothing of depass_lens)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ the fixture


def write_fixture(folder: Path, config: dict, d_sae: int, k: int, n_pos: int) -> None:
    """The random model, transcoders and tokens, in formats both environments read."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from depass_lens.sae.circuit_tracer_io import (
        CircuitTracerTranscoder,
        save_circuit_tracer_transcoders,
    )

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**config, dtype=torch.float32))
    # parameters only: buffers (masks, rotary tables) differ between TransformerLens versions
    state = {n: t.detach().contiguous() for n, t in model.named_parameters()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    del model, state
    gen = torch.Generator().manual_seed(1)
    d_model = config["d_model"]
    transcoders = []
    for layer in range(config["n_layers"]):
        tc = CircuitTracerTranscoder(d_model, d_sae, layer, HOOK_IN, HOOK_OUT, "topk", k=k)
        with torch.no_grad():
            # ln2.hook_normalized has unit variance per component: pre-activations ~ N(0, 1),
            # whose k largest of d_sae are all well above 0
            tc.W_enc.copy_(torch.randn(d_model, d_sae, generator=gen) / d_model**0.5)
            dec = torch.randn(d_sae, d_model, generator=gen)
            tc.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True) / k**0.5)
            tc.b_dec.copy_(0.01 * torch.randn(d_model, generator=gen))
        transcoders.append(tc)
    save_circuit_tracer_transcoders(transcoders, folder / "transcoders", scan="random-gpt2-topk")
    del transcoders
    vocab = torch.randint(
        3, config["d_vocab"], (1, n_pos), generator=torch.Generator().manual_seed(2)
    )
    vocab[0, 0] = BOS
    save_file({"tokens": vocab}, str(folder / "tokens.safetensors"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def tokenizer_for(d_vocab: int):
    """A word-level tokenizer of ``d_vocab`` ids (``<pad>``, ``<bos>``, ``<unk>``, ``w3``...):
    circuit-tracer decodes the prompt and names its logit nodes with one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, d_vocab)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path="random-gpt2-words",
        add_bos_token=True,  # TransformerLens then uses it as is (no hub round-trip)
    )


# ------------------------------------------------------------------------------------ sides


def depass_side(
    folder: Path, side: str, name: str, max_nodes: int, batch: int, profile: bool
) -> dict:
    """DePass's feature graph in this process (``.venv``)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import depass_lens as dp
    from depass_lens.sae.circuit_tracer_io import load_circuit_tracer_transcoders

    start = time.perf_counter()
    config = read_config(folder)
    model = HookedTransformer(HookedTransformerConfig(**config, dtype=torch.float32))
    missing, unexpected = model.load_state_dict(
        load_file(str(folder / "model.safetensors")), strict=False
    )
    if unexpected or {n for n, _ in model.named_parameters()} & set(missing):
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    transcoders = load_circuit_tracer_transcoders(folder / "transcoders")
    tokens = load_file(str(folder / "tokens.safetensors"))["tokens"]
    loaded, load_seconds = rss(), time.perf_counter() - start
    attention = "value" if side == "depass-value" else "symmetric"
    depass = dp.DePass(model, attention=attention, progress=False)

    def call(tokens: torch.Tensor, budget: int):
        return depass.feature_graph(
            tokens,
            "top_logits",
            dictionaries=transcoders,
            edge_kinds=False,
            zero_first_position=True,
            batch_size=batch,
            max_feature_nodes=budget,
        )

    profile_to = folder / f"{name}.profile.txt" if profile else None
    graph, timing = timed(call, tokens[:, :WARMUP_POS], tokens, max_nodes, batch, profile_to)
    names = [n.name for n in graph.nodes]
    kinds = [n.kind for n in graph.nodes]
    receivers = graph.receivers.tolist()
    latent_receivers = [r for r in receivers if kinds[r] == "latent"]
    targets = [r for r in receivers if kinds[r] == "target"]
    edges = graph.edges.float().cpu()
    # the nodes a circuit-tracer-style graph has: the receiving latents, errors, embeddings,
    # constants and targets (latents without incoming edges are dropped as columns)
    keep = torch.tensor(
        [kinds[j] != "latent" or j in set(latent_receivers) for j in range(len(names))]
    )
    save_file(
        {"edges": edges.contiguous(), "receivers": graph.receivers.cpu()},
        str(folder / f"{name}.safetensors"),
    )
    (folder / f"{name}.names.json").write_text(json.dumps({"names": names, "kinds": kinds}))
    return {
        "side": side,
        "attention": attention,
        "batch_size": graph.settings["batch_size"],
        "max_feature_nodes": max_nodes,
        **timing,
        "load_seconds": load_seconds,
        "loaded_rss_bytes": loaded,
        "active_latents": kinds.count("latent"),
        "latent_receivers": len(latent_receivers),
        "n_targets": len(targets),
        "nodes": len(names),
        "nodes_selected": int(keep.sum()),
        "nonzero_edges": int((edges != 0).sum()),
        "nonzero_edges_selected": int((edges[:, keep] != 0).sum()),
        "edges_shape": list(edges.shape),
        "edges_bytes": edges.numel() * edges.element_size(),
        "target_tokens": graph.settings["target_tokens"],
        "target_probabilities": graph.settings["target_probabilities"],
    }


def circuit_tracer_side(folder: Path, name: str, max_nodes: int, batch: int) -> dict:
    """circuit-tracer 0.5.0's ``attribute()`` in this process (``.venv-ct``)."""
    import yaml
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import TopK

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    start = time.perf_counter()
    config = read_config(folder)
    tc_config = yaml.safe_load((folder / "transcoders" / "config.yaml").read_text())
    if tc_config.get("activation_function") != "topk":  # circuit-tracer's TopK, on both sides
        raise SystemExit(f"expected TopK transcoders, got {tc_config}")
    k = int(tc_config["k"])
    transcoders = {}
    for layer in range(config["n_layers"]):
        weights = load_file(str(folder / "transcoders" / f"layer_{layer}.safetensors"))
        d_sae, d_model = weights["W_enc"].shape  # circuit-tracer's [d_transcoder, d_model]
        tc = SingleLayerTranscoder(
            d_model, d_sae, TopK(k), layer, device=torch.device("cpu"), dtype=torch.float32
        )
        tc.load_state_dict({n: weights[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec")})
        transcoders[layer] = tc
    tset = TranscoderSet(
        transcoders, feature_input_hook=HOOK_IN, feature_output_hook=HOOK_OUT, scan="random"
    )
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(**config, device="cpu", dtype=torch.float32)
    model = ReplacementModel.from_config(
        cfg, tset, backend="transformerlens", tokenizer=tokenizer_for(config["d_vocab"])
    )
    missing, unexpected = load_hooked_weights(model, load_file(str(folder / "model.safetensors")))
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    tokens = load_file(str(folder / "tokens.safetensors"))["tokens"][0]
    loaded, load_seconds = rss(), time.perf_counter() - start

    def call(tokens: torch.Tensor, budget: int):
        return attribute(tokens, model, batch_size=batch, max_feature_nodes=budget)

    graph, timing = timed(call, tokens[:WARMUP_POS], tokens, max_nodes, batch)
    adj = graph.adjacency_matrix.float().cpu()
    feats = graph.active_features.long()  # (layer, pos, feature)
    selected = graph.selected_features.long()
    n_layers, n_pos = config["n_layers"], len(tokens)
    nodes = [f"L{L}.mlp[{f}]@{p}" for L, p, f in feats[selected].tolist()]
    nodes += [f"L{L}.mlp.error@{p}" for L in range(n_layers) for p in range(n_pos)]
    nodes += [f"token@{p}" for p in range(n_pos)]
    logit_ids = [t.vocab_idx for t in graph.logit_targets]
    nodes += [f"logit {t}" for t in logit_ids]
    save_file({"adjacency": adj.contiguous()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.names.json").write_text(json.dumps(nodes))
    return {
        "side": "circuit-tracer",
        "attention": "value (frozen)",
        "batch_size": batch,
        "max_feature_nodes": max_nodes,
        **timing,
        "load_seconds": load_seconds,
        "loaded_rss_bytes": loaded,
        "active_latents": len(feats),
        "latent_receivers": len(selected),
        "n_targets": len(logit_ids),
        "nodes": int(adj.shape[0]),
        "nodes_selected": int(adj.shape[0]),
        "nonzero_edges": int((adj != 0).sum()),
        "nonzero_edges_selected": int((adj != 0).sum()),
        "edges_shape": list(adj.shape),
        "edges_bytes": adj.numel() * adj.element_size(),
        "target_tokens": logit_ids,
        "target_probabilities": graph.logit_probabilities.float().tolist(),
        "versions": _versions(),
    }


def _versions() -> dict:
    from importlib.metadata import version

    names = ("circuit-tracer", "transformer-lens", "transformers", "torch")
    return {name: version(name) for name in names}


def model_config(smoke: bool) -> dict:
    """GPT-2 small's shape as the ratio matrix builds it (``benchmarks.cases``; random weights,
    seed 0), or a tiny one for ``--smoke``. Imported here, not at the top: the circuit-tracer
    side imports nothing of depass_lens."""
    from benchmarks.cases import CONFIGS

    config = dict(CONFIGS["gpt2"], seed=0)
    if smoke:
        config.update(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=500)
    return config


def timed(
    call: Callable[[torch.Tensor, int], Any],
    warm_up: torch.Tensor,
    tokens: torch.Tensor,
    max_nodes: int,
    batch: int,
    profile_to: Path | None = None,
) -> tuple[Any, dict]:
    """One call on ``warm_up`` (a short prompt: one-time setup is not the graph's cost), then the
    timed call on ``tokens``: its graph, and its seconds, CPU seconds, the process's peak memory
    and torch's threads (``profile_to``: a cProfile of the timed call written there)."""
    call(warm_up, min(max_nodes, batch))
    profiler = None
    if profile_to is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    graph = call(tokens, max_nodes)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler is not None and profile_to is not None:
        profiler.disable()
        write_profile(profiler, profile_to)
    return graph, {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_bytes": peak_rss(),
        "threads": torch.get_num_threads(),
    }


def write_profile(profiler, path: Path, top: int = 30) -> None:
    import io
    import pstats

    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(key).print_stats(top)
    path.write_text(out.getvalue())


# ------------------------------------------------------------------------------- comparison


def agreement(folder: Path, ours: str, theirs_tag: str) -> dict:
    """DePass's rows against circuit-tracer's on the nodes both have: the logit rows (by token
    id) and the rows of latents both chose, over circuit-tracer's columns (its selected latents,
    errors except position 0's, tokens)."""
    theirs_names = json.loads((folder / f"{theirs_tag}.names.json").read_text())
    theirs = load_file(str(folder / f"{theirs_tag}.safetensors"))["adjacency"]
    saved = json.loads((folder / f"{ours}.names.json").read_text())
    names, kinds = saved["names"], saved["kinds"]
    data = load_file(str(folder / f"{ours}.safetensors"))
    edges, receivers = data["edges"], data["receivers"].tolist()
    index = {n: j for j, n in enumerate(names)}
    row_of = {names[r]: i for i, r in enumerate(receivers)}
    cols = [
        j
        for j, n in enumerate(theirs_names)
        if not n.startswith("logit ") and not n.endswith("error@0")
    ]
    ours_cols = torch.tensor([index[theirs_names[j]] for j in cols])
    result: dict = {}
    # logit rows: DePass names its targets by the token; match by circuit-tracer's token ids
    target_rows = [i for i, r in enumerate(receivers) if kinds[r] == "target"]  # in order
    ids = json.loads((folder / f"{ours}.json").read_text())["target_tokens"]
    theirs_logits = {
        int(n.split()[1]): j for j, n in enumerate(theirs_names) if n.startswith("logit ")
    }
    pairs = [(target_rows[k], theirs_logits[t]) for k, t in enumerate(ids) if t in theirs_logits]
    if pairs:
        a = torch.stack([edges[i, ours_cols] for i, _ in pairs])
        b = torch.stack([theirs[j, cols] for _, j in pairs])
        scale = float(b.abs().max())
        result["logit_rows"] = len(pairs)
        result["logit_rows_max_abs_diff_over_max_abs"] = float((a - b).abs().max()) / scale
    common = [(row_of[n], j) for j, n in enumerate(theirs_names) if "[" in n and n in row_of]
    result["common_latent_receivers"] = len(common)
    if common:
        a = torch.stack([edges[i, ours_cols] for i, _ in common])
        b = torch.stack([theirs[j, cols] for _, j in common])
        scale = float(b.abs().max())
        result["latent_rows_max_abs_diff_over_max_abs"] = float((a - b).abs().max()) / scale
    return result


# ----------------------------------------------------------------------------------- driver


def spawn(python: Path | str, argv: list[str], timeout: float) -> dict:
    cmd = [str(python), "-m", "benchmarks.feature_graph_scale", *argv]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": (out.stderr.strip() or f"exit {out.returncode}")[-1500:]}


def circuit_tracer_available(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import circuit_tracer"], capture_output=True, check=False
    )
    return probe.returncode == 0


def full_graph_needs(config: dict, n_pos: int, k: int, n_logits: int) -> dict:
    """What every active latent as a receiver would need (position 0 has none)."""
    n_layers = config["n_layers"]
    active = n_layers * (n_pos - 1) * k
    ct_nodes = active + (n_layers + 1) * n_pos + n_logits
    # DePass: receivers x nodes (+ position embeddings, b_dec and bias constants as columns)
    return {
        "active_latents": active,
        "circuit_tracer_nodes": ct_nodes,
        "circuit_tracer_dense_adjacency_bytes": ct_nodes**2 * 4,
        "depass_rows": active + n_logits,
        "depass_columns_about": active + (n_layers + 2) * n_pos,
        "depass_dense_edges_bytes_about": (active + n_logits)
        * (active + (n_layers + 2) * n_pos)
        * 4,
    }


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(doc: dict) -> str:
    sides = doc["sides"]
    head = [
        f"Command: `{doc['command']}`  ",
        f"{doc['machine']} Each side: torch threads {doc['threads'] or 'default'}.  ",
        f"Model: random GPT-2-small shape ({doc['model']}); transcoders: {doc['transcoders']}; "
        f"{doc['n_pos']} tokens; max_feature_nodes = {doc['max_feature_nodes']}.",
        "",
        "| | DePass value (circuit-tracer's conventions) | DePass symmetric, no kinds "
        "| circuit-tracer 0.5.0 |",
        "|---|---|---|---|",
    ]

    def cell(side: str, fn) -> str:
        r = sides.get(side)
        if r is None:
            return "not run"
        if "error" in r:
            return "not installed" if r["error"] == "not installed" else "error"
        return fn(r)

    rows = [
        ("seconds (graph call, fastest batch size)", lambda r: f"{r['seconds']:.2f}"),
        ("CPU seconds of that call", lambda r: f"{r['cpu_seconds']:.2f}"),
        ("batch size (receivers per backward)", lambda r: str(r["batch_size"])),
        ("peak RSS (process)", lambda r: fmt_bytes(r["peak_rss_bytes"])),
        (
            "peak RSS above loaded model + transcoders",
            lambda r: fmt_bytes(r["peak_rss_bytes"] - r["loaded_rss_bytes"]),
        ),
        ("active latents", lambda r: f"{r['active_latents']:,}"),
        ("latents with incoming edges", lambda r: f"{r['latent_receivers']:,}"),
        ("logit targets", lambda r: str(r["n_targets"])),
        ("top logit (token id)", lambda r: str(r["target_tokens"][0])),
        ("nodes (all)", lambda r: f"{r['nodes']:,}"),
        ("nodes (receiving latents + the rest)", lambda r: f"{r['nodes_selected']:,}"),
        ("non-zero edges (all columns)", lambda r: f"{r['nonzero_edges']:,}"),
        ("non-zero edges (among those nodes)", lambda r: f"{r['nonzero_edges_selected']:,}"),
        ("edge matrix", lambda r: f"{r['edges_shape'][0]:,} x {r['edges_shape'][1]:,}"),
    ]
    names = ("depass-value", "depass-symmetric", "circuit-tracer")
    lines = head + [
        f"| {label} | " + " | ".join(cell(s, fn) for s in names) + " |" for label, fn in rows
    ]
    lines.append("")
    for key, label in (("agreement", "value"), ("agreement_symmetric", "symmetric")):
        agree = doc.get(key)
        if not agree:
            continue
        parts = []
        if "logit_rows_max_abs_diff_over_max_abs" in agree:
            parts.append(
                f"logit rows ({agree['logit_rows']}): max |diff| / max |edge| "
                f"{agree['logit_rows_max_abs_diff_over_max_abs']:.1e}"
            )
        if "latent_rows_max_abs_diff_over_max_abs" in agree:
            parts.append(
                f"rows of the {agree['common_latent_receivers']} latents both chose: "
                f"{agree['latent_rows_max_abs_diff_over_max_abs']:.1e}"
            )
        lines.append(f"Agreement with circuit-tracer, DePass {label}: " + "; ".join(parts) + ".  ")
    checks = doc.get("checks")
    if checks:
        lines.append(
            f"Same active latents: {checks['same_active_latents']}; same top logit: "
            f"{checks['same_top_logit']}; same logit targets: {checks['same_logit_targets']}.  "
        )
    ct, dv = sides.get("circuit-tracer", {}), sides.get("depass-value", {})
    if "seconds" in ct and "seconds" in dv:
        lines.append(
            f"DePass value / circuit-tracer: {dv['seconds'] / ct['seconds']:.2f}x the seconds "
            f"({dv['cpu_seconds'] / ct['cpu_seconds']:.2f}x the CPU seconds), "
            f"{dv['peak_rss_bytes'] / ct['peak_rss_bytes']:.2f}x the peak RSS.  "
        )
    lines += [
        "",
        "Every run (one fresh process each):",
        "",
        "| side | batch size | round | seconds | CPU seconds | peak RSS | above loaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        if "seconds" not in r:
            note = "not installed" if r.get("error") == "not installed" else "error"
            lines.append(f"| {r['side']} | {r.get('batch_size', '')} | | {note} | | | |")
            continue
        lines.append(
            f"| {r['side']} | {r['batch_size']} | {r['repeat'] + 1} | {r['seconds']:.2f} "
            f"| {r['cpu_seconds']:.2f} "
            f"| {fmt_bytes(r['peak_rss_bytes'])} "
            f"| {fmt_bytes(r['peak_rss_bytes'] - r['loaded_rss_bytes'])} |"
        )
    full = doc["full_graph"]
    lines += [
        "",
        f"The full graph (every active latent a receiver): {full['active_latents']:,} active "
        f"latents; circuit-tracer's dense adjacency {full['circuit_tracer_nodes']:,}^2 float32 = "
        f"{fmt_bytes(full['circuit_tracer_dense_adjacency_bytes'])}; DePass's edge matrix about "
        f"{full['depass_rows']:,} x {full['depass_columns_about']:,} float32 = "
        f"{fmt_bytes(full['depass_dense_edges_bytes_about'])} (value; the same again per extra "
        "edge kind with edge_kinds=True).",
    ]
    for r in doc["runs"]:
        if "error" in r and r["error"] != "not installed":
            lines += [
                "",
                f"{r['side']} (batch {r.get('batch_size')}) failed: `{r['error'][-400:]}`",
            ]
    return "\n".join(lines) + "\n"


def tag(side: str, batch: int) -> str:
    """The file stem of one run's outputs in the work folder."""
    return f"{side}-b{batch}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=(*SIDES, "write"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help="reuse (or keep) the written model here")
    parser.add_argument("--n-pos", type=int, default=128)
    parser.add_argument("--max-feature-nodes", type=int, default=512)
    parser.add_argument(
        "--depass-batch", type=int, nargs="+", default=[16, 32], help="DePass value's batch sizes"
    )
    parser.add_argument("--ct-batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--symmetric-batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (0: torch's default)"
    )
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds of runs (the fastest per side is reported)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile DePass's runs (to <out>_profile.txt)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model and transcoders")
    parser.add_argument(
        "--ct-python", type=Path, default=CT_PYTHON, help="circuit-tracer's environment's python"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "feature_graph_scale.md")
    args = parser.parse_args()
    config = model_config(args.smoke)
    d_sae, k = (512, 8) if args.smoke else (D_SAE, K)
    if args.worker == "write":
        write_fixture(args.folder, config, d_sae, k, args.n_pos)
        print(json.dumps({"written": str(args.folder)}))
        return
    if args.worker:
        warnings.filterwarnings("ignore")
        if args.threads:
            torch.set_num_threads(args.threads)
        name = tag(args.worker, args.batch)
        if args.worker == "circuit-tracer":
            row = circuit_tracer_side(args.folder, name, args.max_feature_nodes, args.batch)
        else:
            row = depass_side(
                args.folder, args.worker, name, args.max_feature_nodes, args.batch, args.profile
            )
        (args.folder / f"{name}.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
        return

    from benchmarks.run import machine

    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="feature_graph_scale_")
        folder = Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--folder", str(folder), "--n-pos", str(args.n_pos), "--threads", str(args.threads)]
    common += ["--smoke"] if args.smoke else []
    if not (folder / "tokens.safetensors").exists():
        written = spawn(sys.executable, ["--worker", "write", *common], args.timeout)
        if "error" in written:
            raise SystemExit(f"writing the model failed: {written['error']}")
    common += ["--max-feature-nodes", str(args.max_feature_nodes)]
    batches = {
        "depass-value": args.depass_batch,
        "depass-symmetric": [args.symmetric_batch],
        "circuit-tracer": args.ct_batch,
    }
    has_ct = circuit_tracer_available(args.ct_python)
    runs: list[dict] = []
    if "circuit-tracer" in args.sides and not has_ct:
        runs.append({"side": "circuit-tracer", "error": "not installed"})
    for repeat in range(args.repeat):  # interleaved, so that both sides see the same load
        for side in args.sides:
            if side == "circuit-tracer" and not has_ct:
                continue
            if side == "depass-symmetric" and repeat:
                continue  # once: it has no counterpart to share the machine's load with
            for batch in batches[side]:
                argv = ["--worker", side, *common, "--batch", str(batch)]
                if side == "circuit-tracer":
                    row = spawn(args.ct_python, argv, args.timeout)
                else:
                    row = spawn(sys.executable, argv + (["--profile"] * args.profile), args.timeout)
                row = {"side": side, "batch_size": batch, "repeat": repeat, **row}
                print(json.dumps(row)[:300], flush=True)
                runs.append(row)
    best: dict[str, dict] = {}  # per side, the fastest of its batch sizes
    for row in runs:
        side = row["side"]
        if side not in best or (
            "seconds" in row and row["seconds"] < best[side].get("seconds", 1e30)
        ):
            best[side] = row
    doc: dict = {
        "command": "python " + shlex.join(["-m", "benchmarks.feature_graph_scale", *sys.argv[1:]]),
        "machine": machine(),
        "model": ", ".join(f"{k} {v}" for k, v in config.items() if k not in ("seed", "n_ctx")),
        "transcoders": f"{config['n_layers']} random TopK (circuit-tracer's TopK), d_sae {d_sae}, "
        f"k {k}, {HOOK_IN} -> {HOOK_OUT}",
        "n_pos": args.n_pos,
        "max_feature_nodes": args.max_feature_nodes,
        "threads": args.threads,
        "sides": best,
        "runs": runs,
        "full_graph": full_graph_needs(config, args.n_pos, k, 10),
    }
    ct = best.get("circuit-tracer", {})
    if "seconds" in ct:
        theirs = tag("circuit-tracer", ct["batch_size"])
        for side, key in (
            ("depass-value", "agreement"),
            ("depass-symmetric", "agreement_symmetric"),
        ):
            if "seconds" in best.get(side, {}):
                doc[key] = agreement(folder, tag(side, best[side]["batch_size"]), theirs)
        dv = best.get("depass-value", {})
        if "seconds" in dv:
            doc["checks"] = {
                "same_active_latents": dv["active_latents"] == ct["active_latents"],
                "same_top_logit": dv["target_tokens"][0] == ct["target_tokens"][0],
                "same_logit_targets": dv["target_tokens"] == ct["target_tokens"],
            }
    if args.profile:
        texts = [
            f"## {path.stem}\n\n{path.read_text()}" for path in sorted(folder.glob("*.profile.txt"))
        ]
        args.out.with_name(args.out.stem + "_profile.txt").write_text("\n".join(texts))
    table = markdown(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Feature graphs at GPT-2-small scale: DePass and circuit-tracer (issue 18)\n\n" + table
    )
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(table)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

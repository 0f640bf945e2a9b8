"""Benchmark cases: each builds a random-weight model and times one method on one prompt length.

Run one case (what ``benchmarks/run.py`` does, in a fresh subprocess so that peak memory belongs to
that case alone)::

    python -m benchmarks.cases --config gpt2 --case adjoint_all --n-pos 128 [--device cuda]

It prints one JSON line: median seconds over the repeats, the peak resident memory above the loaded
model, and, for cases that sample a subset of an exhaustive method, the extrapolation factor.

The ``zoo-ioi`` config is the zoo's trained ``ioi`` model with its shipped transcoders on the zoo's
15-token example prompt (``zoo.example("ioi")``): the feature-graph cases (``feature_*``) and
their ``forward``. Its seconds are the fastest of the repeats (one call takes milliseconds, where
the median picks up the scheduling noise of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import depass_lens as dp
from depass_lens.adapters.base import TLModel
from depass_lens.adapters.loading import random_model
from depass_lens.memory import proc_bytes

warnings.filterwarnings("ignore")

CONFIGS = {
    # GPT-2 small's shape: 12 layers, d_model 768, 12 heads, d_mlp 3072, 50257 tokens.
    "gpt2": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
    ),
    # A LLaMA-style model of similar width: RMSNorm, rotary, GQA, gated SiLU MLP.
    "llama": dict(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=2048,
        d_vocab=32000,
        n_ctx=1024,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=64,
        gated_mlp=True,
        n_key_value_heads=4,
        final_rms=True,
    ),
}

#: Neurons per reference-style forward-DePass pass (the reference propagates groups of neurons).
REFERENCE_GROUP = 64
#: Edges timed for per-edge patching (one patched forward each), extrapolated to all edges.
PATCHED_EDGES = 6
#: The layer whose neurons cases (d) attribute.
NEURON_LAYER = 6


#: Trained zoo models (``depass_lens.zoo.load``), timed on the zoo's example prompt, fastest repeat.
ZOO_CONFIGS = {"zoo-ioi": "ioi"}


def build(config: str, device: str = "cpu") -> TLModel:
    """The random model for ``config``: a HookedTransformer under TransformerLens 3, a
    TransformerBridge (boot_native) under TransformerLens 4; or the zoo model of a ``zoo-``
    config."""
    if config in ZOO_CONFIGS:
        from depass_lens import zoo  # noqa: PLC0415

        return zoo.load(ZOO_CONFIGS[config], device=device)
    torch.manual_seed(0)
    return random_model({**CONFIGS[config], "seed": 0}, device)


def zoo_prompt(model: TLModel, name: str) -> dict:
    """The zoo's example prompt of task ``name`` (``zoo.example(name)``) as token ids, with its
    answer, wrong answer and corrupted prompt (same length)."""
    from depass_lens import zoo  # noqa: PLC0415

    batch = zoo.task(name).batch(model, n=1, split="test", seed=2024)  # as zoo.example
    assert batch.wrong is not None and batch.corrupted is not None
    assert batch.prompts[0] == zoo.example(name)[0]
    device = model.W_E.device
    return {
        "tokens": batch.tokens.to(device),
        "answer": int(batch.answers[0]),
        "wrong": int(batch.wrong[0]),
        "corrupted": batch.corrupted.to(device),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Start the resident-set peak afresh from now (Linux; elsewhere the peak is since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The resident-set peak since :func:`reset_peak_rss` (``VmHWM``), else since start."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def zero_hook(index: int, axis: int) -> Callable:
    def hook(value: torch.Tensor, hook) -> torch.Tensor:
        value = value.clone()
        value.select(axis, index).zero_()
        return value

    return hook


def make_case(name: str, model: TLModel, tokens: torch.Tensor):
    """Return ``(fn, scale)``: ``fn`` runs the case once; ``scale`` extrapolates a sample."""
    answer, wrong = 1234, 4321
    depass = dp.DePass(model, progress=False, attention="value")  # the published split
    target = dp.Logit(answer)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    d_mlp = model.cfg.d_mlp

    if name == "forward":  # one plain run_with_cache
        return (lambda: model.run_with_cache(tokens)), 1.0
    if name == "adjoint_all":  # every token, head and neuron to one logit
        sources = [dp.Tokens(), dp.Heads(), dp.Neurons()]
        return (lambda: depass.attribute(tokens, target, sources, mode="adjoint")), 1.0
    if name == "adjoint_all_qk":  # the same with the QK-aware (symmetric) attention split
        sources = [dp.Tokens(), dp.Heads(), dp.Neurons()]
        qk = dp.DePass(model, attention="symmetric", progress=False)
        return (lambda: qk.attribute(tokens, target, sources, mode="adjoint")), 1.0
    if name == "atp":  # attribution patching: clean fwd, corrupted fwd, one backward
        corrupted = torch.roll(tokens, 1, dims=1)

        def atp():
            names = lambda n: n.endswith(("hook_z", "mlp.hook_post", "hook_embed"))  # noqa: E731
            with torch.no_grad():
                _, corrupt_cache = model.run_with_cache(corrupted, names_filter=names)
            acts = {}

            def keep(value, hook):
                acts[hook.name] = value
                return value  # the tensor that flows on (a Bridge hook sees a fresh view)

            hooks = [
                (n, keep) for n in model.hook_dict if names(n) and model.hook_dict[n].name == n
            ]
            with model.hooks(fwd_hooks=hooks):
                logits = model(tokens)
            metric = logits[:, -1, answer] - logits[:, -1, wrong]
            grads = torch.autograd.grad(metric.sum(), list(acts.values()))
            return [
                ((corrupt_cache[n] - a.detach()) * g).sum()
                for (n, a), g in zip(acts.items(), grads)
            ]

        return atp, 1.0
    if name in ("graph_all", "graph_value", "graph_contrast", "eap", "edge_patching"):
        return _graph_case(name, model, tokens, depass, answer, wrong)
    if name.startswith("feature_"):
        return _feature_case(name, model)
    if name == "forward_mode_tokens":  # forward mode with n = n_pos + 1 components
        return (lambda: depass.attribute(tokens, target, dp.Tokens(), mode="forward")), 1.0
    if name == "forward_mode_tokens_qk":  # the same with the QK-aware (symmetric) split
        qk = dp.DePass(model, attention="symmetric", progress=False)
        return (lambda: qk.attribute(tokens, target, dp.Tokens(), mode="forward")), 1.0
    if name == "plain_forwards_n":  # n plain forwards, batched 16 at a time
        n = tokens.shape[1] + 1

        def plain():
            with torch.no_grad():
                for start in range(0, n, 16):
                    model(tokens.expand(min(16, n - start), -1))

        return plain, 1.0
    if name == "adjoint_heads":
        return (lambda: depass.attribute(tokens, target, dp.Heads(), mode="adjoint")), 1.0
    if name == "adjoint_heads_sae":  # all heads + every active latent of a 16k-latent SAE
        from benchmarks.sae_cost import random_topk_sae  # noqa: PLC0415

        sae = random_topk_sae(model.cfg.d_model, 16384, 64, device=str(tokens.device))
        both = [dp.Heads(), dp.SAELatents(sae)]
        return (lambda: depass.attribute(tokens, target, both, mode="adjoint")), 1.0
    if name == "head_ablation":  # exact zero-ablation of each head, one forward each

        def ablate_heads():
            with torch.no_grad():
                for layer in range(n_layers):
                    for head in range(n_heads):
                        model.run_with_hooks(
                            tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_hook(head, 2))]
                        )

        return ablate_heads, 1.0
    if name == "adjoint_neurons":
        source = dp.Neurons(NEURON_LAYER)
        return (lambda: depass.attribute(tokens, target, source, mode="adjoint")), 1.0
    if name == "reference_grouped":  # forward DePass, one pass per group of neurons (2 sampled)
        groups = [list(range(s, s + REFERENCE_GROUP)) for s in (0, REFERENCE_GROUP)]

        def grouped():
            for group in groups:
                depass.attribute(tokens, target, dp.Neurons(NEURON_LAYER, group), mode="forward")

        return grouped, d_mlp / (REFERENCE_GROUP * len(groups))
    if name == "neuron_ablation":  # one forward per neuron (16 sampled)
        sample = list(range(16))

        def ablate_neurons():
            with torch.no_grad():
                for n in sample:
                    model.run_with_hooks(
                        tokens,
                        fwd_hooks=[(f"blocks.{NEURON_LAYER}.mlp.hook_post", zero_hook(n, 2))],
                    )

        return ablate_neurons, d_mlp / len(sample)
    raise SystemExit(f"unknown case {name!r}")


def _graph_case(name, model, tokens, depass, answer, wrong):
    """Circuit cases: every edge (each head's q/k/v input, each MLP, the logits) of the model."""
    from depass_lens.circuits import GraphNodes, build_spec  # noqa: PLC0415
    from depass_lens.circuits.patching import EdgePatcher, logit_diff_metric  # noqa: PLC0415
    from depass_lens.evaluation.circuit_baselines import eap_graph  # noqa: PLC0415

    corrupted = torch.roll(tokens, 1, dims=1)
    target = dp.LogitDiff(answer, wrong)
    if name == "graph_all":  # absolute graph with query and key edges (symmetric split)
        return (lambda: depass.graph(tokens, target, attention="symmetric")), 1.0
    if name == "graph_value":  # absolute graph, patterns frozen (query/key edges are 0)
        return (lambda: depass.graph(tokens, target, attention="value")), 1.0
    if name == "graph_contrast":  # contrastive graph, difference linearisation
        return (lambda: depass.graph(tokens, target, contrast=corrupted)), 1.0
    spec = build_spec(depass.adapter, GraphNodes(), tokens.shape[1])
    if name == "eap":
        return (lambda: eap_graph(depass.adapter, spec, tokens, corrupted, [target], ["t"])), 1.0
    ids = torch.tensor([answer]), torch.tensor([wrong])
    patcher = EdgePatcher(
        depass.adapter, spec, tokens, logit_diff_metric(*ids), corrupted=corrupted
    )
    n_edges = sum(spec.nodes[e.sender].kind != "bias" for e in spec.edges)

    def patch_sample():
        for i in range(PATCHED_EDGES):
            keep = torch.ones(len(spec.edges), dtype=torch.bool)
            keep[i] = False
            patcher.logits(keep)

    return patch_sample, n_edges / PATCHED_EDGES


def _feature_case(name: str, model: TLModel):
    """Feature graphs (design.md section 13) on the zoo ``ioi`` model with its shipped per-layer
    TopK transcoders, on the zoo's example prompt, explaining the logit difference of its answer
    and wrong name (``batch_size`` 64, the default)."""
    from depass_lens.zoo.saes import load_dictionaries  # noqa: PLC0415

    prompt = zoo_prompt(model, "ioi")
    tokens, corrupted = prompt["tokens"], prompt["corrupted"]
    dictionaries = load_dictionaries("ioi", device=str(tokens.device))
    target = dp.LogitDiff(prompt["answer"], prompt["wrong"])
    depass = dp.DePass(model, progress=False)

    def graph(**kwargs):
        return lambda: depass.feature_graph(tokens, target, dictionaries=dictionaries, **kwargs)

    if name == "feature_value":  # patterns frozen: circuit-tracer's semantics
        return graph(attention="value"), 1.0
    if name == "feature_value_ct":  # circuit-tracer's conventions: its top logits, position 0 out
        ct = lambda: depass.feature_graph(  # noqa: E731
            tokens,
            "top_logits",
            dictionaries=dictionaries,
            attention="value",
            zero_first_position=True,
        )
        return ct, 1.0
    if name == "feature_symmetric":  # query and key edges, one total per edge
        return graph(attention="symmetric", edge_kinds=False), 1.0
    if name == "feature_symmetric_kinds":  # each edge split into value / query / key parts
        return graph(attention="symmetric", edge_kinds=True), 1.0
    if name == "feature_contrast":  # clean - corrupted, difference linearisation
        return graph(contrast=corrupted), 1.0
    raise SystemExit(f"unknown case {name!r}")


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: TLModel,
    config: str,
    case: str,
    n_pos: int,
    repeats: int = 3,
    warmup: bool = True,
) -> dict:
    """Time one case (median of ``repeats``) and its peak memory above the loaded model.

    On CUDA the peak is the allocator's (``max_memory_allocated``), which is per case even when
    several cases share a process; on the CPU it is the process's peak resident memory, so each CPU
    case runs in its own subprocess (``benchmarks/run.py`` does that).
    """
    device = model.W_E.device
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, n_pos), generator=gen).to(device)
    if config in ZOO_CONFIGS:  # the zoo's example prompt
        tokens = zoo_prompt(model, ZOO_CONFIGS[config])["tokens"]
        n_pos = tokens.shape[1]
    fn, scale = make_case(case, model, tokens)
    if warmup:
        fn()  # warm-up (also allocates caches)
    _synchronise(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronise(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    typical = min(times) if config in ZOO_CONFIGS else statistics.median(times)
    return {
        "config": config,
        "case": case,
        "n_pos": n_pos,
        "device": device.type,
        "seconds": typical * scale,
        "statistic": "fastest" if config in ZOO_CONFIGS else "median",
        "fastest_seconds": min(times) * scale,
        "measured_seconds": typical,
        "extrapolation": scale,
        "repeats": repeats,
        "peak_extra_bytes": max(0, peak - base),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=sorted([*CONFIGS, *ZOO_CONFIGS]), default="gpt2")
    parser.add_argument("--case", required=True)
    parser.add_argument("--n-pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-warmup", action="store_true", help="for long loops of forwards")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.config, args.device)
    result = measure(model, args.config, args.case, args.n_pos, args.repeats, not args.no_warmup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

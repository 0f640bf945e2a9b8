"""Train the zoo's sparse dictionaries: TopK transcoders for MLPs, TopK SAEs on ``attn.hook_z``.

``python -m depass_lens.zoo.dictionary_train ioi`` trains one TopK transcoder per MLP of the
``ioi`` model: it reads ``blocks.L.ln2.hook_normalized`` and is trained to predict
``blocks.L.hook_mlp_out``. For an attention-only model (``induction``, ``binding``) it trains one
TopK SAE per layer on ``blocks.L.attn.hook_z`` with the heads flattened (``d_in = n_heads *
d_head``). Together they form the model's replacement (``zoo.saes.load_dictionaries``).

The recipe is Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"): the ``k`` largest
pre-activations are kept (ReLU'd), so L0 <= k by construction; MSE normalised by the target's
variance; Adam; decoder rows at unit norm after every step; ``b_dec`` initialised at the target's
mean; and an auxiliary loss (AuxK) in which latents that have not fired for ``dead_after`` steps
reconstruct the main loss's residual error, so they come back to life. The data are every position
(BOS included) of the task's training prompts, from the same forward passes as the residual SAE
(:func:`depass_lens.zoo.sae_train.activations`). One CPU thread and a seed make it deterministic.

Each dictionary is then measured on held-out test prompts with position 0 (BOS) excluded: explained
variance of the output it reconstructs, L0, dead latents, the task's accuracy and logit difference
with the dictionary spliced in, and per latent its top-activating prompts (``stats.json``). The
card ``cards/<model>.dictionaries.md`` is written from the shipped files' numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens import zoo
from depass_lens.adapters.base import TLModel
from depass_lens.sae.simple import CFG_FILE, WEIGHTS_FILE, SimpleSAE, save_sae_dir
from depass_lens.zoo.registry import ZOO_DIR
from depass_lens.zoo.sae_train import _wrong, activations, warmup_decay
from depass_lens.zoo.saes import SAE_DIR, dictionary_keys, load_dictionaries, sae_path

HELD_OUT_SPLIT, HELD_OUT_SEED = "test", 2024  # the residual SAE's held-out prompts (sae_train)
TOP_EXAMPLES = 5  # top-activating prompts kept per latent
EXAMPLE_PROMPTS = 200  # the first this many held-out prompts are searched for them (size)


def default_kind(model: TLModel) -> str:
    """``"z"`` for an attention-only model, else ``"transcoder"``."""
    return "z" if model.cfg.attn_only else "transcoder"


def hooks(kind: str, layer: int) -> tuple[str, str | None]:
    """A dictionary's input hook and, for a transcoder, its output hook."""
    if kind == "transcoder":
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    if kind == "z":
        return f"blocks.{layer}.attn.hook_z", None
    raise ValueError(f"kind must be 'transcoder' or 'z', not {kind!r}")


def _flat(x: Tensor) -> Tensor:
    """``hook_z``'s ``[batch, pos, head, d_head]`` with the heads flattened."""
    return x.flatten(-2) if x.ndim == 4 else x


def pairs(
    model: TLModel, kind: str, layer: int, n: int, split: str, seed: int, task: str
) -> tuple[
    Float[Tensor, "batch pos d_in"], Float[Tensor, "batch pos d_out"], Int[Tensor, "batch pos"], Any
]:
    """Inputs and targets of a dictionary on ``n`` task prompts (an SAE's target is its input)."""
    hook_in, hook_out = hooks(kind, layer)
    names = [hook_in] if hook_out is None else [hook_in, hook_out]
    acts, tokens, batch = activations(model, names, n, split, seed, task)
    x = _flat(acts[hook_in])
    return x, x if hook_out is None else _flat(acts[hook_out]), tokens, batch


def train_topk(
    x: Float[Tensor, "n d_in"],
    y: Float[Tensor, "n d_out"],
    d_sae: int,
    k: int,
    hook_in: str,
    hook_out: str | None = None,
    *,
    steps: int,
    batch_size: int = 2048,
    lr: float = 2e-3,
    seed: int = 0,
    aux_coef: float = 1 / 32,
    dead_after: int = 200,
    model_name: str = "",
) -> SimpleSAE:
    """A TopK SAE (``hook_out=None``, ``y`` is ``x``) or transcoder fitted to predict ``y`` from
    ``x``. ``dead_after``: steps without firing after which a latent counts as dead for AuxK."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = x.shape[1], y.shape[1]
    sae = SimpleSAE(
        d_in,
        d_sae,
        hook_in,
        "topk",
        k=k,
        model_name=model_name,
        hook_name_out=hook_out,
        d_out=d_out,
    )
    with torch.no_grad():
        W = torch.randn(d_sae, d_out, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        if hook_out is None:  # an SAE starts with its encoder tied to its decoder
            sae.W_enc.copy_(sae.W_dec.T)
        else:
            E = torch.randn(d_in, d_sae, generator=gen)
            sae.W_enc.copy_(E / E.norm(dim=0, keepdim=True))
        sae.b_dec.copy_(y.mean(0))
    variance = (y - y.mean(0)).pow(2).sum(-1).mean()
    k_aux = max(d_out // 2, k)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = warmup_decay(opt, steps)
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    for step in range(steps):
        rows = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[rows], y[rows]
        acts = sae.encode(xb)
        error = yb - sae.decode(acts)
        mse = error.pow(2).sum(-1).mean() / variance
        loss = mse
        last_fired[(acts > 0).any(0)] = step
        dead = step - last_fired > dead_after
        if aux_coef and dead.any():  # AuxK: the dead latents' top pre-activations fit the error
            pre = sae.hidden_pre(xb).masked_fill(~dead, float("-inf"))
            top = pre.topk(min(k_aux, int(dead.sum())), dim=-1)
            aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            aux = (error.detach() - aux_acts @ sae.W_dec).pow(2).sum(-1).mean() / variance
            loss = loss + aux_coef * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        if step % 1000 == 0 or step == steps - 1:
            l0 = (acts > 0).float().sum(-1).mean()
            print(
                f"step {step}: 1-EV {float(mse.detach()):.4f} L0 {float(l0):.1f} "
                f"dead {int(dead.sum())}",
                flush=True,
            )
    return sae.eval()


def _splice(sae: SimpleSAE) -> list[tuple[str, Callable[..., Tensor | None]]]:
    """Forward hooks that replace the dictionary's output hook with its reconstruction."""
    hook_in, hook_out = sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out
    if hook_out is None:
        return [(hook_in, lambda v, hook: sae(_flat(v)).reshape(v.shape))]
    seen: dict[str, Tensor] = {}

    def read(v: Tensor, hook: Any) -> None:
        seen["x"] = v

    return [(hook_in, read), (hook_out, lambda v, hook: sae(seen["x"]))]


@torch.no_grad()
def task_metrics(
    model: TLModel, tokens: Int[Tensor, "batch pos"], batch: Any, saes: Sequence[SimpleSAE] = ()
) -> dict[str, float]:
    """Last-position accuracy and mean logit difference (answer - wrong), with ``saes`` spliced
    in (their reconstructions replace the real outputs, no error term)."""
    hooks_ = [h for sae in saes for h in _splice(sae)]
    last = model.run_with_hooks(tokens, fwd_hooks=hooks_)[:, -1]
    rows = torch.arange(len(last))
    return {
        "accuracy": float((last.argmax(-1) == batch.answers).float().mean()),
        "logit_diff": float((last[rows, batch.answers] - last[rows, _wrong(batch)]).mean()),
    }


def top_examples(
    model: TLModel,
    acts: Float[Tensor, "batch pos d_sae"],
    tokens: Int[Tensor, "batch pos"],
    prompts: list[str],
    n: int = TOP_EXAMPLES,
) -> dict[str, Any]:
    """Per latent that fires (BOS excluded) on these prompts its ``n`` top-activating prompts,
    one example per prompt at its strongest position: rows ``[prompt index, position, token,
    activation]`` and the table of the prompts they index."""
    best, where = acts[:, 1:].max(1)  # [batch, d_sae]: each prompt's strongest activation
    table: dict[int, int] = {}
    latents: dict[str, list[list[Any]]] = {}
    for latent in range(acts.shape[-1]):
        values, order = best[:, latent].topk(min(n, len(best)))
        rows = []
        for value, b in zip(values.tolist(), order.tolist()):
            if value <= 0:
                break
            pos = int(where[b, latent]) + 1
            token = model.to_single_str_token(int(tokens[b, pos]))
            rows.append([table.setdefault(b, len(table)), pos, token, round(value, 2)])
        if rows:
            latents[str(latent)] = rows
    return {
        "fields": ["prompt", "position", "token", "activation"],
        "prompts": [prompts[b] for b in table],
        "latents": latents,
    }


@torch.no_grad()
def measure(
    model: TLModel, sae: SimpleSAE, kind: str, layer: int, task: str, n: int = 400
) -> dict[str, Any]:
    """Held-out numbers, position 0 (BOS) excluded: explained variance of the output the
    dictionary reconstructs, L0, dead latents; the task metrics clean and with it spliced in; the
    relative error at BOS; the top-activating prompts per latent."""
    x, y, tokens, batch = pairs(model, kind, layer, n, HELD_OUT_SPLIT, HELD_OUT_SEED, task)
    acts = sae.encode(x)
    recon = sae.decode(acts)
    flat, flat_recon = y[:, 1:].reshape(-1, y.shape[-1]), recon[:, 1:].reshape(-1, y.shape[-1])
    explained = 1 - (flat - flat_recon).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    bos_error = (y[:, 0] - recon[:, 0]).norm(dim=-1) / y[:, 0].norm(dim=-1).clamp_min(1e-12)
    return {
        "held_out_prompts": n,
        "explained_variance": float(explained),
        "L0": float((acts[:, 1:] > 0).float().sum(-1).mean()),
        "L0_max": int((acts[:, 1:] > 0).sum(-1).max()),
        "L0_bos": float((acts[:, 0] > 0).float().sum(-1).mean()),
        "bos_relative_error": float(bos_error.mean()),
        "dead_latents": int((acts[:, 1:] > 0).flatten(0, 1).any(0).logical_not().sum()),
        "clean": task_metrics(model, tokens, batch),
        "spliced": task_metrics(model, tokens, batch, [sae]),
        "top_examples": top_examples(
            model, acts[:EXAMPLE_PROMPTS], tokens[:EXAMPLE_PROMPTS], batch.prompts
        ),
    }


def _command(args: argparse.Namespace, layer: int) -> str:
    return (
        f"python -m depass_lens.zoo.dictionary_train {args.model} --kind {args.kind} "
        f"--layers {layer} --d-sae {args.d_sae} --k {args.k} --steps {args.steps} "
        f"--prompts {args.prompts} --lr {args.lr} --seed {args.seed}"
    )


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """``stats.json``: one top-level key a line, each value compact (the file stays small)."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in stats.items()]
    (path / "stats.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def write_card(model_name: str) -> str:
    """The dictionaries' card (markdown) from the shipped files' numbers, with the task metrics
    of the model with every dictionary spliced in at once."""
    model = zoo.load(model_name)
    task = zoo.spec(model_name).task
    keys = dictionary_keys(model_name)
    stats = [json.loads((sae_path(model_name, key) / "stats.json").read_text()) for key in keys]
    sizes = [size_bytes(sae_path(model_name, key)) for key in keys]
    n = stats[0]["held_out_prompts"]
    batch = zoo.task(task).batch(model, n, HELD_OUT_SPLIT, HELD_OUT_SEED)
    rows = batch.tokens[:, 1:].numel()
    contexts = len(
        {tuple(row[: p + 1]) for row in batch.tokens.tolist() for p in range(1, len(row))}
    )
    clean = task_metrics(model, batch.tokens, batch)
    spliced = task_metrics(model, batch.tokens, batch, load_dictionaries(model_name))
    kind = stats[0]["kind"]
    table = "\n".join(
        f"| `{sae_path(model_name, key).name}` | `{s['hook_in']}` | `{s['hook_out']}` "
        f"| {s['d_in']} -> {s['d_sae']} -> {s['d_out']} | {s['k']} "
        f"| {s['explained_variance']:.4f} | {s['L0']:.2f} (max {s['L0_max']}) "
        f"| {s['dead_latents']} | {size / 1e3:.0f} kB | {s['training']['seconds']} "
        f"| {s['spliced']['accuracy']:.3f} / {s['spliced']['logit_diff']:.2f} |"
        for key, s, size in zip(keys, stats, sizes)
    )
    header = (
        "| dictionary | input hook | output hook | d_in -> width -> d_out | k | EV | L0 | dead "
        "| size | seconds | spliced |\n" + "|---" * 11 + "|"
    )
    commands = "\n".join(f"- `{s['training']['command']}`" for s in stats)
    what = (
        "a TopK **transcoder**\nper MLP, which reads the MLP's input "
        "`blocks.L.ln2.hook_normalized` and is trained to predict\nthe MLP's output "
        "`blocks.L.hook_mlp_out`"
        if kind == "transcoder"
        else "a TopK **SAE on the\nattention output before `W_O`**, `blocks.L.attn.hook_z`, with "
        "the heads flattened (`d_in =\nn_heads * d_head`; cfg `reshape_activations: hook_z`)"
    )
    note = ""
    if model.cfg.normalization_type == "RMS":
        note = (
            "\nTransformerLens's RMSNorm fires `ln2.hook_normalized` before its weight\n"
            "(`x / rms(x)`), so the transcoder's input is the MLP's input divided elementwise by\n"
            "`ln2.w`; it is still a linear read-out of the stream with the norm scale frozen.\n"
        )
    first = stats[0]
    output = "`hook_mlp_out`" if kind == "transcoder" else "the flattened `hook_z`"
    bos = ", ".join(f"{s['bos_relative_error']:.3f}" for s in stats)
    return f"""# Sparse dictionaries for zoo model `{model_name}`

The dictionaries that form `{model_name}`'s replacement model, one per layer: {what}. They are
shipped in SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`, plus `stats.json`)
under `depass_lens/zoo/saes/`. `depass_lens.zoo.saes.load_dictionaries("{model_name}")` loads
them as dependency-free `SimpleSAE`s in layer order, `dictionary_stats("{model_name}")` gives the
numbers below, and `top_examples("{model_name}", "L0.{kind}")` gives each latent's top-activating
held-out prompts as `(prompt, position, token, activation)`.
{note}
## Training

Trained by `depass_lens/zoo/dictionary_train.py` (TopK, so L0 <= k by construction; MSE
normalised by the target's variance, Adam, unit-norm decoder rows, AuxK loss for dead latents,
`b_dec` at the target's mean) on every position, BOS included, of {first["training"]["prompts"]:,}
training prompts of the `{task}` task ({first["training"]["rows"]:,} rows), one CPU thread:

{commands}

## Held-out measurements

{first["held_out_prompts"]} test prompts ({rows:,} positions after BOS, {contexts:,} distinct
contexts: a causal model's activation at a position depends only on the prompt up to it);
explained variance, L0 and dead latents exclude position 0 (BOS). Explained variance is of the
output the dictionary reconstructs ({output}): `1 - sum |y - y_hat|^2 / sum |y - mean y|^2` over
all non-BOS positions. *Dead*: latents never active on them. *Spliced*: last-position
accuracy / mean logit difference (answer - wrong) with the dictionary's output replacing the real
one and no error term; clean model: {clean["accuracy"]:.3f} / {clean["logit_diff"]:.2f}.

{header}
{table}

With every dictionary spliced in at once (the replacement model without error terms):
accuracy {spliced["accuracy"]:.3f}, logit difference {spliced["logit_diff"]:.2f}.
At BOS (excluded above; it is the same activation on every prompt) the reconstruction's relative
error is {bos} (layer by layer). DePass keeps every reconstruction error as its own component,
so attributions stay exact anyway.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--kind", choices=("transcoder", "z"), default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: all")
    parser.add_argument("--d-sae", type=int, default=None, help="512 (transcoder), 256 (z)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--prompts", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="parent directory (default: the shipped one)")
    parser.add_argument("--no-card", action="store_true", help="do not rewrite the card")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = zoo.load(args.model)
    task = zoo.spec(args.model).task
    args.kind = args.kind or default_kind(model)
    args.d_sae = args.d_sae or (512 if args.kind == "transcoder" else 256)
    layers = args.layers if args.layers is not None else list(range(model.cfg.n_layers))
    for layer in layers:
        start = time.time()
        x, y, _, _ = pairs(model, args.kind, layer, args.prompts, "train", args.seed, task)
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        hook_in, hook_out = hooks(args.kind, layer)
        print(f"{args.model} L{layer} {args.kind}: {len(x)} rows", flush=True)
        sae = train_topk(
            x,
            y,
            args.d_sae,
            args.k,
            hook_in,
            hook_out,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            model_name=f"zoo-{args.model}",
        )
        seconds = time.time() - start
        out = Path(args.out or SAE_DIR) / f"{args.model}-L{layer}-{args.kind}"
        save_sae_dir(sae, out)
        stats: dict[str, Any] = {
            "kind": args.kind,
            "hook_in": hook_in,
            "hook_out": hook_out or hook_in,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "d_out": sae.cfg.d_out,
            "k": args.k,
            "training": {
                "command": _command(args, layer),
                "rows": len(x),
                "prompts": args.prompts,
                "seconds": round(seconds, 1),
                "threads": 1,
            },
        }
        stats.update(measure(model, sae, args.kind, layer, task))
        write_stats(out, stats)
        assert (out / CFG_FILE).exists() and (out / WEIGHTS_FILE).exists()
        summary = {k: v for k, v in stats.items() if k not in ("top_examples", "training")}
        print(json.dumps(summary | {"seconds": stats["training"]["seconds"]}), flush=True)
    if args.out is None and not args.no_card and dictionary_keys(args.model):
        (ZOO_DIR / "cards" / f"{args.model}.dictionaries.md").write_text(write_card(args.model))


if __name__ == "__main__":
    main()

"""Train the zoo's SAE on a zoo model's residual stream and write it in SAELens's format.

``python -m depass_lens.zoo.sae_train ioi`` trains a standard (ReLU) SAE on
``blocks.1.hook_resid_post`` of the ``ioi`` model, on every position of the task's training
prompts, with the usual recipe: MSE + ``l1 * sum_i a_i |W_dec[i]|``, Adam, decoder rows kept at
unit norm, ``b_dec`` initialised at the data mean. SAELens's own trainer streams text datasets
from the Hub; this documented loop runs offline on the task's own prompts. It then measures the
SAE on held-out prompts (:func:`measure`) and writes ``stats.json`` and the card.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from depass_lens import zoo
from depass_lens.adapters.base import TLModel
from depass_lens.sae.simple import SimpleSAE, save_sae_dir
from depass_lens.zoo.registry import ZOO_DIR
from depass_lens.zoo.saes import SAE_DIR, SHIPPED


def activations(
    model: TLModel, hooks: list[str], n: int, split: str, seed: int, task: str
) -> tuple[dict[str, Tensor], Int[Tensor, "batch pos"], Any]:
    """The activations at each of ``hooks`` on ``n`` task prompts (one forward pass), with the
    tokens and the batch."""
    batch = zoo.task(task).batch(model, n, split, seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda name: name in hooks)
    return {hook: cache[hook] for hook in hooks}, batch.tokens, batch


def residuals(
    model: TLModel, hook: str, n: int, split: str, seed: int, task: str
) -> tuple[Float[Tensor, "batch pos d"], Int[Tensor, "batch pos"], Any]:
    """The activations at ``hook`` on ``n`` task prompts, with the tokens and the batch."""
    acts, tokens, batch = activations(model, [hook], n, split, seed, task)
    return acts[hook], tokens, batch


def warmup_decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate: 200 steps of linear warm-up, constant, linear decay over the last 20%."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200, 5 * (1 - s / steps))
    )


def train(
    data: Float[Tensor, "n d"],
    d_sae: int,
    hook: str,
    *,
    l1: float,
    steps: int,
    batch_size: int = 2048,
    lr: float = 2e-3,
    seed: int = 0,
    model_name: str = "",
) -> SimpleSAE:
    """A standard ReLU SAE fitted to the rows of ``data``."""
    gen = torch.Generator().manual_seed(seed)
    d_in = data.shape[1]
    sae = SimpleSAE(d_in, d_sae, hook, model_name=model_name)
    with torch.no_grad():
        W = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T * 0.5)
        sae.b_dec.copy_(data.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = warmup_decay(opt, steps)
    for step in range(steps):
        rows = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        acts = sae.encode(rows)
        recon = sae.decode(acts)
        mse = (recon - rows).pow(2).sum(-1).mean()
        sparsity = (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = mse + l1 * min(1.0, step / (0.2 * steps)) * sparsity  # L1 warm-up
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():  # unit-norm decoder rows (the L1 term then counts activations)
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        if step % 1000 == 0 or step == steps - 1:
            l0 = (acts > 0).float().sum(-1).mean()
            print(f"step {step}: mse {float(mse):.4f} L0 {float(l0):.1f}", flush=True)
    return sae.eval()


def roles(tokens: Int[Tensor, "batch pos"], answers: Tensor, wrong: Tensor) -> list[list[str]]:
    """Each position's role in an IOI prompt: IO, S1, S2, END, BOS or the plain token."""
    out = []
    for row, io, s in zip(tokens.tolist(), answers.tolist(), wrong.tolist()):
        names, seen_s = [], 0
        for p, t in enumerate(row):
            if p == 0:
                names.append("BOS")
            elif p == len(row) - 1:
                names.append("END")
            elif t == io:
                names.append("IO")
            elif t == s:
                seen_s += 1
                names.append(f"S{seen_s}")
            else:
                names.append("other")
        out.append(names)
    return out


@torch.no_grad()
def measure(model: TLModel, sae: SimpleSAE, task: str, n: int = 400) -> dict[str, Any]:
    """Held-out L0, explained variance, dead latents, the metric with the SAE spliced in (no
    error term), and per latent where it fires (role) and, at END, for which answer."""
    hook = sae.cfg.metadata.hook_name
    x, tokens, batch = residuals(model, hook, n, "test", 2024, task)
    acts = sae.encode(x)
    recon = sae.decode(acts)
    flat, flat_recon = x[:, 1:].reshape(-1, x.shape[-1]), recon[:, 1:].reshape(-1, x.shape[-1])
    explained = 1 - (flat - flat_recon).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    l0 = (acts[:, 1:] > 0).float().sum(-1).mean()
    l0_bos = (acts[:, 0] > 0).float().sum(-1).mean()

    def metric(logits: Tensor) -> float:
        last = logits[:, -1]
        rows = torch.arange(len(last))
        return float((last[rows, batch.answers] - last[rows, batch.wrong]).mean())

    clean = metric(model(tokens))
    spliced = metric(model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda v, hook: sae(v))]))
    mean_ablated = metric(
        model.run_with_hooks(
            tokens, fwd_hooks=[(hook, lambda v, hook: v.mean((0, 1), keepdim=True).expand_as(v))]
        )
    )
    role = roles(tokens, batch.answers, batch.wrong)
    words = model.to_str_tokens(batch.answers)
    latents = []
    for i in range(sae.cfg.d_sae):
        a = acts[..., i]
        mass: dict[str, float] = defaultdict(float)
        for b, p in (a > 0).nonzero().tolist():
            mass[role[b][p]] += float(a[b, p])
        total = sum(mass.values())
        end = a[:, -1]
        by_answer: dict[str, float] = defaultdict(float)
        for b in (end > 0).nonzero()[:, 0].tolist():
            by_answer[str(words[b])] += float(end[b])
        top_role = max(mass, key=mass.__getitem__) if mass else None
        top_answer = max(by_answer, key=by_answer.__getitem__) if by_answer else None
        top_mass = by_answer[top_answer] if top_answer else 0.0
        latents.append(
            {
                "latent": i,
                "frequency": float((a[:, 1:] > 0).float().mean()),
                "top_role": top_role,
                "role_share": mass[top_role] / total if top_role else 0.0,
                "end_top_answer": top_answer,
                "end_answer_share": top_mass / max(sum(by_answer.values()), 1e-12),
            }
        )
    return {
        "held_out_prompts": n,
        "L0": float(l0),
        "L0_bos": float(l0_bos),
        "explained_variance": float(explained),
        "dead_latents": int((acts[:, 1:] > 0).flatten(0, 1).any(0).logical_not().sum()),
        "metric_clean": clean,
        "metric_spliced": spliced,
        "metric_mean_ablated": mean_ablated,
        "latents": latents,
    }


def _wrong(batch: Any) -> Tensor:
    if batch.wrong is None:
        raise ValueError("the task has no wrong answers: the metric is a logit difference")
    return batch.wrong


@torch.no_grad()
def top_latents(
    model: TLModel, sae: SimpleSAE, task: str, n: int = 200, k: int = 8
) -> list[dict[str, Any]]:
    """The ``k`` latents with the largest mean DePass share of the logit difference on held-out
    prompts, each with its decoder logit lens and, at END, for which answer it fires."""
    from depass_lens import DePass, LogitDiff  # noqa: PLC0415 - the zoo does not need DePass
    from depass_lens.sae import SAELatents  # noqa: PLC0415

    batch = zoo.task(task).batch(model, n, "test", 2024)
    hook = sae.cfg.metadata.hook_name
    attribution = DePass(model, progress=False).attribute(
        batch.tokens, LogitDiff(batch.answers, _wrong(batch)), SAELatents(sae)
    )
    index = [i for i, lab in enumerate(attribution.labels) if lab.kind == "latent"]
    mean = attribution.scores[:, 0, index].mean(0)
    _, cache = model.run_with_cache(batch.tokens, names_filter=hook)
    end = sae.encode(cache[hook])[:, -1]
    answers = model.to_str_tokens(batch.answers)
    out = []
    for j in mean.abs().argsort(descending=True)[:k].tolist():
        latent = attribution.labels[index[j]].index
        direction = sae.W_dec[latent] - sae.W_dec[latent].mean()  # the final LayerNorm centres
        weight = model.ln_final.w
        assert isinstance(weight, Tensor)
        lens = (direction * weight) @ model.W_U
        fires = end[:, latent] > 0
        names = Counter(a for a, f in zip(answers, fires.tolist()) if f)
        name, count = names.most_common(1)[0] if names else (None, 0)
        with_name = [a == name for a in answers]
        out.append(
            {
                "latent": latent,
                "mean_score": float(mean[j]),
                "lens_top": [model.to_single_str_token(int(t)) for t in lens.topk(3).indices],
                "end_name": name,
                "end_precision": count / max(int(fires.sum()), 1),
                "end_mass_share": float(end[torch.tensor(with_name), latent].sum())
                / max(float(end[:, latent].sum()), 1e-12),
                "end_recall": count / max(sum(with_name), 1),
                "name_prompts": sum(with_name),
            }
        )
    return out


def write_card(model_name: str, stats: dict[str, Any], latents: list[dict[str, Any]]) -> str:
    """The SAE card (markdown), from measured numbers only."""
    t = stats["training"]
    rows = "\n".join(
        f"| {x['latent']} | {x['mean_score']:+.3f} | {', '.join(x['lens_top'])} | {x['end_name']} "
        f"| {x['end_precision']:.2f} | {x['end_mass_share']:.2f} "
        f"| {x['end_recall']:.2f} ({x['name_prompts']} prompts) |"
        for x in latents
    )
    text = f"""# SAE for zoo model `{model_name}`

A standard (ReLU) sparse autoencoder on `{stats["hook"]}` of the `{model_name}` model, shipped in
SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`) under
`depass_lens/zoo/saes/`. Load it with `dp.zoo.load_sae("{model_name}")` (a dependency-free
`SimpleSAE`) or `dp.zoo.load_sae("{model_name}", as_saelens=True)` (SAELens's own `SAE`).

## Training

- command: `{t["command"]}`
- {stats["d_sae"]} latents on d_model = {stats["d_in"]}; {t["rows"]:,} activation rows (every
  position of the task's training prompts, BOS included); MSE + L1 on `a_i |W_dec[i]|`, Adam,
  unit-norm decoder rows; {t["seconds"]} s on {t["threads"]} CPU thread.

## Held-out measurements ({stats["held_out_prompts"]} test prompts)

- L0 (active latents per token, BOS excluded): {stats["L0"]:.2f}; at BOS: {stats["L0_bos"]:.1f}
- explained variance (BOS excluded): {stats["explained_variance"]:.4f}
- dead latents: {stats["dead_latents"]}
- logit difference (answer - wrong): clean {stats["metric_clean"]:.2f}; with the SAE's
  reconstruction spliced in and no error term {stats["metric_spliced"]:.2f}; with the stream
  mean-ablated {stats["metric_mean_ablated"]:.2f}. The reconstruction alone does not reproduce
  the model, which is why DePass keeps the error as its own component.

## Latents that drive the answer

The {len(latents)} latents with the largest mean DePass share of the logit difference (adjoint
mode, `SAELatents` source, `LogitDiff(answer, wrong)` target, 200 held-out prompts). *Lens*: the
decoder vector's top promoted tokens through the final norm's weight and `W_U`. *END*: among the
prompts where the latent is active at the last position, the most common answer name, the
fraction of those prompts with that answer (precision), the share of the latent's END activation
mass on them, and the fraction of that name's prompts where the latent is active at END (recall).

| latent | mean score | lens (top 3) | END: answer | precision | mass share | recall |
|---|---|---|---|---|---|---|
{rows}

These are indirect-object name latents: each is active at the final position on every prompt
whose answer is one particular name and carries most of its activation there (it also fires
weakly on other prompts), and its decoder vector promotes that name's logit.
"""
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", default="ioi", nargs="?")
    parser.add_argument("--hook", default="blocks.1.hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--l1", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--prompts", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory (default: the shipped location)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = zoo.load(args.model)
    task = zoo.spec(args.model).task
    start = time.time()
    x, _, _ = residuals(model, args.hook, args.prompts, "train", args.seed, task)
    data = x.reshape(-1, x.shape[-1])
    sae = train(
        data,
        args.d_sae,
        args.hook,
        l1=args.l1,
        steps=args.steps,
        seed=args.seed,
        model_name=f"zoo-{args.model}",
    )
    seconds = time.time() - start
    stats = measure(model, sae, task)
    short = f"L{args.hook.split('.')[1]}.{args.hook.split('.')[-1].removeprefix('hook_')}"
    out = args.out or str(SAE_DIR / SHIPPED.get((args.model, short), f"{args.model}-{short}"))
    save_sae_dir(sae, out)
    stats["training"] = {
        "command": f"python -m depass_lens.zoo.sae_train {args.model} --hook {args.hook} "
        f"--d-sae {args.d_sae} --l1 {args.l1} --steps {args.steps} --prompts {args.prompts} "
        f"--seed {args.seed}",
        "rows": len(data),
        "seconds": round(seconds, 1),
        "threads": 1,
    }
    stats.update(hook=args.hook, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)
    with open(f"{out}/stats.json", "w") as fh:
        json.dump(stats, fh, indent=1)
    if args.out is None:
        card = write_card(args.model, stats, top_latents(model, sae, task))
        (ZOO_DIR / "cards" / f"{args.model}.sae.md").write_text(card)
    print(json.dumps({k: v for k, v in stats.items() if k != "latents"}, indent=1))


if __name__ == "__main__":
    main()

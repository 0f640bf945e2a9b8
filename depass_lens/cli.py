"""Command line: ``depass-lens demo`` (offline report on a zoo model), ``depass-lens graph`` (a
circuit report) and ``depass-lens eval`` (faithfulness against baselines)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from depass_lens.adapters.base import TLModel
from depass_lens.adapters.loading import load_pretrained


def load_model(name: str, device: str = "cpu") -> TLModel:
    """A zoo model by name (offline), else a TransformerLens pretrained name (needs internet)."""
    from depass_lens import zoo  # noqa: PLC0415 - the zoo loads weights lazily

    if name in zoo.list():
        return zoo.load(name, device=device)
    return load_pretrained(name, device=device)


def default_prompt(name: str) -> tuple[str, str | None, str | None]:
    """The zoo task's example prompt and answer/wrong answer, or a generic sentence."""
    from depass_lens import zoo  # noqa: PLC0415

    if name in zoo.list():
        return zoo.example(name)
    return ("When Mary and John went to the store, John gave a drink to", " Mary", " John")


def load_sae(spec: str, model: str):
    """``--sae zoo``: the zoo model's shipped SAE; otherwise a SAELens-format directory."""
    from depass_lens.sae import load_sae_dir  # noqa: PLC0415
    from depass_lens.zoo.saes import load_sae as zoo_sae  # noqa: PLC0415

    return zoo_sae(model) if spec == "zoo" else load_sae_dir(spec)


def demo(args: argparse.Namespace) -> int:
    from depass_lens.demo import make_target, run_demo  # noqa: PLC0415

    model = load_model(args.model, args.device)
    prompt, target, wrong = default_prompt(args.model)
    if args.prompt is not None:
        prompt, target, wrong = args.prompt, None, None
    target = args.target if args.target is not None else target
    wrong = args.wrong if args.wrong is not None else wrong
    result = run_demo(
        model,
        prompt,
        make_target(model, target, wrong, prompt),
        args.out,
        title=f"DePass report: {args.model}",
        sae=load_sae(args.sae, args.model) if args.sae else None,
    )
    print(result.summary())
    return 0


def graph(args: argparse.Namespace) -> int:
    """A circuit for a zoo task (its held-out and corrupted prompts), or for one prompt."""
    import torch  # noqa: PLC0415

    import depass_lens as dp  # noqa: PLC0415
    from depass_lens import zoo  # noqa: PLC0415
    from depass_lens.circuit_report import run_graph  # noqa: PLC0415

    model = load_model(args.model, args.device)
    title = f"DePass circuit: {args.model}"
    if args.model in zoo.list() and args.prompt is None:
        batch = zoo.task(args.model).batch(model, args.n, split="test", seed=args.seed)
        if batch.wrong is None:
            raise SystemExit(f"the {args.model} task has no wrong answers to contrast with")
        target: dp.Target = dp.LogitDiff(batch.answers, batch.wrong, name="answer - wrong")
        corrupted = None if args.absolute else batch.corrupted
        result = run_graph(
            model,
            batch.tokens,
            target,
            args.out,
            corrupted=corrupted,
            answers=(batch.answers, batch.wrong),
            k=args.k,
            attention=args.attention,
            title=title,
        )
    else:
        from depass_lens.demo import make_target  # noqa: PLC0415

        prompt, target_token, wrong = default_prompt(args.model)
        prompt = args.prompt or prompt
        target_token = args.target if args.target is not None else target_token
        wrong = args.wrong if args.wrong is not None else wrong
        target = make_target(model, target_token, wrong, prompt)
        answers = None
        if args.corrupt is not None and target_token is not None and wrong is not None:
            ids = [torch.tensor([model.to_single_token(t)]) for t in (target_token, wrong)]
            answers = (ids[0], ids[1])
        result = run_graph(
            model,
            prompt,
            target,
            args.out,
            corrupted=args.corrupt,
            answers=answers,
            k=args.k,
            attention=args.attention,
            title=title,
        )
    print(result.summary())
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from depass_lens.evaluation.cli import run_cli  # noqa: PLC0415

    return run_cli(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="depass-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="write an HTML report of DePass on one prompt")
    p.add_argument("--model", default="ioi", help="zoo name (offline) or TransformerLens name")
    p.add_argument("--prompt", default=None, help="default: the zoo task's example prompt")
    p.add_argument("--target", default=None, help="target token, e.g. ' Mary'")
    p.add_argument("--wrong", default=None, help="with --target: explain target - wrong")
    p.add_argument("--out", default="depass_report.html")
    p.add_argument(
        "--sae", default=None, help="'zoo' (the zoo model's SAE) or a SAELens-format directory"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=demo)

    g = sub.add_parser("graph", help="write an HTML report of a circuit (edge attribution)")
    g.add_argument("--model", default="ioi", help="zoo name (offline) or TransformerLens name")
    g.add_argument("--out", default="circuit.html", help="report; .json and .dot beside it")
    g.add_argument("--k", type=int, default=30, help="edges in the circuit (before pruning)")
    g.add_argument("--n", type=int, default=32, help="zoo task prompts")
    g.add_argument("--seed", type=int, default=7, help="zoo task sample")
    g.add_argument(
        "--attention",
        default="symmetric",
        choices=["value", "pattern", "symmetric"],
        help="attention split (query/key edges need pattern or symmetric)",
    )
    g.add_argument("--absolute", action="store_true", help="no contrast with corrupted prompts")
    g.add_argument("--prompt", default=None, help="one prompt instead of the zoo task")
    g.add_argument("--target", default=None)
    g.add_argument("--wrong", default=None)
    g.add_argument("--corrupt", default=None, help="a corrupted prompt of the same length")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=graph)

    e = sub.add_parser("eval", help="faithfulness evaluation against baselines")
    e.add_argument("--model", default="ioi")
    e.add_argument("--level", default="heads", choices=["tokens", "heads", "neurons", "subspace"])
    e.add_argument("--n", type=int, default=32, help="number of task prompts")
    e.add_argument("--out", default="depass_eval")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=evaluate)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

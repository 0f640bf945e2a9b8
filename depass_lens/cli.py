"""Command line: ``depass-lens demo`` (offline report on a zoo model), ``depass-lens graph`` (a
circuit report), ``depass-lens feature-graph`` (a latent attribution graph in an explorer page)
and ``depass-lens eval`` (faithfulness against baselines).

Only argparse and the standard library load before a subcommand runs, so ``--help`` is instant;
torch, TransformerLens and plotly are imported by the subcommand that needs them. A bad argument
or a refused input (:class:`~depass_lens.errors.DePassError`) ends the command with a one-line
message and exit status 2, before any work where it can be checked up front.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from depass_lens.adapters.base import TLModel

#: What else --model accepts, for the message that names the zoo's models.
ZOO_HINT = "any TransformerLens pretrained name (e.g. gpt2-small) also works, with internet"


class CommandError(Exception):
    """A bad argument found after parsing; ``main`` prints it as ``prog: error: ...`` (exit 2)."""


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def zoo_names() -> list[str]:
    from depass_lens.zoo.registry import SPECS  # noqa: PLC0415 - light, but only when needed

    return sorted(SPECS)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """The error's message on one line, cut at ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def load_model(name: str, device: str = "cpu") -> TLModel:
    """A zoo model by name (offline), else a TransformerLens pretrained name (needs internet).

    Raises :class:`CommandError` naming the zoo's models when ``name`` is neither.
    """
    if name in zoo_names():
        from depass_lens import zoo  # noqa: PLC0415 - the zoo loads weights lazily

        return zoo.load(name, device=device)
    from depass_lens.adapters.loading import load_pretrained, tl_generation  # noqa: PLC0415

    unknown = f"unknown model {name!r}: the zoo has {', '.join(zoo_names())} (offline); {ZOO_HINT}"
    if tl_generation() < 4:
        from transformer_lens import loading  # noqa: PLC0415

        try:
            loading.get_official_model_name(name)
        except ValueError:  # its message lists every official name: too long to help
            raise CommandError(unknown) from None
    try:
        return load_pretrained(name, device=device)
    except (OSError, ValueError) as error:  # no internet / not a hub model
        raise CommandError(f"{unknown}; loading {name!r} failed: {_one_line(error)}") from None


def zoo_model(name: str, command: str) -> None:
    """Refuse a model that is not in the zoo for a command that needs the zoo's tasks."""
    if name not in zoo_names():
        raise CommandError(
            f"{command} runs on the zoo's models only ({', '.join(zoo_names())}), not {name!r}"
        )


def default_prompt(name: str) -> tuple[str, str | None, str | None]:
    """The zoo task's example prompt and answer/wrong answer, or a generic sentence."""
    if name in zoo_names():
        from depass_lens import zoo  # noqa: PLC0415

        return zoo.example(name)
    return ("When Mary and John went to the store, John gave a drink to", " Mary", " John")


def load_sae(spec: str, model: str) -> Any:
    """``--sae zoo``: the zoo model's shipped SAE; otherwise a SAELens-format directory."""
    if spec == "zoo":
        from depass_lens.zoo.saes import SHIPPED  # noqa: PLC0415
        from depass_lens.zoo.saes import load_sae as zoo_sae  # noqa: PLC0415

        have = sorted({m for m, _ in SHIPPED})
        if model not in have:
            raise CommandError(
                f"--sae zoo: the zoo ships an SAE for {', '.join(have)} only, not {model!r}; "
                "give a SAELens-format directory instead"
            )
        return zoo_sae(model)
    from depass_lens.sae import load_sae_dir  # noqa: PLC0415

    if not Path(spec).is_dir():
        raise CommandError(f"--sae {spec!r}: not 'zoo' and not a directory")
    return load_sae_dir(spec)


def writable(path: str | Path, what: str, *, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written (checked before the work, not after).

    A file must not be a directory (nor a directory a file), an existing one must be writable,
    and the nearest existing parent must be a writable directory (missing ones are created).
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise CommandError(f"{what} {str(path)!r} is a file; give a directory")
        if not directory and path.is_dir():
            raise CommandError(f"{what} {str(path)!r} is a directory; give a file name")
        if not os.access(path, os.W_OK):
            raise CommandError(f"{what} {str(path)!r} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{what} {str(path)!r}: cannot write in {str(parent)!r}")
    return path


def demo(args: argparse.Namespace) -> int:
    writable(args.out, "--out")
    sae = load_sae(args.sae, args.model) if args.sae else None
    model = load_model(args.model, args.device)
    from depass_lens.demo import make_target, run_demo  # noqa: PLC0415

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
        sae=sae,
    )
    print(result.summary())
    return 0


def graph(args: argparse.Namespace) -> int:
    """A circuit for a zoo task (its held-out and corrupted prompts), or for one prompt."""
    out = writable(args.out, "--out")
    for suffix in (".json", ".dot"):  # written beside the report
        writable(out.with_suffix(suffix), "--out")
    model = load_model(args.model, args.device)
    import torch  # noqa: PLC0415

    import depass_lens as dp  # noqa: PLC0415
    from depass_lens import zoo  # noqa: PLC0415
    from depass_lens.circuit_report import run_graph  # noqa: PLC0415

    title = f"DePass circuit: {args.model}"
    if args.model in zoo_names() and args.prompt is None:
        batch = zoo.task(args.model).batch(model, args.n, split="test", seed=args.seed)
        if batch.wrong is None:
            raise CommandError(
                f"the {args.model} task has no wrong answers to contrast with; "
                "give --prompt, --target and --wrong"
            )
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


def feature_graph(args: argparse.Namespace) -> int:
    """A feature attribution graph of one prompt, as an explorer page (and JSON)."""
    out = writable(args.out, "--out")
    for extra in (args.json, args.neuronpedia):
        if extra is not None:
            writable(extra, "--json/--neuronpedia")
    if not args.dictionaries and args.model not in zoo_names():
        raise CommandError(
            "give --dictionaries (SAELens or circuit-tracer folders) for a model outside the zoo"
        )
    model = load_model(args.model, args.device)
    import depass_lens as dp  # noqa: PLC0415
    from depass_lens.demo import make_target  # noqa: PLC0415
    from depass_lens.features.report import run_feature_graph, zoo_examples  # noqa: PLC0415

    if args.dictionaries:
        dictionaries = [load_dictionary(path) for path in args.dictionaries]
        examples = None
    else:
        from depass_lens.zoo.saes import dictionary_keys, load_dictionaries  # noqa: PLC0415

        try:
            dictionaries = load_dictionaries(args.model)
        except KeyError as error:
            raise CommandError(f"{_one_line(error)}; give --dictionaries") from None
        layers = [int(k.split(".")[0].removeprefix("L")) for k in dictionary_keys(args.model)]
        depass = dp.DePass(model, progress=False)
        from depass_lens.features.sites import place_sites  # noqa: PLC0415

        sites = place_sites(depass.adapter, dictionaries)
        examples = zoo_examples(args.model, {s.layer: s.name for s in sites if s.layer in layers})
    prompt, target_token, wrong = default_prompt(args.model)
    if args.prompt is not None:
        prompt, target_token, wrong = args.prompt, None, None
    target_token = args.target if args.target is not None else target_token
    wrong = args.wrong if args.wrong is not None else wrong
    target: Any = (
        "top_logits" if target_token is None else make_target(model, target_token, wrong, prompt)
    )
    report = run_feature_graph(
        dp.DePass(model, progress=False),
        prompt,
        target,
        dictionaries,
        out,
        attention=args.attention,
        contrast=args.contrast,
        model_name=args.model,
        examples=examples,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        json_out=args.json,
        neuronpedia_out=args.neuronpedia,
    )
    print(report.summary())
    return 0


def load_dictionary(spec: str) -> Any:
    """A SAELens-format folder, or a circuit-tracer transcoder folder (all its layers)."""
    path = Path(spec)
    if not path.is_dir():
        raise CommandError(f"--dictionaries {spec!r} is not a directory")
    if (path / "config.yaml").exists():
        raise CommandError(
            f"--dictionaries {spec!r} is a circuit-tracer transcoder set: load it with "
            "depass_lens.sae.circuit_tracer_io.load_circuit_tracer_transcoders in Python "
            "(it needs the model to fold the MLP input norm)"
        )
    from depass_lens.sae import load_sae_dir  # noqa: PLC0415

    return load_sae_dir(path)


def evaluate(args: argparse.Namespace) -> int:
    writable(args.out, "--out", directory=True)
    zoo_model(args.model, "eval")
    from depass_lens.evaluation.cli import run_cli  # noqa: PLC0415

    return run_cli(args)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subcommand parsers (by name), for their ``prog`` in error messages."""
    parser = argparse.ArgumentParser(prog="depass-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "a zoo model (offline: ioi, induction, recall, bilingual, binding) or a "
    model_help += "TransformerLens pretrained name (needs internet)"

    p = sub.add_parser("demo", help="write an HTML report of DePass on one prompt")
    p.add_argument("--model", default="ioi", help=model_help)
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
    g.add_argument("--model", default="ioi", help=model_help)
    g.add_argument("--out", default="circuit.html", help="report; .json and .dot beside it")
    g.add_argument(
        "--k", type=positive_int, default=30, help="edges in the circuit (before pruning)"
    )
    g.add_argument("--n", type=positive_int, default=32, help="zoo task prompts")
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

    f = sub.add_parser(
        "feature-graph", help="write an explorer page of a feature (latent) attribution graph"
    )
    f.add_argument("--model", default="ioi", help=model_help)
    f.add_argument("--out", default="feature_graph.html", help="the explorer page")
    f.add_argument("--prompt", default=None, help="default: the zoo task's example prompt")
    f.add_argument("--target", default=None, help="target token; default: the salient logits")
    f.add_argument("--wrong", default=None, help="with --target: explain target - wrong")
    f.add_argument("--contrast", default=None, help="a corrupted prompt of the same length")
    f.add_argument(
        "--attention",
        default="symmetric",
        choices=["value", "pattern", "symmetric"],
        help="value: patterns frozen (circuit-tracer); pattern/symmetric: query and key edges",
    )
    f.add_argument(
        "--dictionaries", nargs="*", default=None, help="SAELens-format folders (default: zoo)"
    )
    f.add_argument("--node-threshold", type=float, default=0.8)
    f.add_argument("--edge-threshold", type=float, default=0.98)
    f.add_argument("--json", default=None, help="also write the graph JSON here")
    f.add_argument(
        "--neuronpedia", default=None, help="also write circuit-tracer/Neuronpedia graph JSON"
    )
    f.add_argument("--device", default="cpu")
    f.set_defaults(func=feature_graph)

    e = sub.add_parser("eval", help="faithfulness evaluation against baselines")
    e.add_argument("--model", default="ioi", help="a zoo model")
    e.add_argument("--level", default="heads", choices=["tokens", "heads", "neurons", "subspace"])
    e.add_argument("--n", type=positive_int, default=32, help="number of task prompts")
    e.add_argument("--out", default="depass_eval", help="directory for the JSON and HTML")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=evaluate)
    return parser, {"demo": p, "graph": g, "feature-graph": f, "eval": e}


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    from depass_lens.errors import DePassError  # noqa: PLC0415 - no heavy imports

    try:
        return int(command(args))
    except (CommandError, DePassError, OSError) as error:
        prog = commands[args.command].prog
        commands[args.command].exit(2, f"{prog}: error: {_one_line(error, 2000)}\n")
    return 2  # unreachable: exit raises SystemExit


if __name__ == "__main__":
    sys.exit(main())

"""The public API and the command line refuse bad arguments by name, never with a raw traceback.

Each public method taking a count ``k``, a prompt ``batch``, a ``target`` index, an edge index, a
``by=`` ranking or a ``split=`` refuses what it cannot use with a :class:`DePassInputError` that
names the value and what is allowed; sources refuse repeated layers, heads and neurons; the zoo's
tokenizer names the words it does not know; the CLI turns all of that, and bad arguments, into a
one-line message with exit status 2, checked before the work where it can be.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import depass_lens as dp
from depass_lens import cli, zoo

ROOT = Path(__file__).parent.parent
PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.fixture(scope="module")
def ioi():
    return zoo.load("ioi")


@pytest.fixture(scope="module")
def heads(ioi):
    """Head scores on two prompts and two targets."""
    prompts = [PROMPT, "When Anna and Bob went to the park , Bob gave a book to"]
    targets = [dp.LogitDiff(["Mary", "Anna"], ["John", "Bob"]), dp.Logit("Mary")]
    return dp.DePass(ioi).attribute(prompts, targets, source=dp.Heads())


@pytest.fixture(scope="module")
def graph(ioi):
    return dp.DePass(ioi).graph(PROMPT, dp.LogitDiff("Mary", "John"))


# ----------------------------------------------------------------------------- command line
def test_import_and_help_load_nothing_heavy():
    """``depass-lens --help`` was ~10-30 s: the package imported torch, TransformerLens and
    plotly eagerly. Now neither ``import depass_lens`` nor the CLI module loads them."""
    code = (
        "import sys, depass_lens, depass_lens.cli; "
        "heavy = {'torch', 'transformer_lens', 'plotly'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for argv in (["--help"], ["graph", "--help"], ["eval", "--help"]):
        code = (
            "import sys; from depass_lens.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage: depass-lens" in result.stdout


def test_lazy_package_keeps_its_public_names():
    names = set(dir(dp))
    assert set(dp.__all__) <= names and {"zoo", "circuits", "evaluation"} <= names
    assert all(getattr(dp, name) is not None for name in dp.__all__)
    from depass_lens import DePass, Heads  # noqa: F401 - from-imports resolve lazily too

    assert dp.DePass is DePass and dp.Heads is Heads
    assert dp.results.Attribution is dp.Attribution  # submodules stay reachable as attributes
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dp.nothing  # noqa: B018
    namespace: dict = {}
    exec("from depass_lens import *", namespace)  # noqa: S102
    assert set(dp.__all__) <= set(namespace)


def test_help_names_every_zoo_model():
    parser, commands = cli.build_parser()
    text = commands["demo"].format_help()
    assert all(name in text for name in zoo.list())


def _fails(argv, capsys, monkeypatch, *, forbid_model=True) -> str:
    """Run the CLI expecting exit status 2; the message (one line, no traceback) is returned."""
    if forbid_model:  # arguments that can be checked up front must not wait for the model

        def no_model(*args, **kwargs):
            raise AssertionError("loaded a model before checking the arguments")

        monkeypatch.setattr(cli, "load_model", no_model)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_cli_unknown_model_names_the_zoo(capsys, monkeypatch):
    from depass_lens.adapters import loading

    def offline(name, device="cpu"):  # what an unknown name does under TL 4 (or offline)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(loading, "load_pretrained", offline)
    message = _fails(["demo", "--model", "bogus"], capsys, monkeypatch, forbid_model=False)
    assert message.startswith("depass-lens demo: error: unknown model 'bogus'")
    assert all(name in message for name in zoo.list())
    assert "TransformerLens pretrained name" in message
    assert len(message) < 500  # not TransformerLens's list of ~300 names
    message = _fails(["eval", "--model", "gpt2-small"], capsys, monkeypatch)
    assert "zoo's models only" in message and "'gpt2-small'" in message


def test_cli_checks_out_before_the_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = _fails(["demo", "--out", str(tmp_path)], capsys, monkeypatch)
    assert "is a directory" in message
    message = _fails(["graph", "--out", str(blocker / "c.html")], capsys, monkeypatch)
    assert "is a file, not a directory" in message
    message = _fails(["eval", "--out", str(blocker)], capsys, monkeypatch)
    assert "is a file; give a directory" in message
    assert cli.writable(tmp_path / "new" / "deeper" / "r.html", "--out")  # parents are made


@pytest.mark.parametrize(
    "argv",
    [
        ["graph", "--n", "0"],
        ["graph", "--k", "-3"],
        ["eval", "--n", "-1"],
        ["graph", "--n", "two"],
    ],
)
def test_cli_refuses_counts_below_one(argv, capsys, monkeypatch):
    message = _fails(argv, capsys, monkeypatch)
    assert re.search(r"argument --[nk]: (must be at least 1|expected a positive integer)", message)


def test_cli_turns_input_errors_into_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r.html")
    argv = ["demo", "--prompt", "When Zebra went to the store", "--out", out]
    message = _fails(argv, capsys, monkeypatch, forbid_model=False)
    assert message.startswith("depass-lens demo: error:") and "'Zebra'" in message
    argv = ["demo", "--sae", "zoo", "--model", "bilingual", "--out", out]
    message = _fails(argv, capsys, monkeypatch)
    assert "ships an SAE for" in message and "not 'bilingual'" in message
    message = _fails(["demo", "--sae", str(tmp_path / "none"), "--out", out], capsys, monkeypatch)
    assert "not a directory" in message
    eval_argv = ["eval", "--level", "subspace", "--model", "ioi", "--out", str(tmp_path)]
    message = _fails(eval_argv, capsys, monkeypatch, forbid_model=False)
    assert "needs a zoo model with a probe (bilingual)" in message


# ----------------------------------------------------------------------------- attributions
def test_top_refuses_bad_k_batch_target_and_by(heads):
    for kwargs, match in [
        ({"k": -1}, "k must be at least 1, got -1"),
        ({"k": 0}, "k must be at least 1"),
        ({"k": 2.5}, "k must be an int"),
        ({"batch": 5}, r"batch 5 is out of range for 2 prompt\(s\): valid 0..1"),
        ({"target": 2}, "target 2 is out of range for the targets"),
        ({"by": "bogus"}, "by must be one of 'abs', 'signed', got 'bogus'"),
    ]:
        with pytest.raises(dp.DePassInputError, match=match):
            heads.top(**kwargs)
    # what is accepted still means what it says: signed ranks by value, negatives index from
    # the end
    signed = heads.top(3, batch=1, target=1, by="signed")
    values = [v for _, v in signed]
    assert values == sorted(values, reverse=True)
    head_scores = heads.of_kind("head")[1, 1]
    assert values[0] == pytest.approx(float(head_scores.max()), rel=1e-6)
    assert heads.top(3, batch=-1, target=-1) == heads.top(3, batch=1, target=1)


def test_neurons_of_a_missing_layer_is_refused(ioi):
    neurons = dp.DePass(ioi).attribute(PROMPT, dp.LogitDiff("Mary", "John"), dp.Neurons(1))
    assert neurons.neurons(1).shape[-1] == ioi.cfg.d_mlp
    with pytest.raises(dp.DePassInputError, match=r"layer 2 has no neurons .* \[1\]"):
        neurons.neurons(2)


def test_plots_refuse_bad_indices(heads, graph):
    with pytest.raises(dp.DePassInputError, match="batch 7 is out of range"):
        dp.plot.heads(heads, batch=7)
    with pytest.raises(dp.DePassInputError, match="target 3 is out of range"):
        dp.plot.heads(heads, target=3)
    with pytest.raises(dp.DePassInputError, match="batch 2 is out of range"):
        dp.plot.attention_shares(heads, batch=2)
    with pytest.raises(dp.DePassInputError, match="no 'neuron' components"):
        dp.plot.neurons(heads)
    with pytest.raises(dp.DePassInputError, match="no 'token' components"):
        dp.plot.tokens(heads)
    with pytest.raises(dp.DePassInputError, match="k must be at least 1, got -2"):
        dp.plot.graph(graph, k=-2)
    with pytest.raises(dp.DePassInputError, match="target 1 is out of range"):
        dp.plot.graph(graph, target=1)
    assert len(dp.plot.heads(heads, batch=-1, target=-1).data) == 1


# ----------------------------------------------------------------------------- graphs
def test_graph_refuses_bad_indices_and_counts(graph):
    n = graph.n_edges
    with pytest.raises(dp.DePassInputError, match=f"edge index {10**9} is out of range for {n}"):
        graph.edge_name(10**9)
    assert graph.edge_name(-1) == graph.edge_name(n - 1)
    for call in (
        lambda: graph.to_json(target=5),
        lambda: graph.to_dict(target=1),
        lambda: graph.node_table(target=1),
        lambda: graph.scores(target=-2),
        lambda: graph.circuit(k=3, target=1),
    ):
        with pytest.raises(dp.DePassInputError, match="target .* is out of range"):
            call()
    for call in (lambda: graph.to_dot(k=-1), lambda: graph.top(k=-1), lambda: graph.top(k=0)):
        with pytest.raises(dp.DePassInputError, match="k must be at least 1"):
            call()
    # k counts edges: to_dot(k=5) draws five, top(5) names five, the largest |score| first
    assert graph.to_dot(k=5).count(" -> ") == 5
    top = graph.top(5)
    assert len(top) == 5 and abs(top[0][1]) >= abs(top[-1][1])


# ----------------------------------------------------------------------------- sources
def test_a_string_source_names_the_source_objects(ioi):
    depass = dp.DePass(ioi)
    target = dp.LogitDiff("Mary", "John")
    with pytest.raises(dp.DePassInputError, match=r"source='heads' is not a source; .*dp\.Heads"):
        depass.attribute(PROMPT, target, source="heads")
    with pytest.raises(dp.DePassInputError, match="'neurons' is not a source"):
        depass.attribute(PROMPT, target, source=[dp.Heads(), "neurons"])
    with pytest.raises(dp.DePassInputError, match="source=3 is not a source"):
        depass.attribute(PROMPT, target, source=3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dp.Heads([0, 0]), r"Heads: layers \[0\] given more than once"),
        (lambda: dp.Heads(1, heads=[2, 1, 2]), r"Heads: heads \[2\] given more than once"),
        (lambda: dp.Neurons(0, neurons=[3, 3]), r"Neurons: neurons \[3\] given more than once"),
        (lambda: dp.Neurons([1, 1]), r"Neurons: layers \[1\] given more than once"),
        (lambda: dp.Modules([2, 2]), r"Modules: layers \[2\] given more than once"),
        (lambda: dp.Heads(heads=[]), "Heads: heads: an empty list selects nothing"),
        (lambda: dp.Heads(heads=[1.5]), "Heads: heads must be an int, got 1.5"),
        (lambda: dp.Neurons("1"), "Neurons: layers must be ints, got '1'"),
    ],
)
def test_sources_refuse_repeats_and_non_ints(make, match):
    with pytest.raises(dp.DePassInputError, match=match):
        make()


def test_sources_refuse_repeats_after_negative_layers_and_out_of_range(ioi):
    depass = dp.DePass(ioi)  # 3 layers, 4 heads
    target = dp.LogitDiff("Mary", "John")
    with pytest.raises(dp.DePassInputError, match=r"Heads: layers \[2\] given more than once"):
        depass.attribute(PROMPT, target, dp.Heads([2, -1]))
    with pytest.raises(dp.DePassInputError, match="layer 3 is out of range"):
        depass.attribute(PROMPT, target, dp.Modules([0, 3]))
    with pytest.raises(dp.DePassInputError, match="head 4 out of range"):
        depass.attribute(PROMPT, target, dp.Heads(0, heads=[4]))
    # a distinct selection scores each head once: [0, 2] on layer 1 are those heads of Heads(1)
    some = depass.attribute(PROMPT, target, dp.Heads(torch.tensor([1]), heads=(2, 0)))
    every = depass.attribute(PROMPT, target, dp.Heads(1))
    assert [str(label) for label in some.labels[:2]] == ["L1H2", "L1H0"]
    torch.testing.assert_close(some.scores[..., :2], every.scores[..., [2, 0]])


# ----------------------------------------------------------------------------- zoo
def test_task_batches_refuse_bad_split_and_n(ioi):
    task = zoo.task("ioi")
    with pytest.raises(dp.DePassInputError, match="split must be one of 'train', 'test'"):
        task.batch(ioi, 4, split="bogus")
    with pytest.raises(dp.DePassInputError, match="n must be at least 1, got 0"):
        task.batch(ioi, 0)
    with pytest.raises(dp.DePassInputError, match="split must be one of"):
        task.examples(3, split="Test")
    train, test = task.examples(50, "train"), task.examples(50, "test")
    assert {(e.answer, e.wrong) for e in train}.isdisjoint({(e.answer, e.wrong) for e in test})


def test_zoo_tokenizer_names_unknown_words_and_splits_known_marks(ioi):
    with pytest.raises(dp.DePassInputError, match=r"does not know 'Zebra', 'store;'") as info:
        dp.DePass(ioi).attribute("When Zebra went to the store; then", dp.Logit("Mary"))
    assert "vocabulary of its" in str(info.value) and "get_vocab()" in str(info.value)
    with pytest.raises(dp.DePassInputError, match="does not know 'Zebra'"):
        ioi.to_tokens(["Mary and John", "Zebra"])  # batches too
    # "store," is the two words "store" ","; the ids are those of the spaced prompt
    glued = PROMPT.replace(" ,", ",")
    assert torch.equal(ioi.to_tokens(glued), ioi.to_tokens(PROMPT))
    binding = zoo.load("binding")
    marks = binding.to_str_tokens("a ->; b?")  # its marks are ";" and "?"; "->" is one word
    assert [t for t in marks if t in (";", "?", "->")] == ["->", ";", "?"]


def test_readme_quickstart_runs_on_the_zoo_model(monkeypatch):
    """The README's quickstart offers ``dp.zoo.load("ioi")`` offline: its code runs on it, with
    the values its own comments give for the zoo model."""
    import plotly.graph_objects as go

    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: None)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    model_line = re.search(r"^model = .*# or (dp\.zoo\.load\(\"ioi\"\)).*$", code, re.MULTILINE)
    code = code.replace(model_line.group(0), f"model = {model_line.group(1)}")
    # HookedTransformer, imported for the pretrained line only, is gone from TransformerLens 4
    code = code.replace("from transformer_lens import HookedTransformer\n", "")
    zoo_line = re.search(r"^(.*?) = [^#\n]*# zoo ioi: (.*)$", code, re.MULTILINE)
    code = code.replace(zoo_line.group(0), f"{zoo_line.group(1)} = {zoo_line.group(2)}")
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)  # noqa: S102
    assert namespace["heads"].completeness_error() < 1e-4
    assert namespace["steer"].completeness_error() < 1e-4
    assert max(namespace["graph"].conservation().values()) < 1e-4

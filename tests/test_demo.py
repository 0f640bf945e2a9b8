"""The demo report on a small text model (the zoo-based CLI is tested in test_cli.py)."""

from __future__ import annotations

import torch

from depass_lens.demo import make_target, run_demo
from tests.conftest import make_text_model


def test_demo_report_has_every_figure(tmp_path):
    model = make_text_model("gpt2", torch.float32)
    prompt = "When Mary and John went to the store , John gave a drink to"
    result = run_demo(
        model, prompt, make_target(model, "Mary", "John", prompt), tmp_path / "r.html"
    )
    page = result.path.read_text()
    headings = ("Token attribution", "Head attribution", "Top neurons", "Layer by layer", "Circuit")
    for heading in headings:
        assert heading in page
    assert page.count("plotly.js") >= 1 and page.count('class="plotly-graph-div"') == 5
    assert result.completeness_error < 1e-5
    assert len(result.top_heads) == 5 and "target:" in result.summary()

"""Feature circuits: attribution graphs over dictionary latents, attention edges included.

>>> graph = dp_model.feature_graph(prompt, dp.LogitDiff(" Mary", " John"),
...                                dictionaries=zoo.load_dictionaries("ioi"), attention="symmetric")
>>> graph.check()                  # {'latents': 3e-7, 'targets': 1e-7, 'kinds': ...}
>>> graph.edge_table().head()      # source, target, weight, value / query / key parts
"""

from depass_lens.features.graph import FeatureGraph
from depass_lens.features.nodes import FeatureNode
from depass_lens.features.sites import Site, place_sites

__all__ = ["FeatureGraph", "FeatureNode", "Site", "place_sites"]

"""Sparse autoencoder and transcoder latents as DePass sources and targets.

``SAELatents(sae)`` splits the stream at an SAE's hook into its active latents' decoder
contributions, the reconstruction error and ``b_dec`` (lossless); ``SAELatent(sae, i, pos)`` is a
latent's pre-activation as a target. Both read any SAE through a duck-typed protocol
(:func:`as_sae_view`), so SAELens is optional. ``SimpleSAE`` is a dependency-free SAE in SAELens's
on-disk format (the zoo's shipped SAEs load as one). ``CrossLayerTranscoder`` (one encoder per
layer, decoders into every later layer) is what feature graphs read for cross-layer transcoders.
"""

from depass_lens.sae.cross_layer import CrossLayerTranscoder, load_circuit_tracer_clt
from depass_lens.sae.simple import SimpleSAE, load_sae_dir, save_sae_dir
from depass_lens.sae.source import LatentLabel, SAELatents
from depass_lens.sae.target import SAELatent
from depass_lens.sae.view import SAEView, as_sae_view

__all__ = [
    "CrossLayerTranscoder",
    "LatentLabel",
    "SAELatent",
    "SAELatents",
    "SAEView",
    "SimpleSAE",
    "as_sae_view",
    "load_circuit_tracer_clt",
    "load_sae_dir",
    "save_sae_dir",
]

"""The embedded synthetic biomedical dataset whose answers are decided by the pixels: ``medvlm data synth``.

- :mod:`.dataset` writes every file a LLaVA-Med-style pipeline consumes, and the blind (text-only) baseline;
- :mod:`.render` draws the images from :class:`~medvlm.data.synth.render.Factors`;
- :mod:`.text` the questions, answers, captions and conversations, functions of those factors.
"""

from medvlm.data.synth.dataset import SynthManifest, baseline_table, blind_baseline, generate_synth

__all__ = ["SynthManifest", "baseline_table", "blind_baseline", "generate_synth"]

"""Evaluation (layer 5): VQA scoring protocols (``protocols``: LLaVA-Med's scorers reproduced, ``strict`` and
``exact-match``), the GPT-judged chat benchmark (``judge``, ``chat_summary``) and run reports (``report``).

Import from the submodules; this package module stays empty so that ``medvlm --help`` does not pay for
numpy/nltk/matplotlib.
"""

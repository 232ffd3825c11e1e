"""The public VQA benchmarks (VQA-RAD, SLAKE, PathVQA) as LLaVA-Med's VQA files, and grouping VQA records.

- :mod:`.hub` finds a release as users have it (public release, hub parquet copy, datasets cache) and converts it;
- :mod:`.convert` the per-dataset converters to ``train.json`` / ``test.json`` and ``images/``;
- :mod:`.zip_images` bounded reads of named images from a zip (SLAKE's ``imgs.zip``);
- :mod:`.group` merges each image's single-question records into one multi-turn training conversation.
"""

from medvlm.data.benchmarks.convert import DATASETS, convert_vqa
from medvlm.data.benchmarks.group import GroupStats, group_by_image, group_file
from medvlm.data.benchmarks.hub import HUB_REPOS, convert_benchmark, locate

__all__ = [
    "DATASETS",
    "HUB_REPOS",
    "GroupStats",
    "convert_benchmark",
    "convert_vqa",
    "group_by_image",
    "group_file",
    "locate",
]

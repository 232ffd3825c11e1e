"""The frozen-tower feature cache skips the work it exists to skip: once an image's features are cached,
later epochs neither open/decode that image nor run the vision tower."""

from __future__ import annotations

import json

from transformers import TrainerCallback

import medvlm.data.images as images
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config


class WorkPerEpoch(TrainerCallback):
    """Counts image decodes and vision-tower forwards per epoch (0-based)."""

    def __init__(self):
        self.epoch = 0
        self.decodes: dict[int, int] = {}
        self.tower: dict[int, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.vision_tower.register_forward_hook(lambda *a: self.count(self.tower))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(state.epoch or 0)
        self.decodes.setdefault(self.epoch, 0)
        self.tower.setdefault(self.epoch, 0)

    def count(self, table: dict[int, int]) -> None:
        table[self.epoch] = table.get(self.epoch, 0) + 1


def test_cached_epochs_decode_no_image_and_skip_the_tower(tmp_path, monkeypatch):
    demo = make_demo(tmp_path)
    data = tmp_path / "align8.json"
    data.write_text(json.dumps(json.loads((demo / "alignment.json").read_text())[:8]))
    work = WorkPerEpoch()
    real_load = images.load_image  # what every processor's image loading calls (data.images.load_sample_images)

    def counting_load(path):
        work.count(work.decodes)
        return real_load(path)

    monkeypatch.setattr(images, "load_image", counting_load)
    r = run_training(
        small_config(
            demo,
            tmp_path / "run",
            stage="align",
            data_path=str(data),
            max_steps=-1,
            num_train_epochs=3,
            feature_cache="on",
            feature_cache_dir=str(tmp_path / "features"),
        ),
        callbacks=[work],
    )
    assert r.cache_by_epoch[0] == {"hits": 0, "misses": 8}
    assert work.decodes[0] == 8 and work.tower[0] == 2  # every image decoded once; one tower call per micro-batch
    assert work.decodes[1] == work.decodes[2] == 0
    assert work.tower[1] == work.tower[2] == 0

"""`minivit inspect`: every analysis produces a PNG of the expected size, from a tiny model."""
import numpy as np
from PIL import Image

from minivit.config import get_config
from minivit.figures import ANALYSES, inspect_model
from minivit.model import init_params
from minivit.tree import flatten, unflatten


def test_inspect_model_writes_every_png(tmp_path):
    cfg = get_config("test", image_size=16, patch_size=4)            # grid 4x4, 2 layers, 3 heads
    rng = np.random.default_rng(0)
    params = unflatten({k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1
                        for k, v in flatten(init_params(cfg)).items()})
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    results = inspect_model(params, cfg, images, lambda x: (x.astype(np.float32) - 127.5) / 127.5, tmp_path)
    assert set(results) == set(ANALYSES)
    for name, (path, numbers) in results.items():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= 100, (name, im.size)
    assert results["distance"][1]["distance"].shape == (cfg.depth, cfg.heads)
    assert results["posemb"][1]["similarity"].shape == (4, 4, 4, 4)
    assert results["rollout"][1]["rollout"].shape == (5, 4, 4)
    only = inspect_model(params, cfg, images, lambda x: x.astype(np.float32), tmp_path / "b", ["filters"])
    assert list(only) == ["filters"]

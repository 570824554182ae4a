"""The training loop: overfitting, exact resume (also after Ctrl-C mid-epoch), NaN and checkpoint errors."""
import json
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest

from minivit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minivit.config import get_config
from minivit.data.dataset import Dataset
from minivit.model import init_params
from minivit.train import TrainConfig, TrainingError, TrainingInterrupted, _checkpoint_step, train
from minivit.tree import flatten

from conftest import install_standin, without_key_bias



def tiny_data(n=32, k=4, seed=0, size=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % k
    return Dataset("tiny", x, y, x.copy(), y.copy(), classes=[f"c{i}" for i in range(k)])


def tiny_config(tmp_path, **kw):
    base = dict(dataset="tiny", model="test", epochs=3, batch_size=8, lr=3e-3, weight_decay=0.0,
                label_smoothing=0.0, augment="none", out=str(tmp_path / "run"), warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_model_overfits_32_images(tmp_path):
    tc = tiny_config(tmp_path, epochs=60, batch_size=16, lr=5e-3, model_overrides={"width": 24, "heads": 3,
                                                                                     "mlp_dim": 48})
    result = train(tc, data=tiny_data(), progress=False, log=None)
    assert result.history[-1]["test_acc"] == 1.0          # the "test" split is the training set here
    assert result.history[-1]["train_loss"] < 0.2
    for name in ("last.npz", "best.npz", "log.jsonl", "config.json"):
        assert (result.run_dir / name).exists()


def final_params(run_dir):
    params, _, _ = load_checkpoint(run_dir / "last.npz")
    return flatten(params)


def test_resume_after_max_steps_is_bit_identical(tmp_path):
    data = tiny_data(n=40)
    full = train(tiny_config(tmp_path / "a", model_overrides={"dropout": 0.1, "drop_path": 0.1}, crop_pad=1,
                             augment="default", flip=True),
                 data=tiny_data(n=40), progress=False, log=None)
    cut = tiny_config(tmp_path / "b", model_overrides={"dropout": 0.1, "drop_path": 0.1}, crop_pad=1,
                      augment="default", flip=True, max_steps=7)       # 5 updates per epoch: stops mid-epoch 2
    part = train(cut, data=data, progress=False, log=None)
    assert part.steps == 7
    resumed = train(None, resume=part.run_dir, data=tiny_data(n=40), progress=False, log=None)
    assert resumed.steps == full.steps == 15
    a, b = final_params(full.run_dir), final_params(resumed.run_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path):
    full = train(tiny_config(tmp_path / "a"), data=tiny_data(), progress=False, log=None)

    def interrupt(step, loss, params):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)              # what Ctrl-C does

    with pytest.raises(TrainingInterrupted, match="resume with: minivit train --resume") as e:
        train(tiny_config(tmp_path / "b"), data=tiny_data(), progress=False, log=None, on_step=interrupt)
    _, _, meta = load_checkpoint(e.value.path)
    progress = meta["progress"]
    assert {k: progress[k] for k in ("step", "epoch", "batch", "seed")} == {"step": 6, "epoch": 1, "batch": 2, "seed": 0}
    assert progress["epoch_sums"]["seen"] == 16                          # the epoch's 2 batches of 8 so far
    resumed = train(None, resume=tmp_path / "b" / "run", data=tiny_data(), progress=False, log=None)
    a, b = final_params(full.run_dir), final_params(resumed.run_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for key in ("train_loss", "train_acc", "test_acc"):   # the resumed epoch's line covers the whole epoch
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history]


def test_a_new_run_in_a_used_folder_keeps_nothing_of_the_old_one(tmp_path):
    old = train(tiny_config(tmp_path, model_overrides={"width": 24}), data=tiny_data(), progress=False, log=None)

    def interrupt(step, loss, params):
        os.kill(os.getpid(), signal.SIGINT)

    def poison(step, loss, params):
        params["head"]["w"][...] = np.nan

    with pytest.raises(TrainingError):              # a new run that fails before writing anything removes nothing
        train(tiny_config(tmp_path), data=tiny_data(), progress=False, log=None, on_step=poison)
    assert {p.name for p in old.run_dir.iterdir()} >= {"best.npz", "last.npz", "log.jsonl"}
    with pytest.raises(TrainingInterrupted):        # stopped before its first evaluation: no best.npz of its own
        train(tiny_config(tmp_path), data=tiny_data(), progress=False, log=None, on_step=interrupt)
    assert not (old.run_dir / "best.npz").exists() and not (old.run_dir / "log.jsonl").exists()
    _, cfg, _ = load_checkpoint(old.run_dir / "last.npz")
    assert cfg.width == 12                          # the new run's


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    def poison(step, loss, params):
        if step == 5:
            params["head"]["w"][...] = np.nan

    with pytest.raises(TrainingError, match=r"loss became nan at update 6 .* last good checkpoint is .*last.npz "
                                            r"\(update 4\)"):
        train(tiny_config(tmp_path), data=tiny_data(), progress=False, log=None, on_step=poison)
    params, _, _ = load_checkpoint(tmp_path / "run" / "last.npz")   # the saved checkpoint is intact
    assert np.isfinite(params["head"]["w"]).all()



def test_resume_goes_on_in_its_folder_keeps_its_meta_and_names_its_checkpoint(tmp_path):
    """A resumed run writes into the folder it is resumed from (here moved since), keeps what its checkpoints'
    meta carried (e.g. finetuned_from), cuts the log back to the checkpoint it starts from, and a non-finite loss
    after the resume names that checkpoint as the last good one."""
    part = train(tiny_config(tmp_path / "a", epochs=3, max_steps=7), data=tiny_data(), progress=False, log=None,
                 meta_extra={"finetuned_from": "base.npz"})
    moved = tmp_path / "moved"
    part.run_dir.rename(moved)
    shutil.copy(moved / "last.npz", moved / "update7.npz")
    resumed = train(TrainConfig(epochs=6), resume=moved, data=tiny_data(), progress=False, log=None)
    assert resumed.run_dir == moved and not (tmp_path / "a" / "run").exists()
    _, _, meta = load_checkpoint(moved / "last.npz")
    assert meta["progress"]["step"] == 24 and meta["finetuned_from"] == "base.npz"
    assert meta["train"]["out"] == str(moved)

    # back to an earlier checkpoint: the log loses its later lines (and does not get them twice), and a best.npz
    # saved after that checkpoint, by updates now abandoned, goes
    assert _checkpoint_step(moved / "best.npz") > 12
    train(None, resume=moved / "update7.npz", data=tiny_data(), progress=False, log=None)   # to epoch 3's end
    assert _checkpoint_step(moved / "best.npz") <= 12
    lines = [json.loads(line) for line in (moved / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in lines] == [4, 7, 8, 12]   # epoch 1, the --max-steps stop in epoch 2, epochs 2 and 3
    assert [h.get("partial", False) for h in lines] == [False, True, False, False]

    def poison(step, loss, params):
        params["head"]["w"][...] = np.nan
    cut = train(tiny_config(tmp_path / "b", max_steps=2), data=tiny_data(), progress=False, log=None)
    with pytest.raises(TrainingError, match=r"loss became nan at update 4 .* last good checkpoint is .*last.npz "
                                            r"\(update 2\)"):
        train(None, resume=cut.run_dir, data=tiny_data(), progress=False, log=None, on_step=poison)


def test_resume_from_another_folder_reads_the_same_data(tmp_path, monkeypatch):
    """A relative --data-dir is recorded as the absolute folder, so a resume started elsewhere finds the data."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    kw = dict(dataset="shapes", n_train=32, n_test=16, model="test", image_size=8, epochs=2, max_steps=2,
              batch_size=16, data_dir="reldata", out="run")
    part = train(TrainConfig(**kw), progress=False, log=None)
    monkeypatch.chdir(tmp_path / "b")
    resumed = train(None, resume=tmp_path / "a" / "run", progress=False, log=None)
    assert resumed.steps == 4 and not (tmp_path / "b" / "reldata").exists()
    assert part.steps == 2
    _, _, meta = load_checkpoint(tmp_path / "a" / "run" / "last.npz")
    assert meta["train"]["data_dir"] == meta["data"]["data_dir"] == str(tmp_path / "a" / "reldata")


def test_checkpoint_errors(tmp_path):
    cfg = get_config("test")
    path = tmp_path / "ck.npz"
    save_checkpoint(path, init_params(cfg), cfg)
    params, cfg2, meta = load_checkpoint(path)
    assert cfg2 == cfg and meta["format"] == "minivit-checkpoint"
    with pytest.raises(CheckpointError, match="different model .*width: checkpoint 12 vs expected 24"):
        load_checkpoint(path, expect_cfg=cfg.replace(width=24))
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.npz is truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="junk.npz is truncated or corrupt"):
        load_checkpoint(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:     # a valid npz that is not ours
        z.writestr("x.npy", b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.npz")


def test_resume_into_a_different_model_is_refused(tmp_path):
    result = train(tiny_config(tmp_path, epochs=1), data=tiny_data(), progress=False, log=None)
    with pytest.raises(ValueError, match="4 classes but the model's head has 7"):
        params, cfg, _ = load_checkpoint(result.run_dir / "last.npz")
        train(tiny_config(tmp_path / "x"), params=params, cfg=cfg.replace(num_classes=7), data=tiny_data(),
              progress=False, log=None)


def test_linear_probe_resumes_bit_identical(tmp_path):
    """freeze_backbone keeps optimizer state for the head alone; a resume rebuilds it from that (it used to look
    for the position embedding among the head's parameters)."""
    full = train(tiny_config(tmp_path / "a", freeze_backbone=True), data=tiny_data(), progress=False, log=None)
    part = train(tiny_config(tmp_path / "b", freeze_backbone=True, max_steps=5), data=tiny_data(), progress=False,
                 log=None)
    resumed = train(None, resume=part.run_dir, data=tiny_data(), progress=False, log=None)
    assert resumed.steps == full.steps == 12
    a, b = final_params(full.run_dir), final_params(resumed.run_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = train(tiny_config(tmp_path / "a", epochs=1, batch_size=16), data=tiny_data(), progress=False, log=None)
    b = train(tiny_config(tmp_path / "b", epochs=1, batch_size=16, accum_steps=4), data=tiny_data(),
              progress=False, log=None)
    pa, pb = final_params(a.run_dir), final_params(b.run_dir)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_training_from_given_params_leaves_them_untouched(tmp_path):
    cfg = get_config("test", num_classes=4)
    params = init_params(cfg, seed=0)
    before = {k: v.copy() for k, v in flatten(params).items()}
    train(tiny_config(tmp_path, epochs=1), params=params, cfg=cfg, data=tiny_data(), progress=False, log=None)
    assert all(np.array_equal(before[k], v) for k, v in flatten(params).items())


def test_gpu_training_and_resume_run_with_numpy_standing_in_for_cupy(tmp_path, monkeypatch):
    """The training loop's GPU lines (parameters and batches moved to the device, the fused kernels, checkpoints
    written from device arrays, a resume loaded onto the device), with NumPy standing in for CuPy: the same
    training as on the CPU, up to the kernels' rounding."""
    kw = dict(model_overrides={"dropout": 0.1, "drop_path": 0.1}, crop_pad=1, augment="default", flip=True)
    cpu = train(tiny_config(tmp_path / "cpu", **kw), data=tiny_data(n=40), progress=False, log=None)
    fake = install_standin(monkeypatch)
    part = train(tiny_config(tmp_path / "gpu", device="gpu", max_steps=7, **kw), data=tiny_data(n=40),
                 progress=False, log=None)
    gpu = train(None, resume=part.run_dir, data=tiny_data(n=40), progress=False, log=None)
    assert {"adam", "bias_gelu_tanh_value_deriv"} <= set(fake.calls)
    assert gpu.steps == cpu.steps == 15
    assert gpu.history[-1]["train_loss"] == pytest.approx(cpu.history[-1]["train_loss"], rel=1e-4)
    a, b = without_key_bias(final_params(cpu.run_dir)), without_key_bias(final_params(gpu.run_dir))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)

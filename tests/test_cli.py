"""The command line end to end, in process (`minivit.cli.main`): every command on a tiny model and a small draw of
the embedded shapes data, what it prints and what it writes, and the one-line errors a user sees for bad input.
The workflow runs twice: on the CPU, and with --device gpu where NumPy stands in for CuPy (tests/fake_cupy.py),
which runs every command's GPU lines without a GPU."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import minivit.cli
import minivit.reference
from minivit.checkpoint import load_checkpoint
from minivit.cli import main
from minivit.data import load_dataset
from minivit.data.checkpoint_data import normalizer_from_meta
from minivit.fewshot import fewshot_model
from minivit.inference import predict_files

from conftest import install_standin


SHAPES = ["--dataset", "shapes", "--n-train", "64", "--n-test", "32"]
TINY = ["--model", "shapes-small", "--width", "16", "--depth", "2", "--heads", "2", "--mlp-dim", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One folder for the shapes draw, shared by the module's tests (it is drawn once, then read)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(params=["cpu", "gpu"])
def device_flag(request, monkeypatch):
    """--device cpu, or --device gpu with NumPy standing in for CuPy (its kernel calls recorded in .calls)."""
    if request.param == "gpu":
        fake = install_standin(monkeypatch)
        return ["--device", "gpu"], fake
    return ["--device", "cpu"], None


def cli(capsys, *argv):
    """Run `minivit ARGV...` in process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_train_then_every_command_on_its_checkpoint(tmp_path, data_dir, device_flag, capsys):
    device, fake = device_flag
    data = [*SHAPES, "--data-dir", data_dir]
    run = tmp_path / "run"
    status, out, err = cli(capsys, "train", *data, *TINY, "--epochs", "1", "--max-steps", "3", "--batch-size", 16,
                           "--quiet", "--out", run, *device)
    assert status == 0, err
    assert "done: 3 updates" in out and f"run folder: {run}" in out
    assert {p.name for p in run.iterdir()} >= {"last.npz", "best.npz", "log.jsonl", "config.json"}
    assert json.loads((run / "config.json").read_text())["train"]["device"] == device[1]
    if fake is not None:
        assert {"adam", "bias_gelu_tanh_value_deriv"} <= set(fake.calls)      # the GPU kernels ran

    # --resume goes on to the end of the epoch (64 images / 16 = 4 updates)
    status, out, err = cli(capsys, "train", "--resume", run, "--quiet", *device)
    assert status == 0, err
    assert "done: 4 updates" in out
    ckpt = run / "last.npz"
    _, cfg, meta = load_checkpoint(ckpt)
    assert meta["progress"]["step"] == 4 and cfg.width == 16

    status, out, err = cli(capsys, "eval", ckpt, *device)   # the run's own shapes draw, from where it read it
    assert status == 0, err
    assert f"{ckpt} on shapes test split (32 images, 32x32): accuracy" in out
    assert sum(line.split()[0] in meta["data"]["classes"] for line in out.splitlines()[3:]) == 10

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    status, out, err = cli(capsys, "predict", ckpt, image, "--top-k", 3, *device)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    printed = [(line.split()[1], float(line.split("%")[0])) for line in lines[1:]]
    params, cfg, _ = load_checkpoint(ckpt)                  # what the library gives for this checkpoint and image
    [(_, top)] = predict_files(params, cfg, [image], normalizer_from_meta(meta["data"]), meta["data"]["classes"], 3)
    assert [name for name, _ in printed] == [name for name, _ in top]
    assert all(abs(p - 100 * q) < 0.006 for (_, p), (_, q) in zip(printed, top)), (printed, top)

    figures = tmp_path / "figures"
    status, out, err = cli(capsys, "inspect", ckpt, *data, "--num-images", 4, "--out", figures, *device)
    assert status == 0, err
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == ["attention_distance.png", "attention_maps.png", "embedding_filters.png",
                    "pos_embed_similarity.png", "rollout.png"]
    for name in pngs:
        with Image.open(figures / name) as im:
            assert im.format == "PNG" and min(im.size) > 32

    status, out, err = cli(capsys, "fewshot", ckpt, *data, "--shots", "1,2", "--seeds", 1, *device)
    assert status == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    ds = load_dataset("shapes", data_dir=data_dir, image_size=32, n_train=64, n_test=32, progress=False)
    want = fewshot_model(params, cfg, ds, normalizer_from_meta(meta["data"]), (1, 2), (0,))
    assert [float(r[1]) for r in rows] == [round(w["accuracy"], 4) for w in want], (rows, want)

    tuned = tmp_path / "finetuned"
    status, out, err = cli(capsys, "finetune", "--from", ckpt, *data, "--image-size", 48, "--max-steps", 2,
                           "--batch-size", 16, "--quiet", "--out", tuned, *device)
    assert status == 0, err
    assert "fine-tuning" in out and "at 48x48 (grid 6x6" in out and "done: 2 updates" in out
    params, cfg, _ = load_checkpoint(tuned / "last.npz")
    assert cfg.image_hw == (48, 48) and params["pos_embed"].shape == (1, 37, 16)


def test_resume_takes_epochs_max_steps_and_device_from_the_command_line(tmp_path, data_dir, capsys, monkeypatch):
    install_standin(monkeypatch)
    run = tmp_path / "run"
    status, out, err = cli(capsys, "train", *SHAPES, "--data-dir", data_dir, *TINY, "--epochs", 2, "--max-steps", 3,
                           "--batch-size", 16, "--quiet", "--out", run, "--device", "gpu")
    assert status == 0 and "done: 3 updates" in out, err
    status, out, err = cli(capsys, "train", "--resume", run, "--max-steps", 5, "--device", "cpu", "--quiet")
    assert status == 0 and "done: 5 updates" in out, err                  # a GPU run goes on on the CPU
    _, _, meta = load_checkpoint(run / "last.npz")
    assert meta["train"]["device"] == "cpu" and meta["progress"]["step"] == 5
    status, out, err = cli(capsys, "train", "--resume", run, "--epochs", 3, "--quiet")
    assert status == 0 and "done: 12 updates" in out, err                 # 64 images / 16 = 4 updates an epoch

    # a fine-tune given no data flags reads, and records, the data its base read: its resume reads them again
    tuned = tmp_path / "tuned"
    status, out, err = cli(capsys, "finetune", "--from", run / "last.npz", "--epochs", 2, "--max-steps", 2,
                           "--batch-size", 16, "--quiet", "--out", tuned)
    assert status == 0, err
    _, _, meta = load_checkpoint(tuned / "last.npz")
    assert (meta["train"]["n_train"], meta["train"]["n_test"]) == (64, 32)
    assert meta["train"]["data_dir"] == str(data_dir.resolve())
    status, out, err = cli(capsys, "finetune", "--resume", tuned, "--quiet")
    assert status == 0 and "done: 8 updates" in out, err
    status, out, err = cli(capsys, "finetune", "--from", run / "last.npz", "--out", run)
    assert status == 2 and "is the folder of the checkpoint to fine-tune from" in err


def test_pretrain_mpp_then_finetune_from_it(tmp_path, data_dir, device_flag, capsys):
    device, _ = device_flag
    data = [*SHAPES, "--data-dir", data_dir]
    status, out, err = cli(capsys, "pretrain-mpp", *data, *TINY, "--max-steps", 2, "--batch-size", 16, "--quiet",
                           "--out", tmp_path / "mpp", *device)
    assert status == 0, err
    assert "colour accuracy on corrupted test patches" in out
    status, out, err = cli(capsys, "eval", tmp_path / "mpp" / "last.npz", *data, *device)
    assert status == 2 and "masked patch prediction checkpoint: its classification head is untrained" in err
    status, out, err = cli(capsys, "finetune", "--from", tmp_path / "mpp" / "last.npz", *data, "--max-steps", 2,
                           "--batch-size", 16, "--quiet", "--out", tmp_path / "ft", *device)
    assert status == 0, err
    assert "new zero head" in out
    params, cfg, _ = load_checkpoint(tmp_path / "ft" / "last.npz")
    assert cfg.num_classes == 10 and params["head"]["w"].shape == (16, 10)


def test_eval_warns_when_the_data_name_other_classes(tmp_path, data_dir, capsys):
    status, out, err = cli(capsys, "train", *SHAPES, "--data-dir", data_dir, *TINY, "--max-steps", 1,
                           "--batch-size", 16, "--quiet", "--out", tmp_path / "run")
    assert status == 0, err
    rng = np.random.default_rng(0)
    for k in range(10):                                # a folder data set with 10 classes of other names
        (tmp_path / "photos" / f"kind{k}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" /
                                                                                    f"kind{k}" / f"{i}.png")
    status, out, err = cli(capsys, "eval", tmp_path / "run" / "last.npz", "--dataset", f"folder:{tmp_path / 'photos'}")
    assert status == 0, err
    assert err.startswith("warning: ") and "are not the ones the checkpoint was trained on" in err
    assert "'kind0'" in err and "'disc'" in err


def test_gradcheck_command(capsys, monkeypatch):
    monkeypatch.setenv("MINIVIT_REFERENCE", "")                # (undone after the test, as --reference sets it)
    status, out, _ = cli(capsys, "gradcheck", "--config", "test")
    assert status == 0 and "layers: the fast twins" in out
    assert out.splitlines()[-1].startswith("33 tensors, 0 failed; worst ")
    ran = []                                                   # the reference attention really runs under --reference
    real = minivit.reference.attention_forward
    monkeypatch.setattr(minivit.reference, "attention_forward", lambda *a, **k: (ran.append(1), real(*a, **k))[1])
    status, out, _ = cli(capsys, "gradcheck", "--config", "test", "--reference")
    assert status == 0 and "layers: the reference pairs" in out and len(ran) > 2
    assert out.splitlines()[-1].startswith("33 tensors, 0 failed; worst ")


def test_bad_input_is_one_line_that_names_it(tmp_path, data_dir, capsys):
    """Exit status 2 and `minivit COMMAND: error: ...` naming the file or value; no traceback."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    not_an_npz = tmp_path / "weights.npz"
    not_an_npz.write_text("not an archive")
    cases = [
        (["eval", tmp_path / "nothere.npz"], "no such checkpoint file"),
        (["finetune", "--image-size", 48], "finetune needs --from CHECKPOINT"),
        (["train", "--dataset", "nosuch", "--max-steps", 1], "unknown data set 'nosuch'"),
        (["eval", tmp_path / "nothere.npz", "--dataset", "mnist"], "no such checkpoint file"),
    ]
    status, out, err = cli(capsys, "train", *SHAPES, "--data-dir", data_dir, *TINY, "--max-steps", 1,
                           "--batch-size", 16, "--quiet", "--out", tmp_path / "run")
    assert status == 0, err
    ckpt = tmp_path / "run" / "last.npz"
    cases += [
        (["predict", ckpt, tmp_path / "nothere.png"], "nothere.png does not exist"),
        (["predict", ckpt, not_an_image], f"cannot read image {not_an_image}"),
        (["eval", ckpt, "--dataset", "mnist", "--data-dir", tmp_path / "empty"],
         f"mnist is not available: {tmp_path / 'empty' / 'mnist'} lacks train-images-idx3-ubyte.gz"),
        (["eval", not_an_npz], f"{not_an_npz}: not an .npz archive (not a zip file"),
    ]
    for argv, message in cases:
        status, out, err = cli(capsys, *argv)
        command = str(argv[0])
        assert status == 2, (argv, out, err)
        assert err.startswith(f"minivit {command}: error: ") and message in err, (argv, err)
        assert "Traceback" not in err
    assert f"minivit download mnist --data-dir {tmp_path / 'empty'}" in cli(
        capsys, "eval", ckpt, "--dataset", "mnist", "--data-dir", tmp_path / "empty")[2]


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    def cut_off(args):
        raise BrokenPipeError(32, "Broken pipe")            # what print() raises once `| head` has exited
    monkeypatch.setattr(minivit.cli, "cmd_gradcheck", cut_off)
    assert cli(capsys, "gradcheck") == (141, "", "")


def test_reference_flag_sets_the_switch_before_any_work(monkeypatch, capsys):
    """--reference sets MINIVIT_REFERENCE=1 (minivit.model then runs the reference layer pairs) before the command
    runs, on every command that runs the model; without the flag the variable is left alone."""
    seen = []

    def record(args):
        seen.append((args.command, os.environ.get("MINIVIT_REFERENCE")))
        return 0
    for name in ("gradcheck", "train", "eval", "predict", "finetune", "inspect", "pretrain_mpp", "fewshot"):
        monkeypatch.setattr(minivit.cli, f"cmd_{name}", record)
    commands = [["gradcheck"], ["train"], ["eval", "ck.npz"], ["predict", "ck.npz", "a.png"], ["finetune"],
                ["inspect", "ck.npz"], ["pretrain-mpp"], ["fewshot", "ck.npz"]]
    before = os.environ.pop("MINIVIT_REFERENCE", None)
    try:
        assert cli(capsys, "train")[0] == 0 and seen[-1] == ("train", None)
        for argv in commands:
            os.environ.pop("MINIVIT_REFERENCE", None)
            assert cli(capsys, *argv, "--reference")[0] == 0
            assert seen[-1] == (argv[0], "1"), argv
    finally:
        os.environ.pop("MINIVIT_REFERENCE", None)
        if before is not None:
            os.environ["MINIVIT_REFERENCE"] = before

"""``torchrun --nproc_per_node=2 -m deepfm_fast train``: data-parallel training from the command line
(gloo on loopback), resumed exactly, with rank 0 alone writing; a checkpoint of 2 ranks refuses to
resume in 1 process."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepfm_fast
from deepfm_fast.cli import main
from test_cli import write_libfm
from testing import free_port

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
# The ranks import the deepfm_fast under test, not whichever checkout is installed (e.g. editable).
CHECKOUT = str(Path(deepfm_fast.__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available(),
                                reason="torchrun / torch.distributed is not available")


def _args(tmp_path, checkpoint, epochs, *extra):
    return ["train", "--format", "libfm", "--train", str(tmp_path / "train.libfm"), "--test",
            str(tmp_path / "test.libfm"), "--valid-fraction", "0.2", "--epochs", str(epochs), "--batch-size", "101",
            "--lr", "0.01", "--embedding-dim", "4", "--hidden-units", "16,16", "--batch-norm", "--dropout", "0.1",
            "--l2-embedding", "1e-3", "--seed", "1", "--no-progress", "--threads", "1", "--dist-timeout", "60",
            "--checkpoint-dir", str(tmp_path / checkpoint), *extra]


def _run_torchrun(tmp_path, *args, timeout_s=240, launcher_args=()):
    command = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               *launcher_args, "-m", "deepfm_fast", *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp_path)


def _torchrun(tmp_path, *args):
    done = _run_torchrun(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 epochs straight on 2 ranks (rank 1 reading the data from rank 0's --cache-dir); 2 epochs,
    then a resume to 3, on 2 ranks that each parse the files."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    write_libfm(tmp_path / "train.libfm", rows=700)
    write_libfm(tmp_path / "test.libfm", rows=200, seed=1)
    straight = _torchrun(tmp_path, *_args(tmp_path, "straight", 3, "--sync-batch-norm", "--metrics-out",
                                          str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "cache")))
    _torchrun(tmp_path, *_args(tmp_path, "resumed", 2, "--sync-batch-norm"))
    _torchrun(tmp_path, *_args(tmp_path, "resumed", 3, "--sync-batch-norm", "--resume"))
    return tmp_path, straight


def test_two_ranks_train_and_rank_0_alone_reports(runs):
    tmp_path, straight = runs
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == 2 and metrics["sync_batch_norm"] and metrics["epochs_run"] == 3
    assert metrics["test_auc"] > 0.8  # the label follows field 0: learnable
    assert straight.stdout.count("test AUC") == 1  # printed by rank 0 only
    assert (tmp_path / "m.png").is_file()
    checkpoint = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]["ranks"]) == 2


def test_resume_under_torchrun_continues_exactly(runs):
    tmp_path, _ = runs
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("loss", "valid_auc", "valid_logloss", "lr", "table_lr"):  # not the timings
        assert [h[key] for h in straight["history"]] == [h[key] for h in resumed["history"]], key


def test_a_checkpoint_of_two_ranks_does_not_resume_in_one_process(runs, capsys):
    tmp_path, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "straight", copy)
    assert main(_args(tmp_path, "copy", 4, "--resume")) == 1
    assert "was written by 2 process(es); resume it with as many (this run has 1)" in capsys.readouterr().err


@pytest.mark.parametrize("cache", [True, False], ids=["cache-dir", "no-cache-dir"])
def test_a_bad_training_file_fails_every_rank_with_its_error(tmp_path, cache):
    """Rank 0 reads first only to fill --cache-dir for the others; whoever reads a bad file, every
    rank stops with its error (not a traceback from a collective left waiting, nor a hang)."""
    write_libfm(tmp_path / "train.libfm", rows=300, bad_line=7)
    write_libfm(tmp_path / "test.libfm", rows=50, seed=1)
    extra = ["--cache-dir", str(tmp_path / "cache")] if cache else []
    # A rank left waiting gives up after 20 s. --tee 3: each rank's lines start with [default<rank>]:
    done = _run_torchrun(tmp_path, *_args(tmp_path, "bad", 1, "--dist-timeout", "20", *extra), timeout_s=60,
                         launcher_args=["--tee", "3"])
    assert done.returncode != 0
    bad_line = r"\S*train\.libfm, line 7: bad libFM token 'oops'"
    assert re.search(rf"\[default0\]:deepfm-fast train: error: {bad_line}", done.stderr), done.stderr[-3000:]
    # With a cache rank 1 waits for rank 0 and learns its error; without, it reads the file itself.
    rank_1 = "rank 0 could not load the data: " if cache else ""
    assert re.search(rf"\[default1\]:deepfm-fast train: error: {rank_1}{bad_line}", done.stderr), done.stderr[-3000:]
    assert not re.search(r"\[default\d\]:.*Traceback", done.stderr), done.stderr[-3000:]

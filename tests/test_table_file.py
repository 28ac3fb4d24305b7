"""File-backed packed tables (EmbeddingFM(table_file=...)): built like the in-memory table, trained in
place bitwise like it, checked on reopening, locked, and checkpointed so that a process killed at
any instant leaves the last checkpoint whole. Small files only."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from deepfm_fast import EmbeddingFM, _packing, optim
from deepfm_fast.table_file import TableFileError
from test_packed_rows import FIELD_DIMS, OPTIMIZERS

DIM = 6


def _module(name, table_file=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return EmbeddingFM(FIELD_DIMS, DIM, optimizer=OPTIMIZERS[name](), table_file=table_file, **kwargs)


def _batch(step):
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.stack([torch.randint(0, d, (16,), generator=generator) for d in FIELD_DIMS], 1)
    return ids, torch.randint(0, 2, (16,), generator=generator).float()


def _train(module, first, last):
    for step in range(first, last):
        ids, labels = _batch(step)
        torch.nn.functional.binary_cross_entropy_with_logits(module(ids), labels).backward()


def _assert_same_tables(a, b):
    assert int(a.optimizer_step) == int(b.optimizer_step)
    for name, column in a._packed_columns():
        assert torch.equal(column, dict(b._packed_columns())[name]), name
    for name, state in a.optimizer_row_state().items():
        assert torch.equal(state, b.optimizer_row_state()[name]), name


@pytest.mark.parametrize("dim,chunk_rows", [(6, 16), (1, 32), (3, 48), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_normal_draws_the_numbers_of_one_whole_draw(dim, chunk_rows, dtype):
    for rows in (1, 5, 17, 100, 101):
        torch.manual_seed(3)
        whole = torch.empty(rows, dim, dtype=dtype).normal_(0.0, 0.5)
        torch.manual_seed(3)
        records = torch.full((rows, dim + 3), 7.0, dtype=dtype)
        _packing.normal_(records[:, 1:dim + 1], 0.0, 0.5, chunk_rows=chunk_rows)
        assert torch.equal(records[:, 1:dim + 1], whole), (rows, dim)
        assert bool((records[:, 0] == 7).all())  # the rest of the records untouched


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_packed_table_is_built_with_the_values_of_separate_tensors(name):
    packed, separate = _module(name), _module(name, pack_rows=False)
    assert packed.rows_packed and not separate.rows_packed
    _assert_same_tables(packed, separate)
    assert torch.equal(packed.weight, separate.weight) and packed.weight.abs().sum() > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_file_table_trains_in_place_like_the_table_in_memory(tmp_path, name):
    path = tmp_path / "table"
    in_file, in_memory = _module(name, path), _module(name)
    assert in_file.rows_packed and in_file.table_file is not None
    assert in_file.weight.untyped_storage().data_ptr() == in_file.table_file.records.data_ptr()
    _assert_same_tables(in_file, in_memory)
    _train(in_file, 0, 9)
    _train(in_memory, 0, 9)
    _assert_same_tables(in_file, in_memory)
    in_file.checkpoint()
    in_file.table_file.close()
    reopened = _module(name, path, seed=99)  # the file's values, not the seed's
    _assert_same_tables(reopened, in_memory)
    _train(reopened, 9, 14)
    _train(in_memory, 9, 14)
    _assert_same_tables(reopened, in_memory)
    reopened.eval()  # Adam's flush changes the rows behind: journaled first
    in_memory.eval()
    _assert_same_tables(reopened, in_memory)


def test_reopening_without_a_checkpoint_gives_the_last_checkpoint(tmp_path):
    path = tmp_path / "table"
    module = _module("adam", path)
    _train(module, 0, 3)
    module.checkpoint(extra={"bias": module.bias.detach().clone(), "epoch": 1})
    _train(module, 3, 7)
    module.eval()
    module.table_file.close()
    reopened = _module("adam", path)
    expected = _module("adam")
    _train(expected, 0, 3)
    _assert_same_tables(reopened, expected)
    assert reopened.table_file.extra["epoch"] == 1


@pytest.mark.parametrize("change,message", [
    (dict(name="rowwise_adagrad"), "optimizer"),
    (dict(dim=8), "embedding_dim"),
    (dict(field_dims=[50, 30, 8]), "rows"),
    (dict(catch_up_window=8), "catchup_shape"),
])
def test_a_file_for_another_module_is_refused(tmp_path, change, message):
    path = tmp_path / "table"
    _module("adam", path).table_file.close()
    opt = optim.Adam(0.01, catch_up_window=change.get("catch_up_window", 4))
    if "name" in change:
        opt = OPTIMIZERS[change["name"]]()
    with pytest.raises(TableFileError, match=message):
        EmbeddingFM(change.get("field_dims", FIELD_DIMS), change.get("dim", DIM), optimizer=opt, table_file=path)


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "table"
    _module("sgd", path).table_file.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(TableFileError, match="truncated"):
        _module("sgd", path)
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(30)
        f.write(b"X")
    with pytest.raises(TableFileError, match="damaged"):
        _module("sgd", path)
    with open(path, "r+b") as f:
        f.write(b"not a table")
    with pytest.raises(TableFileError, match="not a deepfm_fast table file"):
        _module("sgd", path)
    other = tmp_path / "other"
    _module("sgd", other).table_file.close()
    os.remove(f"{other}-manifest")
    with pytest.raises(TableFileError, match="checkpoint is missing"):
        _module("sgd", other)


def test_a_second_trainer_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "table"
    first = _module("sgd", path)
    with pytest.raises(TableFileError, match="open in another trainer"):
        _module("sgd", path)
    first.table_file.close()
    with pytest.raises(TableFileError, match="closed"):
        _train(first, 0, 1)
    _module("sgd", path)


def test_a_file_table_refuses_what_it_cannot_do(tmp_path):
    module = _module("sgd", tmp_path / "table")
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        module.double()
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        import copy

        copy.deepcopy(module)
    with pytest.raises(ValueError, match="table_file needs a fused optimizer"):
        EmbeddingFM(FIELD_DIMS, DIM, table_file=tmp_path / "other")
    with pytest.raises(RuntimeError, match="no table_file"):
        _module("sgd").checkpoint()


def _fail(err):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return fail


def test_a_full_disk_while_creating_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "table"
    monkeypatch.setattr(os, "posix_fallocate", _fail(errno.ENOSPC))
    with pytest.raises(TableFileError, match="could not create table file .*No space left"):
        _module("sgd", path)
    assert sorted(os.listdir(tmp_path)) == ["table-lock"]
    monkeypatch.undo()
    real_pwrite = os.pwrite
    calls = []

    def pwrite_then_fail(fd, data, offset):  # the disk fills in the middle of the records
        calls.append(offset)
        return real_pwrite(fd, data, offset) if len(calls) < 3 else _fail(errno.ENOSPC)()

    monkeypatch.setattr(os, "pwrite", pwrite_then_fail)
    monkeypatch.setattr(_packing, "CHUNK_ROWS", 16)
    with pytest.raises(TableFileError, match="No space left"):
        _module("sgd", path)
    assert sorted(os.listdir(tmp_path)) == ["table-lock"]


def test_a_full_disk_while_journaling_or_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "table"
    module, expected = _module("rowwise_adagrad", path), _module("rowwise_adagrad")
    _train(module, 0, 2)
    _train(expected, 0, 2)
    module.checkpoint()
    monkeypatch.setattr(os, "fdatasync", _fail(errno.ENOSPC))
    with pytest.raises(TableFileError, match="the step was not taken.*free disk space"):
        _train(module, 2, 3)
    _assert_same_tables(module, expected)  # nothing changed
    monkeypatch.undo()
    _train(module, 2, 4)
    monkeypatch.setattr(os, "rename", _fail(errno.ENOSPC))
    with pytest.raises(TableFileError, match="the checkpoint failed.*generation 1"):
        module.checkpoint()
    monkeypatch.undo()
    module.table_file.close()
    _assert_same_tables(_module("rowwise_adagrad", path), expected)


CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    import torch
    sys.path.insert(0, {tests!r})
    import test_table_file as T
    from deepfm_fast import table_file

    name, path, mode, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    module = T._module(name, path)
    if mode == "random":  # killed at a random instant of training and checkpointing
        delay = random.Random(seed).uniform(0.0, 1.5)
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    for step in range(int(module.optimizer_step), 1000):
        if mode == "mid_step" and step == 5:  # the step's rows journaled, half of them changed
            journal = module.table_file.journal
            def journal_then_die(rows):
                journal(rows)
                module.table_file.records[rows.reshape(-1)[::2].long()] = float("nan")
                os.kill(os.getpid(), signal.SIGKILL)
            module.table_file.journal = journal_then_die
        T._train(module, step, step + 1)
        if step % 3 == 2:
            if mode in ("before_commit", "after_commit") and step == 5:
                if mode == "after_commit":
                    rename = os.rename
                    os.rename = lambda *a: (rename(*a), os.kill(os.getpid(), signal.SIGKILL))
                else:
                    os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            module.checkpoint()
""")


@pytest.mark.parametrize("name,mode,seed", [
    ("adam", "mid_step", 0), ("rowwise_adagrad", "mid_step", 0), ("sgd", "before_commit", 0),
    ("adam", "after_commit", 0), ("adagrad", "random", 1), ("lazy_adam", "random", 2), ("adam", "random", 3),
])
def test_a_killed_trainer_leaves_its_last_checkpoint_and_resumes_bitwise(tmp_path, name, mode, seed):
    path = tmp_path / "table"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__)))
    _module(name, path).table_file.close()  # created here: the child's time goes to training
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(script), name, str(path), mode, str(seed)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr
    resumed = _module(name, path)
    step = int(resumed.optimizer_step)
    expected_step = {"mid_step": 3, "before_commit": 3, "after_commit": 6}.get(mode)
    assert step == expected_step if expected_step is not None else step % 3 == 0
    expected = _module(name)
    _train(expected, 0, step)
    _assert_same_tables(resumed, expected)
    _train(resumed, step, step + 4)
    _train(expected, step, step + 4)
    _assert_same_tables(resumed, expected)


def test_the_parallel_prefetch_gathers_the_same_records(tmp_path, monkeypatch):
    from deepfm_fast import table_file

    monkeypatch.setattr(table_file, "_PARALLEL_ROWS", 2)  # every journal gathers in the threads
    in_file, in_memory = _module("adagrad", tmp_path / "table"), _module("adagrad")
    _train(in_file, 0, 4)
    _train(in_memory, 0, 4)
    _assert_same_tables(in_file, in_memory)
    assert table_file._pool is not None


def test_a_file_tables_state_dict_checkpoints_the_file_and_holds_its_generation(tmp_path):
    path = tmp_path / "table"
    module, expected = _module("adam", path), _module("adam")
    _train(module, 0, 3)
    _train(expected, 0, 3)
    state = {k: v.clone() for k, v in module.state_dict().items()}  # flushes Adam's rows, then checkpoints
    expected.state_dict()
    assert "weight" not in state and "optimizer_last_step" not in state
    assert int(state["table_file_generation"]) == module.table_file.generation == 1
    journal = module.table_file._journal_end
    module.load_state_dict(state)  # the file's own records: nothing copied, nothing journaled
    assert module.table_file._journal_end == journal
    _train(module, 3, 5)
    module.table_file.close()
    reopened = _module("adam", path)
    reopened.load_state_dict(state)
    _assert_same_tables(reopened, expected)
    reopened.checkpoint()  # nothing changed: still generation 1
    assert reopened.table_file.generation == 1
    _train(reopened, 3, 4)
    _train(expected, 3, 4)
    reopened.checkpoint()
    with pytest.raises(RuntimeError, match="generation 1 of the table file .* at generation 2"):
        reopened.load_state_dict(state)
    _train(expected, 4, 6)
    reopened.load_state_dict(expected.state_dict())  # records from memory: copied in, journaled first
    _assert_same_tables(reopened, expected)
    reopened.table_file.close()
    again = _module("adam", path)
    first = _module("adam")
    _train(first, 0, 3)
    first.state_dict()
    _train(first, 3, 4)
    _assert_same_tables(again, first)  # the load was not checkpointed: the file still holds generation 2


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only): a disk that really fills."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (the monkeypatched full-disk tests run anyway)")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a mapping may still be alive


def test_a_really_full_disk_refuses_the_table_or_the_step_and_keeps_the_checkpoint(small_disk):
    with pytest.raises(TableFileError, match="No space left"):
        EmbeddingFM([20_000], DIM, optimizer=optim.SGD(0.1), table_file=small_disk / "big")
    assert sorted(os.listdir(small_disk)) == ["big-lock"]
    rows = (256 - 20) * 1024 // 32  # SGD, K=6: 32-byte records; the file leaves ~16 KiB of the disk
    torch.manual_seed(0)
    module = EmbeddingFM([rows], DIM, optimizer=optim.SGD(0.1), table_file=small_disk / "table")
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(TableFileError, match="the step was not taken.*free disk space"):
        for _ in range(100):  # the journal grows by the step's new rows until the disk is full
            ids = torch.randint(0, rows, (64, 1), generator=generator)
            module(ids).sum().backward()
    module.table_file.close()
    torch.manual_seed(0)
    fresh = EmbeddingFM([rows], DIM, optimizer=optim.SGD(0.1))
    reopened = EmbeddingFM([rows], DIM, optimizer=optim.SGD(0.1), table_file=small_disk / "table")
    assert torch.equal(reopened.weight, fresh.weight) and int(reopened.optimizer_step) == 0

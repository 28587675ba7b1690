"""Checkpoint file handling that needs no model: formats, safety, corruption, atomic writes."""
import json
import os
import pickle
import stat
import struct

import pytest
import torch

from ldm.io import CheckpointError, detect_format, materialize, read_state_dict, save_checkpoint


def _sd():
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float16), "n": torch.tensor(7)}


@pytest.mark.parametrize("name", ["m.safetensors", "m.ckpt", "weird_name.bin"])
def test_round_trip_bit_exact(tmp_path, name):
    sd = _sd()
    path = save_checkpoint(sd, tmp_path / name, config={"model": {"target": "x.Y"}}, metadata={"step": 3})
    back, meta = read_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    assert '"target": "x.Y"' in meta["config"]


def test_format_from_bytes_not_name(tmp_path):
    p = save_checkpoint(_sd(), tmp_path / "model.safetensors")
    disguised = tmp_path / "model.ckpt"
    os.rename(p, disguised)
    assert detect_format(disguised) == "safetensors"
    assert torch.equal(read_state_dict(disguised)[0]["a.weight"], read_state_dict(disguised)[0]["a.weight"])
    torch.save({"state_dict": _sd()}, tmp_path / "t.safetensors")
    assert detect_format(tmp_path / "t.safetensors") == "zip"
    assert set(read_state_dict(tmp_path / "t.safetensors")[0]) == set(_sd())


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    for name, writer in (("evil_zip.ckpt", lambda p: torch.save({"state_dict": {"w": torch.ones(1)}, "x": payload}, p)),
                         ("evil_legacy.ckpt", lambda p: open(p, "wb").write(pickle.dumps({"x": payload}, protocol=2)))):
        path = tmp_path / name
        writer(path)
        with pytest.raises(CheckpointError, match="refusing to load"):
            read_state_dict(path)
        assert not marker.exists(), "the pickle payload ran"


def test_missing_truncated_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    good = save_checkpoint(_sd(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|neither"):
        read_state_dict(tmp_path / "trunc.safetensors")
    torch.save({"state_dict": _sd()}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(tmp_path / "trunc.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"hello world, not a checkpoint at all")
    with pytest.raises(CheckpointError, match="neither"):
        read_state_dict(tmp_path / "garbage.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        read_state_dict(tmp_path / "empty.ckpt")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = save_checkpoint(_sd(), tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"bad": object()}, path)  # fails while writing
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    for pad in range(300):  # grow the header until its length's low byte is 0x80
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert detect_format(path) == "safetensors"
    assert torch.equal(read_state_dict(path)[0]["w"], torch.zeros(1))


def test_lazy_read_equals_eager_and_catches_truncation(tmp_path, monkeypatch):
    from ldm.io import LazyTensor, _SafetensorsReader

    monkeypatch.setattr(_SafetensorsReader, "WINDOW", 16)  # reopen the map after (almost) every tensor

    sd = dict(_sd(), bf=torch.randn(2, 3).to(torch.bfloat16), empty=torch.zeros(0, 4))
    path = save_checkpoint(sd, tmp_path / "m.safetensors", config={"a": 1})
    lazy, meta = read_state_dict(path, lazy=True)
    assert meta["config"] == '{"a": 1}'
    assert all(isinstance(v, LazyTensor) for v in lazy.values())
    for k, v in sd.items():
        assert lazy[k].shape == v.shape
        back = materialize(lazy[k])
        assert back.dtype == v.dtype and torch.equal(back, v)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(tmp_path / "cut.safetensors", lazy=True)


# ---- malformed safetensors: every check of the format, one line each ---------------------------------------

def _raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


_TWO_FLOATS = struct.pack("<2f", 1.0, 2.0)


@pytest.mark.parametrize("name,header,data", [
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, _TWO_FLOATS),
    ("byte_count", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, _TWO_FLOATS),
    ("reversed", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, _TWO_FLOATS),
    ("past_end", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, _TWO_FLOATS),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, _TWO_FLOATS),
    ("dtype", {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, _TWO_FLOATS),
    ("shape", {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, _TWO_FLOATS),
])
@pytest.mark.parametrize("lazy", [False, True])
def test_malformed_safetensors_give_one_line(tmp_path, name, header, data, lazy):
    path = _raw_safetensors(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path, lazy=lazy)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_fuzzed_checkpoints_never_load_silently_or_crash(tmp_path):
    """Random header edits, truncations and byte flips: each read gives a state dict or one CheckpointError line."""
    import random

    rng = random.Random(0)
    good = save_checkpoint(_sd(), tmp_path / "good.safetensors", config={"a": 1})
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    torch.save({"state_dict": _sd()}, tmp_path / "good.ckpt")
    pickled = (tmp_path / "good.ckpt").read_bytes()
    for i in range(60):
        kind = i % 4
        if kind == 0:  # a plausible header with one field changed
            h = json.loads(json.dumps(header))
            entry = h[rng.choice([k for k in h if k != "__metadata__"])]
            field = rng.choice(["dtype", "shape", "data_offsets"])
            entry[field] = rng.choice([[rng.randint(-4, 200) for _ in range(rng.randint(0, 3))], "F16", "X", 7])
            blob = _raw_safetensors(tmp_path / "f.safetensors", h, data[8 + n:]).read_bytes()
        elif kind == 1:  # truncated anywhere
            blob = data[:rng.randrange(len(data))]
        elif kind == 2:  # bytes flipped in the header
            blob = bytearray(data)
            for _ in range(3):
                blob[rng.randrange(8, 8 + n)] = rng.randrange(256)
            blob = bytes(blob)
        else:  # a pickle truncated or flipped
            blob = bytearray(pickled[:rng.randrange(len(pickled))] if rng.random() < 0.5 else pickled)
            if rng.random() < 0.5 and blob:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            blob = bytes(blob)
        path = tmp_path / f"fuzz{i}.bin"
        path.write_bytes(blob)
        for lazy in (False, True):
            try:
                sd, _ = read_state_dict(path, lazy=lazy)
                for v in sd.values():
                    materialize(v)
            except CheckpointError as e:
                assert "\n" not in str(e)


def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(_sd(), tmp_path / "m.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o022)
        path = save_checkpoint(_sd(), tmp_path / "m.ckpt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_lazy_read_refuses_a_file_replaced_while_loading(tmp_path, monkeypatch):
    from ldm.io import _SafetensorsReader

    monkeypatch.setattr(_SafetensorsReader, "WINDOW", 0)  # reopen before every tensor
    path = save_checkpoint({"a": torch.zeros(4), "b": torch.zeros(4)}, tmp_path / "m.safetensors")
    lazy, _ = read_state_dict(path, lazy=True)
    materialize(lazy["a"])
    save_checkpoint({"a": torch.ones(4), "b": torch.ones(4)}, path)  # e.g. a training run exports again
    with pytest.raises(CheckpointError, match="replaced while it was being read"):
        materialize(lazy["b"])


def test_remove_stale_temp_files_only_removes_orphans(tmp_path):
    import subprocess
    import sys
    import time

    from ldm.io import _host, atomic_write, remove_stale_temp_files

    seen = []
    atomic_write(tmp_path / "last.ckpt", lambda tmp: seen.append(os.path.basename(tmp)) or open(tmp, "w").close())
    assert seen[0].startswith(f".last.ckpt.{_host()}-{os.getpid()}.") and seen[0].endswith(".tmp")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has exited
    old = time.time() - 3600
    files = {
        f".last.ckpt.{_host()}-{dead}.abcd1234.tmp": (None, True),  # its writer is gone
        f".step-00000002.ckpt.{_host()}-{os.getpid()}.abcd1234.tmp": (old, False),  # its writer is alive
        ".last.ckpt.otherhost-12.abcd1234.tmp": (old, True),  # another machine's, untouched for an hour
        ".last.ckpt.otherhost-13.abcd1234.tmp": (None, False),  # another machine's, being written
        ".config.yaml.abcd_123.tmp": (old, True),  # an older writer's name (no process in it), an hour old
        ".config.yaml.abcd_124.tmp": (None, False),  # the same, just written
        ".notes.tmp": (old, False), "notes.tmp": (old, False), "step-00000001.ckpt": (old, False),
    }
    for name, (mtime, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, (_, stale) in files.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt"] + [n for n, (_, stale) in files.items() if not stale])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_model_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """The sha256 is read from the cache while the file's size and time stand, and computed again when either
    changes; an unwritable cache only costs the caching."""
    import hashlib

    from ldm.io import cache_root, file_sha256, model_hash

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1000)
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_hash(path) == true[:10] and file_sha256(path) == true
    cache = cache_root() / "hashes.json"
    entries = json.loads(cache.read_text())
    assert list(entries) == [str(path.resolve())]
    entries[str(path.resolve())]["sha256"] = "f" * 64  # what a cache hit returns, to tell it from a new hash
    cache.write_text(json.dumps(entries))
    assert model_hash(path, 64) == "f" * 64
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed in place
    assert model_hash(path, 64) == true
    path.write_bytes(b"other weights")  # and a new size
    assert file_sha256(path) == hashlib.sha256(b"other weights").hexdigest()
    cache.write_text("{not json")  # a broken cache is rebuilt
    assert file_sha256(path) == hashlib.sha256(b"other weights").hexdigest()
    assert json.loads(cache.read_text())[str(path.resolve())]["sha256"] == file_sha256(path)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"x")
    file_sha256(gone)
    gone.unlink()
    (tmp_path / "third.bin").write_bytes(b"y")
    file_sha256(tmp_path / "third.bin")  # a write drops the entries of files that are gone
    assert str(gone.resolve()) not in json.loads(cache.read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))  # a file where the folder should be: nothing cached
    assert model_hash(path, 64) == hashlib.sha256(b"other weights").hexdigest()

"""Checkpoint file handling that needs no model: formats, safety, corruption, atomic writes."""
import os
import pickle

import pytest
import torch

from ldm.io import CheckpointError, detect_format, read_state_dict, save_checkpoint


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


def test_lazy_read_equals_eager_and_catches_truncation(tmp_path):
    from ldm.io import LazyTensor, materialize

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

"""Checkpoint integrity: a damaged file is refused by name, never loaded as garbage weights."""

import hashlib
import io
import os
import random
import stat

import pytest
import torch

from conftest import make_model
from transfusion_pytorch import Transfusion
from transfusion_pytorch import checkpoint as checkpoint_module
from transfusion_pytorch.checkpoint import CHECKPOINT_FORMAT, HEADER_SIZE, LEGACY_FORMAT
from transfusion_pytorch.training import load_checkpoint, read_checkpoint, save_checkpoint


def build():
    return make_model(num_text_tokens=8, dim_latent=4, modality_default_shape=(2,), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))


@pytest.fixture
def saved(tmp_path):
    """A model with its optimizer state, saved: (path, model, file bytes)."""
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 4), times=torch.rand(2)).backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, step=3)
    return path, model, path.read_bytes()


def damaged(path, data):
    bad = path.with_name("damaged.pt")
    bad.write_bytes(data)
    return bad


def test_the_file_is_a_header_and_a_checksummed_payload(saved):
    path, _, data = saved
    header, payload = data[:HEADER_SIZE], data[HEADER_SIZE:]
    magic, sha, length, rest = header.split(b"\n")
    assert magic.decode() == CHECKPOINT_FORMAT == "transfusion_pytorch.checkpoint/2" and rest == b""
    assert sha == b"sha256 " + hashlib.sha256(payload).hexdigest().encode()
    assert length == b"length %020d" % len(payload)
    assert payload[:4] == b"PK\x03\x04"  # torch.save's zip
    assert read_checkpoint(path)["step"] == 3


@pytest.mark.parametrize("where", ["empty", "in the magic", "in the digest", "end of header", "first payload byte", "mid-payload", "last byte"])
def test_a_truncated_checkpoint_is_refused(saved, where):
    path, model, data = saved
    cut = {
        "empty": 0,
        "in the magic": 10,
        "in the digest": HEADER_SIZE - 40,
        "end of header": HEADER_SIZE,
        "first payload byte": HEADER_SIZE + 1,
        "mid-payload": (HEADER_SIZE + len(data)) // 2,
        "last byte": len(data) - 1,
    }[where]
    bad = damaged(path, data[:cut])
    with pytest.raises(ValueError, match=r"damaged\.pt.*truncated"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match=r"damaged\.pt"):
        load_checkpoint(bad, build())
    with pytest.raises(ValueError, match=r"damaged\.pt"):
        Transfusion.from_checkpoint(bad)


def test_every_flipped_byte_is_refused(saved):
    """Any change of one byte, in the header or at 20 random places in the payload, is refused:
    the checksum covers the payload, and every byte of the header is checked."""
    path, model, data = saved
    rng = random.Random(0)
    offsets = list(range(HEADER_SIZE)) + sorted(rng.sample(range(HEADER_SIZE, len(data)), 20))
    for offset in offsets:
        corrupt = bytearray(data)
        corrupt[offset] ^= rng.randrange(1, 256)
        bad = damaged(path, bytes(corrupt))
        with pytest.raises(ValueError, match=r"damaged\.pt") as error:
            read_checkpoint(bad)
        if offset >= HEADER_SIZE:
            assert "SHA-256" in str(error.value), offset
    # the model and the optimizer loaders refuse too, before touching the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (lambda: load_checkpoint(bad, model), lambda: Transfusion.from_checkpoint(bad)):
        with pytest.raises(ValueError, match=r"damaged\.pt.*SHA-256"):
            load()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_extra_bytes_and_foreign_files_are_refused(saved):
    path, _, data = saved
    with pytest.raises(ValueError, match=r"damaged\.pt.*7 bytes follow"):
        read_checkpoint(damaged(path, data + b"garbage"))
    with pytest.raises(ValueError, match=r"damaged\.pt.*unknown format 'transfusion_pytorch\.checkpoint/3'"):
        read_checkpoint(damaged(path, data.replace(b"checkpoint/2", b"checkpoint/3", 1)))
    with pytest.raises(ValueError, match=r"damaged\.pt.*not a transfusion_pytorch checkpoint"):
        read_checkpoint(damaged(path, b"\x89PNG\r\n\x1a\n" + data))


def test_a_valid_checksum_does_not_make_code_loadable(tmp_path):
    """The digest detects damage; it is not a signature. A forged file with a correct header and a
    payload that would run code is still refused by the weights-only load."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "model": Evil()}, buffer)
    payload = buffer.getvalue()
    (tmp_path / "forged.pt").write_bytes(checkpoint_module._header(payload) + payload)
    with pytest.raises(ValueError, match=r"forged\.pt.*not a readable checkpoint"):
        load_checkpoint(tmp_path / "forged.pt", build())
    assert not marker.exists()


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path, saved):
    """Format /1 was a bare torch.save zip without header or checksum; it loads as before."""
    _, model, _ = saved
    old = read_checkpoint(saved[0]) | {"format": LEGACY_FORMAT}
    torch.save(old, tmp_path / "old.pt")
    assert (tmp_path / "old.pt").read_bytes()[:4] == b"PK\x03\x04"
    other = build()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(tmp_path / "old.pt", other, optimizer)["step"] == 3
    rebuilt = Transfusion.from_checkpoint(tmp_path / "old.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value) and torch.equal(rebuilt.state_dict()[name], value), name
    restored = optimizer.state_dict()["state"]
    assert restored and all(torch.equal(restored[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in old["optimizer"]["state"].items())
    # a truncated old file is still refused (by torch.load: it carries no checksum)
    (tmp_path / "old_cut.pt").write_bytes((tmp_path / "old.pt").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"old_cut\.pt"):
        read_checkpoint(tmp_path / "old_cut.pt")
    # a bare zip claiming the new format lacks its header: refused
    torch.save(old | {"format": CHECKPOINT_FORMAT}, tmp_path / "headless.pt")
    with pytest.raises(ValueError, match=r"headless\.pt.*not a transfusion_pytorch checkpoint"):
        read_checkpoint(tmp_path / "headless.pt")


def test_the_rename_is_made_durable(tmp_path, monkeypatch):
    """File fsynced before `os.replace`, the folder fsynced after it (POSIX)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    save_checkpoint(tmp_path / "ckpt.pt", build())
    expected = ["fsync file", "replace", "fsync folder"] if hasattr(os, "O_DIRECTORY") else ["fsync file", "replace"]
    assert events == expected

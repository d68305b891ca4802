"""load_checkpoint on a model file whose bytes changed after torch.save (a flipped byte on disk or in a copy) or
that was cut short: refused with one paragraph naming the file and the way back, never loaded as other weights."""
from __future__ import annotations

import zipfile

import pytest
import torch
from final_files import quantized_model_file

from gmpq_core.errors import CheckpointError
from gmpq_core.export import load_quantized_model
from gmpq_core.fileio import load_checkpoint
from gmpq_core.integer_model import save_integer_model


def _flip_weight_bytes(path) -> str:
    """Invert 64 bytes inside the largest tensor of ``path`` (a torch.save zip); returns that part's name."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    head = info.header_offset                                  # the local header: 30 bytes, then name and extra
    name_len, extra_len = (int.from_bytes(data[head + k: head + k + 2], "little") for k in (26, 28))
    start = head + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("kind", ["float", "integer"])
def test_a_model_file_with_changed_bytes_is_refused_not_loaded_as_other_weights(tmp_path, kind):
    path = quantized_model_file(tmp_path / "models" / "m.pt")       # where a sweep keeps its final models
    if kind == "integer":
        path = save_integer_model(tmp_path / "models" / "m.int.pt", load_quantized_model(path))
    intact = load_quantized_model(path)                        # the same file before: loads
    part = _flip_weight_bytes(path)
    with pytest.raises(CheckpointError) as e:
        load_quantized_model(path)
    msg = " ".join(str(e.value).split())
    assert f"Checkpoint '{path}' is corrupted: its part {part!r} no longer matches the checksum" in msg
    assert "nothing was loaded from it" in msg
    assert ("'gmpq export' on its float model file" if kind == "integer" else
            "'gmpq finetune --sweep DIR' writes it again from its fine-tune checkpoint, training nothing") in msg
    assert intact.results["top1"] == 81.5
    assert load_checkpoint(path, mmap=True)["format"]          # a caller after one small field: no full read


def test_a_model_file_cut_short_says_so(tmp_path):
    path = quantized_model_file(tmp_path / "m.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_quantized_model(cut)
    msg = " ".join(str(e.value).split())
    assert f"Checkpoint '{cut}' is truncated or corrupted: its end (the zip directory) is missing" in msg
    assert "internal miniz error" not in msg
    assert torch.equal(load_checkpoint(path)["state_dict"]["fc.weight"], load_quantized_model(path).model.fc.weight)


def test_a_model_file_torch_saved_with_its_checksums_off_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) makes torch.save record CRC 0 for every part: such a file is as
    torch wrote it, not damaged, and loads (only a part whose recorded CRC-32 is not 0 can be checked)."""
    path = quantized_model_file(tmp_path / "models" / "m.pt")
    plain = tmp_path / "models" / "plain.pt"
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(torch.load(path, weights_only=True), plain)
    finally:
        torch.serialization.set_crc32_options(was)
    with zipfile.ZipFile(plain) as z:
        assert {i.CRC for i in z.infolist()} == {0}                 # no checksum written (Python's testzip fails it)
    loaded = load_quantized_model(plain)
    assert loaded.results["top1"] == 81.5
    assert torch.equal(loaded.model.fc.weight, load_quantized_model(path).model.fc.weight)

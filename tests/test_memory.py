"""train/memory.py: the out-of-memory message and the allocator snapshot (the snapshot on a CUDA machine only)."""
import pickle

import pytest
import torch

from blip2_ds.train.memory import VIEWER, MemoryRecorder, out_of_memory_message

CUDA = torch.cuda.is_available()


def test_the_message_names_the_step_the_micro_batch_and_what_to_change(tmp_path):
    text = out_of_memory_message(120, 3, 105, torch.device("cpu"), None)
    assert text.startswith("rank 3 ran out of GPU memory in step 120 (data.batch_size=105 per GPU)")
    for advice in ("Lower data.batch_size", "launch/bench.py --plan", "activation_checkpointing=true",
                   "--resume latest", "memory_snapshot=true"):
        assert advice in text, advice
    with_snapshot = out_of_memory_message(120, 3, 105, torch.device("cpu"), tmp_path / "oom.pickle")
    assert f"{tmp_path / 'oom.pickle'} (open it in {VIEWER})" in with_snapshot
    assert "Rerun with memory_snapshot" not in with_snapshot


def test_a_disabled_recorder_records_and_writes_nothing(tmp_path):
    with MemoryRecorder(False, tmp_path, 0) as recorder:
        assert recorder.dump_after_out_of_memory(7) is None
    assert not (tmp_path / "memory").exists()


@pytest.mark.skipif(not CUDA, reason="the CUDA allocator's history needs a CUDA GPU")
def test_a_real_out_of_memory_error_leaves_a_snapshot_of_the_allocations(tmp_path):
    device = torch.device("cuda")
    with MemoryRecorder(True, tmp_path, 1) as recorder:
        kept = torch.ones(1024, 1024, device=device)  # 4 MiB that the snapshot must show
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 ** 50, dtype=torch.uint8, device=device)  # 1 PiB: the allocator refuses it
        path = recorder.dump_after_out_of_memory(5)
    assert path == tmp_path / "memory" / "oom_step_5_rank1.pickle"
    snapshot = pickle.loads(path.read_bytes())
    blocks = [b for segment in snapshot["segments"] for b in segment["blocks"] if b["state"] == "active_allocated"]
    assert any(b["size"] >= kept.numel() * 4 for b in blocks)
    assert any(event["action"] == "alloc" for trace in snapshot["device_traces"] for event in trace)
    text = out_of_memory_message(5, 1, 105, device, path)
    assert "GiB allocated at the peak of" in text and str(path) in text
    del kept

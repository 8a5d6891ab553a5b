"""The script torchrun runs in tests/recipe/test_elastic.py: the `simclr-ext pretrain` command line (cli.main,
what `python -m simclr_ext pretrain` runs), with two test-only additions installed first:

- a stand-in for torch.utils.tensorboard (optional, possibly not installed) that appends each writer's
  purge_step and every scalar to <log_dir>/events.jsonl, so the test can replay what TensorBoard would show;
- SIMCLR_EXT_TEST_KILL_IN_SAVE=n: in the first attempt, rank 0 dies by SIGKILL in the middle of writing its
  n-th checkpoint (half of the file written to the temporary file, nothing renamed).
"""
import io
import json
import os
import signal
import sys
import types

import torch


class _RecordingWriter:
    def __init__(self, log_dir, purge_step=None):
        os.makedirs(log_dir, exist_ok=True)
        self.f = open(os.path.join(log_dir, "events.jsonl"), "a")
        self._write({"purge_step": purge_step})

    def _write(self, row):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def add_scalar(self, tag, value, step):
        self._write({"tag": tag, "value": value, "step": step})

    def close(self):
        self.f.close()


def _die_in_the_middle_of_save(n):
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, io.BufferedWriter):  # torch.distributed serializes objects with torch.save too
            return real_save(obj, f, *args, **kwargs)
        calls[0] += 1
        if calls[0] != n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


if __name__ == "__main__":
    sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=_RecordingWriter)
    kill_at = int(os.environ.get("SIMCLR_EXT_TEST_KILL_IN_SAVE", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_at and first_attempt and os.environ.get("RANK") == "0":
        _die_in_the_middle_of_save(kill_at)
    from simclr_ext.recipe import cli

    sys.exit(cli.main(sys.argv[1:]))

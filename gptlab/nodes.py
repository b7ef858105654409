"""Runs over several machines: every process must see the one run directory.

The main process prepares built-in data, writes the config, the log, the checkpoints and each
snapshot's state, while every process writes its own RNG states (and under FSDP its own shards)
into the snapshot. So all machines must share `out_dir`: one filesystem mounted at the same path
(NFS, Lustre, a cloud file store). Without it every snapshot would look incomplete on resume and
checkpoints would hold one machine's part. At start the main process writes a probe file next to
the run directory and every process looks for it; a run whose processes cannot all see it is
refused before anything is written. Node-local disks are not supported (see the README).
"""

import secrets
import socket
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from gptlab.errors import UserError

PROBE_WAIT_S = 5.0
"""How long a process looks for the probe (a shared filesystem may show a new file late)."""


def check_shared_run_dir(accelerator: Accelerator, out_dir: Path) -> None:
    """Refuse a run whose processes do not all see the same out_dir (a collective)."""
    if accelerator.num_processes == 1:
        return
    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    # Every process resolves the path in its own working directory, as it will write there.
    probe = Path(out_dir).absolute().parent / f".gptlab-probe-{token[0]}"
    failure, created = [None], []
    if accelerator.is_main_process:
        created = [d for d in [probe.parent, *probe.parent.parents] if not d.exists()]
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(socket.gethostname())
        except OSError as error:
            failure = [f"cannot write into {probe.parent} ({error.strerror}); fix that, then rerun"]
    broadcast_object_list(failure)
    if failure[0]:
        raise UserError(failure[0])
    deadline = time.monotonic() + PROBE_WAIT_S
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = gather_object([(probe.is_file(), socket.gethostname(), accelerator.process_index)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # leave nothing behind
        probe.unlink(missing_ok=True)
        for directory in created:
            directory.rmdir()
    blind = [f"process {rank} on {host}" for found, host, rank in seen if not found]
    if blind:
        raise UserError(
            f"the run directory {out_dir} is not shared by all processes ({', '.join(blind)} "
            "cannot see what the main process writes there); put out_dir on a filesystem every "
            "machine mounts at the same path"
        )

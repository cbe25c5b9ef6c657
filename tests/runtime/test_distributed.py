"""The process group of a single run outside the launcher (runtime/distributed.py)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter (a process group is process-wide): the first port probed is one this script
# holds, as when another process binds a probed port before the store does; the group then starts on
# the next port probed, and says which.
SCRIPT = """
import socket
import distill.runtime.distributed as distributed

taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
taken.bind(("127.0.0.1", 0))
taken.listen()
busy = taken.getsockname()[1]
probes = []
free = distributed._free_port

def probe():
    probes.append(busy if not probes else free())
    return probes[-1]

distributed._free_port = probe
distributed.init_distributed()
import torch.distributed as dist
import os
print("RESULT", busy, os.environ["MASTER_PORT"], len(probes), dist.get_world_size())
distributed.close_process_group()
"""


def test_a_single_run_whose_probed_port_was_taken_meanwhile_starts_on_another():
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    busy, port, probes, world = next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()[1:]
    assert port != busy and int(probes) == 2 and int(world) == 1

"""A stand-in export job honouring the job contract, steered by its first argument.

usage: fake_export.py MODE OUTPUT_PATH GAMES_DIR
  ok    write a small valid .npz and print the JSON result line
  fail  print to stderr and exit 3
  hang  start a child that sleeps, write both pids to GAMES_DIR/pids, sleep forever
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

mode, output_path, games_dir = sys.argv[1:4]
if mode == "fail":
    print("exporter: no usable games in store xyz.db", file=sys.stderr)
    sys.exit(3)
if mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    with open(os.path.join(games_dir, "pids"), "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}\n")
    time.sleep(1000)
samples = 7
tmp = output_path + ".tmp.npz"
np.savez(tmp, values=np.zeros(samples, dtype=np.float32))
os.replace(tmp, output_path)
print("progress line that is not the result")
print(json.dumps({"output_path": output_path, "samples": samples, "games": 3}))

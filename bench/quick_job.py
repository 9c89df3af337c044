"""A near-instant export job honouring the job contract (run with ``python -S``).

usage: quick_job.py OUTPUT_PATH TEMPLATE_NPZ [SLEEP_S]
Copies a small valid .npz to OUTPUT_PATH atomically, optionally after sleeping SLEEP_S
(to stand in for a real export's duration), and prints the JSON result line.
"""

import json
import os
import shutil
import sys
import time

output_path, template = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    time.sleep(float(sys.argv[3]))
tmp = f"{output_path}.{os.getpid()}.tmp.npz"
shutil.copyfile(template, tmp)
os.replace(tmp, output_path)
print(json.dumps({"output_path": output_path, "samples": 7, "games": 1}), flush=True)

"""The whole p4q job of a random-weight CLIP on synthetic data: wall time and peak RSS per phase.

    python benchmarks/p4q_job.py [--model=ViT-B/32] [--quant=w4a4attn8] [--steps=5]
        [--examples=64] [--batch=32] [--integer=auto|on|off]

Runs `main.py --config=configs/p4q.py` in a subprocess (its own memory) with the default
recipe's calibration (10 batches of 128 images, the prompt ensemble) and evaluation, a few
training steps and a few adapter calibration batches, and prints the phases the job records
in results.json (`p4q_jax.phases`): set-up (random init), calibration, zero-shot and PTQ
evaluation, feature cache, training, adapter calibration, evaluation, export. Peak RSS is per
phase (GB = 2^30 bytes); on a CPU it includes the devices' buffers. TensorFlow is loaded
(the data pipeline).

Target on the 2-core CPU dev machine: every phase of the ViT-B/32 job within 3 GB.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

import host

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET_GB = 3.0

_MODEL = flags.DEFINE_string("model", "ViT-B/32", "Named CLIP config (random weights).")
_QUANT = flags.DEFINE_string("quant", "w4a4attn8", "Quantization preset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps.", lower_bound=1)
_EXAMPLES = flags.DEFINE_integer("examples", 64, "Synthetic examples per split.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 32, "Training and evaluation batch.", lower_bound=1)
_INTEGER = flags.DEFINE_enum("integer", "auto", ["auto", "on", "off"],
                             "config.quant.integer: auto (this CPU's choice), on, off.")


def main(argv):
    del argv
    print(host.describe())
    with tempfile.TemporaryDirectory(prefix="p4q-job-") as workdir:
        command = [
            sys.executable, str(REPO / "main.py"), "--config=p4q_jax/configs/p4q.py",
            f"--workdir={workdir}", f"--config.model.name={_MODEL.value}",
            "--config.data.name=synthetic", f"--config.data.synthetic_examples={_EXAMPLES.value}",
            f"--config.quant.config={_QUANT.value}", f"--config.train.num_steps={_STEPS.value}",
            f"--config.train.batch_size={_BATCH.value}", f"--config.eval.batch_size={_BATCH.value}",
            "--config.p4q.adapter_calib_batches=2"]
        if _INTEGER.value != "auto":
            command.append(f"--config.quant.integer={_INTEGER.value == 'on'}")
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"the job failed:\n{done.stderr[-3000:]}")
        phases = json.loads((pathlib.Path(workdir) / "results.json").read_text())["phases"]
    print(f"p4q job: {_MODEL.value} (random weights), {_QUANT.value}, synthetic data "
          f"({_EXAMPLES.value} examples), {_STEPS.value} steps of batch {_BATCH.value}")
    print("| phase | s | peak RSS (GB) |\n|---|---|---|")
    for p in phases:
        note = "" if p["peak_since"] == "phase" else " (since the process started)"
        print(f"| {p['phase']} | {p['seconds']:.1f} | {p['peak_rss_gb']:.2f}{note} |")
    worst = max(phases, key=lambda p: p["peak_rss_gb"])
    verdict = "met" if worst["peak_rss_gb"] <= TARGET_GB else "missed"
    print(f"largest: {worst['phase']} {worst['peak_rss_gb']:.2f} GB (target {TARGET_GB:.0f} GB: "
          f"{verdict}); total {sum(p['seconds'] for p in phases):.0f} s")


if __name__ == "__main__":
    app.run(main)

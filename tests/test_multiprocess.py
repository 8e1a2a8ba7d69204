"""P4Q train step across processes: 2 processes x 2 CPU devices == 1 process x 4 devices.

The test (parent, 4 fake devices from conftest.py) starts two copies of this file as
children (`python tests/test_multiprocess.py PROCESS_ID PORT OUT_DIR`), each with 2 fake
CPU devices, joined by `jax.distributed` over 127.0.0.1 with gloo collectives into one
4-device mesh. Every process builds the same setup (`build_setup`, deterministic), feeds
only its process-local half of the 16-row global batch to `parallel.to_global`, runs
`STEPS` train steps and writes its loss terms and trainable params after each step and
what it saw of the mesh to OUT_DIR/process_<id>.npz. The parent runs the same steps on its own
4-device mesh with the whole batch and compares.

The setup is `toy_p4q.build_setup`, shared with test_p4q_step.py.
"""

import contextlib
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from p4q_jax import parallel
from p4q_jax.p4q import step as step_lib

import multihost
from toy_p4q import GLOBAL_BATCH
from toy_p4q import build_setup
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 2
CHILD_TIMEOUT_S = 300
REPO = pathlib.Path(__file__).resolve().parents[1]


def local_rows(process_id):
    """The rows of the global batch that process `process_id` feeds to `to_global`."""
    per_process = GLOBAL_BATCH // NUM_PROCESSES
    return slice(process_id * per_process, (process_id + 1) * per_process)


def run_steps(setup, mesh, local_batch, steps=STEPS):
    """Runs `steps` train steps on `local_batch` (this process's rows); returns
    ({metric: [step]}, {trainable leaf path: [step, ...]}, the global batch), host numpy."""
    model, prompts, adapter, frozen, trainable, _ = setup
    tx = step_lib.optimizer(step_lib.schedules(prompt_lr=0.5, adapter_lr=1e-2, total_steps=50))
    train_step = step_lib.make_train_step(model=model, prompts=prompts, adapter=adapter, tx=tx,
                                          weights=step_lib.LossWeights(), mesh=mesh)
    state = parallel.replicate(step_lib.init_state(jax.tree.map(jnp.array, trainable), tx), mesh)
    frozen = parallel.replicate(frozen, mesh)
    global_batch = parallel.to_global(local_batch, mesh)
    history, params = {}, {}
    for _ in range(steps):
        state, metrics = train_step(state, frozen, global_batch)
        # Replicated outputs: every process holds the whole value on each of its devices.
        for name, value in metrics.items():
            history.setdefault(name, []).append(float(value.addressable_data(0)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.trainable):
            params.setdefault(jax.tree_util.keystr(path), []).append(
                np.asarray(leaf.addressable_data(0)))
    stack = lambda d: {k: np.stack(v) for k, v in d.items()}  # noqa: E731
    return stack(history), stack(params), global_batch


# ----------------------------------------------------------------------------- child side


def child_main(process_id, port, out_dir):
    """One of the 2 processes (started with 4 fake CPU devices by the test)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=NUM_PROCESSES, process_id=process_id)
    from jax.experimental import multihost_utils

    setup = build_setup()
    mesh = parallel.make_mesh()
    batch = setup[-1]
    local = {k: v[local_rows(process_id)] for k, v in batch.items()}
    history, params, global_batch = run_steps(setup, mesh, local)
    # Which global rows this process's devices hold, and the assembled global labels.
    label = global_batch["label"]
    held = sorted({(s.index[0].start, s.index[0].stop) for s in label.addressable_shards})
    np.savez(
        pathlib.Path(out_dir) / f"process_{process_id}.npz",
        device_count=jax.device_count(), local_device_count=jax.local_device_count(),
        process_count=jax.process_count(), process_index=jax.process_index(),
        mesh_data=mesh.shape[parallel.DATA], held_rows=np.asarray(held),
        global_labels=np.asarray(multihost_utils.process_allgather(label, tiled=True)),
        **{f"metric/{k}": v for k, v in history.items()},
        **{f"param/{k}": v for k, v in params.items()})
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------- parent side

# Tolerances (abs), each for what can differ at that point. Step 1 runs on identical params
# and batch: only the order of the cross-device sums differs (gloo between the processes),
# so its loss terms agree to float rounding. Every later value inherits that rounding
# through AdamW, whose first steps normalise each gradient entry (update ~ lr * sign(g)
# where |g| is tiny). Measured (2 processes x 4 devices against 8) on an AMD EPYC with
# XLA:CPU limited to SSE4.2, AVX and AVX2 (--xla_cpu_max_isa): step-1 losses <= 1.2e-7,
# params after step 1 <= 2.0e-6, step-2 losses <= 1.05e-5 (AVX), final params <= 3.2e-5
# (AVX; 1- vs 8-device runs in ONE process already differ by 1.2e-4 there). At 2 x 2
# against 4 (AMD EPYC, AVX2, the suite's flags): losses equal, params <= 1.2e-6. A child
# feeding the wrong half of the batch (both feeding rows 0-7) moves the step-1 losses and
# all params by >1e-2 (measured): 1000x ATOL_FIRST_STEP, 10x the others.
ATOL_FIRST_STEP = 1e-5
ATOL_AFTER_UPDATE = 1e-4
ATOL_FINAL_PARAMS = 1e-3


@contextlib.contextmanager
def _children(out_dir):
    """Starts the child processes; yields `wait()`, which waits for them (bounded) and
    checks their exit codes. Both are killed if anything fails or times out."""
    port, env = multihost.free_port(), multihost.child_env(DEVICES_PER_PROCESS)
    procs, logs = [], []
    deadline = time.monotonic() + CHILD_TIMEOUT_S

    def tail(pid):
        logs[pid].seek(0)
        return logs[pid].read().decode(errors="replace")[-4000:]

    def wait():
        # Poll, so that one child failing (the other then blocks in a collective or in
        # jax.distributed.initialize) fails the test at once instead of at the timeout.
        while any(proc.poll() is None for proc in procs):
            for pid, proc in enumerate(procs):
                assert proc.poll() in (None, 0), (
                    f"child {pid} exited with {proc.returncode}:\n{tail(pid)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"children still running after {CHILD_TIMEOUT_S} s:\n"
                                   + "\n".join(tail(pid) for pid in range(len(procs))))
            time.sleep(0.2)
        for pid, proc in enumerate(procs):
            assert proc.returncode == 0, f"child {pid} exited with {proc.returncode}:\n{tail(pid)}"

    try:
        for pid in range(NUM_PROCESSES):
            logs.append(open(out_dir / f"child_{pid}.log", "w+b"))
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(pid), str(port), str(out_dir)],
                cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        yield wait
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def test_two_processes_match_one_process(tmp_path):
    with _children(tmp_path) as wait_for_children:
        # The 1-process x 4-device reference, computed while the children run.
        setup = build_setup()
        mesh = parallel.make_mesh()
        assert mesh.shape[parallel.DATA] == NUM_PROCESSES * DEVICES_PER_PROCESS
        ref_history, ref_params, _ = run_steps(setup, mesh, setup[-1])
        wait_for_children()
    outs = [dict(np.load(tmp_path / f"process_{pid}.npz")) for pid in range(NUM_PROCESSES)]

    per_process = GLOBAL_BATCH // NUM_PROCESSES
    shard = GLOBAL_BATCH // mesh.shape[parallel.DATA]
    for pid, out in enumerate(outs):
        assert int(out["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert int(out["local_device_count"]) == DEVICES_PER_PROCESS
        assert int(out["process_count"]) == NUM_PROCESSES
        assert int(out["process_index"]) == pid
        assert int(out["mesh_data"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        # to_global puts process i's local rows at global rows [8i, 8i+8), 4 per local
        # device, so the assembled global batch is exactly the parent's batch.
        start = pid * per_process
        np.testing.assert_array_equal(
            out["held_rows"], [[r, r + shard] for r in range(start, start + per_process, shard)])
        np.testing.assert_array_equal(out["global_labels"], setup[-1]["label"])
        # Replicated outputs are identical on every process.
        assert out.keys() == outs[0].keys()
        for key in out:
            if key.startswith(("metric/", "param/")):
                np.testing.assert_array_equal(out[key], outs[0][key], err_msg=key)

    out = outs[0]
    assert {k.removeprefix("metric/") for k in out if k.startswith("metric/")} == set(ref_history)
    for name, ref in ref_history.items():
        np.testing.assert_allclose(out[f"metric/{name}"][0], ref[0], rtol=0,
                                   atol=ATOL_FIRST_STEP, err_msg=f"{name} (step 1)")
        np.testing.assert_allclose(out[f"metric/{name}"][1:], ref[1:], rtol=0,
                                   atol=ATOL_AFTER_UPDATE, err_msg=f"{name} (later steps)")
    assert {k.removeprefix("param/") for k in out if k.startswith("param/")} == set(ref_params)
    for name, ref in ref_params.items():
        np.testing.assert_allclose(out[f"param/{name}"][:-1], ref[:-1], rtol=0,
                                   atol=ATOL_AFTER_UPDATE, err_msg=f"{name} (before the last step)")
        np.testing.assert_allclose(out[f"param/{name}"][-1], ref[-1], rtol=0,
                                   atol=ATOL_FINAL_PARAMS, err_msg=f"{name} (final)")
    # The steps moved the params (else the comparison above would prove little).
    assert np.abs(ref_params["['context']"][-1] - np.asarray(setup[-2]["context"])).max() > 1e-3


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

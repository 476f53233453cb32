"""End-to-end training: exact resume after a real kill, MLflow contents, signals, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers.launch import GPTFORGE, config_errors, free_port, losses, run_train


def test_resume_after_kill_is_exact(tmp_path, write_config):
    """2N steps straight == N steps, SIGKILL (losing steps N+1, N+2), resume: identical loss every step."""
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    common = dict(train={"max_steps": 12, "eval_interval": 0}, checkpoint={"interval": 6, "keep_last": 2},
                  model={"preset": "tiny", "dropout": 0.1})  # dropout: the RNG state must be restored too
    a = write_config("a.yaml", run_dir=straight_dir, **common)
    b = write_config("b.yaml", run_dir=resumed_dir, **common, mlflow={"enabled": True})
    proc = run_train(a)
    assert proc.returncode == 0, proc.stderr
    proc = run_train(b, fault="sigkill@8")
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(os.listdir(resumed_dir / "checkpoints"))
    assert ckpts == ["step_00000006"]
    proc = run_train(b, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_00000006" in proc.stdout
    want, got = losses(straight_dir), losses(resumed_dir)
    assert sorted(got) == list(range(1, 13))
    assert got == want  # exact equality, fp32 on CPU
    assert want[12] < want[1]

    # The resumed job continued the same MLflow run, which now holds all 12 steps.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{resumed_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, 13))
    assert {m.step: m.value for m in history}[12] == pytest.approx(want[12])
    assert run.data.params["train.max_steps"] == "12" and run.data.params["model.n_layer"] == "2"
    assert run.data.params["model.preset"] == "tiny" and "optim.warmup_tokens" in run.data.params
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_peak_rss_gib"):
        assert key in run.data.metrics
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config", "tokenizer", "plots"} <= artifacts
    assert [f.path for f in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss_curve.png"]


def test_torn_save_is_never_picked_up(tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 8, "eval_interval": 0}, checkpoint={"interval": 4})
    proc = run_train(cfg, fault="sigkill-in-save@8")
    assert proc.returncode == -signal.SIGKILL
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names == [".tmp-step_00000008", "step_00000004"]
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000004", "step_00000008"]


def test_sigterm_saves_and_exits(tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 20, "eval_interval": 0}, checkpoint={"interval": 100})
    proc = run_train(cfg, fault="sigterm@3")
    assert proc.returncode == 0, proc.stderr
    assert "stop requested by signal" in proc.stdout
    # The signal came during step 3; the ranks' vote on it is read at the end of the next step, which is saved.
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000004"]
    state = json.load(open(run_dir / "checkpoints" / "step_00000004" / "trainer_state.json"))
    assert state["step"] == 4 and state["consumed_samples"] == 16 and state["tokens_seen"] == 16 * 32


def test_user_callback_from_config_runs(tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 5, "eval_interval": 0, "callbacks": ["helpers.faults:StepCounter"]},
                       checkpoint={"interval": 2, "async_save": False})  # a background save commits when done
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    hooks = (run_dir / "hooks.txt").read_text().splitlines()
    # the checkpoint of a step is written after that step's on_step_end (user callbacks run before it)
    assert hooks == ["start", "step 1", "step 2", "checkpoint 2", "step 3", "step 4", "checkpoint 4", "step 5",
                     "checkpoint 5", "end 5"]


def test_stop_signal_handlers_are_put_back():
    from gptforge.training.callbacks.signals import STOP_SIGNALS, StopOnSignal

    def before(signum, frame):
        raise AssertionError("the stop callback's handler should be the one installed")

    saved = {sig: signal.signal(sig, before) for sig in STOP_SIGNALS}
    try:
        callback = StopOnSignal()
        callback.on_train_start(None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.requested
        callback.close(None)
        assert all(signal.getsignal(sig) is before for sig in STOP_SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_bad_callback_entry_is_a_config_error(tmp_path, write_config):
    cfg = write_config(run_dir=tmp_path / "run")
    (err,) = config_errors(cfg, ['train.callbacks=["helpers.no_such_module:X"]'])
    assert err.startswith("train.callbacks[0]: cannot import module 'helpers.no_such_module'")
    (err,) = config_errors(cfg, ['train.callbacks=["helpers.faults:FaultInjection", "helpers.faults:Nope", '
                                 '"os:path", "helpers.faults"]'])
    assert "train.callbacks[0]" not in err
    assert "train.callbacks[1]: module 'helpers.faults' has no attribute 'Nope'" in err
    assert "train.callbacks[2]: os:path is not a subclass of gptforge.training.callbacks.Callback" in err
    assert "train.callbacks[3]: expected 'package.module:Class', got 'helpers.faults'" in err


def test_tracking_server_down_never_stops_training(tmp_path, write_config):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 4, "eval_interval": 0},
                       mlflow={"enabled": True, "tracking_uri": f"http://127.0.0.1:{port}"})
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    assert "MLflow" in proc.stderr and "training continues" in proc.stderr
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["final_step"] == 4 and summary["mlflow_dropped_calls"] > 0


def test_checkpoint_of_another_shape_is_refused(tmp_path, write_config):
    run_dir = tmp_path / "run"
    proc = run_train(write_config(run_dir=run_dir, train={"max_steps": 4, "eval_interval": 0}))
    assert proc.returncode == 0, proc.stderr
    bigger = write_config("big.yaml", run_dir=run_dir, model={"preset": "tiny", "n_layer": 3},
                          train={"max_steps": 8, "eval_interval": 0})
    proc = run_train(bigger)
    assert proc.returncode == 2
    assert "holds a model of another shape" in proc.stderr and "n_layer: checkpoint 2 vs config 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_train(bigger, "--resume", "none")
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


def test_loss_drops_and_validation_runs(tmp_path, write_config):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 40, "eval_interval": 20, "log_interval": 10},
                       optim={"warmup_tokens": 1024, "decay_tokens": 40 * 4 * 32})
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    # Only the log steps are read back from the device and recorded
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert all({"loss", "grad_norm", "tokens_per_s", "step_time_s", "memory_peak_rss_gib"} <= set(r) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert os.path.getsize(run_dir / "loss_curve.png") > 1000


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, write_config, precision):
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, train={"max_steps": 6, "eval_interval": 3, "precision": precision})
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    if precision == "fp16":
        assert all("loss_scale" in r for r in records)


def test_two_rank_data_parallel_matches_one_process(tmp_path, write_config):
    """dp=2 (gloo, two processes) against one process with gradient accumulation: same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train={"max_steps": 5, "eval_interval": 5, "global_batch_size": 4, "micro_batch_size": 1})
    proc = run_train(write_config("one.yaml", run_dir=one, **common))
    assert proc.returncode == 0, proc.stderr
    cfg = write_config("two.yaml", run_dir=two, **common)
    proc = run_train(cfg, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6)
    va = [json.loads(l).get("val_loss") for l in open(one / "metrics.jsonl")][-1]
    vb = [json.loads(l).get("val_loss") for l in open(two / "metrics.jsonl")][-1]
    assert vb == pytest.approx(va, rel=1e-6)


def test_compile_matches_eager(tmp_path, write_config):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = dict(train={"max_steps": 3, "eval_interval": 0})
    assert run_train(write_config("e.yaml", run_dir=eager, **common)).returncode == 0
    cfg = write_config("c.yaml", run_dir=compiled, train=common["train"] | {"compile": True})
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(eager), losses(compiled)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)


def test_tracking_server_from_environment(tmp_path, write_config):
    """MLFLOW_TRACKING_URI points at a real MLflow server on 127.0.0.1: the run lands there."""
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "MLflow server did not start"
                time.sleep(1)
        run_dir = tmp_path / "run"
        cfg = write_config(run_dir=run_dir, train={"max_steps": 3, "eval_interval": 0},
                           mlflow={"enabled": True, "experiment": "served"})
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
        proc = subprocess.run(GPTFORGE + ["train", "--config", cfg], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert not (run_dir / "mlflow.db").exists()  # nothing embedded when a server is given
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
        assert "plots" in {f.path for f in client.list_artifacts(run.info.run_id)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_batch_ramp_and_keep_last(tmp_path, write_config):
    run_dir = tmp_path / "run"
    # 64-token start (2 sequences of 32), full 8 sequences after 512 tokens; batch multiple 2 (micro 2, 1 rank)
    cfg = write_config(run_dir=run_dir, train={"max_steps": 6, "eval_interval": 0, "global_batch_size": 8},
                       optim={"batch_ramp_start_tokens": 64, "batch_ramp_tokens": 512},
                       checkpoint={"interval": 2, "keep_last": 1})
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    batches = [r["batch_size"] for r in records]
    # 2 + 6 x tokens_seen / 512 sequences, rounded down to a multiple of 2; tokens seen before each step:
    # 0, 64, 128, 192, 320, 448
    assert batches == [2, 2, 2, 4, 4, 6]
    assert [r["tokens_seen"] for r in records] == [64, 128, 192, 320, 448, 640]
    assert os.listdir(run_dir / "checkpoints") == ["step_00000006"]
    state = json.load(open(run_dir / "checkpoints" / "step_00000006" / "trainer_state.json"))
    assert state["consumed_samples"] == sum(batches)

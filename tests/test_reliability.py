"""Faults: kill -9 at random moments, torn checkpoints, non-finite losses, full disks, and no network."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, assert_user_error, gptkit_cmd, run_cli, run_interrupted, tiny_recipe


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text(SHAKESPEARE.read_text()[:6_000])
    return p


TRAIN = {"max_steps": 40, "save_every": 5, "eval_every": 5, "eval_batches": 20, "grad_accum": 2}
MODEL = {"dropout": 0.1}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path, small_corpus):
    """SIGKILL a real training process at random steps (mid-step, mid-evaluation, around checkpoint writes);
    each --resume continues from the last complete checkpoint, loses at most save_every steps, and the
    final model is bit-identical to an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every process: same float sums
    ref = tiny_recipe(tmp_path / "ref.yaml", small_corpus, tmp_path / "ref", train=TRAIN, model=MODEL)
    subprocess.run([*gptkit_cmd(), "pretrain", str(ref)], env=env, check=True, capture_output=True, timeout=300)
    recipe = tiny_recipe(tmp_path / "cut.yaml", small_corpus, tmp_path / "cut", train=TRAIN, model=MODEL)
    run = tmp_path / "cut"
    rng = random.Random(0)
    kills = sorted(rng.sample(range(6, 38), 3))
    report = []
    for target in kills:
        have_ckpt = run.joinpath("checkpoints").is_dir() and any(run.joinpath("checkpoints").glob("step-*"))
        args = [*gptkit_cmd(), "pretrain", str(recipe), *(["--resume"] if have_ckpt else ["--overwrite"])]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= target:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sorted(int(p.name.split("-")[1]) for p in run.joinpath("checkpoints").glob("step-*"))
        reached = max(losses(run), default=0)
        assert done and reached - done[-1] <= TRAIN["save_every"], (reached, done)  # at most one interval lost
        report.append((target, reached, done[-1]))
    code = subprocess.run([*gptkit_cmd(), "pretrain", str(recipe), "--resume"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    assert losses(run) == losses(tmp_path / "ref"), report
    assert same_weights(run, tmp_path / "ref"), report


def test_torn_checkpoints_are_detected_and_skipped(tmp_path, small_corpus, caplog, monkeypatch):
    """A kill mid-write leaves a .tmp folder; a damaged newest checkpoint fails its manifest. Resume
    reports both, uses the previous complete checkpoint, and still matches the uninterrupted run."""
    from gptkit import engine

    train = {**TRAIN, "max_steps": 20}
    ref = tiny_recipe(tmp_path / "ref.yaml", small_corpus, tmp_path / "ref", train=train, model=MODEL)
    assert run_cli("pretrain", str(ref))[0] == 0
    recipe = tiny_recipe(tmp_path / "cut.yaml", small_corpus, tmp_path / "cut", train=train, model=MODEL)
    real = engine.lr_at
    monkeypatch.setattr(engine, "lr_at", lambda it, cfg: (os.kill(os.getpid(), signal.SIGTERM) if it == 11 else None)
                        or real(it, cfg))
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 128 + signal.SIGTERM, err
    monkeypatch.setattr(engine, "lr_at", real)
    ckpts = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000010", "step-00000012"]
    # what a kill during a write leaves behind, and a damaged newest checkpoint
    torn = ckpts / ".tmp-step-00000015"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half a file")
    newest = ckpts / "step-00000012" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="gptkit"):
        code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert code == 0, err
    assert "skipping checkpoint step-00000012: optimizer.pt has 100 bytes" in caplog.text
    assert "removing incomplete checkpoint .tmp-step-00000015" in caplog.text
    assert not torn.exists()
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    assert same_weights(tmp_path / "cut", tmp_path / "ref")


def test_a_nonfinite_gradient_under_a_finite_loss_is_skipped_like_a_nonfinite_loss(tmp_path, small_corpus,
                                                                                     monkeypatch):
    """An overflow in backward: the loss is finite, a gradient is NaN. The update was applied, the next checkpoint
    held NaN weights and was then called the last good one; now the step is skipped (or stops the run) as a
    non-finite loss's."""
    from gptkit import engine

    real, calls = engine.causal_lm_loss, {"n": 0}

    def nan_gradient_at_step_7(model, batch):  # grad_accum=2: micro-batch 13 is step 7's
        calls["n"] += model.training
        loss = real(model, batch)
        if model.training and calls["n"] == 13:
            w = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + 0.0 * torch.sqrt((w - w.detach()).abs()).sum()  # d sqrt at 0 is inf: 0 * inf = NaN
        return loss

    monkeypatch.setattr(engine, "causal_lm_loss", nan_gradient_at_step_7)
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={**TRAIN, "max_steps": 12})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 3 and "non-finite gradient at step 7" in err, err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]
    calls["n"] = 0  # without clipping (no total norm to read: each gradient's norm is taken)
    code, _, err = run_cli("pretrain", str(recipe), "--overwrite", "train.skip_nonfinite=1", "train.grad_clip=0")
    assert code == 0, err
    assert 7 not in losses(tmp_path / "run")
    assert all(bool(v.isfinite().all()) for v in weights(tmp_path / "run").values())


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_corpus, monkeypatch, caplog):
    from gptkit import engine

    real = engine.causal_lm_loss
    calls, bad = {"n": 0}, {13, 14}

    def nan_at_step_7(model, batch):  # grad_accum=2: two micro-batches per step
        calls["n"] += model.training
        loss = real(model, batch)
        return loss * float("nan") if model.training and calls["n"] in bad else loss

    monkeypatch.setattr(engine, "causal_lm_loss", nan_at_step_7)
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={**TRAIN, "max_steps": 12})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 3 and "Traceback" not in err
    assert "non-finite loss at step 7" in err
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-00000005'}" in err, err
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005"]  # the last good one; nothing from the bad step was saved
    # allowing one skip: the run finishes and step 7 is absent from the log
    calls["n"] = 0
    code, _, err = run_cli("pretrain", str(recipe), "--overwrite", "train.skip_nonfinite=1")
    assert code == 0, err
    steps = losses(tmp_path / "run")
    assert 7 not in steps and 12 in steps and all(v == v for v in steps.values())
    # a skipped step is still a step: at a save step and at the last one, the checkpoint, evaluation and final save
    calls["n"] = 0
    bad |= {19, 20}  # step 10 too
    with caplog.at_level("WARNING", logger="gptkit"):
        code, _, err = run_cli("pretrain", str(recipe), "--overwrite", "train.skip_nonfinite=2", "train.max_steps=10")
    assert code == 0 and "non-finite loss at step 10" in caplog.text, err
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 10 and "val_loss" in r for r in logged)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_nan_validation_figure_is_never_the_best(tmp_path):
    """A NaN metric at the first evaluation does not become the best (every later comparison with NaN is False: no
    evaluation could improve on it, and patience would stop the run on the NaN weights)."""
    from accelerate import Accelerator

    from gptkit import engine
    from gptkit.recipe import TrainConfig

    model, saved = torch.nn.Linear(2, 2), []
    job = engine.Job(model=model, train_data=None, val_data=None, cfg=TrainConfig(), run_dir=tmp_path,
                     select="val_score", select_higher=True, patience=2,
                     save=lambda raw, folder, state: (folder.mkdir(parents=True), saved.append(folder.name)))
    counters: dict = {}
    stops = [engine._track_best(job, model, Accelerator(cpu=True), {"val_score": v}, counters, step)
             for step, v in ((2, float("nan")), (4, 0.5), (6, 0.6))]
    assert stops == [False, False, False] and (counters["best"], counters["best_step"], counters["stale"]) == (0.6, 6, 0)
    assert saved == [".best.tmp", ".best.tmp"]


def test_checkpoints_pruned_never_push_out_good_ones_for_a_newer_broken_one(tmp_path):
    """A resume that fell back past a broken step-10 saves steps 7, 8, ...: keep_last counts those and the older
    good ones, not step-10 (an abandoned timeline), so the checkpoint just written is never the one deleted."""
    from gptkit import checkpoint

    root = tmp_path / "checkpoints"
    for step in (5, 10, 7, 8):
        checkpoint.tmp_dir(root, step).mkdir(parents=True)
        (checkpoint.tmp_dir(root, step) / "model.safetensors").write_bytes(b"w" * step)
        if step == 10:
            checkpoint.finalize(root, step, keep_last=5)
            (root / "step-00000010" / "model.safetensors").write_bytes(b"torn")
            assert checkpoint.latest(root).name == "step-00000005"
            continue
        checkpoint.finalize(root, step, keep_last=1 if step == 7 else 2)
        if step == 7:
            assert sorted(p.name for p in root.iterdir()) == ["step-00000007", "step-00000010"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000007", "step-00000008", "step-00000010"]
    assert checkpoint.latest(root).name == "step-00000008"


def test_refuses_to_start_without_disk_space(tmp_path, small_corpus, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run")
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 2 and "has 1.0 kB free" in err and "train.keep_last" in err  # not "0.00 GB"
    assert not (tmp_path / "run").exists()


def nan_after(monkeypatch, step: int) -> None:
    """Every training loss is NaN from optimizer step ``step`` on (grad_accum 1)."""
    from gptkit import engine

    real, calls = engine.causal_lm_loss, {"n": 0}

    def loss(model, batch):
        calls["n"] += model.training
        return real(model, batch) * (float("nan") if model.training and calls["n"] >= step else 1.0)

    monkeypatch.setattr(engine, "causal_lm_loss", loss)


def test_overwrite_deletes_the_old_run_only_once_the_new_one_has_a_checkpoint(tmp_path, small_corpus, monkeypatch):
    train = {"max_steps": 10, "save_every": 5, "eval_every": 5}
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train=train)
    assert run_cli("pretrain", str(recipe))[0] == 0
    old = weights(tmp_path / "run")
    # the new run stops before its first checkpoint: the old run is back, whole
    with monkeypatch.context() as m:
        nan_after(m, 2)
        code, _, err = run_cli("pretrain", str(recipe), "--overwrite", "train.lr=0.02")
    assert code == 3 and "non-finite loss at step 2" in err and "no checkpoint was written yet" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "small.txt"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert (tmp_path / "run" / "loss.png").is_file() and "lr: 0.01" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert weights(tmp_path / "run").keys() == old.keys() and all(torch.equal(weights(tmp_path / "run")[k], old[k])
                                                                  for k in old)
    # once it has a checkpoint of its own, the new run is the run, even if it stops later
    with monkeypatch.context() as m:
        nan_after(m, 7)
        code, _, err = run_cli("pretrain", str(recipe), "--overwrite", "train.lr=0.02")
    assert code == 3 and "non-finite loss at step 7" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", "small.txt"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]
    assert "lr: 0.02" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_with_overwrite(tmp_path, small_corpus, monkeypatch):
    """Not a loop between "already holds a run; pass --resume" and "--resume: no checkpoint"."""
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 10})
    with monkeypatch.context() as m:
        nan_after(m, 2)
        assert run_cli("pretrain", str(recipe))[0] == 3
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert_user_error(code, err, "--resume: no complete checkpoint in", "start it again with --overwrite")
    assert run_cli("pretrain", str(recipe), "--overwrite")[0] == 0


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, small_corpus, monkeypatch):
    """torch.save on a full disk raises "basic_ios::clear: iostream error": the run stops (exit 3) naming the disk and
    the last good checkpoint, the torn one removed; a --resume once there is space finishes the run."""
    from gptkit import engine

    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("step-00000010/optimizer.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f, *args, **kwargs)

    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 12, "save_every": 5})
    with monkeypatch.context() as m:
        m.setattr(engine.torch, "save", full_disk)
        code, _, err = run_cli("pretrain", str(recipe))
    assert code == 3 and "Traceback" not in err, err
    line = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(line) == 1 and "could not write checkpoint step-00000010: basic_ios::clear: iostream error" in line[0]
    assert "free on that disk" in line[0] and f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints'}" in line[0]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").is_file()


FAIL_ON_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":
    import torch
    _save = torch.save
    def save(obj, f, *args, **kwargs):
        if str(f).endswith("step-00000010/rng-1.pt"):
            raise OSError(28, "No space left on device")
        return _save(obj, f, *args, **kwargs)
    torch.save = save
'''


def test_a_write_failure_on_one_of_two_processes_stops_both_with_one_line(tmp_path, small_corpus):
    """Process 1 cannot write its part of a checkpoint: both processes learn it at the same point (the main one
    says another could not write) and stop with exit 3, the torn checkpoint removed, instead of process 0 waiting
    in the next collective for a peer that has gone."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 12, "save_every": 5})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    started = time.time()
    res = subprocess.run([*torchrun, "-m", "gptkit", "pretrain", str(recipe)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)})
    assert res.returncode != 0 and time.time() - started < 200, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error: could not write checkpoint step-00000010" in line]
    assert any("No space left on device" in line for line in errors), res.stderr[-3000:]
    assert any("1 other process could not write" in line for line in errors), res.stderr[-3000:]
    assert all(f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-00000005'}" in line
               for line in errors)
    assert "gptkit/" not in res.stderr  # torchrun's own summary aside, no traceback
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]


class _TwoProcesses:
    """An accelerator of two processes; the other one reports ``peer`` = [could not write, failed otherwise]."""
    num_processes, device = 2, torch.device("cpu")

    def __init__(self, peer: list[float]):
        self.peer, self.reduced = torch.tensor(peer), False

    def reduce(self, tensor, op):
        assert op == "sum"
        self.reduced = True
        return tensor + self.peer


def test_an_error_while_saving_is_agreed_by_every_process_before_anything_is_raised():
    """A write error, or any other exception, on one process: every process reaches the same all-reduce, so none is
    left waiting in a collective for a peer that has gone; a bug is raised where it happened, the others stop with
    one line."""
    from gptkit.engine import _on_every_process
    from gptkit.errors import TrainingStopped

    def bug():
        raise ValueError("a bug in save_pretrained")

    def full():
        raise OSError(28, "No space left on device")

    here = _TwoProcesses([0.0, 0.0])
    with pytest.raises(ValueError, match="a bug in save_pretrained"):
        _on_every_process(here, bug)
    assert here.reduced
    with pytest.raises(TrainingStopped, match="1 other process failed while saving"):
        _on_every_process(_TwoProcesses([0.0, 1.0]), lambda: None)
    assert _on_every_process(_TwoProcesses([0.0, 0.0]), full).errno == 28
    assert "1 other process could not write" in str(_on_every_process(_TwoProcesses([1.0, 0.0]), lambda: None))
    assert _on_every_process(_TwoProcesses([0.0, 0.0]), lambda: None) is None


def test_the_model_is_saved_before_the_plot_which_is_best_effort(tmp_path, small_corpus, monkeypatch, caplog):
    """loss.png on a full disk is a warning, after the model is saved; a model that cannot be saved is one line
    (exit 3) and a --resume writes it from the last checkpoint."""
    from matplotlib.figure import Figure

    from gptkit import trained

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 4, "save_every": 2})
    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="gptkit"):
        m.setattr(Figure, "savefig", no_space)
        code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    assert "loss.png not written (No space left on device)" in caplog.text
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / "loss.png").exists()
    with monkeypatch.context() as m:
        m.setattr(trained, "save", no_space)
        code, _, err = run_cli("pretrain", str(recipe), "--overwrite")
    assert code == 3 and "Traceback" not in err, err
    assert f"could not write the model to {tmp_path / 'run'}: No space left on device" in err
    assert "checkpoint step-00000004 holds the weights" in err and "--resume" in err
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_resume_drops_a_torn_last_metrics_line(tmp_path, small_corpus, monkeypatch):
    """A kill (or a full disk) mid-write leaves half a line at the end of metrics.jsonl: what --resume is for."""
    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 10, "save_every": 5})
    run_interrupted(monkeypatch, "pretrain", str(recipe), at=6)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "train_lo')
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert code == 0, err
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))


GUARD = '''
import os, socket
_log = os.environ["GPTKIT_SOCKET_LOG"]
def _blocked(what):
    with open(_log, "a") as fh:
        fh.write(what + "\\n")
    raise OSError("network blocked by test: " + what)
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _blocked("connect %r" % (address,))
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: connect(self, address)
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *a, **k):
    if host not in (None, "localhost", "127.0.0.1", "::1"):
        _blocked("getaddrinfo %r" % (host,))
    return _getaddrinfo(host, *a, **k)
socket.getaddrinfo = getaddrinfo
'''


def test_no_network_is_attempted(tmp_path, small_corpus):
    """pretrain -> finetune -> eval -> generate in child processes whose sockets are guarded: no connection
    is attempted."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(textwrap.dedent(GUARD))
    log = tmp_path / "sockets.log"
    # the network is allowed (no HF_HUB_OFFLINE): with local folders, nothing may reach for it all the same
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=f"{guard}{os.pathsep}{env.get('PYTHONPATH', '')}", GPTKIT_SOCKET_LOG=str(log))
    from tasks_helpers import finetune_recipe, translate_rows, write_jsonl

    recipe = tiny_recipe(tmp_path / "r.yaml", small_corpus, tmp_path / "run", train={"max_steps": 3})
    splits = {s: write_jsonl(tmp_path / f"{s}.jsonl", translate_rows(8, i)) for i, s in
              enumerate(("train", "validation", "test"))}
    ft = finetune_recipe(tmp_path, "ft", "translate", tmp_path / "run", splits,
                         train={"max_steps": 2, "eval_every": 2, "save_every": 2, "batch_size": 4},
                         finetune={"max_new_tokens": 4})
    steps = (["pretrain", str(recipe)],
             ["finetune", str(ft)],
             ["eval", "--model", str(tmp_path / "ft"), "--split", "test", "--max-new-tokens", "4"],
             ["generate", str(tmp_path / "run"), "--prompt", "To be", "--max-new-tokens", "5"])
    for args in steps:  # the whole path: pretrain -> finetune -> eval, and sampling
        res = subprocess.run([*gptkit_cmd(), *args], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (args[0], res.stderr[-2000:])
    assert list((tmp_path / "ft").glob("eval-*/metrics.json"))
    # the guard is live in the children (it would have logged), and nothing tried the network
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('example.com', 80))"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    lines = log.read_text().splitlines()
    assert lines == ["getaddrinfo 'example.com'"], lines


def test_best_model_is_judged_on_the_same_sample_when_the_last_evaluation_reads_the_whole_split(tmp_path):
    """With train.full_final_eval the last validation loss is the whole split's, the earlier ones a seeded sample's:
    best/ must compare the sample's figure at every step (a split whose sample happens to score lower than the whole
    would otherwise never let the final model be the best, or the other way round always make it so)."""
    from accelerate import Accelerator

    from gptkit import engine
    from gptkit.recipe import TrainConfig

    class Values:  # one number per example; the loss of a batch is the sum of its numbers
        values = torch.arange(40, dtype=torch.float64)

        def __len__(self):
            return len(self.values)

        def batch(self, idx):
            return {"x": self.values[idx]}

    cfg = TrainConfig(batch_size=2, eval_batches=1, full_final_eval=True)
    job = engine.Job(model=torch.nn.Linear(2, 2), train_data=None, val_data=Values(), cfg=cfg, run_dir=tmp_path,
                     select="val_loss", loss_fn=lambda model, batch: batch["x"].sum(), count_fn=lambda b: len(b["x"]))
    acc = Accelerator(cpu=True)
    sampled, _ = engine._validate(job, job.model, acc, final=False)
    logged, judged = engine._validate(job, job.model, acc, final=True)
    assert logged["val_loss"] == 19.5 != sampled["val_loss"]  # the whole split's mean is logged ...
    assert judged["val_loss"] == sampled["val_loss"]  # ... best/ judges the sample's
    job.select = "val_accuracy"  # a metric that is not the loss: nothing extra is computed
    job.evaluate = lambda raw: {"accuracy": 0.5}
    logged, judged = engine._validate(job, job.model, acc, final=True)
    assert judged == logged and logged["val_loss"] == 19.5

"""Sharded training (distributed.strategy: fsdp) on 2 CPU processes with torchrun (gloo): torch's FSDP2
``fully_shard``, as Accelerate applies it on GPUs. Losses equal a 1-process run with the same global batch,
a resume reads the sharded checkpoint exactly, the run folder is a full model plain transformers loads, and
LoRA under FSDP2 fine-tunes and saves its adapters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe
from tasks_helpers import finetune_recipe, pretrained_base, read_test_metrics, splits, translate_rows

pytestmark = pytest.mark.distributed
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(args: list[str], processes: int = 2, port: int = 29561) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(port)] if processes > 1 else [sys.executable]
    res = subprocess.run([*torchrun, "-m", "gptkit", *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run) if key in r}


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_fsdp_pretraining_matches_one_process_and_resumes_exactly(tmp_path, corpus):
    train = {"max_steps": 6, "grad_accum": 2, "eval_every": 3, "save_every": 3, "keep_last": 5, "log_every": 1}
    two = tiny_recipe(tmp_path / "two.yaml", corpus, tmp_path / "two", train={**train, "batch_size": 4},
                      model={"tie_embeddings": True}, distributed={"strategy": "fsdp"})
    one = tiny_recipe(tmp_path / "one.yaml", corpus, tmp_path / "one", train={**train, "batch_size": 8},
                      model={"tie_embeddings": True})
    out = launch(["pretrain", str(two)])
    assert "FSDP2 on 2 CPU processes" in out.stderr
    launch(["pretrain", str(one)], processes=1)
    a, b = tmp_path / "one", tmp_path / "two"
    for key in ("train_loss", "val_loss"):
        assert losses(b, key) == pytest.approx(losses(a, key), rel=1e-5), key
    # every process wrote its shards; the run folder is one full model, tied head and all
    ckpt = b / "checkpoints" / "step-00000003"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(b))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight is model.transformer.wte.weight
    assert json.loads((b / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

    # resume from the step-3 shards on 2 processes: steps 4-6 and the final weights are exactly the uninterrupted run's
    cut = tmp_path / "cut"
    shutil.copytree(b, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    for f in ("model.safetensors", "config.json"):
        (cut / f).unlink()
    (tmp_path / "cut.yaml").write_text((tmp_path / "two.yaml").read_text().replace(str(b), str(cut)))
    (cut / "recipe.yaml").write_text((cut / "recipe.yaml").read_text().replace(str(b), str(cut)))
    launch(["pretrain", str(tmp_path / "cut.yaml"), "--resume"])
    assert losses(cut) == losses(b)
    wc = weights(cut)
    assert all(bool((wc[k] == wb[k]).all()) for k in wb)


def test_lora_under_fsdp_matches_one_process(tmp_path):
    """LoRA adapters and a frozen base sharded together: validation (every rank generates in lockstep), the best
    adapters and the test scores agree with a 1-process run; the adapters load with peft."""
    base = pretrained_base(tmp_path)
    s = splits(tmp_path, translate_rows, 200)
    runs = {}
    for name, batch, procs in (("two", 4, 2), ("one", 8, 1)):
        recipe = finetune_recipe(tmp_path, name, "translate", base, s,
                                 finetune={"method": "lora", "lora_dropout": 0.0, "eval_examples": 8,
                                           "max_new_tokens": 8},
                                 train={"max_steps": 20, "eval_every": 10, "save_every": 10, "batch_size": batch,
                                        "log_every": 5, "lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0,
                                        "schedule": "constant"},
                                 distributed={"strategy": "fsdp"} if procs > 1 else {})
        launch(["finetune", str(recipe)], processes=procs, port=29562)
        runs[name] = (rows(tmp_path / name), read_test_metrics(tmp_path / name))
    (m2, t2), (m1, t1) = runs["two"], runs["one"]
    # a small learning rate keeps both runs' weights equal to float rounding, so the generated text must agree
    # (greedy decoding of a barely trained model flips on larger differences)
    for key, tol in (("train_loss", 1e-5), ("val_loss", 1e-5), ("val_chrf", 1e-6)):
        got, want = [r[key] for r in m2 if key in r], [r[key] for r in m1 if key in r]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=tol, abs=tol), key
    assert t2 == pytest.approx(t1, abs=1e-6)
    for folder in (tmp_path / "two", tmp_path / "two" / "best"):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path / "two")).r == 16


def test_gpu_plugins_are_built_from_the_recipe(monkeypatch):
    """What a GPU run hands Accelerate (no GPU here): the FSDP2 plugin and its hybrid mesh, the DeepSpeed plugin
    from the shipped ZeRO configs with the recipe's batch, accumulation and clipping in place of "auto"."""
    import torch

    from gptkit import distributed
    from gptkit.cli import bundled_recipes_dir
    from gptkit.recipe import DistributedConfig, TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "16")
    train = TrainConfig(batch_size=6, grad_accum=3, grad_clip=0.5)
    kw = distributed.accelerator_kwargs(train, DistributedConfig(strategy="fsdp", reshard_after_forward=False,
                                                                 replicas=2))
    plugin = kw["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
    assert (kw["parallelism_config"].dp_replicate_size, kw["parallelism_config"].dp_shard_size) == (2, 8)
    assert distributed.accelerator_kwargs(train, DistributedConfig()) == {}
    root = bundled_recipes_dir() / "accelerate" / "deepspeed"
    for stage in (2, 3):
        cfg = DistributedConfig(strategy="deepspeed", deepspeed_config=str(root / f"zero{stage}.json"))
        ds = distributed.accelerator_kwargs(train, cfg)["deepspeed_plugin"]
        c = ds.deepspeed_config
        assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["gradient_clipping"]) == \
            (6, 3, 0.5)
        assert ds.zero_stage == stage


def test_deepspeed_steps_once_per_accumulated_step():
    """Accelerate's DeepSpeed wrapper steps the engine inside backward whenever sync_gradients holds, and gptkit
    does not use accelerator.accumulate(): every micro-batch was an optimizer step. A stand-in accelerator whose
    backward does what Accelerate's DeepSpeed path does (engine boundary and step from sync_gradients) counts the
    engine steps of one gptkit step of 3 micro-batches: one, at the last; the gradient is the whole batch's."""
    import contextlib
    from types import SimpleNamespace

    import torch
    from accelerate.state import GradientState
    from accelerate.utils import DistributedType

    from gptkit import engine

    class Engine:
        def __init__(self):
            self.boundaries, self.steps = [], 0

        def set_gradient_accumulation_boundary(self, is_boundary):
            self.boundaries.append(is_boundary)

    ds, gradient_state = Engine(), GradientState()

    def backward(loss):  # accelerate's Accelerator.backward -> DeepSpeedEngineWrapper.backward
        ds.set_gradient_accumulation_boundary(is_boundary=gradient_state.sync_gradients)
        (loss / 3).backward()  # the engine divides by gradient_accumulation_steps
        ds.steps += gradient_state.sync_gradients

    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"), distributed_type=DistributedType.DEEPSPEED,
                          gradient_state=gradient_state, backward=backward, no_sync=lambda m: contextlib.nullcontext(),
                          autocast=lambda: torch.autocast("cpu", enabled=False), state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={
                              "gradient_accumulation_steps": 3})))
    model = torch.nn.Linear(4, 1)
    batches = [{"x": torch.randn(2, 4)} for _ in range(3)]
    engine.backward_step(model, batches, lambda m, b: m(b["x"]).sum(), lambda b: 2, acc)
    assert (ds.boundaries, ds.steps, gradient_state.sync_gradients) == ([False, False, True], 1, True)
    whole = torch.nn.Linear(4, 1)
    whole.load_state_dict(model.state_dict())
    whole(torch.cat([b["x"] for b in batches])).sum().div(6).backward()
    assert torch.allclose(model.weight.grad, whole.weight.grad, atol=1e-6)


def test_shipped_accelerate_config_and_cpu_refusals(tmp_path, corpus):
    from accelerate.commands.config.config_args import load_config_from_file

    from conftest import assert_user_error, run_cli
    from gptkit.cli import bundled_recipes_dir

    cfg = load_config_from_file(str(bundled_recipes_dir() / "accelerate" / "fsdp2.yaml"))
    assert str(cfg.distributed_type).endswith("FSDP") and cfg.fsdp_config["fsdp_version"] == 2
    assert "accelerate" not in run_cli("recipes")[1]  # launcher configs are not recipes
    ds = tiny_recipe(tmp_path / "ds.yaml", corpus, tmp_path / "ds", distributed={
        "strategy": "deepspeed", "deepspeed_config": str(bundled_recipes_dir() / "accelerate/deepspeed/zero2.json")})
    code, _, err = run_cli("pretrain", str(ds))
    assert_user_error(code, err, "distributed.strategy: deepspeed needs CUDA GPUs")
    assert not (tmp_path / "ds").exists()
    bad = tiny_recipe(tmp_path / "bad.yaml", corpus, tmp_path / "bad", distributed={"strategy": "deepspeed"})
    assert_user_error(*run_cli("pretrain", str(bad))[::2], "deepspeed_config")


def test_replicas_that_do_not_divide_the_processes_are_refused_before_the_run_folder(tmp_path, corpus):
    """Refused by every rank before anything is written: the run folder it used to leave made the corrected command
    fail too ("already holds a run")."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"max_steps": 2},
                         distributed={"strategy": "fsdp", "replicas": 3})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563"]
    res = subprocess.run([*torchrun, "-m", "gptkit", "pretrain", str(recipe)], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert res.returncode != 0 and "error: distributed.replicas: 3 does not divide the 2 processes" in res.stderr
    assert "gptkit/" not in res.stderr and not (tmp_path / "run").exists()  # torchrun's own summary aside, no traceback


def test_fsdp_without_resharding_after_forward_validates_and_saves(tmp_path, corpus):
    """reshard_after_forward: false keeps a validation forward's weights gathered (plain tensors, not DTensors): the
    model was then taken for unsharded, the main process alone saved it (crash) or gathered best/ (hang)."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run",
                         train={"max_steps": 4, "eval_every": 2, "save_every": 2, "batch_size": 4},
                         distributed={"strategy": "fsdp", "reshard_after_forward": False})
    launch(["pretrain", str(recipe)], port=29564)
    run = tmp_path / "run"
    assert len(list((run / "checkpoints" / "step-00000002" / "sharded").glob("*.distcp"))) == 2
    assert len(losses(run, "val_loss")) == 2 and weights(run)


def test_eval_under_torchrun_runs_once(tmp_path):
    """Each rank used to evaluate everything and append to the same predictions.jsonl (80 or 104 lines for 64)."""
    base = pretrained_base(tmp_path)
    s = splits(tmp_path, translate_rows, 10)
    out = tmp_path / "ev"
    res = launch(["eval", "--model", str(base), "--task", "translate", "--data", str(s["test"]), "--limit", "24",
                  "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out)], port=29565)
    assert res.stdout.count("wrote ") == 1
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(24))


SHARDED_FULL_DISK = '''
import errno, os, tempfile
from pathlib import Path
from types import SimpleNamespace

import torch, torch.distributed as dist
import torch.distributed.checkpoint.filesystem as fs
from accelerate.utils import DistributedType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gptkit import distributed, engine

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29575", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
mesh = init_device_mesh("cpu", (1,))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
opt.step()

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

fs._write_item = full
acc = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=1, is_main_process=True,
                      device=torch.device("cpu"))
error = engine._on_every_process(acc, lambda: distributed.save_state(Path(tempfile.mkdtemp()), model, opt, acc))
print("WRITE ERROR", type(error).__name__, error.errno, error.strerror)
dist.destroy_process_group()
'''


DDP_EVAL = """
import numpy as np, torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM
from gptkit import engine
from gptkit.data import Blocks
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50))
opt = torch.optim.AdamW(model.parameters())
model, opt = acc.prepare(model, opt)
stream = np.arange(200) % 50
engine.backward_step(model, [Blocks(stream, 16).batch([acc.process_index])], engine.causal_lm_loss,
                     engine.all_tokens, acc)
opt.step()
val = engine.evaluate_loss(model, Blocks(stream[:40], 16), engine.causal_lm_loss, engine.all_tokens, batch_size=4,
                           max_batches=None, accelerator=acc)
import sys, pathlib
pathlib.Path(sys.argv[1], f"val-{acc.process_index}").write_text(str(round(val, 6)))
"""


def test_ddp_validation_with_fewer_batches_than_processes_does_not_hang(tmp_path):
    """A model with buffers (a Llama's rotary inv_freq) under DDP, one validation batch for two processes: DDP's
    forward after a training step broadcasts the buffers, which the process without a batch never joined; both
    waited for good (until the NCCL timeout on GPUs). Evaluation runs on the module DDP wraps."""
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577"]
    res = subprocess.run([*torchrun, str(script), str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    vals = [(tmp_path / f"val-{rank}").read_text() for rank in (0, 1)]  # (their prints interleave on one stdout)
    assert vals[0] == vals[1] and float(vals[0]) > 0, vals


def test_a_full_disk_in_a_sharded_checkpoint_is_a_write_error():
    """DCP wraps a rank's failed write in CheckpointException (a BaseException, on every rank): save_state gives
    the engine the first rank's OSError, so a full disk in an FSDP checkpoint is the one line of any other."""
    res = subprocess.run([sys.executable, "-c", SHARDED_FULL_DISK], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert "WRITE ERROR OSError 28 No space left on device" in res.stdout, res.stderr[-3000:]

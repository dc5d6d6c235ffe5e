"""Sharded training: FSDP2 (GPUs through Accelerate's plugin, CPU/gloo through torch's ``fully_shard``) and
DeepSpeed ZeRO (GPUs, through Accelerate), for :mod:`gptkit.engine`.

Accelerate applies FSDP only on accelerator devices: given an FSDP plugin on CPU it silently trains DDP (its
MULTI_CPU state never becomes FSDP). On CPU gptkit therefore shards the model itself, as Accelerate's FSDP2
path does on GPUs (``fully_shard`` on every transformer block, then on the root, which keeps the tied
embedding and LM head in one group), and hands Accelerate only the optimizer.

Checkpoints of a sharded model are torch distributed checkpoints (every process writes its shards, a
resume reads them back exactly, on any process count); DeepSpeed's go through ``accelerator.save_state``.
A model folder (``best/``, the run folder) is always a full safetensors model: every process takes part in
gathering it, the main process writes it.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from gptkit.errors import UserError
from gptkit.recipe import DistributedConfig, TrainConfig

log = logging.getLogger(__name__)
SHARDED_DIR = "sharded"  # a checkpoint's torch distributed checkpoint
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed state


def accelerator_kwargs(train: TrainConfig, dist: DistributedConfig) -> dict:
    """Accelerator arguments for the recipe's strategy: the FSDP2 or DeepSpeed plugin on GPUs, nothing for DDP
    and for CPU FSDP (see :func:`shard`). An ``accelerate launch --config_file`` still applies with ``ddp``."""
    if dist.strategy == "ddp":
        return {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # before the run folder is written (the CPU path shards later, in the loop); one CPU process does not shard
    if dist.strategy == "fsdp" and world % dist.replicas and (world > 1 or torch.cuda.is_available()):
        raise UserError(f"distributed.replicas: {dist.replicas} does not divide the {world} processes")
    if dist.strategy == "deepspeed":
        if not torch.cuda.is_available():
            raise UserError("distributed.strategy: deepspeed needs CUDA GPUs; use fsdp (it also runs on CPU) or ddp")
        return {"deepspeed_plugin": deepspeed_plugin(train, dist)}
    if not torch.cuda.is_available():
        return {}
    from accelerate import FullyShardedDataParallelPlugin

    kwargs = {"fsdp_plugin": FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=dist.reshard_after_forward, cpu_offload=dist.cpu_offload,
        auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT")}
    if dist.replicas > 1:
        from accelerate import ParallelismConfig

        kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=dist.replicas,
                                                         dp_shard_size=world // dist.replicas)
    return kwargs


def deepspeed_plugin(train: TrainConfig, dist: DistributedConfig):
    """Accelerate's DeepSpeed plugin from the recipe's ZeRO JSON; the recipe fills its "auto" batch, accumulation
    and clipping values (without a dataloader Accelerate cannot infer the micro-batch)."""
    from accelerate import DeepSpeedPlugin

    path = Path(dist.deepspeed_config or "")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"distributed.deepspeed_config: cannot read '{path}' as JSON ({e})") from None
    plugin = DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=train.grad_accum,
                             gradient_clipping=train.grad_clip)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size
    return plugin


def wants_cpu_fsdp(dist: DistributedConfig | None, accelerator) -> bool:
    return (dist is not None and dist.strategy == "fsdp" and accelerator.device.type == "cpu"
            and accelerator.num_processes > 1)


def lockstep(dist: DistributedConfig | None, accelerator) -> bool:
    """Whether every process must run the same forward passes (sharded weights are gathered collectively)."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and (
        accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        or (dist is not None and dist.strategy in ("fsdp", "deepspeed")))


def shard(model, dist: DistributedConfig, world: int) -> None:
    """FSDP2 on CPU (gloo): ``fully_shard`` every transformer block (the model's ``_no_split_modules``), then the
    root; hybrid sharding as a (replicas, world / replicas) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if world % dist.replicas:
        raise UserError(f"distributed.replicas: {dist.replicas} does not divide the {world} processes")
    if dist.replicas > 1:
        mesh = init_device_mesh("cpu", (dist.replicas, world // dist.replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    policy = CPUOffloadPolicy(pin_memory=False) if dist.cpu_offload else OffloadPolicy()
    kw = {"mesh": mesh, "reshard_after_forward": dist.reshard_after_forward, "offload_policy": policy}
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"distributed.strategy: fsdp found no transformer blocks to shard in {type(model).__name__}")
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    log.info("FSDP2 on %d CPU processes: %d blocks and the root sharded", world, len(blocks))


def is_sharded(model) -> bool:
    """The model is FSDP2-sharded. Its type says so, not its parameters: with ``reshard_after_forward: false`` a
    forward without backward (validation) leaves them gathered, plain tensors, until :func:`reshard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())  # modules(): through torch.compile's wrapper too


def reshard(model) -> None:
    """Free the weights a forward gathered and kept (``reshard_after_forward: false``): after validation, so that
    checkpoints and gathers see shards again (a kept gather crashed the save, or hung a fine-tune's best/ gather)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def no_sync(accelerator, model, skip: bool):
    """No gradient reduction inside (for all but the last micro-batch of a step); FSDP2 modules sharded by
    :func:`shard` have no DDP ``no_sync`` and use ``set_requires_gradient_sync`` instead; under DeepSpeed, not the
    accumulation boundary."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Accelerate's DeepSpeed wrapper marks a micro-batch the accumulation boundary, and steps the engine in its
        # backward, whenever sync_gradients holds (accelerator.accumulate() clears it between boundaries): left set,
        # every micro-batch would be an optimizer step of its own
        accelerator.gradient_state._set_sync_gradients(not skip)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif not skip:
        yield
    elif hasattr(model, "set_requires_gradient_sync") and accelerator.distributed_type != DistributedType.FSDP:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


@contextmanager
def root_gathered(model):
    """The root group's weights (embeddings, LM head, final norm) gathered for a while: generation through
    peft calls the inner transformers model, so the root module's own forward hook, which gathers them, never
    runs (the blocks gather theirs as usual)."""
    if not (is_sharded(model) and hasattr(model, "unshard")):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def loss_scale(accelerator) -> float:
    """DeepSpeed divides each micro-batch loss by the accumulation steps itself; the engine's losses are already
    divided by the step's items, so this factor undoes DeepSpeed's division."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return float(accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"])
    return 1.0


def _inner(opt):
    return getattr(opt, "optimizer", opt)


def save_state(directory: Path, model, opt, accelerator) -> bool:
    """Every process: the sharded training state into ``directory``; False when the model is not sharded (the
    engine then writes safetensors + optimizer.pt on the main process)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(str(directory / DEEPSPEED_DIR))
        return True
    if not is_sharded(model):
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, _inner(opt))
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory / SHARDED_DIR))
    except CheckpointException as e:  # (a BaseException, raised on every rank): the first rank's error, as written
        failure = next(iter(e.failures.values()), None)
        cause = failure[0] if isinstance(failure, tuple) else failure
        raise OSError(getattr(cause, "errno", None), getattr(cause, "strerror", None) or str(cause or e)) from None
    return True


def load_state(directory: Path, model, opt, accelerator) -> bool:
    """Every process: read a checkpoint written by :func:`save_state` (any process count for FSDP); False when
    ``directory`` holds an unsharded checkpoint."""
    if (directory / DEEPSPEED_DIR).is_dir():
        accelerator.load_state(str(directory / DEEPSPEED_DIR))
        return True
    if not (directory / SHARDED_DIR).is_dir():
        if is_sharded(model):
            raise UserError(f"--resume: {directory} was written without sharding; resume with distributed.strategy "
                            "as it was, or start a new run")
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, _inner(opt))  # initialises the optimizer state so that its keys exist
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(model, _inner(opt), model_state_dict=state["model"], optim_state_dict=state["optim"])
    return True


def full_state_dict(accelerator, model) -> dict | None:
    """Every process calls it: the whole model's weights (on the CPU) for the main process to save, gathered
    from the shards; None when the model is not sharded (its own ``save_pretrained`` then applies)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (GPT-2's LM head is its embedding) come back as two tensors: keep the one name save_pretrained keeps
    tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()})
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in full.items() if k not in tied}


def plain_architectures(folder: Path) -> None:
    """FSDP2 renames a sharded model's class (``FSDPGPT2LMHeadModel``); the saved config names the real one."""
    path = Path(folder) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        names = config.get("architectures") or []
        if any(n.startswith("FSDP") for n in names):
            config["architectures"] = [n.removeprefix("FSDP") for n in names]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

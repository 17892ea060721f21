"""Several processes without GPUs: ``tools/dist_train.sh`` / ``dist_test.sh`` (torchrun) on a CPU machine."""
import logging
import os
import sys

import torch
import torch.distributed as dist
from mmengine.logging import print_log


def _sync_bn_to_bn(node):
    """SyncBN -> BN in every norm_cfg of a config subtree (SyncBatchNorm has no CPU implementation); returns
    how many were changed."""
    changed = 0
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
            changed += 1
        for value in node.values():
            changed += _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            changed += _sync_bn_to_bn(value)
    return changed


def init_cpu_distributed(cfg):
    """For ``launcher='pytorch'`` on a machine without CUDA: mmengine's launcher pins every process to a GPU
    (``torch.cuda.set_device``), so the process group is started here with gloo, which the Runner then finds
    and uses; DDP wraps the model on the CPU (``device_ids=None``) and SyncBN becomes BN (per-process batch
    statistics). Does nothing with CUDA, without the pytorch launcher, or when a process group exists."""
    if cfg.get("launcher") != "pytorch" or torch.cuda.is_available() or dist.is_initialized():
        return
    dist.init_process_group("gloo")
    wrapper = dict(cfg.get("model_wrapper_cfg") or dict(type="MMDistributedDataParallel"))
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper
    if _sync_bn_to_bn(cfg.model):
        print_log("no CUDA: gloo process group, SyncBN trained as BN in each process", logger="current")


def destroy_distributed():
    """End the process group before the interpreter exits (mmengine leaves it open; an open gloo group's
    threads can abort the process at exit: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker():
    """End a torchrun worker once its work is done and written: flush the logs and streams, then leave with
    os._exit(0), before interpreter finalization. Even after destroy_distributed, a two-process gloo run in CI
    aborted once at exit ("terminate called without an active exception" from rank 1, after the test's metrics
    were printed): C++ threads and tensors torn down while the interpreter finalizes (pytorch/pytorch#179291
    describes the race). Does nothing outside torchrun (WORLD_SIZE unset or 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

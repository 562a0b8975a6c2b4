"""The training step, and what it is built from: model, optimizer, mixed precision, EMA, learning rate.

main.py's epoch loop, benchmark.py and the tests all train through Trainer.step, so what is benchmarked
and tested is what trains. Nothing here logs or knows which device it is on: device.py decides that, main.py
reports it. The one file read here is --pretrained's weights (weights.load_pretrained, which logs through
the `log` it is given).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


import weights
import data as data_lib
import densenet
import device as device_lib
import recipe


@dataclass
class Trainer:
    """Everything one optimizer step touches."""
    model: nn.Module                      # what runs the step: DDP- and/or torch.compile-wrapped
    model_without_ddp: nn.Module          # the bare model: what is saved, evaluated and averaged
    optimizer: torch.optim.Optimizer
    amp: device_lib.MixedPrecision
    device: device_lib.Device
    normalize: data_lib.DeviceNormalize   # uint8 host batch -> normalised float batch on the device
    criterion: nn.Module
    mixup: recipe.MixupCutmix
    ema: Optional[recipe.ModelEma] = None
    clip_grad_norm: Optional[float] = None

    def step(self, images, targets, lr, update_ema=False, ema_warmup=False, weight=1.0):
        """One optimizer step on a uint8 batch; returns (output, loss, targets on the device), all detached.

        update_ema: also update the EMA (every --model-ema-steps steps); ema_warmup: during the learning-rate
        warm-up epochs, where that update makes the EMA a copy of the model (torchvision's reset). weight: the
        factor on this rank's loss for the backward pass (its share of the global batch times the world size,
        when the ranks' batches differ); the loss returned is the plain mean.
        No host-device synchronisation: the caller reads the returned tensors when it chooses to."""
        images = self.normalize(images)
        targets = targets.to(self.device.torch_device, non_blocking=True)
        loss_targets = targets
        if self.mixup.enabled:
            images, loss_targets = self.mixup(images, targets)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.amp.autocast():
            output = self.model(images)
            loss = self.criterion(output, loss_targets)
        self.amp.zero_grad(self.optimizer)
        self.amp.backward_and_step(loss if weight == 1 else loss * weight, self.optimizer, self.model.parameters(),
                                   self.clip_grad_norm)
        if update_ema and self.ema is not None:
            self.ema.update(self.model_without_ddp, warmup=ema_warmup)
        return output.detach(), loss.detach(), targets

    def sync_buffers(self):
        """Average the BatchNorm running statistics of the model and the EMA over the ranks (no-op on one), so
        that every rank evaluates the model rank 0 saves. Call it after each epoch's training, before saving
        and evaluating: all ranks must call it (one collective)."""
        models = [self.model_without_ddp] + ([self.ema.module] if self.ema is not None else [])
        device_lib.average_running_stats(models)


def build_trainer(args, device, num_classes, amp, *, channels_last, distributed=False, local_batch=None,
                  world_size=1, log=print):
    """The Trainer for this run's configuration (`args`, never written) on `device`.

    Order matters: weights are loaded before the model moves to the device, SyncBatchNorm is converted
    before apex casts the model, apex wraps model and optimizer before DDP wraps the model, the EMA copies
    the model after DDP has given every rank rank 0's weights (each rank seeds its own random init), and
    torch.compile wraps last."""
    model = densenet.build_model(args.model, num_classes=num_classes, drop_rate=args.drop_rate,
                                 memory_efficient=args.memory_efficient)
    if args.pretrained:
        weights.load_pretrained(model, args.model, args.pretrained_weight_path, log=log)
    model = device_lib.place_model(model, device, channels_last, sync_bn=distributed and args.sync_bn)
    optimizer = device_lib.build_sgd(param_groups(model, args.weight_decay, args.norm_weight_decay), args.lr,
                                     args.momentum, device, amp)
    model, optimizer = amp.initialize(model, optimizer)
    model_without_ddp = model
    if distributed:
        model = device_lib.wrap_ddp(model, device)
    ema = None
    if args.model_ema:
        decay = recipe.ema_decay_for_run(args.model_ema_decay, world_size, local_batch or args.batch_size,
                                         args.model_ema_steps, args.epochs)
        ema = recipe.ModelEma(model_without_ddp, decay)
    return Trainer(model=torch.compile(model) if args.compile else model, model_without_ddp=model_without_ddp,
                   optimizer=optimizer, amp=amp, device=device,
                   normalize=data_lib.DeviceNormalize(device.torch_device, channels_last),
                   criterion=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                   mixup=recipe.MixupCutmix(num_classes, args.mixup_alpha, args.cutmix_alpha), ema=ema,
                   clip_grad_norm=args.clip_grad_norm)


def param_groups(model, weight_decay, norm_weight_decay):
    """Decay conv/linear weights; BatchNorm weights and biases get --norm-weight-decay (0 by default)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": norm_weight_decay}]


def learning_rate(args, epoch_progress):
    """Closed-form LR at a (fractional) epoch: optional warm-up, then step / cosine / exponential decay.

    Computed every step rather than kept in a stateful scheduler, so a run resumed mid-epoch lands on
    exactly the same value. --lr-update epoch holds it for a whole epoch, as a scheduler stepped once per
    epoch does (the Ascend original's CosineAnnealingLR(T_max=epochs))."""
    if args.lr_update == "epoch":
        epoch_progress = math.floor(epoch_progress)
    warmup = args.lr_warmup_epochs
    if epoch_progress < warmup:
        if args.lr_warmup_method == "constant":
            return args.lr * args.lr_warmup_decay
        return args.lr * (args.lr_warmup_decay + (1 - args.lr_warmup_decay) * epoch_progress / warmup)
    t = epoch_progress - warmup
    if args.lr_scheduler == "step":
        return args.lr * args.lr_gamma ** math.floor(t / args.lr_step_size)
    if args.lr_scheduler == "exponential":
        return args.lr * args.lr_gamma ** math.floor(t)
    total = max(args.epochs - warmup, 1e-8)
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))

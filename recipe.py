"""Training-recipe parts beyond the reference's plain SGD that act on batches and weights: mixup/cutmix and
the model EMA. (The per-image augmentations, --auto-augment and --random-erase, are in data.py.)

Names and semantics follow torchvision's classification reference scripts
(--mixup-alpha, --cutmix-alpha, --model-ema*), so recipes written for those scripts carry over.
"""
import copy

import torch


class MixupCutmix:
    """Batch-level mixup and/or cutmix on the device, with soft (probability) targets.

    Each batch is mixed with itself rolled by one (as torchvision's reference does);
    when both alphas are set, one of the two is chosen per batch with equal odds.
    lam ~ Beta(alpha, alpha). Draws come from the trainer's torch RNG, which
    checkpoints save and restore, so resumed runs mix identically.
    """

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0):
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha

    @property
    def enabled(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def _lam(self, alpha):
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, images, targets):
        """(N,C,H,W) float images, (N,) int targets -> mixed images, (N, num_classes) soft targets."""
        soft = torch.nn.functional.one_hot(targets, self.num_classes).to(images.dtype)
        if not self.enabled or images.shape[0] < 2:
            return images, soft
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(()) < 0.5)
        if use_cutmix:
            lam = self._lam(self.cutmix_alpha)
            h, w = images.shape[-2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.roll(1, 0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
        else:
            lam = self._lam(self.mixup_alpha)
            images = images * lam + images.roll(1, 0) * (1.0 - lam)
        return images, soft * lam + soft.roll(1, 0) * (1.0 - lam)


class ModelEma(torch.nn.Module):
    """Exponential moving average of a model's parameters and buffers.

    ema = decay * ema + (1 - decay) * model, every --model-ema-steps optimizer steps.
    As in torchvision's reference, the decay given on the command line is for a
    global batch of 1024 updating every 32 steps over 600 epochs; it is adjusted
    for this run's batch, update interval and length (see ema_decay_for_run).
    BatchNorm running statistics are copied, not averaged, as they are already averages.
    During the learning-rate warm-up every update copies the model (update(model, warmup=True)), as torchvision's
    reference resets its EMA there (n_averaged.fill_(0): "keep copying weights during warmup period").

    The EMA is kept in fp32 whatever the model's dtype: under apex O2 the model is fp16, and an update of
    (1 - decay) * (model - ema) ~ 1e-3 of a weight near 1 is below fp16's resolution there (~5e-4 to 1e-3):
    an fp16 EMA would never move.
    """

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).float().eval()
        # apex O2 patches the instance's forward (cast inputs to fp16, outputs to fp32) with a closure over the
        # ORIGINAL model: a deep copy would keep calling the trained model, not the average. Use the class's.
        self.module.__dict__.pop("forward", None)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model, warmup=False):
        """One EMA step towards `model`; with warmup=True the EMA becomes a copy of `model`."""
        ema_params = list(self.module.parameters())
        model_params = [p.detach().float() for p in model.parameters()]
        if warmup:
            torch._foreach_copy_(ema_params, model_params)
        else:
            torch._foreach_lerp_(ema_params, model_params, 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True):
        return self.module.load_state_dict(state_dict, strict=strict)


def ema_decay_for_run(decay, world_size, batch_per_rank, ema_steps, epochs):
    """torchvision's adjustment: keep the EMA's time constant in epochs whatever the batch and update interval."""
    adjust = world_size * batch_per_rank * ema_steps / max(epochs, 1)
    alpha = min(1.0, (1.0 - decay) * adjust)
    return 1.0 - alpha

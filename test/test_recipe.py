"""Recipe options: augmentations, mixup/cutmix, EMA, LR schedules, RA sampler, and the `modern` recipe end to end."""
import argparse
import json
import math
import os

import pytest
import torch
from PIL import Image

import data
import recipe
import trainer
from conftest import SMALL_RUN, run_script, write_image_folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real image file with structure (gradients + shapes), decoded by our loader."""
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(60, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    pixels[10:40, 20:60] = (200, 50, 50)
    Image.fromarray(pixels).save(path, quality=90)
    return data.load_rgb(str(path))


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "augmix", "imagenet", None])
@pytest.mark.parametrize("erase", [0.0, 1.0])
def test_augmentations_valid_and_seeded(photo, policy, erase):
    transform = data.train_transform(32, auto_augment=policy, random_erase=erase)
    torch.manual_seed(7)
    a = transform(photo)
    torch.manual_seed(7)
    b = transform(photo)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b), "same seed must give the same augmentation"
    outputs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        outputs.add(transform(photo).numpy().tobytes())
    assert len(outputs) > 1, "different seeds should give different augmentations"


def test_random_erase_uses_mean_colour(photo):
    torch.manual_seed(0)
    erased = data.train_transform(32, scale=(1, 1), hflip_prob=0, random_erase=1.0)(photo)
    mean_pixel = torch.tensor([round(255 * m) for m in data.IMAGENET_MEAN], dtype=torch.uint8).view(3, 1)
    flat = erased.view(3, -1)
    assert (flat == mean_pixel).all(dim=0).sum() > 0, "erased pixels should carry the ImageNet mean colour"


def test_dataset_augmentation_depends_on_epoch_and_repeat_not_on_worker(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    ds = data.ImageFolderDataset(os.path.join(root, "train"), data.train_transform(24, auto_augment="ta_wide"), seed=3)
    first = ds[(0, 1, 0)][0]
    assert torch.equal(first, ds[(0, 1, 0)][0])
    assert not torch.equal(first, ds[(1, 1, 0)][0]), "a new epoch must give a new augmentation"
    assert not torch.equal(first, ds[(0, 1, 1)][0]), "repeated-augmentation copies must differ"


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mixer = recipe.MixupCutmix(5, mixup, cutmix)
    for _ in range(5):
        mixed, soft = mixer(images, targets)
        assert mixed.shape == images.shape and soft.shape == (8, 5)
        assert torch.allclose(soft.sum(dim=1), torch.ones(8))
        assert (soft >= 0).all()
        # The weight on each sample's own class is lam (>= the mixed-in part unless classes coincide).
        own = soft[torch.arange(8), targets]
        assert (own > 0).all()


def test_mixup_alpha_zero_leaves_batch_unchanged():
    images = torch.randn(4, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 1])
    mixed, soft = recipe.MixupCutmix(3, 0.0, 0.0)(images, targets)
    assert torch.equal(mixed, images)
    assert torch.equal(soft, torch.nn.functional.one_hot(targets, 3).float())


def test_cutmix_label_weight_matches_pasted_area():
    torch.manual_seed(1)
    images = torch.zeros(2, 1, 10, 10)
    images[1] = 1.0  # sample 0 receives a patch of ones from sample 1 (roll by one)
    mixed, soft = recipe.MixupCutmix(2, 0.0, 1.0)(images, torch.tensor([0, 1]))
    pasted_fraction = mixed[0].mean().item()
    assert soft[0, 1].item() == pytest.approx(pasted_fraction)


def test_ema_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    p0 = [p.detach().clone() for p in model.parameters()]
    ema = recipe.ModelEma(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model jumps to p0 + 1 and stays there
    k = 5
    for _ in range(k):
        ema.update(model)
    for e, start in zip(ema.module.parameters(), p0):
        expected = (start + 1.0) - 0.9 ** k * 1.0  # ema_k = p + decay^k (p0 - p)
        torch.testing.assert_close(e, expected)
    assert ema.num_updates == k


def test_ema_during_warmup_is_the_model_as_torchvision_resets_it():
    # torchvision's reference: `if epoch < args.lr_warmup_epochs: model_ema.n_averaged.fill_(0)` before each
    # EMA update, on an AveragedModel whose first update (n_averaged == 0) copies the model.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = recipe.ModelEma(model, decay=0.8)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    reference.update_parameters(model)  # its first update: the copy ours makes at construction
    for warmup in (True, True, False, False, False):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, warmup=warmup)
        if warmup:
            reference.n_averaged.fill_(0)
        reference.update_parameters(model)
        if warmup:  # exactly the model, not close to it
            assert all(torch.equal(e, p) for e, p in zip(ema.module.parameters(), model.parameters()))
        for e, r in zip(ema.module.parameters(), reference.module.parameters()):
            torch.testing.assert_close(e, r)
    assert not all(torch.equal(e, p) for e, p in zip(ema.module.parameters(), model.parameters()))


def test_ema_decay_adjustment_matches_torchvision_formula():
    decay = recipe.ema_decay_for_run(0.99998, world_size=8, batch_per_rank=128, ema_steps=32, epochs=600)
    alpha = min(1.0, (1 - 0.99998) * 8 * 128 * 32 / 600)
    assert decay == pytest.approx(1 - alpha)


def _schedule_args(**kw):
    base = dict(lr=0.5, lr_warmup_epochs=0, lr_warmup_method="linear", lr_warmup_decay=0.01, lr_scheduler="step",
                lr_step_size=30, lr_gamma=0.1, lr_min=0.0, epochs=100, lr_update="step")
    base.update(kw)
    return argparse.Namespace(**base)


def test_lr_warmup_then_cosine_formula():
    a = _schedule_args(lr_scheduler="cosine", lr_warmup_epochs=5, lr_min=0.001, epochs=105)
    assert trainer.learning_rate(a, 0) == pytest.approx(0.5 * 0.01)
    assert trainer.learning_rate(a, 2.5) == pytest.approx(0.5 * (0.01 + 0.99 * 0.5))
    assert trainer.learning_rate(a, 5) == pytest.approx(0.5)
    assert trainer.learning_rate(a, 55) == pytest.approx(0.001 + (0.5 - 0.001) * 0.5)
    assert trainer.learning_rate(a, 30) == pytest.approx(0.001 + 0.499 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert trainer.learning_rate(a, 105) == pytest.approx(0.001)


def test_lr_step_exponential_and_constant_warmup():
    step = _schedule_args(lr_scheduler="step", lr_step_size=30, lr_gamma=0.1)
    assert trainer.learning_rate(step, 29.9) == pytest.approx(0.5)
    assert trainer.learning_rate(step, 30) == pytest.approx(0.05)
    assert trainer.learning_rate(step, 65) == pytest.approx(0.005)
    expo = _schedule_args(lr_scheduler="exponential", lr_gamma=0.9)
    assert trainer.learning_rate(expo, 3.5) == pytest.approx(0.5 * 0.9 ** 3)
    const = _schedule_args(lr_warmup_epochs=2, lr_warmup_method="constant", lr_warmup_decay=0.1)
    assert trainer.learning_rate(const, 1.9) == pytest.approx(0.05)
    assert trainer.learning_rate(const, 2.0) == pytest.approx(0.5)


def test_ra_sampler_repeats_across_ranks():
    samplers = [data.ResumableDistributedSampler(12, num_replicas=3, rank=r, seed=5, repeats=3) for r in range(3)]
    keys = [list(s) for s in samplers]
    assert all(len(k) == 4 for k in keys)
    # Position p of the global order is rank p % 3; the three copies of an image sit on three ranks.
    merged = [keys[p % 3][p // 3] for p in range(12)]
    for start in range(0, 12, 3):
        group = merged[start:start + 3]
        assert len({index for _, index, _ in group}) == 1
        assert sorted(rep for _, _, rep in group) == [0, 1, 2]


def test_modern_recipe_trains_evaluates_ema_and_resumes(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=3, train_per_class=6, val_per_class=2)
    out_root = tmp_path / "out"
    flags = ["--recipe=modern", "--model", "densenet121", *SMALL_RUN, "--batch-size", "6", "--lr", "0.05",
             "--model-ema-steps", "1", "--ra-reps", "2"]
    env = {"OUTPUT_ROOT": str(out_root), "ASCEND_DEVICE_ID": "0"}
    first = run_script("train_full_1p.sh", [f"--data_path={root}", "--epochs=1", *flags], env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = (out_root / "0" / "train_0.log").read_text()
    assert "Model EMA: decay" in log
    assert " * Acc@1 " in log and " * EMA Acc@1 " in log
    ckpt = torch.load(out_root / "0" / "checkpoint.pth", weights_only=True)
    assert "model_ema" in ckpt and ckpt["model_ema_updates"] > 0
    # The recipe's flags reached main.py and took effect (an argparse error would have failed the run above).
    assert ckpt["args"]["auto_augment"] == "ta_wide" and ckpt["args"]["mixup_alpha"] == 0.2

    second = run_script("train_full_1p.sh", [f"--data_path={root}", "--epochs=2", *flags, "--resume", "auto"],
                        env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (out_root / "0" / "train_0.log").read_text()
    assert "Resumed from" in log  # the log grows on --resume: look at what the resumed run wrote
    resumed_log = log.split("Resumed from", 1)[1]
    assert "Epoch: [1]" in resumed_log and "Epoch: [0]  [" not in resumed_log
    resumed = torch.load(out_root / "0" / "checkpoint.pth", weights_only=True)
    assert resumed["model_ema_updates"] > ckpt["model_ema_updates"], "EMA must continue from its saved state"
    lines = (out_root / "0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1]
    assert "val_ema_acc1" in json.loads(lines[-1])

"""ResumableDistributedSampler: a mid-epoch resume on any number of ranks uses every sample of the epoch once.

The batching is simulated as the trainer does it: rank r of W consumes its shard in local batches of
global_batch / W, so after k steps each rank has used the first k * local_batch keys it yielded; the checkpoint
records k * global_batch (set_epoch's start_sample) and the resumed ranks yield the rest.
"""
import collections
import os

import pytest
import torch

from conftest import write_image_folder

import data

SEED = 11


def shards(n, world, epoch=3, start_sample=0, repeats=1):
    """The keys each rank of `world` yields for `epoch`, resumed after `start_sample` global samples."""
    out = []
    for rank in range(world):
        sampler = data.ResumableDistributedSampler(n, world, rank, SEED, repeats=repeats)
        sampler.set_epoch(epoch, start_sample)
        keys = list(sampler)
        assert len(keys) == len(sampler)
        out.append(keys)
    return out


def interrupted_and_resumed(n, global_batch, world, new_world, steps_done, repeats=1):
    """Keys used before the interruption (first steps_done local batches of each rank) + keys of the resume."""
    local = global_batch // world
    before = [key for keys in shards(n, world, repeats=repeats) for key in keys[:steps_done * local]]
    after = [key for keys in shards(n, new_world, start_sample=steps_done * global_batch, repeats=repeats)
             for key in keys]
    return before, after


@pytest.mark.parametrize("world, new_world", [(2, 1), (2, 3), (1, 2), (3, 2)])
def test_resume_on_another_rank_count_uses_every_sample_once(world, new_world):
    n, global_batch, steps_done = 36, 6, 2  # 6 steps per epoch; every size divides: no padding
    uninterrupted = sorted(key for keys in shards(n, world) for key in keys)
    assert [index for _, index, _ in uninterrupted] == list(range(n))
    before, after = interrupted_and_resumed(n, global_batch, world, new_world, steps_done)
    assert len(before) == steps_done * global_batch
    used = collections.Counter(before + after)
    assert sorted(used) == uninterrupted and set(used.values()) == {1}, used
    # The resumed ranks share the remaining steps evenly: each runs the 4 steps left at its own local batch.
    resumed = shards(n, new_world, start_sample=steps_done * global_batch)
    assert [len(keys) for keys in resumed] == [(n - steps_done * global_batch) // new_world] * new_world


@pytest.mark.parametrize("world, new_world", [(2, 3), (3, 2)])
def test_resume_with_repeated_augmentation(world, new_world):
    # --ra-sampler: every image 3 times in a row of the global order; the keys (epoch, index, repeat) that
    # seed augmentation must be the same ones, each once, whatever the rank count before and after.
    n, global_batch, steps_done, repeats = 36, 6, 3, 3
    uninterrupted = collections.Counter(key for keys in shards(n, world, repeats=repeats) for key in keys)
    assert len(uninterrupted) == n and set(uninterrupted.values()) == {1}
    assert sorted(collections.Counter(index for _, index, _ in uninterrupted).values()) == [3] * (n // 3)
    before, after = interrupted_and_resumed(n, global_batch, world, new_world, steps_done, repeats=repeats)
    assert collections.Counter(before + after) == uninterrupted


def test_resume_with_padding_misses_nothing():
    # 13 images on 3 ranks after 1 step of 4 on 2: 9 remain, padded to 9 (3 x 3), no image left out.
    before, after = interrupted_and_resumed(13, 4, 2, 3, 1)
    used = collections.Counter(index for _, index, _ in before + after)
    assert sorted(used) == list(range(13))
    assert sum(used.values()) - 13 < 3  # only the padding repeats


def test_fresh_epoch_shards_are_distributed_samplers_without_the_padding():
    # No resume: torch's DistributedSampler's shards (the same permutation, rank r every W-th), without the
    # samples it repeats to pad the epoch to a multiple of W: each image once per epoch.
    for n, world in ((12, 2), (13, 2), (13, 3), (5, 4)):
        for rank, keys in enumerate(shards(n, world)):
            reference = torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=True, seed=SEED)
            reference.set_epoch(3)
            assert [index for _, index, _ in keys] == list(reference)[:len(range(rank, n, world))]
        assert sorted(index for keys in shards(n, world) for _, index, _ in keys) == list(range(n))


def test_same_rank_count_resume_is_the_rest_of_each_shard():
    # A checkpoint of today's format (step k, same world size) resumes exactly as it did: each rank's shard
    # minus its first k local batches.
    n, world, global_batch, steps_done = 26, 2, 4, 3
    full = shards(n, world)
    resumed = shards(n, world, start_sample=steps_done * global_batch)
    assert resumed == [keys[steps_done * global_batch // world:] for keys in full]


def test_epoch_length_is_one_pass_of_the_data():
    for repeats in (1, 3):
        sampler = data.ResumableDistributedSampler(50, 4, 1, SEED, repeats=repeats)
        assert sampler.epoch_length() == 50
        sampler.set_epoch(0, 48)  # 2 left for 4 ranks: ranks 0 and 1 take one each, 2 and 3 none
        assert len(sampler) == 1 and len(list(sampler)) == 1
        sampler.set_epoch(0, 52)  # past the end (the last step was padded): nothing left
        assert len(sampler) == 0 and list(sampler) == []


def test_augmentation_depends_on_the_key_not_on_the_rank_count(tmp_path):
    # The same key gives the same training image whatever order (rank, worker) asks for it.
    root = write_image_folder(tmp_path / "data", classes=2, train_per_class=6, val_per_class=1)
    train = data.train_dataset(os.path.join(root, "train"), 24, fast_decode=True, seed=SEED)
    before, after = interrupted_and_resumed(len(train), 4, 2, 3, 1)
    first = {key: train[key][0] for key in before + after}
    again = {key: train[key][0] for key in reversed(sorted(first))}
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert len({first[key].float().sum().item() for key in first}) > 1  # crops differ between keys

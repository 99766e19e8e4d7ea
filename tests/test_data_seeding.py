"""Per-image augmentation seeds (detr_common.data.seeding): the batches of an epoch do not depend
on --num_workers, on workers persisting across epochs, or on a resume."""
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from detr_common.data.seeding import SeededDataset, SeededSampler, sample_seed


class RandomDraws(Dataset):
    """Item i = (i, two draws from torch's global RNG): stands in for a random transform."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index, torch.rand(2)


def epochs(epoch_list, num_workers, seed=3):
    """{epoch: [(index, draws) in loading order]} from one loader, its workers kept between
    epochs as in training."""
    sampler = SeededSampler(RandomSampler(range(10), generator=torch.Generator()), seed)
    loader = DataLoader(SeededDataset(RandomDraws()), batch_size=4, sampler=sampler,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        collate_fn=list)
    out = {}
    for epoch in epoch_list:
        sampler.set_epoch(epoch)
        out[epoch] = [(i, draws) for batch in loader for i, draws in batch]
    return out


def expected(seed, epoch, index):
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    return torch.rand(2, generator=g)


def test_draws_follow_the_image_seed_whatever_the_workers():
    single = epochs([0, 1, 2], num_workers=0)
    workers = epochs([0, 1, 2], num_workers=2)
    resumed = epochs([2], num_workers=2)  # a run resumed at epoch 2, fresh workers
    for epoch in (0, 1, 2):
        order = [i for i, _ in single[epoch]]
        assert sorted(order) == list(range(10))
        assert [i for i, _ in workers[epoch]] == order
        for (i, a), (_, b) in zip(single[epoch], workers[epoch]):
            assert torch.equal(a, expected(3, epoch, i)) and torch.equal(b, a)
    assert [i for i, _ in resumed[2]] == [i for i, _ in single[2]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed[2], single[2]))
    # epochs reshuffle and redraw
    assert [i for i, _ in single[0]] != [i for i, _ in single[1]]
    first = dict(single[0])
    assert not any(torch.equal(first[i], d) for i, d in single[1])


def test_the_callers_rng_is_left_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    index, draws = SeededDataset(RandomDraws())[(4, 123)]
    g = torch.Generator().manual_seed(123)
    assert index == 4 and torch.equal(draws, torch.rand(2, generator=g))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_gpu_rngs_are_not_reseeded(monkeypatch):
    # torch.manual_seed would also reseed every CUDA generator (the model's dropout on the GPU
    # when --num_workers 0), which fork_rng(devices=[]) does not restore
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    SeededDataset(RandomDraws())[(4, 123)]
    assert calls == []


def test_seeds_differ_across_images_epochs_and_runs():
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in range(3) for i in range(1000)}
    assert len(seeds) == 2 * 3 * 1000

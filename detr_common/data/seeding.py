"""Per-image seeds for the training augmentation.

Each training image's random transforms draw from torch's CPU RNG seeded by (--seed, epoch,
image index). An epoch's batches are then the same whatever ``--num_workers`` is, and a run
resumed from a checkpoint sees the augmentations of the uninterrupted run. Persistent data
workers would otherwise carry their RNG from epoch to epoch, and start afresh on resume.

``SeededSampler`` yields ``(index, seed)`` keys; ``SeededDataset`` seeds torch's RNG with the
key's seed before it loads the image at the key's index. The RNG of the calling process (the
main process when ``--num_workers 0``) is left as it was.
"""
import torch
from torch.utils.data import Dataset, RandomSampler, Sampler

_EPOCH_STRIDE = 2 ** 31  # above any dataset size, so (epoch, index) pairs never collide


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return ((seed * 1_000_003 + epoch) * _EPOCH_STRIDE + index) % 2 ** 63


class SeededSampler(Sampler):
    """Wraps an index sampler; yields ``(index, sample_seed(seed, epoch, index))``.

    ``set_epoch(epoch)`` must be called before each epoch: it sets the seeds and reshuffles the
    wrapped sampler (``set_epoch`` of a DistributedSampler; a RandomSampler's generator is
    reseeded with ``seed + epoch``)."""

    def __init__(self, sampler: Sampler, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        elif isinstance(self.sampler, RandomSampler) and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed + epoch)

    def __iter__(self):
        for index in self.sampler:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return len(self.sampler)


class SeededDataset(Dataset):
    """``dataset[index]`` with torch's CPU RNG seeded by ``seed``, for keys ``(index, seed)``
    from a SeededSampler; the caller's RNG state is restored afterwards."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
            return self.dataset[index]

"""Training batches: grouped by orientation as MMDetection's AspectRatioBatchSampler, and
multi-scale drawn as its RandomResize (range) or RandomChoiceResize (two scales)."""

from __future__ import annotations

import torch
import yaml
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import BatchSampler, RandomSampler

from crosskd_cli.config.presets import to_dict
from crosskd_cli.data.collate import AspectRatioBatches, build_loader
from crosskd_cli.data.transforms import KeepRatioResize
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.runs.record import read_run_preset
from crosskd_cli.storage.run_folder import RunDir


class Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def batches(sampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


def test_one_orientation_gives_exactly_the_plain_shuffled_batches():
    data = Indices(23)
    plain = BatchSampler(RandomSampler(data, generator=torch.Generator().manual_seed(5)), 4, True)
    grouped = AspectRatioBatches(
        RandomSampler(data, generator=torch.Generator().manual_seed(5)), [False] * 23, 4, True
    )
    assert batches(grouped) == batches(plain) and len(grouped) == len(plain) == 5


def test_mixed_orientations_are_batched_apart_with_every_image_at_most_once():
    portrait = [i % 3 == 0 for i in range(50)]  # 17 portrait, 33 landscape
    for drop_last in (True, False):
        sampler = AspectRatioBatches(
            RandomSampler(Indices(50), generator=torch.Generator().manual_seed(1)),
            portrait,
            4,
            drop_last,
        )
        seen = batches(sampler)
        assert len(seen) == len(sampler) == (12 if drop_last else 13)
        flat = [i for batch in seen for i in batch]
        assert len(flat) == len(set(flat)) == (48 if drop_last else 50)
        # only the remainders of the two buckets, joined at the end, may mix
        mixed = [b for b in seen if len({portrait[i] for i in b}) > 1]
        assert len(mixed) <= 1 and (not mixed or mixed[0] in seen[-2:])


def test_accelerate_swaps_in_its_seedable_sampler_and_shards_whole_grouped_batches():
    portrait = [i % 2 == 0 for i in range(40)]
    loader = build_loader(Indices(40), batch_size=4, shuffle=True, seed=3, portrait=portrait)
    loader.collate_fn = lambda items: items  # plain indices, not images
    shards = [
        prepare_data_loader(
            loader, num_processes=2, process_index=rank, put_on_device=False,
            use_seedable_sampler=True, data_seed=3,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    epochs = []
    for epoch in (0, 1):
        seen = []
        for shard in shards:
            shard.set_epoch(epoch)
            for batch in shard:
                assert len({portrait[i] for i in batch}) == 1  # 20 of each: no mixed batch
                seen.append(tuple(batch))
        assert sorted(i for batch in seen for i in batch) == list(range(40))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_multiscale_draws_a_range_or_one_of_two_sides():
    image = torch.zeros(3, 480, 640)
    torch.manual_seed(0)
    sides = {"range": set(), "choice": set()}
    for mode in sides:
        resize = KeepRatioResize((1333, 800), (640, 800), mode)
        for _ in range(60):
            sides[mode].add(min(resize.make_params([image])["size"]))
    assert sides["choice"] == {640, 800}
    assert len(sides["range"]) > 10 and min(sides["range"]) >= 640 and max(sides["range"]) <= 800


def test_a_run_recorded_before_grouping_resumes_ungrouped(tmp_path):
    plain = to_dict(load_preset("shapes-gfl-r18"))
    del plain["data"]["group_by_aspect_ratio"]  # as 0.2.0 wrote preset.yaml
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(plain))
    assert read_run_preset(RunDir(tmp_path)).data.group_by_aspect_ratio is False
    plain["data"]["group_by_aspect_ratio"] = True
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(plain))
    assert read_run_preset(RunDir(tmp_path)).data.group_by_aspect_ratio is True

"""Evaluation does not depend on the batch size: each image is padded to its own multiple of 32
and batched only with images of the same padded size, under one process or several."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from crosskd_cli.data import CocoDetection, build_eval_loader, build_loader
from crosskd_cli.data.collate import SameShapeBatches, collate_by_shape, padded_size
from crosskd_cli.detection.structures import Target
from crosskd_cli.inference.evaluate import evaluate_checkpoint, predict
from tests.conftest import one_thread


@pytest.fixture
def batch_invariant_kernels():
    """oneDNN picks other convolution kernels for other batch sizes, which differ in the last
    bits (scores ~1e-6 apart); torch's own CPU kernels compute each image alike in any batch.
    With them, whatever remains must come from batching itself, and compares exactly."""
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore", UserWarning)  # torch notes that TF32 is for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def test_detections_and_metrics_are_identical_at_batch_size_1_and_8(
    mixed_size_checkpoint, batch_invariant_kernels
):
    source, checkpoint, _ = mixed_size_checkpoint
    one = evaluate_checkpoint(checkpoint, source, batch_size=1)
    eight = evaluate_checkpoint(checkpoint, source, batch_size=8)
    assert len(one.results) > 50  # enough detections for the comparison to mean something
    assert eight.results == one.results  # boxes, scores, labels and order, bit for bit
    assert eight.metrics == one.metrics
    assert one.metrics["AP50"] > 0


def test_as_tensors_the_detections_are_equal_and_training_batches_would_not_be(
    mixed_size_checkpoint, batch_invariant_kernels
):
    """The same through `predict` as tensors; and the guard: padding every image of a batch
    to its largest (the training collate, evaluation's old way) changes them on this data."""
    source, _, model = mixed_size_checkpoint
    dataset = CocoDetection(source.val_ann, source.val_images, train=False, scale=(96, 96))

    def as_tensors(results):
        return (
            torch.tensor([r["bbox"] for r in results]),
            torch.tensor([r["score"] for r in results]),
            torch.tensor([r["category_id"] for r in results]),
        )

    one = as_tensors(predict(model, build_eval_loader(dataset, batch_size=1), [3, 7]))
    for batch_size in (2, 8, 16):
        grouped = as_tensors(
            predict(model, build_eval_loader(dataset, batch_size=batch_size), [3, 7])
        )
        assert all(torch.equal(a, b) for a, b in zip(grouped, one, strict=True))
    padded_to_largest = predict(model, build_loader(dataset, batch_size=8, shuffle=False), [3, 7])
    assert padded_to_largest != predict(
        model, build_loader(dataset, batch_size=1, shuffle=False), [3, 7]
    )


def test_eval_batches_hold_one_padded_size_each_every_image_once_in_a_stable_order():
    sizes = [(70, 96), (64, 96), (96, 64), (72, 90), (30, 96), (96, 60), (65, 96), (90, 96)]
    batches = list(SameShapeBatches(sizes, batch_size=2))
    # padded 96x96: 0 3 6 7; 64x96: 1; 96x64: 2 5; 32x96: 4 (groups by first appearance)
    assert batches == [[0, 3], [6, 7], [1], [2, 5], [4]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    for batch in batches:
        assert len({padded_size(*sizes[i]) for i in batch}) == 1
    assert len(SameShapeBatches(sizes, batch_size=2)) == 5
    assert list(SameShapeBatches(sizes, batch_size=1)) == [[i] for i in (0, 3, 6, 7, 1, 2, 5, 4)]


def test_an_image_whose_json_size_is_wrong_gets_a_batch_of_its_own_size():
    def sample(h: int, w: int, image_id: int):
        image = torch.full((3, h, w), 7, dtype=torch.uint8)
        return image, Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), image_id,
                             (h, w), (1.0, 1.0))  # fmt: skip

    batches = collate_by_shape([sample(30, 40, 1), sample(50, 20, 2), sample(20, 60, 3)])
    assert [b.images.shape for b in batches] == [(2, 3, 32, 64), (1, 3, 64, 32)]
    assert [[t.image_id for t in b.targets] for b in batches] == [[1, 3], [2]]
    assert batches[0].image_sizes == [(30, 40), (20, 60)]


class ThreadGather:
    """gather_for_metrics(objects) between threads standing in for processes: each hands in its
    list and gets every rank's, concatenated in rank order."""

    def __init__(self, processes: int) -> None:
        self.barrier = threading.Barrier(processes, timeout=60)
        self.slots: list[list] = [[] for _ in range(processes)]

    def of_rank(self, rank: int):
        def gather(objects: list) -> list:
            self.slots[rank] = objects
            self.barrier.wait()
            gathered = [o for slot in self.slots for o in slot]
            self.barrier.wait()
            return gathered

        return gather


@pytest.mark.parametrize("processes,batch_size", [(2, 1), (3, 2), (4, 3)])
def test_under_several_processes_every_image_counts_once_as_at_batch_size_1(
    mixed_size_checkpoint, batch_invariant_kernels, processes, batch_size
):
    """Accelerate's own sharding of the eval loader (short batches and all), `predict` in each
    process, a gather per batch: every process returns the detections of batch size 1 in one
    process, each image once, though Accelerate repeats batches to even the processes out."""
    source, _, model = mixed_size_checkpoint
    dataset = CocoDetection(source.val_ann, source.val_images, train=False, scale=(96, 96))
    expected = predict(model, build_eval_loader(dataset, batch_size=1), [3, 7])
    shards = [
        prepare_data_loader(
            build_eval_loader(dataset, batch_size=batch_size),
            num_processes=processes,
            process_index=rank,
        )
        for rank in range(processes)
    ]
    batches = [[t.image_id for item in shard for b in item for t in b.targets] for shard in shards]
    assert sum(map(len, batches)) > len(dataset)  # 13, 8 and 6 batches: some repeated
    gather = ThreadGather(processes)
    with ThreadPoolExecutor(processes) as pool:
        runs = [
            pool.submit(predict, model, shard, [3, 7], gather=gather.of_rank(rank))
            for rank, shard in enumerate(shards)
        ]
        results = [run.result() for run in runs]
    assert all(r == expected for r in results)

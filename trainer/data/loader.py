"""The unpaired X/Y loader: the workers' dataset (two domain streams zipped into batches, each carrying its
worker's position) and the loader the training loop iterates, with its exact resume state and counters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import traceback
from collections import Counter
from typing import Any, Iterator

import torch

from shards.pixels import RGB8, PixelFormat
from trainer.config.sections import DataConfig
from trainer.data.augment import augment, decode_or_count, extra_channels
from trainer.data.formats import to_unit_range
from trainer.data.health import BAD_KINDS, BadSampleCounter, check_bad_fraction
from trainer.data.plan import DOMAINS, DataError, Shard, check_cache_dir, mix, train_shards
from trainer.data.stream import DomainStream
from trainer.runtime.cpu_threads import loader_workers
from trainer.runtime.preemption import ignore_in_worker


class UnpairedShards(torch.utils.data.IterableDataset):
    """Batches {"x", "y" (integer pixels [B, C, H, W] of each domain's format, see augment.pixel_tensor),
    "extra_x", "extra_y", "state", "bad"} of one rank's slots.

    Worker w of the DataLoader serves logical slot (w + offset) % num_workers, so after `consumed` batches a new
    DataLoader (which starts with worker 0) continues with offset = consumed % num_workers.
    """

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        slot_states: dict[int, dict[str, list[int]]],
        offset: int,
        shards: dict[str, list[Shard]] | None = None,
        formats: dict[str, PixelFormat] | None = None,
    ):
        super().__init__()
        self.cfg, self.batch_size, self.seed, self.rank, self.world_size = cfg, batch_size, seed, rank, world_size
        self.shards = shards or {d: train_shards(cfg, d) for d in DOMAINS}
        self.formats = formats or {d: RGB8 for d in DOMAINS}
        self.slot_states = slot_states
        self.offset = offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.cfg.num_workers)
        logical = ((info.id if info else 0) + self.offset) % workers
        slot, slots = self.rank * workers + logical, self.world_size * workers
        state = self.slot_states.get(logical, {d: [0, 0] for d in DOMAINS})
        bad, worker_bad, worker_read = BadSampleCounter(), Counter(), 0
        streams = {
            d: DomainStream(self.cfg, self.shards[d], self.seed, d, slot, slots).samples(*state[d], bad)
            for d in DOMAINS
        }
        while True:
            batch: dict[str, Any] = {"state": {"slot": logical}}
            read = 0
            for domain in DOMAINS:
                images, extras = [], []
                while len(images) < self.batch_size:
                    epoch, position, sample = next(streams[domain])
                    read += 1
                    batch["state"][domain] = [epoch, position + 1]
                    decoded = decode_or_count(
                        sample, self.cfg.extra, bad, self.cfg.max_image_pixels, self.formats[domain]
                    )
                    if decoded is None:
                        # The main process checks each batch; a worker whose samples are all bad would never
                        # finish one, so it checks the samples it read itself.
                        check_bad_fraction(worker_bad + bad.counts, worker_read + read, self.cfg.max_bad_fraction)
                        continue
                    image, extra = decoded
                    generator = torch.Generator().manual_seed(
                        mix(self.seed, DOMAINS.index(domain), epoch, slot, position)
                    )
                    label = extra if self.cfg.extra == "label" else None
                    image, label = augment(image, label, self.cfg, generator)
                    images.append(image)
                    extras.append(label if self.cfg.extra == "label" else extra)
                batch[domain] = torch.stack(images)
                if self.cfg.extra != "none":
                    batch[f"extra_{domain}"] = torch.stack(extras)
            batch["bad"] = bad.take()
            batch["bad_examples"], bad.examples = bad.examples, []
            batch["read"] = read
            batch["retries"], bad.retries = bad.retries, 0
            worker_bad.update(batch["bad"])
            worker_read += read
            yield batch


class UnpairedLoader:
    """One rank's endless training batches on the device: {"x", "y"} float in [-1, 1], plus "extra_x"/"extra_y"
    generator channels when data.extra is set. Tracks the data position (`state_dict`) and bad-sample counts."""

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        formats: dict[str, PixelFormat] | None = None,
    ):
        """Resolves and checks the training shards of both domains and the cache directory now (a wrong data.root
        fails here, before a run writes anything); the stream starts on the first batch.

        Raises:
            ConfigError: data.root, the shard URLs or data.cache_dir cannot be used (one line).
        """
        workers = loader_workers(cfg.num_workers, device.type == "cuda")
        self.cfg, self.batch_size, self.seed = dataclasses.replace(cfg, num_workers=workers), batch_size, seed
        check_cache_dir(cfg)
        self.shards = {d: train_shards(cfg, d) for d in DOMAINS}
        self.rank, self.world_size, self.device = rank, world_size, device
        self.formats = formats or {d: RGB8 for d in DOMAINS}
        self.consumed = 0
        self.slot_states: dict[int, dict[str, list[int]]] = {}
        self.bad: Counter = Counter()
        self.read = 0
        self.retries = 0
        self._iterator: Iterator | None = None

    def plan_id(self) -> str:
        """What the data plan is made of - each domain's shard names and sample counts, in order - as a digest: a
        position in one plan means nothing in another. Names, not URLs, so the same shards moved elsewhere (a
        node-local copy, a bucket) keep their positions."""
        listing = {d: [(shard.url.rsplit("/", 1)[-1], shard.samples) for shard in self.shards[d]] for d in DOMAINS}
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last batch returned."""
        return {
            "plan": self.plan_id(),
            "world_size": self.world_size,
            "num_workers": max(1, self.cfg.num_workers),
            "consumed": self.consumed,
            "slots": {str(k): v for k, v in self.slot_states.items()},
            "bad": dict(self.bad),
            "read": self.read,
            "retries": self.retries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Continue from `state`: exactly on the same world size, worker count and shards; otherwise from the
        start of the oldest epoch any slot was in (the plan of another size cannot continue mid-epoch), or, when
        the training shards changed (another data.root, shards added or rewritten), from the start of epoch 0.
        Returns what was not continued, in words, or None."""
        slots = {int(k): v for k, v in state["slots"].items()}
        same_data = state.get("plan", self.plan_id()) == self.plan_id()  # checkpoints before plan ids: unknown
        note, workers = None, max(1, self.cfg.num_workers)
        if same_data and state["world_size"] == self.world_size and state["num_workers"] == workers:
            self.consumed, self.slot_states = state["consumed"], slots
        else:
            epochs = {d: min((s[d][0] for s in slots.values()), default=0) for d in DOMAINS}
            if not same_data:
                epochs = dict.fromkeys(DOMAINS, 0)
                note = (
                    "the training shards differ from those the checkpoint's data position refers to (another "
                    "data.root, or shards added, removed or rewritten): the data order starts afresh at epoch 0"
                )
            self.consumed = 0
            self.slot_states = {w: {d: [epochs[d], 0] for d in DOMAINS} for w in range(workers)}
        self.bad, self.read = Counter(state.get("bad", {})), state.get("read", 0)
        self.retries = state.get("retries", 0)
        self._iterator = None
        return note

    def _start(self) -> Iterator:
        workers = self.cfg.num_workers
        dataset = UnpairedShards(
            self.cfg,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.slot_states,
            offset=self.consumed % max(1, workers),
            shards=self.shards,
            formats=self.formats,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # Our randomness derives from data positions; a generator of its own keeps the loader's worker seeds
            # from drawing on the global RNG, whose stream a resumed run continues exactly (dropout).
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_in_worker,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except DataError as err:  # from a worker: its message ends with the original one
            failure = str(err).rstrip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
            traceback.clear_frames(err.__traceback__)  # so that nothing but us keeps the loader's iterator alive
        else:
            failure = None
        if failure is not None:
            self._iterator = None  # its workers stop now, not when a garbage collection finds them
            raise DataError(failure)
        self.consumed += 1
        state = batch["state"]
        self.slot_states[state["slot"]] = {d: state[d] for d in DOMAINS}
        self.bad.update(batch["bad"])
        self.read += batch["read"]
        self.retries += batch["retries"]
        for example in batch["bad_examples"]:
            print(f"[data rank {self.rank}] bad sample {example}")
        self._check_bad_fraction()
        out = {}
        for domain in DOMAINS:
            images = batch[domain].to(self.device, non_blocking=True)
            out[domain] = to_unit_range(images, self.formats[domain])
            if self.cfg.extra != "none":
                extra = batch[f"extra_{domain}"].to(self.device, non_blocking=True)
                out[f"extra_{domain}"] = extra_channels(extra, self.cfg.extra, images.shape[-1])
        return out

    def counters(self) -> dict[str, float]:
        """The counts of this rank (samples read, bad samples by kind, retried remote reads): summed over ranks
        they are the run's."""
        bad = {f"data/bad_{kind}": float(self.bad.get(kind, 0)) for kind in BAD_KINDS}
        return {"data/samples_read": float(self.read), "data/retries": float(self.retries), **bad}

    def progress(self) -> dict[str, float]:
        """The epoch each domain's reading of this rank has reached (data/epoch_x, data/epoch_y)."""
        out = {}
        for domain in DOMAINS:
            epochs = [state[domain][0] for state in self.slot_states.values()]
            out[f"data/epoch_{domain}"] = float(min(epochs, default=0))
        return out

    def _check_bad_fraction(self) -> None:
        check_bad_fraction(self.bad, self.read, self.cfg.max_bad_fraction)

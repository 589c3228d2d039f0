"""Unpaired X/Y training streams from tar shards with WebDataset, per-(rank, worker) plans and exact resume.

The plan. For each domain and epoch the shard list is permuted (or, with `resampled`, drawn with replacement) from
(seed, domain, epoch); its samples form one sequence of `total` positions. With S = world_size x num_workers
slots, slot s reads the L = ceil(total / S) positions starting at s * total // S, wrapping around at the end: every
sample is read once per epoch, and a slot whose share is one short re-reads one sample of the next share (the
documented padding). Every slot, so every rank, reads exactly L samples per epoch, whatever the shard counts.

Inside a slot, samples pass a seeded shuffle buffer, are decoded (a counting handler skips bad ones without
sleeping) and augmented with randomness derived from (seed, domain, epoch, slot, position). A shard that comes up
short (truncated, or a remote one unreadable within its retries: shards.remote) leaves a placeholder in each
position it did not fill, a bad sample when decoded, so no position depends on a failure. The position within
the epoch is therefore the whole state of a slot: resuming replays the raw samples up to it without decoding.
X and Y are separate streams, zipped into batches inside the worker, and every batch carries its worker's state.
Shards are local files, `pipe:` commands or store URLs (http(s), s3, gs), all opened by shards.streams.

Modules: plan (data root, shards, seeds), stream (one domain's samples for one slot), health (bad samples, a store
that is down), augment (decode and augment), loader (the workers' dataset and the loop's loader), test_sets,
image_folders (user folders of images made into shards).
"""

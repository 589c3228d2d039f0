"""Checkpoints: save (synchronous or in the background), verify, find, load.

A checkpoint is RUN/checkpoints/step_XXXXXXXX/ holding safetensors and JSON only, so resuming from a checkpoint
someone else wrote cannot run code (nothing is unpickled, not even by DeepSpeed or Accelerate):
  - units.safetensors: the backend-independent state of both units (full fp32 weights, Adam moments, update
    count), written by rank 0 (gathered from FSDP2 shards or ZeRO partitions);
  - rank_XXXXX.safetensors per rank: its image pools, data position, schedulers, loss scalers and RNG states
    (trainer.checkpoint.state_file: tensors as tensors, the rest as JSON);
  - train_state.json: step, world size, backend, the model architecture and tracker ids.
It is written as `step_XXXXXXXX.tmp`; once every rank has written its part, COMPLETE (the sha256 of every file) is
written and the directory renamed, then `latest` is replaced atomically and old checkpoints are rotated out
(renamed to `*.old`, then deleted). A save is a capture into host memory (collectives) followed by writing, which
`save_checkpoint` does before it returns and `AsyncCheckpointWriter` in a background thread. Only real
directories (never symlinks) named exactly step_XXXXXXXX that hold COMPLETE are ever resumed from; the debris of an
interrupted save or rotation (`.tmp`, `.old`) is removed by the next save, and damaged checkpoints a resume skipped
are kept as `.damaged`. Every JSON file is read with shards.bounded_read's bounds; every file is written through
trainer.runtime.run_files, which never follows a link.

Modules: format (names, recognising and verifying a checkpoint), save, load, resume (which checkpoint a run
continues from), train_state (what a checkpoint holds besides the units), state_file (a rank's state as
safetensors + JSON), export (exported generators: written whole, loaded within bounds).
"""

"""Where and how the run executes: the engine (the Accelerator, devices, autocast, collectives, per-unit steps and
state) with its backends (DDP, FSDP2, DeepSpeed ZeRO), EMA, LR schedules, precision, the process's signals and
exit codes (preemption, process_exit) and the run directory's files and lock (run_files, run_lock). Only this
package imports accelerate.
"""

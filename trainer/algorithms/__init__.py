"""The model families: what the units are and what one step of each computes, free of any distributed or tracking
code. `family(name)` returns the `Family` of model.family (cyclegan, or cut for CUT and FastCUT); losses and the
image pool are shared; bounds caps what an architecture read from a checkpoint or export may allocate.
"""

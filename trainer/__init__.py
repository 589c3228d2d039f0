"""cyclegan-dist's training package: config, models, the CycleGAN algorithm, the engine and the loop."""

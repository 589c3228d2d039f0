"""Evaluation: the evaluator of the test split (PSNR/SSIM/L1 and cycle terms, FID/KID with an Inception network),
its image metrics and the Inception metrics, imported only when weights are given.
"""

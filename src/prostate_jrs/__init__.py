"""Joint registration and segmentation for adaptive radiotherapy of prostate cancer."""

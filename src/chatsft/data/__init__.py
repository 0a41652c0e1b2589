"""The data pipeline: raw rows → normalised examples → token ids + trained masks → packed rows → batches."""

"""The drift stage: compare the champion's training data with recent traffic, and alert on drift."""

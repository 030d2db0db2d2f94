"""stitching"""

# how overlapping patches are weighted into a map (`merge.window`): the Hann window. Where neighbouring patches
# disagree, it moves from one to the other across the whole overlap; the Gaussian of σ = patch / 8 does it in a band a
# few pixels wide around the midpoint, which shows as a grid. Here, not in `merge`, so the API imports it for free
DEFAULT_BLEND = "cosine"

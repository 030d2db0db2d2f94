"""Networks: per-modality autoencoders and the two-branch DAMM U-Net. No I/O here."""

"""Data: image folders and splits, the one preprocessing module, epoch samplers and the
frozen-backbone feature cache (:mod:`cnnkit.data.features`)."""

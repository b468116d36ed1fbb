"""Datasets: image loading rules, intake (folder, zip, CSV), splits, the dataset report and the datasets a
workspace offers. Import from the sub-modules (``tl_core.data.intake``, ``.images``, ``.splits``, ``.report``,
``.library``)."""

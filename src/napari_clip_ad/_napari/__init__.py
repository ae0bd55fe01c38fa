"""The napari plugin: reader, writer, sample data and the two dock widgets.

This is the only part of the package that imports napari or Qt; the manifest is
``napari_clip_ad/napari.yaml``.
"""

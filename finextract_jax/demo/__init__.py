"""The embedded demo: a small pixel-space base model (trained by experiments/demo_base.py on
images that ship with scikit-image, committed here) and a private set of real photos it never saw."""

"""The demo: its synthetic corpus (`data`), the `cm3corpus demo` command (`command`) and the fitting of
the shipped demo CLIP (`fit_clip`; the CLIP itself is `transforms/lib/demo_clip/`, a product asset)."""
